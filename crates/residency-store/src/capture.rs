//! The state as of one revision, read while applies go on: what a snapshot build streams.
//!
//! sled has no point-in-time views, and walking a tree of ten million users takes minutes. So
//! instead of holding applies off for the whole walk, a build *captures*: from the moment it
//! starts (taken while no apply runs), every apply records, before it first changes a key the
//! walk has not passed yet, the value that key had then (`None` if it had none). The walk reads
//! the live tree and, for every key the capture holds, uses the recorded value instead.
//!
//! Why that is the state at the start: a key no apply touched since the start is yielded by the
//! tree's iterator with its starting value (sled's iterator sees every key that stays put). A key
//! an apply touched ahead of the walk is in the capture *before* the tree changes, and the walk
//! consults the capture *after* reading the tree, so it never uses a changed value. A key deleted
//! since the start may be missing from the walk: the capture holds it, and it is emitted in key
//! order between the neighbours the walk did yield. A key created since the start is in the
//! capture as `None` and is skipped. A key behind the walk needs nothing: the walk has emitted
//! it already. The walk moves its cursor and reads the capture under the same lock that applies
//! record under, so "behind" is never decided on a stale cursor.
//!
//! So the capture holds only changes ahead of the walk, and drops each entry once the walk
//! passes it. Its size is reported (`residency_snapshot_captured_keys`, the peak of the last
//! walk, and the "snapshot built" log line) and bounded by `CAPTURE_KEYS_MAX`: past it, applies
//! wait for the walk to end (back-pressure, counted in `residency_snapshot_capture_full_total`).
//! Before the cursor and the pruning, a bulk import into a state of five million users made
//! the capture grow past a gigabyte per node (docs/performance.md, the ten-million run).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::StoreError;
use crate::snapshot::StatePair;

/// Keys a capture holds before applies wait for its walk to end: a few hundred bytes each at
/// most, so well under a gigabyte.
pub(crate) const CAPTURE_KEYS_MAX: usize = 2_000_000;

/// How far the walk has gone.
#[derive(Debug)]
enum Cursor {
    Start,
    /// Every key up to and including this one is behind the walk.
    After(Vec<u8>),
    /// The walk has read the whole tree.
    End,
}

impl Cursor {
    fn has_passed(&self, key: &[u8]) -> bool {
        match self {
            Cursor::Start => false,
            Cursor::After(passed) => key <= passed.as_slice(),
            Cursor::End => true,
        }
    }
}

#[derive(Debug)]
struct Recording {
    /// The starting value of each key changed ahead of the walk, not yet passed by it.
    recorded: BTreeMap<Vec<u8>, Option<sled::IVec>>,
    cursor: Cursor,
    /// Keys recorded over the whole walk, and the most held at once.
    recorded_total: usize,
    peak: usize,
}

/// The values keys had when the running walk started; `None` while none runs.
#[derive(Debug)]
pub(crate) struct Capture {
    recording: Mutex<Option<Recording>>,
    /// `CAPTURE_KEYS_MAX`, smaller in tests.
    keys_max: usize,
    /// True while a capture is at its bound; applies wait for it to turn false.
    full: tokio::sync::watch::Sender<bool>,
}

impl Default for Capture {
    fn default() -> Self {
        Capture::with_bound(CAPTURE_KEYS_MAX)
    }
}

/// What a finished capture recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CaptureCounts {
    /// Keys recorded over the walk.
    pub(crate) total: usize,
    /// The most held at once: what the capture cost in memory.
    pub(crate) peak: usize,
}

