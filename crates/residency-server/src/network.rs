//! Raft traffic to peers over gRPC: one cached channel per peer, openraft's messages as postcard
//! bytes in a protobuf `bytes` field.
//!
//! openraft 0.9 calls `new_client` for every replication stream and for every linearizable read,
//! so channels are cached here: a new connection per call made reads slow and flaky.
//!
//! AppendEntries travel on long-lived gRPC streams (`Peer/AppendEntriesStream`): a request, its
//! answer, the next request. A connection holds its stream while it lives and leaves it, idle,
//! for the next connection to that peer (openraft makes a new one for every read-index round).
//! A stream that fails or misses a deadline is dropped, so an answer is never taken for another
//! request's (`call_stream.rs`). A peer that does not serve the stream (an older version) gets
//! unary calls for `UNARY_CALLS_RETRY_MS` before streams are tried again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Snapshot, Vote};
use residency_proto::peer_pb::RaftPayload;
use residency_proto::peer_pb::peer_client::PeerClient;
use residency_store::{LogProgress, NodeId, NodeInfo, TypeConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use crate::call_stream::CallStream;
use crate::snapshot_sender::{self, ChunkResult, ChunkSink, Deadlines};
use crate::tls::PeerConnector;

/// How long to wait for a TCP connection to a peer (and, with TLS, for its handshake).
pub const PEER_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// HTTP/2 keepalive towards peers, so a dead connection is noticed between heartbeats.
const PEER_KEEPALIVE_INTERVAL_MS: u64 = 5_000;
/// Idle append streams kept per peer for the next connection; more are closed.
const IDLE_APPEND_STREAMS_PER_PEER_MAX: usize = 4;
/// How long a peer that answered a stream UNIMPLEMENTED gets unary calls before streams are
/// tried again (it may have been upgraded meanwhile).
const UNARY_CALLS_RETRY_MS: u64 = 60_000;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("raft messages always serialize")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// One lazily connected channel per peer address, shared by Raft and by forwarding, and the
/// append streams on it that no connection holds.
#[derive(Debug, Clone)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    message_bytes_max: usize,
    /// Mutual TLS towards peers; `None` when TLS is off.
    connector: Option<PeerConnector>,
    appends: Arc<Mutex<AppendStreams>>,
}

/// Append streams by peer address: idle ones, and peers that serve no streams until a moment.
#[derive(Debug, Default)]
struct AppendStreams {
    idle: HashMap<String, Vec<CallStream>>,
    unary_until: HashMap<String, Instant>,
}

impl PeerChannels {
    pub fn new(message_bytes_max: usize, connector: Option<PeerConnector>) -> PeerChannels {
        PeerChannels {
            channels: Arc::default(),
            message_bytes_max,
            connector,
            appends: Arc::default(),
        }
    }

    fn appends(&self) -> std::sync::MutexGuard<'_, AppendStreams> {
        self.appends.lock().expect("append stream lock poisoned")
    }

    /// An idle stream to `peer_addr`, if one is left.
    fn take_idle(&self, peer_addr: &str) -> Option<CallStream> {
        self.appends().idle.get_mut(peer_addr)?.pop()
    }

    /// Keeps `stream` for the next connection to `peer_addr`, if there is room.
    fn leave_idle(&self, peer_addr: &str, stream: CallStream) {
        let mut appends = self.appends();
        let idle = appends.idle.entry(peer_addr.to_string()).or_default();
        if idle.len() < IDLE_APPEND_STREAMS_PER_PEER_MAX {
            idle.push(stream);
        }
    }

    /// Whether calls to `peer_addr` go unary for now, not on streams.
    pub(crate) fn unary_calls(&self, peer_addr: &str) -> bool {
        let mut appends = self.appends();
        match appends.unary_until.get(peer_addr) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                appends.unary_until.remove(peer_addr);
                false
            }
            None => false,
        }
    }

    /// `peer_addr` answered a stream UNIMPLEMENTED: unary calls to it for a while.
    pub(crate) fn use_unary_calls(&self, peer_addr: &str) {
        tracing::info!(
            peer = peer_addr,
            "the peer serves no call streams (an older version?); one call per message for now"
        );
        let until = Instant::now() + Duration::from_millis(UNARY_CALLS_RETRY_MS);
        let mut appends = self.appends();
        appends.unary_until.insert(peer_addr.to_string(), until);
        appends.idle.remove(peer_addr);
    }

    /// A client for the peer at `peer_addr` (`host:port`), reusing its channel.
    pub fn client(&self, peer_addr: &str) -> Result<PeerClient<Channel>, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("channel cache lock poisoned");
        let channel = match channels.get(peer_addr) {
            Some(channel) => channel.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("http://{peer_addr}"))?
                    .connect_timeout(Duration::from_millis(PEER_CONNECT_TIMEOUT_MS))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_millis(PEER_KEEPALIVE_INTERVAL_MS))
                    .keep_alive_while_idle(true);
                let channel = match &self.connector {
                    Some(connector) => endpoint.connect_with_connector_lazy(connector.clone()),
                    None => endpoint.connect_lazy(),
                };
                channels.insert(peer_addr.to_string(), channel.clone());
                channel
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(self.message_bytes_max)
            .max_encoding_message_size(self.message_bytes_max))
    }
}

