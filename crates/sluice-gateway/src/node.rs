//! The state one node shares between its HTTP workers: the store, the wasm runtime, the function
//! registry (latest version of every function, as metadata; code comes from the runtime's code
//! cache on a call), the API-key cache and the sync invocation recorder. It starts nothing: the
//! composition root (`sluice-node`) builds the runtime and the recorder, runs the recorder's
//! writer and hands the node what the scheduler reports ([`Scheduling`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sluice_core::{FunctionConfig, Limits, Scope, SluiceError};
use sluice_runtime::{BlobSource, CodeKey, Prepared, Runtime};
use sluice_store::{KeyRecord, Store, VersionRecord};

use crate::admission::{Admission, FunctionAdmission, Rate};
use crate::error::store_error;
pub use crate::principal::{Principal, bearer};
use crate::recent::{Recent, STORE_READ_EVERY};
use crate::recorder::Recorder;
use sluice_core::share::{SharedSlot, TenantShares};
use sluice_runtime::metrics::CallMetrics;

/// Settings of a node, fixed at start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub limits: Limits,
    /// Every tenant's rate unless it has its own; `None`: unlimited.
    pub tenant_rate: Option<Rate>,
    /// The rate of keyless calls to each tenant's public functions, apart from (and within) the
    /// tenant's own rate; `None`: only the tenant's rate applies.
    pub anonymous_rate: Option<Rate>,
    /// Every tenant's usage quotas unless it has its own.
    pub usage_limits: sluice_core::UsageLimits,
    /// How often the node re-reads every tenant's unfinished invocations for its queued quotas.
    pub quota_refresh: Duration,
    /// Sync calls running at once on this node; beyond it calls are shed with 503.
    pub sync_inflight_max: usize,
    /// The fraction of the node's sync, async-accept and deploy slots one tenant may hold, and
    /// of its heavy slots while other tenants wait for one.
    pub tenant_share: f64,
    /// Async invocations running at once on this node.
    pub async_inflight_max: usize,
    /// Async calls being accepted at once (reading their body, waiting for the commit); beyond
    /// it new ones get 503 at once.
    pub async_enqueue_inflight_max: usize,
    /// Component uploads and deploys in flight at once (each holds up to a component's bytes
    /// while it is read, waits for the compile pool or compiles); beyond it new ones get 503.
    pub deploy_inflight_max: usize,
    /// Lease of an async invocation (renewed every third of it).
    pub lease_ms: u64,
    /// Bounds of the control plane (`/v1`, `/metrics`): per key, per tenant, per node.
    pub control: crate::control::ControlConfig,
    /// The runtime the control plane's handlers run on, a runtime of their own so that API work
    /// never delays the scheduler, the queue writer and the heartbeats on the control runtime;
    /// `None`: the runtime [`Node::open`] runs on.
    pub api_runtime: Option<tokio::runtime::Handle>,
    /// For tests of that isolation: every `/v1` request blocks its thread this long before it is
    /// handled, as a CPU-bound handler would.
    pub test_api_stall: Option<Duration>,
    /// Fraction of the node's cores guests may use before async work beyond reservations waits.
    pub utilization_target: f64,
    /// An async call whose deadline is this close starts whatever the load.
    pub promote_ahead: Duration,
}

impl NodeConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            limits: Limits::default(),
            tenant_rate: None,
            anonymous_rate: None,
            usage_limits: Default::default(),
            quota_refresh: crate::quota::QUEUE_USAGE_REFRESH,
            sync_inflight_max: 512,
            tenant_share: 0.25,
            async_inflight_max: 256,
            utilization_target: 0.8,
            promote_ahead: Duration::from_secs(30),
            async_enqueue_inflight_max: 256,
            deploy_inflight_max: 8,
            lease_ms: 30_000,
            control: Default::default(),
            api_runtime: None,
            test_api_stall: None,
        }
    }
}

