//! The store against openraft's storage test suite, plus our own durability and corruption checks.
//!
//! - [`restart`]: what a reopened store keeps, including after its process is killed.
//! - [`log_corruption`]: damaged log and vote records stop the store from opening.
//! - [`snapshot_install`]: snapshots move state between stores, and damaged ones change nothing.
//! - [`snapshot_build`]: a build (and a digest) sees the state at its start while writes go on.
//! - [`snapshot_file`]: the snapshot file format on its own.
//!
//! Every test opens its store in a temp dir and drops every handle to it (log store, state
//! machine, reader) before reopening the same directory: sled holds a file lock while any lives.

mod determinism;
mod grouped;
mod layers;
mod leader_appends;
mod log_corruption;
mod reads;
mod redo;
mod restart;
mod restore_backup;
mod snapshot_build;
mod snapshot_file;
mod snapshot_install;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, Membership};
use residency_types::{
    AssignItem, CallerId, Command, Jurisdiction, Labels, LocationId, Outcome, Proposal,
    ProposalResult, ReasonText, RequestId, UserId, WriteBody,
};

use crate::{
    Entry, LogId, LogStore, NodeId, NodeInfo, StateMachineStore, StateReader, StorageError,
    StoreOptions, StoredMembership, TypeConfig,
};

pub(crate) fn test_options() -> StoreOptions {
    StoreOptions {
        cache_capacity_bytes: 16 * 1024 * 1024,
    }
}

struct TempStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempStoreBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log_store, state_machine, _) = crate::open(dir.path(), test_options())
            .await
            .expect("store opens");
        Ok((dir, log_store, state_machine))
    }
}

#[test]
fn passes_the_openraft_storage_suite() {
    if let Err(error) = Suite::test_all(TempStoreBuilder) {
        panic!("the store fails openraft's storage suite: {error}");
    }
}

/// Every handle `crate::open` returns. Dropping it releases the directory for a reopen.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) log: LogStore,
    pub(crate) state_machine: StateMachineStore,
    pub(crate) reader: StateReader,
}

pub(crate) async fn open_store(dir: &Path) -> Store {
    let (log, state_machine, reader) = crate::open(dir, test_options())
        .await
        .expect("the store opens");
    Store {
        log,
        state_machine,
        reader,
    }
}

/// The node every test entry was proposed by.
const LEADER: NodeId = 1;

pub(crate) fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, LEADER), index)
}

pub(crate) fn node(id: NodeId) -> NodeInfo {
    NodeInfo {
        client_addr: format!("10.0.0.{id}:7000"),
        peer_addr: format!("10.0.0.{id}:7001"),
        jurisdiction: "US".to_string(),
    }
}

pub(crate) fn membership(voters: &[NodeId]) -> Membership<NodeId, NodeInfo> {
    let ids: BTreeSet<NodeId> = voters.iter().copied().collect();
    let nodes: BTreeMap<NodeId, NodeInfo> = voters.iter().map(|&id| (id, node(id))).collect();
    Membership::new(vec![ids], nodes)
}

pub(crate) fn stored_membership(term: u64, index: u64, voters: &[NodeId]) -> StoredMembership {
    StoredMembership::new(Some(log_id(term, index)), membership(voters))
}

pub(crate) fn membership_entry(term: u64, index: u64, voters: &[NodeId]) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(membership(voters)),
    }
}

pub(crate) fn blank_entry(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Blank,
    }
}

pub(crate) fn write_entry(term: u64, index: u64, command: Command) -> Entry {
    group_entry(term, index, vec![command])
}

/// An entry of several writes, as the leader groups them.
pub(crate) fn group_entry(term: u64, index: u64, commands: Vec<Command>) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Proposal::new(commands)),
    }
}

/// A write of `body` by the tests' caller, under `request_id`.
pub(crate) fn command(request_id: &str, body: WriteBody) -> Command {
    Command {
        request_id: RequestId::parse(request_id).expect("test request ids are valid"),
        caller: CallerId::parse("store-tests").expect("test caller is valid"),
        caller_authenticated: false,
        reason: ReasonText::parse("store test").expect("test reason is valid"),
        stamped_at_ms: 1_767_225_600_000,
        body,
    }
}

/// `request_id` assigns `user_id` to `residency` at `location_id`, unconditionally.
pub(crate) fn assign(
    request_id: &str,
    user_id: &str,
    residency: &str,
    location_id: &str,
) -> Command {
    command(
        request_id,
        WriteBody::Assign(AssignItem {
            user_id: user(user_id),
            residency: jurisdiction(residency),
            location_id: location(location_id),
            expected_mod_revision: None,
        }),
    )
}

pub(crate) fn user(user_id: &str) -> UserId {
    UserId::parse(user_id).expect("test user ids are valid")
}

fn jurisdiction(code: &str) -> Jurisdiction {
    Jurisdiction::parse(code).expect("test jurisdictions are valid")
}

fn location(location_id: &str) -> LocationId {
    LocationId::parse(location_id).expect("test locations are valid")
}

/// The locations the tests place users in, with the jurisdiction each lies in.
const LOCATIONS: [(&str, &str); 4] = [
    ("us-east-1/pg-1", "US"),
    ("us-west-2/pg-2", "US"),
    ("ca-central-1/pg-7", "CA"),
    ("eu-central-1/pg-3", "DE"),
];

/// The residencies the tests assign: each stores in, and is accessed from, itself only.
const POLICIES: [&str; 3] = ["US", "CA", "DE"];

/// The catalog every assign needs (apply refuses one to an unregistered location, or without
/// a policy allowing storage there): registers `LOCATIONS`, then writes `POLICIES`.
fn catalog() -> Vec<Command> {
    let locations = LOCATIONS.iter().map(|(location_id, code)| {
        command(
            // A request id takes no '/'.
            &format!("seed-location-{}", location_id.replace('/', ":")),
            WriteBody::PutLocation {
                location_id: location(location_id),
                jurisdiction: jurisdiction(code),
                labels: Labels::default(),
            },
        )
    });
    let policies = POLICIES.iter().map(|code| {
        let own = BTreeSet::from([jurisdiction(code)]);
        command(
            &format!("seed-policy-{code}"),
            WriteBody::PutPolicy {
                residency: jurisdiction(code),
                storage: own.clone(),
                access: own,
            },
        )
    });
    locations.chain(policies).collect()
}

/// The index of the first entry after `seeded_history`: where a test's own entries begin.
pub(crate) const SEEDED: u64 = 2 + (LOCATIONS.len() + POLICIES.len()) as u64;

/// The start of every log the tests apply: the initial membership of `voters` at index 0, the
/// term-1 leader's blank entry at 1, then the catalog's writes at `2..SEEDED`.
pub(crate) fn seeded_history(voters: &[NodeId]) -> Vec<Entry> {
    let mut entries = vec![membership_entry(0, 0, voters), blank_entry(1, 1)];
    entries.extend(
        (2..)
            .zip(catalog())
            .map(|(index, command)| write_entry(1, index, command)),
    );
    assert_eq!(entries.len() as u64, SEEDED);
    entries
}

/// Panics unless every write among `results` was accepted: a refused assign would leave its
/// user unplaced and let a lookup's `None` pass for something else.
pub(crate) fn assert_accepted(results: &[ProposalResult]) {
    for result in results.iter().flat_map(|entry| &entry.results) {
        if let Some(Outcome::Rejected(rejection)) = &result.outcome {
            panic!(
                "the write at revision {} was refused: {rejection:?}",
                result.revision
            );
        }
    }
}
