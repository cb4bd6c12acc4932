//! A Prometheus histogram of fixed buckets made of atomic counters, and the process's registry
//! of them (`/metrics` renders it next to the recorder's counters and gauges). Recording takes no
//! lock and allocates nothing; only making a histogram (once per function or component) locks.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the seconds histograms' buckets: from a fast sync call (about 100 µs) to a
/// long async one.
pub const SECONDS_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0];
/// Upper bounds of the buckets of histograms of counts (ops per batch).
pub const COUNT_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// A Prometheus histogram with fixed buckets: a record is a short scan of the bounds and two
/// atomic updates; nothing is allocated after it is made.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for above the last bound. Their total is the count.
    counts: Vec<AtomicU64>,
    /// The sum of the values, as `f64` bits: a sum of whole nanoseconds would wrap within minutes
    /// at thousands of hour-long queue waits a second.
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn record_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn record_count(&self, n: u64) {
        self.observe(n as f64);
    }

    fn observe(&self, value: f64) {
        let i = self.bounds.iter().position(|b| value <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        // The count is the buckets' total, read once, so that `_count` equals the `+Inf` bucket.
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// One histogram family: its help and every label set's histogram.
struct Family {
    name: &'static str,
    help: &'static str,
    series: Vec<(String, Arc<Histogram>)>,
}

static FAMILIES: Mutex<Vec<Family>> = Mutex::new(Vec::new());

/// What each histogram family measures (its `# HELP`), and whether it counts seconds.
const HELP: [(&str, &str, bool); 7] = [
    ("sluice_invocation_duration_seconds", "From arrival (sync) or enqueue (async) to the end", true),
    ("sluice_invocation_run_seconds", "A call's run, from its start to its end", true),
    ("sluice_invocation_cpu_seconds", "A call's time on a thread; the sum is the CPU time used", true),
    ("sluice_invocation_queue_wait_seconds", "How long an async call waited to start", true),
    ("sluice_compile_seconds", "Compiling a component", true),
    ("sluice_store_commit_seconds", "A group commit of the store's queue writer", true),
    ("sluice_store_commit_batch_ops", "Writes per group commit of the store's queue writer", false),
];

/// The histogram `name` with `labels` (made on first use, shared after). Takes a lock: call it
/// when something is set up, not per call.
pub fn histogram(name: &'static str, labels: &[(&str, &str)]) -> Arc<Histogram> {
    let (help, seconds) =
        HELP.iter().find(|(n, _, _)| *n == name).map_or(("", true), |(_, help, seconds)| (*help, *seconds));
    let labels: String =
        labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect::<Vec<_>>().join(",");
    let mut families = FAMILIES.lock().expect("histogram registry lock");
    let family = match families.iter().position(|f| f.name == name) {
        Some(i) => &mut families[i],
        None => {
            families.push(Family { name, help, series: Vec::new() });
            families.last_mut().expect("just pushed")
        }
    };
    if let Some((_, h)) = family.series.iter().find(|(l, _)| *l == labels) {
        return h.clone();
    }
    let h = Arc::new(Histogram::new(if seconds { &SECONDS_BUCKETS } else { &COUNT_BUCKETS }));
    family.series.push((labels, h.clone()));
    h
}

/// Every histogram in the Prometheus text format, keeping only the series `keep` accepts (given
/// their label text).
pub fn render_histograms(keep: impl Fn(&str) -> bool) -> String {
    let families = FAMILIES.lock().expect("histogram registry lock");
    let mut out = String::new();
    for family in families.iter() {
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} histogram", family.name);
        for (labels, h) in &family.series {
            if keep(labels) {
                h.render(&mut out, family.name, labels);
            }
        }
    }
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets_with_sum_and_count() {
        let h = histogram("sluice_test_seconds", &[("tenant", "t\"x")]);
        h.record_duration(Duration::from_micros(80));
        h.record_duration(Duration::from_millis(3));
        h.record_duration(Duration::from_secs(100));
        let again = histogram("sluice_test_seconds", &[("tenant", "t\"x")]);
        assert!(Arc::ptr_eq(&h, &again), "one histogram per name and labels");
        let text = render_histograms(|labels| labels.contains("t\\\"x"));
        assert!(text.contains("# TYPE sluice_test_seconds histogram"), "{text}");
        assert!(text.contains("sluice_test_seconds_bucket{tenant=\"t\\\"x\",le=\"0.0001\"} 1\n"), "{text}");
        assert!(text.contains("le=\"0.0025\"} 1\n") && text.contains("le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("le=\"60\"} 2\n") && text.contains("le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("sluice_test_seconds_sum{tenant=\"t\\\"x\"} 100.00308\n"), "{text}");
        assert!(text.contains("sluice_test_seconds_count{tenant=\"t\\\"x\"} 3\n"), "{text}");
        // Hour-long waits at a high rate: the sum keeps growing instead of wrapping.
        let waits = histogram("sluice_test_seconds", &[("tenant", "long")]);
        for _ in 0..10_000 {
            waits.record_duration(Duration::from_secs(3 * 3600 * 24 * 365));
        }
        let text = render_histograms(|labels| labels.contains("long"));
        assert!(text.contains("sluice_test_seconds_sum{tenant=\"long\"} 946080000000\n"), "{text}");
        let none = render_histograms(|_| false);
        assert!(!none.contains("sluice_test_seconds_count"));
    }
}
