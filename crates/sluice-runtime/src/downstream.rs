//! Adaptive concurrency limits for the downstreams guests call, kept per (tenant, function,
//! `host:port`) on this node.
//!
//! A function whose downstream is overloaded should wait for it, not hammer it with more
//! requests: the outbound HTTP client takes a [`DownstreamPermit`] before it connects and reports
//! what the request told about the downstream (an overload signal — 429, 503, 504, a refused or
//! timed-out connection — a plain answer and its latency, or neither). The scheduler asks
//! [`Downstreams::saturated`] before it starts a queued call of a function, and the gateway before
//! it starts a sync one, so calls that would only wait for a slot stay queued instead.
//!
//! The limit of one downstream is a congestion window, as in TCP (`Aimd`). It starts at
//! [`LIMIT_INITIAL`] and grows by one per success — doubling per round trip — until the first
//! overload or [`LIMIT_MAX`] (slow start); from then on it grows by one per `limit` successes,
//! one per round trip (congestion avoidance). It grows only while it is used (at least half of it
//! in flight), and only on successes of requests sent since the last decrease. An overload halves
//! it, once per episode: only an overload of a request sent after the last decrease counts (one
//! sent before was sent under the old limit and says nothing about the new one), and at most one
//! per cooldown (about one smoothed latency). On a downstream that serves `C` requests at once
//! and rejects the rest, the limit settles into a sawtooth between `⌈C/2⌉` and `C+1`, with one
//! rejected request per tooth (the simulation in the tests shows it, also when `C` changes).
//!
//! Limits are per node: each node learns its own share of a downstream.
//!
//! The limiter core reads no clock: every method of `Aimd` takes the time, and the registry
//! reads the clock only at its public edges, so the tests (a discrete-event simulation among
//! them) are deterministic. This module must not know HTTP: the caller classifies a response.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The limit of a downstream nothing is known about yet: small, so a fresh function cannot open
/// a flood of connections before the first answer, and slow start finds the real one in
/// `log2(capacity)` round trips.
pub const LIMIT_INITIAL: u32 = 2;
/// The limit never falls below one request at a time: a downstream that rejects everything is
/// still probed, so the limit grows again when it heals.
pub const LIMIT_MIN: u32 = 1;
/// The ceiling of the limit; slow start ends here too. In-flight requests are bounded anyway
/// (instances times requests per invocation), this bounds the arithmetic and what a report shows.
pub const LIMIT_MAX: u32 = 1024;
/// The shortest cooldown after a decrease: overloads within it belong to the same episode. A
/// floor, so a downstream answering in microseconds is not halved once per burst of rejections.
pub const COOLDOWN_MIN: Duration = Duration::from_millis(100);
/// The longest cooldown: a downstream that answers in half a minute is still backed off within
/// seconds of a new episode.
pub const COOLDOWN_MAX: Duration = Duration::from_secs(5);
/// The weight of a new latency sample in the moving average is `1 / LATENCY_EWMA_DIVISOR`
/// (TCP's smoothed RTT uses 1/8 too): a few samples move it, one outlier does not.
pub const LATENCY_EWMA_DIVISOR: u32 = 8;
/// Downstreams with a limit per (tenant, function). A guest may name any number of hosts and
/// ports; the ones beyond this get unlimited permits and no entry. That only costs the function
/// itself (its limits are its own), while every entry costs the node memory.
pub const HOSTS_PER_FUNCTION_MAX: usize = 64;
/// An entry unused (no request in flight or waiting) for this long is forgotten; the next request
/// to that downstream starts over in slow start, which is right for knowledge this old.
pub const ENTRY_IDLE_MAX: Duration = Duration::from_secs(10 * 60);
/// How often [`Downstreams::acquire`] looks for idle entries to forget.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

const LOCK: &str = "downstream lock";

/// Where a limit is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Grows by one per success, doubling per round trip, until the first overload.
    SlowStart,
    /// Grows by one per round trip; halves on an overload.
    Avoidance,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 2] = [Phase::SlowStart, Phase::Avoidance];

    /// The stable name shown in reports: `slow_start` or `avoidance`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::SlowStart => "slow_start",
            Phase::Avoidance => "avoidance",
        }
    }
}

/// What one request told about its downstream. The caller classifies it (this module knows no
/// HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that is not an overload signal, `latency` after the permit was granted.
    Ok { latency: Duration },
    /// The downstream is overloaded or unreachable: 429, 503, 504, a refused connection, no
    /// connection or no response head in time.
    Overload,
    /// Anything else (a TLS failure, a broken response): says nothing about load.
    Other,
}

/// The AIMD limit of one downstream, with the latency it has seen. Pure: it reads no clock and
/// takes the time of every event, so it can be driven by a simulation.
#[derive(Debug, Clone)]
pub(crate) struct Aimd {
    limit: u32,
    phase: Phase,
    /// Successes counted towards the next increase in avoidance.
    credits: u32,
    latency_ewma: Option<Duration>,
    latency_min: Option<Duration>,
    last_decrease: Option<Instant>,
    successes_total: u64,
    overloads_total: u64,
    others_total: u64,
}

