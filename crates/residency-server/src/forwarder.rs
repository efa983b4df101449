//! Writes a follower takes, handed to the leader in groups: one `Peer/ForwardWrites` call for
//! everything that queued while the last call was in flight, so that writes sent to any node
//! reach the leader's proposer together and share its entries.
//!
//! One call is in flight at a time. A write that arrives while none is goes at once, alone. The
//! leader answers each write on its own, in order (`PeerService::forward_writes`). A call that
//! fails on the way (the leader went, the connection broke) answers every write of it with
//! `NOT_LEADER` naming that leader, and a call past `peer_rpc_timeout_ms` with
//! `DEADLINE_EXCEEDED`: the leader may still apply them.

use std::time::Duration;

use residency_proto::peer_pb::RaftPayload;
use residency_store::{NodeId, NodeInfo, Raft};
use residency_types::ApplyResult;

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

async fn run(parts: ForwarderParts, mut groups: Groups<ForwardedWrite>) {
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
                let results = call(&parts, leader_id, &leader, &writes).await;
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
            }
            Some((leader_id, None)) => answer_all(answers, &not_leader(Some(leader_id), None)),
            None => answer_all(answers, &ApiError::NoLeader),
        }
    }
}

/// One `ForwardWrites` call: one answer per write, in order.
async fn call(
    parts: &ForwarderParts,
    leader_id: NodeId,
    leader: &NodeInfo,
    writes: &[ForwardedWrite],
) -> Vec<Result<ApplyResult, ApiError>> {
    let every = |error: ApiError| vec![Err(error); writes.len()];
    let mut client = match parts.peers.client(&leader.peer_addr) {
        Ok(client) => client,
        Err(error) => return every(ApiError::internal(error)),
    };
    let call = client.forward_writes(RaftPayload {
        data: encode(&writes).into(),
    });
    let response = match tokio::time::timeout(parts.call_timeout, call).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return every(forwarded_status(status, leader_id, leader)),
        // The leader may have applied them: the clients must treat these as unknown.
        Err(_) => {
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
