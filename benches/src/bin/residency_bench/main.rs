//! `residency-bench`: a load generator for the registry, in the spirit of etcd's `benchmark`
//! tool, that runs the same workloads against etcd so a claim is always a ratio from one run on
//! one machine.
//!
//! ```text
//! residency-bench run --system registry --pids 11,12,13 --json registry.json
//! residency-bench run --system etcd --endpoints 127.0.0.1:12379,... --pids ... --json etcd.json
//! residency-bench compare registry.json etcd.json
//! ```
//!
//! `benches/compare.sh` starts each system in turn, runs both and prints the comparison.
//! Each workload runs `--rounds` rounds of a warm-up then a measured window; the rate is the
//! median over rounds (with the spread), latencies are pooled over rounds, and the CPU time
//! of the server processes is charged per operation.

mod driver;
mod etcd;
mod registry;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use residency_client::LOCAL_ENDPOINTS;

use crate::driver::{LoopSpec, Op, run_loop};
use crate::report::{Report, RoundResult, WorkloadResult};

#[derive(Debug, Parser)]
#[command(
    name = "residency-bench",
    about = "Load generator for the registry, and etcd beside it"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs workloads against one system and prints (or writes) the results.
    Run(RunArgs),
    /// Places users `bench-u-0..N` into an empty registry as fast as it takes them (BatchAssign
    /// of 500, `--in-flight` at once) and reports rows/s: the bulk-import figure at scale.
    Load {
        #[arg(long, default_value = LOCAL_ENDPOINTS)]
        endpoints: String,
        #[arg(long, default_value_t = 1_000_000)]
        users: usize,
        #[arg(long, default_value_t = 4)]
        in_flight: usize,
    },
    /// Prints the registry's results next to etcd's, with the ratio per workload.
    Compare { registry: PathBuf, etcd: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum System {
    Registry,
    Etcd,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[arg(long, value_enum, default_value_t = System::Registry)]
    system: System,
    /// Client endpoints (host:port), comma-separated.
    #[arg(long, default_value = LOCAL_ENDPOINTS)]
    endpoints: String,
    /// Pids of the server processes, comma-separated: their CPU time is charged per operation.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Workloads to run, comma-separated (default: all the system has).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Users (keys) preloaded for the reads.
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    /// Requests in flight for the read, check and mixed workloads.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Batches in flight for `import`.
    #[arg(long, default_value_t = 4)]
    import_in_flight: usize,
    /// Clients, each with its own connection to every node; tasks share them in turn.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Rounds per workload: the rate reported is the median over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds measured per round.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of warm-up before each round's window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Bytes of each etcd value (default: an encoded placement's size as the registry answers
    /// it, measured at startup; 160 when etcd runs alone).
    #[arg(long)]
    value_bytes: Option<usize>,
    /// The registry's metrics listeners (host:port), comma-separated: the first one's counters
    /// give the writes applied per log entry of each write workload.
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<String>,
    /// Writes the report as JSON to this file as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A run with errors exits 0 anyway.
    #[arg(long)]
    allow_errors: bool,
}

/// A workload; `Assign(n)` with `n` requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    LookupLinearizable,
    /// Linearizable lookups one at a time: the latency a single caller sees.
    LookupLinearizableOne,
    LookupAtLeast,
    LookupStale,
    BatchLookup,
    CheckAccess,
    Assign(usize),
    Mixed,
    Import,
}

impl Workload {
    const ALL: [Workload; 12] = [
        Workload::LookupLinearizable,
        Workload::LookupLinearizableOne,
        Workload::LookupAtLeast,
        Workload::LookupStale,
        Workload::BatchLookup,
        Workload::CheckAccess,
        Workload::Assign(1),
        Workload::Assign(16),
        Workload::Assign(64),
        Workload::Assign(256),
        Workload::Mixed,
        Workload::Import,
    ];

    pub fn name(self) -> String {
        match self {
            Workload::LookupLinearizable => "lookup-linearizable".to_string(),
            Workload::LookupLinearizableOne => "lookup-linearizable-1".to_string(),
            Workload::LookupAtLeast => "lookup-at-least".to_string(),
            Workload::LookupStale => "lookup-stale".to_string(),
            Workload::BatchLookup => "batch-lookup".to_string(),
            Workload::CheckAccess => "check-access".to_string(),
            Workload::Assign(in_flight) => format!("assign-{in_flight}"),
            Workload::Mixed => "mixed".to_string(),
            Workload::Import => "import".to_string(),
        }
    }

