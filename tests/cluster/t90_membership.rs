//! Membership on a real cluster: a fourth node joins as a learner, is promoted once caught up,
//! and another member is removed while writes go on; a node declaring another jurisdiction is
//! refused (I6); a promotion that cannot finish is refused with the lag, and a second change
//! meanwhile is refused rather than interleaved.

use std::time::Duration;

use residency_tests::{Cluster, serially};
use residency_types::{Consistency, ReasonCode};

use crate::{DEFAULT_RAFT, assign, user};

fn voters(status: &residency_client::pb::StatusResponse) -> Vec<u64> {
    let voter = residency_client::pb::MemberRole::Voter as i32;
    status
        .members
        .iter()
        .filter(|member| member.role == voter)
        .map(|member| member.id)
        .collect()
}

#[test]
fn a_node_joins_as_learner_is_promoted_and_another_is_removed() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        for n in 0..30 {
            assign(&client, &format!("before-{n}"), "us-east-1/pg-1").await;
        }
        let newcomer = cluster.add_node("US", DEFAULT_RAFT).await;
        let peer_addr = cluster.nodes[&newcomer].peer_addr();
        let added = client.add_learner(&peer_addr).await.expect("learner added");
        let learner = added
            .members
            .iter()
            .find(|member| member.id == newcomer)
            .expect("listed");
        assert_eq!(
            learner.role,
            residency_client::pb::MemberRole::Learner as i32
        );
        assert_eq!(learner.jurisdiction, "US");
        let again = client
            .add_learner(&peer_addr)
            .await
            .expect_err("already a member");
        assert_eq!(again.reason(), Some(ReasonCode::MemberExists));

        client
            .promote(newcomer, 30_000, 10)
            .await
            .expect("promoted");
        let status = client.status().await.expect("status");
        assert_eq!(voters(&status), vec![1, 2, 3, newcomer]);

        // Remove the leader itself: the others elect a new one and go on.
        let leader = cluster.wait_for_leader(None).await;
        client.remove_member(leader).await.expect("removed");
        cluster.node(leader).stop();
        let after = cluster.wait_for_leader(Some(leader)).await;
        assert_ne!(after, leader);
        let status = cluster.client_for(after).status().await.expect("status");
        let mut expected: Vec<u64> = [1, 2, 3, newcomer]
            .into_iter()
            .filter(|id| *id != leader)
            .collect();
        expected.sort_unstable();
        assert_eq!(voters(&status), expected);

        let client = cluster.client_for(newcomer);
        assign(&client, "after-change", "us-west-2/pg-2").await;
        // The removed node cannot come back under its old id.
        cluster.restart(leader);
        cluster.wait_serving(leader).await;
        // Its client port accepts connections as soon as it is bound, before the node serves:
        // a status call to its peer port may find it still opening its store for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let rejoin = loop {
            let refused = client
                .add_learner(&cluster.nodes[&leader].peer_addr())
                .await
                .expect_err("id reused");
            let starting = refused.reason() == Some(ReasonCode::MemberUnreachable);
            if !starting || std::time::Instant::now() > deadline {
                break refused;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        assert_eq!(
            rejoin.reason(),
            Some(ReasonCode::MemberIdReused),
            "{rejoin}"
        );
        let read = client
            .lookup(&user("before-0"), Consistency::Linearizable)
            .await
            .expect("lookup");
        assert!(
            read.placement.is_some(),
            "the newcomer serves what was written before it joined"
        );
    });
}

#[test]
/// Without TLS a node's jurisdiction is what its config states, and AddLearner checks it (I6).
/// With TLS such a node cannot even start: see t100_security.
fn a_node_outside_the_required_jurisdiction_cannot_join() {
    serially(|| async {
        let mut cluster = Cluster::start_plaintext(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        let before = client.status().await.expect("status");
        let outsider = cluster.add_node("CA", DEFAULT_RAFT).await;
        let error = client
            .add_learner(&cluster.nodes[&outsider].peer_addr())
            .await
            .expect_err("refused");
        assert_eq!(
            error.reason(),
            Some(ReasonCode::MemberJurisdictionNotAllowed),
            "{error}"
        );
        let after = client.status().await.expect("status");
        let ids = |status: &residency_client::pb::StatusResponse| {
            status
                .members
                .iter()
                .map(|member| (member.id, member.role))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&after), ids(&before), "membership changed");
    });
}

#[test]
fn a_promotion_that_cannot_finish_is_refused_and_blocks_other_changes_meanwhile() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        let learner = cluster.add_node("US", DEFAULT_RAFT).await;
        client
            .add_learner(&cluster.nodes[&learner].peer_addr())
            .await
            .expect("learner added");
        // The learner stops and writes go on: it falls behind and cannot catch up.
        cluster.node(learner).kill();
        for n in 0..20 {
            assign(&client, &format!("meanwhile-{n}"), "us-east-1/pg-1").await;
        }
        let leader = cluster.wait_for_leader(None).await;
        let leader_client = cluster.client_for(leader);
        let promotion = leader_client.promote(learner, 3_000, 1);
        let other = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            leader_client.remove_member(learner).await
        };
        let (promoted, removed) = tokio::join!(promotion, other);
        let promoted = promoted.expect_err("a stopped learner cannot be promoted");
        assert_eq!(
            promoted.reason(),
            Some(ReasonCode::LearnerNotCaughtUp),
            "{promoted}"
        );
        let removed = removed.expect_err("a change during another is refused");
        assert_eq!(
            removed.reason(),
            Some(ReasonCode::AdminOperationInProgress),
            "{removed}"
        );
        // Even with a lag bound it meets, a learner that does not answer is not promoted.
        let unreachable = leader_client
            .promote(learner, 1_000, 1_000)
            .await
            .expect_err("unreachable");
        assert_eq!(
            unreachable.reason(),
            Some(ReasonCode::LearnerNotCaughtUp),
            "{unreachable}"
        );
        // Once the promotion gave up, the learner can be removed.
        leader_client.remove_member(learner).await.expect("removed");
        let status = leader_client.status().await.expect("status");
        assert!(status.members.iter().all(|member| member.id != learner));
    });
}
