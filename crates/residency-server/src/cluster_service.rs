//! `residency.v1.Cluster`: status of every member, and forming a new cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use residency_proto::pb::cluster_server::Cluster;
use residency_proto::pb::{
    AddLearnerRequest, BackupRequest, DigestRequest, DigestResponse, InitializeRequest,
    InitializeResponse, MemberRole, MemberStatus, MembershipResponse, PromoteRequest, RaftState,
    RemoveMemberRequest, StatusRequest, StatusResponse,
};
use residency_store::{NodeId, NodeInfo};
use residency_types::{Jurisdiction, ReasonCode};
use tonic::{Request, Response, Status};

use crate::auth::audit_note;
use crate::error::ApiError;
use crate::grpc::{observe, request_timeout};
use crate::membership;
use crate::node::Node;

/// A new cluster starts with at most this many voters.
const INITIAL_MEMBERS_MAX: usize = 7;

#[derive(Debug, Clone)]
pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    pub fn new(node: Arc<Node>) -> ClusterService {
        ClusterService { node }
    }

    fn member_timeout(&self) -> Duration {
        Duration::from_millis(self.node.config.limits.status_member_timeout_ms)
    }

    async fn member_status(&self, id: NodeId, info: NodeInfo, voter: bool) -> MemberStatus {
        let mut status = if id == self.node.id() {
            self.node.local_status()
        } else {
            match self
                .node
                .remote_status(&info.peer_addr, self.member_timeout())
                .await
            {
                Ok(status) if status.id == id => status,
                Ok(status) => unreachable_member(
                    id,
                    format!(
                        "the node at {} says it is node {}",
                        info.peer_addr, status.id
                    ),
                ),
                Err(error) => unreachable_member(id, error),
            }
        };
        // The membership, not the member, says what the member is.
        status.client_addr = info.client_addr;
        status.peer_addr = info.peer_addr;
        status.jurisdiction = info.jurisdiction;
        status.role = if voter {
            MemberRole::Voter
        } else {
            MemberRole::Learner
        } as i32;
        status
    }

    /// Every member's status, each asked in parallel, with its lag behind the leader.
    async fn all_members(&self) -> Vec<MemberStatus> {
        let leader = self.node.raft.metrics().borrow().current_leader;
        let asks = self
            .node
            .members()
            .into_iter()
            .map(|(id, info, voter)| self.member_status(id, info, voter));
        let mut members = futures::future::join_all(asks).await;
        let leader_last_log = members
            .iter()
            .find(|member| Some(member.id) == leader)
            .and_then(|leader| leader.last_log_index);
        for member in &mut members {
            member.lag_entries = match (leader_last_log, member.applied_index) {
                (Some(leader), Some(applied)) => Some(leader.saturating_sub(applied)),
                _ => None,
            };
        }
        members
    }

    /// Who is at `peer_addr`: this node, or the node that answers there.
    async fn identify(&self, peer_addr: &str) -> Result<(NodeId, NodeInfo), ApiError> {
        if peer_addr == self.node.info.peer_addr {
            return Ok((self.node.id(), self.node.info.clone()));
        }
        let status = self
            .node
            .remote_status(peer_addr, self.member_timeout())
            .await
            .map_err(|error| ApiError::MemberUnreachable(format!("{peer_addr}: {error}")))?;
        let info = NodeInfo {
            client_addr: status.client_addr,
            peer_addr: peer_addr.to_string(),
            jurisdiction: status.jurisdiction,
        };
        Ok((status.id, info))
    }
}

