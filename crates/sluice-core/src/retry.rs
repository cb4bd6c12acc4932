//! What happens after a failed async attempt: retry later (exponential backoff with jitter) or
//! give up (`dead`). Pure, so the scheduler's decisions can be property-tested.

use crate::UnixMs;

/// First retry delay (DESIGN.md section 6: 1 s doubling to 5 min).
pub const BACKOFF_INITIAL_MS: u64 = 1_000;
pub const BACKOFF_MAX_MS: u64 = 5 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts_max: u32,
    pub max_age_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl RetryPolicy {
    pub fn new(attempts_max: u32, max_age_ms: u64) -> Self {
        Self {
            attempts_max,
            max_age_ms,
            backoff_initial_ms: BACKOFF_INITIAL_MS,
            backoff_max_ms: BACKOFF_MAX_MS,
        }
    }

    /// The delay before the attempt after `attempt` (1-based): `initial * 2^(attempt-1)`, capped,
    /// with "equal jitter": half fixed, half random, so retries of a burst spread out but never
    /// come back sooner than half the backoff. `jitter` is uniform in `[0, 1)`.
    pub fn backoff_ms(&self, attempt: u32, jitter: f64) -> u64 {
        let exp = attempt.saturating_sub(1).min(32);
        let base = self.backoff_initial_ms.saturating_mul(1u64 << exp).min(self.backoff_max_ms);
        let half = base / 2;
        half + (half as f64 * jitter.clamp(0.0, 1.0)) as u64
    }

    /// Decides after attempt number `attempt` failed with a retryable error.
    pub fn after_failure(&self, attempt: u32, created_at: UnixMs, now: UnixMs, jitter: f64) -> Next {
        if attempt >= self.attempts_max {
            return Next::Dead;
        }
        let at = now.saturating_add(self.backoff_ms(attempt, jitter) as i64);
        if at > created_at.saturating_add(self.max_age_ms as i64) {
            return Next::Dead;
        }
        Next::RetryAt(at)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    RetryAt(UnixMs),
    Dead,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_from_one_second_to_five_minutes() {
        let p = RetryPolicy::new(20, u64::MAX / 4);
        assert_eq!(p.backoff_ms(1, 0.0), 500);
        assert_eq!(p.backoff_ms(1, 0.999_999), 999);
        assert_eq!(p.backoff_ms(2, 0.0), 1_000);
        assert_eq!(p.backoff_ms(3, 0.0), 2_000);
        assert_eq!(p.backoff_ms(30, 0.0), BACKOFF_MAX_MS / 2);
    }

    proptest! {
        #[test]
        fn never_retries_past_attempts_or_age(
            attempts_max in 1u32..10, attempt in 1u32..12, age in 0u64..100_000_000,
            created in 0i64..1_000_000, elapsed in 0i64..100_000_000, jitter in 0.0f64..1.0,
        ) {
            let p = RetryPolicy::new(attempts_max, age);
            let now = created + elapsed;
            match p.after_failure(attempt, created, now, jitter) {
                Next::RetryAt(at) => {
                    prop_assert!(attempt < attempts_max);
                    prop_assert!(at > now);
                    prop_assert!(at <= created + age as i64);
                    prop_assert!(at - now >= (p.backoff_ms(attempt, 0.0)) as i64);
                }
                Next::Dead => prop_assert!(attempt >= attempts_max || now + p.backoff_ms(attempt, jitter) as i64 > created + age as i64),
            }
        }
    }
}
