//! Sending a snapshot to a follower or learner, in chunks, with a last chunk that waits for the
//! install.
//!
//! openraft 0.9's own chunked sender gives every chunk, the last one included, one
//! `install_snapshot_timeout`, and the last chunk's reply comes only once the receiver has
//! installed the whole snapshot. An install that takes longer than that (a large state on a
//! slow disk) timed out, and the leader sent the whole snapshot again, and again. Here the
//! chunks before the last keep that per-chunk deadline, and the last one waits up to
//! `raft.snapshot_install_wait_ms` for the install. The transfer logs its progress and counts
//! its bytes (`residency_snapshot_sent_bytes_total`), so a long one can be followed.
//!
//! The receiving side is openraft's (`Raft::install_snapshot` in `peer_service.rs`): chunks in
//! order from offset 0, a chunk out of order answered `SnapshotMismatch`, after which this side
//! starts again from the beginning.

use std::future::Future;
use std::time::{Duration, Instant};

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError,
};
use openraft::network::RPCOption;
use openraft::raft::{InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse};
use openraft::{Snapshot, Vote};
use residency_store::{NodeId, TypeConfig};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Consecutive failed attempts at one chunk before the transfer is given up (openraft then
/// starts a new one on its own schedule).
pub const SNAPSHOT_CHUNK_ATTEMPTS_MAX: u32 = 5;
/// The pause after the first failed attempt at a chunk; it doubles after each further failure.
const SNAPSHOT_RETRY_PAUSE_MS_MIN: u64 = 10;
/// The longest pause between attempts at a chunk.
const SNAPSHOT_RETRY_PAUSE_MS_MAX: u64 = 500;
/// A progress line is logged each time this much more has been sent (and at the end).
pub const SNAPSHOT_PROGRESS_LOG_BYTES: u64 = 64 * 1024 * 1024;

/// One chunk's trip to the receiver and back.
pub(crate) trait ChunkSink {
    /// Sends `request` and waits at most `deadline` for the receiver's answer.
    fn send_chunk(
        &mut self,
        request: &InstallSnapshotRequest<TypeConfig>,
        deadline: Duration,
    ) -> impl Future<Output = ChunkResult> + Send;
}

pub(crate) type ChunkResult = Result<
    InstallSnapshotResponse<NodeId>,
    RPCError<NodeId, residency_store::NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
>;

/// How long each chunk may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    /// Every chunk but the last: openraft's `install_snapshot_timeout`.
    pub chunk: Duration,
    /// The last chunk, whose answer comes once the receiver has installed the snapshot.
    pub install: Duration,
}

type SendResult = Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>>;

/// Sends `snapshot` to `target` through `sink`, chunk by chunk, until the receiver answers the
/// last chunk (it has installed the snapshot), answers with a higher vote, or the transfer
/// fails or is cancelled.
pub(crate) async fn send_snapshot(
    sink: &mut impl ChunkSink,
    target: NodeId,
    vote: Vote<NodeId>,
    mut snapshot: Snapshot<TypeConfig>,
    cancel: impl Future<Output = ReplicationClosed> + Send,
    chunk_bytes: usize,
    deadlines: Deadlines,
) -> SendResult {
    let snapshot_id = snapshot.meta.snapshot_id.clone();
    let total = snapshot.snapshot.seek(std::io::SeekFrom::End(0)).await;
    let total = total.map_err(|error| read_error(&snapshot.meta, error))?;
    snapshot
        .snapshot
        .seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|error| read_error(&snapshot.meta, error))?;
    tracing::info!(
        target_node = target,
        snapshot = %snapshot_id,
        bytes = total,
        "sending a snapshot"
    );
    let started = Instant::now();
    let mut cancel = std::pin::pin!(cancel);
    let transfer = Transfer {
        sink,
        vote,
        snapshot: &mut snapshot,
        chunk_bytes: chunk_bytes.max(1),
        deadlines,
        total,
        target,
    };
    let sent = tokio::select! {
        // A stream already closed stops the transfer before it sends anything.
        biased;
        closed = &mut cancel => Err(StreamingError::Closed(closed)),
        sent = transfer.run() => sent,
    };
    let outcome = match &sent {
        Ok(response) if response.vote > vote => "superseded",
        Ok(_) => "installed",
        Err(StreamingError::Closed(_)) => "cancelled",
        Err(_) => "failed",
    };
    metrics::counter!("residency_snapshot_transfers_total", "outcome" => outcome).increment(1);
    metrics::histogram!("residency_snapshot_transfer_seconds")
        .record(started.elapsed().as_secs_f64());
    match &sent {
        Ok(_) => tracing::info!(
            target_node = target,
            snapshot = %snapshot_id,
            outcome,
            seconds = started.elapsed().as_secs_f64(),
            "snapshot transfer ended"
        ),
        Err(error) => tracing::warn!(
            target_node = target,
            snapshot = %snapshot_id,
            outcome,
            seconds = started.elapsed().as_secs_f64(),
            %error,
            "snapshot transfer ended"
        ),
    }
    sent
}

