//! Prometheus text exposition: per-task counters and latency histograms both services
//! keep, and the small writers for gauges.
//!
//! Label values come from the service's own catalog and fixed vocabularies, never from
//! a peer, so the number of series is bounded by the configuration.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, seconds (`+Inf` is implied).
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One latency histogram.
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Observations at or below each bound in [`LATENCY_BUCKETS`] (not cumulative).
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// One (placement, task) series: its latency and its count by outcome.
#[derive(Debug, Default)]
struct Series {
    latency: Histogram,
    outcomes: BTreeMap<String, u64>,
}

/// placement → task → series. Nested, so that counting a task whose series exists
/// allocates nothing (a tuple key would need owned strings for every lookup).
#[derive(Debug, Default)]
struct Inner(BTreeMap<String, BTreeMap<String, Series>>);

impl Inner {
    /// Every (placement, task) series, in label order.
    fn series(&self) -> impl Iterator<Item = (&str, &str, &Series)> {
        self.0.iter().flat_map(|(placement, tasks)| {
            tasks
                .iter()
                .map(move |(task, series)| (placement.as_str(), task.as_str(), series))
        })
    }
}

/// The entry of `key` in `map`, made (with an owned key) only when missing.
fn entry<'m, V: Default>(map: &'m mut BTreeMap<String, V>, key: &str) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

/// Finished tasks by placement, task and outcome, and their latency by placement and
/// task. The daemon has one placement and passes `""`, which leaves the label out.
#[derive(Debug, Default)]
pub struct TaskStats(Mutex<Inner>);

impl TaskStats {
    /// Counts one finished task; `elapsed` (submission to result) feeds the histogram.
    pub fn record(&self, placement: &str, task: &str, outcome: &str, elapsed: Duration) {
        let mut inner = self.0.lock().expect("task stats lock");
        let series = entry(entry(&mut inner.0, placement), task);
        *entry(&mut series.outcomes, outcome) += 1;
        series.latency.observe(elapsed.as_secs_f64());
    }

    /// Writes `{prefix}_tasks_total` and `{prefix}_task_duration_seconds`.
    pub fn render(&self, prefix: &str, out: &mut String) {
        let inner = self.0.lock().expect("task stats lock");
        let name = format!("{prefix}_tasks_total");
        header(
            out,
            &name,
            "counter",
            "Tasks finished, by placement, task and outcome.",
        );
        for (placement, task, series) in inner.series() {
            for (outcome, n) in &series.outcomes {
                let labels = labels(&[
                    ("placement", placement),
                    ("task", task),
                    ("outcome", outcome),
                ]);
                let _ = writeln!(out, "{name}{{{labels}}} {n}");
            }
        }
        let name = format!("{prefix}_task_duration_seconds");
        header(
            out,
            &name,
            "histogram",
            "Time from a task's submission to its result, seconds.",
        );
        for (placement, task, series) in inner.series() {
            let h = &series.latency;
            let base = labels(&[("placement", placement), ("task", task)]);
            let mut cumulative = 0;
            for (bound, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
                cumulative += n;
                let _ = writeln!(out, "{name}_bucket{{{base},le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{{base},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{{base}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{base}}} {}", h.count);
        }
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one unlabelled gauge with its header.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// Writes one unlabelled counter with its header.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

/// `k="v",...` with values escaped; empty values are left out.
pub fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        if !s.is_empty() {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape(v));
    }
    s
}

/// Escapes a label value as the text format requires.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_the_count() {
        let s = TaskStats::default();
        for ms in [3, 40, 40, 700, 90_000] {
            s.record("cloud", "sha", "ok", Duration::from_millis(ms));
        }
        let mut out = String::new();
        s.render("x", &mut out);
        let bucket = |le: &str| {
            let key = format!(
                "x_task_duration_seconds_bucket{{placement=\"cloud\",task=\"sha\",le=\"{le}\"}} "
            );
            out.lines()
                .find_map(|l| l.strip_prefix(&key))
                .unwrap_or_else(|| panic!("no bucket {le} in {out}"))
                .to_string()
        };
        assert_eq!(bucket("0.005"), "1");
        assert_eq!(bucket("0.05"), "3");
        assert_eq!(bucket("1"), "4");
        assert_eq!(bucket("60"), "4");
        assert_eq!(bucket("+Inf"), "5");
        assert!(out.contains("x_tasks_total{placement=\"cloud\",task=\"sha\",outcome=\"ok\"} 5"));
    }

    #[test]
    fn byte_figures_past_4_gib_render_whole() {
        // u64 on every target: a counter or gauge of bytes must not wrap at 4 GiB on
        // a 32-bit board.
        const FIVE_GIB: u64 = 5 << 30;
        let mut out = String::new();
        counter(&mut out, "x_bytes_total", "Bytes.", FIVE_GIB);
        gauge(&mut out, "x_bytes", "Bytes.", FIVE_GIB);
        assert!(out.contains("\nx_bytes_total 5368709120\n"), "{out}");
        assert!(out.contains("\nx_bytes 5368709120\n"), "{out}");
    }

    #[test]
    fn empty_labels_are_left_out_and_values_escaped() {
        assert_eq!(
            labels(&[("placement", ""), ("task", "a\"b\\c\nd")]),
            "task=\"a\\\"b\\\\c\\nd\""
        );
    }
}
