//! Answers from apply: the leader's proposer hears how its own entries were decided as soon as
//! this node's apply has decided them, before the apply's changes are written to sled and
//! before openraft passes the results back through its core (two task hand-offs and the sled
//! writes, about a fifth of a lone write's time; docs/performance.md).
//!
//! The proposer registers a callback and puts the registration's tag on its `Proposal`
//! (`AnswerTag`, never written to the log or sent to a peer). The leader applies its own
//! entries from the log's memory of the newest entries, tag included; apply calls the callback
//! with the same results it returns to openraft. An entry read back from disk, or received
//! from another leader, carries no tag, and its writes are answered the usual way, when
//! openraft's `client_write` returns.
//!
//! Why answering then is safe:
//! - The results are final: the entry is committed (on the disks of a majority), and every
//!   node that applies it decides the same. If this node fails before the changes reach sled,
//!   it applies the entry again from its log when it restarts.
//! - No read that starts after the answer misses the write. The callback runs under the state
//!   write lock and inside the state change (the seqlock is odd): optimistic reads retry until
//!   the change has ended, the check before proposing waits for the lock, and linearizable and
//!   `AT_LEAST` reads wait for the applied index, which moves only after the changes are made.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use residency_types::ApplyResult;

/// Called once with the results of a tagged entry's writes, in order.
pub type AnswerFn = Box<dyn FnOnce(&[ApplyResult]) + Send>;

/// Callbacks waiting for the apply of this node's own proposals, by tag. Cheap to clone; every
/// clone is the same board. Holds at most one callback per proposal in flight: a registration
/// takes its callback off the board when it is dropped.
#[derive(Clone, Default)]
pub struct AnswerBoard {
    waiting: Arc<Mutex<HashMap<u64, AnswerFn>>>,
    next_tag: Arc<AtomicU64>,
}

impl std::fmt::Debug for AnswerBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerBoard").finish_non_exhaustive()
    }
}

impl AnswerBoard {
    /// Puts `answer` on the board under a new tag, for as long as the registration lives.
    pub fn register(&self, answer: AnswerFn) -> Registration {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(tag, answer);
        Registration {
            board: self.clone(),
            tag,
        }
    }

    /// Calls the callback registered under `tag`, if it is still there, with `results`.
    pub(crate) fn answer(&self, tag: u64, results: &[ApplyResult]) {
        let answer = self.lock().remove(&tag);
        if let Some(answer) = answer {
            answer(results);
        }
    }

    /// Callbacks on the board (for tests).
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AnswerFn>> {
        self.waiting.lock().expect("answer board lock poisoned")
    }
}

/// A callback on the board; dropping it takes the callback off if apply has not called it.
#[derive(Debug)]
pub struct Registration {
    board: AnswerBoard,
    tag: u64,
}

impl Registration {
    /// The tag to put on the proposal (`Proposal::answer_tag`).
    pub fn tag(&self) -> u64 {
        self.tag
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.board.lock().remove(&self.tag);
    }
}
