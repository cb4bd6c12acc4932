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
    /// A schedule's occurrence is missed (its catch-up policy applies) once it is this late.
    pub schedule_missed_after: Duration,
    /// How far ahead of an occurrence a schedule may fire it, runnable at the occurrence (zero:
    /// only when due).
    pub schedule_fire_ahead: Duration,
    /// The brokers triggers may connect to (`host:port`, or `host` for any port); `None`: any.
    pub trigger_brokers: Option<Vec<String>>,
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
            schedule_missed_after: Duration::from_millis(sluice_core::schedule::MISSED_AFTER_MS as u64),
            schedule_fire_ahead: Duration::from_millis(sluice_core::schedule::FIRE_AHEAD_MS as u64),
            trigger_brokers: None,
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
    /// This version's own calls and errors: `/metrics` by version, and what a rollout judges it
    /// by ([`crate::rollout`]).
    pub outcomes: Arc<sluice_runtime::metrics::VersionOutcomes>,
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
            outcomes: Default::default(),
            reuse,
            instance_key,
        }
    }
}

/// Functions by tenant, then name: what this node serves of each.
type Registry<T> = HashMap<String, HashMap<String, Arc<Served<T>>>>;

/// One function as this node serves it: the versions its aliases name (and versions called by
/// number since, loaded on their first call) and its aliases. Replaced whole on a change, so a
/// call sees one consistent state through an `Arc` without holding a lock.
pub struct Served<T = Deployed> {
    /// The newest version number: `@N` above it is refused without a store read.
    pub newest_version: i64,
    pub versions: HashMap<i64, Arc<T>>,
    pub aliases: HashMap<String, Arc<Alias<T>>>,
}

impl<T> Served<T> {
    /// The version alias `name` picks for this call; see [`Alias::choose`].
    pub fn alias(&self, name: &str) -> Option<&Arc<Alias<T>>> {
        self.aliases.get(name)
    }

    /// The version `latest` names (its heaviest when it is split): what the function's
    /// function-wide settings are read from.
    pub fn latest(&self) -> Option<&Arc<T>> {
        self.aliases.get(sluice_core::alias::LATEST).map(|a| a.heaviest())
    }
}

/// An alias as calls see it: its versions with their cumulative weights.
pub struct Alias<T = Deployed> {
    pub name: Arc<str>,
    /// `(version, cumulative weight)`, in the order the weights were added up.
    choices: Vec<(Arc<T>, u32)>,
    total: u32,
}

impl<T> Alias<T> {
    fn new(name: &str, routes: &[(Arc<T>, u32)]) -> Option<Self> {
        let mut total: u32 = 0;
        let mut choices = Vec::with_capacity(routes.len());
        for (version, weight) in routes {
            total = total.checked_add(*weight)?;
            choices.push((version.clone(), total));
        }
        (total > 0).then(|| Self { name: Arc::from(name), choices, total })
    }

    /// The version this call runs: the only one, or for a split alias the one whose share holds
    /// a point on `[0, total)`: the routing key's stable hash when the caller sent one (so one
    /// user stays on one version, on every node), else a random draw. A few compares on a
    /// vector of at most [`sluice_core::alias::ROUTES_MAX`]; no lock, no store read.
    pub fn choose(&self, routing_key: Option<&[u8]>) -> &Arc<T> {
        if let [(only, _)] = self.choices.as_slice() {
            return only;
        }
        let draw = match routing_key {
            Some(key) => sluice_core::alias::stable_hash(key),
            None => fast_random(),
        };
        self.pick(draw)
    }

    fn pick(&self, draw: u64) -> &Arc<T> {
        let point = (draw % u64::from(self.total)) as u32;
        let i = self.choices.iter().position(|(_, upto)| point < *upto).unwrap_or(self.choices.len() - 1);
        &self.choices[i].0
    }

    /// The version with the largest share (the first of equals).
    pub fn heaviest(&self) -> &Arc<T> {
        let mut best = 0;
        let mut best_weight = 0;
        let mut below = 0;
        for (i, (_, upto)) in self.choices.iter().enumerate() {
            if upto - below > best_weight {
                (best, best_weight) = (i, upto - below);
            }
            below = *upto;
        }
        &self.choices[best].0
    }

