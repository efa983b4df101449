//! Linearizable reads share read-index rounds.
//!
//! openraft 0.9's `ensure_linearizable` costs a quorum heartbeat round per call. Reads queue
//! here; one task runs one round at a time and answers every read that was queued *before* the
//! round started (a read that arrives during a round waits for the next one, so the round it
//! gets began after it did: that is what keeps it linearizable).

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use residency_store::{NodeId, NodeInfo, Raft};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;

/// A round that fails with QuorumNotEnough (a heartbeat lost under load) is retried this often.
const READ_INDEX_ATTEMPTS_MAX: u32 = 3;
/// Reads answered by one round, at most; the rest wait for the next.
const READ_INDEX_ROUND_READS_MAX: usize = 4_096;

type Waiter = oneshot::Sender<Result<u64, ApiError>>;

#[derive(Debug, Clone)]
pub struct ReadIndexBatcher {
    waiters: mpsc::Sender<Waiter>,
}

impl ReadIndexBatcher {
    /// `round_timeout` bounds one round, including the wait for the leader to apply up to the
    /// read index, so one slow apply cannot stall every later read.
    pub fn start(raft: Raft, waiters_max: usize, round_timeout: Duration) -> ReadIndexBatcher {
        let (waiters, queue) = mpsc::channel(waiters_max);
        tokio::spawn(run_rounds(raft, queue, round_timeout));
        ReadIndexBatcher { waiters }
    }

    /// Confirms leadership with a quorum and waits until this node has applied the read index.
    /// Returns the read index: state at or after it answers the read linearizably.
    pub async fn read_index(&self) -> Result<u64, ApiError> {
        let (answer, answered) = oneshot::channel();
        self.waiters.try_send(answer).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => {
                ApiError::Overloaded("too many reads waiting for a read index".into())
            }
            mpsc::error::TrySendError::Closed(_) => ApiError::ShuttingDown,
        })?;
        answered.await.map_err(|_| ApiError::ShuttingDown)?
    }
}

async fn run_rounds(raft: Raft, mut queue: mpsc::Receiver<Waiter>, round_timeout: Duration) {
    let mut round = Vec::new();
    while queue
        .recv_many(&mut round, READ_INDEX_ROUND_READS_MAX)
        .await
        > 0
    {
        let result = match tokio::time::timeout(round_timeout, confirm_leadership(&raft)).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::QuorumUnavailable(format!(
                "no read index within {} ms",
                round_timeout.as_millis()
            ))),
        };
        metrics::histogram!("residency_read_index_round_reads").record(round.len() as f64);
        for waiter in round.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }
}

async fn confirm_leadership(raft: &Raft) -> Result<u64, ApiError> {
    let mut attempt = 1;
    loop {
        match raft.ensure_linearizable().await {
            Ok(read_log_id) => return Ok(read_log_id.map_or(0, |log_id| log_id.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                return Err(not_leader(forward.leader_id, forward.leader_node.as_ref()));
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(error))) => {
                if attempt >= READ_INDEX_ATTEMPTS_MAX {
                    return Err(ApiError::QuorumUnavailable(error.to_string()));
                }
                attempt += 1;
            }
            Err(RaftError::Fatal(_)) => return Err(ApiError::ShuttingDown),
        }
    }
}

pub fn not_leader(leader_id: Option<NodeId>, leader: Option<&NodeInfo>) -> ApiError {
    match leader_id {
        Some(leader_id) => ApiError::NotLeader {
            leader_id: Some(leader_id),
            leader_addr: leader.map(|node| node.client_addr.clone()),
        },
        None => ApiError::NoLeader,
    }
}
