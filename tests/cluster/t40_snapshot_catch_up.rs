//! A node kept down while the others snapshot and purge their logs catches up by installing
//! the leader's snapshot; a learner joining a purged cluster of 100,000 placements installs
//! one snapshot, however long the install takes, and agrees on the digest.

use std::time::Duration;

use residency_tests::{Cluster, serially, us_location};
use residency_types::{Consistency, UserId};

use crate::{assign, assign_batches, user};

/// Snapshot every 50 entries and keep no log behind a snapshot, so a node that misses 200
/// writes can only catch up from a snapshot.
const SNAPSHOT_OFTEN: &str = "heartbeat_interval_ms = 100\nelection_timeout_ms_min = 1000\n\
election_timeout_ms_max = 3000\nsnapshot_logs_since_last = 50\nmax_in_snapshot_log_to_keep = 0";

#[test]
fn a_node_down_past_a_snapshot_catches_up_by_installing_it() {
    serially(|| async {
        let mut cluster = Cluster::start(3, SNAPSHOT_OFTEN).await;
        let leader = cluster.wait_for_leader(None).await;
        let lagging = (1..=3).find(|id| *id != leader).expect("a follower");
        let before = cluster
            .member_status(lagging)
            .await
            .last_log_index
            .unwrap_or(0);
        cluster.node(lagging).kill();

        let client = cluster.client();
        let mut written = Vec::new();
        for n in 0..200 {
            written.push(assign(&client, &format!("snap-{n}"), us_location(n)).await);
        }
        let leader = cluster.wait_for_leader(None).await;
        let leader_status = cluster.member_status(leader).await;
        let purged = leader_status
            .purged_index
            .expect("the leader purged its log after snapshotting");
        assert!(
            purged > before,
            "the leader still holds the entries the lagging node misses"
        );

        cluster.restart(lagging);
        cluster.wait_serving(lagging).await;
        let last = written.last().expect("writes").mod_revision;
        cluster.wait_applied(lagging, last.0).await;
        let status = cluster.member_status(lagging).await;
        let snapshot = status
            .snapshot_index
            .expect("the lagging node installed a snapshot");
        assert!(
            snapshot > before,
            "snapshot {snapshot} does not cover the missed entries after {before}"
        );

        let ids: Vec<UserId> = written
            .iter()
            .map(|placement| placement.user_id.clone())
            .collect();
        let read = cluster
            .client_for(lagging)
            .batch_lookup(&ids, Consistency::Stale)
            .await
            .expect("stale batch");
        for (placement, found) in written.iter().zip(&read.placement) {
            assert_eq!(
                found.as_ref(),
                Some(placement),
                "missing after snapshot install"
            );
        }
    });
}

/// A snapshot chunk must be answered within this (`install_snapshot_timeout_ms`), less than
/// the learner below takes to install its snapshot (it adopts the received base file after
/// checking every block: about 80 ms for 100,000 placements in a debug build): only the last
/// chunk, which waits for the install, may take longer. A chunk that misses it is sent again.
const CHUNK_DEADLINE_MS: u64 = 25;

/// Small chunks with a short deadline each, long heartbeats for a debug build taking bulk
/// loads (as in `t97_large_batches`), and a snapshot every 20 entries with no log kept behind.
fn short_chunks_raft() -> String {
    format!(
        "heartbeat_interval_ms = 500\nelection_timeout_ms_min = 2500\nelection_timeout_ms_max = 6000\n\
         snapshot_logs_since_last = 20\nmax_in_snapshot_log_to_keep = 0\n\
         snapshot_chunk_bytes_max = 262144\ninstall_snapshot_timeout_ms = {CHUNK_DEADLINE_MS}"
    )
}

/// `line` without its terminal colour codes (`ESC [ ... m`).
fn plain(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The seconds of each install the node's log reports, in order.
fn install_seconds(log: &str) -> Vec<f64> {
    log.lines()
        .map(plain)
        .filter(|line| line.contains("snapshot install answered"))
        .filter_map(|line| {
            let (_, after) = line.split_once("seconds=")?;
            after.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[test]
fn a_learner_joining_after_the_log_is_purged_installs_one_snapshot_however_long_the_install() {
    serially(|| async {
        let raft = short_chunks_raft();
        let mut cluster = Cluster::start(3, &raft).await;
        let client = cluster.client();
        // 100,000 placements in batches of 500.
        assign_batches(&client, "learner", 200, |batch, n| {
            format!("learner-{batch:03}-{n:03}")
        })
        .await;
        let leader = cluster.wait_for_leader(None).await;
        let leader_status = cluster.member_status(leader).await;
        let last = leader_status.last_log_index.expect("log");
        assert!(
            leader_status.purged_index.is_some(),
            "the leader purged its log"
        );

        let newcomer = cluster.add_node("US", &raft).await;
        client
            .add_learner(&cluster.nodes[&newcomer].peer_addr())
            .await
            .expect("learner added");
        cluster
            .wait_applied_within(newcomer, last, Duration::from_secs(300))
            .await;
        let status = cluster.member_status(newcomer).await;
        assert!(
            status.snapshot_index.is_some(),
            "the learner caught up without a snapshot"
        );

        // Received and installed once, although the install took longer than a chunk may.
        let log = cluster.node_log(newcomer);
        let received = log
            .lines()
            .filter(|line| plain(line).contains("snapshot received; installing it"))
            .count();
        assert_eq!(received, 1, "the snapshot was sent {received} times");
        let installs = install_seconds(&log);
        assert_eq!(installs.len(), 1, "installs: {installs:?}");
        assert!(
            installs[0] * 1000.0 > CHUNK_DEADLINE_MS as f64,
            "the install took {} s, within one chunk's deadline: the test proves nothing",
            installs[0]
        );

        // Every replica holds the same state.
        let mut digests = Vec::new();
        for id in [1, 2, 3, newcomer] {
            let digest = cluster.client_for(id).digest().await.expect("digest");
            digests.push((digest.revision, digest.sha256_hex));
        }
        assert!(
            digests.windows(2).all(|pair| pair[0] == pair[1]),
            "replicas differ: {digests:?}"
        );
        let read = cluster
            .client_for(newcomer)
            .lookup(&user("learner-199-499"), Consistency::Stale)
            .await
            .expect("lookup");
        assert!(read.placement.is_some());
    });
}

/// Entries that carry many writes each fill sled long before `snapshot_logs_since_last`
/// entries: past `snapshot_live_changes_max` changes in its live tree, a node builds a
/// snapshot anyway, moving them into its base file.
#[test]
fn a_node_whose_live_tree_fills_builds_a_snapshot_before_the_entry_count_asks() {
    serially(|| async {
        let raft = "heartbeat_interval_ms = 500\nelection_timeout_ms_min = 2500\n\
                    election_timeout_ms_max = 6000\nsnapshot_logs_since_last = 1000000\n\
                    snapshot_live_changes_max = 2000";
        let cluster = Cluster::start(3, raft).await;
        let client = cluster.client();
        // 6 entries of 500 placements: far below 1,000,000 entries, above 2,000 changes.
        assign_batches(&client, "full", 6, |batch, n| {
            format!("full-{batch:03}-{n:03}")
        })
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for id in [1, 2, 3] {
            loop {
                let status = cluster.member_status(id).await;
                if status.snapshot_index.is_some() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "node {id} built no snapshot although its live tree is full"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
}
