//! Writes a follower takes, handed to the leader in groups: one `Peer/ForwardWrites` call for
//! everything that queued while the last call was in flight, so that writes sent to any node
//! reach the leader's proposer together and share its entries.
//!
//! One call is in flight at a time. A write that arrives while none is goes at once, alone. The
//! calls travel on one long-lived stream to the leader (`Peer/ForwardWritesStream`,
//! `call_stream.rs`), or as unary `Peer/ForwardWrites` calls to a leader without it. The leader
//! answers each write on its own, in order (`peer_service::forward`). A call that fails on the
//! way (the leader went, the connection broke) answers every write of it with `NOT_LEADER`
//! naming that leader, and a call past `peer_rpc_timeout_ms` with `DEADLINE_EXCEEDED`: the
//! leader may still apply them. Either drops the stream; a group whose stream had closed before
//! it was sent goes on a new one.

use std::time::Duration;

use residency_proto::peer_pb::RaftPayload;
use residency_store::{NodeId, NodeInfo, Raft};
use residency_types::ApplyResult;

use crate::call_stream::CallStream;
use crate::error::ApiError;
use crate::network::{PeerChannels, decode, encode};
use crate::node::{ForwardedWrite, forwarded_status, leader_of};
use crate::proposer::Proposer;
use crate::read_index::not_leader;
use crate::write_queue::{Answer, GroupLimits, Groups, WriteQueue, answer_all, write_queue};

/// A follower's queue of writes for the leader. Cheap to clone; every clone feeds one task.
#[derive(Debug, Clone)]
pub struct Forwarder {
    queue: WriteQueue<ForwardedWrite>,
}

/// What the forwarder needs of the node.
pub(crate) struct ForwarderParts {
    pub node_id: NodeId,
    pub raft: Raft,
    pub peers: PeerChannels,
    /// Where the writes go if this node has become the leader meanwhile.
    pub proposer: Proposer,
    pub call_timeout: Duration,
    pub limits: GroupLimits,
}

impl Forwarder {
    pub(crate) fn start(parts: ForwarderParts) -> Forwarder {
        let (queue, groups) = write_queue(parts.limits, "to be forwarded to the leader");
        tokio::spawn(run(parts, groups));
        Forwarder { queue }
    }

    /// Queues a write for the leader and waits for the leader's answer.
    pub async fn forward(&self, write: ForwardedWrite) -> Result<ApplyResult, ApiError> {
        let encoded_bytes =
            postcard::experimental::serialized_size(&write).map_err(ApiError::internal)?;
        let answered = self.queue.enqueue(write, encoded_bytes)?;
        answered.await.map_err(|_| ApiError::ShuttingDown)?
    }
}

/// The stream to the leader, and the leader's peer address it goes to.
type LeaderStream = Option<(String, CallStream)>;

async fn run(parts: ForwarderParts, mut groups: Groups<ForwardedWrite>) {
    let mut stream: LeaderStream = None;
    while let Some(group) = groups.next().await {
        metrics::histogram!("residency_forward_writes").record(group.len() as f64);
        let (writes, answers): (Vec<ForwardedWrite>, Vec<Answer>) = group
            .into_iter()
            .map(|queued| (queued.write, queued.answer))
            .unzip();
        match leader_of(&parts.raft) {
            Some((leader_id, _)) if leader_id == parts.node_id => {
                // This node leads now: its own proposer takes them, queued in order now, answered
                // without waiting here (the proposer groups them with its other writes).
                for (write, answer) in writes.into_iter().zip(answers) {
                    match parts.proposer.enqueue(write) {
                        Ok(answered) => {
                            tokio::spawn(async move {
                                let result = answered.await.unwrap_or(Err(ApiError::ShuttingDown));
                                let _ = answer.send(result);
                            });
                        }
                        Err(error) => {
                            let _ = answer.send(Err(error));
                        }
                    }
                }
            }
            Some((leader_id, Some(leader))) => {
                let results = call(&parts, leader_id, &leader, &writes, &mut stream).await;
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
            }
            Some((leader_id, None)) => answer_all(answers, &not_leader(Some(leader_id), None)),
            None => answer_all(answers, &ApiError::NoLeader),
        }
    }
}

/// One group for the leader: one answer per write, in order.
async fn call(
    parts: &ForwarderParts,
    leader_id: NodeId,
    leader: &NodeInfo,
    writes: &[ForwardedWrite],
    stream: &mut LeaderStream,
) -> Vec<Result<ApplyResult, ApiError>> {
    let every = |error: ApiError| vec![Err(error); writes.len()];
    let payload = RaftPayload {
        data: encode(&writes).into(),
    };
    let sent = send_group(
        &parts.peers,
        &leader.peer_addr,
        payload,
        stream,
        parts.call_timeout,
    )
    .await;
    let response = match sent {
        Ok(response) => response,
        Err(Unanswered::Failed(status)) => {
            return every(forwarded_status(status, leader_id, leader));
        }
        Err(Unanswered::Client(error)) => return every(ApiError::internal(error)),
        // The leader may have applied them: the clients must treat these as unknown.
        Err(Unanswered::TimedOut) => {
            let waited_ms = u64::try_from(parts.call_timeout.as_millis()).unwrap_or(u64::MAX);
            return every(ApiError::DeadlineExceeded(waited_ms));
        }
    };
    match decode::<Vec<Result<ApplyResult, ApiError>>>(&response.data) {
        Ok(results) if results.len() == writes.len() => results,
        Ok(results) => every(ApiError::internal(format!(
            "the leader answered {} of {} forwarded writes",
            results.len(),
            writes.len()
        ))),
        Err(error) => every(ApiError::internal(error)),
    }
}