struct Transfer<'a, S> {
    sink: &'a mut S,
    vote: Vote<NodeId>,
    snapshot: &'a mut Snapshot<TypeConfig>,
    chunk_bytes: usize,
    deadlines: Deadlines,
    total: u64,
    target: NodeId,
}

impl<S: ChunkSink> Transfer<'_, S> {
    async fn run(self) -> SendResult {
        let Transfer {
            sink,
            vote,
            snapshot,
            chunk_bytes,
            deadlines,
            total,
            target,
        } = self;
        let mut offset = 0_u64;
        let mut failures = 0_u32;
        let mut logged_at = 0_u64;
        // The chunk in hand, kept for a retry; its buffer is reused for the next one.
        let mut request: Option<InstallSnapshotRequest<TypeConfig>> = None;
        loop {
            if request.as_ref().map(|request| request.offset) != Some(offset) {
                let mut data = request.take().map(|old| old.data).unwrap_or_default();
                snapshot
                    .snapshot
                    .seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(|error| read_error(&snapshot.meta, error))?;
                let wanted = usize::try_from((total - offset).min(chunk_bytes as u64))
                    .expect("a chunk fits in memory");
                data.clear();
                data.resize(wanted, 0);
                snapshot
                    .snapshot
                    .read_exact(&mut data)
                    .await
                    .map_err(|error| read_error(&snapshot.meta, error))?;
                request = Some(InstallSnapshotRequest {
                    vote,
                    meta: snapshot.meta.clone(),
                    offset,
                    done: offset + data.len() as u64 == total,
                    data,
                });
            }
            let request = request.as_ref().expect("a chunk in hand");
            let done = request.done;
            let deadline = if done {
                tracing::info!(
                    target_node = target,
                    bytes = total,
                    wait_s = deadlines.install.as_secs(),
                    "snapshot sent; waiting for the receiver to install it"
                );
                deadlines.install
            } else {
                deadlines.chunk
            };
            let error = match sink.send_chunk(request, deadline).await {
                Ok(response) => {
                    failures = 0;
                    metrics::counter!("residency_snapshot_sent_bytes_total")
                        .increment(request.data.len() as u64);
                    if response.vote > vote || done {
                        return Ok(SnapshotResponse::new(response.vote));
                    }
                    offset += request.data.len() as u64;
                    if offset - logged_at >= SNAPSHOT_PROGRESS_LOG_BYTES {
                        logged_at = offset;
                        tracing::info!(
                            target_node = target,
                            sent = offset,
                            bytes = total,
                            "snapshot transfer in progress"
                        );
                    }
                    continue;
                }
                Err(error) => error,
            };
            match error {
                RPCError::RemoteError(RemoteError {
                    target,
                    target_node,
                    source: RaftError::Fatal(fatal),
                }) => {
                    return Err(StreamingError::RemoteError(RemoteError {
                        target,
                        target_node,
                        source: fatal,
                    }));
                }
                RPCError::RemoteError(RemoteError {
                    source: RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch)),
                    ..
                }) => {
                    // The receiver lost the stream (it restarted, or took another snapshot):
                    // begin again.
                    tracing::warn!(target_node = target, %mismatch, "snapshot transfer restarts from the beginning");
                    offset = 0;
                    logged_at = 0;
                    failures = 0;
                    continue;
                }
                RPCError::PayloadTooLarge(too_large) => {
                    return Err(StreamingError::Network(NetworkError::new(&too_large)));
                }
                RPCError::Timeout(_) | RPCError::Network(_) | RPCError::Unreachable(_) if done => {
                    // The receiver may have installed it or may still be installing it; a
                    // second last chunk would be refused, so let openraft start again.
                    return Err(transient(error));
                }
                transient_error @ (RPCError::Timeout(_)
                | RPCError::Network(_)
                | RPCError::Unreachable(_)) => {
                    failures += 1;
                    if failures >= SNAPSHOT_CHUNK_ATTEMPTS_MAX {
                        return Err(transient(transient_error));
                    }
                    tracing::debug!(target_node = target, error = %transient_error, failures, "a snapshot chunk failed; retrying it");
                    tokio::time::sleep(retry_pause(failures)).await;
                }
            }
        }
    }
}

