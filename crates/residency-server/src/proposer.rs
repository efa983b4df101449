//! Grouped proposals on the leader: many writes per log entry, one sync for many.
//!
//! openraft 0.9's core appends one client write at a time and waits for its flush before it
//! takes the next, so a proposal per write syncs the log once per write however many arrive
//! (docs/performance.md). Here writes queue instead. One task takes them: a write that arrives
//! while no entry is on its way is proposed at once, alone (no timer, no added latency); writes
//! that arrive while an entry is on its way wait until the log has accepted it (appended and
//! synced it), and while `PROPOSAL_ENTRIES_IN_FLIGHT_MAX` entries are proposed and not yet
//! answered, until the oldest is; then everything queued goes into the next entry, up to
//! `proposal_writes_max` writes and `proposal_bytes_max` bytes. Each write keeps its request id
//! and gets its own answer (`residency_core::apply` decides them in order).
//!
//! The check before proposing runs once per group, over the leader's applied state plus what
//! the group's earlier writes would leave (`StateReader::evaluate`): a refusal is answered at
//! once and leaves the group; apply decides again at the entry's position.
//!
//! A full queue (`proposal_queue_writes_max`) answers `OVERLOADED` at once: no write waits
//! without bound. A write whose caller has gone (its deadline passed) before the group is
//! formed is dropped unproposed; the caller was told `DEADLINE_EXCEEDED`, which allows it.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use residency_store::{AnswerBoard, LogProgress, Raft, StateReader};
use residency_types::limits::COMMAND_BYTES_MAX;
use residency_types::{AnswerTag, ApplyResult, Command, Outcome, Proposal, ReasonCode};
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::node::ForwardedWrite;
use crate::read_index::not_leader;
use crate::write_queue::{
    Answer, Answered, GroupLimits, Groups, Queued, WriteQueue, answer_all, write_queue,
};

/// The leader's write queue. Cheap to clone; every clone feeds the same task.
#[derive(Debug, Clone)]
pub struct Proposer {
    queue: WriteQueue<Command>,
}

/// What the proposer needs of the node.
pub(crate) struct ProposerParts {
    pub raft: Raft,
    pub reader: StateReader,
    pub log: LogProgress,
    pub limits: GroupLimits,
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(since_epoch.as_millis()).expect("milliseconds since 1970 fit in u64")
}

impl Proposer {
    pub(crate) fn start(parts: ProposerParts) -> Proposer {
        let (queue, groups) = write_queue(parts.limits, "for the next log entry on the leader");
        tokio::spawn(run(parts, groups));
        Proposer { queue }
    }

    /// Queues a write for the next entry and waits for its answer. Only the leader proposes;
    /// on a node that is not, openraft answers `NOT_LEADER` with a hint.
    pub async fn propose(&self, write: ForwardedWrite) -> Result<ApplyResult, ApiError> {
        let answered = self.enqueue(write)?;
        answered.await.map_err(|_| ApiError::ShuttingDown)?
    }

    /// Queues a write for the next entry, now, behind every write queued before this call;
    /// the answer comes on the receiver.
    pub fn enqueue(&self, write: ForwardedWrite) -> Result<Answered, ApiError> {
        let command = Command {
            request_id: write.request_id,
            caller: write.caller,
            // Set by the node that took the request; forwarded writes come from peers, which
            // are authenticated nodes whenever TLS is on.
            caller_authenticated: write.caller_authenticated,
            reason: write.reason,
            // The leader's clock: only the leader proposes (elsewhere openraft refuses).
            stamped_at_ms: now_ms(),
            body: write.body,
        };
        // Bounded so that every request record stays inline in sled (whose larger values go to
        // unsynced blob files) and any one write fits an entry.
        let encoded_bytes =
            postcard::experimental::serialized_size(&command).map_err(ApiError::internal)?;
        if encoded_bytes > COMMAND_BYTES_MAX {
            return Err(ApiError::invalid(
                ReasonCode::BatchTooLarge,
                "request",
                format!(
                    "encodes to {encoded_bytes} bytes, more than the limit of {COMMAND_BYTES_MAX}; send smaller batches"
                ),
            ));
        }
        self.queue.enqueue(command, encoded_bytes)
    }
}

/// Entries proposed and not yet answered, at most: the next group waits for the oldest. Two
/// keep a second entry on its way while the first commits; without a bound, writes under load
/// went in entries one leader sync apart, many and small, each costing the three nodes its
/// messages, syncs and apply (at 256 in flight 29 writes per entry unbounded, 65 with two, and
/// 15-20% more writes per second; `docs/performance.md`). It also stops the leader filling its
/// log with entries that cannot commit while it has no quorum.
const PROPOSAL_ENTRIES_IN_FLIGHT_MAX: usize = 2;

/// An entry sent to the log and not yet answered.
struct InFlight {
    /// The log's next index when the entry was sent: the entry is at least there.
    at_least: u64,
    /// Closed when the entry's proposal has its answer (or failed): it is past the log then.
    done: oneshot::Receiver<()>,
}

