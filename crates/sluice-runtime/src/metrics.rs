//! What a function's calls count for `/metrics`: per (tenant, function) handles, made once when a
//! version is installed, so that a call records with atomic adds and no lookup, lock or label
//! allocation. Counters go to the process's recorder (`metrics`' global one; without one
//! installed every count is a no-op). Histograms are this module's own [`Histogram`]: fixed
//! buckets of atomic counters, rendered by [`render_histograms`]. (The exporter's histograms keep
//! every sample in a growing lock-free list until a scrape drains it: an allocation per few
//! dozen calls, and memory that grows without bound on a node nobody scrapes.)
//!
//! Label sets are bounded: only the first [`set_function_series_max`] (tenant, function) pairs of
//! the process get their own series; later ones are counted under `tenant="_other",
//! function="_other"`, and `sluice_metrics_functions_folded_total` says how many were folded.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use std::sync::Arc;

use metrics::{Counter, counter};
pub use sluice_core::metrics::{Histogram, histogram, render_histograms};
use sluice_core::{ErrorKind, Mode};

/// (tenant, function) pairs with their own series, at most.
static SERIES_MAX: AtomicUsize = AtomicUsize::new(1000);
static LABELED: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);

/// Where pairs beyond the bound are counted.
pub const FOLDED: &str = "_other";

/// Sets how many (tenant, function) pairs get their own series (the rest share `_other`).
pub fn set_function_series_max(max: usize) {
    SERIES_MAX.store(max, Ordering::Relaxed);
}

/// How a call (an attempt, for async calls) ended: a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The guest answered 1xx–3xx.
    Ok = 0,
    /// The guest answered 4xx.
    ClientError,
    /// The guest answered 5xx.
    ServerError,
    Timeout,
    Trap,
    MemoryLimit,
    /// The guest returned without a response.
    NoResponse,
    /// The client went away (sync) before the call ended.
    ClientClosed,
    /// Anything else (the platform failed the call).
    Error,
}

const OUTCOMES: usize = 9;

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Trap => "trap",
            Self::MemoryLimit => "memory_limit",
            Self::NoResponse => "no_response",
            Self::ClientClosed => "client_closed",
            Self::Error => "error",
        }
    }

    /// Whether the call counts as a failure of the version that ran it (for rollouts and
    /// `sluice_version_errors_total`): not for a 4xx, nor for a client that went away.
    pub fn is_error_of_the_version(self) -> bool {
        !matches!(self, Self::Ok | Self::ClientError | Self::ClientClosed)
    }

    /// From what the runtime reported: its error, else the status the guest set.
    pub fn of(error: Option<ErrorKind>, status: Option<u16>) -> Self {
        match error {
            Some(ErrorKind::Timeout) => Self::Timeout,
            Some(ErrorKind::Trap) => Self::Trap,
            Some(ErrorKind::MemoryLimit) => Self::MemoryLimit,
            Some(ErrorKind::NoResponse) => Self::NoResponse,
            Some(ErrorKind::ClientClosed) => Self::ClientClosed,
            Some(_) => Self::Error,
            None => Self::of_status(status.unwrap_or(200)),
        }
    }

    pub fn of_status(status: u16) -> Self {
        match status {
            500.. => Self::ServerError,
            400.. => Self::ClientError,
            _ => Self::Ok,
        }
    }

    /// From an async attempt's recorded error kind (`ErrorKind` names, or `server_error`).
    pub fn of_error_kind(kind: &str, status: Option<u16>) -> Self {
        match ErrorKind::parse(kind) {
            Some(k) => Self::of(Some(k), status),
            None if kind == "server_error" => Self::ServerError,
            None => Self::Error,
        }
    }
}