fn retry_pause(failures: u32) -> Duration {
    let doubled =
        SNAPSHOT_RETRY_PAUSE_MS_MIN.saturating_mul(1 << failures.saturating_sub(1).min(10));
    Duration::from_millis(doubled.min(SNAPSHOT_RETRY_PAUSE_MS_MAX))
}

fn transient(
    error: RPCError<NodeId, residency_store::NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
) -> StreamingError<TypeConfig, Fatal<NodeId>> {
    match error {
        RPCError::Timeout(timeout) => StreamingError::Timeout(timeout),
        RPCError::Unreachable(unreachable) => StreamingError::Unreachable(unreachable),
        RPCError::Network(network) => StreamingError::Network(network),
        other => StreamingError::Network(NetworkError::new(&other)),
    }
}

fn read_error(
    meta: &residency_store::SnapshotMeta,
    error: std::io::Error,
) -> StreamingError<TypeConfig, Fatal<NodeId>> {
    StreamingError::StorageError(openraft::StorageError::IO {
        source: openraft::StorageIOError::read_snapshot(Some(meta.signature()), &error),
    })
}

/// The chunk size openraft asks for, or its default when the option carries none.
pub(crate) fn chunk_bytes(option: &RPCOption) -> usize {
    option
        .snapshot_chunk_size()
        .unwrap_or(crate::config::RaftConfig::default().snapshot_chunk_bytes_max as usize)
}

#[cfg(test)]
mod tests {
    //! The sender against a scripted receiver (one piece alone; the cluster tests run the
    //! real one across processes).

    use std::collections::VecDeque;

    use openraft::error::{SnapshotMismatch, Timeout};
    use openraft::{LeaderId, RaftTypeConfig, SnapshotSegmentId};

    use super::*;

    const CHUNK: usize = 10;
    const DEADLINES: Deadlines = Deadlines {
        chunk: Duration::from_millis(100),
        install: Duration::from_secs(600),
    };

    /// What the scripted receiver does with the next chunk.
    enum Then {
        Accept,
        AcceptWithVote(Vote<NodeId>),
        TimeOut,
        Mismatch,
    }

    #[derive(Default)]
    struct Script {
        answers: VecDeque<Then>,
        /// (offset, bytes, done, deadline) of every chunk sent.
        sent: Vec<(u64, Vec<u8>, bool, Duration)>,
    }

