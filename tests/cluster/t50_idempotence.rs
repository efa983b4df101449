//! A retried write (same request id) returns the first result and applies once, whichever
//! node it is sent to.

use residency_client::WriteOptions;
use residency_tests::{Cluster, serially};
use residency_types::{Consistency, Jurisdiction, ReasonCode};

use crate::{DEFAULT_RAFT, location, user};

#[test]
fn a_retried_write_applies_once() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let options = || {
            Some(WriteOptions {
                request_id: Some("retry-42".to_string()),
                ..WriteOptions::default()
            })
        };
        let first = cluster
            .client_for(1)
            .assign(
                &user("retried"),
                Jurisdiction::US,
                &location("us-east-1/pg-1"),
                options(),
            )
            .await
            .expect("first");
        // Another write moves the placement on; a late retry of the first must not undo it.
        let second = cluster
            .client_for(2)
            .assign(
                &user("retried"),
                Jurisdiction::US,
                &location("us-west-2/pg-2"),
                None,
            )
            .await
            .expect("second");
        for id in 1..=3 {
            let retry = cluster
                .client_for(id)
                .assign(
                    &user("retried"),
                    Jurisdiction::US,
                    &location("us-east-1/pg-1"),
                    options(),
                )
                .await
                .expect("retry");
            assert_eq!(
                retry, first,
                "retry through node {id} returns the first result"
            );
        }
        let read = cluster
            .client()
            .lookup(&user("retried"), Consistency::Linearizable)
            .await
            .expect("lookup");
        assert_eq!(
            read.placement,
            Some(second.placement),
            "the retry was applied again"
        );

        // The same id for a different write is refused, and changes nothing.
        let reused = cluster
            .client()
            .assign(
                &user("someone-else"),
                Jurisdiction::US,
                &location("us-east-1/pg-1"),
                options(),
            )
            .await
            .expect_err("reuse refused");
        assert_eq!(reused.reason(), Some(ReasonCode::RequestIdReused));
        let read = cluster
            .client()
            .lookup(&user("someone-else"), Consistency::Linearizable)
            .await
            .expect("lookup");
        assert_eq!(read.placement, None);
    });
}