/// How a group went without an answer.
#[derive(Debug)]
enum Unanswered {
    /// No client for the leader's address.
    Client(tonic::transport::Error),
    /// The leader or the way to it failed: nothing, or all, may have been applied.
    Failed(tonic::Status),
    /// No answer within the deadline: the leader may still apply them.
    TimedOut,
}

/// Sends one group (`payload`) to the leader at `peer_addr` and takes its answer: on `stream`
/// if it goes there (a group whose stream had closed before it was sent goes on a new one), on
/// a new stream, or as one `ForwardWrites` call to a leader without streams. `stream` holds the
/// stream afterwards, unless it failed.
async fn send_group(
    peers: &PeerChannels,
    peer_addr: &str,
    payload: RaftPayload,
    stream: &mut LeaderStream,
    deadline: Duration,
) -> Result<RaftPayload, Unanswered> {
    let mut client = peers.client(peer_addr).map_err(Unanswered::Client)?;
    let held = match stream.take() {
        Some((addr, held)) if addr == peer_addr => Some(held),
        _ => None,
    };
    let until = tokio::time::Instant::now() + deadline;
    if !peers.unary_calls(peer_addr) {
        // A group that failed on its stream may have been proposed: no resend.
        let exchange =
            CallStream::call_or_open(held, false, "forward_writes", payload.clone(), |requests| {
                client.forward_writes_stream(requests)
            });
        match tokio::time::timeout_at(until, exchange).await {
            Ok(Ok((held, response))) => {
                *stream = Some((peer_addr.to_string(), held));
                return Ok(response);
            }
            // Refused before anything was proposed: the leader has no streams. As one call.
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                peers.use_unary_calls(peer_addr);
            }
            Ok(Err(status)) => return Err(Unanswered::Failed(status)),
            Err(_) => return Err(Unanswered::TimedOut),
        }
    }
    match tokio::time::timeout_at(until, client.forward_writes(payload)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(Unanswered::Failed(status)),
        Err(_) => Err(Unanswered::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    //! The transport of a group against a scripted leader on loopback; the cluster tests
    //! forward real writes across processes.

    use super::*;
    use crate::test_peer::{DEADLINE, Script, start};

    fn group(bytes: &[u8]) -> RaftPayload {
        RaftPayload {
            data: bytes.to_vec().into(),
        }
    }

    #[tokio::test]
    async fn groups_share_one_stream_and_each_gets_its_own_answer() {
        let script = Script::default();
        let (addr, _stop) = start(script.clone()).await;
        let peers = PeerChannels::new(1 << 20, None);
        let mut stream = None;
        for n in 0..4u8 {
            let answer = send_group(&peers, &addr, group(&[n; 3]), &mut stream, DEADLINE)
                .await
                .unwrap();
            assert_eq!(&answer.data[..], &[n; 3]);
        }
        assert_eq!((script.streams(), script.unary()), (1, 0));
    }

    #[tokio::test]
    async fn a_leader_without_streams_gets_one_call_per_group() {
        let script = Script {
            no_stream: true,
            ..Script::default()
        };
        let (addr, _stop) = start(script.clone()).await;
        let peers = PeerChannels::new(1 << 20, None);
        let mut stream = None;
        for n in 0..3u8 {
            let answer = send_group(&peers, &addr, group(&[n]), &mut stream, DEADLINE)
                .await
                .unwrap();
            assert_eq!(&answer.data[..], &[n]);
        }
        assert_eq!((script.streams(), script.unary()), (1, 3), "asked once");
    }

    #[tokio::test]
    async fn a_stream_the_leader_ended_is_replaced() {
        let script = Script {
            answers_per_stream: Some(1),
            ..Script::default()
        };
        let (addr, _stop) = start(script.clone()).await;
        let peers = PeerChannels::new(1 << 20, None);
        let mut stream = None;
        assert!(
            send_group(&peers, &addr, group(b"a"), &mut stream, DEADLINE)
                .await
                .is_ok()
        );
        // The ended stream either refuses the group before it leaves (then a new stream takes
        // it) or ends without its answer (then it fails, as a broken call does): never an
        // answer that is not its own.
        match send_group(&peers, &addr, group(b"b"), &mut stream, DEADLINE).await {
            Ok(answer) => assert_eq!(&answer.data[..], b"b"),
            Err(Unanswered::Failed(status)) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
            }
            Err(other) => panic!("{other:?}"),
        }
        let answer = send_group(&peers, &addr, group(b"c"), &mut stream, DEADLINE)
            .await
            .unwrap();
        assert_eq!(&answer.data[..], b"c");
        assert!(script.streams() >= 2);
    }
}
