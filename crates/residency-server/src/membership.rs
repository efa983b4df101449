//! Membership changes: add a learner, promote it once caught up, remove a member. Served by the
//! leader only, one at a time: a change that arrives while another runs is refused, never
//! interleaved (openraft itself refuses a change while a joint configuration is pending).
//!
//! Invariant I6: every member declares the cluster's required jurisdiction. A node is asked for
//! its own identity over the peer port before it is added, and refused if it declares another.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::ChangeMembers;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use residency_store::{NodeId, NodeInfo};
use residency_types::{Jurisdiction, ReasonCode};
use tokio::sync::MutexGuard;

use crate::error::ApiError;
use crate::node::Node;
use crate::read_index::not_leader;

/// How often a promotion looks at the learner's progress.
const CATCH_UP_POLL_MS: u64 = 200;
pub const CATCH_UP_TIMEOUT_MS_DEFAULT: u64 = 60_000;
pub const CATCH_UP_TIMEOUT_MS_MAX: u64 = 600_000;
pub const MAX_LAG_ENTRIES_DEFAULT: u64 = 100;

fn refused(code: ReasonCode, message: impl Into<String>) -> ApiError {
    ApiError::Membership {
        code,
        message: message.into(),
    }
}

fn change_error(error: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> ApiError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            not_leader(forward.leader_id, forward.leader_node.as_ref())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(error),
        )) => refused(
            ReasonCode::MembershipChangeInProgress,
            format!("a membership change is still being committed: {error}"),
        ),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            refused(ReasonCode::MemberNotFound, error.to_string())
        }
        RaftError::Fatal(_) => ApiError::ShuttingDown,
    }
}

impl Node {
    /// The admin lock, held for the whole change; refused at once if another change holds it.
    fn admin_turn(&self) -> Result<MutexGuard<'_, ()>, ApiError> {
        self.admin_lock.try_lock().map_err(|_| {
            refused(
                ReasonCode::AdminOperationInProgress,
                "another membership change is running; retry when it ends",
            )
        })
    }

    /// Refuses unless this node leads, pointing at the leader.
    fn ensure_leader(&self) -> Result<(), ApiError> {
        match self.leader() {
            Some((leader_id, _)) if leader_id == self.id() => Ok(()),
            Some((leader_id, leader)) => Err(not_leader(Some(leader_id), leader.as_ref())),
            None => Err(ApiError::NoLeader),
        }
    }

    pub async fn add_learner(&self, peer_addr: &str, timeout: Duration) -> Result<(), ApiError> {
        self.ensure_leader()?;
        let _turn = self.admin_turn()?;
        let status = self
            .remote_status(peer_addr, timeout)
            .await
            // Not UNAVAILABLE: retrying elsewhere cannot help when the new node does not answer.
            .map_err(|error| {
                refused(
                    ReasonCode::MemberUnreachable,
                    format!("{peer_addr} does not answer: {error}"),
                )
            })?;
        let required = self.config.required_jurisdiction;
        let declared = Jurisdiction::parse(&status.jurisdiction).ok();
        if declared != Some(required) {
            return Err(refused(
                ReasonCode::MemberJurisdictionNotAllowed,
                format!(
                    "node {} declares {:?}; every member must be in {required}",
                    status.id, status.jurisdiction
                ),
            ));
        }
        if self.members().iter().any(|(id, _, _)| *id == status.id) {
            return Err(refused(
                ReasonCode::MemberExists,
                format!("node {} is already a member", status.id),
            ));
        }
        let (was_member, _) = self
            .reader
            .query(|view| Ok(residency_core::query::was_member(view, status.id)?))
            .await
            .map_err(ApiError::internal)?;
        if was_member {
            // A node that left (or lost its disk) and comes back under its old id could make the
            // leader see its log go backwards; openraft 0.9 asserts on that.
            return Err(refused(
                ReasonCode::MemberIdReused,
                format!(
                    "node id {} was a member before; start the node under a new node_id",
                    status.id
                ),
            ));
        }
        let info = NodeInfo {
            client_addr: status.client_addr,
            peer_addr: peer_addr.to_string(),
            jurisdiction: required.to_string(),
        };
        tracing::info!(node_id = status.id, "adding a learner");
        self.raft
            .add_learner(status.id, info, false)
            .await
            .map_err(change_error)?;
        Ok(())
    }

    /// How far the learner's replicated log is behind the leader's, as the leader sees it.
    fn learner_lag(&self, node_id: NodeId) -> Option<u64> {
        let metrics = self.raft.metrics().borrow().clone();
        let last = metrics.last_log_index?;
        let matched = metrics
            .replication
            .as_ref()?
            .get(&node_id)?
            .map_or(0, |log_id| log_id.index);
        Some(last.saturating_sub(matched))
    }

    pub async fn promote(
        &self,
        node_id: NodeId,
        catch_up_timeout: Duration,
        max_lag: u64,
    ) -> Result<(), ApiError> {
        self.ensure_leader()?;
        let _turn = self.admin_turn()?;
        let learner = match self.members().into_iter().find(|(id, _, _)| *id == node_id) {
            None => {
                return Err(refused(
                    ReasonCode::MemberNotFound,
                    format!("node {node_id} is not a member"),
                ));
            }
            Some((_, _, true)) => {
                return Err(refused(
                    ReasonCode::MemberExists,
                    format!("node {node_id} is already a voter"),
                ));
            }
            Some((_, learner, false)) => learner,
        };
        let deadline = Instant::now() + catch_up_timeout;
        loop {
            let lag = self.learner_lag(node_id);
            if lag.is_some_and(|lag| lag <= max_lag) {
                break;
            }
            if Instant::now() >= deadline {
                let lag = lag.map_or_else(
                    || "unknown (no replication progress yet)".to_string(),
                    |lag| format!("{lag} entries"),
                );
                return Err(refused(
                    ReasonCode::LearnerNotCaughtUp,
                    format!(
                        "node {node_id} did not come within {max_lag} entries of the leader in {} ms; its lag is {lag}",
                        catch_up_timeout.as_millis()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(CATCH_UP_POLL_MS)).await;
        }
        // Caught up is not enough: a learner that stopped just after catching up would become a
        // voter that cannot vote, and cost the cluster a failure it could otherwise survive.
        let probe = Duration::from_millis(self.config.limits.status_member_timeout_ms);
        if let Err(error) = self.remote_status(&learner.peer_addr, probe).await {
            return Err(refused(
                ReasonCode::LearnerNotCaughtUp,
                format!(
                    "node {node_id} does not answer on its peer port ({error}); it would be a voter that cannot vote"
                ),
            ));
        }
        tracing::info!(node_id, "promoting a learner");
        let voters = BTreeSet::from([node_id]);
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(voters), false)
            .await
            .map_err(change_error)?;
        Ok(())
    }

    pub async fn remove_member(&self, node_id: NodeId) -> Result<(), ApiError> {
        self.ensure_leader()?;
        let _turn = self.admin_turn()?;
        let members = self.members();
        let Some((_, _, is_voter)) = members.iter().find(|(id, _, _)| *id == node_id) else {
            return Err(refused(
                ReasonCode::MemberNotFound,
                format!("node {node_id} is not a member"),
            ));
        };
        let voters = members.iter().filter(|(_, _, voter)| *voter).count();
        let change = if *is_voter {
            if voters == 1 {
                return Err(refused(
                    ReasonCode::LastVoter,
                    format!("node {node_id} is the last voter"),
                ));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        };
        tracing::info!(node_id, "removing a member");
        self.raft
            .change_membership(change, false)
            .await
            .map_err(change_error)?;
        Ok(())
    }
}