#[derive(Debug, Clone)]
pub struct NetworkFactory {
    channels: PeerChannels,
    log: LogProgress,
    install_wait: Duration,
}

impl NetworkFactory {
    /// `log` is this node's log: the commit index sent to followers never passes what it holds
    /// on disk (`LogProgress::commit_bound`). `install_wait` is how long a snapshot's last chunk
    /// waits for the receiver's install (`snapshot_sender.rs`).
    pub fn new(channels: PeerChannels, log: LogProgress, install_wait: Duration) -> NetworkFactory {
        NetworkFactory {
            channels,
            log,
            install_wait,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerConnection {
        PeerConnection {
            target,
            client: self.channels.client(&node.peer_addr),
            log: self.log.clone(),
            install_wait: self.install_wait,
            peer_addr: node.peer_addr.clone(),
            channels: self.channels.clone(),
            stream: None,
        }
    }
}

#[derive(Debug)]
pub struct PeerConnection {
    target: NodeId,
    client: Result<PeerClient<Channel>, tonic::transport::Error>,
    log: LogProgress,
    install_wait: Duration,
    peer_addr: String,
    channels: PeerChannels,
    /// The append stream this connection holds between appends (none during one: a request
    /// cut off by a deadline or a drop takes its stream with it).
    stream: Option<CallStream>,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            self.channels.leave_idle(&self.peer_addr, stream);
        }
    }
}

/// What a failed call's status means to openraft.
fn rpc_error<E: std::error::Error>(status: &tonic::Status) -> RPCError<NodeId, NodeInfo, E> {
    if status.code() == tonic::Code::Unavailable {
        RPCError::Unreachable(Unreachable::new(status))
    } else {
        RPCError::Network(NetworkError::new(status))
    }
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: RpcKind,
        request: &Req,
        deadline: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(client) => client,
            Err(error) => return Err(RPCError::Unreachable(Unreachable::new(error))),
        };
        let payload = tonic::Request::new(RaftPayload {
            data: encode(request).into(),
        });
        let call = async {
            match kind {
                RpcKind::AppendEntries => client.append_entries(payload).await,
                RpcKind::Vote => client.vote(payload).await,
                RpcKind::InstallSnapshot => client.install_snapshot(payload).await,
            }
        };
        let response = match tokio::time::timeout(deadline, call).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return Err(rpc_error(&status)),
            Err(elapsed) => return Err(RPCError::Network(NetworkError::new(&elapsed))),
        };
        self.answer(&response)
    }

    /// The peer's answer, decoded: its own error as a remote one.
    #[allow(
        clippy::result_large_err,
        reason = "openraft's own error type, which every RaftNetwork method returns"
    )]
    fn answer<Resp, E>(&self, response: &RaftPayload) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<NodeId, E>> =
            decode(&response.data).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        answer.map_err(|error| {
            RPCError::RemoteError(openraft::error::RemoteError::new(self.target, error))
        })
    }

    /// One AppendEntries on this connection's stream: the one it holds, an idle one, or a new
    /// one. A stream that fails before the request left, or one taken idle that fails at once
    /// (its connection may have closed while it waited), is replaced by a new one for a second
    /// try within the same deadline: an AppendEntries may be sent twice. Any other failure,
    /// the deadline included, drops the stream.
    async fn append(
        &mut self,
        request: &AppendEntriesRequest<TypeConfig>,
        deadline: Duration,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        if self.channels.unary_calls(&self.peer_addr) {
            return self.call(RpcKind::AppendEntries, request, deadline).await;
        }
        let payload = RaftPayload {
            data: encode(request).into(),
        };
        let (held, idle) = match self.stream.take() {
            Some(stream) => (Some(stream), false),
            None => (self.channels.take_idle(&self.peer_addr), true),
        };
        let started = Instant::now();
        let exchange = async {
            let client = match &mut self.client {
                Ok(client) => client,
                Err(error) => return Err(tonic::Status::unavailable(error.to_string())),
            };
            // AppendEntries is idempotent: a stream taken idle that fails is replaced.
            CallStream::call_or_open(held, idle, "append_entries", payload, |requests| {
                client.append_entries_stream(requests)
            })
            .await
        };
        match tokio::time::timeout(deadline, exchange).await {
            Ok(Ok((stream, response))) => {
                self.stream = Some(stream);
                self.answer(&response)
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                self.channels.use_unary_calls(&self.peer_addr);
                let left = deadline.saturating_sub(started.elapsed());
                self.call(RpcKind::AppendEntries, request, left).await
            }
            Ok(Err(status)) => Err(rpc_error(&status)),
            Err(elapsed) => Err(RPCError::Network(NetworkError::new(&elapsed))),
        }
    }
}

