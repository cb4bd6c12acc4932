//! When a schedule fires ([`When`]) and what it does about overlapping and missed occurrences
//! ([`Overlap`], [`Catchup`]): parsing, validation and the arithmetic of occurrences. No I/O and
//! no clock: every function takes the instant it reasons from, so the ticker and the tests agree.
//!
//! Cron expressions are read by `croner` with the seconds field optional (5 fields: minutes
//! first; 6 fields: seconds first) and evaluated in an IANA time zone from `chrono-tz`. Over DST
//! changes they behave as Vixie cron and the Open Cron Pattern Specification say: a fixed time
//! that falls in a spring-forward gap runs at the first minute after the gap, once; a fixed time
//! in a fall-back overlap runs once, at its first pass; wildcard and step fields (`*/5`) follow the
//! wall clock, so they skip the gap and run in both passes of the overlap.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

use crate::UnixMs;
pub use crate::vocab::{Catchup, Overlap};

/// The shortest interval between two occurrences of a schedule (`--every`, and two consecutive
/// cron occurrences): the ticker looks for due occurrences a few times a second, and each one is
/// a transaction and an invocation.
pub const SCHEDULE_INTERVAL_MS_MIN: u64 = 1_000;
/// The longest `--every`: a year. Longer gaps are a cron expression's or a one-time schedule's.
pub const SCHEDULE_INTERVAL_MS_MAX: u64 = 366 * 86_400_000;
/// The widest `--flex` (the invocations' start window): a day, like the widest rollout step.
pub const SCHEDULE_FLEX_MS_MAX: u64 = 86_400_000;
/// Most missed occurrences `--catchup all` enqueues after an outage (the most recent ones): a
/// schedule every second that was down ten minutes must not flood its function with 600 calls.
pub const CATCHUP_ALL_MAX: usize = 100;
/// The default of how late an occurrence may be and still count as on time (`serve
/// --schedule-missed-after`): longer than any healthy tick takes, shorter than an outage anyone
/// would call one.
pub const MISSED_AFTER_MS: UnixMs = 5_000;
/// The default of how far ahead of an occurrence a node may enqueue it (`serve
/// --schedule-fire-ahead`), runnable at the occurrence: long enough to store a burst of ten
/// thousand schedules due in one second before that second, short enough that a change of the
/// alias or a pause just before an occurrence still applies to it (a pause takes it back).
pub const FIRE_AHEAD_MS: UnixMs = 5_000;
/// Most occurrences `backfill` enqueues in one call.
pub const BACKFILL_MAX: usize = 1_000;
/// Where the check of a cron expression's frequency starts (2026-01-01T00:00Z): any instant
/// does, since only a seconds field makes two occurrences closer than a minute.
const CHECKED_FROM_MS: UnixMs = 1_767_225_600_000;
/// Most bytes of a cron expression.
pub const CRON_BYTES_MAX: usize = 256;
/// Most next fire times `show` lists.
pub const NEXT_FIRES_SHOWN: usize = 5;

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// A cron expression (seconds optional) in an IANA time zone.
    Cron { expr: String, tz: String },
    /// Every `every_ms`, at the multiples of it since the Unix epoch (so `30s` fires at :00 and
    /// :30 of each minute, on every node alike).
    Every { every_ms: u64 },
    /// Once.
    At { at: UnixMs },
}

/// A [`When`] checked and ready to compute occurrences.
#[derive(Debug, Clone)]
pub struct Timetable {
    when: When,
    cron: Option<(Cron, Tz)>,
}

impl When {
    /// Checks it and compiles the cron expression and zone: a message a person can act on if not.
    pub fn timetable(&self) -> Result<Timetable, String> {
        match self {
            When::Cron { expr, tz } => {
                if expr.len() > CRON_BYTES_MAX {
                    return Err(format!("a cron expression has at most {CRON_BYTES_MAX} bytes"));
                }
                let cron = CronParser::builder()
                    .seconds(Seconds::Optional)
                    .build()
                    .parse(expr)
                    .map_err(|e| format!("cron expression {expr:?}: {e}"))?;
                let zone = Tz::from_str(tz).map_err(|_| {
                    format!("unknown time zone {tz:?}: use an IANA name such as UTC or Europe/Berlin")
                })?;
                let table = Timetable { when: self.clone(), cron: Some((cron, zone)) };
                // Two consecutive occurrences closer than the minimum anywhere in a year would
                // show up in the first few: the only fields that make them are seconds ones.
                let mut from = CHECKED_FROM_MS;
                let mut previous = None;
                for _ in 0..4 {
                    let Some(next) = table.next_after(from) else { break };
                    if let Some(p) = previous
                        && next - p < SCHEDULE_INTERVAL_MS_MIN as i64
                    {
                        return Err(format!(
                            "cron expression {expr:?} fires more often than once per {} ms",
                            SCHEDULE_INTERVAL_MS_MIN
                        ));
                    }
                    previous = Some(next);
                    from = next;
                }
                if previous.is_none() {
                    return Err(format!("cron expression {expr:?} never fires"));
                }
                Ok(table)
            }
            When::Every { every_ms } => {
                if !(SCHEDULE_INTERVAL_MS_MIN..=SCHEDULE_INTERVAL_MS_MAX).contains(every_ms) {
                    // In the units a person writes (`--every 500ms`), and in the API's field's.
                    let d = |ms: u64| crate::units::format_duration(std::time::Duration::from_millis(ms));
                    return Err(format!(
                        // The most in whole days: humantime would say "1year 18h".
                        "the interval (every_ms) must be from {} to {}d, not {} ({every_ms} ms)",
                        d(SCHEDULE_INTERVAL_MS_MIN),
                        SCHEDULE_INTERVAL_MS_MAX / 86_400_000,
                        d(*every_ms)
                    ));
                }
                Ok(Timetable { when: self.clone(), cron: None })
            }
            When::At { at } => {
                if *at <= 0 {
                    return Err("at must be after 1970".into());
                }
                Ok(Timetable { when: self.clone(), cron: None })
            }
        }
    }
}

