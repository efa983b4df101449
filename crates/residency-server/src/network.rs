//! Raft traffic to peers over gRPC: one cached channel per peer, openraft's messages as postcard
//! bytes in a protobuf `bytes` field.
//!
//! openraft 0.9 calls `new_client` for every replication stream and for every linearizable read,
//! so channels are cached here: a new connection per call made reads slow and flaky.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

use crate::snapshot_sender::{self, ChunkResult, ChunkSink, Deadlines};
use crate::tls::PeerConnector;

/// How long to wait for a TCP connection to a peer (and, with TLS, for its handshake).
pub const PEER_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// HTTP/2 keepalive towards peers, so a dead connection is noticed between heartbeats.
const PEER_KEEPALIVE_INTERVAL_MS: u64 = 5_000;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("raft messages always serialize")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// One lazily connected channel per peer address, shared by Raft and by forwarding.
#[derive(Debug, Clone)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    message_bytes_max: usize,
    /// Mutual TLS towards peers; `None` when TLS is off.
    connector: Option<PeerConnector>,
}

impl PeerChannels {
    pub fn new(message_bytes_max: usize, connector: Option<PeerConnector>) -> PeerChannels {
        PeerChannels {
            channels: Arc::default(),
            message_bytes_max,
            connector,
        }
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
        }
    }
}

#[derive(Debug)]
pub struct PeerConnection {
    target: NodeId,
    client: Result<PeerClient<Channel>, tonic::transport::Error>,
    log: LogProgress,
    install_wait: Duration,
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
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Err(elapsed) => return Err(RPCError::Network(NetworkError::new(&elapsed))),
        };
        let answer: Result<Resp, RaftError<NodeId, E>> =
            decode(&response.data).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        answer.map_err(|error| {
            RPCError::RemoteError(openraft::error::RemoteError::new(self.target, error))
        })
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
        let response = self
            .call(RpcKind::AppendEntries, &request, option.hard_ttl())
            .await?;
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