/// How many bytes of entries one AppendEntries carries, about (at least one entry always).
pub const REPLICATION_MESSAGE_BYTES_TARGET: usize = 256 * 1024;

/// How many of `entries`, from the front, fit in `budget` bytes encoded (at least one).
fn entries_within(entries: &[residency_store::Entry], budget: usize) -> usize {
    let mut used: usize = 0;
    for (count, entry) in entries.iter().enumerate() {
        let size = postcard::experimental::serialized_size(entry).unwrap_or(usize::MAX);
        used = used.saturating_add(size);
        if used > budget && count > 0 {
            return count;
        }
    }
    entries.len()
}

impl ChunkSink for PeerConnection {
    async fn send_chunk(
        &mut self,
        request: &InstallSnapshotRequest<TypeConfig>,
        deadline: Duration,
    ) -> ChunkResult {
        self.call(RpcKind::InstallSnapshot, request, deadline).await
    }
}

#[derive(Debug, Clone, Copy)]
enum RpcKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    /// Sends about `REPLICATION_MESSAGE_BYTES_TARGET` of the entries openraft hands over (at
    /// least one), and reports a partial success for the rest: openraft 0.9 gives every
    /// AppendEntries only one heartbeat interval to complete, and packs entries by count, not
    /// size, so a follower far behind on large batches would otherwise time out on every try.
    async fn append_entries(
        &mut self,
        mut request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        // The leader's own entries count as saved before its sync ends; a follower must not
        // apply one before it is on the leader's disk as well (see `LogStore::append`).
        request.leader_commit = self.log.commit_bound(request.leader_commit);
        let keep = entries_within(&request.entries, REPLICATION_MESSAGE_BYTES_TARGET);
        let truncated = keep < request.entries.len();
        request.entries.truncate(keep);
        let last_sent = request.entries.last().map(|entry| entry.log_id);
        let response = self.append(&request, option.hard_ttl()).await?;
        Ok(match response {
            AppendEntriesResponse::Success if truncated => {
                AppendEntriesResponse::PartialSuccess(last_sent)
            }
            other => other,
        })
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(RpcKind::InstallSnapshot, &request, option.hard_ttl())
            .await
    }

    /// openraft's own chunked sender gives the last chunk, whose answer waits for the install,
    /// the same deadline as every other chunk; this one waits `install_wait` for it.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let deadlines = Deadlines {
            chunk: option.hard_ttl(),
            install: self.install_wait.max(option.hard_ttl()),
        };
        let target = self.target;
        snapshot_sender::send_snapshot(
            self,
            target,
            vote,
            snapshot,
            cancel,
            snapshot_sender::chunk_bytes(&option),
            deadlines,
        )
        .await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(RpcKind::Vote, &request, option.hard_ttl()).await
    }
}

#[cfg(test)]
mod tests {
    //! The append stream against a scripted peer server on loopback (one piece alone; the
    //! cluster tests run the real peer service across processes).

    use openraft::{CommittedLeaderId, LogId};
    use residency_store::{Durable, LogStore, StoreOptions};
    use tokio::sync::oneshot;

    use super::*;
    use crate::test_peer::{DEADLINE, SLOW_INDEX, Script, start};