/// A deployed function version: its metadata. Its code is loaded on a call, from the node's
/// code cache ([`Node::code`]).
pub struct Deployed {
    pub record: VersionRecord,
    pub config: Arc<FunctionConfig>,
    /// Which compiled component runs it.
    pub code_key: CodeKey,
    pub admission: FunctionAdmission,
    /// The tenant, as the runtime's slow-lane group (slots are bounded per tenant).
    pub tenant_group: Arc<str>,
    /// The function's name, shared with every call (no allocation per call).
    pub function_name: Arc<str>,
    /// Its series in `/metrics`, shared by its versions.
    pub metrics: Arc<CallMetrics>,
    /// Its warm instances' pool, when it lets an instance serve more than one call.
    pub reuse: Option<sluice_runtime::warm::Reuse>,
    /// The version, as the runtime's bound of instances alive at once knows it.
    pub instance_key: sluice_runtime::warm::WarmKey,
}

impl Deployed {
    pub fn new(record: VersionRecord) -> Self {
        let config = Arc::new(record.config.clone());
        let rate = Rate::of(config.rate_per_sec, config.burst);
        let admission = FunctionAdmission::new(rate, config.max_concurrency, Default::default());
        let code_key = CodeKey::new(&record.tenant, &record.blob_digest);
        let tenant_group = code_key.tenant.clone();
        let function_name = Arc::from(record.function.as_str());
        let metrics = Arc::new(CallMetrics::new(&record.tenant, &record.function));
        let reuse = sluice_runtime::warm::Reuse::of(
            &record.tenant,
            &record.function,
            record.version,
            &record.blob_digest,
            &config,
        );
        let instance_key = sluice_runtime::warm::WarmKey::new(
            &record.tenant,
            &record.function,
            record.version,
            &record.blob_digest,
        );
        Self {
            record,
            config,
            code_key,
            admission,
            tenant_group,
            function_name,
            metrics,
            reuse,
            instance_key,
        }
    }
}

/// Functions by tenant, then name: the installed (latest) version of each.
type Registry<T> = HashMap<String, HashMap<String, Arc<T>>>;

/// One version of one function, as the registry sees it.
trait Registered {
    fn tenant_and_function(&self) -> (&str, &str);
    fn version(&self) -> i64;
    /// Takes over what belongs to the function rather than to one version from the version it
    /// replaces.
    fn take_over(&mut self, previous: &Self);
}

impl Registered for Deployed {
    fn tenant_and_function(&self) -> (&str, &str) {
        (&self.record.tenant, &self.record.function)
    }

    fn version(&self) -> i64 {
        self.record.version
    }

    fn take_over(&mut self, previous: &Self) {
        self.admission.inherit(&previous.admission);
    }
}

/// Installs `new` unless the registry already holds the same or a newer version of the function:
/// concurrent deploys finish compiling in any order, and the last to finish must not put an older
/// version back. Returns whether `new` was installed.
fn install_newer<T: Registered>(registry: &mut Registry<T>, mut new: T) -> bool {
    let (tenant, function) = new.tenant_and_function();
    let (tenant, function) = (tenant.to_string(), function.to_string());
    let functions = registry.entry(tenant).or_default();
    if let Some(current) = functions.get(&function) {
        if current.version() >= new.version() {
            return false;
        }
        new.take_over(current);
    }
    functions.insert(function, Arc::new(new));
    true
}

/// The API-key cache: principals by key hash.
#[derive(Default)]
struct KeyCache {
    by_hash: RwLock<HashMap<String, Arc<Principal>>>,
    /// Held from a reload's store read to its install. Without it a reload that read before a
    /// revoke could install its snapshot after a later reload installed the revoke, and the
    /// revoked key would work again.
    reload: tokio::sync::Mutex<()>,
}

impl KeyCache {
    async fn reload<E, F>(&self, read: impl FnOnce() -> F) -> Result<(), E>
    where
        F: std::future::Future<Output = Result<Vec<KeyRecord>, E>>,
    {
        let _serial = self.reload.lock().await;
        let keys = read().await?;
        let map = keys.into_iter().map(|k| (k.hash.clone(), Arc::new(principal(&k)))).collect();
        *self.by_hash.write().expect("key cache lock") = map;
        Ok(())
    }

    fn get(&self, hash: &str) -> Option<Arc<Principal>> {
        self.by_hash.read().expect("key cache lock").get(hash).cloned()
    }
}

