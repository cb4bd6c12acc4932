//! The function table's numbers from the node's `/metrics`: every call counted where it ended,
//! sync ones that left no record included (the invocations list holds every async call but only
//! the sync calls that logged or failed).
//!
//! Each poll reads one tenant's counters into a [`Snapshot`]; the table shows what changed over
//! the last [`RATE_WINDOW_MS`](super::model::RATE_WINDOW_MS), taken as the difference between
//! the newest snapshot and the oldest one inside the window. Percentiles are interpolated in the
//! duration histogram's buckets, as Prometheus' `histogram_quantile` does.
//!
//! The parser reads the text format the node writes (`name{label="value",...} value`, comments
//! skipped, label values with `\\`, `\"` and `\n` escapes); the e2e test checks that same text
//! with the reference parser.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text exposition format; a line that does not parse is an error that
/// names it.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        samples.push(
            parse_line(line).ok_or_else(|| format!("line {} of /metrics does not parse: {line}", n + 1))?,
        );
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            while chars.next_if(|(_, c)| *c == ',' || c.is_whitespace()).is_some() {}
            let (start, c) = *chars.peek()?;
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let eq = inner[start..].find('=')? + start;
            let key = inner[start..eq].trim().to_string();
            while chars.next_if(|(i, _)| *i <= eq).is_some() {}
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            labels.push((key, value));
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

/// One function's counters at one moment, summed over kinds (and over nodes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub calls: f64,
    /// Calls that ended in anything but a response below 500 (`ok`, `client_error`).
    pub errors: f64,
    /// `sluice_invocation_duration_seconds` buckets: upper bound → cumulative count.
    pub duration_buckets: BTreeMap<Bound, f64>,
    pub cpu_seconds: f64,
    pub cpu_count: f64,
}

/// A bucket's upper bound, ordered (`+Inf` last).
#[derive(Debug, Clone, Copy)]
pub struct Bound(pub f64);

