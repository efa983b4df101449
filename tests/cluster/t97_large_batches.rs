//! Large writes: a batch over the command size limit is refused before it reaches the log, and
//! a follower that missed more than a client message's worth of large batches catches up from
//! the log (replication messages are sized for the largest commands).

use residency_proto::metadata;
use residency_proto::pb::{AssignItem as PbItem, BatchAssignRequest, WriteContext};
use residency_tests::{Cluster, serially};
use residency_types::{Consistency, ReasonCode};

use crate::{DEFAULT_RAFT, assign_batches, user};

#[test]
fn an_oversized_batch_is_refused_before_the_log() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let leader = cluster.wait_for_leader(None).await;
        let before = cluster.member_status(leader).await.last_log_index;
        let items = (0..500)
            .map(|n| PbItem {
                user_id: format!("{n:0>128}"),
                residency: "US".into(),
                location_id: "us-east-1/pg-1".into(),
                expected_mod_revision: None,
            })
            .collect();
        let context = Some(WriteContext {
            request_id: "oversized".into(),
            caller: String::new(),
            reason: String::new(),
        });
        let mut raw = cluster.raw_registry(leader).await;
        let status = raw
            .batch_assign(BatchAssignRequest { items, context })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            metadata::reason(&status),
            Some(ReasonCode::BatchTooLarge),
            "{}",
            status.message()
        );
        assert_eq!(
            cluster.member_status(leader).await.last_log_index,
            before,
            "the log grew"
        );
    });
}

/// openraft 0.9 gives each AppendEntries one heartbeat interval to complete. A debug build on a
/// loaded 2-core machine applies 500-placement batches slowly, so this test gives replication
/// the slack a cluster taking bulk loads would be configured with.
const BULK_RAFT: &str =
    "heartbeat_interval_ms = 500\nelection_timeout_ms_min = 2500\nelection_timeout_ms_max = 6000";

#[test]
fn a_follower_behind_many_large_batches_catches_up_from_the_log() {
    serially(|| async {
        let mut cluster = Cluster::start(3, BULK_RAFT).await;
        let leader = cluster.wait_for_leader(None).await;
        let lagging = (1..=3).find(|id| *id != leader).expect("a follower");
        cluster.node(lagging).kill();
        let client = cluster.client();
        // 100 batches of 500 placements with longish ids: about 4 MB of log, more than one
        // client-sized (4 MiB) message and many replication messages.
        assign_batches(&client, "large", 100, |batch, n| {
            format!("large-batch-user-{batch:04}-{n:04}-padding-padding")
        })
        .await;
        let leader = cluster.wait_for_leader(None).await;
        let last = cluster
            .member_status(leader)
            .await
            .last_log_index
            .expect("log");
        cluster.restart(lagging);
        cluster.wait_serving(lagging).await;
        // Applying 60,000 placements takes a while in a debug build on a loaded machine.
        cluster
            .wait_applied_within(lagging, last, std::time::Duration::from_secs(180))
            .await;
        let status = cluster.member_status(lagging).await;
        assert_eq!(
            status.snapshot_index, None,
            "it should have caught up from the log, not a snapshot"
        );
        let read = cluster
            .client_for(lagging)
            .lookup(
                &user("large-batch-user-0099-0499-padding-padding"),
                Consistency::Stale,
            )
            .await
            .expect("lookup");
        assert!(read.placement.is_some());
    });
}
