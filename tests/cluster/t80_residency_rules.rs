//! The residency rules on a real cluster: no path puts a US user's data outside the US, sent to
//! any node; CheckAccess answers by the policy and fails closed; a move survives a leader
//! change with its epoch raised exactly once; and every replica ends with the same digest.

use std::collections::BTreeSet;

use residency_client::{ClientError, WriteOptions};
use residency_tests::{Cluster, serially};
use residency_types::{
    AccessOperation, AssignItem, Consistency, Decision, DenyReason, Jurisdiction, Labels,
    LocationState, ReasonCode,
};

use crate::{DEFAULT_RAFT, assign, location, user};

fn jurisdiction(code: &str) -> Jurisdiction {
    Jurisdiction::parse(code).expect("valid jurisdiction")
}

fn codes(list: &[&str]) -> BTreeSet<Jurisdiction> {
    list.iter().map(|code| jurisdiction(code)).collect()
}

/// The revision and digest of every node, once all have applied the same revision.
async fn digests(cluster: &Cluster) -> Vec<(u64, String)> {
    let leader = cluster.wait_for_leader(None).await;
    let last = cluster
        .member_status(leader)
        .await
        .last_log_index
        .expect("the leader has a log");
    let mut digests = Vec::new();
    for id in 1..=3 {
        cluster.wait_applied(id, last).await;
        let digest = cluster.client_for(id).digest().await.expect("digest");
        assert_eq!(digest.node_id, id);
        digests.push((digest.revision, digest.sha256_hex));
    }
    digests
}

fn refused_with(result: Result<impl std::fmt::Debug, ClientError>, reason: ReasonCode) {
    match result {
        Err(error) => assert_eq!(error.reason(), Some(reason), "{error}"),
        Ok(answer) => panic!("expected {reason}, the write was accepted: {answer:?}"),
    }
}

#[test]
fn no_path_puts_a_us_users_data_outside_the_us() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let leader = cluster.wait_for_leader(None).await;
        let follower = cluster.client_for((1..=3).find(|id| *id != leader).expect("a follower"));
        assign(&cluster.client(), "alice", "us-east-1/pg-1").await;
        let before = digests(&cluster).await;
        let germany = location("eu-central-1/pg-9");
        let us = Jurisdiction::US;

        refused_with(
            follower.assign(&user("carol"), us, &germany, None).await,
            ReasonCode::StorageJurisdictionNotAllowed,
        );
        refused_with(
            follower.assign(&user("alice"), us, &germany, None).await,
            ReasonCode::StorageJurisdictionNotAllowed,
        );
        let batch = [
            AssignItem {
                user_id: user("dave"),
                residency: us,
                location_id: location("us-west-2/pg-2"),
                expected_mod_revision: None,
            },
            AssignItem {
                user_id: user("erin"),
                residency: us,
                location_id: germany.clone(),
                expected_mod_revision: None,
            },
        ];
        match follower.batch_assign(&batch, None).await {
            Err(ClientError::Status {
                reason: Some(ReasonCode::BatchRefused),
                refused_items,
                ..
            }) => {
                assert_eq!(refused_items.len(), 1);
                assert_eq!(
                    (refused_items[0].0, refused_items[0].1.as_str()),
                    (1, "STORAGE_JURISDICTION_NOT_ALLOWED")
                );
            }
            other => panic!("the batch should have been refused: {other:?}"),
        }
        refused_with(
            follower.begin_move(&user("alice"), &germany, None).await,
            ReasonCode::StorageJurisdictionNotAllowed,
        );
        refused_with(
            follower
                .put_location(
                    &location("us-east-1/pg-1"),
                    jurisdiction("DE"),
                    &Labels::default(),
                    None,
                )
                .await,
            ReasonCode::LocationJurisdictionImmutable,
        );
        refused_with(
            follower
                .put_policy(us, &codes(&["DE"]), &codes(&["US"]), None)
                .await,
            ReasonCode::PolicyBreach,
        );
        refused_with(
            follower
                .set_location_state(&location("us-east-1/pg-1"), LocationState::Retired, None)
                .await,
            ReasonCode::LocationInUse,
        );
        let after = digests(&cluster).await;
        assert_eq!(
            after, before,
            "a refused write changed the state or the revision"
        );
        assert_eq!(
            cluster
                .client()
                .lookup(&user("dave"), Consistency::Linearizable)
                .await
                .expect("lookup")
                .placement,
            None
        );

        // Two writes race: a policy that drops DE, and an assign into DE. Whatever order the log
        // gives them, the later one is refused and no US placement is left in breach.
        let client = cluster.client();
        client
            .put_policy(us, &codes(&["US", "DE"]), &codes(&["US"]), None)
            .await
            .expect("policy allows DE");
        for round in 0..5 {
            let racer = format!("racer-{round}");
            let (first, second) = (cluster.client_for(1), cluster.client_for(2));
            let (racer_id, narrowed_storage, access) =
                (user(&racer), codes(&["US"]), codes(&["US"]));
            let (assigned, narrowed) = tokio::join!(
                first.assign(&racer_id, us, &germany, None),
                second.put_policy(us, &narrowed_storage, &access, None),
            );
            assert!(
                !(assigned.is_ok() && narrowed.is_ok()),
                "both racing writes applied"
            );
            let policy = client
                .get_policy(us, Consistency::Linearizable)
                .await
                .expect("policy")
                .value;
            let dry_run = client
                .dry_run_policy(us, &policy.storage, Consistency::Linearizable)
                .await
                .expect("dry run");
            assert_eq!(
                dry_run.placements_in_breach, 0,
                "round {round} left a placement in breach"
            );
            if assigned.is_ok() {
                client
                    .forget(&user(&racer), None)
                    .await
                    .expect("forget the racer");
            }
            client
                .put_policy(us, &codes(&["US", "DE"]), &codes(&["US"]), None)
                .await
                .expect("policy allows DE again");
        }
    });
}