impl Aimd {
    pub(crate) fn new() -> Self {
        Self {
            limit: LIMIT_INITIAL,
            phase: Phase::SlowStart,
            credits: 0,
            latency_ewma: None,
            latency_min: None,
            last_decrease: None,
            successes_total: 0,
            overloads_total: 0,
            others_total: 0,
        }
    }

    pub(crate) fn limit(&self) -> u32 {
        self.limit
    }

    /// How long after a decrease further overloads count as the same episode: one smoothed
    /// latency, between [`COOLDOWN_MIN`] and [`COOLDOWN_MAX`].
    pub(crate) fn cooldown(&self) -> Duration {
        self.latency_ewma.unwrap_or(Duration::ZERO).clamp(COOLDOWN_MIN, COOLDOWN_MAX)
    }

    /// Records the outcome, at `now`, of a request granted at `started` while `in_flight`
    /// requests (itself included) were in flight.
    pub(crate) fn record(&mut self, outcome: Outcome, now: Instant, started: Instant, in_flight: u32) {
        match outcome {
            Outcome::Ok { latency } => self.on_success(latency, started, in_flight),
            Outcome::Overload => {
                self.on_overload(now, started);
            }
            Outcome::Other => self.others_total += 1,
        }
    }

    fn on_success(&mut self, latency: Duration, started: Instant, in_flight: u32) {
        self.successes_total += 1;
        self.latency_ewma = Some(match self.latency_ewma {
            None => latency,
            Some(avg) => {
                avg * (LATENCY_EWMA_DIVISOR - 1) / LATENCY_EWMA_DIVISOR + latency / LATENCY_EWMA_DIVISOR
            }
        });
        self.latency_min = Some(self.latency_min.map_or(latency, |min| min.min(latency)));
        // A request sent before the last decrease succeeded under the old limit: its success
        // is no evidence for growing the new one.
        if self.last_decrease.is_some_and(|at| started < at) {
            return;
        }
        // Grow only a limit that is being used (TCP's window validation): a function that sends
        // one request at a time must not bank a limit of a thousand, to be let loose on the
        // downstream the day it fans out.
        if in_flight.saturating_mul(2) < self.limit {
            return;
        }
        match self.phase {
            Phase::SlowStart => {
                self.limit = (self.limit + 1).min(LIMIT_MAX);
                if self.limit == LIMIT_MAX {
                    self.phase = Phase::Avoidance;
                }
            }
            Phase::Avoidance => {
                self.credits += 1;
                if self.credits >= self.limit {
                    self.credits = 0;
                    self.limit = (self.limit + 1).min(LIMIT_MAX);
                }
            }
        }
    }

    /// Halves the limit unless this overload belongs to an episode already answered; says
    /// whether it did.
    fn on_overload(&mut self, now: Instant, started: Instant) -> bool {
        self.overloads_total += 1;
        if let Some(at) = self.last_decrease
            && (started < at || now.saturating_duration_since(at) < self.cooldown())
        {
            return false;
        }
        self.limit = (self.limit / 2).max(LIMIT_MIN);
        self.phase = Phase::Avoidance;
        self.credits = 0;
        self.last_decrease = Some(now);
        true
    }
}

/// The limit of one downstream of one function, as a report shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DownstreamState {
    /// `host:port` (an IPv6 host in brackets), as the function's requests named it.
    pub host: String,
    /// Requests that may be in flight at once.
    pub limit: u32,
    /// Requests holding a permit now: from before connecting until their response body ended.
    pub in_flight: u32,
    /// Requests waiting for a permit now.
    pub waiting: usize,
    /// Slow start until the first overload, then avoidance.
    pub phase: Phase,
    /// Requests answered without an overload signal.
    pub successes_total: u64,
    /// Overload signals, counted whether or not they lowered the limit.
    pub overloads_total: u64,
    /// Requests that failed in a way that says nothing about load.
    pub others_total: u64,
    /// Moving average of the latency to the response head of successful requests.
    pub latency_ewma_ms: Option<f64>,
    /// The lowest latency seen: what the downstream takes when it is not loaded.
    pub latency_min_ms: Option<f64>,
    /// Time since the limit was last halved, if it ever was.
    pub last_decrease_ago_ms: Option<u64>,
}

/// One downstream's limiter and the requests using it.
struct HostState {
    aimd: Aimd,
    in_flight: u32,
    /// Requests waiting for a permit, first come first served.
    waiters: VecDeque<Waiter>,
    next_waiter_id: u64,
    /// Whether this host is counted in its function's `saturated_hosts`.
    counted_saturated: bool,
    last_used: Instant,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<DownstreamPermit>,
}

type HostEntry = Arc<Mutex<HostState>>;

/// tenant → function → its downstreams.
type FunctionsByTenant = HashMap<Arc<str>, HashMap<Arc<str>, Arc<FunctionHosts>>>;

/// The downstreams of one function.
#[derive(Default)]
struct FunctionHosts {
    hosts: Mutex<HashMap<Arc<str>, HostEntry>>,
    /// Hosts with `in_flight >= limit` or waiters, kept up to date under each host's lock so
    /// that [`Downstreams::saturated`] is one load.
    saturated_hosts: AtomicUsize,
}

