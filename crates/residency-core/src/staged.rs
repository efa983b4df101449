//! A view of the state plus the changes decided so far in one apply: later decisions (the next
//! write of the entry, the next item of a batch, the request record) see earlier ones, and
//! nothing reaches the store unless the whole entry is decided. A rule decides inside a
//! *decision*: if it refuses, everything it staged is put back as it was (`discard_decision`).

use std::cell::RefCell;
use std::collections::BTreeMap;

use residency_types::{Jurisdiction, Location, LocationId, Placement, Policy, UserId};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::apply::Mutation;
use crate::{CoreError, KvRead, codec, keys};

/// A key's staged value before a decision changed it; `None`: the key was not staged.
type Undo = (Vec<u8>, Option<Option<Vec<u8>>>);

pub struct Staged<'a, V: KvRead> {
    view: &'a V,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// While a rule decides: what each change replaced, newest last, so that a refusal can
    /// undo them. An undo log rather than a copy of `pending`: an entry of many writes would
    /// otherwise copy everything staged so far once per write.
    undo: Option<Vec<Undo>>,
    /// What was read from the view in this apply, found or not: a key every write of an entry
    /// reads (its location, its policy, a counter) costs one read of the view, not one each.
    seen: RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl<V: KvRead> std::fmt::Debug for Staged<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("pending", &self.pending.len())
            .field("deciding", &self.undo.is_some())
            .finish_non_exhaustive()
    }
}

impl<V: KvRead> KvRead for Staged<'_, V> {
    type Error = V::Error;

    fn get(&self, key: &[u8]) -> std::result::Result<Option<Vec<u8>>, V::Error> {
        match self.pending.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.view_value(key),
        }
    }
}

pub type Result<T, V> = std::result::Result<T, CoreError<<V as KvRead>::Error>>;

impl<'a, V: KvRead> Staged<'a, V> {
    pub fn new(view: &'a V) -> Self {
        Staged {
            view,
            pending: BTreeMap::new(),
            undo: None,
            seen: RefCell::default(),
        }
    }

    /// The view's value at `key`, read from the view at most once per apply.
    fn view_value(&self, key: &[u8]) -> std::result::Result<Option<Vec<u8>>, V::Error> {
        if let Some(value) = self.seen.borrow().get(key) {
            return Ok(value.clone());
        }
        let value = self.view.get(key)?;
        self.seen.borrow_mut().insert(key.to_vec(), value.clone());
        Ok(value)
    }

    /// Starts a decision: what is staged from here on is kept by `keep_decision` or put back
    /// by `discard_decision`. Decisions do not nest.
    pub fn begin_decision(&mut self) {
        assert!(self.undo.is_none(), "a decision began inside another");
        self.undo = Some(Vec::new());
    }

    /// Keeps what the decision staged.
    pub fn keep_decision(&mut self) {
        assert!(self.undo.take().is_some(), "no decision to keep");
    }

    /// Puts back everything the decision staged, newest first.
    pub fn discard_decision(&mut self) {
        let undo = self.undo.take().expect("no decision to discard");
        for (key, previous) in undo.into_iter().rev() {
            match previous {
                Some(value) => self.pending.insert(key, value),
                None => self.pending.remove(&key),
            };
        }
    }

    fn stage(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        match &mut self.undo {
            Some(undo) => {
                let previous = self.pending.insert(key.clone(), value);
                undo.push((key, previous));
            }
            None => {
                self.pending.insert(key, value);
            }
        }
    }

    pub fn put<T: Serialize>(&mut self, key: Vec<u8>, value: &T) {
        self.stage(key, Some(codec::encode(value)));
    }

    pub fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.stage(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.stage(key, None);
    }

    pub fn read<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, V> {
        let bytes = match self.pending.get(key) {
            // Decoded in place: no copy of what this apply staged.
            Some(staged) => return Ok(staged.as_deref().map(codec::decode).transpose()?),
            None => self.view_value(key).map_err(CoreError::Read)?,
        };
        Ok(bytes.as_deref().map(codec::decode).transpose()?)
    }

    /// The chunks of one entry's chunked value (events, request ids, request records), in
    /// order: `key(0)`, `key(1)`, ... while each says (`more`) that another follows.
    pub fn read_chunks<T: DeserializeOwned>(
        &self,
        key: impl Fn(u32) -> Vec<u8>,
        more: impl Fn(&T) -> bool,
    ) -> Result<Vec<T>, V> {
        let mut chunks = Vec::new();
        while let Some(chunk) = self.read::<T>(&key(chunks.len() as u32))? {
            let another = more(&chunk);
            chunks.push(chunk);
            if !another {
                break;
            }
        }
        Ok(chunks)
    }

    pub fn placement(&self, user_id: &UserId) -> Result<Option<Placement>, V> {
        self.read(&keys::placement_key(user_id))
    }

    pub fn location(&self, location_id: &LocationId) -> Result<Option<Location>, V> {
        self.read(&keys::location_key(location_id))
    }

    pub fn policy(&self, residency: Jurisdiction) -> Result<Option<Policy>, V> {
        self.read(&keys::policy_key(residency))
    }

    pub fn counter(&self, key: &[u8]) -> Result<u64, V> {
        Ok(self.read::<u64>(key)?.unwrap_or(0))
    }

    /// Counts a placement created (`1`) or forgotten (`-1`).
    pub fn count_placements(&mut self, delta: i64) -> Result<(), V> {
        self.add_to_counter(keys::PLACEMENT_COUNT_KEY.to_vec(), delta)
    }

    fn add_to_counter(&mut self, key: Vec<u8>, delta: i64) -> Result<(), V> {
        let current = self.counter(&key)?;
        let next = current
            .checked_add_signed(delta)
            .expect("a placement counter went below zero");
        if next == 0 {
            self.delete(key);
        } else {
            self.put(key, &next);
        }
        Ok(())
    }

    /// Counts a placement of `residency` at, or moving to, `location`; or no longer, with
    /// `present` false. The counters that retire and policy checks rely on; which users a
    /// location holds is not indexed (one pair per placement: a dry run scans placements).
    pub fn reference(
        &mut self,
        residency: Jurisdiction,
        location: &Location,
        present: bool,
    ) -> Result<(), V> {
        let delta = if present { 1 } else { -1 };
        self.add_to_counter(keys::location_count_key(&location.id), delta)?;
        self.add_to_counter(
            keys::residency_count_key(residency, location.jurisdiction),
            delta,
        )?;
        Ok(())
    }

    pub fn into_mutations(self) -> Vec<Mutation> {
        assert!(self.undo.is_none(), "an entry ended inside a decision");
        self.pending
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => Mutation::Put { key, value },
                None => Mutation::Delete { key },
            })
            .collect()
    }
}
