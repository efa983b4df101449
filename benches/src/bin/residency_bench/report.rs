//! Results: per round, per workload, the run's report (JSON), and the side-by-side table.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::Plan;
use crate::driver::{Window, quantile_ms};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundResult {
    pub ops_per_s: f64,
    pub items_per_s: f64,
    pub errors: u64,
    pub seconds: f64,
    pub server_cpu_s: f64,
    pub client_cpu_s: f64,
    pub ops: u64,
}

impl RoundResult {
    pub fn of(window: &Window) -> RoundResult {
        let seconds = window.elapsed.as_secs_f64();
        RoundResult {
            ops_per_s: window.ops as f64 / seconds,
            items_per_s: window.items as f64 / seconds,
            errors: window.errors,
            seconds,
            server_cpu_s: window.server_cpu.as_secs_f64(),
            client_cpu_s: window.client_cpu.as_secs_f64(),
            ops: window.ops,
        }
    }
}

/// How far behind the writers a watcher was: from a write's acknowledgement to its event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchLag {
    pub events: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub workload: String,
    pub operation: String,
    pub in_flight: usize,
    pub rounds: Vec<RoundResult>,
    /// Median over rounds, and the lowest and highest round.
    pub ops_per_s: f64,
    pub ops_per_s_low: f64,
    pub ops_per_s_high: f64,
    /// Median over rounds of items (users, rows) per second.
    pub items_per_s: f64,
    /// Over every operation of every round.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// CPU time of the server processes (all nodes) and of the load generator, per operation.
    pub server_cpu_us_per_op: f64,
    pub client_cpu_us_per_op: f64,
    /// The 1-minute load average before the first round and after the last.
    pub load_average: String,
    pub watch_lag: Option<WatchLag>,
    /// Registry writes only, when its metrics were given: writes applied per log entry over
    /// the whole workload (warm-ups included), from the first node's counters.
    #[serde(default)]
    pub writes_per_entry: Option<f64>,
}

impl WorkloadResult {
    pub fn new(workload: String, in_flight: usize) -> WorkloadResult {
        WorkloadResult {
            workload,
            operation: String::new(),
            in_flight,
            rounds: Vec::new(),
            ops_per_s: 0.0,
            ops_per_s_low: 0.0,
            ops_per_s_high: 0.0,
            items_per_s: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            errors: 0,
            first_error: None,
            server_cpu_us_per_op: 0.0,
            client_cpu_us_per_op: 0.0,
            load_average: String::new(),
            watch_lag: None,
            writes_per_entry: None,
        }
    }

    /// Fills the medians and quantiles from the rounds and the pooled, sorted latencies.
    pub fn summarise(&mut self, pooled_sorted_ns: &[u64]) {
        let median = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(0.0)
        };
        let rates: Vec<f64> = self.rounds.iter().map(|round| round.ops_per_s).collect();
        self.ops_per_s = median(rates.clone());
        self.ops_per_s_low = rates.iter().copied().fold(f64::INFINITY, f64::min);
        self.ops_per_s_high = rates.iter().copied().fold(0.0, f64::max);
        self.items_per_s = median(self.rounds.iter().map(|round| round.items_per_s).collect());
        self.p50_ms = quantile_ms(pooled_sorted_ns, 0.5);
        self.p99_ms = quantile_ms(pooled_sorted_ns, 0.99);
        self.p999_ms = quantile_ms(pooled_sorted_ns, 0.999);
        self.errors = self.rounds.iter().map(|round| round.errors).sum();
        let ops: u64 = self.rounds.iter().map(|round| round.ops).sum();
        let per_op = |seconds: f64| seconds * 1e6 / ops.max(1) as f64;
        self.server_cpu_us_per_op =
            per_op(self.rounds.iter().map(|round| round.server_cpu_s).sum());
        self.client_cpu_us_per_op =
            per_op(self.rounds.iter().map(|round| round.client_cpu_s).sum());
    }

    pub fn set_watch_lag(&mut self, sorted_lags_ns: &[u64], events: u64) {
        self.watch_lag = Some(WatchLag {
            events,
            p50_ms: quantile_ms(sorted_lags_ns, 0.5),
            p99_ms: quantile_ms(sorted_lags_ns, 0.99),
            max_ms: quantile_ms(sorted_lags_ns, 1.0),
        });
    }

    fn spread(&self) -> String {
        format!("{:.0}..{:.0}", self.ops_per_s_low, self.ops_per_s_high)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub system: String,
    pub endpoints: Vec<String>,
    pub server_pids: Vec<u32>,
    pub users: usize,
    pub clients: usize,
    pub value_bytes: usize,
    pub cpus: usize,
    pub unix_time_s: u64,
    pub results: Vec<WorkloadResult>,
}

impl Report {
    pub fn new(system: &str, plan: &Plan, pids: &[u32]) -> Report {
        Report {
            system: system.to_string(),
            endpoints: plan.endpoints.clone(),
            server_pids: pids.to_vec(),
            users: plan.users,
            clients: plan.clients,
            value_bytes: plan.value_bytes,
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            unix_time_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            results: Vec::new(),
        }
    }

