//! sluice-scheduler: runs async invocations. Every node runs one; together they drain the shared
//! queue (DESIGN.md sections 2 and 3).
//!
//! The loop leases runnable invocations in batches (the store orders them by criticality, then
//! deadline), runs each on the same runtime as synchronous calls, renews its leases by heartbeat,
//! and records each attempt's outcome through `Store::complete`, which changes the state in the
//! same transaction. A failed attempt is retried with backoff or becomes `dead`
//! ([`sluice_core::retry`]); an attempt whose lease was lost is fenced off by the store.
//!
//! It knows nothing of HTTP serving or tenants' keys; it finds functions through [`Functions`].
#![forbid(unsafe_code)]

pub mod plan;
pub mod waits;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sluice_core::retry::{Next, RetryPolicy};
use sluice_core::{Clock, ErrorKind, FunctionConfig, LogStream, Mode, UnixMs};
use sluice_runtime::metrics::{CallOutcome, Counting};
use sluice_runtime::{BodyError, Call, Lane, Prepared, Runtime, TraceParent};
use sluice_store::{
    AttemptResult, Completion, LeaseClass, Leased, QueueDemand, Quota, Store, StoredResponse,
};

use crate::plan::{Pacer, Service, TenantInput, WaitReason};
use crate::waits::HoldLog;
use tokio::sync::{Notify, watch};
use tokio::task::{AbortHandle, JoinSet};

/// A function version ready to run.
pub struct Ready {
    pub config: Arc<FunctionConfig>,
    pub prepared: Arc<Prepared>,
}

/// Where the scheduler finds the code of a version (the node's registry).
pub trait Functions: Send + Sync + 'static {
    fn get(
        &self,
        tenant: &str,
        function: &str,
        version: i64,
    ) -> futures::future::BoxFuture<'static, Result<Option<Ready>, sluice_core::SluiceError>>;

    /// Functions with a reserved concurrency of their own: `(tenant, function, reserved)`.
    fn reservations(&self) -> Vec<(String, String, u32)>;

    /// The functions of `tenant` whose calls should not start now (a downstream is saturated).
    fn saturated(&self, tenant: &str) -> Vec<String>;

    /// Where a call of version `version` of a function is counted for `/metrics` (and its
    /// version's rollout), if the function is installed here.
    fn metrics(&self, _tenant: &str, _function: &str, _version: i64) -> Option<Counting> {
        None
    }

    /// An invocation of `tenant` whose request held `request_bytes`
    /// (`StoredRequest::quota_bytes`) reached a final state here: it no longer counts against
    /// the tenant's queued quotas.
    fn finished(&self, _tenant: &str, _request_bytes: u64) {}
}

/// Bounds and periods of the scheduler; each a named setting.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// This node's identity in leases; must be unique per process.
    pub owner: String,
    /// How long a lease lasts without a heartbeat (DESIGN.md: 30 s).
    pub lease_ms: u64,
    /// How often held leases are renewed (DESIGN.md: 10 s).
    pub heartbeat: Duration,
    /// Invocations leased per store round trip at most.
    pub batch_max: u32,
    /// Async invocations running at once on this node.
    pub inflight_max: usize,
    /// Sleep between polls when the queue looked empty (an enqueue on this node wakes it sooner).
    pub poll_idle: Duration,
    /// After a lease that came back short, wait at least this long before the next one even when
    /// woken: under a stream of enqueues this turns one lease per enqueue into one per few
    /// milliseconds, and every lease is a write on the store's single writer.
    pub lease_linger: Duration,
    /// Largest response body stored for an invocation.
    pub response_body_bytes_max: usize,
    /// Time running invocations get to finish on shutdown before their leases are given back.
    pub shutdown_grace: Duration,
    /// Fraction of the node's cores guests may use before work beyond reservations waits.
    pub utilization_target: f64,
    /// A call whose deadline is this close is due: it starts whatever the load. Covers the
    /// expected run time of a call plus slack.
    pub promote_ahead: Duration,
    /// How often the queue's demand and the tenants' quotas are read at most (between reads a
    /// round plans with what it read last, less what it leased since).
    pub demand_refresh: Duration,
    /// Cores guests can use on this node (what utilization is a fraction of).
    pub cores: usize,
}

