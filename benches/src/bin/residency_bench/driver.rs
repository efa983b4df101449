//! The closed loop every workload runs in: `in_flight` tasks, each sending its next operation
//! as soon as its last one answered, for a warm-up and then a measured window. Every operation
//! that starts inside the window is timed; the CPU time of the server processes and of this
//! process is read at both ends of the window.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// What one operation yields: how many items it covered (1, or the rows of a batch).
pub type OpFuture = Pin<Box<dyn Future<Output = Result<u64, String>> + Send>>;
/// One operation, given its task's number and a sequence number unique within the run.
pub type Op = Arc<dyn Fn(usize, u64) -> OpFuture + Send + Sync>;

/// Latencies kept per task before the window is cut short, so a run at a million ops/s
/// cannot grow without bound (8 bytes each).
const LATENCIES_PER_TASK_MAX: usize = 2_000_000;

#[derive(Debug, Clone, Copy)]
pub struct LoopSpec {
    pub in_flight: usize,
    pub warmup: Duration,
    pub window: Duration,
    /// Stop issuing after this many operations in all (warm-up included).
    pub ops_max: Option<u64>,
}

/// What one measured window saw.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub latencies_ns: Vec<u64>,
    pub ops: u64,
    pub items: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub server_cpu: Duration,
    pub client_cpu: Duration,
}

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPED: u8 = 2;

#[derive(Default)]
struct TaskRecord {
    latencies_ns: Vec<u64>,
    items: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `op` in a closed loop as `spec` says; `server_pids` are the processes whose CPU time
/// the window is charged with.
pub async fn run_loop(op: Op, spec: LoopSpec, server_pids: &[u32]) -> Window {
    assert!(spec.in_flight > 0, "a loop needs at least one task");
    // Without a warm-up the window opens before the first operation.
    let warm = !spec.warmup.is_zero();
    let phase = Arc::new(AtomicU8::new(if warm { WARMING } else { MEASURING }));
    let mut server_before = cpu_of(server_pids);
    let mut client_before = cpu_of_self();
    let mut started = Instant::now();
    let next_seq = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let all_finished = Arc::new(Notify::new());
    let mut tasks = Vec::with_capacity(spec.in_flight);
    for task in 0..spec.in_flight {
        let (op, phase, next_seq) = (op.clone(), phase.clone(), next_seq.clone());
        let (finished, all_finished) = (finished.clone(), all_finished.clone());
        let in_flight = spec.in_flight as u64;
        let ops_max = spec.ops_max;
        tasks.push(tokio::spawn(async move {
            let mut record = TaskRecord::default();
            loop {
                let started_in = phase.load(Ordering::Acquire);
                if started_in == STOPPED || record.latencies_ns.len() >= LATENCIES_PER_TASK_MAX {
                    break;
                }
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                if ops_max.is_some_and(|max| seq >= max) {
                    break;
                }
                let started = Instant::now();
                let outcome = op(task, seq).await;
                let took = started.elapsed();
                if started_in != MEASURING {
                    continue;
                }
                match outcome {
                    Ok(items) => {
                        record.items += items;
                        record
                            .latencies_ns
                            .push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
                    }
                    Err(error) => {
                        record.errors += 1;
                        record.first_error.get_or_insert(error);
                    }
                }
            }
            if finished.fetch_add(1, Ordering::AcqRel) + 1 == in_flight {
                all_finished.notify_one();
            }
            record
        }));
    }
    if warm {
        tokio::time::sleep(spec.warmup).await;
        server_before = cpu_of(server_pids);
        client_before = cpu_of_self();
        started = Instant::now();
        phase.store(MEASURING, Ordering::Release);
    }
    tokio::select! {
        () = tokio::time::sleep(spec.window) => {}
        () = all_finished.notified() => {}
    }
    phase.store(STOPPED, Ordering::Release);
    let elapsed = started.elapsed();
    let server_cpu = cpu_of(server_pids).saturating_sub(server_before);
    let client_cpu = cpu_of_self().saturating_sub(client_before);
    let mut window = Window {
        elapsed,
        server_cpu,
        client_cpu,
        ..Window::default()
    };
    for task in tasks {
        let record = task.await.expect("a benchmark task panicked");
        window.ops += record.latencies_ns.len() as u64;
        window.items += record.items;
        window.errors += record.errors;
        if window.first_error.is_none() {
            window.first_error = record.first_error;
        }
        window.latencies_ns.extend(record.latencies_ns);
    }
    window.latencies_ns.sort_unstable();
    window
}

/// The `q` quantile (0..=1) of sorted latencies, in milliseconds; 0 for none.
pub fn quantile_ms(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let index = ((sorted_ns.len() - 1) as f64 * q).round() as usize;
    sorted_ns[index.min(sorted_ns.len() - 1)] as f64 / 1e6
}

/// Clock ticks per second of `/proc/<pid>/stat`: `getconf CLK_TCK`, 100 if it cannot say
/// (the value every Linux on x86_64 uses).
fn clock_ticks_per_s() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(100)
    })
}

/// User plus system CPU time of one process (all its threads), from `/proc/<pid>/stat`;
/// `None` if the process is gone.
pub fn cpu_of_pid(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1_000 / clock_ticks_per_s(),
    ))
}

fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter()
        .filter_map(|pid| cpu_of_pid(&pid.to_string()))
        .sum()
}

fn cpu_of_self() -> Duration {
    cpu_of_pid("self").unwrap_or_default()
}

/// A scattered but repeatable number from a sequence number (splitmix64), to pick users
/// without a shared random generator.
pub fn scatter(seq: u64) -> u64 {
    let mut z = seq.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_from_sorted_latencies() {
        let sorted: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        assert_eq!(quantile_ms(&sorted, 0.5), 51.0);
        assert_eq!(quantile_ms(&sorted, 0.99), 99.0);
        assert_eq!(quantile_ms(&sorted, 1.0), 100.0);
        assert_eq!(quantile_ms(&[], 0.5), 0.0);
    }

    #[test]
    fn this_process_has_spent_cpu_time() {
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        assert!(cpu_of_self() > Duration::ZERO);
        assert!(cpu_of_pid("999999999").is_none());
    }

    #[tokio::test]
    async fn the_loop_counts_only_operations_of_the_window() {
        let op: Op = Arc::new(|_, seq| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if seq % 10 == 0 {
                    Err(format!("op {seq} failed"))
                } else {
                    Ok(2)
                }
            })
        });
        let spec = LoopSpec {
            in_flight: 4,
            warmup: Duration::from_millis(50),
            window: Duration::from_millis(200),
            ops_max: None,
        };
        let window = run_loop(op, spec, &[]).await;
        assert!(window.ops > 0 && window.errors > 0, "{window:?}");
        assert_eq!(window.items, window.ops * 2);
        assert!(
            window
                .first_error
                .as_deref()
                .is_some_and(|e| e.ends_with("failed"))
        );
        assert!(
            window
                .latencies_ns
                .windows(2)
                .all(|pair| pair[0] <= pair[1])
        );
        assert!(window.elapsed >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn the_loop_ends_early_once_every_operation_is_issued() {
        let op: Op = Arc::new(|_, _| Box::pin(async { Ok(1) }));
        let spec = LoopSpec {
            in_flight: 3,
            warmup: Duration::ZERO,
            window: Duration::from_secs(60),
            ops_max: Some(1_000),
        };
        let started = Instant::now();
        let window = run_loop(op, spec, &[]).await;
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(window.ops <= 1_000 && window.ops > 0);
    }
}