    impl ChunkSink for Script {
        async fn send_chunk(
            &mut self,
            request: &InstallSnapshotRequest<TypeConfig>,
            deadline: Duration,
        ) -> ChunkResult {
            self.sent
                .push((request.offset, request.data.clone(), request.done, deadline));
            match self.answers.pop_front().unwrap_or(Then::Accept) {
                Then::Accept => Ok(InstallSnapshotResponse { vote: vote() }),
                Then::AcceptWithVote(vote) => Ok(InstallSnapshotResponse { vote }),
                Then::TimeOut => Err(RPCError::Timeout(Timeout {
                    action: openraft::RPCTypes::InstallSnapshot,
                    id: 1,
                    target: 2,
                    timeout: deadline,
                })),
                Then::Mismatch => Err(RPCError::RemoteError(RemoteError::new(
                    2,
                    RaftError::APIError(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                        expect: SnapshotSegmentId {
                            id: "s".to_string(),
                            offset: 0,
                        },
                        got: SnapshotSegmentId {
                            id: "s".to_string(),
                            offset: request.offset,
                        },
                    })),
                ))),
            }
        }
    }

    fn vote() -> Vote<NodeId> {
        Vote::new_committed(3, 1)
    }

    async fn snapshot(bytes: &[u8]) -> (tempfile::TempDir, Snapshot<TypeConfig>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("snap");
        std::fs::write(&path, bytes).expect("snapshot file written");
        let file: <TypeConfig as RaftTypeConfig>::SnapshotData =
            tokio::fs::File::open(&path).await.expect("opened");
        let meta = residency_store::SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(LeaderId::new(3, 1), 7)),
            last_membership: openraft::StoredMembership::default(),
            snapshot_id: "s".to_string(),
        };
        (
            dir,
            Snapshot {
                meta,
                snapshot: Box::new(file),
            },
        )
    }

    async fn send(script: &mut Script, bytes: &[u8]) -> SendResult {
        let (_dir, snapshot) = snapshot(bytes).await;
        let never = std::future::pending::<ReplicationClosed>();
        send_snapshot(script, 2, vote(), snapshot, never, CHUNK, DEADLINES).await
    }

    fn offsets(script: &Script) -> Vec<u64> {
        script.sent.iter().map(|(offset, ..)| *offset).collect()
    }

    #[tokio::test]
    async fn chunks_go_in_order_and_only_the_last_waits_for_the_install() {
        let bytes: Vec<u8> = (0..25).collect();
        let mut script = Script::default();
        let response = send(&mut script, &bytes).await.expect("sent");
        assert_eq!(response.vote, vote());
        assert_eq!(offsets(&script), vec![0, 10, 20]);
        let joined: Vec<u8> = script.sent.iter().flat_map(|s| s.1.clone()).collect();
        assert_eq!(joined, bytes);
        let flags: Vec<(bool, Duration)> = script.sent.iter().map(|s| (s.2, s.3)).collect();
        assert_eq!(
            flags,
            vec![
                (false, DEADLINES.chunk),
                (false, DEADLINES.chunk),
                (true, DEADLINES.install)
            ]
        );
    }

    #[tokio::test]
    async fn a_chunk_that_times_out_is_sent_again_and_a_mismatch_starts_over() {
        let bytes: Vec<u8> = (0..25).collect();
        let mut script = Script {
            answers: VecDeque::from([Then::Accept, Then::TimeOut, Then::Accept, Then::Mismatch]),
            ..Script::default()
        };
        send(&mut script, &bytes).await.expect("sent");
        assert_eq!(offsets(&script), vec![0, 10, 10, 20, 0, 10, 20]);
    }

    #[tokio::test]
    async fn a_last_chunk_that_times_out_ends_the_transfer_without_sending_it_again() {
        let bytes: Vec<u8> = (0..15).collect();
        let mut script = Script {
            answers: VecDeque::from([Then::Accept, Then::TimeOut]),
            ..Script::default()
        };
        let error = send(&mut script, &bytes).await.expect_err("failed");
        assert!(matches!(error, StreamingError::Timeout(_)), "{error}");
        assert_eq!(offsets(&script), vec![0, 10]);
    }

    #[tokio::test]
    async fn a_chunk_failing_every_attempt_ends_the_transfer() {
        let bytes: Vec<u8> = (0..15).collect();
        let mut script = Script {
            answers: (0..SNAPSHOT_CHUNK_ATTEMPTS_MAX)
                .map(|_| Then::TimeOut)
                .collect(),
            ..Script::default()
        };
        let error = send(&mut script, &bytes).await.expect_err("failed");
        assert!(matches!(error, StreamingError::Timeout(_)), "{error}");
        assert_eq!(script.sent.len(), SNAPSHOT_CHUNK_ATTEMPTS_MAX as usize);
    }

    #[tokio::test]
    async fn a_higher_vote_stops_the_transfer_at_once() {
        let higher = Vote::new_committed(4, 2);
        let mut script = Script {
            answers: VecDeque::from([Then::AcceptWithVote(higher)]),
            ..Script::default()
        };
        let response = send(&mut script, &[1; 30]).await.expect("answered");
        assert_eq!(response.vote, higher);
        assert_eq!(offsets(&script), vec![0]);
    }

    #[tokio::test]
    async fn a_cancelled_transfer_ends_closed() {
        let (_dir, snapshot) = snapshot(&[1; 30]).await;
        let mut script = Script::default();
        let cancelled = async { ReplicationClosed::new("replication stopped") };
        let error = send_snapshot(
            &mut script,
            2,
            vote(),
            snapshot,
            cancelled,
            CHUNK,
            DEADLINES,
        )
        .await
        .expect_err("cancelled");
        assert!(matches!(error, StreamingError::Closed(_)), "{error}");
    }

    #[tokio::test]
    async fn an_empty_snapshot_is_one_last_chunk() {
        let mut script = Script::default();
        send(&mut script, &[]).await.expect("sent");
        assert_eq!(script.sent.len(), 1);
        assert!(script.sent[0].2, "the only chunk is the last");
    }
}
