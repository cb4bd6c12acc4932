//! Why an invocation waited: every round records, per tenant and class (and per function for a
//! saturated downstream), the reason work was left waiting; when an invocation is leased, the
//! time since it became runnable is split by the reasons that were in force meanwhile.
//!
//! Memory is bounded: a key keeps its last [`INTERVALS_PER_KEY_MAX`] intervals (older waits are
//! reported as unexplained, never wrongly), and keys are tenants' classes and functions, which
//! the store bounds.

use std::collections::{HashMap, VecDeque};

use sluice_core::UnixMs;
use sluice_store::LeaseClass;

use crate::plan::WaitReason;

/// Intervals kept per key.
pub const INTERVALS_PER_KEY_MAX: usize = 512;

/// A key: `(tenant, class)` or, for downstream holds, `(tenant, function)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Class(String, LeaseClass),
    Function(String, String),
}

#[derive(Debug, Clone, Copy)]
struct Interval {
    from: UnixMs,
    to: UnixMs,
    reason: WaitReason,
}

/// The hold intervals of every key.
#[derive(Debug, Default)]
pub struct HoldLog {
    log: HashMap<Key, VecDeque<Interval>>,
}

impl HoldLog {
    /// Records that in the round from `from` to `now` the tenant's work of `class` waited for
    /// `reason`; consecutive rounds with the same reason extend one interval.
    pub fn held(&mut self, tenant: &str, class: LeaseClass, reason: WaitReason, from: UnixMs, now: UnixMs) {
        self.push(Key::Class(tenant.to_string(), class), reason, from, now);
    }

    /// Records that a function's calls were not started in the round because of a downstream.
    pub fn held_downstream(&mut self, tenant: &str, function: &str, from: UnixMs, now: UnixMs) {
        self.push(Key::Function(tenant.to_string(), function.to_string()), WaitReason::Downstream, from, now);
    }

    fn push(&mut self, key: Key, reason: WaitReason, from: UnixMs, now: UnixMs) {
        let intervals = self.log.entry(key).or_default();
        if let Some(last) = intervals.back_mut()
            && last.reason == reason
            && last.to >= from
        {
            last.to = last.to.max(now);
            return;
        }
        if intervals.len() == INTERVALS_PER_KEY_MAX {
            intervals.pop_front();
        }
        intervals.push_back(Interval { from, to: now, reason });
    }

    /// Milliseconds by reason that an invocation of `tenant/function` runnable since `since`
    /// waited until `now`, with `queued_ms` the whole wait; as a JSON object. `None` when no
    /// reason was in force: the lease itself records `queued_ms` alone, in the same update that
    /// starts the attempt, so most calls cost no second write.
    pub fn explain(
        &self,
        tenant: &str,
        function: &str,
        windowed: bool,
        since: UnixMs,
        now: UnixMs,
    ) -> Option<String> {
        let mut by_reason: [i64; 4] = [0; 4];
        let class = if windowed { LeaseClass::Deferrable } else { LeaseClass::Plain };
        let mut add = |key: &Key| {
            for i in self.log.get(key).into_iter().flatten() {
                let overlap = i.to.min(now) - i.from.max(since);
                if overlap > 0 {
                    let at =
                        WaitReason::ALL.iter().position(|r| *r == i.reason).expect("every reason is in ALL");
                    by_reason[at] += overlap;
                }
            }
        };
        add(&Key::Class(tenant.to_string(), class));
        add(&Key::Function(tenant.to_string(), function.to_string()));
        if by_reason.iter().all(|ms| *ms == 0) {
            return None;
        }
        let total = (now - since).max(0);
        let mut out = serde_json::Map::new();
        out.insert("queued_ms".into(), total.into());
        for (reason, ms) in WaitReason::ALL.iter().zip(by_reason) {
            if ms > 0 {
                out.insert(format!("{}_ms", reason.as_str()), ms.min(total).into());
            }
        }
        Some(serde_json::Value::Object(out).to_string())
    }

    /// Forgets intervals that ended before `before` (nothing runnable that long ago is waiting
    /// still, past every deadline and max age that matter).
    pub fn forget_before(&mut self, before: UnixMs) {
        self.log.retain(|_, intervals| {
            while intervals.front().is_some_and(|i| i.to < before) {
                intervals.pop_front();
            }
            !intervals.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_split_by_the_reasons_in_force() {
        let mut log = HoldLog::default();
        log.held("a", LeaseClass::Plain, WaitReason::Utilization, 1_000, 1_100);
        log.held("a", LeaseClass::Plain, WaitReason::Utilization, 1_100, 1_500);
        log.held("a", LeaseClass::Plain, WaitReason::Quota, 1_500, 1_700);
        log.held_downstream("a", "f", 1_600, 1_900);
        log.held("b", LeaseClass::Plain, WaitReason::Quota, 0, 5_000);
        let got: serde_json::Value =
            serde_json::from_str(&log.explain("a", "f", false, 1_200, 2_000).unwrap()).unwrap();
        assert_eq!(
            got,
            serde_json::json!({"queued_ms": 800, "utilization_ms": 300, "quota_ms": 200, "downstream_ms": 300})
        );
        // Another function of the same tenant was not held by the downstream.
        let got: serde_json::Value =
            serde_json::from_str(&log.explain("a", "g", false, 1_200, 2_000).unwrap()).unwrap();
        assert_eq!(got, serde_json::json!({"queued_ms": 800, "utilization_ms": 300, "quota_ms": 200}));
        // Nothing held tenant c: the lease's own queued_ms says it all.
        assert_eq!(log.explain("c", "f", false, 1_200, 2_000), None);
    }

    #[test]
    fn the_log_is_bounded() {
        let mut log = HoldLog::default();
        for i in 0..(INTERVALS_PER_KEY_MAX as i64 * 2) {
            // Alternating reasons: every round a new interval.
            let reason = if i % 2 == 0 { WaitReason::Quota } else { WaitReason::Utilization };
            log.held("a", LeaseClass::Plain, reason, i * 10, i * 10 + 10);
        }
        assert_eq!(log.log.values().next().unwrap().len(), INTERVALS_PER_KEY_MAX);
        log.forget_before(i64::MAX);
        assert!(log.log.is_empty());
    }
}
