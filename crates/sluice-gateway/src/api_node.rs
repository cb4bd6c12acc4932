//! `/v1/node` and `/v1/tenants/{tenant}/usage`: what this node holds and does, and what a tenant
//! keeps on it.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use sluice_core::{Clock, Scope};
use sluice_runtime::{ArtifactUsage, CodeStats, LaneStats};
use utoipa::ToSchema;

use crate::api_common::{ApiResult, Auth, ErrorBody, admin_only};
use crate::node::Node;

/// The node's loaded components: a bounded, least-recently-used cache over the artifacts on disk.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CodeCacheInfo {
    /// Components loaded now.
    pub entries: u64,
    /// Artifact bytes of the components loaded now.
    pub bytes: u64,
    pub entries_max: u64,
    pub bytes_max: u64,
    /// Calls (and deploys) that found their component loaded.
    pub hits: u64,
    /// Calls that had to load or compile it first (concurrent ones share one load).
    pub misses: u64,
    /// Components dropped to stay within the bounds.
    pub evictions: u64,
    /// Loads from an artifact on disk.
    pub loads: u64,
    /// Total and longest time of those loads, in microseconds.
    pub load_us_total: u64,
    pub load_us_max: u64,
    /// Components compiled since start (deploys, and artifacts this node lacked).
    pub compiles: u64,
    pub compile_ms_total: u64,
    /// Compiles refused (not a usable component) or failed.
    pub compile_failures: u64,
}

impl From<CodeStats> for CodeCacheInfo {
    fn from(s: CodeStats) -> Self {
        Self {
            entries: s.entries,
            bytes: s.bytes,
            entries_max: s.entries_max,
            bytes_max: s.bytes_max,
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
            loads: s.loads,
            load_us_total: s.load_us_total,
            load_us_max: s.load_us_max,
            compiles: s.compiles,
            compile_ms_total: s.compile_ms_total,
            compile_failures: s.compile_failures,
        }
    }
}

/// Files on this node's disk.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct DiskInfo {
    pub files: u64,
    pub bytes: u64,
}

impl From<ArtifactUsage> for DiskInfo {
    fn from(u: ArtifactUsage) -> Self {
        Self { files: u.files, bytes: u.bytes }
    }
}

/// The CPU lanes.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct LanesInfo {
    /// Calls moved to the slow lane since start.
    pub demoted_total: u64,
    /// Calls waiting for a slow-lane slot now.
    pub slow_waiting: u64,
    /// Calls holding a slow-lane slot now.
    pub slow_running: u64,
    /// How the slow lane's threads were lowered: `idle` (SCHED_IDLE), `nice` or `none`.
    pub slow_priority: String,
}

impl From<LaneStats> for LanesInfo {
    fn from(s: LaneStats) -> Self {
        Self {
            demoted_total: s.demoted_total,
            slow_waiting: s.slow_waiting as u64,
            slow_running: s.slow_running as u64,
            slow_priority: s.slow_priority.to_string(),
        }
    }
}

/// Warm instances kept for functions deployed with `--reuse`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct WarmInfo {
    /// Idle instances now, over how many function versions, and their linear memory in bytes.
    pub idle: u64,
    pub functions: u64,
    pub idle_bytes: u64,
    /// The bounds: idle instances on the node, per function version, and their memory.
    pub idle_max: u64,
    pub per_function_max: u64,
    pub memory_max: u64,
    /// Calls of functions with reuse that got a warm instance, and a fresh one.
    pub reused_total: u64,
    pub fresh_total: u64,
    /// Instances dropped because a bound was reached, and because they waited past their idle
    /// time.
    pub dropped_full_total: u64,
    pub expired_total: u64,
    /// Calls of functions with reuse that have ended: `reused_total + fresh_total` when none
    /// is running.
    pub ended_total: u64,
}

/// Heavy components (8 MiB or more of initial memory): their own engine and pool, whose slots
/// keep the copied memory image resident.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct HeavyInfo {
    /// Heavy instances alive now (running or warm), and at most (`serve --heavy-slots-max`).
    pub slots_in_use: u64,
    pub slots_max: u64,
    /// Memory each slot may keep resident after its instance ends: with `slots_max`, the most
    /// that heavy components keep resident on this node between calls.
    pub memory_keep_resident_bytes: u64,
    /// Initial memory of one version's instances alive at once (`serve --heavy-memory-max`).
    pub memory_max: u64,
}

