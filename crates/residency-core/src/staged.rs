//! A view of the state plus the changes decided so far in one apply: later decisions (the next
//! item of a batch, the request record) see earlier ones, and nothing reaches the store unless
//! the whole entry is decided.

use std::collections::BTreeMap;

use residency_types::{Jurisdiction, Location, LocationId, Placement, Policy, UserId};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::apply::Mutation;
use crate::{CoreError, KvRead, codec, keys};

pub struct Staged<'a, V: KvRead> {
    view: &'a V,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<V: KvRead> std::fmt::Debug for Staged<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<V: KvRead> KvRead for Staged<'_, V> {
    type Error = V::Error;

    fn get(&self, key: &[u8]) -> std::result::Result<Option<Vec<u8>>, V::Error> {
        match self.pending.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.view.get(key),
        }
    }
}

pub type Result<T, V> = std::result::Result<T, CoreError<<V as KvRead>::Error>>;

impl<'a, V: KvRead> Staged<'a, V> {
    pub fn new(view: &'a V) -> Self {
        Staged {
            view,
            pending: BTreeMap::new(),
        }
    }

    /// A copy to try something on; `adopt` keeps its changes, dropping it discards them.
    pub fn fork(&self) -> Staged<'a, V> {
        Staged {
            view: self.view,
            pending: self.pending.clone(),
        }
    }

    pub fn adopt(&mut self, fork: Staged<'a, V>) {
        self.pending = fork.pending;
    }

    pub fn put<T: Serialize>(&mut self, key: Vec<u8>, value: &T) {
        self.pending.insert(key, Some(codec::encode(value)));
    }

    pub fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }

    pub fn read<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, V> {
        match self.get(key).map_err(CoreError::Read)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
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

    /// Records that `user_id` (of `residency`) is at, or moving to, `location`; or no longer,
    /// with `present` false. Keeps the counters that retire and policy checks rely on.
    pub fn reference(
        &mut self,
        user_id: &UserId,
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
        let index_key = keys::location_user_key(&location.id, user_id);
        if present {
            self.put_raw(index_key, Vec::new());
        } else {
            self.delete(index_key);
        }
        Ok(())
    }

    pub fn into_mutations(self) -> Vec<Mutation> {
        self.pending
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => Mutation::Put { key, value },
                None => Mutation::Delete { key },
            })
            .collect()
    }
}
