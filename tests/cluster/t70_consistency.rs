//! Consistency modes: an AT_LEAST read waits for its token and fails clearly when the node
//! cannot reach it in time; a revision mismatch is FAILED_PRECONDITION; a missing user is
//! reported with the revision it was read at.

use std::time::Duration;

use residency_client::WriteOptions;
use residency_tests::{Cluster, serially};
use residency_types::{Consistency, Jurisdiction, ReasonCode, Revision};

use crate::{DEFAULT_RAFT, assign, location, user};

#[test]
fn at_least_reads_honour_their_token_or_fail_with_a_reason() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let written = assign(&cluster.client(), "token-user", "us-central-1/pg-3").await;
        for id in 1..=3 {
            let token = Consistency::AtLeast(written.mod_revision);
            let read = cluster
                .client_for(id)
                .lookup(&user("token-user"), token)
                .await
                .expect("at-least read");
            assert_eq!(read.placement.as_ref(), Some(&written));
            assert!(read.revision >= written.mod_revision);
        }
        let impossible = Consistency::AtLeast(Revision(written.mod_revision.0 + 1_000_000));
        let error = cluster
            .impatient_client_for(2, Duration::from_millis(700))
            .lookup(&user("token-user"), impossible)
            .await
            .expect_err("a token from the future cannot be met");
        assert_eq!(
            error.reason(),
            Some(ReasonCode::RevisionNotReached),
            "{error}"
        );

        let missing = cluster
            .client()
            .lookup(&user("nobody"), Consistency::Linearizable)
            .await
            .expect("lookup");
        assert_eq!(missing.placement, None);
        assert!(missing.revision >= written.mod_revision);
    });
}

#[test]
fn compare_and_set_refuses_a_stale_expected_revision() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        let first = assign(&client, "cas-user", "us-east-1/pg-1").await;
        let stale = WriteOptions {
            expected_mod_revision: Some(Revision(first.mod_revision.0 + 5)),
            ..WriteOptions::default()
        };
        let error = client
            .assign(
                &user("cas-user"),
                Jurisdiction::US,
                &location("us-west-2/pg-2"),
                Some(stale),
            )
            .await
            .expect_err("stale expectation refused");
        assert_eq!(error.reason(), Some(ReasonCode::RevisionMismatch));
        let current = WriteOptions {
            expected_mod_revision: Some(first.mod_revision),
            ..WriteOptions::default()
        };
        let moved = client
            .assign(
                &user("cas-user"),
                Jurisdiction::US,
                &location("us-west-2/pg-2"),
                Some(current),
            )
            .await
            .expect("matching expectation applies");
        assert_eq!(moved.placement.create_revision, first.create_revision);
        let create_only = WriteOptions {
            expected_mod_revision: Some(Revision(0)),
            ..WriteOptions::default()
        };
        let error = client
            .forget(&user("cas-user"), Some(create_only))
            .await
            .expect_err("expected absent, but present");
        assert_eq!(error.reason(), Some(ReasonCode::RevisionMismatch));
        client
            .forget(&user("cas-user"), None)
            .await
            .expect("forget");
        let error = client
            .forget(&user("cas-user"), None)
            .await
            .expect_err("already gone");
        assert_eq!(error.reason(), Some(ReasonCode::UserNotFound));
    });
}