pub struct Node {
    /// This node's identity: in its leases, its heartbeats and `GET /v1/nodes`. Unique per
    /// process.
    pub id: String,
    pub config: NodeConfig,
    pub store: Arc<dyn Store>,
    pub runtime: Arc<Runtime>,
    pub recorder: Recorder,
    pub admission: Admission,
    /// Admission to `/v1` and `/metrics` ([`crate::control`]).
    pub control_admission: crate::control::ControlAdmission,
    /// Each tenant's usage limits, and its queued invocations as this node counts them.
    pub quotas: crate::quota::Quotas,
    /// Notified when an invocation is queued here: the scheduler waits on it between polls.
    pub queued: Arc<tokio::sync::Notify>,
    /// What the scheduler last saw and decided, once it runs (`GET /v1/tenants/{t}/usage`).
    pub scheduling: RwLock<Option<Arc<dyn Scheduling>>>,
    /// Async calls whose body is being read now, with a share per tenant (see
    /// [`NodeConfig::async_enqueue_inflight_max`]): a client trickling its body in holds one of
    /// these, never a slot of the commit below.
    pub async_reads: TenantShares,
    /// Async calls waiting for their commit now, with a share per tenant.
    pub async_enqueues: TenantShares,
    /// Uploads and deploys in flight now, with a share per tenant (see
    /// [`NodeConfig::deploy_inflight_max`]).
    pub deploys: TenantShares,
    functions: RwLock<Registry<Deployed>>,
    keys: KeyCache,
    /// The runtime the control plane's handlers (`/v1`, `/metrics`) run on, rather than on the
    /// per-core HTTP workers or beside the scheduler and the heartbeats
    /// ([`NodeConfig::api_runtime`]).
    pub api: tokio::runtime::Handle,
    pub public_url: RwLock<String>,
    /// The queue's depth for `/metrics`, read from the store at most once per
    /// [`STORE_READ_EVERY`].
    pub queue_depth: Recent<Vec<(String, sluice_core::Criticality, u64)>>,
}

impl Node {
    /// Opens the node's state: the keys and every function's latest version, as metadata only (a
    /// version's code is loaded on its first call). Must be called inside the control runtime.
    pub async fn open(
        config: NodeConfig,
        store: Arc<dyn Store>,
        runtime: Arc<Runtime>,
        recorder: Recorder,
    ) -> anyhow::Result<Arc<Self>> {
        let mut admission = Admission::new(Default::default(), config.sync_inflight_max, config.tenant_rate)
            .with_sync_tenant_max(TenantShares::share_of(config.sync_inflight_max, config.tenant_share));
        admission.anonymous_default = config.anonymous_rate;
        let quotas = crate::quota::Quotas::new(config.usage_limits);
        let control_admission = crate::control::ControlAdmission::new(config.control, Default::default());
        // Each tenant may take a share of the node's slots (a quarter, as of the slow lane's).
        let enqueue_max = config.async_enqueue_inflight_max;
        let async_reads = TenantShares::new(
            "async calls reading their body",
            enqueue_max,
            TenantShares::share_of(enqueue_max, config.tenant_share),
        );
        let async_enqueues = TenantShares::new(
            "async calls being committed",
            enqueue_max,
            TenantShares::share_of(enqueue_max, config.tenant_share),
        );
        let deploy_max = config.deploy_inflight_max;
        // Deploys come in bursts (a pipeline deploying its functions in parallel): a tenant's
        // share of them is at least half the node's.
        let deploy_share = TenantShares::share_of(deploy_max, config.tenant_share.max(0.5));
        let deploys = TenantShares::new("uploads and deploys", deploy_max, deploy_share);
        let api = config.api_runtime.clone().unwrap_or_else(tokio::runtime::Handle::current);
        let node = Arc::new(Self {
            id: format!("{}-{}", std::process::id(), sluice_core::ids::short_id("node")),
            config,
            store,
            runtime,
            recorder,
            admission,
            control_admission,
            quotas,
            queued: Arc::default(),
            scheduling: RwLock::default(),
            async_reads,
            async_enqueues,
            deploys,
            functions: RwLock::default(),
            keys: KeyCache::default(),
            api,
            public_url: RwLock::new(String::new()),
            queue_depth: Recent::new(STORE_READ_EVERY),
        });
        node.reload_keys().await?;
        node.reload_rates().await?;
        node.reload_usage_limits().await?;
        // Before the node takes calls: a tenant already at its quota must not get past it while
        // the counters would read zero.
        node.refresh_queued_usage().await?;
        for record in node.store.all_latest_versions().await.map_err(store_error)? {
            node.install(Deployed::new(record));
        }
        Ok(node)
    }

