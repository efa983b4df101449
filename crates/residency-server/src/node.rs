//! The node: Raft, the store's reader and the peers, and the two paths every request takes —
//! the read barrier for its consistency mode, and the write path to the leader.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use openraft::ServerState;
use residency_proto::convert::WriteContext;
use residency_proto::pb;
use residency_proto::peer_pb::{LocalStatusRequest, ReadIndexRequest};
use residency_store::{CommittedIndex, LogProgress, NodeId, NodeInfo, Raft, StateReader};
use residency_types::{ApplyResult, Consistency, Revision, WriteBody};
use serde::{Deserialize, Serialize};

use crate::config::ValidConfig;
use crate::error::ApiError;
use crate::forwarder::{Forwarder, ForwarderParts};
use crate::network::{PeerChannels, decode};
use crate::proposer::{Proposer, ProposerParts};
use crate::read_index::{ReadIndexBatcher, not_leader};
use crate::write_queue::GroupLimits;

/// A write handed from a follower to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardedWrite {
    pub request_id: residency_types::RequestId,
    pub caller: residency_types::CallerId,
    /// Whether `caller` is the identity of a verified certificate, not a stated name.
    pub caller_authenticated: bool,
    pub reason: residency_types::ReasonText,
    pub body: WriteBody,
}

/// What a read barrier established: the revision the answer must include, and for stale reads
/// how long since the leader was heard.
#[derive(Debug, Clone, Copy)]
pub struct ReadBarrier {
    pub consistency: Consistency,
    pub millis_since_leader_contact: Option<u64>,
}

pub struct Node {
    pub config: Arc<ValidConfig>,
    pub raft: Raft,
    pub reader: StateReader,
    pub committed: CommittedIndex,
    /// The cluster's commit index as the leader reported it after this node started: the node
    /// is ready once it has applied that far (see `learn_ready_index`).
    pub ready_index: OnceLock<u64>,
    pub info: NodeInfo,
    pub peers: PeerChannels,
    /// The node's audit file: admin changes, refusals, denied checks.
    pub audit: crate::audit_log::AuditLog,
    read_index: ReadIndexBatcher,
    /// The leader's write queue: many writes per log entry (`proposer.rs`).
    proposer: Proposer,
    /// A follower's queue of writes for the leader (`forwarder.rs`).
    forwarder: Forwarder,
    /// Held by a membership change for its whole run (see `membership.rs`).
    pub(crate) admin_lock: tokio::sync::Mutex<()>,
    last_leader_contact: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.config.node_id)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// How long one attempt to learn the ready index may take, and the pause between attempts.
