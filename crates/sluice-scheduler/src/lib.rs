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

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sluice_core::retry::{Next, RetryPolicy};
use sluice_core::{Clock, ErrorKind, FunctionConfig, LogStream, UnixMs};
use sluice_runtime::{BodyError, Call, Lane, Prepared, Runtime};
use sluice_store::{AttemptResult, Leased, Store, StoredResponse};
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
}

/// What the scheduler is doing, for the node's heartbeat and API.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Invocations running on this node now.
    in_flight: AtomicU64,
    /// How long the invocations of the last non-empty lease had waited past their start time, at
    /// most; 0 after a lease that found nothing.
    lag_ms: AtomicU64,
}

impl SchedulerStats {
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
    loop {
        while tasks.try_join_next().is_some() {}
        let room = ctx.config.inflight_max.saturating_sub(tasks.len());
        let mut full_batch = false;
        if room > 0 {
            let want = (room as u32).min(ctx.config.batch_max);
            let now = ctx.clock.now_ms();
            match ctx.store.lease(&ctx.config.owner, now, ctx.config.lease_ms, want).await {
                Ok(batch) => {
                    store_backoff = Duration::from_millis(100);
                    full_batch = batch.len() as u32 == want;
                    let lag = batch.iter().map(|inv| now.saturating_sub(inv.run_after)).max().unwrap_or(0);
                    ctx.stats.lag_ms.store(u64::try_from(lag).unwrap_or(0), Ordering::Relaxed);
                    for inv in batch {
                        // An older attempt of the same invocation still running here lost its
                        // lease (this node was starved past it): it stops before this one starts.
                        stop_attempts(&ctx, |(id, attempt), _| id == &inv.id && *attempt < inv.attempt);
                        let key = (inv.id.clone(), inv.attempt);
                        ctx.running.lock().expect("running set").insert(key.clone(), Running::default());
                        let handle = tasks.spawn(run_one(ctx.clone(), inv));
                        if let Some(running) = ctx.running.lock().expect("running set").get_mut(&key) {
                            running.task = Some(handle);
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
        tokio::select! {
            _ = stop.changed() => break,
            _ = notify.notified() => tokio::time::sleep_until(linger_until).await,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = tokio::time::sleep(ctx.config.poll_idle) => {}
        }
    }
    drain(&ctx, tasks).await;
    heartbeats.abort();
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
    let Attempt { result, logs, cpu_us } = execute(&ctx, &inv).await;
    if let Some(running) = ctx.running.lock().expect("running set").get_mut(&(inv.id.clone(), inv.attempt)) {
        running.completing = true;
    }
    // The outcome must reach the store: retry a few times if it is briefly unavailable. If it
    // never does, the lease expires and the invocation runs again (at-least-once).
    let mut pause = Duration::from_millis(50);
    for _ in 0..5 {
        match ctx
            .store
            .complete(&inv.id, &ctx.config.owner, inv.attempt, &result, &logs, cpu_us, ctx.clock.now_ms())
            .await
        {
            Ok(true) => break,
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
async fn execute(ctx: &Ctx, inv: &Leased) -> Attempt {
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
    let call = Call {
        invocation_id: inv.id.clone(),
        config: ready.config.clone(),
        timeout: Duration::from_millis(ready.config.async_timeout_ms),
        // Never on the control runtime, where this loop, the queue writer, the API and the
        // heartbeats run: a flood of CPU-bound calls must not delay any of them.
        lane: Lane::Async,
        group: Arc::from(inv.tenant.as_str()),
        on_done: None,
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