/// The node's downstream limits, shared by every invocation (one per [`crate::Runtime`]).
///
/// Locks are taken in one order — the map, a function's host list, a host — and never across an
/// await. Memory is bounded: [`HOSTS_PER_FUNCTION_MAX`] entries per function (functions are
/// bounded by the store), each forgotten after [`ENTRY_IDLE_MAX`] unused. Waiters are bounded by
/// the outbound requests that may be open at once (instances times requests per invocation).
pub struct Downstreams {
    /// tenant → function → its downstreams. Read-locked on every acquire and `saturated`;
    /// write-locked to add a function and to sweep.
    functions: RwLock<FunctionsByTenant>,
    /// The origin of `swept_at_ms`.
    created: Instant,
    /// When idle entries were last looked for, in milliseconds since `created`.
    swept_at_ms: AtomicU64,
}

impl Default for Downstreams {
    fn default() -> Self {
        Self::new()
    }
}

impl Downstreams {
    /// An empty registry.
    pub fn new() -> Self {
        Self { functions: RwLock::default(), created: Instant::now(), swept_at_ms: AtomicU64::new(0) }
    }

    /// A permit to send one request from `function` of `tenant` to `host_port`. Resolves at once
    /// while the downstream has room; otherwise waits, first come first served, until a request
    /// ends or the limit grows. Dropping the future gives up the place in the queue. A downstream
    /// beyond [`HOSTS_PER_FUNCTION_MAX`] gets an unlimited permit.
    pub fn acquire(&self, tenant: &str, function: &str, host_port: &str) -> Acquire {
        self.acquire_at(tenant, function, host_port, Instant::now())
    }

    fn acquire_at(&self, tenant: &str, function: &str, host_port: &str, now: Instant) -> Acquire {
        self.maybe_sweep(now);
        // The request registers (takes a slot or a place in the queue) while the map is locked,
        // so a sweep cannot forget the entry between the lookup and the registration.
        {
            let functions = self.functions.read().expect(LOCK);
            if let Some(hosts) = functions.get(tenant).and_then(|t| t.get(function)) {
                return register(hosts, host_port, now);
            }
        }
        let mut functions = self.functions.write().expect(LOCK);
        let hosts = functions.entry(Arc::from(tenant)).or_default().entry(Arc::from(function)).or_default();
        register(hosts, host_port, now)
    }

    /// Whether a new call of `function` would wait for one of its downstreams: one of them has
    /// as many requests in flight as its limit, or has requests waiting. Cheap (a read lock, two
    /// lookups, one load; no allocation): asked per lease round and per sync call.
    pub fn saturated(&self, tenant: &str, function: &str) -> bool {
        let functions = self.functions.read().expect(LOCK);
        functions.get(tenant).and_then(|t| t.get(function)).is_some_and(|hosts| hosts.any_saturated())
    }

    /// The functions of `tenant` that [`Downstreams::saturated`] would name: the scheduler leaves
    /// their queued calls waiting (one read lock and a walk over the tenant's functions).
    pub fn saturated_functions(&self, tenant: &str) -> Vec<String> {
        let functions = self.functions.read().expect(LOCK);
        let Some(of_tenant) = functions.get(tenant) else { return Vec::new() };
        let mut names: Vec<String> = of_tenant
            .iter()
            .filter(|(_, hosts)| hosts.any_saturated())
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        names
    }

    /// The limits of `function`'s downstreams, by host.
    pub fn snapshot(&self, tenant: &str, function: &str) -> Vec<DownstreamState> {
        self.snapshot_at(tenant, function, Instant::now())
    }

    fn snapshot_at(&self, tenant: &str, function: &str, now: Instant) -> Vec<DownstreamState> {
        let functions = self.functions.read().expect(LOCK);
        let Some(hosts) = functions.get(tenant).and_then(|t| t.get(function)) else {
            return Vec::new();
        };
        let hosts = hosts.hosts.lock().expect(LOCK);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut states: Vec<DownstreamState> = hosts
            .iter()
            .map(|(host, entry)| {
                let state = entry.lock().expect(LOCK);
                let aimd = &state.aimd;
                DownstreamState {
                    host: host.to_string(),
                    limit: aimd.limit(),
                    in_flight: state.in_flight,
                    waiting: state.waiters.len(),
                    phase: aimd.phase,
                    successes_total: aimd.successes_total,
                    overloads_total: aimd.overloads_total,
                    others_total: aimd.others_total,
                    latency_ewma_ms: aimd.latency_ewma.map(ms),
                    latency_min_ms: aimd.latency_min.map(ms),
                    last_decrease_ago_ms: aimd
                        .last_decrease
                        .map(|at| now.saturating_duration_since(at).as_millis() as u64),
                }
            })
            .collect();
        states.sort_by(|a, b| a.host.cmp(&b.host));
        states
    }

    /// Sweeps at most once per [`SWEEP_INTERVAL`]; the caller that wins the race does it.
    fn maybe_sweep(&self, now: Instant) {
        let now_ms = now.saturating_duration_since(self.created).as_millis() as u64;
        let last = self.swept_at_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < SWEEP_INTERVAL.as_millis() as u64 {
            return;
        }
        if self.swept_at_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.sweep_at(now);
        }
    }

    /// Forgets every entry unused for [`ENTRY_IDLE_MAX`], and functions left without entries.
    /// An entry with a request in flight or waiting is in use, whatever its age.
    fn sweep_at(&self, now: Instant) {
        let mut functions = self.functions.write().expect(LOCK);
        functions.retain(|_, tenant| {
            tenant.retain(|_, function| {
                let mut hosts = function.hosts.lock().expect(LOCK);
                hosts.retain(|_, entry| {
                    let state = entry.lock().expect(LOCK);
                    state.in_flight > 0
                        || !state.waiters.is_empty()
                        || now.saturating_duration_since(state.last_used) < ENTRY_IDLE_MAX
                });
                !hosts.is_empty()
            });
            !tenant.is_empty()
        });
    }
}