    /// Wakes the scheduler: an invocation was just queued.
    pub fn notify_scheduler(&self) {
        self.queued.notify_one();
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// The latest version of `tenant/function` on this node.
    pub fn function(&self, tenant: &str, function: &str) -> Option<Arc<Deployed>> {
        let map = self.functions.read().expect("function map lock");
        map.get(tenant)?.get(function).cloned()
    }

    /// Makes a version the one `/fn` serves, unless a newer one already is; the new version
    /// inherits the function's admission state (see [`FunctionAdmission::inherit`]). Returns
    /// whether it was installed.
    pub fn install(&self, deployed: Deployed) -> bool {
        install_newer(&mut self.functions.write().expect("function map lock"), deployed)
    }

    pub fn uninstall(&self, tenant: &str, function: &str) {
        let mut map = self.functions.write().expect("function map lock");
        if let Some(fns) = map.get_mut(tenant) {
            fns.remove(function);
        }
    }

    /// The ready component of `key`: from the code cache, else its artifact on disk, else
    /// compiled from the tenant's blob in the store. Returns whether it was a cache hit.
    pub async fn code(&self, key: &CodeKey) -> Result<(Arc<Prepared>, bool), SluiceError> {
        self.runtime.code(key, || self.blob_source(key)).await
    }

    /// Fetches `key`'s blob from the store when a compile needs it.
    pub fn blob_source(&self, key: &CodeKey) -> BlobSource {
        let store = self.store.clone();
        let key = key.clone();
        Box::new(move || {
            Box::pin(async move { store.get_blob(&key.tenant, &key.digest).await.map_err(store_error) })
        })
    }

    /// A slot for one more upload or deploy of `tenant` on this node, or at once 429 (the tenant
    /// has its share) or 503 (the node is full).
    pub fn deploy_slot(&self, tenant: &str) -> Result<SharedSlot, SluiceError> {
        self.deploys.admit(tenant, || format!("tenant {tenant}"))
    }

    /// Every installed version.
    pub fn deployed(&self) -> Vec<Arc<Deployed>> {
        let map = self.functions.read().expect("function map lock");
        map.values().flat_map(|fns| fns.values().cloned()).collect()
    }

    /// Rebuilds the API-key cache from the store. Reloads run one at a time, so the cache
    /// always ends at the newest state read.
    pub async fn reload_keys(&self) -> Result<(), SluiceError> {
        self.keys.reload(|| self.store.active_keys()).await.map_err(store_error)
    }

    /// Makes the tenants' own rate limits those of the store.
    pub async fn reload_rates(&self) -> Result<(), SluiceError> {
        let rates: Vec<(String, Rate)> = self
            .store
            .tenant_rates()
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|(tenant, per_sec, burst)| (tenant, Rate { per_sec, burst }))
            .collect();
        self.admission.replace_tenant_rates(&rates);
        Ok(())
    }

    /// Makes the tenants' own usage limits those of the store.
    pub async fn reload_usage_limits(&self) -> Result<(), SluiceError> {
        let own = self.store.tenant_usage_limits().await.map_err(store_error)?;
        self.quotas.replace_own(own);
        Ok(())
    }

    /// Re-reads every tenant's unfinished invocations into this node's queued counters (see
    /// [`crate::quota`]).
    pub async fn refresh_queued_usage(&self) -> Result<(), SluiceError> {
        let marks = self.quotas.mark();
        let usage = self.store.queued_usage().await.map_err(store_error)?;
        self.quotas.refreshed(marks, usage);
        Ok(())
    }

    /// The anonymous callers' bucket of `tenant`, for a call to one of its public functions that
    /// carries no key of the tenant (a valid key's calls count against the tenant's rate only).
    pub fn admit_anonymous(&self, tenant: &str, headers: &http::HeaderMap) -> Result<(), SluiceError> {
        if self.admission.anonymous_default.is_none() {
            return Ok(());
        }
        let keyed = bearer(headers)
            .and_then(|key| self.principal_for_key(key))
            .is_some_and(|p| p.may(tenant, Scope::Invoke));
        if keyed { Ok(()) } else { self.admission.anonymous(tenant) }
    }