/// The handles of one function's series.
pub struct CallMetrics {
    tenant: String,
    function: String,
    /// `sluice_invocations_total`, by kind and outcome, made on first use.
    outcomes: [[OnceLock<Counter>; OUTCOMES]; 2],
    /// From arrival (sync) or enqueue (async) to the end.
    duration: [Arc<Histogram>; 2],
    /// The guest's run, from instantiation to the end of its response.
    run: [Arc<Histogram>; 2],
    /// Time on a thread.
    cpu: [Arc<Histogram>; 2],
    /// From runnable to started (async).
    queue_wait: Arc<Histogram>,
}

impl CallMetrics {
    pub fn new(tenant: &str, function: &str) -> Self {
        let (tenant, function) = if claim(tenant, function) {
            (tenant.to_string(), function.to_string())
        } else {
            (FOLDED.to_string(), FOLDED.to_string())
        };
        let by_kind = |name: &'static str| {
            Mode::ALL.map(|k| {
                histogram(name, &[("tenant", &tenant), ("function", &function), ("kind", k.as_str())])
            })
        };
        Self {
            duration: by_kind("sluice_invocation_duration_seconds"),
            run: by_kind("sluice_invocation_run_seconds"),
            cpu: by_kind("sluice_invocation_cpu_seconds"),
            queue_wait: histogram(
                "sluice_invocation_queue_wait_seconds",
                &[("tenant", &tenant), ("function", &function)],
            ),
            outcomes: Default::default(),
            tenant,
            function,
        }
    }

    /// Counts one finished call (or async attempt).
    pub fn finished(&self, kind: Mode, outcome: CallOutcome, total: Duration, run: Duration, cpu_us: u64) {
        let k = kind as usize;
        self.outcomes[k][outcome as usize]
            .get_or_init(|| {
                counter!(
                    "sluice_invocations_total",
                    "tenant" => self.tenant.clone(),
                    "function" => self.function.clone(),
                    "kind" => kind.as_str(),
                    "outcome" => outcome.as_str()
                )
            })
            .increment(1);
        self.duration[k].record_duration(total);
        self.run[k].record_duration(run);
        self.cpu[k].record_duration(Duration::from_micros(cpu_us));
    }

    /// Records how long an async call waited in the queue before it started.
    pub fn started_after(&self, waited: Duration) {
        self.queue_wait.record_duration(waited);
    }
}

impl CallMetrics {
    /// The (tenant, function) labels of these series, or `None` when they are folded under
    /// [`FOLDED`] (series keyed by more than the function, such as its versions', are then left
    /// out: the bound holds for them too).
    pub fn labels(&self) -> Option<(&str, &str)> {
        (self.function != FOLDED || self.tenant != FOLDED).then_some((&self.tenant, &self.function))
    }
}

/// One version's calls (sync calls and async attempts) and the ones that failed: 5xx answers and
/// calls that failed (traps, timeouts, memory limits, no response, platform errors). A client
/// that went away and a 4xx are not errors of the version. Two monotonic totals, read by
/// `/metrics` (`sluice_version_invocations_total`, `sluice_version_errors_total`), and what a
/// rollout judges a canary by, taken as differences by its one reader.
#[derive(Debug, Default)]
pub struct VersionOutcomes {
    calls: AtomicU64,
    errors: AtomicU64,
    taken_calls: AtomicU64,
    taken_errors: AtomicU64,
}