impl Timetable {
    pub fn when(&self) -> &When {
        &self.when
    }

    /// The first occurrence strictly after `t`, if there is one.
    pub fn next_after(&self, t: UnixMs) -> Option<UnixMs> {
        match &self.when {
            When::Every { every_ms } => {
                let every = *every_ms as i64;
                Some((t.div_euclid(every) + 1).saturating_mul(every))
            }
            When::At { at } => (*at > t).then_some(*at),
            When::Cron { .. } => {
                let (cron, zone) = self.cron.as_ref()?;
                let from = zone.from_utc_datetime(&utc(t)?.naive_utc());
                cron.find_next_occurrence(&from, false).ok().map(|d| d.timestamp_millis())
            }
        }
    }

    /// The last occurrence at or before `t`, if there is one.
    pub fn last_at_or_before(&self, t: UnixMs) -> Option<UnixMs> {
        match &self.when {
            When::Every { every_ms } => {
                let every = *every_ms as i64;
                Some(t.div_euclid(every).saturating_mul(every))
            }
            When::At { at } => (*at <= t).then_some(*at),
            When::Cron { .. } => {
                let (cron, zone) = self.cron.as_ref()?;
                let from = zone.from_utc_datetime(&utc(t)?.naive_utc());
                cron.find_previous_occurrence(&from, true).ok().map(|d| d.timestamp_millis())
            }
        }
    }

    /// The occurrences in `[from, to]`, in order, at most `max`.
    pub fn between(&self, from: UnixMs, to: UnixMs, max: usize) -> Vec<UnixMs> {
        let mut out = Vec::new();
        let mut t = from.saturating_sub(1);
        while out.len() < max {
            match self.next_after(t) {
                Some(next) if next <= to => {
                    out.push(next);
                    t = next;
                }
                _ => break,
            }
        }
        out
    }

    /// The most recent occurrences in `[from, to]`, in order, at most `max` (walking back from
    /// `to`, so an outage of a year costs `max` steps, not a year's).
    pub fn latest_between(&self, from: UnixMs, to: UnixMs, max: usize) -> Vec<UnixMs> {
        let mut out = Vec::new();
        let mut t = to;
        while out.len() < max {
            match self.last_at_or_before(t) {
                Some(last) if last >= from => {
                    out.push(last);
                    t = last - 1;
                }
                _ => break,
            }
        }
        out.reverse();
        out
    }
}

fn utc(t: UnixMs) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_millis(t)
}