#[test]
fn check_access_answers_by_the_policy_and_fails_closed() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        assign(&client, "alice", "us-east-1/pg-1").await;
        let dieter = user("dieter");
        client
            .assign(
                &dieter,
                jurisdiction("DE"),
                &location("eu-central-1/pg-9"),
                None,
            )
            .await
            .expect("DE user");
        assign(&client, "mover", "us-east-1/pg-1").await;
        client
            .begin_move(&user("mover"), &location("us-west-2/pg-2"), None)
            .await
            .expect("move begun");

        let deny = |reason| Decision::Deny { reason };
        let cases = [
            ("alice", "US", AccessOperation::Write, None),
            (
                "alice",
                "DE",
                AccessOperation::Read,
                Some(deny(DenyReason::AccessorJurisdictionNotAllowed)),
            ),
            (
                "nobody",
                "US",
                AccessOperation::Read,
                Some(deny(DenyReason::UnknownUser)),
            ),
            (
                "mover",
                "US",
                AccessOperation::Write,
                Some(deny(DenyReason::UserMoving)),
            ),
            ("mover", "US", AccessOperation::Read, None),
            ("dieter", "US", AccessOperation::Read, None),
            (
                "dieter",
                "CN",
                AccessOperation::Read,
                Some(deny(DenyReason::AccessorJurisdictionNotAllowed)),
            ),
        ];
        for id in 1..=3 {
            for (user_id, accessor, operation, expected) in &cases {
                let checked = cluster
                    .client_for(id)
                    .check_access(
                        &user(user_id),
                        "payments",
                        jurisdiction(accessor),
                        *operation,
                        Consistency::Linearizable,
                    )
                    .await
                    .expect("check");
                match expected {
                    Some(expected) => assert_eq!(
                        &checked.decision, expected,
                        "{user_id} from {accessor} on node {id}"
                    ),
                    None => assert!(
                        matches!(checked.decision, Decision::Allow { .. }),
                        "{user_id} from {accessor}: {checked:?}"
                    ),
                }
            }
        }
        // A residency with no policy: the user cannot even be placed, so it is unknown; and a
        // malformed check is an error (which callers must treat as a deny), not an allow.
        let error = client
            .check_access(
                &user("alice"),
                "",
                Jurisdiction::US,
                AccessOperation::Read,
                Consistency::Linearizable,
            )
            .await
            .expect_err("an accessor without a service is refused");
        assert_eq!(error.reason(), Some(ReasonCode::InvalidAccessor));
        refused_with(
            client
                .assign(
                    &user("carl"),
                    jurisdiction("CA"),
                    &location("us-east-1/pg-1"),
                    None,
                )
                .await,
            ReasonCode::NoPolicy,
        );
    });
}

#[test]
fn a_move_survives_a_leader_change_and_raises_the_epoch_once() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        let placed = assign(&client, "traveller", "us-east-1/pg-1").await;
        let begun = client
            .begin_move(&user("traveller"), &location("us-west-2/pg-2"), None)
            .await
            .expect("begun");
        assert_eq!(begun.placement.epoch, placed.epoch);

        let old_leader = cluster.wait_for_leader(None).await;
        cluster.node(old_leader).kill();
        cluster.wait_for_leader(Some(old_leader)).await;
        let read = client
            .lookup(&user("traveller"), Consistency::Linearizable)
            .await
            .expect("lookup");
        let moving = read.placement.expect("placed");
        assert_eq!(
            moving.state.move_target().map(|target| target.as_str()),
            Some("us-west-2/pg-2")
        );

        let once = || {
            let request_id = Some("complete-traveller".to_string());
            Some(WriteOptions {
                request_id,
                ..WriteOptions::default()
            })
        };
        let completed = client
            .complete_move(&user("traveller"), once())
            .await
            .expect("completed on the new leader");
        assert_eq!(completed.placement.location_id.as_str(), "us-west-2/pg-2");
        assert_eq!(completed.placement.epoch, placed.epoch + 1);
        // A retry of the completion (same request id) answers the first result and does not
        // raise the epoch again; a new completion is refused.
        let retried = client
            .complete_move(&user("traveller"), once())
            .await
            .expect("the retry answers the first result");
        assert_eq!(retried, completed);
        refused_with(
            client.complete_move(&user("traveller"), None).await,
            ReasonCode::UserNotMoving,
        );
        let read = client
            .lookup(&user("traveller"), Consistency::Linearizable)
            .await
            .expect("lookup");
        assert_eq!(read.placement.expect("placed").epoch, placed.epoch + 1);

        cluster.restart(old_leader);
        cluster.wait_serving(old_leader).await;
        let all = digests(&cluster).await;
        assert!(
            all.windows(2).all(|pair| pair[0] == pair[1]),
            "replicas disagree: {all:?}"
        );
        assert!(all[0].0 >= completed.revision.0);
    });
}