impl Capture {
    pub(crate) fn with_bound(keys_max: usize) -> Capture {
        Capture {
            recording: Mutex::default(),
            keys_max,
            full: tokio::sync::watch::Sender::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Recording>> {
        self.recording.lock().expect("capture lock poisoned")
    }

    /// Starts recording. The caller holds off applies while it calls this, so the capture
    /// starts exactly at the revision the walk reads.
    pub(crate) fn start(&self) {
        let mut recording = self.lock();
        assert!(
            recording.is_none(),
            "two walks at once: the build lock must serialise them"
        );
        *recording = Some(Recording {
            recorded: BTreeMap::new(),
            cursor: Cursor::Start,
            recorded_total: 0,
            peak: 0,
        });
    }

    /// Stops recording; says how much was recorded.
    pub(crate) fn stop(&self) -> CaptureCounts {
        let counts = self
            .lock()
            .take()
            .map_or_else(CaptureCounts::default, |recording| CaptureCounts {
                total: recording.recorded_total,
                peak: recording.peak,
            });
        self.full.send_replace(false);
        counts
    }

    /// Waits while a capture is at its bound, that is until its walk ends. An apply calls this
    /// before it takes the state lock.
    pub(crate) async fn wait_for_room(&self) {
        let mut full = self.full.subscribe();
        if *full.borrow() {
            metrics::counter!("residency_snapshot_capture_full_total").increment(1);
            // The sender lives in `self`, which outlives this wait.
            let _ = full.wait_for(|full| !full).await;
        }
    }

    /// Called by an apply before it writes `keys` to `tree`: keeps, for each key ahead of the
    /// walk and not yet recorded, its value now. Does nothing while no walk runs.
    pub(crate) fn record<'k>(
        &self,
        tree: &sled::Tree,
        keys: impl Iterator<Item = &'k Vec<u8>>,
    ) -> Result<(), sled::Error> {
        let mut recording = self.lock();
        let Some(recording) = recording.as_mut() else {
            return Ok(());
        };
        for key in keys {
            if recording.cursor.has_passed(key) || recording.recorded.contains_key(key) {
                continue;
            }
            recording.recorded.insert(key.clone(), tree.get(key)?);
            recording.recorded_total += 1;
        }
        recording.peak = recording.peak.max(recording.recorded.len());
        if recording.recorded.len() >= self.keys_max {
            self.full.send_replace(true);
        }
        Ok(())
    }
}

/// Walks `tree` as it was when `capture` started, in key order.
pub(crate) struct AsOfStart<'a> {
    capture: &'a Capture,
    iter: sled::Iter,
    ready: VecDeque<StatePair>,
    tree_done: bool,
}

impl<'a> AsOfStart<'a> {
    /// `capture` must have been started before the first change the walk must not see.
    pub(crate) fn new(capture: &'a Capture, tree: &sled::Tree) -> AsOfStart<'a> {
        AsOfStart {
            capture,
            iter: tree.iter(),
            ready: VecDeque::new(),
            tree_done: false,
        }
    }

    pub(crate) fn next_pair(&mut self) -> Result<Option<StatePair>, StoreError> {
        loop {
            if let Some(pair) = self.ready.pop_front() {
                return Ok(Some(pair));
            }
            if self.tree_done {
                return Ok(None);
            }
            self.step()?;
        }
    }

    /// Reads one pair from the tree, then, under the capture's lock, queues what the start
    /// state holds up to its key and moves the cursor past it.
    fn step(&mut self) -> Result<(), StoreError> {
        let item = self.iter.next().transpose()?;
        let mut recording = self.capture.lock();
        let recording = recording
            .as_mut()
            .expect("the capture runs for as long as a walk over it");
        if let Some((key, _)) = &item
            && recording.cursor.has_passed(key)
        {
            return Err(StoreError::corrupt(
                "the state tree's iterator went backwards during a snapshot build",
            ));
        }
        // Recorded keys before this one were stepped over by the iterator: gone from the tree
        // since the start (emitted with their starting value), or created since (skipped).
        while let Some(entry) = recording.recorded.first_entry() {
            let before = item
                .as_ref()
                .is_none_or(|(key, _)| entry.key().as_slice() < key.as_ref());
            if !before {
                break;
            }
            let (key, at_start) = entry.remove_entry();
            if let Some(value) = at_start {
                self.ready.push_back((key, value.to_vec()));
            }
        }
        match item {
            Some((key, value)) => {
                let at_start = match recording.recorded.first_entry() {
                    Some(entry) if entry.key().as_slice() == key.as_ref() => {
                        entry.remove().map(|value| value.to_vec())
                    }
                    _ => Some(value.to_vec()),
                };
                if let Some(value) = at_start {
                    self.ready.push_back((key.to_vec(), value));
                }
                recording.cursor = Cursor::After(key.to_vec());
            }
            None => {
                recording.cursor = Cursor::End;
                self.tree_done = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn applies_wait_while_a_capture_is_at_its_bound_and_go_on_when_it_ends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = crate::durable::open_sled(dir.path(), 1024 * 1024).expect("sled opens");
        let tree = db.open_tree("state").expect("tree opens");
        let capture = Arc::new(Capture::with_bound(3));

        tokio::time::timeout(Duration::from_secs(1), capture.wait_for_room())
            .await
            .expect("no capture running: no wait");
        capture.start();
        let keys: Vec<Vec<u8>> = (0..2_u8).map(|n| vec![b'k', n]).collect();
        capture.record(&tree, keys.iter()).expect("recorded");
        tokio::time::timeout(Duration::from_secs(1), capture.wait_for_room())
            .await
            .expect("below the bound: no wait");

        let more: Vec<Vec<u8>> = (2..4_u8).map(|n| vec![b'k', n]).collect();
        capture.record(&tree, more.iter()).expect("recorded");
        let waiter = {
            let capture = capture.clone();
            tokio::spawn(async move { capture.wait_for_room().await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "at the bound, an apply waits");

        // The walk ends: the capture stops, and the apply goes on.
        assert_eq!(capture.stop().total, 4);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the apply goes on once the walk ends")
            .expect("waiter task");
    }
}