/// What this node holds and does.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    /// sluice's version.
    pub version: String,
    /// The engine's code generation settings, part of every artifact's name.
    pub engine: String,
    /// Functions installed (their latest versions), loaded or not.
    pub functions: u64,
    pub code_cache: CodeCacheInfo,
    /// Compiled artifacts on this node's disk, every tenant's.
    pub artifacts: DiskInfo,
    pub lanes: LanesInfo,
    pub warm: WarmInfo,
    pub heavy: HeavyInfo,
}

/// This node (admin only): its code cache, artifacts on disk and CPU lanes.
#[utoipa::path(
    get,
    path = "/v1/node",
    tag = "node",
    responses(
        (status = 200, description = "The node", body = NodeInfo),
        (status = 403, description = "Not an admin key", body = ErrorBody),
    )
)]
pub(crate) async fn node_info(State(node): State<Arc<Node>>, auth: Auth) -> ApiResult<Json<NodeInfo>> {
    if !auth.0.is_admin() {
        return Err(admin_only("read the node's state").into());
    }
    let artifacts = node.runtime.artifact_usage(None).await?;
    Ok(Json(NodeInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        engine: node.runtime.engine_fingerprint().to_string(),
        functions: node.function_count() as u64,
        code_cache: node.runtime.code_stats().await.into(),
        artifacts: artifacts.into(),
        lanes: node.runtime.lane_stats().into(),
        warm: {
            let (w, bounds) = (node.runtime.warm_stats(), node.runtime.config().warm);
            WarmInfo {
                idle: w.idle,
                functions: w.functions,
                idle_bytes: w.idle_bytes,
                idle_max: bounds.total_max as u64,
                per_function_max: bounds.per_function_max as u64,
                memory_max: bounds.memory_max,
                reused_total: w.reused_total,
                fresh_total: w.fresh_total,
                dropped_full_total: w.dropped_full_total,
                expired_total: w.expired_total,
                ended_total: w.ended_total,
            }
        },
        heavy: {
            let (in_use, max) = node.runtime.heavy_slots();
            let config = node.runtime.config();
            HeavyInfo {
                slots_in_use: in_use.into(),
                slots_max: max.into(),
                memory_keep_resident_bytes: config.heavy_memory_keep_resident_bytes as u64,
                memory_max: config.heavy_memory_max,
            }
        },
    }))
}

/// What a tenant keeps: in the store (shared by every node) and on this node's disk.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TenantUsage {
    pub tenant: String,
    pub functions: u64,
    pub versions: u64,
    /// Uploaded components, each stored once per tenant.
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Compiled artifacts of the tenant's components on this node.
    pub artifacts: DiskInfo,
    /// Its async work and how the scheduler treats it.
    #[serde(rename = "async")]
    pub async_work: AsyncUsage,
    /// What it uses of each of its usage quotas, and the quota in force.
    pub quotas: UsageQuotas,
}

/// Use of one quota against the quota in force.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct QuotaUse {
    pub used: u64,
    pub max: u64,
}

/// A tenant's usage quotas (`PUT /v1/tenants/{t}/limits`, else the node's defaults).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct UsageQuotas {
    /// Unfinished async invocations (queued, running, waiting for a retry), as this node counts
    /// them for its refusals: the store's count, re-read every `serve --quota-refresh` (5 s), plus this node's own
    /// enqueues and completions since.
    pub queued: QuotaUse,
    /// Bytes of their requests (body plus header names and values), counted the same way.
    pub queued_bytes: QuotaUse,
    /// Bytes of uploaded components.
    pub components_bytes: QuotaUse,
    pub functions: QuotaUse,
    pub versions: QuotaUse,
    pub schedules: QuotaUse,
}

