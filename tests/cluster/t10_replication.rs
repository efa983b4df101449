//! Writes reach every node, and a write sent to a follower is forwarded to the leader.

use residency_tests::{Cluster, serially};
use residency_types::Consistency;

use crate::{DEFAULT_RAFT, assign, user};

#[test]
fn writes_through_a_follower_replicate_to_every_node() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let leader = cluster.wait_for_leader(None).await;
        let follower = (1..=3).find(|id| *id != leader).expect("a follower");
        let written = assign(
            &cluster.client_for(follower),
            "replicated-user",
            "us-east-1/pg-1",
        )
        .await;

        for id in 1..=3 {
            let client = cluster.client_for(id);
            let read = client
                .lookup(&user("replicated-user"), Consistency::Linearizable)
                .await
                .expect("lookup");
            assert_eq!(
                read.placement.as_ref(),
                Some(&written),
                "linearizable read on node {id}"
            );
            assert!(
                read.revision >= written.mod_revision,
                "node {id} answered from before the write"
            );
            assert_eq!(read.served_by, id);

            let token = Consistency::AtLeast(written.mod_revision);
            let read = client
                .lookup(&user("replicated-user"), token)
                .await
                .expect("lookup at token");
            assert_eq!(
                read.placement.as_ref(),
                Some(&written),
                "at-least read on node {id}"
            );
        }
        // A stale read needs no quorum, but every node has applied the write by now.
        for id in 1..=3 {
            cluster.wait_applied(id, written.mod_revision.0).await;
            let read = cluster
                .client_for(id)
                .lookup(&user("replicated-user"), Consistency::Stale)
                .await
                .expect("stale");
            assert_eq!(
                read.placement.as_ref(),
                Some(&written),
                "stale read on node {id}"
            );
            assert!(
                read.millis_since_leader_contact
                    .is_some_and(|millis| millis < 60_000)
            );
        }
    });
}
