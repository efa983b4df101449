//! The fault suite: the compose deployment under one fault at a time, with clients recording
//! every operation, and a checker over the history (`residency_tests::history`).
//!
//! Per run: four clients write unique values to five users and read them back in every
//! consistency mode; the fault strikes after 3 s and heals; then a final write per user must
//! succeed, every node's digest must agree at one revision, linearizable reads through every
//! node must see every acknowledged write, and the history must pass the checker.
//!
//! `RESIDENCY_FAULT_RUNS=N` runs every fault N times (a soak); `RESIDENCY_FAULTS=a,b` runs only
//! those faults; `RESIDENCY_FAULT_SEED` fixes the seed. On failure the history, the node logs and
//! the seed are kept and their place printed. Needs Docker, docker-compose, nsenter and
//! iptables, and root for the partitions: without them it fails, it does not skip.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use residency_client::{Client, WriteOptions};
use residency_tests::docker::{Cut, Deployment};
use residency_tests::history::{self, Op, OpKind, Outcome, ReadMode};
use residency_types::{Consistency, Jurisdiction, LocationId, UserId};

/// Small snapshot thresholds, so snapshots are built (and sent) during the runs.
const RAFT: &str = "heartbeat_interval_ms = 100\nelection_timeout_ms_min = 1000\n\
                    election_timeout_ms_max = 3000\nsnapshot_logs_since_last = 300\n\
                    max_in_snapshot_log_to_keep = 50";
const CLIENTS: u32 = 4;
const USERS: usize = 5;
/// How long a client call may take before it is recorded as unknown.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// When the fault strikes, after the clients start; how long they go on after it heals.
const FAULT_AFTER: Duration = Duration::from_secs(3);
const AFTER_HEAL: Duration = Duration::from_secs(3);
/// Longer than the election timeout's maximum (3 s): the cluster must act without the node.
const FAULT_HOLD: Duration = Duration::from_secs(5);
/// How long the deployment may take to agree again after a fault.
const SETTLE_WAIT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillLeader,
    KillFollower,
    PauseLeader,
    PartitionLeader,
    AsymmetricPartition,
    FlappingPartition,
    RollingRestart,
    CrashDuringSnapshotInstall,
}

impl Fault {
    const ALL: [Fault; 8] = [
        Fault::KillLeader,
        Fault::KillFollower,
        Fault::PauseLeader,
        Fault::PartitionLeader,
        Fault::AsymmetricPartition,
        Fault::FlappingPartition,
        Fault::RollingRestart,
        Fault::CrashDuringSnapshotInstall,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillFollower => "kill-follower",
            Fault::PauseLeader => "pause-leader",
            Fault::PartitionLeader => "partition-leader",
            Fault::AsymmetricPartition => "asymmetric-partition",
            Fault::FlappingPartition => "flapping-partition",
            Fault::RollingRestart => "rolling-restart",
            Fault::CrashDuringSnapshotInstall => "crash-during-snapshot-install",
        }
    }
}

/// The operations of one run, with times relative to its start.
struct Recorder {
    started: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).expect("a run is shorter than 500 years")
    }

    fn record(&self, op: Op) {
        self.ops.lock().expect("history lock").push(op);
    }
}

/// A small xorshift generator: the workload's choices follow the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

fn user(key: &str) -> UserId {
    UserId::parse(key).expect("valid user id")
}

fn location(n: u64) -> LocationId {
    LocationId::parse(residency_tests::us_location(
        usize::try_from(n).expect("small"),
    ))
    .expect("valid location")
}