/// Takes a slot of `host_port` or a place in its queue.
fn register(function: &Arc<FunctionHosts>, host_port: &str, now: Instant) -> Acquire {
    let host = {
        let mut hosts = function.hosts.lock().expect(LOCK);
        match hosts.get(host_port) {
            Some(entry) => entry.clone(),
            None if hosts.len() >= HOSTS_PER_FUNCTION_MAX => {
                return Acquire { state: AcquireState::Ready(Some(DownstreamPermit { slot: None })) };
            }
            None => {
                let entry = Arc::new(Mutex::new(HostState {
                    aimd: Aimd::new(),
                    in_flight: 0,
                    waiters: VecDeque::new(),
                    next_waiter_id: 0,
                    counted_saturated: false,
                    last_used: now,
                }));
                hosts.insert(Arc::from(host_port), entry.clone());
                entry
            }
        }
    };
    let mut state = host.lock().expect(LOCK);
    state.last_used = now;
    // Queue behind anyone already waiting, even if a slot looks free: first come first served.
    if state.waiters.is_empty() && state.in_flight < state.aimd.limit {
        state.in_flight += 1;
        sync_saturation(&mut state, function);
        drop(state);
        let permit = DownstreamPermit::granted(function.clone(), host, now);
        return Acquire { state: AcquireState::Ready(Some(permit)) };
    }
    let (tx, rx) = oneshot::channel();
    let id = state.next_waiter_id;
    state.next_waiter_id = state.next_waiter_id.wrapping_add(1);
    state.waiters.push_back(Waiter { id, tx });
    sync_saturation(&mut state, function);
    drop(state);
    Acquire { state: AcquireState::Waiting { rx, function: function.clone(), host, id } }
}

impl FunctionHosts {
    /// Whether any of its hosts has as many requests in flight as its limit, or waiters: judged
    /// now, under each host's lock, not from the running count (which a limit that moved between
    /// two updates of it could leave stale).
    fn any_saturated(&self) -> bool {
        if self.saturated_hosts.load(Ordering::Relaxed) == 0 {
            // The count only errs towards "saturated" (an update missed after a limit grew); a
            // zero is exact.
            return false;
        }
        let hosts = self.hosts.lock().expect(LOCK);
        hosts.values().any(|entry| {
            let mut state = entry.lock().expect(LOCK);
            // A waiter whose request gave up (its future dropped before it was let in) is not
            // waiting: left in the queue it would hold the function "saturated" for as long as
            // no request of it runs to let it go, and the scheduler starts none while it is.
            state.waiters.retain(|w| !w.tx.is_closed());
            sync_saturation(&mut state, self);
            state.in_flight >= state.aimd.limit || !state.waiters.is_empty()
        })
    }
}

/// Keeps the function's count of saturated hosts in step with this host.
fn sync_saturation(state: &mut HostState, function: &FunctionHosts) {
    let saturated = state.in_flight >= state.aimd.limit || !state.waiters.is_empty();
    if saturated != state.counted_saturated {
        if saturated {
            function.saturated_hosts.fetch_add(1, Ordering::Relaxed);
        } else {
            function.saturated_hosts.fetch_sub(1, Ordering::Relaxed);
        }
        state.counted_saturated = saturated;
    }
}

/// A permit handed to a waiter, sent once the host's lock is released.
type Grant = (oneshot::Sender<DownstreamPermit>, DownstreamPermit);

/// Lets waiters in while there is room under the limit.
fn admit(state: &mut HostState, function: &Arc<FunctionHosts>, host: &HostEntry, now: Instant) -> Vec<Grant> {
    let mut grants = Vec::new();
    while state.in_flight < state.aimd.limit {
        let Some(waiter) = state.waiters.pop_front() else { break };
        if waiter.tx.is_closed() {
            // Gave up without its drop having run yet; the drop will find nothing to remove.
            continue;
        }
        state.in_flight += 1;
        grants.push((waiter.tx, DownstreamPermit::granted(function.clone(), host.clone(), now)));
    }
    sync_saturation(state, function);
    grants
}

/// Sends permits to their waiters. A waiter that gave up since it was let in hands its permit
/// back, and dropping that permit here releases the slot (this runs with no lock held).
fn deliver(grants: Vec<Grant>) {
    for (tx, permit) in grants {
        drop(tx.send(permit));
    }
}

/// Waits for a [`DownstreamPermit`]; see [`Downstreams::acquire`].
#[must_use = "the request is registered when acquire is called; dropping the future gives up its place"]
pub struct Acquire {
    state: AcquireState,
}

enum AcquireState {
    Ready(Option<DownstreamPermit>),
    Waiting {
        rx: oneshot::Receiver<DownstreamPermit>,
        function: Arc<FunctionHosts>,
        host: HostEntry,
        id: u64,
    },
    Done,
}

