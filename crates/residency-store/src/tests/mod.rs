//! The store against openraft's storage test suite, plus our own durability and corruption checks.
//!
//! - [`restart`]: what a reopened store keeps, including after its process is killed.
//! - [`log_corruption`]: damaged log and vote records stop the store from opening.
//! - [`snapshot_install`]: snapshots move state between stores, and damaged ones change nothing.
//! - [`snapshot_file`]: the snapshot file format on its own.
//!
//! Every test opens its store in a temp dir and drops every handle to it (log store, state
//! machine, reader) before reopening the same directory: sled holds a file lock while any lives.

mod log_corruption;
mod reads;
mod restart;
mod snapshot_file;
mod snapshot_install;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, Membership};
use residency_types::{
    CallerId, Command, Jurisdiction, LocationId, ReasonText, RequestId, UserId, WriteBody,
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
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(command),
    }
}

/// `request_id` assigns `user_id` to `residency` at `location_id`, unconditionally.
pub(crate) fn assign(
    request_id: &str,
    user_id: &str,
    residency: &str,
    location_id: &str,
) -> Command {
    Command {
        request_id: RequestId::parse(request_id).expect("test request ids are valid"),
        caller: CallerId::parse("store-tests").expect("test caller is valid"),
        reason: ReasonText::parse("store test").expect("test reason is valid"),
        stamped_at_ms: 1_767_225_600_000,
        body: WriteBody::Assign {
            user_id: user(user_id),
            residency: Jurisdiction::parse(residency).expect("test jurisdictions are valid"),
            location_id: LocationId::parse(location_id).expect("test locations are valid"),
            expected_mod_revision: None,
        },
    }
}

pub(crate) fn user(user_id: &str) -> UserId {
    UserId::parse(user_id).expect("test user ids are valid")
}