    fn parse(name: &str) -> anyhow::Result<Workload> {
        Workload::ALL
            .into_iter()
            .find(|workload| workload.name() == name)
            .with_context(|| {
                let names: Vec<String> = Workload::ALL.iter().map(|w| w.name()).collect();
                format!("no workload {name:?}; there are {}", names.join(", "))
            })
    }

    fn in_flight(self, args: &RunArgs) -> usize {
        match self {
            Workload::Assign(in_flight) => in_flight,
            Workload::LookupLinearizableOne => 1,
            Workload::Import => args.import_in_flight,
            _ => args.in_flight,
        }
    }
}

/// What every workload of one run shares.
#[derive(Debug, Clone)]
pub struct Plan {
    pub endpoints: Vec<String>,
    pub users: usize,
    pub clients: usize,
    pub value_bytes: usize,
    /// Unique to this run, so its new users and keys never collide with an earlier run's.
    pub run_id: String,
}

/// The id of the `n`th preloaded user (the etcd key is `user/` and this).
pub fn preload_user_id(n: usize) -> String {
    format!("bench-u-{n:09}")
}

/// The longest a preload may take.
const PRELOAD_TIME_MAX: Duration = Duration::from_secs(3_600);
/// The etcd value size when no registry answer gives the size of a placement.
const ETCD_VALUE_BYTES_DEFAULT: usize = 160;

