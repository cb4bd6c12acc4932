//! What a node counts per served version for the rollouts (see [`rollout`](crate::rollout)): a
//! leaf, so the registry (`node`) that holds the counters and the rollout driver that reads them
//! do not import each other.

use std::sync::atomic::{AtomicU64, Ordering};

use sluice_runtime::metrics::CallOutcome;

/// One version's sync calls and the ones that failed (5xx answers and calls that failed: traps,
/// timeouts, memory limits, no response, platform errors). A client that went away and a 4xx do
/// not count as errors of the version.
#[derive(Debug, Default)]
pub struct VersionOutcomes {
    calls: AtomicU64,
    errors: AtomicU64,
}

impl VersionOutcomes {
    pub fn finished(&self, outcome: CallOutcome) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if is_error(outcome) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What was counted since the last take: `(calls, errors)`. The driver is its one reader.
    pub(crate) fn take(&self) -> (u64, u64) {
        (self.calls.swap(0, Ordering::Relaxed), self.errors.swap(0, Ordering::Relaxed))
    }
}

fn is_error(outcome: CallOutcome) -> bool {
    !matches!(outcome, CallOutcome::Ok | CallOutcome::ClientError | CallOutcome::ClientClosed)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(o.take(), (0, 0), "a take empties the counts");
    }
}
