//! sluice-core: the vocabulary every other crate shares — error kinds, limits and their
//! defaults, function configuration, identifiers and the parsing of human units.
//!
//! This crate does no I/O and depends on no runtime, store or HTTP server: it is the one place
//! where a limit gets its name and default, and where an error gets its kind.
#![forbid(unsafe_code)]

pub mod alias;
pub mod error;
pub mod function;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod retry;
pub mod schedule;
pub mod secret;
pub mod share;
pub mod trigger;
pub mod units;
pub mod vocab;

pub use error::{ErrorKind, ErrorSource, SluiceError};
pub use function::FunctionConfig;
pub use limits::{Limits, OwnUsageLimits, UsageLimits};
pub use secret::Secrets;
pub use vocab::{
    Catchup, Criticality, InvocationStatus, LogStream, Mode, Overlap, RolloutStatus, Scope, UnknownWord,
};

/// Milliseconds since the Unix epoch; the store keeps every timestamp in this unit so SQLite and
/// PostgreSQL compare them the same way.
pub type UnixMs = i64;

/// A source of "now", injected so lease, retry and deadline logic can be tested without sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> UnixMs;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMs {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("system clock is after 1970");
        i64::try_from(now.as_millis()).expect("time fits in i64 milliseconds")
    }
}

/// Formats unix milliseconds as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(ms: UnixMs) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let t = t.replace_nanosecond((ms.rem_euclid(1000) as u32) * 1_000_000).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| ms.to_string())
}

/// Parses an RFC 3339 timestamp into unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<UnixMs> {
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_milliseconds() {
        let ms = 1_763_755_200_123;
        let s = rfc3339(ms);
        assert_eq!(s, "2025-11-21T20:00:00.123Z");
        assert_eq!(parse_rfc3339(&s), Some(ms));
        assert_eq!(parse_rfc3339("2025-11-21T21:00:00+01:00"), Some(1_763_755_200_000));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
