//! A backup taken from a follower while writes go on restores into a fresh three-node cluster
//! that holds exactly what the backup covered, agrees on one digest, and takes writes.

use residency_tests::{Cluster, serially};
use residency_types::{Consistency, UserId};

use crate::{DEFAULT_RAFT, assign, user};

#[test]
fn a_backup_under_writes_restores_into_a_new_cluster() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        for n in 0..50 {
            assign(&client, &format!("kept-{n}"), "us-east-1/pg-1").await;
        }
        let leader = cluster.wait_for_leader(None).await;
        let follower = (1..=3).find(|id| *id != leader).expect("a follower");
        let scratch = tempfile::tempdir().expect("scratch dir");
        let backup = scratch.path().join("registry.backup");
        let writer = cluster.client();
        let backup_client = cluster.client_for(follower);
        let (summary, written) = tokio::join!(backup_client.backup_to(&backup), async {
            let mut written = Vec::new();
            for n in 0..30 {
                written.push(assign(&writer, &format!("during-{n}"), "us-west-2/pg-2").await);
            }
            written
        });
        let summary = summary.expect("backup taken");
        assert_eq!(summary.node_id, follower);
        assert!(std::fs::metadata(&backup).expect("backup file").len() == summary.size_bytes);
        drop(cluster);

        let restored = Cluster::start_restored(&backup, 3, DEFAULT_RAFT).await;
        let client = restored.client();
        let kept: Vec<UserId> = (0..50).map(|n| user(&format!("kept-{n}"))).collect();
        let read = client
            .batch_lookup(&kept, Consistency::Linearizable)
            .await
            .expect("lookup");
        assert!(
            read.placement.iter().all(Option::is_some),
            "a write from before the backup is missing"
        );
        // Writes made during the backup are there exactly when the backup's revision covers them.
        for placement in &written {
            let found = client
                .lookup(&placement.user_id, Consistency::Linearizable)
                .await
                .expect("lookup")
                .placement;
            assert_eq!(
                found.is_some(),
                placement.mod_revision.0 <= summary.revision,
                "{}",
                placement.user_id
            );
        }
        assign(&client, "after-restore", "us-central-1/pg-3").await;
        let mut digests = Vec::new();
        let leader = restored.wait_for_leader(None).await;
        let last = restored
            .member_status(leader)
            .await
            .last_log_index
            .expect("log");
        for id in 1..=3 {
            restored.wait_applied(id, last).await;
            let digest = restored.client_for(id).digest().await.expect("digest");
            digests.push((digest.revision, digest.sha256_hex));
        }
        assert!(
            digests.windows(2).all(|pair| pair[0] == pair[1]),
            "restored replicas disagree: {digests:?}"
        );
    });
}