    /// Follows a change another node made to `tenant/function`: installs its newest version once
    /// this node has its artifact (already on disk, or the store's blob compiled once), or
    /// uninstalls a deleted function. A version whose code this node cannot
    /// prepare is not installed: the version before it keeps serving. Returns what it did.
    pub async fn refresh_function(&self, tenant: &str, function: &str) -> Result<Refreshed, SluiceError> {
        let latest = self.store.latest_version(tenant, function).await.map_err(store_error)?;
        self.follow(tenant, function, latest).await
    }

    async fn follow(
        &self,
        tenant: &str,
        function: &str,
        latest: Option<VersionRecord>,
    ) -> Result<Refreshed, SluiceError> {
        let installed = self.function(tenant, function);
        let Some(record) = latest else {
            if installed.is_none() {
                return Ok(Refreshed::Unchanged);
            }
            self.uninstall(tenant, function);
            return Ok(Refreshed::Uninstalled);
        };
        let replaces = match &installed {
            None => false,
            Some(d) if d.record.version == record.version && d.record.created_at == record.created_at => {
                return Ok(Refreshed::Unchanged);
            }
            Some(d) if d.record.version < record.version => false,
            // A lower number is either a read older than this node's own install (ignored) or a
            // function deleted and deployed anew, whose numbering restarted (installed instead).
            Some(d) if d.record.created_at < record.created_at => true,
            Some(_) => return Ok(Refreshed::Unchanged),
        };
        let deployed = Deployed::new(record);
        // Its artifact on this node's disk (compiled from the store's blob if missing, which
        // validates it); not loaded into the code cache: like every function, it is loaded on
        // its first call here, if one comes.
        self.runtime.ensure_artifact(&deployed.code_key, self.blob_source(&deployed.code_key)).await?;
        if replaces {
            self.uninstall(tenant, function);
        }
        Ok(if self.install(deployed) { Refreshed::Installed } else { Refreshed::Unchanged })
    }

