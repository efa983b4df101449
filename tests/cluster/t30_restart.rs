//! Nodes restarted on their data directories come back with everything they had.

use residency_tests::{Cluster, serially};
use residency_types::{Consistency, UserId};

use crate::{DEFAULT_RAFT, assign, user};

#[test]
fn a_whole_cluster_restarted_from_disk_keeps_every_write() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        let mut written = Vec::new();
        for n in 0..30 {
            written.push(assign(&client, &format!("durable-{n}"), "us-central-1/pg-3").await);
        }
        // A follower crashes (SIGKILL) and the rest stop cleanly (SIGTERM).
        let leader = cluster.wait_for_leader(None).await;
        let follower = (1..=3).find(|id| *id != leader).expect("a follower");
        cluster.node(follower).kill();
        for id in (1..=3).filter(|id| *id != follower) {
            cluster.node(id).stop();
        }
        for id in 1..=3 {
            cluster.restart(id);
        }
        for id in 1..=3 {
            cluster.wait_serving(id).await;
        }
        cluster.wait_for_leader(None).await;

        let ids: Vec<UserId> = written
            .iter()
            .map(|placement| placement.user_id.clone())
            .collect();
        let read = cluster
            .client()
            .batch_lookup(&ids, Consistency::Linearizable)
            .await
            .expect("batch lookup");
        for (placement, found) in written.iter().zip(&read.placement) {
            assert_eq!(found.as_ref(), Some(placement), "write lost across restart");
        }
        // The crashed follower recovered its own copy from disk and the log.
        let last = written.last().expect("writes").mod_revision;
        cluster.wait_applied(follower, last.0).await;
        let stale = cluster
            .client_for(follower)
            .lookup(&user("durable-0"), Consistency::Stale)
            .await
            .expect("stale");
        assert_eq!(stale.placement.as_ref(), written.first());
    });
}

/// Peers hold their streams to a node open between messages (the leader's AppendEntries to
/// each follower, a follower's forwarded writes to the leader); a node that stops must end
/// the streams it serves rather than wait out its listeners' grace period for the peers.
#[test]
fn a_node_stopping_ends_the_streams_its_peers_hold_open() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let leader = cluster.wait_for_leader(None).await;
        let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        // Through a follower: it forwards to the leader on a stream; the leader replicates to
        // both followers on theirs.
        let written = assign(
            &cluster.client_for(followers[0]),
            "streams-held",
            "us-central-1/pg-3",
        )
        .await;
        for id in 1..=3 {
            cluster.wait_applied(id, written.mod_revision.0).await;
        }
        for id in [followers[1], leader] {
            cluster.node(id).stop();
            let log = cluster.node_log(id);
            assert!(
                log.contains("stopped"),
                "node {id} did not stop cleanly: {log}"
            );
            assert!(
                !log.contains("did not stop within the grace period"),
                "node {id} waited for its peers' streams: {log}"
            );
        }
    });
}
