//! A node kept down while the others snapshot and purge their logs catches up by installing
//! the leader's snapshot.

use residency_tests::{Cluster, serially, us_location};
use residency_types::{Consistency, UserId};

use crate::assign;

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