    pub fn read(path: &Path) -> anyhow::Result<Report> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn print_line(&self, result: &WorkloadResult) {
        println!(
            "{}: {:.0} ops/s (rounds {}), p50 {:.2} ms, p99 {:.2} ms, {} errors{}{}",
            result.workload,
            result.ops_per_s,
            result.spread(),
            result.p50_ms,
            result.p99_ms,
            result.errors,
            result
                .writes_per_entry
                .map(|writes| format!(", {writes:.1} writes per log entry"))
                .unwrap_or_default(),
            result
                .first_error
                .as_deref()
                .map(|error| format!(" (first: {error})"))
                .unwrap_or_default()
        );
    }

    /// The run's results as a Markdown table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| {} workload | in flight | ops/s (median) | rounds min..max | items/s | p50 ms | \
             p99 ms | p99.9 ms | errors | server CPU µs/op | client CPU µs/op | load |",
            self.system
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for result in &self.results {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {} |",
                result.workload,
                result.in_flight,
                result.ops_per_s,
                result.spread(),
                result.items_per_s,
                result.p50_ms,
                result.p99_ms,
                result.p999_ms,
                result.errors,
                result.server_cpu_us_per_op,
                result.client_cpu_us_per_op,
                result.load_average
            );
        }
        for result in &self.results {
            if let Some(lag) = &result.watch_lag {
                let _ = writeln!(
                    out,
                    "\n{}: watch lag over {} events: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    result.workload, lag.events, lag.p50_ms, lag.p99_ms, lag.max_ms
                );
            }
        }
        out
    }
}

/// The registry's results next to etcd's, with the ratio of rates (registry / etcd) and of
/// median latencies (etcd / registry: above 1 means the registry answers sooner).
pub fn compare(registry: &Report, etcd: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | in flight | registry ops/s | etcd ops/s | ratio | registry p50 / p99 ms | \
         etcd p50 / p99 ms | p50 / p99 registry ÷ etcd | server CPU µs/op registry / etcd | \
         registry writes per entry |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for ours in &registry.results {
        let theirs = etcd
            .results
            .iter()
            .find(|theirs| theirs.workload == ours.workload);
        let ratio_of = |ours: f64, theirs: f64| ours / theirs.max(f64::MIN_POSITIVE);
        let (rate, ratio, latency, latency_ratio, cpu) = match theirs {
            Some(theirs) => (
                format!("{:.0}", theirs.ops_per_s),
                format!("**{:.2}×**", ratio_of(ours.ops_per_s, theirs.ops_per_s)),
                format!("{:.2} / {:.2}", theirs.p50_ms, theirs.p99_ms),
                format!(
                    "{:.2}× / {:.2}×",
                    ratio_of(ours.p50_ms, theirs.p50_ms),
                    ratio_of(ours.p99_ms, theirs.p99_ms)
                ),
                format!(
                    "{:.0} / {:.0}",
                    ours.server_cpu_us_per_op, theirs.server_cpu_us_per_op
                ),
            ),
            None => (
                "—".to_string(),
                "—".to_string(),
                "—".to_string(),
                "—".to_string(),
                format!("{:.0} / —", ours.server_cpu_us_per_op),
            ),
        };
        let grouped = ours
            .writes_per_entry
            .map_or("—".to_string(), |writes| format!("{writes:.1}"));
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {rate} | {ratio} | {:.2} / {:.2} | {latency} | {latency_ratio} | \
             {cpu} | {grouped} |",
            ours.workload, ours.in_flight, ours.ops_per_s, ours.p50_ms, ours.p99_ms
        );
    }
    let _ = writeln!(
        out,
        "\nregistry: {} users preloaded, {} clients; etcd: {} keys, values of {} bytes; {} CPUs",
        registry.users, registry.clients, etcd.users, etcd.value_bytes, registry.cpus
    );
    let _ = writeln!(
        out,
        "etcd's counterparts: lookup-linearizable = Range (linearizable); lookup-at-least and \
         lookup-stale = Range (serializable); assign-N = Put of a new key, N in flight."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(workload: &str, rates: &[f64]) -> WorkloadResult {
        let mut result = WorkloadResult::new(workload.to_string(), 8);
        result.rounds = rates
            .iter()
            .map(|rate| RoundResult {
                ops_per_s: *rate,
                items_per_s: *rate,
                errors: 0,
                seconds: 1.0,
                server_cpu_s: 0.5,
                client_cpu_s: 0.25,
                ops: 1_000,
            })
            .collect();
        result.summarise(&[1_000_000, 2_000_000, 3_000_000]);
        result
    }

    #[test]
    fn a_workload_reports_the_median_round_and_the_spread() {
        let result = result("assign-16", &[300.0, 100.0, 200.0]);
        assert_eq!(result.ops_per_s, 200.0);
        assert_eq!(result.spread(), "100..300");
        assert_eq!(result.p50_ms, 2.0);
        assert_eq!(result.server_cpu_us_per_op, 500.0);
    }

    #[test]
    fn the_comparison_divides_rates_and_marks_workloads_etcd_lacks() {
        let plan = Plan {
            endpoints: vec!["a".to_string()],
            users: 10,
            clients: 1,
            value_bytes: 100,
            run_id: "r".to_string(),
        };
        let mut ours = Report::new("registry", &plan, &[]);
        ours.results = vec![result("assign-16", &[400.0]), result("import", &[50.0])];
        let mut theirs = Report::new("etcd", &plan, &[]);
        theirs.results = vec![result("assign-16", &[100.0])];
        let table = compare(&ours, &theirs);
        assert!(
            table.contains("| assign-16 | 8 | 400 | 100 | **4.00×** |"),
            "{table}"
        );
        assert!(table.contains("| import | 8 | 50 | — | — |"), "{table}");
    }
}