impl PartialEq for Bound {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Bound {}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A tenant's counters by function at one moment.
pub type Snapshot = BTreeMap<String, Counters>;

/// The counters of `tenant`'s functions in `samples` (added to `into`, so the scrapes of several
/// nodes sum).
pub fn snapshot_into(into: &mut Snapshot, samples: &[Sample], tenant: &str) {
    for s in samples {
        if s.label("tenant") != Some(tenant) {
            continue;
        }
        let Some(function) = s.label("function") else { continue };
        let c = into.entry(function.to_string()).or_default();
        match s.name.as_str() {
            "sluice_invocations_total" => {
                c.calls += s.value;
                if !matches!(s.label("outcome"), Some("ok" | "client_error")) {
                    c.errors += s.value;
                }
            }
            "sluice_invocation_duration_seconds_bucket" => {
                if let Some(le) = s.label("le").and_then(parse_bound) {
                    *c.duration_buckets.entry(Bound(le)).or_default() += s.value;
                }
            }
            "sluice_invocation_cpu_seconds_sum" => c.cpu_seconds += s.value,
            "sluice_invocation_cpu_seconds_count" => c.cpu_count += s.value,
            _ => {}
        }
    }
}

fn parse_bound(le: &str) -> Option<f64> {
    if le == "+Inf" { Some(f64::INFINITY) } else { le.parse().ok() }
}

/// What changed between two snapshots of one function. A counter that went down (its node
/// restarted) counts from zero.
pub fn delta(new: &Counters, old: Option<&Counters>) -> Counters {
    let Some(old) = old else { return new.clone() };
    if new.calls < old.calls {
        return new.clone();
    }
    let sub = |a: f64, b: f64| (a - b).max(0.0);
    Counters {
        calls: sub(new.calls, old.calls),
        errors: sub(new.errors, old.errors),
        duration_buckets: new
            .duration_buckets
            .iter()
            .map(|(le, n)| (*le, sub(*n, old.duration_buckets.get(le).copied().unwrap_or(0.0))))
            .collect(),
        cpu_seconds: sub(new.cpu_seconds, old.cpu_seconds),
        cpu_count: sub(new.cpu_count, old.cpu_count),
    }
}

/// The `q` quantile (0 to 1) of cumulative `buckets`, interpolated linearly inside the bucket it
/// falls in; one that falls in `+Inf` is the largest finite bound. `None` without observations.
pub fn quantile(buckets: &BTreeMap<Bound, f64>, q: f64) -> Option<f64> {
    let total = buckets.values().copied().fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (Bound(le), count) in buckets {
        if *count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let at = if inside > 0.0 { (rank - below) / inside } else { 1.0 };
            return Some(lower + (le - lower) * at);
        }
        (lower, below) = (*le, *count);
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE sluice_invocations_total counter
sluice_invocations_total{tenant="acme",function="resize",kind="sync",outcome="ok"} 90
sluice_invocations_total{tenant="acme",function="resize",kind="async",outcome="timeout"} 4
sluice_invocations_total{tenant="acme",function="resize",kind="sync",outcome="client_error"} 6
sluice_invocations_total{tenant="other",function="resize",kind="sync",outcome="ok"} 1000
sluice_invocations_total{tenant="acme",function="we\"ird\\name",kind="sync",outcome="ok"} 1
# HELP sluice_invocation_duration_seconds From arrival to the end.
sluice_invocation_duration_seconds_bucket{tenant="acme",function="resize",kind="sync",le="0.01"} 50
sluice_invocation_duration_seconds_bucket{tenant="acme",function="resize",kind="sync",le="0.1"} 90
sluice_invocation_duration_seconds_bucket{tenant="acme",function="resize",kind="sync",le="+Inf"} 96
sluice_invocation_duration_seconds_bucket{tenant="acme",function="resize",kind="async",le="0.01"} 0
sluice_invocation_duration_seconds_bucket{tenant="acme",function="resize",kind="async",le="0.1"} 0
sluice_invocation_duration_seconds_bucket{tenant="acme",function="resize",kind="async",le="+Inf"} 4
sluice_invocation_cpu_seconds_sum{tenant="acme",function="resize",kind="sync"} 0.5
sluice_invocation_cpu_seconds_count{tenant="acme",function="resize",kind="sync"} 100
sluice_queue_depth{status="queued",criticality="normal"} 3
"#;

    #[test]
    fn a_tenants_counters_are_read_and_summed_over_kinds() {
        let samples = parse(TEXT).unwrap();
        assert_eq!(samples.len(), 14);
        assert_eq!(samples[4].label("function"), Some("we\"ird\\name"));
        let mut snap = Snapshot::new();
        snapshot_into(&mut snap, &samples, "acme");
        let resize = &snap["resize"];
        assert_eq!(resize.calls, 100.0, "the other tenant's calls are not counted");
        assert_eq!(resize.errors, 4.0, "a 4xx is an answer, a timeout an error");
        assert_eq!(resize.duration_buckets[&Bound(0.1)], 90.0);
        assert_eq!(resize.duration_buckets[&Bound(f64::INFINITY)], 100.0);
        assert_eq!((resize.cpu_seconds, resize.cpu_count), (0.5, 100.0));
        assert_eq!(snap["we\"ird\\name"].calls, 1.0);
        // Two nodes' scrapes add up.
        snapshot_into(&mut snap, &samples, "acme");
        assert_eq!(snap["resize"].calls, 200.0);
    }

    #[test]
    fn lines_that_do_not_parse_are_named() {
        assert!(parse("ok_total 1\nbroken{le=\"1\" 2\n").unwrap_err().contains("line 2"));
        assert!(parse("x{a=\"1\"} notanumber").is_err());
        assert_eq!(parse("x_total 3 1700000000000").unwrap()[0].value, 3.0, "a timestamp is allowed");
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let buckets: BTreeMap<Bound, f64> =
            [(Bound(0.01), 50.0), (Bound(0.1), 90.0), (Bound(f64::INFINITY), 100.0)].into();
        assert_eq!(quantile(&buckets, 0.5), Some(0.01));
        assert!((quantile(&buckets, 0.25).unwrap() - 0.005).abs() < 1e-12);
        assert!((quantile(&buckets, 0.7).unwrap() - 0.055).abs() < 1e-12);
        assert_eq!(quantile(&buckets, 0.99), Some(0.1), "in +Inf: the largest finite bound");
        assert_eq!(quantile(&BTreeMap::new(), 0.5), None);
        let empty: BTreeMap<Bound, f64> = [(Bound(0.01), 0.0), (Bound(f64::INFINITY), 0.0)].into();
        assert_eq!(quantile(&empty, 0.5), None);
    }

    #[test]
    fn a_delta_is_what_changed_and_a_restart_counts_from_zero() {
        let old =
            Counters { calls: 10.0, errors: 1.0, cpu_seconds: 1.0, cpu_count: 10.0, ..Default::default() };
        let new =
            Counters { calls: 15.0, errors: 3.0, cpu_seconds: 1.5, cpu_count: 15.0, ..Default::default() };
        let d = delta(&new, Some(&old));
        assert_eq!((d.calls, d.errors, d.cpu_seconds, d.cpu_count), (5.0, 2.0, 0.5, 5.0));
        let restarted = Counters { calls: 2.0, ..Default::default() };
        assert_eq!(delta(&restarted, Some(&old)).calls, 2.0);
        assert_eq!(delta(&new, None), new);
    }
}
