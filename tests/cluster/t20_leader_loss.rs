//! SIGKILL of the leader: a new leader is elected, writes continue, and no acknowledged write
//! is lost.

use residency_tests::{Cluster, serially, us_location};
use residency_types::{Consistency, UserId};

use crate::{DEFAULT_RAFT, assign, user};

#[test]
fn killing_the_leader_loses_no_acknowledged_write() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        let mut acknowledged = Vec::new();
        for n in 0..40 {
            acknowledged.push(assign(&client, &format!("before-{n}"), us_location(n)).await);
        }
        let old_leader = cluster.wait_for_leader(None).await;
        cluster.node(old_leader).kill();
        let new_leader = cluster.wait_for_leader(Some(old_leader)).await;
        assert_ne!(new_leader, old_leader);

        for n in 0..20 {
            acknowledged.push(assign(&client, &format!("after-{n}"), us_location(n + 1)).await);
        }
        let ids: Vec<UserId> = acknowledged
            .iter()
            .map(|placement| placement.user_id.clone())
            .collect();
        let read = client
            .batch_lookup(&ids, Consistency::Linearizable)
            .await
            .expect("batch lookup");
        for (placement, found) in acknowledged.iter().zip(&read.placement) {
            assert_eq!(found.as_ref(), Some(placement), "acknowledged write lost");
        }

        // The old leader comes back as a follower and catches up on what it missed.
        cluster.restart(old_leader);
        cluster.wait_serving(old_leader).await;
        let last = acknowledged.last().expect("writes").mod_revision;
        cluster.wait_applied(old_leader, last.0).await;
        let read = cluster
            .client_for(old_leader)
            .lookup(&user("after-19"), Consistency::Stale)
            .await
            .expect("stale");
        assert_eq!(read.placement.as_ref(), acknowledged.last());
    });
}