const READY_INDEX_ATTEMPT_MS: u64 = 500;

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<ValidConfig>,
        raft: Raft,
        reader: StateReader,
        log: LogProgress,
        committed: CommittedIndex,
        info: NodeInfo,
        peers: PeerChannels,
        audit: crate::audit_log::AuditLog,
    ) -> Node {
        let read_index = ReadIndexBatcher::start(
            raft.clone(),
            config.limits.read_index_waiters_max,
            Duration::from_millis(config.limits.request_timeout_ms_max),
        );
        let limits = GroupLimits {
            writes_max: config.limits.proposal_writes_max,
            bytes_max: config.limits.proposal_bytes_max,
            queue_writes_max: config.limits.proposal_queue_writes_max,
        };
        let proposer = Proposer::start(ProposerParts {
            raft: raft.clone(),
            reader: reader.clone(),
            log,
            limits,
        });
        let forwarder = Forwarder::start(ForwarderParts {
            node_id: config.node_id,
            raft: raft.clone(),
            peers: peers.clone(),
            proposer: proposer.clone(),
            call_timeout: Duration::from_millis(config.limits.peer_rpc_timeout_ms),
            limits,
        });
        Node {
            config,
            raft,
            reader,
            committed,
            ready_index: OnceLock::new(),
            info,
            peers,
            audit,
            read_index,
            proposer,
            forwarder,
            admin_lock: tokio::sync::Mutex::new(()),
            last_leader_contact: Mutex::new(None),
        }
    }

    pub fn id(&self) -> NodeId {
        self.config.node_id
    }

    fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.config.limits.peer_rpc_timeout_ms)
    }

    /// The leader as this node knows it: its id and member record.
    pub fn leader(&self) -> Option<(NodeId, Option<NodeInfo>)> {
        leader_of(&self.raft)
    }

    pub fn note_leader_contact(&self) {
        *self
            .last_leader_contact
            .lock()
            .expect("leader contact lock poisoned") = Some(Instant::now());
    }

    /// How long since this node heard from a leader. On a leader it is how long since a quorum
    /// last acknowledged it: openraft 0.9 does not step a leader down when it loses its quorum,
    /// so "I am the leader" alone would claim 0 ms on a leader cut off from the others.
    pub fn millis_since_leader_contact(&self) -> Option<u64> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader == Some(self.id()) {
            return metrics.millis_since_quorum_ack;
        }
        let last = *self
            .last_leader_contact
            .lock()
            .expect("leader contact lock poisoned");
        last.map(|at| u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Why there is no leader to go to: this node has not joined a cluster, or the cluster has
    /// none right now.
    fn leaderless(&self) -> ApiError {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics
            .membership_config
            .membership()
            .voter_ids()
            .next()
            .is_none()
        {
            ApiError::ClusterNotInitialized
        } else {
            ApiError::NoLeader
        }
    }

    /// Waits until this node has applied `index`, or fails when `timeout` passes.
    async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), ApiError> {
        if self.reader.applied_revision().0 >= index {
            return Ok(());
        }
        // The store's own applied watch, which changes once per apply; openraft's `wait()`
        // follows its metrics channel, which changes with every append and commit as well.
        let mut applied = self.reader.subscribe_applied();
        let waited = tokio::time::timeout(timeout, applied.wait_for(|&at| at >= index)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(ApiError::RevisionNotReached {
                wanted: Revision(index),
                applied: self.reader.applied_revision(),
            }),
        }
    }

    /// Makes the state this node is about to read fresh enough for `consistency`.
    pub async fn read_barrier(
        &self,
        consistency: Consistency,
        timeout: Duration,
    ) -> Result<ReadBarrier, ApiError> {
        match consistency {
            Consistency::Linearizable => {
                let started = Instant::now();
                let read_index = self.linearizable_read_index(timeout).await?;
                self.wait_applied(read_index, timeout.saturating_sub(started.elapsed()))
                    .await?;
            }
            Consistency::AtLeast(revision) => self.wait_applied(revision.0, timeout).await?,
            Consistency::Stale => {}
        }
        Ok(ReadBarrier {
            consistency,
            millis_since_leader_contact: self.millis_since_leader_contact(),
        })
    }

    /// The read index for a linearizable read: from our own (shared) round when we lead, else
    /// from the leader's, over the peer port.
    pub async fn linearizable_read_index(&self, timeout: Duration) -> Result<u64, ApiError> {
        match self.leader() {
            Some((leader_id, _)) if leader_id == self.id() => self.read_index.read_index().await,
            Some((leader_id, Some(leader))) => {
                let mut client = self
                    .peers
                    .client(&leader.peer_addr)
                    .map_err(ApiError::internal)?;
                let call = client.read_index(ReadIndexRequest {});
                match tokio::time::timeout(self.peer_timeout().min(timeout), call).await {
                    Ok(Ok(response)) => Ok(response.into_inner().read_index),
                    Ok(Err(status)) => Err(forwarded_status(status, leader_id, &leader)),
                    Err(_) => Err(not_leader(Some(leader_id), Some(&leader))),
                }
            }
            Some((leader_id, None)) => Err(not_leader(Some(leader_id), None)),
            None => Err(self.leaderless()),
        }
    }

    /// Learns what this node must apply before it is ready: a read index from the leader, taken
    /// once after start. Until it has one, and has applied that far, `/readyz` says not ready.
    pub async fn learn_ready_index(self: Arc<Self>) {
        let attempt_timeout = Duration::from_millis(READY_INDEX_ATTEMPT_MS);
        loop {
            if self.raft.metrics().borrow().running_state.is_err() {
                return;
            }
            if let Ok(index) = self.linearizable_read_index(attempt_timeout).await {
                let _ = self.ready_index.set(index);
                return;
            }
            tokio::time::sleep(attempt_timeout).await;
        }
    }

    /// The read index for a follower's linearizable read, served on the leader.
    pub async fn serve_read_index(&self) -> Result<u64, ApiError> {
        self.read_index.read_index().await
    }

    /// Sends a write to the leader: proposed here when this node leads, else forwarded once.
    /// Either way it waits in a queue and goes with the writes around it: into the leader's
    /// next log entry, or into the next call to the leader.
    /// Request ids are the caller's strings, so they are traced at debug level only: a caller
    /// might put something personal in one.
    #[tracing::instrument(level = "debug", skip_all, fields(request_id = %context.request_id))]
    pub async fn write(
        &self,
        context: WriteContext,
        caller_authenticated: bool,
        body: WriteBody,
    ) -> Result<ApplyResult, ApiError> {
        let forwarded = ForwardedWrite {
            request_id: context.request_id,
            caller: context.caller,
            caller_authenticated,
            reason: context.reason,
            body,
        };
        match self.leader() {
            Some((leader_id, _)) if leader_id == self.id() => self.propose(forwarded).await,
            Some((_, Some(_))) => self.forwarder.forward(forwarded).await,
            Some((leader_id, None)) => Err(not_leader(Some(leader_id), None)),
            None => Err(self.leaderless()),
        }
    }

    /// Proposes a write on this node, in the next entry with the writes around it. A write
    /// forwarded by a follower comes here too, and is never forwarded again, so it cannot loop.
    pub async fn propose(&self, write: ForwardedWrite) -> Result<ApplyResult, ApiError> {
        self.proposer.propose(write).await
    }

    /// `propose` in two steps: queued now, behind every write queued before; answered later.
    pub fn enqueue(&self, write: ForwardedWrite) -> Result<crate::write_queue::Answered, ApiError> {
        self.proposer.enqueue(write)
    }

    /// This node's own identity and progress, as it reports to Status.
    pub fn local_status(&self) -> pb::MemberStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let is_voter = membership.voter_ids().any(|id| id == self.id());
        let state = match metrics.state {
            ServerState::Leader => pb::RaftState::Leader,
            ServerState::Follower => pb::RaftState::Follower,
            ServerState::Candidate => pb::RaftState::Candidate,
            ServerState::Learner => pb::RaftState::Learner,
            ServerState::Shutdown => pb::RaftState::Shutdown,
        };
        pb::MemberStatus {
            id: self.id(),
            client_addr: self.info.client_addr.clone(),
            peer_addr: self.info.peer_addr.clone(),
            jurisdiction: self.info.jurisdiction.clone(),
            role: if is_voter {
                pb::MemberRole::Voter
            } else {
                pb::MemberRole::Learner
            } as i32,
            state: state as i32,
            term: metrics.current_term,
            leader_id: metrics.current_leader,
            last_log_index: metrics.last_log_index,
            committed_index: self.committed.get(),
            applied_index: metrics.last_applied.map(|log_id| log_id.index),
            snapshot_index: metrics.snapshot.map(|log_id| log_id.index),
            purged_index: metrics.purged.map(|log_id| log_id.index),
            lag_entries: None,
            error: String::new(),
        }
    }

    /// Asks the node at `peer_addr` for its status.
    pub async fn remote_status(
        &self,
        peer_addr: &str,
        timeout: Duration,
    ) -> Result<pb::MemberStatus, String> {
        let mut client = self
            .peers
            .client(peer_addr)
            .map_err(|error| error.to_string())?;
        match tokio::time::timeout(timeout, client.local_status(LocalStatusRequest {})).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(status.message().to_string()),
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }

    /// Every member of the current membership with its node record, voters first by id.
    pub fn members(&self) -> Vec<(NodeId, NodeInfo, bool)> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let nodes: BTreeMap<NodeId, NodeInfo> = membership
            .nodes()
            .map(|(id, node)| (*id, node.clone()))
            .collect();
        nodes
            .into_iter()
            .map(|(id, node)| (id, node, voters.contains(&id)))
            .collect()
    }
}

/// The leader as `raft` knows it: its id and member record (without copying the metrics).
pub(crate) fn leader_of(raft: &Raft) -> Option<(NodeId, Option<NodeInfo>)> {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let leader_id = metrics.current_leader?;
    let node = metrics
        .membership_config
        .membership()
        .get_node(&leader_id)
        .cloned();
    Some((leader_id, node))
}

/// Turns a leader's error status into ours: the leader puts its `ApiError` in the status details
/// (see `peer_service::peer_status`); anything else is a transport failure, reported as "not
/// leader" with the leader we tried, so the client can go there directly.
pub(crate) fn forwarded_status(
    status: tonic::Status,
    leader_id: NodeId,
    leader: &NodeInfo,
) -> ApiError {
    match decode::<ApiError>(status.details()) {
        Ok(error) if !status.details().is_empty() => error,
        _ => not_leader(Some(leader_id), Some(leader)),
    }
}