async fn run(parts: ProposerParts, mut groups: Groups<Command>) {
    let mut durable = parts.log.durable();
    let mut in_flight: std::collections::VecDeque<InFlight> = std::collections::VecDeque::new();
    while groups.wait_for_one().await {
        // Answered entries leave; the next group waits for the oldest while too many remain.
        in_flight.retain_mut(|flight| {
            !matches!(
                flight.done.try_recv(),
                Ok(()) | Err(oneshot::error::TryRecvError::Closed)
            )
        });
        while in_flight.len() >= PROPOSAL_ENTRIES_IN_FLIGHT_MAX {
            let mut oldest = in_flight.pop_front().expect("at least one in flight");
            let _ = (&mut oldest.done).await;
        }
        if let Some(last) = in_flight.back_mut() {
            let at_least = last.at_least;
            tokio::select! {
                _ = durable.wait_for(|&next| next > at_least) => {}
                _ = &mut last.done => {}
            }
        }
        let Some(group) = groups.next().await else {
            return;
        };
        let group = check_before_proposing(&parts, group).await;
        if group.is_empty() {
            continue;
        }
        metrics::histogram!("residency_proposal_writes").record(group.len() as f64);
        let at_least = parts.log.next_index();
        let (done, done_receiver) = oneshot::channel();
        tokio::spawn(submit(
            parts.raft.clone(),
            parts.reader.answer_board(),
            group,
            done,
        ));
        in_flight.push_back(InFlight {
            at_least,
            done: done_receiver,
        });
    }
}

/// Runs the rules over the group once, as the next entry would: refusals are answered now and
/// leave the group.
///
/// The check is only as good as the leader's applied state: once the leader has applied an
/// entry of its own term, it holds every write acknowledged by it or by any earlier leader.
/// Until then (just after an election) it is skipped rather than refuse a write on a state
/// that may lack its premises; apply alone decides. A retry of an applied request passes the
/// check with its first result and is answered by apply from its record.
async fn check_before_proposing(
    parts: &ProposerParts,
    group: Vec<Queued<Command>>,
) -> Vec<Queued<Command>> {
    if !has_applied_own_term(&parts.raft) {
        return group;
    }
    let commands: Vec<Command> = group.iter().map(|queued| queued.write.clone()).collect();
    let results = match parts.reader.evaluate(&commands).await {
        Ok(results) => results,
        Err(error) => {
            let answers = group.into_iter().map(|queued| queued.answer);
            answer_all(answers, &ApiError::internal(error));
            return Vec::new();
        }
    };
    assert_eq!(results.len(), group.len(), "one check per write");
    group
        .into_iter()
        .zip(results)
        .filter_map(|(queued, result)| match result.outcome {
            Some(Outcome::Rejected(rejection)) => {
                let _ = queued.answer.send(Err(ApiError::Rejected(rejection)));
                None
            }
            _ => Some(queued),
        })
        .collect()
}

fn has_applied_own_term(raft: &Raft) -> bool {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    metrics
        .last_applied
        .is_some_and(|applied| applied.leader_id.term == metrics.current_term)
}

/// The writes of an entry on its way, and the proposer's signal that it is past the log:
/// whichever answers first, this node's apply or openraft, takes them.
type Unanswered = Arc<Mutex<Option<(Vec<Answer>, oneshot::Sender<()>)>>>;

fn take_unanswered(unanswered: &Unanswered) -> Option<(Vec<Answer>, oneshot::Sender<()>)> {
    unanswered.lock().expect("unanswered lock poisoned").take()
}

fn send_results(answers: Vec<Answer>, results: impl ExactSizeIterator<Item = ApplyResult>) {
    assert_eq!(
        results.len(),
        answers.len(),
        "an entry's answer has one result per write"
    );
    for (answer, result) in answers.into_iter().zip(results) {
        let _ = answer.send(Ok(result));
    }
}

/// Proposes one group as one entry and hands each write its own answer: from this node's
/// apply as soon as it has decided the entry (`residency_store::answers`), or else when
/// openraft's `client_write` returns. `done` is dropped with the answers, which tells the
/// proposer the entry is past the log whatever happened to it.
async fn submit(
    raft: Raft,
    board: AnswerBoard,
    group: Vec<Queued<Command>>,
    done: oneshot::Sender<()>,
) {
    let (commands, answers): (Vec<Command>, Vec<Answer>) = group
        .into_iter()
        .map(|queued| (queued.write, queued.answer))
        .unzip();
    let unanswered: Unanswered = Arc::new(Mutex::new(Some((answers, done))));
    let registration = board.register({
        let unanswered = unanswered.clone();
        Box::new(move |results: &[ApplyResult]| {
            if let Some((answers, _done)) = take_unanswered(&unanswered) {
                send_results(answers, results.iter().cloned());
            }
        })
    });
    let mut proposal = Proposal::new(commands);
    proposal.answer_tag = AnswerTag(Some(registration.tag()));
    let written = raft.client_write(proposal).await;
    drop(registration);
    let Some((answers, done)) = take_unanswered(&unanswered) else {
        // Answered from apply.
        return;
    };
    drop(done);
    match written {
        Ok(response) => send_results(answers, response.data.results.into_iter()),
        Err(error) => {
            let error = match error {
                RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                    not_leader(forward.leader_id, forward.leader_node.as_ref())
                }
                RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
                    ApiError::internal(format!(
                        "a write was refused as a membership change: {error}"
                    ))
                }
                RaftError::Fatal(_) => ApiError::ShuttingDown,
            };
            answer_all(answers, &error);
        }
    }
}
