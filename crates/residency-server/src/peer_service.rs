//! The peer listener's service: Raft messages in, plus read index, forwarded writes and local
//! status for the other nodes. Only peers should reach this port.

use std::sync::Arc;
use std::time::Instant;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};
use residency_proto::pb;
use residency_proto::peer_pb::peer_server::Peer;
use residency_proto::peer_pb::{
    LocalStatusRequest, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};
use residency_store::{NodeId, TypeConfig};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::network::{decode, encode};
use crate::node::{ForwardedWrite, Node};
use crate::snapshot_sender::SNAPSHOT_PROGRESS_LOG_BYTES;

#[derive(Debug, Clone)]
pub struct PeerService {
    node: Arc<Node>,
}

impl PeerService {
    pub fn new(node: Arc<Node>) -> PeerService {
        PeerService { node }
    }
}

/// An error for a peer: the status a plain gRPC client understands, with the exact `ApiError`
/// in the details for our own nodes.
pub fn peer_status(error: ApiError) -> Status {
    let code = error.grpc_code();
    let message = error.to_string();
    Status::with_details(code, message, encode(&error).into())
}

fn payload<T: serde::de::DeserializeOwned>(request: Request<RaftPayload>) -> Result<T, Status> {
    decode(&request.into_inner().data)
        .map_err(|error| Status::invalid_argument(format!("undecodable peer message: {error}")))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload {
        data: encode(value).into(),
    }))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let request: AppendEntriesRequest<TypeConfig> = payload(request)?;
        let answer = self.node.raft.append_entries(request).await;
        // A deposed leader (answered HigherVote) is not contact with the leader.
        if matches!(&answer, Ok(response) if !matches!(response, AppendEntriesResponse::HigherVote(_)))
        {
            self.node.note_leader_contact();
        }
        reply(&answer)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let request: VoteRequest<NodeId> = payload(request)?;
        reply(&self.node.raft.vote(request).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let request: InstallSnapshotRequest<TypeConfig> = payload(request)?;
        let received = request.data.len() as u64;
        let end = request.offset + received;
        let done = request.done;
        metrics::counter!("residency_snapshot_received_bytes_total").increment(received);
        // A line per SNAPSHOT_PROGRESS_LOG_BYTES received, and one for the install.
        if request.offset / SNAPSHOT_PROGRESS_LOG_BYTES != end / SNAPSHOT_PROGRESS_LOG_BYTES {
            tracing::info!(received = end, snapshot = %request.meta.snapshot_id, "receiving a snapshot");
        }
        let started = Instant::now();
        if done {
            tracing::info!(bytes = end, snapshot = %request.meta.snapshot_id, "snapshot received; installing it");
        }
        let answer = self.node.raft.install_snapshot(request).await;
        if done {
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                installed = answer.is_ok(),
                "snapshot install answered"
            );
        }
        if answer.is_ok() {
            self.node.note_leader_contact();
        }
        reply(&answer)
    }

    async fn read_index(
        &self,
        _request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let read_index = self.node.serve_read_index().await.map_err(peer_status)?;
        Ok(Response::new(ReadIndexResponse { read_index }))
    }

    /// A follower's group of writes: proposed here only (a forwarded write is never forwarded
    /// again, so it cannot loop), queued in their order so that they share the next entry, and
    /// answered each on its own, in the same order.
    async fn forward_writes(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let writes: Vec<ForwardedWrite> = payload(request)?;
        let queued: Vec<_> = writes
            .into_iter()
            .map(|write| self.node.enqueue(write))
            .collect();
        let mut answers = Vec::with_capacity(queued.len());
        for queued in queued {
            answers.push(match queued {
                Ok(answered) => answered.await.unwrap_or(Err(ApiError::ShuttingDown)),
                Err(error) => Err(error),
            });
        }
        reply(&answers)
    }

    async fn local_status(
        &self,
        _request: Request<LocalStatusRequest>,
    ) -> Result<Response<pb::MemberStatus>, Status> {
        Ok(Response::new(self.node.local_status()))
    }
}