impl Future for Acquire {
    type Output = DownstreamPermit;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<DownstreamPermit> {
        let permit = match &mut self.state {
            AcquireState::Ready(permit) => permit.take().expect("Acquire polled after it completed"),
            AcquireState::Waiting { rx, .. } => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(permit)) => permit,
                // The sender went away without a permit: the entry was dropped with us in its
                // queue, which the sweep never does. Not limiting is the answer that cannot hang.
                Poll::Ready(Err(_)) => DownstreamPermit { slot: None },
            },
            AcquireState::Done => panic!("Acquire polled after it completed"),
        };
        self.state = AcquireState::Done;
        Poll::Ready(permit)
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if let AcquireState::Waiting { function, host, id, .. } = &self.state {
            let mut state = host.lock().expect(LOCK);
            if let Some(at) = state.waiters.iter().position(|w| w.id == *id) {
                state.waiters.remove(at);
                sync_saturation(&mut state, function);
            }
            // If we were let in already, the permit is in the channel and is released when the
            // receiver drops it, right after this.
        }
    }
}

/// One request's slot at a downstream. Record what the request told with [`Self::record`] or
/// [`Self::done`]; the slot is released when the permit is dropped. A permit dropped without an
/// outcome (the request was cancelled) changes nothing but the count in flight.
#[must_use = "the slot is released when the permit is dropped"]
pub struct DownstreamPermit {
    /// `None` for a downstream beyond [`HOSTS_PER_FUNCTION_MAX`], which is not limited.
    slot: Option<Slot>,
}

struct Slot {
    function: Arc<FunctionHosts>,
    host: HostEntry,
    /// When the permit was granted: an outcome is judged against the limit in force then.
    started: Instant,
    recorded: bool,
}

impl DownstreamPermit {
    fn granted(function: Arc<FunctionHosts>, host: HostEntry, now: Instant) -> Self {
        Self { slot: Some(Slot { function, host, started: now, recorded: false }) }
    }

    /// Whether this permit counts against a limit (false beyond [`HOSTS_PER_FUNCTION_MAX`]).
    pub fn is_limited(&self) -> bool {
        self.slot.is_some()
    }

    /// Records the request's outcome now and keeps the slot until the permit is dropped: a
    /// response head is an answer, but the downstream is busy until the body has been sent.
    /// Only the first outcome counts.
    pub fn record(&mut self, outcome: Outcome) {
        self.record_at(outcome, Instant::now());
    }

    /// Records the outcome and releases the slot.
    pub fn done(self, outcome: Outcome) {
        self.done_at(outcome, Instant::now());
    }

    fn record_at(&mut self, outcome: Outcome, now: Instant) {
        let Some(slot) = &mut self.slot else { return };
        if std::mem::replace(&mut slot.recorded, true) {
            return;
        }
        let grants = {
            let mut state = slot.host.lock().expect(LOCK);
            let in_flight = state.in_flight;
            state.aimd.record(outcome, now, slot.started, in_flight);
            state.last_used = now;
            // The limit may have grown (let waiters in) or shrunk (now saturated).
            admit(&mut state, &slot.function, &slot.host, now)
        };
        deliver(grants);
    }

    fn done_at(mut self, outcome: Outcome, now: Instant) {
        self.record_at(outcome, now);
        if let Some(slot) = self.slot.take() {
            release(slot, now);
        }
    }
}

impl Drop for DownstreamPermit {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            release(slot, Instant::now());
        }
    }
}