fn unreachable_member(id: NodeId, error: String) -> MemberStatus {
    MemberStatus {
        id,
        state: RaftState::Unreachable as i32,
        error,
        ..MemberStatus::default()
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let timeout = request_timeout(
            request.metadata(),
            Duration::from_millis(self.node.config.limits.request_timeout_ms_max),
        );
        observe("Status", timeout, async {
            let initialized = self
                .node
                .raft
                .is_initialized()
                .await
                .map_err(|_| ApiError::ShuttingDown)?;
            let metrics = self.node.raft.metrics().borrow().clone();
            let members = self.all_members().await;
            Ok(StatusResponse {
                served_by: self.node.id(),
                leader_id: metrics.current_leader,
                term: metrics.current_term,
                members,
                initialized,
            })
        })
        .await
    }

    type BackupStream = crate::backup::BackupStream;

    async fn backup(
        &self,
        _request: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        // The stream outlives any request deadline: a large backup takes as long as it takes.
        let stream = self.node.backup().await.map_err(Status::from)?;
        metrics::counter!("residency_backups_total").increment(1);
        Ok(Response::new(stream))
    }

    async fn add_learner(
        &self,
        request: Request<AddLearnerRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let timeout = crate::registry_service::timeout_of(&self.node, &request);
        audit_note(&request).subject(format!("peer {}", request.get_ref().peer_addr));
        let request = request.into_inner();
        observe("AddLearner", timeout, async {
            if request.peer_addr.is_empty() {
                return Err(ApiError::invalid(
                    ReasonCode::InvalidArgument,
                    "peer_addr",
                    "is required",
                ));
            }
            self.node
                .add_learner(&request.peer_addr, self.member_timeout())
                .await?;
            Ok(MembershipResponse {
                members: self.all_members().await,
            })
        })
        .await
    }

    async fn promote(
        &self,
        request: Request<PromoteRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        audit_note(&request).subject(format!("node {}", request.get_ref().node_id));
        let request = request.into_inner();
        let catch_up_ms = match request.catch_up_timeout_ms {
            0 => membership::CATCH_UP_TIMEOUT_MS_DEFAULT,
            ms => ms.min(membership::CATCH_UP_TIMEOUT_MS_MAX),
        };
        let max_lag = match request.max_lag_entries {
            0 => membership::MAX_LAG_ENTRIES_DEFAULT,
            lag => lag,
        };
        // A promotion may wait for the learner longer than an ordinary request may take.
        let timeout =
            Duration::from_millis(catch_up_ms + self.node.config.limits.request_timeout_ms_max);
        observe("Promote", timeout, async {
            let catch_up = Duration::from_millis(catch_up_ms);
            self.node
                .promote(request.node_id, catch_up, max_lag)
                .await?;
            Ok(MembershipResponse {
                members: self.all_members().await,
            })
        })
        .await
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let timeout = crate::registry_service::timeout_of(&self.node, &request);
        audit_note(&request).subject(format!("node {}", request.get_ref().node_id));
        let request = request.into_inner();
        observe("RemoveMember", timeout, async {
            self.node.remove_member(request.node_id).await?;
            Ok(MembershipResponse {
                members: self.all_members().await,
            })
        })
        .await
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        let timeout = crate::registry_service::timeout_of(&self.node, &request);
        observe("Digest", timeout, async {
            let digest = self
                .node
                .reader
                .digest()
                .await
                .map_err(ApiError::internal)?;
            Ok(DigestResponse {
                node_id: self.node.id(),
                revision: digest.revision.0,
                sha256_hex: digest.sha256_hex,
                pairs: digest.pairs,
            })
        })
        .await
    }

    async fn initialize(
        &self,
        request: Request<InitializeRequest>,
    ) -> Result<Response<InitializeResponse>, Status> {
        let timeout = request_timeout(
            request.metadata(),
            Duration::from_millis(self.node.config.limits.request_timeout_ms_max),
        );
        audit_note(&request).subject(format!("peers {}", request.get_ref().peer_addrs.join(",")));
        let request = request.into_inner();
        observe("Initialize", timeout, async {
            if self
                .node
                .raft
                .is_initialized()
                .await
                .map_err(|_| ApiError::ShuttingDown)?
            {
                return Err(ApiError::AlreadyInitialized);
            }
            let count = request.peer_addrs.len();
            if count == 0 || count > INITIAL_MEMBERS_MAX {
                return Err(ApiError::invalid(
                    ReasonCode::InvalidArgument,
                    "peer_addrs",
                    format!("names {count} peers; a new cluster has 1 to {INITIAL_MEMBERS_MAX}"),
                ));
            }
            if !request.peer_addrs.contains(&self.node.info.peer_addr) {
                return Err(ApiError::invalid(
                    ReasonCode::InvalidArgument,
                    "peer_addrs",
                    format!(
                        "must include this node's own peer address {}",
                        self.node.info.peer_addr
                    ),
                ));
            }
            let mut members = BTreeMap::new();
            for peer_addr in &request.peer_addrs {
                let (id, info) = self.identify(peer_addr).await?;
                let declared = Jurisdiction::parse(&info.jurisdiction).map_err(ApiError::from)?;
                let required = self.node.config.required_jurisdiction;
                if declared != required {
                    return Err(ApiError::invalid(
                        ReasonCode::InvalidJurisdiction,
                        "peer_addrs",
                        format!(
                            "node {id} declares {declared}; every member must be in {required}"
                        ),
                    ));
                }
                if members.insert(id, info).is_some() {
                    return Err(ApiError::invalid(
                        ReasonCode::InvalidArgument,
                        "peer_addrs",
                        format!("node id {id} appears twice"),
                    ));
                }
            }
            match self.node.raft.initialize(members.clone()).await {
                Ok(()) => {}
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    return Err(ApiError::AlreadyInitialized);
                }
                Err(RaftError::APIError(InitializeError::NotInMembers(error))) => {
                    return Err(ApiError::invalid(
                        ReasonCode::InvalidArgument,
                        "peer_addrs",
                        error.to_string(),
                    ));
                }
                Err(RaftError::Fatal(_)) => return Err(ApiError::ShuttingDown),
            }
            tracing::info!(members = members.len(), "cluster initialized");
            let members = members
                .into_iter()
                .map(|(id, info)| MemberStatus {
                    id,
                    client_addr: info.client_addr,
                    peer_addr: info.peer_addr,
                    jurisdiction: info.jurisdiction,
                    role: MemberRole::Voter as i32,
                    ..MemberStatus::default()
                })
                .collect();
            Ok(InitializeResponse { members })
        })
        .await
    }
}
