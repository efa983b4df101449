//! The state as of one revision, read while applies go on: what a snapshot build streams.
//!
//! sled has no point-in-time views, and walking a tree of ten million users takes seconds. So
//! instead of holding applies off for the whole walk, a build *captures*: from the moment it
//! starts (taken while no apply runs), every apply records, before it first changes a key, the
//! value that key had then (`None` if it had none). The walk reads the live tree and, for every
//! key the capture holds, uses the recorded value instead.
//!
//! Why that is the state at the start: a key no apply touched since the start is yielded by the
//! tree's iterator with its starting value (sled's iterator sees every key that stays put). A key
//! an apply touched is in the capture *before* the tree changes, and the walk consults the
//! capture *after* reading the tree, so it never uses a changed value. A key deleted since the
//! start may be missing from the walk: the capture holds it, and it is emitted in key order
//! between the neighbours the walk did yield. A key created since the start is in the capture as
//! `None` and is skipped.
//!
//! The capture's memory grows with the keys changed during one build (first change only): it is
//! reported in the `residency_snapshot_captured_keys` metric and the "snapshot built" log line.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use crate::StoreError;
use crate::snapshot::StatePair;

type Recorded = BTreeMap<Vec<u8>, Option<sled::IVec>>;

/// The values keys had when the running snapshot build started; `None` while none runs.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    recorded: Mutex<Option<Recorded>>,
}

impl Capture {
    fn lock(&self) -> MutexGuard<'_, Option<Recorded>> {
        self.recorded.lock().expect("capture lock poisoned")
    }

    /// Starts recording. The caller holds off applies while it calls this, so the capture
    /// starts exactly at the revision the build reads.
    pub(crate) fn start(&self) {
        let mut recorded = self.lock();
        assert!(
            recorded.is_none(),
            "two snapshot builds at once: the build lock must serialise them"
        );
        *recorded = Some(BTreeMap::new());
    }

    /// Stops recording; returns how many keys were recorded.
    pub(crate) fn stop(&self) -> usize {
        self.lock().take().map_or(0, |recorded| recorded.len())
    }

    /// How many keys the running capture holds.
    pub(crate) fn recorded_keys(&self) -> usize {
        self.lock().as_ref().map_or(0, |recorded| recorded.len())
    }

    /// Called by an apply before it writes `keys` to `tree`: keeps, for each key not yet
    /// recorded, its value now. Does nothing while no build runs.
    pub(crate) fn record<'k>(
        &self,
        tree: &sled::Tree,
        keys: impl Iterator<Item = &'k Vec<u8>>,
    ) -> Result<(), sled::Error> {
        let mut recorded = self.lock();
        let Some(recorded) = recorded.as_mut() else {
            return Ok(());
        };
        for key in keys {
            if !recorded.contains_key(key) {
                recorded.insert(key.clone(), tree.get(key)?);
            }
        }
        Ok(())
    }
}

/// Walks `tree` as it was when `capture` started, in key order.
pub(crate) struct AsOfStart<'a> {
    capture: &'a Capture,
    iter: sled::Iter,
    /// The last key the walk passed (yielded by the tree, or recorded and emitted).
    passed: Option<Vec<u8>>,
    ready: VecDeque<StatePair>,
    tree_done: bool,
}

impl<'a> AsOfStart<'a> {
    /// `capture` must have been started before the first change the walk must not see.
    pub(crate) fn new(capture: &'a Capture, tree: &sled::Tree) -> AsOfStart<'a> {
        AsOfStart {
            capture,
            iter: tree.iter(),
            passed: None,
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

    /// Reads one pair from the tree, then queues what the start state holds up to its key.
    fn step(&mut self) -> Result<(), StoreError> {
        let item = self.iter.next().transpose()?;
        let recorded = self.capture.lock();
        let recorded = recorded
            .as_ref()
            .expect("the capture runs for as long as a walk over it");
        if let (Some(passed), Some((key, _))) = (&self.passed, &item)
            && key.as_ref() <= passed.as_slice()
        {
            return Err(StoreError::corrupt(
                "the state tree's iterator went backwards during a snapshot build",
            ));
        }
        let lower = match &self.passed {
            Some(passed) => Bound::Excluded(passed.as_slice()),
            None => Bound::Unbounded,
        };
        let upper = match &item {
            Some((key, _)) => Bound::Excluded(key.as_ref()),
            None => Bound::Unbounded,
        };
        // Keys the walk stepped over: gone from the tree since the start, or created since.
        for (key, value) in recorded.range::<[u8], _>((lower, upper)) {
            if let Some(value) = value {
                self.ready.push_back((key.clone(), value.to_vec()));
            }
        }
        match item {
            Some((key, value)) => {
                let value = match recorded.get(key.as_ref()) {
                    Some(at_start) => at_start.as_ref().map(|value| value.to_vec()),
                    None => Some(value.to_vec()),
                };
                if let Some(value) = value {
                    self.ready.push_back((key.to_vec(), value));
                }
                self.passed = Some(key.to_vec());
            }
            None => self.tree_done = true,
        }
        Ok(())
    }
}