impl VersionOutcomes {
    pub fn finished(&self, outcome: CallOutcome) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if outcome.is_error_of_the_version() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(calls, errors)` since this version was installed on the node.
    pub fn totals(&self) -> (u64, u64) {
        (self.calls.load(Ordering::Relaxed), self.errors.load(Ordering::Relaxed))
    }

    /// What was counted since the last take: `(calls, errors)`. Meant for one reader (a node's
    /// rollout driver); the totals are left as they are.
    pub fn take(&self) -> (u64, u64) {
        let (calls, errors) = self.totals();
        let since =
            |total: u64, taken: &AtomicU64| total.saturating_sub(taken.swap(total, Ordering::Relaxed));
        (since(calls, &self.taken_calls), since(errors, &self.taken_errors))
    }
}

/// Where an async attempt is counted: its function's series and, when the node serves that
/// version, the version's own counts.
pub struct Counting {
    pub calls: Arc<CallMetrics>,
    pub version: Option<Arc<VersionOutcomes>>,
}

/// Whether (tenant, function) gets its own series in this process.
fn claim(tenant: &str, function: &str) -> bool {
    let mut labeled = LABELED.lock().expect("metrics label lock");
    let claimed = claim_in(
        labeled.get_or_insert_with(HashSet::new),
        SERIES_MAX.load(Ordering::Relaxed),
        tenant,
        function,
    );
    if !claimed {
        counter!("sluice_metrics_functions_folded_total").increment(1);
    }
    claimed
}

/// Whether (tenant, function) has its own series in `labeled`: it already has, or there are fewer
/// than `max` and it is added.
fn claim_in(labeled: &mut HashSet<(String, String)>, max: usize, tenant: &str, function: &str) -> bool {
    let key = (tenant.to_string(), function.to_string());
    if labeled.contains(&key) {
        return true;
    }
    if labeled.len() < max {
        labeled.insert(key);
        return true;
    }
    false
}

/// Counts an outbound request of a guest by how it ended: `ok` (a response), `overload` (429,
/// 503 or 504), `error` (no response: refused, reset, timed out), `denied` (not allowed, or over
/// the per-invocation count).
pub fn outbound(outcome: &'static str) {
    static HANDLES: OnceLock<[(&'static str, Counter); 4]> = OnceLock::new();
    let handles = HANDLES.get_or_init(|| {
        ["ok", "overload", "error", "denied"]
            .map(|o| (o, counter!("sluice_outbound_requests_total", "outcome" => o)))
    });
    if let Some((_, c)) = handles.iter().find(|(o, _)| *o == outcome) {
        c.increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labeled_functions_stop_at_the_bound_and_keep_their_place() {
        let mut labeled = HashSet::new();
        assert!(claim_in(&mut labeled, 2, "a", "f"));
        assert!(claim_in(&mut labeled, 2, "b", "f"));
        assert!(!claim_in(&mut labeled, 2, "b", "g"), "a third pair is folded");
        assert!(claim_in(&mut labeled, 2, "a", "f"), "a pair that has its series keeps them");
        assert_eq!(labeled.len(), 2);
    }

    #[test]
    fn client_errors_and_closed_clients_are_not_errors_of_the_version() {
        let o = VersionOutcomes::default();
        for outcome in [
            CallOutcome::Ok,
            CallOutcome::ClientError,
            CallOutcome::ClientClosed,
            CallOutcome::ServerError,
            CallOutcome::Trap,
            CallOutcome::Timeout,
        ] {
            o.finished(outcome);
        }
        assert_eq!(o.take(), (6, 3));
        assert_eq!(o.take(), (0, 0), "a take counts from the last one");
        o.finished(CallOutcome::MemoryLimit);
        assert_eq!(o.take(), (1, 1));
        assert_eq!(o.totals(), (7, 4), "takes leave the totals /metrics reads");
    }

    #[test]
    fn outcomes_map_errors_and_statuses() {
        assert_eq!(CallOutcome::of(None, Some(204)), CallOutcome::Ok);
        assert_eq!(CallOutcome::of(None, Some(404)), CallOutcome::ClientError);
        assert_eq!(CallOutcome::of(None, Some(503)), CallOutcome::ServerError);
        assert_eq!(CallOutcome::of(Some(ErrorKind::Timeout), Some(200)), CallOutcome::Timeout);
        assert_eq!(CallOutcome::of(Some(ErrorKind::Internal), None), CallOutcome::Error);
        assert_eq!(CallOutcome::of_error_kind("server_error", Some(500)), CallOutcome::ServerError);
        assert_eq!(CallOutcome::of_error_kind("trap", None), CallOutcome::Trap);
        assert_eq!(CallOutcome::of_error_kind("lease_lost", None), CallOutcome::Error);
    }
}