    /// Follows every function another node may have changed: the backstop for notifications that
    /// were lost. Returns how many functions changed here.
    pub async fn refresh_functions(&self) -> Result<usize, SluiceError> {
        let latest = self.store.all_latest_versions().await.map_err(store_error)?;
        let mut listed: std::collections::HashSet<(String, String)> = Default::default();
        let mut changed = 0;
        for record in latest {
            let (tenant, function) = (record.tenant.clone(), record.function.clone());
            match self.follow(&tenant, &function, Some(record)).await {
                Ok(Refreshed::Unchanged) => {}
                Ok(_) => changed += 1,
                Err(e) => {
                    tracing::warn!(%tenant, %function, error = %e, "a new version's code is not ready here; the previous version keeps serving")
                }
            }
            listed.insert((tenant, function));
        }
        // Installed here but not listed: deleted, or deployed after the list was read. Asked again.
        for d in self.deployed() {
            let (tenant, function) = (d.record.tenant.clone(), d.record.function.clone());
            if !listed.contains(&(tenant.clone(), function.clone()))
                && self.refresh_function(&tenant, &function).await? != Refreshed::Unchanged
            {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// The principal of a presented key, by its hash. Only the cache is consulted, so a flood of
    /// bad keys costs a hash and a map lookup, never a database query.
    pub fn principal_for_key(&self, key: &str) -> Option<Arc<Principal>> {
        let hash = sluice_core::ids::hash_api_key(key);
        self.keys.get(&hash)
    }
}

/// What the scheduler reports to `/metrics` and `GET /v1/tenants/{t}/usage`. The gateway does not
/// know the scheduler: the composition root hands the node the scheduler's once it runs.
pub trait Scheduling: Send + Sync {
    /// Async invocations running on this node now.
    fn in_flight(&self) -> u64;
    /// What its last round saw and decided, with `tenant`'s part of it.
    fn report(&self, tenant: Option<&str>) -> SchedulingReport;
}

/// What the scheduler's last round saw and decided, as the API shows it.
#[derive(Debug, Clone, Default)]
pub struct SchedulingReport {
    /// Guests' share of the node's cores (a recent average), and its target.
    pub utilization: f64,
    pub utilization_target: f64,
    /// Why each class of the tenant's runnable work waited: class → reason.
    pub waiting: BTreeMap<String, String>,
    /// The tenant's functions held because a downstream is saturated.
    pub downstream_held: Vec<String>,
}

/// What following a change did to a function on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    Unchanged,
    Installed,
    Uninstalled,
}

fn principal(k: &KeyRecord) -> Principal {
    Principal { key_id: k.id.clone(), tenant: k.tenant.clone(), scopes: k.scopes.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{FunctionAdmission, Rate};
    use governor::clock::FakeRelativeClock;
    use sluice_core::ErrorKind;

    fn key(id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            tenant: None,
            scopes: vec![Scope::Admin],
            hash: format!("hash-{id}"),
            created_at: 0,
            revoked: false,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_key_reload_never_brings_a_revoked_key_back() {
        let cache = Arc::new(KeyCache::default());
        cache.reload(|| async { Ok::<_, ()>(vec![key("a"), key("b")]) }).await.unwrap();
        // Reload A read the store before key b was revoked and is slow to finish; reload B reads
        // after the revoke. On this single-threaded runtime each `yield_now` lets every ready
        // task run until it waits, so the interleaving is fixed, not timed.
        let (release_a, gate_a) = tokio::sync::oneshot::channel::<()>();
        let a = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .reload(|| async {
                        gate_a.await.unwrap();
                        Ok::<_, ()>(vec![key("a"), key("b")])
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        let b = tokio::spawn({
            let cache = cache.clone();
            async move { cache.reload(|| async { Ok::<_, ()>(vec![key("a")]) }).await }
        });
        tokio::task::yield_now().await;
        release_a.send(()).unwrap();
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        assert!(cache.get("hash-a").is_some());
        assert!(cache.get("hash-b").is_none(), "the revoked key is back");
    }

    struct Fake {
        version: i64,
        admission: FunctionAdmission<FakeRelativeClock>,
    }

    impl Registered for Fake {
        fn tenant_and_function(&self) -> (&str, &str) {
            ("t", "f")
        }

        fn version(&self) -> i64 {
            self.version
        }

        fn take_over(&mut self, previous: &Self) {
            self.admission.inherit(&previous.admission);
        }
    }

    fn fake(
        version: i64,
        rate: Option<Rate>,
        max_concurrency: Option<u32>,
        clock: &FakeRelativeClock,
    ) -> Fake {
        Fake { version, admission: FunctionAdmission::new(rate, max_concurrency, clock.clone()) }
    }

    #[test]
    fn an_older_version_finishing_last_is_not_installed() {
        let clock = FakeRelativeClock::default();
        let mut registry = Registry::default();
        assert!(install_newer(&mut registry, fake(2, None, None, &clock)));
        assert!(!install_newer(&mut registry, fake(1, None, None, &clock)));
        assert!(!install_newer(&mut registry, fake(2, None, None, &clock)));
        assert_eq!(registry["t"]["f"].version, 2);
        assert!(install_newer(&mut registry, fake(3, None, None, &clock)));
        assert_eq!(registry["t"]["f"].version, 3);
    }

    #[test]
    fn a_new_version_inherits_the_functions_admission_state() {
        let clock = FakeRelativeClock::default();
        let rate = Some(Rate { per_sec: 1.0, burst: 1 });
        let mut registry = Registry::default();
        install_newer(&mut registry, fake(1, rate, Some(1), &clock));
        let v1 = registry["t"]["f"].clone();
        v1.admission.check_rate("f").unwrap();
        let _running_on_v1 = v1.admission.acquire("f").unwrap();

        install_newer(&mut registry, fake(2, rate, Some(1), &clock));
        let v2 = &registry["t"]["f"];
        assert_eq!(v2.admission.check_rate("f").unwrap_err().kind, ErrorKind::RateLimited);
        assert_eq!(v2.admission.acquire("f").unwrap_err().kind, ErrorKind::ConcurrencyLimited);

        // A new rate is a new bucket; the calls in flight still count.
        let faster = Some(Rate { per_sec: 10.0, burst: 10 });
        install_newer(&mut registry, fake(3, faster, Some(1), &clock));
        let v3 = &registry["t"]["f"];
        v3.admission.check_rate("f").unwrap();
        assert_eq!(v3.admission.acquire("f").unwrap_err().kind, ErrorKind::ConcurrencyLimited);
    }
}
