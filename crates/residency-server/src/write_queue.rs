//! The bounded queue in front of the leader's proposer and a follower's forwarder: writes go in
//! one at a time, each with the place its answer goes to, and come out in groups of whatever
//! queued meanwhile, bounded in writes and in encoded bytes.

use residency_types::ApplyResult;
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;

/// The bounds of a group and of the queue, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    pub writes_max: usize,
    pub bytes_max: usize,
    pub queue_writes_max: usize,
}

/// Where a queued write's answer goes.
pub type Answer = oneshot::Sender<Result<ApplyResult, ApiError>>;
/// Where a queued write's answer arrives; closed without one if the node shuts down.
pub type Answered = oneshot::Receiver<Result<ApplyResult, ApiError>>;

/// One write in the queue.
#[derive(Debug)]
pub struct Queued<T> {
    pub write: T,
    pub encoded_bytes: usize,
    pub answer: Answer,
}

/// The sending side; cheap to clone.
#[derive(Debug)]
pub struct WriteQueue<T> {
    sender: mpsc::Sender<Queued<T>>,
    /// Says what waits in this queue, for the `OVERLOADED` message.
    waiting_for: &'static str,
}

impl<T> Clone for WriteQueue<T> {
    fn clone(&self) -> Self {
        WriteQueue {
            sender: self.sender.clone(),
            waiting_for: self.waiting_for,
        }
    }
}

/// The receiving side: one task takes the groups.
#[derive(Debug)]
pub struct Groups<T> {
    receiver: mpsc::Receiver<Queued<T>>,
    limits: GroupLimits,
    /// A write that did not fit the last group goes first into the next.
    carried: Option<Queued<T>>,
}

/// A queue of at most `limits.queue_writes_max` writes; `waiting_for` ends the sentence "too
/// many writes are waiting ...".
pub fn write_queue<T>(
    limits: GroupLimits,
    waiting_for: &'static str,
) -> (WriteQueue<T>, Groups<T>) {
    let (sender, receiver) = mpsc::channel(limits.queue_writes_max);
    (
        WriteQueue {
            sender,
            waiting_for,
        },
        Groups {
            receiver,
            limits,
            carried: None,
        },
    )
}

impl<T> WriteQueue<T> {
    /// Queues a write now, behind every write queued before; a full queue refuses it at once
    /// with `OVERLOADED`.
    pub fn enqueue(&self, write: T, encoded_bytes: usize) -> Result<Answered, ApiError> {
        let (answer, answered) = oneshot::channel();
        let queued = Queued {
            write,
            encoded_bytes,
            answer,
        };
        self.sender.try_send(queued).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => {
                ApiError::Overloaded(format!("too many writes are waiting {}", self.waiting_for))
            }
            mpsc::error::TrySendError::Closed(_) => ApiError::ShuttingDown,
        })?;
        Ok(answered)
    }
}

impl<T> Groups<T> {
    /// Waits for a first write, then takes what else is queued, in order, up to the bounds. A
    /// write whose caller has gone is dropped: its caller was told `DEADLINE_EXCEEDED`, which
    /// allows that it never happened. `None` once every sender is gone.
    pub async fn next(&mut self) -> Option<Vec<Queued<T>>> {
        loop {
            let first = match self.carried.take() {
                Some(first) => first,
                None => self.receiver.recv().await?,
            };
            let mut bytes = first.encoded_bytes;
            let mut group = vec![first];
            while group.len() < self.limits.writes_max {
                let Ok(next) = self.receiver.try_recv() else {
                    break;
                };
                if bytes + next.encoded_bytes > self.limits.bytes_max {
                    self.carried = Some(next);
                    break;
                }
                bytes += next.encoded_bytes;
                group.push(next);
            }
            group.retain(|queued| !queued.answer.is_closed());
            if !group.is_empty() {
                return Some(group);
            }
        }
    }

    /// Waits until a write is queued (without taking it): for a task that must finish
    /// something else before it forms the next group, but only once there is one to form.
    pub async fn wait_for_one(&mut self) -> bool {
        if self.carried.is_some() {
            return true;
        }
        match self.receiver.recv().await {
            Some(first) => {
                self.carried = Some(first);
                true
            }
            None => false,
        }
    }
}

/// Answers every write of a group with the same error.
pub fn answer_all(answers: impl IntoIterator<Item = Answer>, error: &ApiError) {
    for answer in answers {
        let _ = answer.send(Err(error.clone()));
    }
}
