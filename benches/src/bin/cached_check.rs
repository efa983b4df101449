//! Access checks answered by `CachedChecker` in-process on one thread, next to the same checks
//! sent to the cluster as `CheckAccess` RPCs (STALE, 64 in flight), in one run.
//!
//! Against a running cluster (`./cluster/local.sh up`, or `--endpoints`):
//!
//! `cargo run --release -p residency-benches --bin cached-check -- --users 1000000`
//!
//! It places `--users` users (`bench-cc-<n>`) if the last of them is not placed yet, starts a
//! checker and waits until it vouches for its freshness, then runs `--rounds` rounds of
//! `--seconds` each on one thread, checking users in a scattered order (1 in 100 unknown). The
//! table shows the median rate over rounds and the spread (min..max) to show how noisy the
//! machine was, the process's resident memory per cached placement, and the RPC rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use residency_client::{
    CacheOptions, CachedChecker, Client, ClientOptions, LOCAL_ENDPOINTS, TlsOptions,
};
use residency_types::{AccessOperation, AssignItem, Consistency, Decision, Jurisdiction, UserId};

#[derive(Debug, Parser)]
#[command(name = "cached-check")]
struct Args {
    /// Client endpoints of the cluster, comma-separated.
    #[arg(long, default_value = LOCAL_ENDPOINTS)]
    endpoints: String,
    /// Users the cache holds (placed first if missing).
    #[arg(long, default_value_t = 1_000_000)]
    users: usize,
    /// Rounds of in-process checks; the median is taken over rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per round.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// RPCs in flight for the remote comparison.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
}

/// Items per BatchAssign while placing users, and batches in flight.
const PLACE_BATCH_ITEMS: usize = 500;
const PLACE_BATCHES_IN_FLIGHT: usize = 8;
/// How long the cache may take to list and catch up before the benchmark gives up.
const CACHE_FRESH_WAIT: Duration = Duration::from_secs(600);

fn user_id(n: usize) -> UserId {
    UserId::parse(format!("bench-cc-{n:09}")).expect("valid user id")
}