/// A tenant's async work now (DESIGN.md section 4): its quota, what runs, what waits and why.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct AsyncUsage {
    /// Reserved concurrency: calls that start whatever the load.
    pub reserved: u32,
    /// Weight in the fair share of capacity beyond reservations.
    pub weight: u32,
    /// Invocations running now, on every node.
    pub running: u64,
    /// Of those, how many run beyond the reservation (opportunistic: on capacity lent by idle
    /// reservations and unused headroom).
    pub borrowed: u64,
    /// Runnable invocations waiting to start.
    pub queued: u64,
    /// Of those, with a start window (a deadline): they may be held for a trough.
    pub queued_windowed: u64,
    /// Not runnable yet (a future `sluice-start-after`, or waiting for a retry).
    pub later: u64,
    /// Why each class of its runnable work waited in this node's last scheduling round:
    /// class (`due`, `plain`, `deferrable`) → reason (`quota`, `utilization`, `downstream`,
    /// `start_window`). Empty when nothing was held.
    pub waiting: std::collections::BTreeMap<String, String>,
    /// Functions whose calls are held because a downstream is saturated.
    pub downstream_held: Vec<String>,
    /// This node's scheduler: guests' share of its cores (recent average) and its target.
    pub node_utilization: f64,
    pub node_utilization_target: f64,
}

/// A tenant's usage: functions, versions, stored components and compiled artifacts, its async
/// work, and its use of each usage quota.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/usage",
    tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 200, description = "The tenant's usage", body = TenantUsage),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn tenant_usage(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
) -> ApiResult<Json<TenantUsage>> {
    auth.require(&tenant, Scope::Read)?;
    let storage = node.store.tenant_storage(&tenant).await?;
    let artifacts = node.runtime.artifact_usage(Some(&tenant)).await?;
    let now = sluice_core::SystemClock.now_ms();
    let queue = node.store.tenant_queue(&tenant, now).await?;
    let quota = node
        .store
        .tenant_quotas()
        .await?
        .into_iter()
        .find(|(t, _)| *t == tenant)
        .map(|(_, q)| q)
        .unwrap_or_default();
    let scheduling = node.scheduling.read().expect("scheduling lock").clone();
    let view = scheduling.map(|s| s.report(Some(&tenant))).unwrap_or_default();
    let limits = node.quotas.limits(&tenant);
    let (queued, queued_bytes) = node.quotas.queued(&tenant);
    let quotas = UsageQuotas {
        queued: QuotaUse { used: queued, max: limits.queued_max },
        queued_bytes: QuotaUse { used: queued_bytes, max: limits.queued_bytes_max },
        components_bytes: QuotaUse { used: storage.blob_bytes, max: limits.components_bytes_max },
        functions: QuotaUse { used: storage.functions, max: limits.functions_max },
        versions: QuotaUse { used: storage.versions, max: limits.versions_max },
        schedules: QuotaUse { used: node.store.count_schedules(&tenant).await?, max: limits.schedules_max },
    };
    Ok(Json(TenantUsage {
        quotas,
        tenant,
        functions: storage.functions,
        versions: storage.versions,
        blobs: storage.blobs,
        blob_bytes: storage.blob_bytes,
        artifacts: artifacts.into(),
        async_work: AsyncUsage {
            reserved: quota.reserved,
            weight: quota.weight,
            running: queue.running,
            borrowed: queue.running.saturating_sub(u64::from(quota.reserved)),
            queued: queue.runnable,
            queued_windowed: queue.runnable_windowed,
            later: queue.later,
            waiting: view.waiting,
            downstream_held: view.downstream_held,
            node_utilization: (view.utilization * 1000.0).round() / 1000.0,
            node_utilization_target: view.utilization_target,
        },
    }))
}

/// How often a node records its heartbeat in the store.
pub const NODE_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);
/// A node whose last heartbeat is older than this is `down`: it died or cannot reach the store.
/// Its async invocations are taken over by the others when their leases lapse.
pub const NODE_DOWN_AFTER: std::time::Duration = std::time::Duration::from_secs(10);
/// Nodes that have not heartbeated for this long are no longer listed.
pub const NODES_LISTED_WITHIN: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// One node of the cluster, as its heartbeats describe it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ClusterNode {
    pub id: String,
    /// Where its API answers.
    pub address: String,
    /// The sluice version it runs.
    pub version: String,
    /// `up`, `down` (no heartbeat for 10 s) or `stopped` (shut down cleanly).
    pub health: String,
    /// Whether this is the node that answered.
    pub this: bool,
    pub started_at: i64,
    pub heartbeat_at: i64,
    /// Milliseconds since its last heartbeat, by the store's clock.
    pub heartbeat_age_ms: i64,
    /// Async invocations it may run at once, and runs now.
    pub slots: u32,
    pub in_flight: u32,
    /// How long the invocations it last leased had waited past their start time.
    pub queue_lag_ms: u64,
}