    /// A scripted peer on loopback and a network factory towards it: the factory, the peer's
    /// node record, what stops the peer, and the directory the factory's log lives in.
    async fn peer(
        script: Script,
    ) -> (
        NetworkFactory,
        NodeInfo,
        oneshot::Sender<()>,
        tempfile::TempDir,
    ) {
        let (addr, stop) = start(script).await;
        let dir = tempfile::tempdir().unwrap();
        let durable = Durable::open(
            dir.path(),
            StoreOptions {
                cache_capacity_bytes: 1 << 20,
            },
        )
        .unwrap();
        let log = LogStore::open(durable).unwrap().progress();
        let factory = NetworkFactory::new(
            PeerChannels::new(1 << 20, None),
            log,
            Duration::from_secs(1),
        );
        let node = NodeInfo {
            client_addr: String::new(),
            peer_addr: addr,
            jurisdiction: "US".to_string(),
        };
        (factory, node, stop, dir)
    }

    /// One connection to a scripted peer.
    async fn connect(script: Script) -> (PeerConnection, tempfile::TempDir) {
        let (mut factory, node, stop, dir) = peer(script).await;
        std::mem::forget(stop);
        (factory.new_client(2, &node).await, dir)
    }

    fn append_after(index: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            entries: Vec::new(),
            leader_commit: None,
        }
    }

    async fn send(
        connection: &mut PeerConnection,
        index: u64,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        connection
            .append_entries(append_after(index), RPCOption::new(DEADLINE))
            .await
    }

    #[tokio::test]
    async fn appends_share_one_stream() {
        let script = Script::default();
        let (mut connection, _dir) = connect(script.clone()).await;
        for index in 1..=5 {
            assert!(matches!(
                send(&mut connection, index).await,
                Ok(AppendEntriesResponse::Success)
            ));
        }
        assert_eq!(script.streams(), 1);
        assert_eq!(script.unary(), 0);
    }

    /// Appends `count` times, each on a new connection, and expects `Success` every time.
    async fn appends_on_new_connections(factory: &mut NetworkFactory, node: &NodeInfo, count: u64) {
        for index in 1..=count {
            let mut connection = factory.new_client(2, node).await;
            assert!(matches!(
                send(&mut connection, index).await,
                Ok(AppendEntriesResponse::Success)
            ));
        }
    }

    #[tokio::test]
    async fn a_new_connection_takes_the_stream_the_last_one_left() {
        let script = Script::default();
        let (mut factory, node, _stop, _dir) = peer(script.clone()).await;
        appends_on_new_connections(&mut factory, &node, 3).await;
        assert_eq!(script.streams(), 1);
        // Two at once: the second opens its own, and both are left idle.
        let mut first = factory.new_client(2, &node).await;
        let mut second = factory.new_client(2, &node).await;
        assert!(send(&mut first, 4).await.is_ok());
        assert!(send(&mut second, 5).await.is_ok());
        assert_eq!(script.streams(), 2);
        drop((first, second));
        assert_eq!(factory.channels.appends().idle[&node.peer_addr].len(), 2);
    }

    #[tokio::test]
    async fn an_idle_stream_the_peer_ended_is_replaced_within_the_append() {
        let script = Script {
            answers_per_stream: Some(1),
            ..Script::default()
        };
        let (mut factory, node, _stop, _dir) = peer(script.clone()).await;
        appends_on_new_connections(&mut factory, &node, 3).await;
        // The first stream, then for each later append the ended one and a new one.
        assert_eq!(script.streams(), 3);
    }

    #[tokio::test]
    async fn an_append_past_its_deadline_drops_the_stream_and_its_late_answer() {
        let script = Script::default();
        let (mut connection, _dir) = connect(script.clone()).await;
        assert!(send(&mut connection, 1).await.is_ok());
        assert!(matches!(
            send(&mut connection, SLOW_INDEX).await,
            Err(RPCError::Network(_))
        ));
        // The slow append's late Conflict belongs to the dropped stream: the next append gets
        // its own answer on a new one.
        assert!(matches!(
            send(&mut connection, 8).await,
            Ok(AppendEntriesResponse::Success)
        ));
        assert_eq!(script.streams(), 2);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_one_call_per_append() {
        let script = Script {
            no_stream: true,
            ..Script::default()
        };
        let (mut connection, _dir) = connect(script.clone()).await;
        for index in 1..=3 {
            assert!(matches!(
                send(&mut connection, index).await,
                Ok(AppendEntriesResponse::Success)
            ));
        }
        assert_eq!(script.streams(), 1, "asked once");
        assert_eq!(script.unary(), 3);
    }

    #[tokio::test]
    async fn an_unreachable_peer_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let (mut connection, _dir) = connect(Script::default()).await;
        connection.client = PeerChannels::new(1 << 20, None).client(&addr.to_string());
        assert!(matches!(
            send(&mut connection, 1).await,
            Err(RPCError::Unreachable(_))
        ));
    }
}