/// Runs `op` for sequence numbers `0..count`, `in_flight` at once, failing on the first
/// error.
pub async fn preload_with(
    op: Op,
    count: usize,
    in_flight: usize,
    label: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let spec = LoopSpec {
        in_flight: in_flight.min(count).max(1),
        warmup: Duration::ZERO,
        window: PRELOAD_TIME_MAX,
        ops_max: Some(count as u64),
    };
    let window = run_loop(op, spec, &[]).await;
    if let Some(error) = window.first_error {
        bail!(
            "{label}: preloading failed ({} errors): {error}",
            window.errors
        );
    }
    println!(
        "{label}: preloaded {} items in {:.1} s",
        window.items,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

/// Runs the rounds of one workload; `make_op` gives the operation of each round (its scope).
async fn measure(
    workload: Workload,
    args: &RunArgs,
    make_op: &mut dyn FnMut(&str) -> anyhow::Result<(Op, String)>,
    run_id: &str,
) -> anyhow::Result<(WorkloadResult, Vec<u64>)> {
    let in_flight = workload.in_flight(args);
    let spec = LoopSpec {
        in_flight,
        warmup: Duration::from_secs_f64(args.warmup),
        window: Duration::from_secs_f64(args.seconds),
        ops_max: None,
    };
    let mut result = WorkloadResult::new(workload.name(), in_flight);
    let mut pooled: Vec<u64> = Vec::new();
    let load_before = load_average();
    for round in 0..args.rounds {
        let scope = format!("{run_id}-{}{round}", workload.name());
        let (op, operation) = make_op(&scope)?;
        result.operation = operation;
        let window = run_loop(op, spec, &args.pids).await;
        result.rounds.push(RoundResult::of(&window));
        if result.first_error.is_none() {
            result.first_error = window.first_error.clone();
        }
        pooled.extend_from_slice(&window.latencies_ns);
    }
    result.load_average = format!("{load_before} → {}", load_average());
    pooled.sort_unstable();
    result.summarise(&pooled);
    Ok((result, pooled))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.users > 0 && args.rounds > 0 && args.clients > 0 && args.in_flight > 0,
        "--users, --rounds, --clients and --in-flight must be positive"
    );
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    let workloads: Vec<Workload> = if args.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        args.workloads
            .iter()
            .map(|name| Workload::parse(name))
            .collect::<anyhow::Result<_>>()?
    };
    let run_id = format!(
        "{:08x}",
        driver::scatter(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64
        ) as u32
    );
    let mut plan = Plan {
        endpoints: args
            .endpoints
            .split(',')
            .map(|endpoint| endpoint.trim().to_string())
            .filter(|endpoint| !endpoint.is_empty())
            .collect(),
        users: args.users,
        clients: args.clients,
        value_bytes: args.value_bytes.unwrap_or(ETCD_VALUE_BYTES_DEFAULT),
        run_id: run_id.clone(),
    };
    let system = match args.system {
        System::Registry => "registry",
        System::Etcd => "etcd",
    };
    let mut report = Report::new(system, &plan, &args.pids);
    println!(
        "{system}: {} workload(s), {} round(s) of {} s (+{} s warm-up), {} users, {} clients, \
         run {run_id}",
        workloads.len(),
        args.rounds,
        args.seconds,
        args.warmup,
        args.users,
        args.clients
    );
    match args.system {
        System::Registry => {
            let prepared = registry::prepare(&plan).await?;
            plan.value_bytes = registry::placement_bytes(&prepared).await?;
            report.value_bytes = plan.value_bytes;
            for workload in workloads {
                let probe =
                    (workload == Workload::Mixed).then(|| Arc::new(registry::LagProbe::default()));
                let mut watches = Vec::new();
                let mut make_op = |scope: &str| -> anyhow::Result<(Op, String)> {
                    if let Some(probe) = &probe {
                        watches.push(registry::start_lag_watch(&plan, scope, probe.clone())?);
                    }
                    Ok(registry::op_for(
                        workload,
                        &prepared,
                        &plan,
                        scope,
                        probe.clone(),
                    ))
                };
                let counted_before = match args.metrics.first() {
                    Some(address) => Some(registry::applied_counts(address).await?),
                    None => None,
                };
                let (mut result, _) = measure(workload, &args, &mut make_op, &run_id).await?;
                if let (Some(before), Some(address)) = (counted_before, args.metrics.first()) {
                    let after = registry::applied_counts(address).await?;
                    result.writes_per_entry = after.writes_per_entry_since(&before);
                }
                if let Some(probe) = &probe {
                    // Events of the last writes may still be on their way.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let (lags, events) = probe.lags();
                    result.set_watch_lag(&lags, events);
                }
                for watch in watches {
                    watch.abort();
                }
                report.print_line(&result);
                report.results.push(result);
            }
        }
        System::Etcd => {
            let clients = etcd::connect_all(&plan).await?;
            etcd::preload(&clients, &plan).await?;
            for workload in workloads {
                if etcd::op_for(workload, &clients, &plan, "probe").is_none() {
                    println!("{}: etcd has no counterpart, skipped", workload.name());
                    continue;
                }
                let mut make_op = |scope: &str| -> anyhow::Result<(Op, String)> {
                    etcd::op_for(workload, &clients, &plan, scope)
                        .context("etcd has no counterpart of this workload")
                };
                let (result, _) = measure(workload, &args, &mut make_op, &run_id).await?;
                report.print_line(&result);
                report.results.push(result);
            }
        }
    }
    println!();
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("written: {}", path.display());
    }
    let errors: u64 = report.results.iter().map(|result| result.errors).sum();
    if errors > 0 && !args.allow_errors {
        bail!("{errors} operation(s) failed: the figures above do not stand");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Run(args) => run(args).await,
        Command::Load {
            endpoints,
            users,
            in_flight,
        } => {
            anyhow::ensure!(
                users > 0 && in_flight > 0,
                "--users and --in-flight must be positive"
            );
            let endpoints = endpoints.split(',').map(|e| e.trim().to_string()).collect();
            let client = Arc::new(residency_client::Client::new(
                endpoints,
                registry::client_options().map_err(anyhow::Error::msg)?,
            )?);
            let locations = residency_benches::active_us_locations(&client).await?;
            let took = registry::place_users(client, &locations, users, in_flight).await?;
            println!(
                "load: {users} users in {:.1} s: {:.0} rows/s ({in_flight} batches of {} in flight)",
                took.as_secs_f64(),
                users as f64 / took.as_secs_f64(),
                registry::IMPORT_BATCH_ROWS
            );
            Ok(())
        }
        Command::Compare { registry, etcd } => {
            let registry = Report::read(&registry)?;
            let etcd = Report::read(&etcd)?;
            print!("{}", report::compare(&registry, &etcd));
            Ok(())
        }
    }
}