    /// Every version it names, with its weight.
    pub fn routes(&self) -> impl Iterator<Item = (&Arc<T>, u32)> {
        let mut below = 0;
        self.choices.iter().map(move |(v, upto)| {
            let weight = upto - below;
            below = *upto;
            (v, weight)
        })
    }
}

/// A per-thread xorshift64* generator, seeded once per thread from the OS: a split alias's draw
/// costs a few instructions instead of a system call per call. Not for secrets.
fn fast_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut seed = [0u8; 8];
            // Without OS randomness the draws are still spread, only predictable.
            let _ = getrandom::fill(&mut seed);
            u64::from_le_bytes(seed) | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// One version of one function, as the registry sees it.
trait Registered {
    fn version(&self) -> i64;
    fn created_at(&self) -> sluice_core::UnixMs;
    /// Takes over what belongs to the function rather than to one version from another version
    /// of the function.
    fn take_over(&mut self, previous: &Self);
}

impl Registered for Deployed {
    fn version(&self) -> i64 {
        self.record.version
    }

    fn created_at(&self) -> sluice_core::UnixMs {
        self.record.created_at
    }

    fn take_over(&mut self, previous: &Self) {
        self.admission.inherit(&previous.admission);
    }
}

/// The function's new state from the store's routing: versions this node already serves are kept
/// as they are (with their admission state and warm instances); a new one takes over the
/// function's state from any version served before. `None` when an alias names a version the
/// routing lacks (a bug of the store's read) or has no weight.
fn build_served<T: Registered>(
    previous: Option<&Served<T>>,
    newest_version: i64,
    versions: Vec<T>,
    aliases: &[sluice_store::AliasRecord],
) -> Option<Served<T>> {
    let mut by_number: HashMap<i64, Arc<T>> = HashMap::with_capacity(versions.len());
    let donor = previous.and_then(|p| p.latest().or_else(|| p.versions.values().next()));
    for mut new in versions {
        let kept = previous
            .and_then(|p| p.versions.get(&new.version()))
            .filter(|old| old.created_at() == new.created_at());
        let version = match kept {
            Some(old) => old.clone(),
            None => {
                if let Some(donor) = donor {
                    new.take_over(donor);
                }
                Arc::new(new)
            }
        };
        by_number.insert(version.version(), version);
    }
    let mut by_name = HashMap::with_capacity(aliases.len());
    for alias in aliases {
        let routes: Vec<(Arc<T>, u32)> = alias
            .routes
            .iter()
            .map(|r| Some((by_number.get(&r.version)?.clone(), r.weight)))
            .collect::<Option<_>>()?;
        by_name.insert(alias.name.clone(), Arc::new(Alias::new(&alias.name, &routes)?));
    }
    Some(Served { newest_version, versions: by_number, aliases: by_name })
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
    /// Held from a function refresh's store read to its install, for the reason
    /// [`KeyCache::reload`] gives: a slow refresh must not put back an older alias state.
    refresh: tokio::sync::Mutex<()>,
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
            refresh: tokio::sync::Mutex::default(),
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
        for routing in node.store.all_routing().await.map_err(store_error)? {
            node.install_routing(routing);
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

    /// The version `latest` of `tenant/function` names on this node (its heaviest version when
    /// it is split): where function-wide settings and series are read.
    pub fn function(&self, tenant: &str, function: &str) -> Option<Arc<Deployed>> {
        self.served(tenant, function)?.latest().cloned()
    }

    /// What this node serves of `tenant/function`: one map lookup and an `Arc` clone, the only
    /// registry work of a call.
    pub fn served(&self, tenant: &str, function: &str) -> Option<Arc<Served>> {
        let map = self.functions.read().expect("function map lock");
        map.get(tenant)?.get(function).cloned()
    }

    /// Version `number` of `tenant/function`: the served one, else (a version no alias names,
    /// called as `@N` or pinned) read from the store once and kept until the function next
    /// changes. `None` for a version that does not exist (above the newest: no store read).
    pub async fn version(
        &self,
        served: &Served,
        tenant: &str,
        function: &str,
        number: i64,
    ) -> Result<Option<Arc<Deployed>>, SluiceError> {
        if let Some(found) = served.versions.get(&number) {
            return Ok(Some(found.clone()));
        }
        if number < 1 || number > served.newest_version {
            return Ok(None);
        }
        let Some(record) = self.store.get_version(tenant, function, number).await.map_err(store_error)?
        else {
            return Ok(None);
        };
        let mut deployed = Deployed::new(record);
        if let Some(donor) = served.latest() {
            deployed.take_over(donor);
        }
        let deployed = Arc::new(deployed);
        let mut map = self.functions.write().expect("function map lock");
        if let Some(current) = map.get_mut(tenant).and_then(|fns| fns.get_mut(function)) {
            // Added to what is served now (which may have changed meanwhile), unless another call
            // added it first; a copy, since calls in flight hold the current one.
            if let Some(there) = current.versions.get(&number) {
                return Ok(Some(there.clone()));
            }
            let mut versions = current.versions.clone();
            versions.insert(number, deployed.clone());
            let aliases = current.aliases.clone();
            *current = Arc::new(Served { newest_version: current.newest_version, versions, aliases });
        }
        Ok(Some(deployed))
    }

    /// Serves `routing` (metadata only: code is loaded on a call), unless an alias in it names
    /// a version it lacks. Returns whether anything changed.
    fn install_routing(&self, routing: sluice_store::FunctionRouting) -> bool {
        let sluice_store::FunctionRouting { tenant, function, newest_version, aliases, versions } = routing;
        let mut map = self.functions.write().expect("function map lock");
        let functions = map.entry(tenant.clone()).or_default();
        let previous = functions.get(&function).cloned();
        let versions = versions.into_iter().map(Deployed::new).collect();
        let Some(served) = build_served(previous.as_deref(), newest_version, versions, &aliases) else {
            tracing::warn!(%tenant, %function, "an alias names a version the store did not return; not installed");
            return false;
        };
        if previous.as_deref().is_some_and(|p| same_routing(p, &served)) {
            return false;
        }
        functions.insert(function, Arc::new(served));
        true
    }

    pub fn uninstall(&self, tenant: &str, function: &str) -> bool {
        let mut map = self.functions.write().expect("function map lock");
        map.get_mut(tenant).is_some_and(|fns| fns.remove(function).is_some())
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

    /// Every installed version of every function.
    pub fn deployed(&self) -> Vec<Arc<Deployed>> {
        let map = self.functions.read().expect("function map lock");
        map.values().flat_map(|fns| fns.values().flat_map(|f| f.versions.values().cloned())).collect()
    }

    /// How many functions this node serves.
    /// Every function this node serves, in no order (a copy of the registry's `Arc`s: the
    /// lock is held only while they are cloned).
    pub fn all_served(&self) -> Vec<Arc<Served>> {
        let map = self.functions.read().expect("function map lock");
        map.values().flat_map(HashMap::values).cloned().collect()
    }

    pub fn function_count(&self) -> usize {
        self.functions.read().expect("function map lock").values().map(HashMap::len).sum()
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

    /// Follows a change to `tenant/function` (a deploy, an alias move or a delete, made here or
    /// by another node): reads its aliases and the versions they name, makes sure this node has
    /// each version's artifact (already on disk, or the store's blob compiled once), then serves
    /// them; or uninstalls a deleted function. When a version's code cannot be prepared here,
    /// nothing changes: the state before keeps serving. Returns what it did.
    pub async fn refresh_function(&self, tenant: &str, function: &str) -> Result<Refreshed, SluiceError> {
        // Serial from the read to the install (see `refresh`): the last install is of the newest
        // read. Compiles of a follower run under it, one function at a time.
        let _serial = self.refresh.lock().await;
        let routing = self.store.function_routing(tenant, function).await.map_err(store_error)?;
        self.follow(tenant, function, routing).await
    }

    async fn follow(
        &self,
        tenant: &str,
        function: &str,
        routing: Option<sluice_store::FunctionRouting>,
    ) -> Result<Refreshed, SluiceError> {
        let Some(routing) = routing else {
            return Ok(if self.uninstall(tenant, function) {
                Refreshed::Uninstalled
            } else {
                Refreshed::Unchanged
            });
        };
        let installed = self.served(tenant, function);
        for record in &routing.versions {
            let known = installed
                .as_ref()
                .and_then(|s| s.versions.get(&record.version))
                .is_some_and(|d| d.record.created_at == record.created_at);
            if !known {
                // Not loaded into the code cache: like every version, it is loaded on its first
                // call here, if one comes.
                let key = CodeKey::new(&record.tenant, &record.blob_digest);
                self.runtime.ensure_artifact(&key, self.blob_source(&key)).await?;
            }
        }
        Ok(if self.install_routing(routing) { Refreshed::Installed } else { Refreshed::Unchanged })
    }

    /// Follows every function another node may have changed: the backstop for notifications that
    /// were lost. Returns how many functions changed here.
    pub async fn refresh_functions(&self) -> Result<usize, SluiceError> {
        let _serial = self.refresh.lock().await;
        let all = self.store.all_routing().await.map_err(store_error)?;
        let mut listed: std::collections::HashSet<(String, String)> = Default::default();
        let mut changed = 0;
        for routing in all {
            let (tenant, function) = (routing.tenant.clone(), routing.function.clone());
            match self.follow(&tenant, &function, Some(routing)).await {
                Ok(Refreshed::Unchanged) => {}
                Ok(_) => changed += 1,
                Err(e) => {
                    tracing::warn!(%tenant, %function, error = %e, "a new version's code is not ready here; the previous state keeps serving")
                }
            }
            listed.insert((tenant, function));
        }
        // Served here but not listed: deleted, or deployed after the list was read. Asked again.
        let served: Vec<(String, String)> = {
            let map = self.functions.read().expect("function map lock");
            map.iter().flat_map(|(t, fns)| fns.keys().map(move |f| (t.clone(), f.clone()))).collect()
        };
        for (tenant, function) in served {
            if !listed.contains(&(tenant.clone(), function.clone())) {
                let routing = self.store.function_routing(&tenant, &function).await.map_err(store_error)?;
                if self.follow(&tenant, &function, routing).await? != Refreshed::Unchanged {
                    changed += 1;
                }
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

/// Whether two states of a function serve the same versions under the same aliases: a refresh
/// that changes nothing keeps the state calls already hold.
fn same_routing<T: Registered>(a: &Served<T>, b: &Served<T>) -> bool {
    let alias_key =
        |x: &Alias<T>| x.routes().map(|(v, w)| (v.version(), v.created_at(), w)).collect::<Vec<_>>();
    a.newest_version == b.newest_version
        && a.aliases.len() == b.aliases.len()
        && a.aliases.iter().all(|(name, x)| b.aliases.get(name).is_some_and(|y| alias_key(x) == alias_key(y)))
}

fn principal(k: &KeyRecord) -> Principal {
    Principal {
        key_id: k.id.clone(),
        tenant: k.tenant.clone(),
        scopes: k.scopes.clone(),
        alias: k.alias.clone(),
    }
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
            alias: None,
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
        fn version(&self) -> i64 {
            self.version
        }

        fn created_at(&self) -> sluice_core::UnixMs {
            self.version * 1000
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

    fn alias(name: &str, routes: &[(i64, u32)]) -> sluice_store::AliasRecord {
        sluice_store::AliasRecord {
            tenant: "t".into(),
            function: "f".into(),
            name: name.into(),
            routes: routes.iter().map(|&(version, weight)| Route { version, weight }).collect(),
            updated_at: 0,
        }
    }

    use sluice_core::alias::Route;

    /// The function served with `latest` at the newest of `versions`.
    fn served(previous: Option<&Served<Fake>>, versions: Vec<Fake>) -> Served<Fake> {
        let newest = versions.iter().map(|v| v.version).max().unwrap();
        build_served(previous, newest, versions, &[alias("latest", &[(newest, 1)])]).unwrap()
    }

    #[test]
    fn a_new_version_inherits_the_functions_admission_state() {
        let clock = FakeRelativeClock::default();
        let rate = Some(Rate { per_sec: 1.0, burst: 1 });
        let v1 = served(None, vec![fake(1, rate, Some(1), &clock)]);
        let latest = v1.latest().unwrap().clone();
        latest.admission.check_rate("f").unwrap();
        let _running_on_v1 = latest.admission.acquire("f").unwrap();

        let v2 = served(Some(&v1), vec![fake(2, rate, Some(1), &clock)]);
        let latest = v2.latest().unwrap();
        assert_eq!(latest.version, 2);
        assert_eq!(latest.admission.check_rate("f").unwrap_err().kind, ErrorKind::RateLimited);
        assert_eq!(latest.admission.acquire("f").unwrap_err().kind, ErrorKind::ConcurrencyLimited);

        // A new rate is a new bucket; the calls in flight still count.
        let faster = Some(Rate { per_sec: 10.0, burst: 10 });
        let v3 = served(Some(&v2), vec![fake(3, faster, Some(1), &clock)]);
        let latest = v3.latest().unwrap();
        latest.admission.check_rate("f").unwrap();
        assert_eq!(latest.admission.acquire("f").unwrap_err().kind, ErrorKind::ConcurrencyLimited);
    }

    #[test]
    fn a_version_still_served_keeps_its_state_across_an_alias_move() {
        let clock = FakeRelativeClock::default();
        let first = served(None, vec![fake(1, None, Some(1), &clock), fake(2, None, Some(1), &clock)]);
        let prod = [alias("latest", &[(2, 1)]), alias("prod", &[(1, 1)])];
        let versions = vec![fake(1, None, Some(1), &clock), fake(2, None, Some(1), &clock)];
        let moved = build_served(Some(&first), 2, versions, &prod).unwrap();
        // The same instance of each version (its warm pool and counters), not a new one.
        assert!(Arc::ptr_eq(&first.versions[&1], &moved.versions[&1]));
        assert_eq!(moved.alias("prod").unwrap().choose(None).version, 1);
        assert!(!same_routing(&first, &moved));
        let again = build_served(
            Some(&moved),
            2,
            vec![fake(1, None, None, &clock), fake(2, None, None, &clock)],
            &prod,
        );
        assert!(same_routing(&moved, &again.unwrap()));
        // An alias naming a version the routing lacks is not installed.
        assert!(build_served(None, 2, vec![fake(2, None, None, &clock)], &prod).is_none());
    }

    #[test]
    fn a_split_alias_picks_by_weight_and_a_routing_key_sticks() {
        let clock = FakeRelativeClock::default();
        let versions =
            vec![fake(3, None, None, &clock), fake(4, None, None, &clock), fake(5, None, None, &clock)];
        let split = [alias("latest", &[(5, 1)]), alias("prod", &[(3, 70), (4, 20), (5, 10)])];
        let f = build_served(None, 5, versions, &split).unwrap();
        let prod = f.alias("prod").unwrap();
        assert_eq!(prod.heaviest().version, 3);
        // Every point of [0, 100) maps to the version whose share holds it.
        let mut seen = [0u32; 3];
        for point in 0..100 {
            seen[(prod.pick(point).version - 3) as usize] += 1;
        }
        assert_eq!(seen, [70, 20, 10]);
        // Random draws land within the weights: 30,000 draws, each share within 5 standard
        // deviations (at most 0.013 here) of its weight.
        let mut drawn = [0u32; 3];
        for _ in 0..30_000 {
            drawn[(prod.choose(None).version - 3) as usize] += 1;
        }
        for (count, share) in drawn.iter().zip([0.7, 0.2, 0.1]) {
            assert!((f64::from(*count) / 30_000.0 - share).abs() < 0.013, "{drawn:?}");
        }
        // A routing key always picks the same version.
        for user in 0..100 {
            let key = format!("user-{user}");
            let first = prod.choose(Some(key.as_bytes())).version;
            assert!((0..10).all(|_| prod.choose(Some(key.as_bytes())).version == first));
        }
    }
}
