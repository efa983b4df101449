//! Malformed input is refused with INVALID_ARGUMENT and a stable reason before anything is
//! proposed: the log does not grow on any node.

use residency_proto::metadata;
use residency_proto::pb::{
    AssignRequest, BatchLookupRequest, Consistency, ForgetRequest, LookupRequest, WriteContext,
};
use residency_tests::{Cluster, serially};
use residency_types::ReasonCode;

use crate::DEFAULT_RAFT;

fn context(request_id: &str) -> Option<WriteContext> {
    Some(WriteContext {
        request_id: request_id.to_string(),
        caller: String::new(),
        reason: String::new(),
    })
}

fn assign(user_id: &str, residency: &str, location_id: &str, request_id: &str) -> AssignRequest {
    AssignRequest {
        user_id: user_id.to_string(),
        residency: residency.to_string(),
        location_id: location_id.to_string(),
        expected_mod_revision: None,
        context: context(request_id),
    }
}

#[test]
fn malformed_input_is_refused_and_the_log_does_not_grow() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let mut log_before = Vec::new();
        for id in 1..=3 {
            log_before.push(cluster.member_status(id).await.last_log_index);
        }
        let assigns = [
            (assign("", "US", "l", "r1"), ReasonCode::InvalidUserId),
            (
                assign("has space", "US", "l", "r2"),
                ReasonCode::InvalidUserId,
            ),
            (
                assign(&"u".repeat(129), "US", "l", "r3"),
                ReasonCode::InvalidUserId,
            ),
            (
                assign("u1", "us", "l", "r4"),
                ReasonCode::InvalidJurisdiction,
            ),
            (
                assign("u1", "XX", "l", "r5"),
                ReasonCode::InvalidJurisdiction,
            ),
            (assign("u1", "US", "", "r6"), ReasonCode::InvalidLocationId),
            (
                assign("u1", "US", "l with space", "r7"),
                ReasonCode::InvalidLocationId,
            ),
            (assign("u1", "US", "l", ""), ReasonCode::InvalidRequestId),
            (
                AssignRequest {
                    context: None,
                    ..assign("u1", "US", "l", "x")
                },
                ReasonCode::InvalidRequestId,
            ),
        ];
        for id in 1..=3 {
            let mut raw = cluster.raw_registry(id).await;
            for (request, reason) in assigns.clone() {
                let status = raw.assign(request.clone()).await.expect_err("refused");
                assert_eq!(status.code(), tonic::Code::InvalidArgument, "{request:?}");
                assert_eq!(
                    metadata::reason(&status),
                    Some(reason),
                    "{request:?}: {}",
                    status.message()
                );
            }
            let forget = ForgetRequest {
                user_id: "bad/id".into(),
                expected_mod_revision: None,
                context: context("f1"),
            };
            let status = raw.forget(forget).await.expect_err("refused");
            assert_eq!(metadata::reason(&status), Some(ReasonCode::InvalidUserId));
            let lookup = LookupRequest {
                user_id: "u1".into(),
                consistency: Some(Consistency {
                    mode: 99,
                    at_least_revision: 0,
                }),
            };
            let status = raw.lookup(lookup).await.expect_err("refused");
            assert_eq!(
                metadata::reason(&status),
                Some(ReasonCode::InvalidConsistency)
            );
            let too_many = BatchLookupRequest {
                user_ids: vec!["u".into(); 1_001],
                consistency: None,
            };
            let status = raw.batch_lookup(too_many).await.expect_err("refused");
            assert_eq!(metadata::reason(&status), Some(ReasonCode::BatchTooLarge));
            let empty = BatchLookupRequest {
                user_ids: Vec::new(),
                consistency: None,
            };
            assert_eq!(
                raw.batch_lookup(empty).await.expect_err("refused").code(),
                tonic::Code::InvalidArgument
            );
        }
        for id in 1..=3 {
            let after = cluster.member_status(id).await.last_log_index;
            assert_eq!(
                after,
                log_before[(id - 1) as usize],
                "node {id}'s log grew on refused input"
            );
        }
    });
}
