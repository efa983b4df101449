//! Concurrent writes share log entries: sent through all three nodes at once, each is
//! acknowledged once with a revision that shows it, the log grows by fewer entries than there
//! were writes, and every replica ends with the same digest.

use std::sync::Arc;

use residency_client::{Client, WriteOptions};
use residency_tests::{Cluster, serially};
use residency_types::{Consistency, Jurisdiction, Revision};

use crate::{DEFAULT_RAFT, location, user};

/// Writes sent at once, a third through each node.
const CONCURRENT_WRITES: usize = 512;

#[test]
fn concurrent_writes_through_every_node_share_entries_and_each_is_acknowledged_once() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let leader = cluster.wait_for_leader(None).await;
        let log_before = cluster
            .member_status(leader)
            .await
            .last_log_index
            .expect("the leader has a log");
        let clients: Vec<Arc<Client>> =
            (1..=3).map(|id| Arc::new(cluster.client_for(id))).collect();
        let locations = ["us-east-1/pg-1", "us-west-2/pg-2", "us-central-1/pg-3"];
        let writes: Vec<_> = (0..CONCURRENT_WRITES)
            .map(|n| {
                let client = clients[n % 3].clone();
                let location_id = location(locations[n % locations.len()]);
                tokio::spawn(async move {
                    let options = WriteOptions {
                        request_id: Some(format!("grouped-{n}")),
                        ..WriteOptions::default()
                    };
                    let answer = client
                        .assign(
                            &user(&format!("grouped-{n}")),
                            Jurisdiction::US,
                            &location_id,
                            Some(options),
                        )
                        .await;
                    (n, answer)
                })
            })
            .collect();
        let mut answers = Vec::with_capacity(CONCURRENT_WRITES);
        for write in writes {
            let (n, answer) = write.await.expect("the writer task ends");
            let answer = answer.unwrap_or_else(|error| panic!("write {n} failed: {error}"));
            answers.push((n, answer));
        }
        assert_eq!(answers.len(), CONCURRENT_WRITES, "every write answered");

        let mut revisions = std::collections::BTreeSet::new();
        for (n, answer) in &answers {
            let placement = &answer.placement;
            assert!(answer.created, "write {n} created its user");
            assert_eq!(placement.user_id, user(&format!("grouped-{n}")));
            assert_eq!(
                (placement.create_revision, placement.mod_revision),
                (answer.revision, answer.revision),
                "write {n} was applied once, at the revision it was answered with"
            );
            assert_eq!(placement.epoch, 1, "write {n} was applied once");
            revisions.insert(answer.revision);
        }
        let log_after = cluster
            .member_status(leader)
            .await
            .last_log_index
            .expect("the leader has a log");
        let entries = log_after - log_before;
        println!("{CONCURRENT_WRITES} writes took {entries} log entries");
        assert!(
            entries < CONCURRENT_WRITES as u64,
            "{CONCURRENT_WRITES} writes took {entries} log entries: nothing was grouped"
        );
        assert!(
            revisions.len() < CONCURRENT_WRITES,
            "some writes share the revision of their entry"
        );

        // Each answer's revision shows its write, on every node: a read at least at that
        // revision finds the placement exactly as acknowledged.
        for (n, answer) in &answers {
            let node = (*n % 3) as u64 + 1;
            let read = cluster
                .client_for((node % 3) + 1)
                .lookup(
                    &answer.placement.user_id,
                    Consistency::AtLeast(answer.revision),
                )
                .await
                .unwrap_or_else(|error| panic!("read of write {n}: {error}"));
            assert!(read.revision >= answer.revision);
            assert_eq!(
                read.placement.as_ref(),
                Some(&answer.placement),
                "write {n} reads back as acknowledged"
            );
        }

        // A retry of any of them, through any node, answers the first result.
        for n in [0, CONCURRENT_WRITES / 2 + 1, CONCURRENT_WRITES - 1] {
            let first = &answers.iter().find(|(m, _)| *m == n).expect("answered").1;
            let options = WriteOptions {
                request_id: Some(format!("grouped-{n}")),
                ..WriteOptions::default()
            };
            let retry = cluster
                .client_for((n % 3) as u64 + 1)
                .assign(
                    &user(&format!("grouped-{n}")),
                    Jurisdiction::US,
                    &location(locations[n % locations.len()]),
                    Some(options),
                )
                .await
                .expect("retry");
            assert_eq!(
                &retry, first,
                "the retry of write {n} answers its first result"
            );
        }

        let last = revisions.last().copied().unwrap_or(Revision(0));
        let mut digests = Vec::new();
        for id in 1..=3 {
            cluster.wait_applied(id, last.0).await;
            let digest = cluster.client_for(id).digest().await.expect("digest");
            digests.push((digest.revision, digest.sha256_hex));
        }
        assert!(
            digests.windows(2).all(|pair| pair[0] == pair[1]),
            "replicas differ: {digests:?}"
        );
    });
}
