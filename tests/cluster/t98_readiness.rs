//! `/readyz` says ready only when a node knows a leader that has its quorum and has applied
//! what the leader had committed after the node started; `/healthz` only that it runs.

use std::time::{Duration, Instant};

use residency_tests::{Cluster, LEADER_WAIT, serially};

use crate::{DEFAULT_RAFT, assign};

async fn wait_readiness(cluster: &Cluster, id: u64, ready: bool) {
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        let (status, body) = cluster.http_get(id, "/readyz");
        if status.contains("200") == ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} never became ready={ready}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn readiness_follows_the_quorum_and_the_catch_up() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        for id in 1..=3 {
            wait_readiness(&cluster, id, true).await;
        }
        let client = cluster.client();
        for n in 0..20 {
            assign(&client, &format!("ready-{n}"), "us-east-1/pg-1").await;
        }
        // With two of three nodes gone, the survivor has no quorum, whatever role it holds.
        let leader = cluster.wait_for_leader(None).await;
        let survivor = (1..=3).find(|id| *id != leader).expect("a follower");
        for id in (1..=3).filter(|id| *id != survivor) {
            cluster.node(id).kill();
        }
        wait_readiness(&cluster, survivor, false).await;
        let (health, _) = cluster.http_get(survivor, "/healthz");
        assert!(
            health.contains("200"),
            "a node without a quorum is still healthy: {health}"
        );
        for id in (1..=3).filter(|id| *id != survivor) {
            cluster.restart(id);
        }
        for id in 1..=3 {
            cluster.wait_serving(id).await;
            wait_readiness(&cluster, id, true).await;
        }
    });
}
