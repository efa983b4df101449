//! The client library on a real cluster: a stream of writes across a leader kill applies each
//! write exactly once and loses none; a revision token read from another node sees the write
//! it came from; reads that allow it are spread over the nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use residency_client::{WatchItem, WriteOptions};
use residency_tests::{Cluster, serially, us_location};
use residency_types::{Change, Consistency, Jurisdiction, Revision};

use crate::{DEFAULT_RAFT, assign, location, user};

const WRITES: usize = 60;
/// The write after which the leader is killed.
const KILL_AFTER: usize = 20;

#[test]
fn writes_across_a_leader_kill_apply_once_and_none_is_lost() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = Arc::new(cluster.client());
        let start = client
            .current_revision(Consistency::Linearizable)
            .await
            .expect("current revision");
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let writer = {
            let client = client.clone();
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                let mut placements = Vec::new();
                for n in 0..WRITES {
                    // "Must not exist yet": a write applied twice would fail its second time
                    // with a conflict instead of answering the first result.
                    let options = WriteOptions {
                        expected_mod_revision: Some(Revision(0)),
                        request_id: Some(format!("failover-write-{n}")),
                        reason: "failover test".to_string(),
                    };
                    let assigned = client
                        .assign(
                            &user(&format!("failover-{n}")),
                            Jurisdiction::US,
                            &location(us_location(n)),
                            Some(options),
                        )
                        .await
                        .unwrap_or_else(|error| panic!("write {n} across the failover: {error}"));
                    assert!(assigned.created, "write {n} found its user already placed");
                    placements.push(assigned.placement);
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
                placements
            })
        };
        while acknowledged.load(Ordering::SeqCst) < KILL_AFTER {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let leader = cluster.wait_for_leader(None).await;
        cluster.node(leader).kill();
        let placements = writer.await.expect("writer task");

        // Every acknowledged write is there, as acknowledged.
        let ids: Vec<_> = placements.iter().map(|p| p.user_id.clone()).collect();
        let read = client
            .batch_lookup(&ids, Consistency::Linearizable)
            .await
            .expect("batch lookup");
        for (written, found) in placements.iter().zip(&read.placement) {
            assert_eq!(found.as_ref(), Some(written), "acknowledged write lost");
        }
        // And each was applied exactly once: one change per user in the history.
        let last = placements.last().expect("writes").mod_revision;
        let mut watcher = client.watch(Revision(start.0 + 1), "failover-", None);
        let mut changes: BTreeMap<String, usize> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "the history did not reach {last}"
            );
            match watcher.next().await.expect("watch") {
                Some(WatchItem::Event(event)) => {
                    if let Change::Placed(placement) = &event.change {
                        *changes.entry(placement.user_id.to_string()).or_default() += 1;
                    }
                    if event.revision >= last {
                        break;
                    }
                }
                Some(WatchItem::Progress(revision)) if revision >= last => break,
                Some(WatchItem::Progress(_)) => {}
                None => panic!("the watch ended"),
            }
        }
        assert_eq!(changes.len(), WRITES, "users changed: {changes:?}");
        assert!(
            changes.values().all(|count| *count == 1),
            "a write applied more than once: {changes:?}"
        );
    });
}

#[test]
fn a_token_from_a_write_reads_the_write_on_a_node_that_was_behind() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let leader = cluster.wait_for_leader(None).await;
        let behind = *cluster
            .nodes
            .keys()
            .find(|id| **id != leader)
            .expect("a follower");
        let writer = cluster.client_for(leader);
        // The follower is frozen while the writes commit on the other two nodes.
        cluster.node(behind).freeze();
        let mut last = None;
        for n in 0..10 {
            last = Some(assign(&writer, &format!("token-{n}"), us_location(n)).await);
        }
        let last = last.expect("writes");
        assert_eq!(writer.highest_revision(), last.mod_revision);
        cluster.node(behind).thaw();

        let reader = cluster.client_for(behind);
        let read = reader
            .lookup(
                &user("token-9"),
                Consistency::AtLeast(writer.highest_revision()),
            )
            .await
            .expect("read at the token");
        assert_eq!(read.served_by, behind);
        assert!(read.revision >= last.mod_revision);
        assert_eq!(read.placement.as_ref(), Some(&last));
    });
}

#[test]
fn reads_your_writes_spread_over_every_node() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        let mut served_by = BTreeSet::new();
        for n in 0..30 {
            let written = assign(&client, &format!("spread-{n}"), us_location(n)).await;
            let read = client
                .lookup(&user(&format!("spread-{n}")), client.read_your_writes())
                .await
                .expect("read your write");
            assert_eq!(
                read.placement.as_ref(),
                Some(&written),
                "read {n} missed its write"
            );
            served_by.insert(read.served_by);
        }
        assert_eq!(
            served_by.len(),
            3,
            "token reads should rotate over every node, went to {served_by:?}"
        );
    });
}