/// One client: writes and reads at random until `stop`, recording everything.
async fn client_loop(
    client: Client,
    number: u32,
    keys: Arc<Vec<String>>,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng(seed ^ (u64::from(number) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut sequence = 0_u64;
    while !stop.load(Ordering::SeqCst) {
        let key = keys[usize::try_from(rng.next(keys.len() as u64)).expect("small")].clone();
        let invoke = recorder.now();
        if rng.next(100) < 40 {
            sequence += 1;
            let value = format!("w-{number}-{sequence}");
            let options = WriteOptions {
                reason: value.clone(),
                ..WriteOptions::default()
            };
            let answer = client
                .assign(
                    &user(&key),
                    Jurisdiction::US,
                    &location(rng.next(3)),
                    Some(options),
                )
                .await;
            // A timeout, a lost connection or an election: it may apply, now or later.
            let outcome = write_outcome(answer);
            recorder.record(Op {
                client: number,
                key,
                kind: OpKind::Write { value },
                invoke,
                complete: recorder.now(),
                outcome,
            });
        } else {
            let mode = match rng.next(4) {
                0 | 1 => ReadMode::Linearizable,
                2 => ReadMode::AtLeast(client.highest_revision().0),
                _ => ReadMode::Stale,
            };
            let consistency = match mode {
                ReadMode::Linearizable => Consistency::Linearizable,
                ReadMode::AtLeast(token) => Consistency::AtLeast(residency_types::Revision(token)),
                ReadMode::Stale => Consistency::Stale,
            };
            let outcome = read_outcome(client.lookup(&user(&key), consistency).await);
            recorder.record(Op {
                client: number,
                key,
                kind: OpKind::Read { mode },
                invoke,
                complete: recorder.now(),
                outcome,
            });
        }
    }
}

/// One of the crowd: assigns fresh users one after another until `stop`, keeping each answer
/// it was given; a write that failed may or may not have applied, and is not checked.
async fn crowd_loop(
    client: Arc<Client>,
    prefix: String,
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<Vec<residency_client::Assigned>>>,
) {
    let mut sequence = 0_u64;
    while !stop.load(Ordering::SeqCst) {
        sequence += 1;
        let answer = client
            .assign(
                &user(&format!("{prefix}-{sequence}")),
                Jurisdiction::US,
                &location(sequence % 3),
                None,
            )
            .await;
        if let Ok(assigned) = answer {
            acknowledged.lock().expect("crowd lock").push(assigned);
        }
    }
}

/// Every write the crowd was told succeeded is there, through every node, exactly as it was
/// acknowledged (applied once, at the revision of its answer). Returns how many were checked.
async fn crowd_kept(deployment: &Deployment, acknowledged: &[residency_client::Assigned]) -> usize {
    for id in 1..=3 {
        let reader = deployment.client_for(id, Duration::from_secs(30));
        for chunk in acknowledged.chunks(residency_types::limits::BATCH_LOOKUP_IDS_MAX) {
            let ids: Vec<UserId> = chunk
                .iter()
                .map(|assigned| assigned.placement.user_id.clone())
                .collect();
            let read = reader
                .batch_lookup(&ids, Consistency::Linearizable)
                .await
                .unwrap_or_else(|error| panic!("the crowd's read on node {id}: {error}"));
            assert_eq!(
                read.placement.len(),
                chunk.len(),
                "node {id} answered {} of {} users",
                read.placement.len(),
                chunk.len()
            );
            for (assigned, found) in chunk.iter().zip(&read.placement) {
                assert_eq!(
                    found.as_ref(),
                    Some(&assigned.placement),
                    "node {id}: an acknowledged crowd write is lost or was applied otherwise"
                );
            }
        }
    }
    acknowledged.len()
}

/// How a lookup ended, for the history.
fn read_outcome(
    answer: Result<
        residency_client::Read<Option<residency_types::Placement>>,
        residency_client::ClientError,
    >,
) -> Outcome {
    match answer {
        Ok(read) => Outcome::Ok {
            value: read
                .placement
                .as_ref()
                .map(|placement| placement.reason.as_str().to_string()),
            revision: read
                .placement
                .as_ref()
                .map_or(0, |placement| placement.mod_revision.0),
            read_at: read.revision.0,
        },
        Err(_) => Outcome::Unknown,
    }
}

/// How an assign ended, for the history: a failure of any kind may still apply.
fn write_outcome(
    answer: Result<residency_client::Assigned, residency_client::ClientError>,
) -> Outcome {
    match answer {
        Ok(assigned) => Outcome::Ok {
            value: None,
            revision: assigned.placement.mod_revision.0,
            read_at: assigned.revision.0,
        },
        Err(_) => Outcome::Unknown,
    }
}

/// A node other than `not`.
fn other_than(not: u64) -> u64 {
    if not == 1 { 2 } else { 1 }
}

/// The number of times node `id`'s log says `needle` (its container's log spans restarts).
fn log_count(deployment: &Deployment, id: u64, needle: &str) -> usize {
    let output = std::process::Command::new("docker")
        .args(["logs", &deployment.container(id)])
        .output()
        .expect("docker logs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.matches(needle).count()
}

/// Strikes and heals one fault; returns a line for the run's report.
async fn strike(deployment: &Deployment, fault: Fault, rng: &mut Rng) -> String {
    let leader = deployment.wait_leader().await;
    match fault {
        Fault::KillLeader | Fault::KillFollower => {
            let victim = if fault == Fault::KillLeader {
                leader
            } else {
                other_than(leader)
            };
            deployment.kill(victim);
            tokio::time::sleep(FAULT_HOLD).await;
            deployment.start(victim);
            format!("killed node {victim} (leader {leader}) for {FAULT_HOLD:?}")
        }
        Fault::PauseLeader => {
            deployment.pause(leader);
            tokio::time::sleep(FAULT_HOLD).await;
            deployment.unpause(leader);
            format!("froze leader {leader} for {FAULT_HOLD:?}")
        }
        Fault::PartitionLeader => {
            deployment.partition(leader, Cut::Both);
            tokio::time::sleep(FAULT_HOLD).await;
            deployment.heal(leader);
            format!("cut leader {leader} off its peers for {FAULT_HOLD:?}")
        }
        Fault::AsymmetricPartition => {
            let cut = if rng.next(2) == 0 {
                Cut::Outgoing
            } else {
                Cut::Incoming
            };
            deployment.partition(leader, cut);
            tokio::time::sleep(FAULT_HOLD).await;
            deployment.heal(leader);
            format!("cut leader {leader}'s {cut:?} peer traffic for {FAULT_HOLD:?}")
        }
        Fault::FlappingPartition => {
            let mut report = String::from("flapped:");
            for _ in 0..4 {
                let target = deployment
                    .leader_seen_by(1 + rng.next(3))
                    .await
                    .unwrap_or(leader);
                deployment.partition(target, Cut::Both);
                tokio::time::sleep(Duration::from_millis(1_000 + rng.next(1_000))).await;
                deployment.heal(target);
                tokio::time::sleep(Duration::from_millis(500 + rng.next(1_000))).await;
                let _ = write!(report, " {target}");
            }
            report
        }
        Fault::RollingRestart => {
            for id in 1..=3 {
                deployment.restart(id);
                deployment.wait_ready(id).await;
            }
            "restarted nodes 1, 2, 3 in turn, each ready before the next".to_string()
        }
        Fault::CrashDuringSnapshotInstall => crash_during_install(deployment, leader, rng).await,
    }
}

/// Writes, one after another, that push the log past the snapshot threshold (300 entries) and
/// the kept tail (50) while the follower is down. One at a time: writes sent together share
/// entries, and it is entries that count here.
const FILLER_WRITES: usize = 400;
/// Writers of fresh users that run through every fault, many at once, so that the leader puts
/// many writes in each entry and followers forward them in groups the whole time.
const CROWD_WRITERS: usize = 24;

/// Puts a follower behind a snapshot, restarts it, and kills it as soon as its log says it has
/// begun receiving the snapshot; then starts it again. Tries a few times to land the kill before
/// the install completes, and says whether it did.
async fn crash_during_install(deployment: &Deployment, leader: u64, rng: &mut Rng) -> String {
    const ATTEMPTS: usize = 3;
    let follower = other_than(leader);
    let writer = deployment.client(Duration::from_secs(30));
    for attempt in 1..=ATTEMPTS {
        // The follower came back from the previous attempt's crash (or the suite fails here).
        deployment.wait_ready(follower).await;
        deployment.kill(follower);
        // Enough entries for the leader to snapshot and drop the log the follower needs.
        for batch in 0..4 {
            let items: Vec<residency_types::AssignItem> = (0..200)
                .map(|n| residency_types::AssignItem {
                    user_id: user(&format!(
                        "filler-{}-{attempt}-{batch}-{n}",
                        rng.next(1 << 40)
                    )),
                    residency: Jurisdiction::US,
                    location_id: location(n % 3),
                    expected_mod_revision: None,
                })
                .collect();
            writer
                .batch_assign(&items, None)
                .await
                .expect("filler batch");
        }
        // Single writes, one after another: each waits for the last, so each is an entry.
        let prefix = format!("filler-{}-{attempt}", rng.next(1 << 40));
        for n in 0..FILLER_WRITES {
            writer
                .assign(
                    &user(&format!("{prefix}-{n}")),
                    Jurisdiction::US,
                    &location(0),
                    None,
                )
                .await
                .expect("filler write");
        }
        let receiving = log_count(deployment, follower, "receiving a snapshot");
        let installed = log_count(deployment, follower, "snapshot installed");
        deployment.start(follower);
        let deadline = Instant::now() + Duration::from_secs(30);
        while log_count(deployment, follower, "receiving a snapshot") == receiving {
            assert!(
                Instant::now() < deadline,
                "node {follower} never began receiving a snapshot"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        deployment.kill(follower);
        let interrupted = log_count(deployment, follower, "snapshot installed") == installed;
        deployment.start(follower);
        if interrupted {
            return format!(
                "killed node {follower} while it received a snapshot (attempt {attempt}), \
                 restarted it"
            );
        }
    }
    format!("node {follower}'s install finished before each of {ATTEMPTS} kills landed")
}

/// Waits until every node reports the same revision, then checks their digests agree.
async fn digests_agree(deployment: &Deployment) -> (u64, String) {
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        let mut digests = Vec::new();
        for id in 1..=3 {
            let digest = deployment
                .client_for(id, Duration::from_secs(10))
                .digest()
                .await
                .map(|digest| (digest.revision, digest.sha256_hex));
            digests.push(digest);
        }
        if let [Ok(first), Ok(second), Ok(third)] = digests.as_slice()
            && first.0 == second.0
            && second.0 == third.0
        {
            assert!(
                first.1 == second.1 && second.1 == third.1,
                "replicas disagree at revision {}: {digests:?}",
                first.0
            );
            return first.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the replicas did not reach one revision: {digests:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One run of one fault. Panics with a report if a promise is broken.
async fn run_fault(deployment: &Deployment, fault: Fault, run: usize, seed: u64) -> String {
    let keys: Arc<Vec<String>> = Arc::new(
        (0..USERS)
            .map(|n| format!("{}-{run}-u{n}", fault.name()))
            .collect(),
    );
    let recorder = Arc::new(Recorder {
        started: Instant::now(),
        ops: Mutex::default(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let crowd_client = Arc::new(deployment.client(CALL_TIMEOUT));
    let mut crowd = Vec::new();
    for writer in 0..CROWD_WRITERS {
        crowd.push(tokio::spawn(crowd_loop(
            crowd_client.clone(),
            format!("crowd-{}-{run}-{writer}", fault.name()),
            stop.clone(),
            acknowledged.clone(),
        )));
    }
    let mut clients = Vec::new();
    for number in 0..CLIENTS {
        clients.push(tokio::spawn(client_loop(
            deployment.client(CALL_TIMEOUT),
            number,
            keys.clone(),
            recorder.clone(),
            stop.clone(),
            seed,
        )));
    }
    tokio::time::sleep(FAULT_AFTER).await;
    let mut rng = Rng(seed | 1);
    let report = strike(deployment, fault, &mut rng).await;
    tokio::time::sleep(AFTER_HEAL).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients.into_iter().chain(crowd) {
        client.await.expect("client task");
    }

    // Healed: a final write per user succeeds, and linearizable reads through every node see it.
    deployment.wait_all_ready().await;
    let finisher = deployment.client(Duration::from_secs(30));
    for key in keys.iter() {
        let invoke = recorder.now();
        let value = format!("final-{key}");
        let options = WriteOptions {
            reason: value.clone(),
            ..WriteOptions::default()
        };
        let assigned = finisher
            .assign(&user(key), Jurisdiction::US, &location(0), Some(options))
            .await
            .unwrap_or_else(|error| panic!("the final write to {key} failed: {error}"));
        recorder.record(Op {
            client: 100,
            key: key.clone(),
            kind: OpKind::Write { value },
            invoke,
            complete: recorder.now(),
            outcome: Outcome::Ok {
                value: None,
                revision: assigned.placement.mod_revision.0,
                read_at: assigned.revision.0,
            },
        });
    }
    let mut final_reads = Vec::new();
    for id in 1..=3 {
        let reader = deployment.client_for(id, Duration::from_secs(30));
        for key in keys.iter() {
            let invoke = recorder.now();
            let answer = reader.lookup(&user(key), Consistency::Linearizable).await;
            if let Err(error) = &answer {
                panic!("the final read of {key} on node {id}: {error}");
            }
            final_reads.push(Op {
                client: 200 + u32::try_from(id).expect("small"),
                key: key.clone(),
                kind: OpKind::Read {
                    mode: ReadMode::Linearizable,
                },
                invoke,
                complete: recorder.now(),
                outcome: read_outcome(answer),
            });
        }
    }
    let (revision, _) = digests_agree(deployment).await;
    let crowd_writes = {
        let acknowledged = acknowledged.lock().expect("crowd lock").clone();
        crowd_kept(deployment, &acknowledged).await
    };

    let mut ops = recorder.ops.lock().expect("history lock").clone();
    let violations = history::check_final(&ops, &final_reads);
    ops.extend(final_reads);
    let mut violations_all = history::check(&ops);
    violations_all.extend(violations);
    let count = |pick: fn(&Op) -> bool| ops.iter().filter(|op| pick(op)).count();
    let summary = format!(
        "{} run {run}: {report}; {} ops ({} writes acknowledged, {} unknown; {} reads \
         answered), {crowd_writes} crowd writes acknowledged and all kept, replicas agree at \
         revision {revision}",
        fault.name(),
        ops.len(),
        count(|op| matches!(op.kind, OpKind::Write { .. })
            && matches!(op.outcome, Outcome::Ok { .. })),
        count(|op| op.outcome == Outcome::Unknown),
        count(
            |op| matches!(op.kind, OpKind::Read { .. }) && matches!(op.outcome, Outcome::Ok { .. })
        ),
    );
    if !violations_all.is_empty() {
        let path = deployment
            .dir
            .join(format!("history-{}-{run}.txt", fault.name()));
        let mut text = format!("seed {seed}\n{summary}\n");
        for op in &ops {
            let _ = writeln!(text, "{op:?}");
        }
        std::fs::write(&path, text).expect("history file");
        panic!(
            "{summary}\n{} violations, first: {:?}\nseed {seed}; history in {}",
            violations_all.len(),
            &violations_all[..violations_all.len().min(5)],
            path.display()
        );
    }
    summary
}

#[test]
fn every_fault_keeps_every_promise() {
    let runs: usize = std::env::var("RESIDENCY_FAULT_RUNS")
        .ok()
        .map(|runs| runs.parse().expect("RESIDENCY_FAULT_RUNS is a number"))
        .unwrap_or(1);
    let faults: Vec<Fault> = match std::env::var("RESIDENCY_FAULTS") {
        Ok(names) => names
            .split(',')
            .map(|name| {
                Fault::ALL
                    .into_iter()
                    .find(|fault| fault.name() == name.trim())
                    .unwrap_or_else(|| panic!("no fault named {name:?}"))
            })
            .collect(),
        Err(_) => Fault::ALL.to_vec(),
    };
    let seed: u64 = std::env::var("RESIDENCY_FAULT_SEED")
        .ok()
        .map(|seed| seed.parse().expect("RESIDENCY_FAULT_SEED is a number"))
        .unwrap_or_else(|| {
            u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos()
                    % u128::from(u64::MAX),
            )
            .expect("fits")
        });
    eprintln!("fault suite: seed {seed}, {runs} run(s) of {faults:?}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let deployment = Deployment::up("faults", RAFT).await;
        let started = Instant::now();
        let run_seed = AtomicU64::new(seed);
        for run in 1..=runs {
            for fault in &faults {
                let fault_started = Instant::now();
                let this_seed = run_seed.fetch_add(1, Ordering::SeqCst);
                let summary = run_fault(&deployment, *fault, run, this_seed).await;
                eprintln!(
                    "ok {summary} ({:.0} s)",
                    fault_started.elapsed().as_secs_f64()
                );
            }
        }
        eprintln!(
            "fault suite: {} runs passed in {:.0} s",
            runs * faults.len(),
            started.elapsed().as_secs_f64()
        );
    });
}
