//! A scripted peer server on loopback, for unit tests of the peer calls' client side
//! (`network.rs`, `forwarder.rs`); the cluster tests run the real peer service across
//! processes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use residency_proto::peer_pb::peer_server::{Peer, PeerServer};
use residency_proto::peer_pb::{
    LocalStatusRequest, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};
use residency_store::{NodeId, TypeConfig};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use crate::network::{decode, encode};
use crate::peer_service::PeerAnswers;

/// The deadline the tests give a call.
pub const DEADLINE: Duration = Duration::from_millis(300);
/// An append whose `prev_log_id` has this index waits past `DEADLINE` and is answered
/// `Conflict`; every other append is answered `Success`.
pub const SLOW_INDEX: u64 = 7;

/// What the peer does, and what it counts. Forwarded writes are answered with their own
/// bytes.
#[derive(Default, Clone)]
pub struct Script {
    /// Streams opened (or refused), appends and forwards alike.
    pub streams: Arc<AtomicUsize>,
    /// Unary calls, appends and forwards alike.
    pub unary: Arc<AtomicUsize>,
    /// Answer every stream UNIMPLEMENTED, as a node of an older version does.
    pub no_stream: bool,
    /// End each stream after this many answers, as a peer that restarts does.
    pub answers_per_stream: Option<usize>,
}

impl Script {
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    pub fn unary(&self) -> usize {
        self.unary.load(Ordering::SeqCst)
    }

    /// Counts a stream's opening and answers each of its messages with `answer`.
    fn stream<F, Fut>(
        &self,
        request: Request<Streaming<RaftPayload>>,
        answer: F,
    ) -> Result<Response<PeerAnswers>, Status>
    where
        F: Fn(RaftPayload) -> Fut + Send + 'static,
        Fut: Future<Output = Result<RaftPayload, Status>> + Send + 'static,
    {
        self.streams.fetch_add(1, Ordering::SeqCst);
        if self.no_stream {
            return Err(Status::unimplemented("no call streams here"));
        }
        let answers = request
            .into_inner()
            .take(self.answers_per_stream.unwrap_or(usize::MAX))
            .then(move |message| {
                let answered = message.map(&answer);
                async move { answered?.await }
            });
        Ok(Response::new(Box::pin(answers)))
    }
}

async fn append(payload: RaftPayload) -> Result<RaftPayload, Status> {
    let request: AppendEntriesRequest<TypeConfig> =
        decode(&payload.data).map_err(|error| Status::invalid_argument(error.to_string()))?;
    let response = if request.prev_log_id.map(|id| id.index) == Some(SLOW_INDEX) {
        tokio::time::sleep(DEADLINE * 3).await;
        AppendEntriesResponse::Conflict
    } else {
        AppendEntriesResponse::Success
    };
    let answer: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = Ok(response);
    Ok(RaftPayload {
        data: encode(&answer).into(),
    })
}

async fn echo(payload: RaftPayload) -> Result<RaftPayload, Status> {
    Ok(payload)
}

#[tonic::async_trait]
impl Peer for Script {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.unary.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(append(request.into_inner()).await?))
    }

    type AppendEntriesStreamStream = PeerAnswers;

    async fn append_entries_stream(
        &self,
        request: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<PeerAnswers>, Status> {
        self.stream(request, append)
    }

    async fn vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn install_snapshot(
        &self,
        _: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn read_index(
        &self,
        _: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn forward_writes(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.unary.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(echo(request.into_inner()).await?))
    }

    type ForwardWritesStreamStream = PeerAnswers;

    async fn forward_writes_stream(
        &self,
        request: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<PeerAnswers>, Status> {
        self.stream(request, echo)
    }

    async fn local_status(
        &self,
        _: Request<LocalStatusRequest>,
    ) -> Result<Response<residency_proto::pb::MemberStatus>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

/// Serves `script` on `listener` until the sender returned is used or dropped.
pub fn serve(script: Script, listener: tokio::net::TcpListener) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PeerServer::new(script))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    stop
}

/// Serves `script` on a new loopback port: its address, and what stops it.
pub async fn start(script: Script) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (addr, serve(script, listener))
}