fn release(slot: Slot, now: Instant) {
    let grants = {
        let mut state = slot.host.lock().expect(LOCK);
        assert!(state.in_flight > 0, "a permit was released twice");
        state.in_flight -= 1;
        state.last_used = now;
        admit(&mut state, &slot.function, &slot.host, now)
    };
    deliver(grants);
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use futures::FutureExt;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A closed-loop discrete-event simulation through the real registry: `clients` callers each
    /// take a permit, send, and take the next permit as soon as the answer comes. The downstream
    /// serves up to `capacity` requests at once, each for `SERVICE`; one beyond that is answered
    /// 503 after `REJECT`.
    struct Sim {
        registry: Downstreams,
        origin: Instant,
        now: Duration,
        capacity: u32,
        busy: u32,
        /// Callers waiting for a permit, in the order they asked.
        waiting: VecDeque<Acquire>,
        /// (time of the answer, sequence, request) — the sequence keeps the order deterministic.
        answers: BinaryHeap<Reverse<(Duration, u64, usize)>>,
        /// Requests in flight: their permit and whether the downstream accepted them.
        requests: Vec<Option<(DownstreamPermit, bool)>>,
        seq: u64,
        /// Every answer: (time, accepted?, limit after it was recorded).
        log: Vec<(Duration, bool, u32)>,
    }

    const SERVICE: Duration = Duration::from_millis(100);
    const REJECT: Duration = Duration::from_millis(1);

    impl Sim {
        fn new(clients: usize, capacity: u32) -> Self {
            let mut sim = Self {
                registry: Downstreams::new(),
                origin: Instant::now(),
                now: Duration::ZERO,
                capacity,
                busy: 0,
                waiting: VecDeque::new(),
                answers: BinaryHeap::new(),
                requests: Vec::new(),
                seq: 0,
                log: Vec::new(),
            };
            for _ in 0..clients {
                sim.ask();
            }
            sim.admit();
            sim
        }

        fn at(&self) -> Instant {
            self.origin + self.now
        }

        fn ask(&mut self) {
            let acquire = self.registry.acquire_at("t", "f", "db:5432", self.at());
            self.waiting.push_back(acquire);
        }

        /// Sends the request of every caller whose permit has been granted.
        fn admit(&mut self) {
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            let mut still = VecDeque::with_capacity(self.waiting.len());
            while let Some(mut acquire) = self.waiting.pop_front() {
                match acquire.poll_unpin(&mut cx) {
                    Poll::Ready(permit) => self.send(permit),
                    Poll::Pending => still.push_back(acquire),
                }
            }
            self.waiting = still;
        }

        fn send(&mut self, permit: DownstreamPermit) {
            let accepted = self.busy < self.capacity;
            let answer_in = if accepted {
                self.busy += 1;
                SERVICE
            } else {
                REJECT
            };
            self.requests.push(Some((permit, accepted)));
            self.seq += 1;
            self.answers.push(Reverse((self.now + answer_in, self.seq, self.requests.len() - 1)));
        }

        fn limit(&self) -> u32 {
            self.registry.snapshot_at("t", "f", self.at())[0].limit
        }

        fn run_until(&mut self, end: Duration) {
            while let Some(Reverse((at, _, _))) = self.answers.peek()
                && *at < end
            {
                let Some(Reverse((at, _, id))) = self.answers.pop() else { break };
                self.now = at;
                let (permit, accepted) = self.requests[id].take().expect("answered once");
                if accepted {
                    self.busy -= 1;
                }
                let outcome = if accepted { Outcome::Ok { latency: SERVICE } } else { Outcome::Overload };
                permit.done_at(outcome, self.at());
                self.log.push((at, accepted, self.limit()));
                self.ask();
                self.admit();
            }
            self.now = end;
        }

        /// (accepted, rejected, smallest limit, largest limit) of the answers in `[from, to)`.
        fn window(&self, from: Duration, to: Duration) -> (u64, u64, u32, u32) {
            let (mut ok, mut rejected, mut low, mut high) = (0, 0, u32::MAX, 0);
            for &(_, accepted, limit) in self.log.iter().filter(|(at, ..)| (from..to).contains(at)) {
                if accepted {
                    ok += 1
                } else {
                    rejected += 1
                }
                low = low.min(limit);
                high = high.max(limit);
            }
            (ok, rejected, low, high)
        }
    }

    /// The sawtooth of a downstream that serves `c` at once: the limit climbs by one per round
    /// trip to `c + 1`, where the one request too many is rejected, and halves.
    fn sawtooth(c: u32) -> (u32, u32) {
        (c.div_ceil(2), c + 1)
    }

    /// Successes per rejection on the sawtooth: every limit from the bottom to `c` is used for a
    /// round trip in full; at `c + 1`, one request is rejected and the limit halves.
    fn successes_per_rejection(c: u32) -> u64 {
        (sawtooth(c).0..=c).map(u64::from).sum()
    }

    #[test]
    fn aimd_converges_follows_a_shrinking_downstream_and_recovers_when_it_heals() {
        let c = 20;
        let clients = 60;
        let rtts = |n: u64| SERVICE * n as u32;
        let mut sim = Sim::new(clients, c);

        // Slow start finds the capacity in log2(c) round trips: the first rejection comes in
        // round trip 5 at the latest (2, 4, 8, 16, then past 20).
        sim.run_until(rtts(600));
        let first = sim.log.iter().find(|(_, accepted, _)| !accepted).expect("the capacity was found").0;
        assert!(first < rtts(5), "first overload at {first:?}");

        // Converged: the limit stays on the sawtooth, and rejections are one per tooth (plus the
        // teeth cut by either end of the window).
        let (lo, hi) = sawtooth(c);
        let (ok, rejected, low, high) = sim.window(rtts(10), rtts(600));
        assert!(low >= lo && high <= hi, "limit in [{low}, {high}], expected within [{lo}, {hi}]");
        assert!(rejected <= ok / successes_per_rejection(c) + 2, "{rejected} rejected to {ok} accepted");
        // ... while keeping at least half of the capacity busy (the sawtooth averages 3/4).
        let used = ok as f64 / (f64::from(c) * 590.0);
        assert!(used >= 0.5, "used {used:.2} of the capacity");

        // The downstream loses half its capacity: within 10 round trips the limit is on the new
        // sawtooth and stays there.
        let c2 = c / 2;
        sim.capacity = c2;
        sim.run_until(rtts(1200));
        let (lo2, hi2) = sawtooth(c2);
        let (ok2, rejected2, low2, high2) = sim.window(rtts(610), rtts(1200));
        assert!(low2 >= lo2 && high2 <= hi2, "limit in [{low2}, {high2}], expected within [{lo2}, {hi2}]");
        assert!(
            rejected2 <= ok2 / successes_per_rejection(c2) + 2,
            "{rejected2} rejected to {ok2} accepted after the drop"
        );
        // Adapting costs at most the requests of one round trip beyond the new capacity.
        let (_, rejected_in_drop, ..) = sim.window(rtts(600), rtts(610));
        assert!(rejected_in_drop <= u64::from(hi - c2), "{rejected_in_drop} rejected while adapting");

        // It heals: the limit climbs by one per round trip back above the old sawtooth's floor
        // and settles on it again.
        sim.capacity = c;
        sim.run_until(rtts(1800));
        let back = sim
            .log
            .iter()
            .find(|(at, _, limit)| *at >= rtts(1200) && *limit >= c)
            .expect("the limit grew back")
            .0;
        assert!(
            back - rtts(1200) <= rtts(u64::from(c - lo2 + 2)),
            "took {:?} to grow back",
            back - rtts(1200)
        );
        let (ok3, rejected3, low3, high3) = sim.window(rtts(1230), rtts(1800));
        assert!(low3 >= lo && high3 <= hi, "limit in [{low3}, {high3}], expected within [{lo}, {hi}]");
        assert!(rejected3 <= ok3 / successes_per_rejection(c) + 2, "{rejected3} rejected to {ok3} accepted");
    }

    #[test]
    fn slow_start_doubles_per_round_trip_until_the_first_overload() {
        let mut sim = Sim::new(2000, 300);
        for trip in 0..8u32 {
            // Between the answers of round trip `trip` and the next.
            sim.run_until(SERVICE * trip + SERVICE / 2);
            let state = &sim.registry.snapshot_at("t", "f", sim.at())[0];
            assert_eq!(state.limit, LIMIT_INITIAL << trip, "after {trip} round trips");
            assert_eq!(state.phase, Phase::SlowStart);
            assert_eq!(state.in_flight, state.limit, "the limit is used in full");
        }
        // Round trip 8 doubles it to 512, past the capacity of 300: the first rejection halves
        // it, once, though the round trip brought 212 of them (slow start overshoots by up to
        // one round trip's growth, as TCP's does).
        sim.run_until(SERVICE * 8 + SERVICE / 2);
        let state = &sim.registry.snapshot_at("t", "f", sim.at())[0];
        assert_eq!(state.phase, Phase::Avoidance);
        assert_eq!(state.overloads_total, 512 - 300);
        assert_eq!(state.limit, 512 / 2, "halved once");
    }

    #[test]
    fn an_episode_of_overloads_halves_once() {
        let t0 = Instant::now();
        let mut aimd = Aimd::new();
        for i in 0..30 {
            aimd.record(Outcome::Ok { latency: ms(50) }, t0, t0, 100 + i);
        }
        assert_eq!(aimd.limit(), 32);
        assert_eq!(aimd.cooldown(), COOLDOWN_MIN, "a 50 ms downstream gets the floor");

        // Ten rejections within the cooldown, each of a request sent after the one before it was
        // rejected (a guest retrying at once): one halving.
        let t1 = t0 + ms(1000);
        for i in 0..10 {
            let at = t1 + ms(i * 9);
            aimd.record(Outcome::Overload, at, at, 32);
        }
        assert_eq!((aimd.limit(), aimd.phase, aimd.overloads_total), (16, Phase::Avoidance, 10));

        // After the cooldown, an overload of a request sent before the halving still belongs to
        // the old episode ...
        aimd.record(Outcome::Overload, t1 + ms(500), t1 - ms(1), 16);
        assert_eq!(aimd.limit(), 16);
        // ... one sent after it is a new episode.
        aimd.record(Outcome::Overload, t1 + ms(500), t1 + ms(200), 16);
        assert_eq!(aimd.limit(), 8);
        // Neither are successes of requests sent before a halving evidence for growth.
        for _ in 0..100 {
            aimd.record(Outcome::Ok { latency: ms(50) }, t1 + ms(600), t1 + ms(300), 8);
        }
        assert_eq!(aimd.limit(), 8);

        // The floor holds, and other failures change nothing.
        let mut at = t1 + ms(1000);
        for _ in 0..10 {
            at += COOLDOWN_MAX;
            aimd.record(Outcome::Overload, at, at, 1);
            aimd.record(Outcome::Other, at, at, 1);
        }
        assert_eq!((aimd.limit(), aimd.others_total), (LIMIT_MIN, 10));
    }

    #[test]
    fn the_cooldown_follows_the_smoothed_latency_within_its_bounds() {
        let t0 = Instant::now();
        let mut aimd = Aimd::new();
        for _ in 0..100 {
            aimd.record(Outcome::Ok { latency: ms(400) }, t0, t0, 1);
        }
        assert_eq!(aimd.cooldown(), ms(400));
        aimd.record(Outcome::Ok { latency: ms(80) }, t0, t0, 1);
        assert_eq!(aimd.cooldown(), ms(360), "one sample moves the average by 1/8 of the difference");
        assert_eq!(aimd.latency_min, Some(ms(80)));
        for _ in 0..100 {
            aimd.record(Outcome::Ok { latency: Duration::from_secs(60) }, t0, t0, 1);
        }
        assert_eq!(aimd.cooldown(), COOLDOWN_MAX);
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        // One request at a time, for ever: the limit stops where it would double the use.
        let t0 = Instant::now();
        let mut aimd = Aimd::new();
        for _ in 0..10_000 {
            aimd.record(Outcome::Ok { latency: ms(5) }, t0, t0, 1);
        }
        assert_eq!(aimd.limit(), 3);
        assert_eq!(aimd.phase, Phase::SlowStart);
    }

    #[test]
    fn entries_are_capped_per_function_and_forgotten_when_idle() {
        let registry = Downstreams::new();
        let t0 = Instant::now();
        let mut permits = Vec::new();
        for port in 0..HOSTS_PER_FUNCTION_MAX {
            let p = registry.acquire_at("t", "f", &format!("h:{port}"), t0).now_or_never().expect("room");
            assert!(p.is_limited());
            permits.push(p);
        }
        // Past the cap: permits, but no entry and no limit.
        for _ in 0..10 {
            let p = registry.acquire_at("t", "f", "extra:1", t0).now_or_never().expect("unlimited");
            assert!(!p.is_limited());
            permits.push(p);
        }
        assert_eq!(registry.snapshot_at("t", "f", t0).len(), HOSTS_PER_FUNCTION_MAX);
        // Another function has its own cap.
        let other = registry.acquire_at("t", "g", "extra:1", t0).now_or_never().expect("room");
        assert!(other.is_limited());

        // Release all but one; after the idle time the rest are forgotten, the busy one kept.
        let busy = permits.remove(0);
        for p in permits {
            p.done_at(Outcome::Ok { latency: ms(1) }, t0);
        }
        other.done_at(Outcome::Other, t0);
        registry.sweep_at(t0 + ENTRY_IDLE_MAX - ms(1));
        assert_eq!(registry.snapshot_at("t", "f", t0).len(), HOSTS_PER_FUNCTION_MAX);
        registry.sweep_at(t0 + ENTRY_IDLE_MAX);
        let left = registry.snapshot_at("t", "f", t0);
        assert_eq!(left.iter().map(|s| s.host.as_str()).collect::<Vec<_>>(), ["h:0"]);
        assert!(registry.snapshot_at("t", "g", t0).is_empty());
        assert!(
            !registry.functions.read().unwrap().get("t").unwrap().contains_key("g"),
            "function forgotten"
        );
        drop(busy);

        // acquire sweeps by itself, at most once per interval.
        let later = t0 + ENTRY_IDLE_MAX * 2;
        registry
            .acquire_at("t", "f", "h:1", later)
            .now_or_never()
            .expect("room")
            .done_at(Outcome::Other, later);
        assert_eq!(
            registry.snapshot_at("t", "f", later).iter().map(|s| s.host.as_str()).collect::<Vec<_>>(),
            ["h:1"]
        );
    }

    #[tokio::test]
    async fn acquire_waits_when_saturated_and_wakes_in_order_when_a_slot_frees() {
        let registry = Arc::new(Downstreams::new());
        assert!(!registry.saturated("t", "f"));
        let first = registry.acquire("t", "f", "api:443").await;
        assert!(!registry.saturated("t", "f"), "1 of {LIMIT_INITIAL} in flight");
        let second = registry.acquire("t", "f", "api:443").await;
        assert!(registry.saturated("t", "f"), "at the limit");
        assert!(!registry.saturated("t", "g") && !registry.saturated("u", "f"), "only this function");

        // Two more wait, in order; one of them gives up.
        let third = tokio::spawn({
            let registry = registry.clone();
            async move { registry.acquire("t", "f", "api:443").await }
        });
        tokio::task::yield_now().await;
        let mut gives_up = registry.acquire("t", "f", "api:443");
        assert!((&mut gives_up).now_or_never().is_none());
        let fourth = registry.acquire("t", "f", "api:443");
        let state = &registry.snapshot("t", "f")[0];
        assert_eq!((state.in_flight, state.waiting), (2, 3));
        drop(gives_up);
        assert_eq!(registry.snapshot("t", "f")[0].waiting, 2, "its place is given up");
        assert!(!third.is_finished());

        // A cancelled request frees its slot without an outcome: the first waiter gets it.
        drop(first);
        let third = third.await.unwrap();
        let state = &registry.snapshot("t", "f")[0];
        assert_eq!((state.in_flight, state.waiting, state.limit), (2, 1, LIMIT_INITIAL));
        assert_eq!(state.successes_total + state.overloads_total + state.others_total, 0);

        // A success grows the limit (slow start): the last waiter gets in without anyone leaving.
        let mut second = second;
        second.record(Outcome::Ok { latency: ms(3) });
        let fourth = fourth.now_or_never().expect("let in by the larger limit");
        let state = &registry.snapshot("t", "f")[0];
        assert_eq!((state.limit, state.in_flight, state.waiting), (3, 3, 0));
        assert!(registry.saturated("t", "f"));

        // An overload halves it: nobody new gets in until in-flight is below the new limit.
        third.done(Outcome::Overload);
        assert_eq!(registry.snapshot("t", "f")[0].limit, 1);
        assert!(registry.saturated("t", "f"));
        drop(second);
        assert!(registry.saturated("t", "f"), "1 in flight at a limit of 1");
        drop(fourth);
        assert!(!registry.saturated("t", "f"));
        let state = &registry.snapshot("t", "f")[0];
        assert_eq!((state.in_flight, state.successes_total, state.overloads_total), (0, 1, 1));
        assert!(state.last_decrease_ago_ms.is_some());
    }
}