/// Places users `0..users` at the active US locations, unless the last one is placed already.
async fn place_users(client: Arc<Client>, users: usize) -> anyhow::Result<()> {
    let last = client
        .lookup(&user_id(users - 1), Consistency::Linearizable)
        .await?;
    if last.placement.is_some() {
        println!("{users} users already placed");
        return Ok(());
    }
    let locations = residency_benches::active_us_locations(&client).await?;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..PLACE_BATCHES_IN_FLIGHT {
        let (client, next, locations) = (client.clone(), next.clone(), locations.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let first =
                    usize::try_from(next.fetch_add(PLACE_BATCH_ITEMS as u64, Ordering::SeqCst))
                        .expect("fits usize");
                if first >= users {
                    return Ok::<(), anyhow::Error>(());
                }
                let items: Vec<AssignItem> = (first..(first + PLACE_BATCH_ITEMS).min(users))
                    .map(|n| AssignItem {
                        user_id: user_id(n),
                        residency: Jurisdiction::US,
                        location_id: locations[n % locations.len()].clone(),
                        expected_mod_revision: None,
                    })
                    .collect();
                client.batch_assign(&items, None).await?;
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    println!(
        "placed {users} users in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The resident memory of this process, in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Checks timed per chunk: the ids of a chunk are drawn before its clock starts.
const CHUNK_CHECKS: usize = 4_096;

/// How a round gets the user id of each check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ids {
    /// As a service does: the id of the request is in hand (in the CPU cache), the cache's
    /// table is not. Each chunk's ids are copied out of the big array before its clock starts.
    InHand,
    /// Straight out of an array of a million ids: one more cache miss per check, the
    /// benchmark's own.
    FromArray,
}

/// One round on this thread: checks of scattered users for `seconds`; returns checks/s.
fn check_round(
    checker: &CachedChecker,
    ids: &[UserId],
    how: Ids,
    seconds: u64,
) -> anyhow::Result<f64> {
    let us = Jurisdiction::US;
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        // xorshift: a scattered order, so the table is not read in cache-friendly runs.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % ids.len() as u64).expect("fits usize")
    };
    let mut checks = 0_u64;
    let mut allowed = 0_u64;
    let mut timed = Duration::ZERO;
    let started = Instant::now();
    let mut chunk: Vec<UserId> = Vec::with_capacity(CHUNK_CHECKS);
    let mut positions: Vec<usize> = Vec::with_capacity(CHUNK_CHECKS);
    while started.elapsed() < Duration::from_secs(seconds) {
        chunk.clear();
        positions.clear();
        match how {
            Ids::InHand => chunk.extend((0..CHUNK_CHECKS).map(|_| ids[next()].clone())),
            Ids::FromArray => positions.extend((0..CHUNK_CHECKS).map(|_| next())),
        }
        let clock = Instant::now();
        for n in 0..CHUNK_CHECKS {
            let id = match how {
                Ids::InHand => &chunk[n],
                Ids::FromArray => &ids[positions[n]],
            };
            match checker.check_access(id, us, AccessOperation::Read).decision {
                Decision::Allow { .. } => allowed += 1,
                Decision::Deny {
                    reason: residency_types::DenyReason::CacheNotFresh,
                } => bail!("the cache stopped vouching for its freshness during the round"),
                Decision::Deny { .. } => {}
            }
        }
        timed += clock.elapsed();
        checks += CHUNK_CHECKS as u64;
    }
    anyhow::ensure!(
        allowed > 0,
        "no check was allowed: the benchmark checks nothing"
    );
    Ok(checks as f64 / timed.as_secs_f64())
}

/// CheckAccess RPCs with STALE consistency, `in_flight` at once, for `seconds`; checks/s.
async fn remote_round(
    client: Arc<Client>,
    ids: Arc<Vec<UserId>>,
    in_flight: usize,
    seconds: u64,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..in_flight {
        let (client, ids, done, stop) = (client.clone(), ids.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = worker * 7_919;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[n % ids.len()];
                client
                    .check_access(
                        id,
                        "bench",
                        Jurisdiction::US,
                        AccessOperation::Read,
                        Consistency::Stale,
                    )
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
                n += in_flight;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.users > 0 && args.rounds > 0,
        "--users and --rounds must be positive"
    );
    let endpoints = args.endpoints.split(',').map(str::to_string).collect();
    let options = ClientOptions {
        timeout: Duration::from_secs(30),
        caller: "cached-check-bench".to_string(),
        // It places its users first: the operator's certificate (RESIDENCY_CERTS_DIR or the
        // local cluster's data/certs).
        tls: TlsOptions::discover("operator")?,
    };
    let client = Arc::new(Client::new(endpoints, options.clone())?);
    place_users(client.clone(), args.users).await?;

    let before = resident_bytes();
    let listing_started = Instant::now();
    let checker = CachedChecker::start(
        Client::new(client.endpoints().to_vec(), options)?,
        CacheOptions::default(),
    );
    let freshness = checker
        .wait_fresh(CACHE_FRESH_WAIT)
        .await
        .context("the cache did not become fresh")?;
    let listed_in = listing_started.elapsed();
    let after = resident_bytes();
    let (_, _, cached) = checker.digest();
    let cached = usize::try_from(cached).expect("fits usize");

    let mut ids: Vec<UserId> = (0..args.users).map(user_id).collect();
    for n in 0..args.users / 100 {
        ids[n * 100] = UserId::parse(format!("bench-cc-unknown-{n}")).expect("valid user id");
    }
    // The checks run on a thread of their own; the runtime's threads keep the cache fresh.
    let checker = Arc::new(checker);
    let (in_hand, from_array) = {
        let (checker, ids, rounds, seconds) =
            (checker.clone(), ids.clone(), args.rounds, args.seconds);
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
            let mut in_hand = Vec::with_capacity(rounds);
            let mut from_array = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                in_hand.push(check_round(&checker, &ids, Ids::InHand, seconds)?);
                from_array.push(check_round(&checker, &ids, Ids::FromArray, seconds)?);
            }
            Ok((in_hand, from_array))
        })
        .await??
    };
    let remote = remote_round(client, Arc::new(ids), args.in_flight, args.seconds).await?;

    let summary = |mut rates: Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        (rates[rates.len() / 2], rates[0], rates[rates.len() - 1])
    };
    let (median, low, high) = summary(in_hand);
    let (array_median, array_low, array_high) = summary(from_array);
    println!();
    println!(
        "cache: {cached} entries (placements, locations, policies) at revision {}, listed and \
         fresh in {:.1} s",
        freshness.revision,
        listed_in.as_secs_f64()
    );
    println!(
        "resident memory grew by {:.0} MiB: {:.0} bytes per cached entry",
        (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0),
        after.saturating_sub(before) as f64 / cached.max(1) as f64
    );
    println!();
    println!(
        "| path | checks/s (median of {}) | spread (min..max) | ns per check |",
        args.rounds
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| CachedChecker::check_access, 1 thread, id in hand | {median:.0} | {low:.0}..{high:.0} | \
         {:.0} |",
        1e9 / median
    );
    println!(
        "| CachedChecker::check_access, 1 thread, id from a 1M array | {array_median:.0} | \
         {array_low:.0}..{array_high:.0} | {:.0} |",
        1e9 / array_median
    );
    println!(
        "| CheckAccess RPC, STALE, {} in flight | {remote:.0} | one round | {:.0} |",
        args.in_flight,
        1e9 / remote
    );
    println!();
    println!("in-process (id in hand) / RPC: {:.0}x", median / remote);
    let stats = checker.stats();
    println!(
        "cache stats: hits {}, not fresh {}, relists {}, rewatches {}",
        stats.hits, stats.not_fresh, stats.relists, stats.rewatches
    );
    Ok(())
}
