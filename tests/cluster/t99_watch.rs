//! Watch on a real cluster: under concurrent writers every acknowledged change arrives once and
//! in order, across a leader kill, and across the loss of the node the watcher was reading from;
//! a watcher that stops reading is cut off with WATCHER_TOO_SLOW instead of growing the node.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use residency_client::{Client, WatchItem, Watcher};
use residency_tests::{Cluster, serially};
use residency_types::{AssignItem, Change, Jurisdiction, ReasonCode, Revision};

use crate::{DEFAULT_RAFT, assign};

/// Reads the watcher until it has delivered every revision in `wanted`; returns the (revision,
/// index) of every event it delivered, in delivery order.
async fn collect(watcher: &mut Watcher<'_>, wanted: &BTreeSet<u64>) -> Vec<(u64, u32)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let mut revisions = BTreeSet::new();
    while !wanted.is_subset(&revisions) {
        assert!(
            Instant::now() < deadline,
            "missing revisions: {:?}",
            wanted.difference(&revisions).collect::<Vec<_>>()
        );
        match watcher.next().await.expect("watch") {
            Some(WatchItem::Event(event)) => {
                assert!(
                    matches!(event.change, Change::Placed(_)),
                    "the prefix filter let through {event:?}"
                );
                revisions.insert(event.revision.0);
                seen.push((event.revision.0, event.index));
            }
            Some(WatchItem::Progress(_)) => {}
            None => panic!("the watch ended"),
        }
    }
    seen
}

async fn write_burst(client: &Client, prefix: &str, count: usize) -> Vec<u64> {
    let mut revisions = Vec::new();
    for n in 0..count {
        revisions.push(
            assign(client, &format!("{prefix}-{n}"), "us-east-1/pg-1")
                .await
                .mod_revision
                .0,
        );
    }
    revisions
}

fn assert_ordered_once(seen: &[(u64, u32)]) {
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "events out of order or repeated: {seen:?}"
    );
}

#[test]
fn watch_delivers_every_change_once_in_order_across_failures() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let start = cluster.client().status().await.expect("status").members[0]
            .applied_index
            .unwrap_or(0)
            + 1;
        let leader = cluster.wait_for_leader(None).await;
        let follower = (1..=3).find(|id| *id != leader).expect("a follower");
        // The watcher reads from a follower first; its list of endpoints lets it move on.
        let endpoints: Vec<String> = std::iter::once(follower)
            .chain((1..=3).filter(|id| *id != follower))
            .map(|id| cluster.nodes[&id].client_addr())
            .collect();
        let watch_client = Client::new(
            endpoints,
            cluster
                .security
                .options("operator", std::time::Duration::from_secs(10)),
        )
        .expect("client");
        let mut watcher = watch_client.watch(Revision(start), "w-", None);

        // Two writers at once.
        let (first, second) = (cluster.client_for(1), cluster.client_for(2));
        let (a, b) = tokio::join!(
            write_burst(&first, "w-a", 40),
            write_burst(&second, "w-b", 40)
        );
        let mut wanted: BTreeSet<u64> = a.into_iter().chain(b).collect();
        // Writes the watcher must not see (another prefix).
        write_burst(&cluster.client(), "other", 5).await;
        let mut seen = collect(&mut watcher, &wanted).await;

        // The leader dies; writes go on through the new one.
        cluster.node(leader).kill();
        cluster.wait_for_leader(Some(leader)).await;
        let more = write_burst(&cluster.client(), "w-c", 20).await;
        wanted.extend(more.iter().copied());
        seen.extend(collect(&mut watcher, &more.into_iter().collect()).await);

        // The node the watcher reads from dies too (the first is restarted to keep a quorum).
        cluster.restart(leader);
        cluster.wait_serving(leader).await;
        cluster.node(follower).kill();
        cluster.wait_for_leader(Some(follower)).await;
        let last = write_burst(&cluster.client(), "w-d", 20).await;
        wanted.extend(last.iter().copied());
        seen.extend(collect(&mut watcher, &last.into_iter().collect()).await);

        assert_ordered_once(&seen);
        let delivered: BTreeSet<u64> = seen.iter().map(|(revision, _)| *revision).collect();
        assert_eq!(
            delivered, wanted,
            "the watcher saw revisions it should not have, or missed some"
        );
    });
}

/// Batches written while the slow watcher does not read, and users per batch: some 4 MB of
/// events, more than the node's buffer (256 messages) and HTTP/2's flow-control windows hold.
const SLOW_BATCHES: usize = 60;
const SLOW_BATCH_USERS: usize = 500;

/// A watch may start past what the node serving it has applied: a cache that listed the state
/// on one node and watches another, ahead by a few entries. Found by the CachedChecker test,
/// whose cache received an event from before its listing: the node had moved the watch's start
/// back to its own applied revision. Here the start is far ahead, so the mistake cannot hide.
#[test]
fn a_watch_from_ahead_of_the_node_delivers_nothing_before_its_start() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        let applied = client.status().await.expect("status").members[0]
            .applied_index
            .unwrap_or(0);
        let from = applied + 40;
        let mut watcher = client.watch(Revision(from), "ahead-", None);
        // The watch connects on its first read: wait for its first (idle) progress notice, so
        // that the node serves it while it is still behind the start.
        match watcher.next().await.expect("watch") {
            Some(WatchItem::Progress(_)) => {}
            other => panic!("expected an idle progress notice first, got {other:?}"),
        }
        let written = write_burst(&client, "ahead", 60).await;
        let wanted: BTreeSet<u64> = written.iter().copied().filter(|r| *r >= from).collect();
        assert!(!wanted.is_empty(), "the burst passed the watch's start");
        let seen = collect(&mut watcher, &wanted).await;
        assert!(
            seen.iter().all(|(revision, _)| *revision >= from),
            "events from before the watch's start {from}: {seen:?}"
        );
        assert_ordered_once(&seen);
    });
}

#[test]
fn a_watcher_that_stops_reading_is_cut_off_with_a_reason() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        // A raw stream, so that nothing reads it until the test says so.
        let mut watch =
            residency_client::pb::watch_client::WatchClient::new(cluster.raw_channel(1).await);
        let mut stream = watch
            .watch(residency_client::pb::WatchRequest::default())
            .await
            .expect("watch")
            .into_inner();
        for batch in 0..SLOW_BATCHES {
            let items: Vec<AssignItem> = (0..SLOW_BATCH_USERS)
                .map(|n| AssignItem {
                    user_id: crate::user(&format!("slow-{batch}-{n}")),
                    residency: Jurisdiction::US,
                    location_id: crate::location(residency_tests::us_location(n)),
                    expected_mod_revision: None,
                })
                .collect();
            client.batch_assign(&items, None).await.expect("batch");
        }
        // Longer than the node waits for a watcher to read (5 s).
        tokio::time::sleep(Duration::from_secs(8)).await;
        let mut events = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            assert!(
                Instant::now() < deadline,
                "no WATCHER_TOO_SLOW after {events} messages: the node kept the watcher"
            );
            let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap_or_else(|_| panic!("the stream went quiet after {events} messages"));
            match message {
                Ok(Some(_)) => events += 1,
                Ok(None) => panic!("the stream ended without an error after {events} messages"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            residency_proto::metadata::reason(&status),
            Some(ReasonCode::WatcherTooSlow),
            "{status:?}"
        );
        assert!(
            events < SLOW_BATCHES * SLOW_BATCH_USERS,
            "the node buffered all {events} messages instead of cutting the watcher off"
        );
        // The node goes on serving.
        assign(&client, "after-slow", "us-east-1/pg-1").await;
    });
}
