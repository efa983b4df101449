//! Three-node clusters of real `residencyd` processes on loopback: replication, forwarding,
//! leader loss, restart from disk, catch-up by snapshot, idempotent retries, and refusal of
//! malformed input; the client library and its cache; membership, backup, the CLI, watch; mutual TLS, roles and the audit file. One
//! binary, one cluster at a time.

mod t100_security;
mod t10_replication;
mod t15_grouped_writes;
mod t20_leader_loss;
mod t30_restart;
mod t40_snapshot_catch_up;
mod t50_idempotence;
mod t60_bad_input;
mod t61_hostile_input;
mod t70_consistency;
mod t72_client;
mod t80_residency_rules;
mod t85_cached_checker;
mod t90_membership;
mod t95_backup_restore;
mod t96_cli;
mod t97_large_batches;
mod t98_readiness;
mod t99_watch;

use residency_client::{Client, WriteOptions};
use residency_types::{AssignItem, Jurisdiction, LocationId, Placement, UserId};

/// The `[raft]` section most tests use: the shipped defaults.
pub const DEFAULT_RAFT: &str =
    "heartbeat_interval_ms = 100\nelection_timeout_ms_min = 1000\nelection_timeout_ms_max = 3000";

pub fn user(id: &str) -> UserId {
    UserId::parse(id).expect("valid user id")
}

pub fn location(id: &str) -> LocationId {
    LocationId::parse(id).expect("valid location id")
}

/// Assigns `user` to `location` and returns the placement the registry acknowledged.
pub async fn assign(client: &Client, user_id: &str, location_id: &str) -> Placement {
    client
        .assign(
            &user(user_id),
            Jurisdiction::US,
            &location(location_id),
            None,
        )
        .await
        .unwrap_or_else(|error| panic!("assign {user_id}: {error}"))
        .placement
}

/// Writes `batches` batches of 500 US placements, the `n`th user of batch `b` named
/// `user_of(b, n)` and placed in `us_location(n)`, each batch under request id `{tag}-{b}`.
pub async fn assign_batches(
    client: &Client,
    tag: &str,
    batches: usize,
    user_of: impl Fn(usize, usize) -> String,
) {
    for batch in 0..batches {
        let items: Vec<AssignItem> = (0..500)
            .map(|n| AssignItem {
                user_id: user(&user_of(batch, n)),
                residency: Jurisdiction::US,
                location_id: location(residency_tests::us_location(n)),
                expected_mod_revision: None,
            })
            .collect();
        let options = WriteOptions {
            request_id: Some(format!("{tag}-{batch}")),
            ..WriteOptions::default()
        };
        client
            .batch_assign(&items, Some(options))
            .await
            .unwrap_or_else(|error| panic!("batch {tag}-{batch}: {error}"));
    }
}
