//! The peer listener's service: Raft messages in, plus read index, forwarded writes and local
//! status for the other nodes. Only peers should reach this port.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};
use residency_proto::pb;
use residency_proto::peer_pb::peer_server::Peer;
use residency_proto::peer_pb::{
    LocalStatusRequest, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};
use residency_store::{NodeId, TypeConfig};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ApiError;
use crate::network::{decode, encode};
use crate::node::{ForwardedWrite, Node};
use crate::snapshot_sender::SNAPSHOT_PROGRESS_LOG_BYTES;

#[derive(Debug, Clone)]
pub struct PeerService {
    node: Arc<Node>,
    /// Set when the node stops: the call streams it serves end then, so that the listener's
    /// graceful shutdown does not wait for the peers to close them.
    stop: watch::Receiver<bool>,
}

impl PeerService {
    pub fn new(node: Arc<Node>, stop: watch::Receiver<bool>) -> PeerService {
        PeerService { node, stop }
    }
}

/// An error for a peer: the status a plain gRPC client understands, with the exact `ApiError`
/// in the details for our own nodes.
pub fn peer_status(error: ApiError) -> Status {
    let code = error.grpc_code();
    let message = error.to_string();
    Status::with_details(code, message, encode(&error).into())
}

fn decoded<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<T, Status> {
    decode(data)
        .map_err(|error| Status::invalid_argument(format!("undecodable peer message: {error}")))
}

fn payload<T: serde::de::DeserializeOwned>(request: Request<RaftPayload>) -> Result<T, Status> {
    decoded(&request.into_inner().data)
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload {
        data: encode(value).into(),
    }))
}

/// One AppendEntries, whether it came alone or on a stream: the encoded answer.
async fn append(node: &Node, data: &[u8]) -> Result<RaftPayload, Status> {
    let request: AppendEntriesRequest<TypeConfig> = decoded(data)?;
    let answer = node.raft.append_entries(request).await;
    // A deposed leader (answered HigherVote) is not contact with the leader.
    if matches!(&answer, Ok(response) if !matches!(response, AppendEntriesResponse::HigherVote(_)))
    {
        node.note_leader_contact();
    }
    Ok(RaftPayload {
        data: encode(&answer).into(),
    })
}

/// A follower's group of writes: proposed here only (a forwarded write is never forwarded
/// again, so it cannot loop), queued in their order so that they share the next entry, and
/// answered each on its own, in the same order.
async fn forward(node: &Node, data: &[u8]) -> Result<RaftPayload, Status> {
    let writes: Vec<ForwardedWrite> = decoded(data)?;
    let queued: Vec<_> = writes
        .into_iter()
        .map(|write| node.enqueue(write))
        .collect();
    let mut answers = Vec::with_capacity(queued.len());
    for queued in queued {
        answers.push(match queued {
            Ok(answered) => answered.await.unwrap_or(Err(ApiError::ShuttingDown)),
            Err(error) => Err(error),
        });
    }
    Ok(RaftPayload {
        data: encode(&answers).into(),
    })
}

/// The answers of a call stream, in the order of its requests.
pub type PeerAnswers = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send>>;

/// Answers each message of a call stream (`call_stream.rs`) with `handle`, one at a time and in
/// order (`then` polls one at a time), on the task that writes the answers: no task and no
/// channel of its own. A failed message ends the stream with its error; the sender then opens
/// a new one. Once the node stops, no further message is read: the one in hand is answered
/// (a forwarded group's writes are applied or refused, not left unknown) and the stream ends.
/// Peers hold their streams open between messages, and the listener's graceful shutdown would
/// otherwise wait out its grace period for them.
fn answer_each<F, Fut>(
    service: &PeerService,
    request: Request<Streaming<RaftPayload>>,
    handle: F,
) -> Response<PeerAnswers>
where
    F: Fn(Arc<Node>, RaftPayload) -> Fut + Send + 'static,
    Fut: Future<Output = Result<RaftPayload, Status>> + Send + 'static,
{
    let node = service.node.clone();
    let answers = request
        .into_inner()
        .take_until(crate::stopped(service.stop.clone()))
        .then(move |message| {
            let answered = message.map(|message| handle(node.clone(), message));
            async move { answered?.await }
        });
    Response::new(Box::pin(answers))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        Ok(Response::new(
            append(&self.node, &request.into_inner().data).await?,
        ))
    }

    type AppendEntriesStreamStream = PeerAnswers;

    /// Each request is stored and answered before the next is read.
    async fn append_entries_stream(
        &self,
        request: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<PeerAnswers>, Status> {
        Ok(answer_each(self, request, |node, message| async move {
            append(&node, &message.data).await
        }))
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

    async fn forward_writes(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        Ok(Response::new(
            forward(&self.node, &request.into_inner().data).await?,
        ))
    }

    type ForwardWritesStreamStream = PeerAnswers;

    /// Each group is answered before the next is read.
    async fn forward_writes_stream(
        &self,
        request: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<PeerAnswers>, Status> {
        Ok(answer_each(self, request, |node, message| async move {
            forward(&node, &message.data).await
        }))
    }

    async fn local_status(
        &self,
        _request: Request<LocalStatusRequest>,
    ) -> Result<Response<pb::MemberStatus>, Status> {
        Ok(Response::new(self.node.local_status()))
    }
}
