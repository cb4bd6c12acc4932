//! The state one node shares between its HTTP workers: the store, the wasm runtime, the function
//! registry (latest version of every function, pre-instantiated), the API-key cache and the sync
//! invocation recorder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use sluice_core::{FunctionConfig, Limits, Scope, SluiceError};
use sluice_runtime::{Prepared, Runtime};
use sluice_store::{KeyRecord, Store, VersionRecord};

use crate::error::store_error;
use crate::recorder::Recorder;

/// Settings of a node, fixed at start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub limits: Limits,
    /// Let guests call loopback and private addresses that are in their allow list.
    pub outbound_allow_private: bool,
}

/// A deployed function version, ready to run.
pub struct Deployed {
    pub record: VersionRecord,
    pub config: Arc<FunctionConfig>,
    pub prepared: Arc<Prepared>,
}

/// Who is calling: the key's tenant (none for admin keys) and scopes.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub tenant: Option<String>,
    pub scopes: Vec<Scope>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    /// Whether the key may see `tenant`'s objects at all. Objects of other tenants answer 404.
    pub fn sees(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant.as_deref() == Some(tenant)
    }

    /// Whether the key may act on `tenant` with `scope`.
    pub fn may(&self, tenant: &str, scope: Scope) -> bool {
        self.is_admin() || (self.tenant.as_deref() == Some(tenant) && self.scopes.contains(&scope))
    }
}

type FunctionMap = HashMap<String, HashMap<String, Arc<Deployed>>>;

pub struct Node {
    pub config: NodeConfig,
    pub store: Arc<dyn Store>,
    pub runtime: Arc<Runtime>,
    pub recorder: Recorder,
    functions: RwLock<FunctionMap>,
    keys: RwLock<HashMap<String, Arc<Principal>>>,
    /// The runtime that owns the store's connections and background tasks; API calls run here
    /// rather than on the per-core HTTP workers.
    pub control: tokio::runtime::Handle,
    pub public_url: RwLock<String>,
}

impl Node {
    /// Opens the node's state: loads keys and every function's latest version (from the artifact
    /// cache where possible). Must be called inside the control runtime.
    pub async fn open(config: NodeConfig, store: Arc<dyn Store>) -> anyhow::Result<Arc<Self>> {
        let mut rt = sluice_runtime::RuntimeConfig::new(config.data_dir.join("artifacts"));
        rt.instances_max = config.limits.instances_max;
        rt.function_memory_bytes_max = config.limits.function_memory_bytes_max;
        rt.log_bytes_per_invocation_max = config.limits.log_bytes_per_invocation_max;
        rt.outbound_allow_private = config.outbound_allow_private;
        let runtime = Arc::new(Runtime::new(rt)?);
        let recorder = Recorder::start(store.clone(), config.limits.log_queue_max);
        let node = Arc::new(Self {
            config,
            store,
            runtime,
            recorder,
            functions: RwLock::default(),
            keys: RwLock::default(),
            control: tokio::runtime::Handle::current(),
            public_url: RwLock::new(String::new()),
        });
        node.reload_keys().await?;
        for record in node
            .store
            .all_latest_versions()
            .await
            .map_err(store_error)?
        {
            let (tenant, function) = (record.tenant.clone(), record.function.clone());
            match node.load_version(record).await {
                Ok(d) => node.install(d),
                Err(e) => tracing::error!(%tenant, %function, error = %e, "cannot load function"),
            }
        }
        Ok(node)
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// The latest version of `tenant/function` on this node.
    pub fn function(&self, tenant: &str, function: &str) -> Option<Arc<Deployed>> {
        let map = self.functions.read().expect("function map lock");
        map.get(tenant)?.get(function).cloned()
    }

    /// Makes a version the one `/fn` serves.
    pub fn install(&self, deployed: Deployed) {
        let mut map = self.functions.write().expect("function map lock");
        let tenant = deployed.record.tenant.clone();
        let function = deployed.record.function.clone();
        map.entry(tenant)
            .or_default()
            .insert(function, Arc::new(deployed));
    }

    pub fn uninstall(&self, tenant: &str, function: &str) {
        let mut map = self.functions.write().expect("function map lock");
        if let Some(fns) = map.get_mut(tenant) {
            fns.remove(function);
        }
    }

    /// Prepares a stored version: the artifact from disk, or compiled from the stored blob.
    pub async fn load_version(&self, record: VersionRecord) -> Result<Deployed, SluiceError> {
        let runtime = self.runtime.clone();
        let store = self.store.clone();
        let digest = record.blob_digest.clone();
        let handle = tokio::runtime::Handle::current();
        let prepared = tokio::task::spawn_blocking(move || {
            runtime.load(&digest, || {
                handle.block_on(store.get_blob(&digest)).ok().flatten()
            })
        })
        .await
        .map_err(|e| SluiceError::internal(format!("loading task failed: {e}")))??;
        let config = Arc::new(record.config.clone());
        Ok(Deployed {
            record,
            config,
            prepared,
        })
    }

    /// Rebuilds the API-key cache from the store.
    pub async fn reload_keys(&self) -> Result<(), SluiceError> {
        let keys = self.store.active_keys().await.map_err(store_error)?;
        let map = keys
            .into_iter()
            .map(|k| (k.hash.clone(), Arc::new(principal(&k))))
            .collect();
        *self.keys.write().expect("key cache lock") = map;
        Ok(())
    }

    /// The principal of a presented key, by its hash. Only the cache is consulted, so a flood of
    /// bad keys costs a hash and a map lookup, never a database query.
    pub fn principal_for_key(&self, key: &str) -> Option<Arc<Principal>> {
        let hash = sluice_core::ids::hash_api_key(key);
        self.keys
            .read()
            .expect("key cache lock")
            .get(&hash)
            .cloned()
    }
}

fn principal(k: &KeyRecord) -> Principal {
    Principal {
        key_id: k.id.clone(),
        tenant: k.tenant.clone(),
        scopes: k.scopes.clone(),
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