impl SchedulerConfig {
    pub fn new(owner: String) -> Self {
        Self {
            owner,
            lease_ms: 30_000,
            heartbeat: Duration::from_secs(10),
            batch_max: 128,
            inflight_max: 256,
            poll_idle: Duration::from_millis(200),
            lease_linger: Duration::from_millis(2),
            response_body_bytes_max: 6 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            utilization_target: 0.8,
            promote_ahead: Duration::from_secs(30),
            demand_refresh: Duration::from_millis(20),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

struct Ctx {
    config: SchedulerConfig,
    store: Arc<dyn Store>,
    runtime: Arc<Runtime>,
    functions: Arc<dyn Functions>,
    clock: Arc<dyn Clock>,
    /// The leases (id, attempt) this node is running: what heartbeats renew, shutdown releases,
    /// and a lost lease stops. By the pair, not the id: if a starved node lost attempt 1's lease
    /// and then leased the invocation again as attempt 2, the end of attempt 1 must not stop
    /// attempt 2's heartbeats.
    running: Mutex<HashMap<(String, u32), Running>>,
    stats: Arc<SchedulerStats>,
}

/// One attempt running on this node.
#[derive(Default)]
struct Running {
    /// Its task (`None` for the moment between spawn and record).
    task: Option<AbortHandle>,
    /// The guest is done and its result is being recorded. A heartbeat then finds the lease gone
    /// when the completion committed first: that is the end of the attempt, not a lost lease.
    completing: bool,
    /// Started as opportunistic work (beyond reservations, under the utilization target): it
    /// counts against the pacer's limit.
    opportunistic: bool,
}

/// What the scheduler is doing, for the node's heartbeat and API.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Invocations running on this node now.
    in_flight: AtomicU64,
    /// How long the invocations of the last non-empty lease had waited past their start time, at
    /// most; 0 after a lease that found nothing.
    lag_ms: AtomicU64,
    /// What the last planning round saw and decided, for the API.
    view: Mutex<SchedulingView>,
}

/// What the scheduler's last round saw and decided (`GET /v1/tenants/{t}/usage`, `GET
/// /v1/nodes`).
#[derive(Debug, Clone, Default)]
pub struct SchedulingView {
    /// Fraction of the node's cores guests used over the last measurement (an average).
    pub utilization: f64,
    pub utilization_target: f64,
    /// How many opportunistic calls may run on this node now, and run.
    pub opportunistic_limit: u32,
    pub opportunistic_running: u32,
    /// Per tenant: its quota and, per class of its runnable work, why that work waited in the
    /// last round.
    pub tenants: BTreeMap<String, TenantView>,
}

#[derive(Debug, Clone, Default)]
pub struct TenantView {
    pub quota: Quota,
    /// Running on every node at the last demand read.
    pub running: u32,
    /// `(class, reason)` for each class of its work left waiting in the last round.
    pub waiting: Vec<(LeaseClass, WaitReason)>,
    /// Functions held back because a downstream is saturated.
    pub downstream_held: Vec<String>,
}

impl SchedulerStats {
    pub fn view(&self) -> SchedulingView {
        self.view.lock().expect("scheduling view").clone()
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn lag_ms(&self) -> u64 {
        self.lag_ms.load(Ordering::Relaxed)
    }
}

pub struct Scheduler {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<SchedulerStats>,
}

impl Scheduler {
    /// Starts the loop on the current runtime. A permit on `notify` (an invocation was queued
    /// on this node) makes it lease now rather than at its next poll.
    pub fn start(
        config: SchedulerConfig,
        store: Arc<dyn Store>,
        runtime: Arc<Runtime>,
        functions: Arc<dyn Functions>,
        clock: Arc<dyn Clock>,
        notify: Arc<Notify>,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(SchedulerStats::default());
        let ctx = Arc::new(Ctx {
            config,
            store,
            runtime,
            functions,
            clock,
            running: Mutex::default(),
            stats: stats.clone(),
        });
        let task = tokio::spawn(run_loop(ctx, notify.clone(), stop_rx));
        Self { stop, task, stats }
    }

    pub fn stats(&self) -> Arc<SchedulerStats> {
        self.stats.clone()
    }

    /// The loop's task, for the node's supervisor: it ends only after `shutdown`, unless it
    /// panicked.
    pub fn task(&self) -> tokio::task::AbortHandle {
        self.task.abort_handle()
    }

    /// Stops leasing, lets running invocations finish within the grace period, and gives the
    /// leases of the rest back to the queue.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run_loop(ctx: Arc<Ctx>, notify: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let mut tasks = JoinSet::new();
    // Heartbeats tick on their own task: a lease call that waits (a pool reconnecting after the
    // database dropped its connections) must not hold back the renewal of running leases.
    let heartbeats = tokio::spawn(heartbeat_loop(ctx.clone()));
    let mut store_backoff = Duration::from_millis(100);
    let mut planner = Planner::new(&ctx);
    loop {
        while tasks.try_join_next().is_some() {}
        let room = ctx.config.inflight_max.saturating_sub(tasks.len());
        let mut full_batch = false;
        if room > 0 {
            match planner.round(&ctx, room as u32).await {
                Ok((leased, asked)) => {
                    store_backoff = Duration::from_millis(100);
                    let got: usize = leased.iter().map(|(l, _)| l.len()).sum();
                    full_batch = asked > 0 && got as u32 == asked;
                    let now = ctx.clock.now_ms();
                    let lag = leased
                        .iter()
                        .flat_map(|(l, _)| l.iter())
                        .map(|inv| now.saturating_sub(inv.run_after))
                        .max()
                        .unwrap_or(0);
                    ctx.stats.lag_ms.store(u64::try_from(lag).unwrap_or(0), Ordering::Relaxed);
                    for (batch, opportunistic) in leased {
                        for inv in batch {
                            // An older attempt of the same invocation still running here lost its
                            // lease (this node was starved past it): it stops before this one
                            // starts.
                            stop_attempts(&ctx, |(id, attempt), _| id == &inv.id && *attempt < inv.attempt);
                            let key = (inv.id.clone(), inv.attempt);
                            ctx.running
                                .lock()
                                .expect("running set")
                                .insert(key.clone(), Running { opportunistic, ..Running::default() });
                            let handle = tasks.spawn(run_one(ctx.clone(), inv));
                            if let Some(running) = ctx.running.lock().expect("running set").get_mut(&key) {
                                running.task = Some(handle);
                            }
                        }
                    }
                    ctx.stats.in_flight.store(tasks.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leasing failed; backing off");
                    tokio::time::sleep(store_backoff).await;
                    store_backoff = (store_backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if full_batch && tasks.len() < ctx.config.inflight_max {
            // More may be waiting: lease again at once instead of sleeping.
            tokio::task::yield_now().await;
            continue;
        }
        let linger_until = tokio::time::Instant::now() + ctx.config.lease_linger;
        // Work held back (over target, a saturated downstream) is looked at again soon even
        // when nothing happens: the next round may find a trough.
        let idle = if planner.holding { ctx.config.demand_refresh.max(PACE) } else { ctx.config.poll_idle };
        tokio::select! {
            _ = stop.changed() => break,
            _ = notify.notified() => {
                planner.notified = true;
                tokio::time::sleep_until(linger_until).await
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = tokio::time::sleep(idle) => {}
        }
    }
    drain(&ctx, tasks).await;
    heartbeats.abort();
}

/// How often the pacer adjusts its limit to the measured utilization.
pub const PACE: Duration = Duration::from_millis(100);
/// How often tenants' quotas and functions' reservations are read again.
const QUOTAS_REFRESH: Duration = Duration::from_secs(2);

/// The loop's planning state: what it last read of the queue, the quotas, the pacer and the
/// hold log.
struct Planner {
    pacer: Pacer,
    demand: QueueDemand,
    demand_read: Option<tokio::time::Instant>,
    /// A local enqueue happened since the last demand read.
    notified: bool,
    /// The last round left runnable work waiting.
    holding: bool,
    quotas: HashMap<String, Quota>,
    /// Functions with a reservation of their own, by tenant: `function, reserved`.
    reservations: HashMap<String, Vec<(String, u32)>>,
    quotas_read: Option<tokio::time::Instant>,
    /// Rounds planned so far: which tenant each of the plan's phases starts with.
    rounds: u64,
    holds: HoldLog,
    /// Each tenant's recent opportunistic service, for the fair share.
    service: Service,
    last_round: UnixMs,
    /// Guest CPU time and when it was read, for utilization.
    cpu: (u64, std::time::Instant),
    paced: std::time::Instant,
    utilization: f64,
    /// Since when this node has run nothing, and started nothing, while the queue had runnable
    /// work: the backstop's clock (see [`STALL_BACKSTOP`]).
    stalled_since: Option<tokio::time::Instant>,
    /// When this node last called the store's lease (which sweeps first), for [`SWEEP_EVERY`].
    swept: Option<tokio::time::Instant>,
}

/// How often a round with nothing to lease still calls the store's lease, for its sweeps
/// (lapsed leases reclaimed, closed windows expired). A round that leases sweeps anyway; before
/// this bound, every round woken by a finished call made a write transaction of its own just to
/// sweep, and waited for its commit.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// How long the plan may start nothing on a node that runs nothing while the queue holds
/// runnable work before one round leases by the queue's own order instead. The plan should never
/// do that (an idle node is under its target, and the pacer's limit is at least 1), but the
/// chaos test has twice seen a call stay queued with the node idle, not yet explained; this
/// keeps the queue's promise (every acknowledged call runs) whatever the plan's state, and says
/// so in the node's log when it fires.
const STALL_BACKSTOP: Duration = Duration::from_secs(2);

impl Planner {
    fn new(ctx: &Ctx) -> Self {
        let now = std::time::Instant::now();
        Self {
            pacer: Pacer::new(ctx.config.utilization_target, ctx.config.inflight_max as u32),
            demand: QueueDemand::default(),
            demand_read: None,
            notified: true,
            holding: false,
            quotas: HashMap::new(),
            reservations: HashMap::new(),
            quotas_read: None,
            rounds: 0,
            holds: HoldLog::default(),
            service: Service::default(),
            last_round: ctx.clock.now_ms(),
            cpu: (ctx.runtime.lane_stats().guest_cpu_ns, now),
            paced: now,
            utilization: 0.0,
            stalled_since: None,
            swept: None,
        }
    }

    /// Measures utilization (every [`PACE`]) and adjusts the pacer; returns how many more
    /// opportunistic calls may start, and whether the node is over its target.
    fn opportunistic_room(&mut self, ctx: &Ctx) -> (u32, bool) {
        let running =
            ctx.running.lock().expect("running set").values().filter(|r| r.opportunistic).count() as u32;
        let now = std::time::Instant::now();
        if now.duration_since(self.paced) >= PACE {
            let cpu = ctx.runtime.lane_stats().guest_cpu_ns;
            let span = now.duration_since(self.cpu.1).as_nanos() as f64;
            let used = cpu.saturating_sub(self.cpu.0) as f64 / (span * ctx.config.cores.max(1) as f64);
            // A short average (about half a second) so one long poll does not swing it.
            self.utilization = 0.6 * self.utilization + 0.4 * used;
            self.cpu = (cpu, now);
            self.paced = now;
            self.pacer.adjust(self.utilization, running);
        }
        // The limit alone gates: it shrinks in proportion while the node is over target. A
        // hard stop at the target would empty the node for as long as the average lags behind.
        (self.pacer.limit().saturating_sub(running), self.utilization >= ctx.config.utilization_target)
    }

    async fn refresh(&mut self, ctx: &Ctx) -> Result<(), sluice_store::StoreError> {
        let now = tokio::time::Instant::now();
        if self.quotas_read.is_none_or(|at| now.duration_since(at) >= QUOTAS_REFRESH) {
            self.quotas = ctx.store.tenant_quotas().await?.into_iter().collect();
            self.reservations.clear();
            for (tenant, function, reserved) in ctx.functions.reservations() {
                self.reservations.entry(tenant).or_default().push((function, reserved));
            }
            self.quotas_read = Some(now);
        }
        let stale = self.demand_read.is_none_or(|at| now.duration_since(at) >= ctx.config.demand_refresh);
        if stale || self.notified {
            self.demand = ctx
                .store
                .queue_demand(ctx.clock.now_ms(), promote_ahead_ms(ctx), ctx.config.batch_max.max(1))
                .await?;
            // Sorted as `count_started` searches it (the database's collation need not be
            // Rust's byte order).
            self.demand.running.sort_unstable();
            self.demand_read = Some(now);
            self.notified = false;
        }
        Ok(())
    }

    /// Plans and leases one round with room for `room` more calls; returns what each ask leased
    /// (and whether it was opportunistic) and how many calls were asked for.
    async fn round(
        &mut self,
        ctx: &Ctx,
        room: u32,
    ) -> Result<(Vec<(Vec<Leased>, bool)>, u32), sluice_store::StoreError> {
        self.refresh(ctx).await?;
        let (opportunistic, over_target) = self.opportunistic_room(ctx);
        // For the backstop, as read (before this round's leases are taken off it). Deferrable
        // work is meant to wait while the node is over its target; the rest never is (the
        // pacer's limit is at least 1).
        let runnable =
            self.demand.tenants.iter().any(|d| d.due + d.plain > 0 || (!over_target && d.deferrable > 0));
        self.service.decay_to(ctx.clock.now_ms());
        let mut tenants: BTreeMap<String, TenantInput> = BTreeMap::new();
        let mut running_by_function: HashMap<(&str, &str), u32> = HashMap::new();
        let mut running_by_tenant: HashMap<&str, u32> = HashMap::new();
        for (tenant, function, n) in &self.demand.running {
            running_by_function.insert((tenant, function), *n);
            *running_by_tenant.entry(tenant).or_default() += n;
        }
        for d in &self.demand.tenants {
            let function_reservations = self
                .reservations
                .get(&d.tenant)
                .into_iter()
                .flatten()
                .map(|(f, r)| {
                    (
                        f.clone(),
                        *r,
                        running_by_function.get(&(d.tenant.as_str(), f.as_str())).copied().unwrap_or(0),
                    )
                })
                .collect();
            tenants.insert(
                d.tenant.clone(),
                TenantInput {
                    quota: self.quotas.get(&d.tenant).copied().unwrap_or_default(),
                    demand: d.clone(),
                    running: running_by_tenant.get(d.tenant.as_str()).copied().unwrap_or(0),
                    function_reservations,
                    excluded: ctx.functions.saturated(&d.tenant),
                    served: self.service.of(&d.tenant),
                },
            );
        }
        let plan = plan::plan(&tenants, room, opportunistic, over_target, self.rounds);
        self.rounds = self.rounds.wrapping_add(1);
        let asked: u32 = plan.asks.iter().map(|a| a.limit).sum();
        let sweep_due = self.swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY);
        let leased = if plan.asks.is_empty() {
            // Nothing to start, but the store still sweeps now and then: leases that lapsed
            // (their node died) are reclaimed, windows that closed expire. Runnable work is what
            // `queue_demand` sees, and a lapsed lease is not runnable until a lease call has
            // reclaimed it.
            if sweep_due {
                ctx.store.lease(&ctx.config.owner, ctx.clock.now_ms(), ctx.config.lease_ms, 0).await?;
                self.swept = Some(tokio::time::Instant::now());
            }
            Vec::new()
        } else {
            let leased = ctx
                .store
                .lease_asks(
                    &ctx.config.owner,
                    ctx.clock.now_ms(),
                    ctx.config.lease_ms,
                    promote_ahead_ms(ctx),
                    &plan.asks,
                )
                .await?;
            self.swept = Some(tokio::time::Instant::now());
            leased
        };

        // What was leased is no longer demand; an ask that came back short drained its class.
        // A class read at the count's cap (`batch_max`) may hold any number more: while its asks
        // come back full it keeps that count, so the next rounds lease on at once instead of
        // waiting out `demand_refresh` with a backlog in the queue and room on the node (a
        // drain was capped at `batch_max` calls per refresh).
        let now = ctx.clock.now_ms();
        let cap = ctx.config.batch_max.max(1);
        for (ask, got) in plan.asks.iter().zip(&leased) {
            if let Some(d) = self.demand.tenants.iter_mut().find(|d| d.tenant == ask.tenant) {
                let left = match ask.class {
                    LeaseClass::Due => &mut d.due,
                    LeaseClass::Plain => &mut d.plain,
                    LeaseClass::Deferrable => &mut d.deferrable,
                };
                *left = left_after_lease(*left, ask.limit, got.len() as u32, ask.function.is_none(), cap);
            }
        }
        // And it runs: until the next read, the next rounds must not grant a reservation again.
        count_started(&mut self.demand.running, started_keys(leased.iter().flatten()));

        // Why the rest waits, and why what was leased waited.
        let from = self.last_round;
        self.holding = !plan.held.is_empty();
        for ((tenant, class), reason) in &plan.held {
            self.holds.held(tenant, *class, *reason, from, now);
        }
        for (tenant, t) in &tenants {
            for function in &t.excluded {
                self.holds.held_downstream(tenant, function, from, now);
                self.holding = true;
            }
        }
        self.last_round = now;
        let waits: Vec<(String, u32, String)> = leased
            .iter()
            .flatten()
            .filter_map(|inv| {
                let why = self.holds.explain(
                    &inv.tenant,
                    &inv.function,
                    inv.deadline.is_some(),
                    inv.run_after,
                    now,
                )?;
                Some((inv.id.clone(), inv.attempt, why))
            })
            .collect();
        if !waits.is_empty() {
            // Not awaited: the reasons are for people reading the invocation later, and the
            // round must not wait for a commit of its own before its calls start.
            let store = ctx.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.record_waits(&waits).await {
                    tracing::debug!(error = %e, "recording why invocations waited failed");
                }
            });
        }
        self.holds.forget_before(now - HOLDS_KEPT_MS);

        let view = SchedulingView {
            utilization: self.utilization,
            utilization_target: ctx.config.utilization_target,
            opportunistic_limit: self.pacer.limit(),
            opportunistic_running: ctx
                .running
                .lock()
                .expect("running set")
                .values()
                .filter(|r| r.opportunistic)
                .count() as u32,
            tenants: tenants
                .iter()
                .map(|(name, t)| {
                    let waiting = plan
                        .held
                        .iter()
                        .filter(|((n, _), _)| n == name)
                        .map(|((_, class), reason)| (*class, *reason))
                        .collect();
                    let view = TenantView {
                        quota: t.quota,
                        running: t.running,
                        waiting,
                        downstream_held: t.excluded.clone(),
                    };
                    (name.clone(), view)
                })
                .collect(),
        };
        *ctx.stats.view.lock().expect("scheduling view") = view;

        // The backstop: nothing runs here, nothing was started, yet work is runnable.
        let started = leased.iter().map(Vec::len).sum::<usize>();
        let idle = ctx.running.lock().expect("running set").is_empty();
        let mut backstop = Vec::new();
        if started == 0 && runnable && idle {
            let since = *self.stalled_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= STALL_BACKSTOP {
                let limit = room.min(ctx.config.batch_max.max(1));
                backstop = ctx
                    .store
                    .lease(&ctx.config.owner, ctx.clock.now_ms(), ctx.config.lease_ms, limit)
                    .await?;
                count_started(&mut self.demand.running, started_keys(&backstop));
                tracing::warn!(
                    leased = backstop.len(),
                    plan_asks = plan.asks.len(),
                    opportunistic_limit = self.pacer.limit(),
                    utilization = self.utilization,
                    "the plan started nothing for {STALL_BACKSTOP:?} on an idle node while work was runnable; \
                     leased by the queue's order instead"
                );
                self.stalled_since = None;
            }
        } else {
            self.stalled_since = None;
        }

        // The asks after the first opportunistic one are opportunistic (the plan lists them last).
        let mut seen = 0;
        let firm = plan.asks.iter().map(|a| a.limit).sum::<u32>() - plan.opportunistic;
        let leased = plan
            .asks
            .iter()
            .zip(leased)
            .map(|(ask, got)| {
                let opportunistic = seen >= firm;
                seen += ask.limit;
                if opportunistic {
                    self.service.add(&ask.tenant, got.len() as u32);
                }
                (got, opportunistic)
            })
            .collect::<Vec<_>>();
        let mut leased = leased;
        if !backstop.is_empty() {
            leased.push((backstop, false));
        }
        Ok((leased, asked))
    }
}

/// What a class's runnable count is after an ask of it leased `got` of `asked`: an ask of the
/// whole class (not of one function) that came back short drained it; a count read at the cap
/// (`batch_max`, where `queue_demand` stops counting) is a lower bound, kept while asks come back
/// full; any other count loses what was leased.
fn left_after_lease(left: u32, asked: u32, got: u32, whole_class: bool, cap: u32) -> u32 {
    if got < asked && whole_class {
        0
    } else if left >= cap {
        left
    } else {
        left.saturating_sub(got)
    }
}

/// Adds calls just leased to what runs by `(tenant, function)` (sorted), where they stay until the
/// next demand read replaces it: otherwise every round before that read would see the tenant's
/// reservation as free still, and a tight loop of full batches would start it many times over.
/// Calls that finished meanwhile are not taken off, which errs on the side of a reservation
/// waiting one read longer. A new entry is allocated once per function per read, not per call.
fn count_started<'a>(
    running: &mut Vec<(String, String, u32)>,
    started: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    for key in started {
        match running.binary_search_by(|(t, f, _)| (t.as_str(), f.as_str()).cmp(&key)) {
            Ok(i) => running[i].2 += 1,
            Err(i) => running.insert(i, (key.0.to_string(), key.1.to_string(), 1)),
        }
    }
}

/// `(tenant, function)` of each call.
fn started_keys<'a>(calls: impl IntoIterator<Item = &'a Leased>) -> impl Iterator<Item = (&'a str, &'a str)> {
    calls.into_iter().map(|inv| (inv.tenant.as_str(), inv.function.as_str()))
}

/// How long the hold log remembers (longer than any wait worth explaining in detail).
const HOLDS_KEPT_MS: i64 = 24 * 60 * 60 * 1000;

fn promote_ahead_ms(ctx: &Ctx) -> u64 {
    ctx.config.promote_ahead.as_millis() as u64
}

/// Renews the running leases every `heartbeat`, until aborted (after the drain).
async fn heartbeat_loop(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(ctx.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        renew(&ctx).await;
    }
}

async fn renew(ctx: &Ctx) {
    let leases: Vec<(String, u32)> = ctx.running.lock().expect("running set").keys().cloned().collect();
    if leases.is_empty() {
        return;
    }
    // A heartbeat that fails (a connection the database dropped, a batch that failed) is tried
    // again at once rather than at the next tick: two missed ticks can be a lost lease.
    let mut pause = Duration::from_millis(20);
    let mut tries = 0;
    let started = std::time::Instant::now();
    let lost = loop {
        match ctx.store.heartbeat(&ctx.config.owner, &leases, ctx.clock.now_ms(), ctx.config.lease_ms).await {
            Ok(lost) => break lost,
            Err(e) => {
                tries += 1;
                if tries == HEARTBEAT_TRIES {
                    tracing::warn!(error = %e, tries, "heartbeat failed; trying again at the next tick");
                    return;
                }
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    };
    let took = started.elapsed();
    if took > Duration::from_millis(ctx.config.lease_ms / 2) {
        tracing::warn!(
            took_ms = took.as_millis() as u64,
            tries,
            leases = leases.len(),
            "a heartbeat took more than half the lease"
        );
    }
    // The store would refuse their results anyway; another attempt may already be running
    // elsewhere. Stopping them frees their slots and ends their side effects. Attempts whose
    // result is being recorded are left alone: their lease is gone because they are finished
    // (or, if it was lost, the store refuses the result, and the attempt ends by itself).
    let stopped = stop_attempts(ctx, |lease, running| !running.completing && lost.contains(lease));
    if stopped > 0 {
        tracing::warn!(
            stopped,
            "leases lost (this node was too slow to renew them); those attempts were stopped"
        );
    }
}

/// Heartbeat attempts per tick (20 ms, 40 ms, 80 ms apart).
const HEARTBEAT_TRIES: u32 = 4;

/// Stops the running attempts `which` selects and forgets their leases; returns how many.
fn stop_attempts(ctx: &Ctx, which: impl Fn(&(String, u32), &Running) -> bool) -> usize {
    let mut running = ctx.running.lock().expect("running set");
    let doomed: Vec<(String, u32)> = running
        .iter()
        .filter(|(lease, attempt)| which(lease, attempt))
        .map(|(lease, _)| lease.clone())
        .collect();
    for lease in &doomed {
        if let Some(task) = running.remove(lease).and_then(|r| r.task) {
            task.abort();
        }
    }
    ctx.stats.in_flight.store(running.len() as u64, Ordering::Relaxed);
    doomed.len()
}

/// Lets running invocations finish within the grace period (their leases still renewed by the
/// heartbeat task), then gives the rest back.
async fn drain(ctx: &Ctx, mut tasks: JoinSet<()>) {
    let deadline = tokio::time::Instant::now() + ctx.config.shutdown_grace;
    while !tasks.is_empty() {
        tokio::select! {
            _ = tasks.join_next() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let rest: Vec<(String, u32)> =
        ctx.running.lock().expect("running set").drain().map(|(lease, _)| lease).collect();
    if !rest.is_empty() {
        match ctx.store.release(&ctx.config.owner, &rest).await {
            Ok(()) => tracing::info!(count = rest.len(), "returned unfinished invocations to the queue"),
            Err(e) => tracing::warn!(error = %e, "releasing leases failed; they expire on their own"),
        }
    }
}

async fn run_one(ctx: Arc<Ctx>, inv: Leased) {
    let waited = ctx.clock.now_ms().saturating_sub(inv.run_after.max(inv.created_at));
    // The call's trace context was stored with its request (the gateway span's).
    let trace = sluice_runtime::trace::stored_parent(&inv.request.headers);
    if let Some(cx) = &trace {
        let since = inv.run_after.max(inv.created_at);
        let since = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(since).unwrap_or(0));
        sluice_runtime::trace::queue_wait(cx, &inv.id, inv.attempt, since);
    }
    let started = std::time::Instant::now();
    let Attempt { result, logs, cpu_us } = execute(&ctx, &inv, trace).await;
    if tracing::enabled!(target: "sluice::access", tracing::Level::INFO) {
        let (status, error) = match &result {
            AttemptResult::Succeeded { response } => (Some(response.status), None),
            AttemptResult::Failed { error_kind, status_code, .. } => {
                (*status_code, Some(error_kind.as_str()))
            }
        };
        tracing::info!(
            target: "sluice::access",
            invocation_id = %inv.id,
            attempt = inv.attempt,
            kind = %Mode::Async,
            status,
            error = error.map(tracing::field::display),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            cpu_us,
            "attempt"
        );
    }
    // Looked up after the attempt, which may have loaded its version into the registry.
    if let Some(m) = ctx.functions.metrics(&inv.tenant, &inv.function, inv.version) {
        m.calls.started_after(Duration::from_millis(u64::try_from(waited).unwrap_or(0)));
        let outcome = match &result {
            AttemptResult::Succeeded { response } => CallOutcome::of_status(response.status),
            AttemptResult::Failed { error_kind, status_code, .. } => {
                CallOutcome::of_error_kind(error_kind, *status_code)
            }
        };
        let total = ctx.clock.now_ms().saturating_sub(inv.created_at);
        let total = Duration::from_millis(u64::try_from(total).unwrap_or(0));
        m.calls.finished(Mode::Async, outcome, total, started.elapsed(), cpu_us);
        if let Some(version) = &m.version {
            version.finished(outcome);
        }
    }
    if let Some(running) = ctx.running.lock().expect("running set").get_mut(&(inv.id.clone(), inv.attempt)) {
        running.completing = true;
    }
    // The outcome must reach the store: retry a few times if it is briefly unavailable. If it
    // never does, the lease expires and the invocation runs again (at-least-once).
    let mut pause = Duration::from_millis(50);
    for _ in 0..5 {
        let completion = Completion {
            id: &inv.id,
            owner: &ctx.config.owner,
            attempt: inv.attempt,
            result: &result,
            logs: &logs,
            cpu_us,
            now: ctx.clock.now_ms(),
        };
        match ctx.store.complete(completion).await {
            Ok(true) => {
                if is_final(&result, &inv) {
                    ctx.functions.finished(&inv.tenant, inv.request.quota_bytes());
                }
                break;
            }
            Ok(false) => {
                tracing::info!(id = %inv.id, "attempt finished after its lease was taken over; result discarded");
                break;
            }
            Err(e) => {
                tracing::warn!(id = %inv.id, error = %e, "recording the outcome failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
    let mut running = ctx.running.lock().expect("running set");
    running.remove(&(inv.id.clone(), inv.attempt));
    ctx.stats.in_flight.store(running.len() as u64, Ordering::Relaxed);
}

type Logs = Vec<(LogStream, String, UnixMs)>;

/// Whether the store ends an invocation with this result (`succeeded` or `dead`) rather than
/// queueing it for a retry: the same rule as the store's completion.
fn is_final(result: &AttemptResult, inv: &Leased) -> bool {
    match result {
        AttemptResult::Succeeded { .. } => true,
        AttemptResult::Failed { retry_at: None, .. } => true,
        AttemptResult::Failed { retry_at: Some(at), .. } => {
            let max_age_ms = i64::try_from(inv.max_age_ms).unwrap_or(i64::MAX);
            inv.attempt >= inv.attempts_max || *at > inv.created_at.saturating_add(max_age_ms)
        }
    }
}

/// What one attempt produced: its result, its log lines and its time on a thread.
struct Attempt {
    result: AttemptResult,
    logs: Logs,
    cpu_us: u64,
}

impl From<(AttemptResult, Logs)> for Attempt {
    /// An attempt that never ran guest code.
    fn from((result, logs): (AttemptResult, Logs)) -> Self {
        Self { result, logs, cpu_us: 0 }
    }
}

/// Runs one attempt and turns what happened into an [`Attempt`].
async fn execute(ctx: &Ctx, inv: &Leased, trace: Option<sluice_runtime::trace::TraceContext>) -> Attempt {
    let ready = match ctx.functions.get(&inv.tenant, &inv.function, inv.version).await {
        Ok(Some(ready)) => ready,
        Ok(None) => {
            let line =
                format!("function {}/{} version {} no longer exists", inv.tenant, inv.function, inv.version);
            return (failed(ctx, inv, ErrorKind::NotFound.as_str(), None, None, false), system(line)).into();
        }
        Err(e) => return (failed(ctx, inv, e.kind.as_str(), None, None, true), system(e.message)).into(),
    };
    let request = match build_request(inv) {
        Ok(r) => r,
        Err(e) => {
            return (failed(ctx, inv, ErrorKind::BadRequest.as_str(), None, None, false), system(e)).into();
        }
    };
    let timeout = Duration::from_millis(ready.config.async_timeout_ms);
    // Only a version with reuse or a bound of instances needs its key (allocated per attempt).
    let bounded = ctx.runtime.instances_max(&ready.prepared, &ready.config).is_some();
    let key = (bounded || ready.config.reuse_calls > 1).then(|| {
        sluice_runtime::warm::WarmKey::new(&inv.tenant, &inv.function, inv.version, &ready.prepared.digest)
    });
    // A bounded version (a heavy component, or its own `instances_max`) waits for room.
    let instance = match &key {
        Some(key) if bounded => {
            let deadline = std::time::Instant::now() + timeout;
            match ctx.runtime.instance_permit(key, &ready.prepared, &ready.config, deadline).await {
                Ok(permit) => permit,
                Err(e) => {
                    return (failed(ctx, inv, e.kind.as_str(), None, None, true), system(e.message)).into();
                }
            }
        }
        _ => None,
    };
    let call = Call {
        invocation_id: inv.id.clone(),
        config: ready.config.clone(),
        timeout,
        // Never on the control runtime, where this loop, the queue writer, the API and the
        // heartbeats run: a flood of CPU-bound calls must not delay any of them.
        lane: Lane::Async,
        group: Arc::from(inv.tenant.as_str()),
        function: Arc::from(inv.function.as_str()),
        on_done: None,
        trace: trace.map(|cx| TraceParent { cx, attempt: Some(inv.attempt) }),
        reuse: key.filter(|_| ready.config.reuse_calls > 1).map(|key| sluice_runtime::warm::Reuse { key }),
        instance,
    };
    let running = ctx.runtime.invoke(&ready.prepared, call, request);
    let (response, done) = match running.response().await {
        Ok(ok) => ok,
        Err(outcome) => {
            let kind = outcome.error.as_ref().map_or(ErrorKind::Internal, |e| e.kind);
            let result = failed(ctx, inv, kind.as_str(), None, None, kind.retryable());
            return Attempt { result, logs: outcome.logs, cpu_us: outcome.cpu_us };
        }
    };
    let (parts, body) = response.into_parts();
    let limited = http_body_util::Limited::new(body, ctx.config.response_body_bytes_max);
    let body = limited.collect().await.map(|c| c.to_bytes());
    let outcome = done.await.ok();
    let logs = outcome.as_ref().map(|o| o.logs.clone()).unwrap_or_default();
    let cpu_us = outcome.as_ref().map_or(0, |o| o.cpu_us);
    let guest_error = outcome.and_then(|o| o.error);
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            // Dropping the body part-way cancels the guest, so its own outcome then says
            // `client_closed`: the reason is the response's size.
            let (kind, retry) = match &guest_error {
                Some(err) if err.kind != ErrorKind::ClientClosed => (err.kind.as_str(), err.kind.retryable()),
                _ => ("response_too_large", false),
            };
            let mut logs = logs;
            logs.push((LogStream::System, format!("reading the response failed: {e}"), ctx.clock.now_ms()));
            let result = failed(ctx, inv, kind, Some(parts.status.as_u16()), None, retry);
            return Attempt { result, logs, cpu_us };
        }
    };
    let response = StoredResponse {
        status: parts.status.as_u16(),
        headers: parts.headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect(),
        body: body.to_vec(),
    };
    if let Some(err) = guest_error {
        let retry = err.kind.retryable();
        let result = failed(ctx, inv, err.kind.as_str(), Some(response.status), Some(response), retry);
        return Attempt { result, logs, cpu_us };
    }
    // A 5xx from the guest is a failure worth retrying; a 4xx is an answer, not a retry.
    if parts.status.is_server_error() {
        let result = failed(ctx, inv, "server_error", Some(response.status), Some(response), true);
        return Attempt { result, logs, cpu_us };
    }
    Attempt { result: AttemptResult::Succeeded { response }, logs, cpu_us }
}

fn failed(
    ctx: &Ctx,
    inv: &Leased,
    kind: &str,
    status_code: Option<u16>,
    response: Option<StoredResponse>,
    retryable: bool,
) -> AttemptResult {
    let retry_at = if retryable {
        let policy = RetryPolicy::new(inv.attempts_max, inv.max_age_ms);
        match policy.after_failure(inv.attempt, inv.created_at, ctx.clock.now_ms(), jitter()) {
            Next::RetryAt(at) => Some(at),
            Next::Dead => None,
        }
    } else {
        None
    };
    AttemptResult::Failed { error_kind: kind.to_string(), status_code, response, retry_at }
}

fn system(line: String) -> Logs {
    vec![(LogStream::System, line, sluice_core::SystemClock.now_ms())]
}

/// Uniform in [0, 1).
fn jitter() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

type GuestRequestBody = http_body_util::combinators::MapErr<Full<Bytes>, fn(Infallible) -> BodyError>;

fn never(e: Infallible) -> BodyError {
    match e {}
}

/// Rebuilds the stored request (the runtime adds `sluice-invocation-id` and a missing `Host`).
fn build_request(inv: &Leased) -> Result<http::Request<GuestRequestBody>, String> {
    let r = &inv.request;
    let mut builder = http::Request::builder().method(r.method.as_str()).uri(r.path_and_query.as_str());
    for (k, v) in &r.headers {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    let body: GuestRequestBody =
        Full::new(Bytes::from(r.body.clone())).map_err(never as fn(Infallible) -> BodyError);
    builder.body(body).map_err(|e| format!("the stored request is not valid HTTP: {e}"))
}

#[cfg(test)]
mod sim_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_just_leased_count_as_running_until_the_next_read() {
        let mut running = vec![("a".to_string(), "f".to_string(), 2), ("c".to_string(), "f".to_string(), 1)];
        count_started(&mut running, [("a", "f"), ("b", "g"), ("a", "f"), ("a", "e")]);
        let want = [("a", "e", 1), ("a", "f", 4), ("b", "g", 1), ("c", "f", 1)];
        let got: Vec<(&str, &str, u32)> =
            running.iter().map(|(t, f, n)| (t.as_str(), f.as_str(), *n)).collect();
        assert_eq!(got, want);
    }
}

#[cfg(test)]
mod final_tests {
    use super::*;
    use sluice_store::{Criticality, StoredRequest};

    fn leased(attempt: u32) -> Leased {
        Leased {
            id: "i".into(),
            tenant: "t".into(),
            function: "f".into(),
            version: 1,
            request: StoredRequest {
                method: "POST".into(),
                path_and_query: "/".into(),
                headers: Vec::new(),
                body: Vec::new(),
            },
            attempt,
            attempts_max: 3,
            created_at: 1_000,
            max_age_ms: 10_000,
            criticality: Criticality::Normal,
            deadline: None,
            run_after: 1_000,
        }
    }

    fn failed(retry_at: Option<UnixMs>) -> AttemptResult {
        AttemptResult::Failed { error_kind: "trap".into(), status_code: None, response: None, retry_at }
    }

    /// What stops counting against the tenant's queued quotas when its completion is recorded:
    /// the store's own rule for `succeeded` and `dead`.
    /// A backlog larger than the demand read can count is leased round after round, not
    /// `batch_max` calls per demand refresh (issue 20: that capped a drain at 6,400 calls/s).
    #[test]
    fn a_class_counted_at_the_cap_keeps_its_count_while_its_asks_come_back_full() {
        let cap = 128;
        // Read at the cap, leased in full: there may be any number more.
        assert_eq!(left_after_lease(128, 128, 128, true, cap), 128);
        assert_eq!(left_after_lease(128, 64, 64, true, cap), 128);
        // A short answer drained the class.
        assert_eq!(left_after_lease(128, 128, 40, true, cap), 0);
        // Below the cap the count is exact: what was leased is gone.
        assert_eq!(left_after_lease(100, 60, 60, true, cap), 40);
        // An ask of one function says nothing about the rest of its class.
        assert_eq!(left_after_lease(100, 60, 10, false, cap), 90);
    }

    #[test]
    fn an_invocation_is_final_when_the_store_will_not_retry_it() {
        let ok = AttemptResult::Succeeded {
            response: StoredResponse { status: 200, headers: Vec::new(), body: Vec::new() },
        };
        assert!(is_final(&ok, &leased(1)));
        assert!(is_final(&failed(None), &leased(1)), "not retryable");
        assert!(!is_final(&failed(Some(2_000)), &leased(1)), "retried");
        assert!(is_final(&failed(Some(2_000)), &leased(3)), "no attempt left");
        assert!(!is_final(&failed(Some(11_000)), &leased(2)), "retried at its max age");
        assert!(is_final(&failed(Some(11_001)), &leased(2)), "too old to retry");
    }
}
