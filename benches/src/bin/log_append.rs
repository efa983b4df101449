//! Durable append rate of the Raft log store (sled + flush + fdatasync, group commit) against a
//! plain append-only file with one `fdatasync` per batch, for batch sizes 1, 16, 64 and 256.
//!
//! `cargo run --release -p residency-benches --bin log-append -- --rounds 5`
//!
//! Each round appends `--batches` batches to a fresh store and a fresh file in the same
//! directory; the table shows the median over rounds of entries/s and of the per-batch p50 and
//! p99 latency, and the spread (min..max entries/s over rounds) to show how noisy the machine was.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use openraft::storage::RaftLogStorageExt;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use residency_benches::{median, quantile, sample_command};
use residency_store::{StoreOptions, TypeConfig};

#[derive(Debug, Parser)]
#[command(name = "log-append")]
struct Args {
    /// Rounds per configuration; medians are taken over rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Batches appended per round.
    #[arg(long, default_value_t = 200)]
    batches: usize,
    /// Directory to put the stores in (defaults to a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

struct Round {
    entries_per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn entry(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(residency_types::Proposal::new(vec![sample_command(index)])),
    }
}

async fn sled_round(dir: &Path, batch: usize, batches: usize) -> anyhow::Result<Round> {
    let options = StoreOptions {
        cache_capacity_bytes: 64 * 1024 * 1024,
    };
    let (mut log_store, _state_machine, _reader) = residency_store::open(dir, options).await?;
    let mut latencies = Vec::with_capacity(batches);
    let started = Instant::now();
    let mut next_index = 1_u64;
    for _ in 0..batches {
        let entries: Vec<_> = (0..batch as u64)
            .map(|offset| entry(next_index + offset))
            .collect();
        next_index += batch as u64;
        let one = Instant::now();
        log_store.blocking_append(entries).await?;
        latencies.push(one.elapsed());
    }
    let elapsed = started.elapsed();
    Ok(Round {
        entries_per_second: (batch * batches) as f64 / elapsed.as_secs_f64(),
        p50: quantile(latencies.clone(), 0.5),
        p99: quantile(latencies, 0.99),
    })
}

/// The same records, checksummed, appended to one file with an fdatasync per batch.
fn file_round(dir: &Path, batch: usize, batches: usize) -> anyhow::Result<Round> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("plain.log"))?;
    let mut latencies = Vec::with_capacity(batches);
    let started = Instant::now();
    let mut next_index = 1_u64;
    for _ in 0..batches {
        let one = Instant::now();
        let mut buffer = Vec::new();
        for offset in 0..batch as u64 {
            let body = residency_store::record::seal_entry(&entry(next_index + offset));
            buffer.extend_from_slice(&(body.len() as u32).to_be_bytes());
            buffer.extend_from_slice(&body);
        }
        next_index += batch as u64;
        file.write_all(&buffer)?;
        file.sync_data()?;
        latencies.push(one.elapsed());
    }
    let elapsed = started.elapsed();
    Ok(Round {
        entries_per_second: (batch * batches) as f64 / elapsed.as_secs_f64(),
        p50: quantile(latencies.clone(), 0.5),
        p99: quantile(latencies, 0.99),
    })
}

fn summarize(rounds: &[Round]) -> (f64, f64, f64, Duration, Duration) {
    let mut rates: Vec<f64> = rounds
        .iter()
        .map(|round| round.entries_per_second)
        .collect();
    rates.sort_by(f64::total_cmp);
    let p50 = median(rounds.iter().map(|round| round.p50).collect());
    let p99 = median(rounds.iter().map(|round| round.p99).collect());
    (
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1],
        p50,
        p99,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = match &args.dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    println!(
        "log-append: {} rounds x {} batches per configuration, in {}",
        args.rounds,
        args.batches,
        scratch.path().display()
    );
    println!(
        "{:<6} {:>7} {:>12} {:>21} {:>10} {:>10}",
        "store", "batch", "entries/s", "spread (min..max)", "p50", "p99"
    );
    for batch in [1_usize, 16, 64, 256] {
        let mut sled_rounds = Vec::new();
        let mut file_rounds = Vec::new();
        for round in 0..args.rounds {
            let dir = scratch.path().join(format!("b{batch}-r{round}"));
            std::fs::create_dir_all(&dir)?;
            sled_rounds.push(sled_round(&dir.join("sled-store"), batch, args.batches).await?);
            file_rounds.push(file_round(&dir, batch, args.batches)?);
        }
        let sled = summarize(&sled_rounds);
        let file = summarize(&file_rounds);
        for (name, (rate, low, high, p50, p99)) in [("sled", sled), ("file", file)] {
            println!(
                "{name:<6} {batch:>7} {rate:>12.0} {:>21} {:>10.3?} {:>10.3?}",
                format!("{low:.0}..{high:.0}"),
                p50,
                p99
            );
        }
        println!(
            "{:<6} {batch:>7} sled/file rate ratio {:.2}",
            "ratio",
            sled.0 / file.0
        );
    }
    Ok(())
}