/// The cluster's nodes.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ClusterNodes {
    pub nodes: Vec<ClusterNode>,
}

/// Every node that heartbeated in the last day (admin only), with its health.
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "node",
    responses(
        (status = 200, description = "The nodes", body = ClusterNodes),
        (status = 403, description = "Not an admin key", body = ErrorBody),
    )
)]
pub(crate) async fn list_nodes(State(node): State<Arc<Node>>, auth: Auth) -> ApiResult<Json<ClusterNodes>> {
    if !auth.0.is_admin() {
        return Err(admin_only("list the cluster's nodes").into());
    }
    let (records, now) = node.store.list_nodes(NODES_LISTED_WITHIN.as_millis() as u64).await?;
    let down_after = NODE_DOWN_AFTER.as_millis() as i64;
    let nodes = records
        .into_iter()
        .map(|r| {
            let age = now.saturating_sub(r.heartbeat_at).max(0);
            let health = if r.stopped_at.is_some() {
                "stopped"
            } else if age > down_after {
                "down"
            } else {
                "up"
            };
            ClusterNode {
                this: r.id == node.id,
                id: r.id,
                address: r.address,
                version: r.version,
                health: health.to_string(),
                started_at: r.started_at,
                heartbeat_at: r.heartbeat_at,
                heartbeat_age_ms: age,
                slots: r.slots,
                in_flight: r.in_flight,
                queue_lag_ms: r.queue_lag_ms,
            }
        })
        .collect();
    Ok(Json(ClusterNodes { nodes }))
}

/// The adaptive concurrency limit of one downstream host of a function, on this node.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct DownstreamInfo {
    /// `host:port`, as the function's requests named it.
    pub host: String,
    /// Requests this node lets the function have in flight to it at once (AIMD: halved on 429,
    /// 503, 504, connect errors and timeouts; grown while requests succeed).
    pub limit: u32,
    pub in_flight: u32,
    /// Requests of the function waiting for room under the limit.
    pub waiting: u64,
    /// `slow_start` (growing by one per success) or `avoidance` (by one per round trip).
    pub phase: String,
    pub successes_total: u64,
    pub overloads_total: u64,
    pub others_total: u64,
    /// Moving average and minimum of the latency to the response head, in milliseconds.
    pub latency_ewma_ms: Option<f64>,
    pub latency_min_ms: Option<f64>,
    pub last_decrease_ago_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct DownstreamList {
    /// Whether new calls of the function are held now (async: left in the queue; sync: 503).
    pub saturated: bool,
    pub downstreams: Vec<DownstreamInfo>,
}

/// A function's downstream hosts and their adaptive concurrency limits on this node.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/functions/{function}/downstreams",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name"),
        ("function" = String, Path, description = "Function name"),
    ),
    responses(
        (status = 200, description = "Its downstreams", body = DownstreamList),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such function (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn function_downstreams(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
) -> ApiResult<Json<DownstreamList>> {
    auth.require(&tenant, Scope::Read)?;
    if node.function(&tenant, &function).is_none() {
        return Err(sluice_core::SluiceError::not_found(format!("no function {tenant}/{function}")).into());
    }
    let downstreams = node.runtime.downstreams();
    Ok(Json(DownstreamList {
        saturated: downstreams.saturated(&tenant, &function),
        downstreams: downstreams
            .snapshot(&tenant, &function)
            .into_iter()
            .map(|d| DownstreamInfo {
                host: d.host,
                limit: d.limit,
                in_flight: d.in_flight,
                waiting: d.waiting as u64,
                phase: d.phase.as_str().to_string(),
                successes_total: d.successes_total,
                overloads_total: d.overloads_total,
                others_total: d.others_total,
                latency_ewma_ms: d.latency_ewma_ms,
                latency_min_ms: d.latency_min_ms,
                last_decrease_ago_ms: d.last_decrease_ago_ms,
            })
            .collect(),
    }))
}
