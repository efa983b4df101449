//! The node's storage: the Raft log's entries in segment files, the vote and the state's recent
//! changes in one sled database per node, and the state as of the last snapshot in a base file.
//!
//! - [`durable`]: the database handle and its group-commit flusher (`flush` + `fdatasync`).
//! - `log_file`: the log's segment files and their own group commit (`fdatasync`).
//! - [`log_store`]: openraft's `RaftLogStorage`: checksummed records, verified on open.
//! - [`state_machine`]: openraft's `RaftStateMachine`: applies entries through
//!   `residency_core::apply`, written atomically with the applied log id (behind a redo
//!   record, `redo.rs`), into the state's layers (`layers.rs`): sled trees of the changes
//!   since the last snapshot over that snapshot's base file.
//! - [`snapshot`]: the snapshot file format (header, length-prefixed records, CRC trailer).
//! - [`base`]: the base file: the state at one revision as sorted compressed blocks with an
//!   index, for point reads and walks without loading it anywhere.
//! - [`reader`]: the read API the server answers queries with.
//! - [`answers`]: the leader's own writes answered as soon as apply has decided them.
//!
//! This crate knows openraft and sled and nothing of gRPC.

pub mod answers;
pub mod base;
pub(crate) mod capture;
pub mod durable;
pub mod error;
pub(crate) mod layers;
pub(crate) mod log_file;

/// Decoders of what the store reads from disk, for the fuzz targets.
pub mod decode {
    pub use crate::log_file::decode_segment;
}
pub mod log_store;
pub mod reader;
pub mod record;
pub(crate) mod redo;
pub mod restore;
pub mod snapshot;
pub mod state_machine;

use std::fmt;
use std::path::Path;

use residency_types::{Proposal, ProposalResult};
use serde::{Deserialize, Serialize};

pub use answers::{AnswerBoard, Registration};
pub use durable::{Durable, StoreOptions};
pub use error::StoreError;
pub use log_store::{CommittedIndex, LogProgress, LogStore};
pub use reader::{DigestAt, StateReader, StateView};
pub use state_machine::StateMachineStore;

/// What the cluster knows of a member: where to reach it and which jurisdiction it declares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Address clients use (gRPC `residency.v1`), as `host:port`.
    pub client_addr: String,
    /// Address peers use (Raft traffic), as `host:port`.
    pub peer_addr: String,
    /// The ISO 3166-1 alpha-2 code the node declares it runs in.
    pub jurisdiction: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client={} peer={} jurisdiction={}",
            self.client_addr, self.peer_addr, self.jurisdiction
        )
    }
}

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The registry's Raft types: a proposal of writes in, their results out, snapshots as
    /// files.
    pub TypeConfig:
        D = Proposal,
        R = ProposalResult,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;

/// Opens (or creates) a node's storage under `dir`: the log store, the state machine, and a
/// reader for queries. Refuses to open a log whose records fail their checksum.
pub async fn open(
    dir: &Path,
    options: StoreOptions,
) -> Result<(LogStore, StateMachineStore, StateReader), StoreError> {
    let started = std::time::Instant::now();
    let durable = Durable::open(dir, options)?;
    let sled_opened = started.elapsed();
    let log_store = LogStore::open(durable.clone())?;
    let log_opened = started.elapsed();
    let state_machine = StateMachineStore::open(durable).await?;
    let reader = state_machine.reader();
    // Where a slow start goes: sled's recovery, or reading back and checking the whole log.
    tracing::info!(
        sled_seconds = sled_opened.as_secs_f64(),
        log_seconds = (log_opened - sled_opened).as_secs_f64(),
        state_seconds = (started.elapsed() - log_opened).as_secs_f64(),
        "store opened"
    );
    Ok((log_store, state_machine, reader))
}

#[cfg(test)]
mod tests;