/// What one tick does with a schedule's due occurrences (from its next fire time up to `now`,
/// oldest first), by the catch-up policy. The most recent one is the current occurrence, on time
/// unless it is more than `missed_after_ms` late; every older one was missed. `all` keeps them
/// all (the most recent [`CATCHUP_ALL_MAX`]); `latest` keeps the most recent only, on time or
/// not; `none` keeps it only if it is on time. Returns the occurrences to enqueue, oldest first,
/// and how many are dropped.
pub fn catch_up(policy: Catchup, due: &[UnixMs], now: UnixMs, missed_after_ms: UnixMs) -> (Vec<UnixMs>, u64) {
    let kept: Vec<UnixMs> = match (policy, due.last()) {
        (_, None) => Vec::new(),
        (Catchup::All, Some(_)) => due[due.len().saturating_sub(CATCHUP_ALL_MAX)..].to_vec(),
        (Catchup::Latest, Some(last)) => vec![*last],
        (Catchup::None, Some(last)) if now - *last <= missed_after_ms => vec![*last],
        (Catchup::None, Some(_)) => Vec::new(),
    };
    let dropped = (due.len() - kept.len()) as u64;
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> UnixMs {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis()
    }

    fn cron(expr: &str, tz: &str) -> Timetable {
        When::Cron { expr: expr.into(), tz: tz.into() }.timetable().unwrap()
    }

    #[test]
    fn cron_with_and_without_seconds() {
        let five = cron("*/5 * * * *", "UTC");
        assert_eq!(five.next_after(ms("2026-03-01T10:02:00Z")), Some(ms("2026-03-01T10:05:00Z")));
        let secs = cron("*/10 * * * * *", "UTC");
        assert_eq!(secs.next_after(ms("2026-03-01T10:02:03Z")), Some(ms("2026-03-01T10:02:10Z")));
        assert_eq!(secs.last_at_or_before(ms("2026-03-01T10:02:10Z")), Some(ms("2026-03-01T10:02:10Z")));
    }

    #[test]
    fn a_fixed_time_in_the_spring_gap_runs_once_after_it_and_once_in_the_autumn_overlap() {
        // Europe/Berlin: 2026-03-29 02:00 CET jumps to 03:00 CEST; 2026-10-25 03:00 CEST falls
        // back to 02:00 CET.
        let at_0230 = cron("30 2 * * *", "Europe/Berlin");
        let spring = at_0230.between(ms("2026-03-28T12:00:00Z"), ms("2026-03-30T12:00:00Z"), 10);
        assert_eq!(
            spring,
            vec![ms("2026-03-29T01:00:00Z"), ms("2026-03-30T00:30:00Z")],
            "03:00 CEST on the day of the gap"
        );
        let autumn = at_0230.between(ms("2026-10-24T12:00:00Z"), ms("2026-10-25T12:00:00Z"), 10);
        assert_eq!(autumn, vec![ms("2026-10-25T00:30:00Z")], "once, at the first 02:30 (CEST)");
        // A wildcard hour follows the wall clock: both passes of the repeated hour.
        let half_hourly = cron("30 * * * *", "Europe/Berlin");
        let autumn = half_hourly.between(ms("2026-10-24T23:45:00Z"), ms("2026-10-25T01:45:00Z"), 10);
        assert_eq!(autumn.len(), 2, "{autumn:?}");
    }

    #[test]
    fn too_frequent_unknown_or_never() {
        assert!(When::Cron { expr: "* * * * * *".into(), tz: "UTC".into() }.timetable().is_ok());
        let err =
            When::Cron { expr: "*/5 * * * *".into(), tz: "Mars/Olympus".into() }.timetable().unwrap_err();
        assert!(err.contains("unknown time zone"), "{err}");
        assert!(When::Cron { expr: "nonsense".into(), tz: "UTC".into() }.timetable().is_err());
        let err = When::Every { every_ms: 999 }.timetable().err().unwrap();
        assert_eq!(err, "the interval (every_ms) must be from 1s to 366d, not 999ms (999 ms)");
        assert!(When::Every { every_ms: 1_000 }.timetable().is_ok());
    }

    #[test]
    fn every_is_aligned_to_the_epoch() {
        let every = When::Every { every_ms: 30_000 }.timetable().unwrap();
        assert_eq!(every.next_after(ms("2026-03-01T10:02:03Z")), Some(ms("2026-03-01T10:02:30Z")));
        assert_eq!(every.next_after(ms("2026-03-01T10:02:30Z")), Some(ms("2026-03-01T10:03:00Z")));
        let latest = every.latest_between(0, ms("2026-03-01T10:02:31Z"), 2);
        assert_eq!(latest, vec![ms("2026-03-01T10:02:00Z"), ms("2026-03-01T10:02:30Z")]);
        let once = When::At { at: 5_000 }.timetable().unwrap();
        assert_eq!(once.next_after(4_999), Some(5_000));
        assert_eq!(once.next_after(5_000), None);
    }

    #[test]
    fn catch_up_by_policy() {
        let (now, late) = (100_000, MISSED_AFTER_MS);
        // Three missed and the current one, on time.
        let due = [10_000, 20_000, 30_000, 99_000];
        assert_eq!(catch_up(Catchup::All, &due, now, late), (due.to_vec(), 0));
        assert_eq!(catch_up(Catchup::Latest, &due, now, late), (vec![99_000], 3));
        assert_eq!(catch_up(Catchup::None, &due, now, late), (vec![99_000], 3));
        // The current one is late too: `latest` still fires it, `none` does not.
        let missed_only = [10_000, 20_000, 30_000];
        assert_eq!(catch_up(Catchup::Latest, &missed_only, now, late), (vec![30_000], 2));
        assert_eq!(catch_up(Catchup::None, &missed_only, now, late), (vec![], 3));
        assert_eq!(catch_up(Catchup::None, &[], now, late), (vec![], 0));
        let many: Vec<UnixMs> = (0..(CATCHUP_ALL_MAX as i64 + 10)).map(|i| i * 10).collect();
        let (kept, dropped) = catch_up(Catchup::All, &many, 1_000_000, late);
        assert_eq!((kept.len(), dropped), (CATCHUP_ALL_MAX, 10));
        assert_eq!(kept.first(), Some(&100), "the most recent ones are kept");
    }
}
