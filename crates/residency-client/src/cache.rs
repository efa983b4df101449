//! `CachedChecker`: the registry's state held in the service's own memory, kept current by
//! `Watch`, answering access checks and lookups in-process — and denying when it cannot prove
//! it is fresh.
//!
//! How it knows it is fresh: every `probe_interval` it asks the cluster for the current
//! linearizable revision `R` (sent at local time `t0`). `R` covers every write acknowledged
//! before `t0`, so once the cache has applied every change up to `R`, what it holds was the
//! registry's state at `t0` or later. A check is answered only while the newest such `t0` is
//! within `staleness_bound`; otherwise it is a deny with `CACHE_NOT_FRESH`. Only the cache's own
//! monotonic clock is used: no clock of another machine enters the proof.
//!
//! ```no_run
//! # async fn example() -> Result<(), residency_client::ClientError> {
//! use std::time::Duration;
//! use residency_client::{CacheOptions, CachedChecker, Client, ClientOptions};
//! use residency_types::{AccessOperation, Decision, Jurisdiction, UserId};
//!
//! let client = Client::new(vec!["127.0.0.1:7101".into()], ClientOptions::default())?;
//! let checker = CachedChecker::start(client, CacheOptions::default());
//! checker.wait_fresh(Duration::from_secs(30)).await.expect("the cache became fresh");
//! let user = UserId::parse("user-42").expect("valid id");
//! match checker.check_access(&user, Jurisdiction::US, AccessOperation::Write).decision {
//!     Decision::Allow { location_id, epoch, .. } => { /* write at location_id, fenced by epoch */ }
//!     Decision::Deny { reason } => { /* refuse, and say why: reason.as_str() */ }
//! }
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use residency_core::StateDigest;
use residency_types::{
    AccessOperation, Change, Decision, DenyReason, Event, Jurisdiction, Location, LocationId,
    Placement, Policy, ReasonCode, Revision, UserId,
};
use tokio::task::JoinHandle;

use crate::{Client, ListedItem, StateListing, WatchItem};

/// Proofs of freshness waiting for the cache to catch up, at most; the oldest go first.
const PENDING_PROOFS_MAX: usize = 64;
/// Pause before listing or watching again after a failure, doubled up to the maximum.
const RETRY_PAUSE_MS_MIN: u64 = 100;
const RETRY_PAUSE_MS_MAX: u64 = 2_000;
/// The shortest probe interval and progress interval the checker asks for, in milliseconds.
const PROBE_INTERVAL_MS_MIN: u64 = 50;
const PROGRESS_INTERVAL_MS_MIN: u64 = 100;
/// How often `wait_fresh` and `wait_revision` look again.
const WAIT_POLL_MS: u64 = 10;

/// How the cache behaves.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The oldest state the cache may answer from: past it, checks deny with `CACHE_NOT_FRESH`.
    pub staleness_bound: Duration,
    /// How often to ask the cluster for its current revision (the proof of freshness). A
    /// fifth of the bound by default, so a few lost probes do not cost a deny.
    pub probe_interval: Duration,
    /// Let a node answer the bootstrap listing from its newest snapshot instead of building one
    /// (the cache then catches up by watching). On by default: a fleet restarting at once
    /// should not make every node build snapshots.
    pub allow_recent_snapshot: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions::with_bound(Duration::from_secs(5))
    }
}

impl CacheOptions {
    /// Options for a staleness bound, the rest derived from it.
    pub fn with_bound(staleness_bound: Duration) -> CacheOptions {
        CacheOptions {
            staleness_bound,
            probe_interval: (staleness_bound / 5).max(Duration::from_millis(PROBE_INTERVAL_MS_MIN)),
            allow_recent_snapshot: true,
        }
    }
}

/// A decision of the cache and the revision of the state it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedDecision {
    pub decision: Decision,
    pub revision: Revision,
}

/// How fresh the cache is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheFreshness {
    /// Every change up to this revision is in the cache.
    pub revision: Revision,
    /// How old the newest proof of freshness is: the cache holds the registry's state as of at
    /// most this long ago. `None` before the first proof.
    pub lag: Option<Duration>,
    /// Whether `lag` is within the staleness bound (checks are answered).
    pub fresh: bool,
}

/// Counters of what the cache has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Checks answered from the cache (allowed or denied by the rules).
    pub hits: u64,
    /// Checks and lookups refused because the cache could not prove its freshness.
    pub not_fresh: u64,
    /// Full listings after the first (history compacted past the cache, or a watch refused).
    pub relists: u64,
    /// Watches started again after a failure.
    pub rewatches: u64,
}

/// The lookup answer when the cache cannot vouch for its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("CACHE_NOT_FRESH: the cache cannot prove its state is newer than the staleness bound")]
pub struct NotFresh {
    pub freshness: CacheFreshness,
}

/// A user's placement as the cache holds it: what routing and the access rule need, without
/// the audit fields (who wrote it, when, why), which stay in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedPlacement {
    pub user_id: UserId,
    pub residency: Jurisdiction,
    pub location_id: LocationId,
    /// Where the data is going, while it moves.
    pub move_target: Option<LocationId>,
    /// The fencing token storage compares before writing.
    pub epoch: u64,
    pub mod_revision: Revision,
}

/// User ids of at most this many bytes are kept inside the table's slot, so a lookup follows
/// no pointer to compare its key.
const INLINE_KEY_BYTES: usize = 30;
/// The location index of "no move under way".
const NO_TARGET: u32 = u32::MAX;

/// A user id as the table keeps it: inline when short, on the heap otherwise.
#[derive(Debug, Clone)]
enum Key {
    Inline {
        len: u8,
        bytes: [u8; INLINE_KEY_BYTES],
    },
    Heap(Box<str>),
}

impl Key {
    fn new(user_id: &UserId) -> Key {
        let text = user_id.as_str();
        if text.len() <= INLINE_KEY_BYTES {
            let mut bytes = [0_u8; INLINE_KEY_BYTES];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            Key::Inline {
                len: u8::try_from(text.len()).expect("at most INLINE_KEY_BYTES"),
                bytes,
            }
        } else {
            Key::Heap(text.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(text) => text.as_bytes(),
        }
    }
}

/// One user in the table: its key and its placement, locations as indexes into the cache's
/// location table.
#[derive(Debug, Clone)]
struct Slot {
    key: Key,
    residency: Jurisdiction,
    location: u32,
    target: u32,
    epoch: u64,
    mod_revision: Revision,
}

/// The registry's state as the cache holds it: every placement (compactly), location and
/// policy, and the revision up to which every change is applied. Pure: no IO, no clock.
#[derive(Debug, Clone, Default)]
pub struct CacheState {
    revision: Revision,
    hasher: hashbrown::DefaultHashBuilder,
    users: hashbrown::HashTable<Slot>,
    /// Every location ever seen; locations are never deleted, so indexes stay valid.
    locations: Vec<Location>,
    location_index: HashMap<LocationId, u32>,
    policies: hashbrown::HashMap<Jurisdiction, Policy>,
}

impl CacheState {
    pub fn from_listing(listing: StateListing) -> CacheState {
        let mut state = CacheState::default();
        for location in listing.locations {
            state.add(ListedItem::Location(location));
        }
        for policy in listing.policies {
            state.add(ListedItem::Policy(policy));
        }
        for placement in listing.placements {
            state.add(ListedItem::Placement(placement));
        }
        state.revision = listing.revision;
        state
    }

    /// Adds one item of a listing being streamed in (`Client::list_state_into`); set the
    /// revision with `listed_at` once the listing is complete.
    pub fn add(&mut self, item: ListedItem) {
        match item {
            ListedItem::Location(location) => {
                self.put_location(location);
            }
            ListedItem::Policy(policy) => {
                self.policies.insert(policy.residency, policy);
            }
            ListedItem::Placement(placement) => self.put_placement(&placement),
        }
    }

    /// A state built by `add` from a complete listing at `revision`.
    pub fn listed_at(mut self, revision: Revision) -> CacheState {
        self.revision = revision;
        self
    }

    /// Every change up to this revision is applied.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn placements_count(&self) -> usize {
        self.users.len()
    }

    fn hash(&self, user_id: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(user_id)
    }

    fn slot(&self, user_id: &UserId) -> Option<&Slot> {
        let key = user_id.as_str().as_bytes();
        self.users
            .find(self.hash(key), |slot| slot.key.as_bytes() == key)
    }

    fn put_location(&mut self, location: Location) -> u32 {
        match self.location_index.get(&location.id) {
            Some(&index) => {
                self.locations[index as usize] = location;
                index
            }
            None => {
                let index = u32::try_from(self.locations.len())
                    .ok()
                    .filter(|index| *index != NO_TARGET)
                    .expect("fewer than 2^32 - 1 locations");
                self.location_index.insert(location.id.clone(), index);
                self.locations.push(location);
                index
            }
        }
    }

    /// The index of `location_id`, registering a placeholder if the cache has not seen the
    /// location (the state never holds such a placement; if it did, the placeholder is retired,
    /// so checks deny with `LOCATION_UNAVAILABLE`, as on the nodes).
    fn location_index(&mut self, location_id: &LocationId) -> u32 {
        if let Some(&index) = self.location_index.get(location_id) {
            return index;
        }
        self.put_location(Location {
            id: location_id.clone(),
            jurisdiction: Jurisdiction::US,
            labels: residency_types::Labels::default(),
            state: residency_types::LocationState::Retired,
            create_revision: Revision(0),
            mod_revision: Revision(0),
        })
    }

    fn put_placement(&mut self, placement: &Placement) {
        let location = self.location_index(&placement.location_id);
        let target = placement
            .state
            .move_target()
            .map_or(NO_TARGET, |target| self.location_index(target));
        let slot = Slot {
            key: Key::new(&placement.user_id),
            residency: placement.residency,
            location,
            target,
            epoch: placement.epoch,
            mod_revision: placement.mod_revision,
        };
        let key = placement.user_id.as_str().as_bytes();
        let hash = self.hash(key);
        let hasher = &self.hasher;
        match self.users.entry(
            hash,
            |existing| existing.key.as_bytes() == key,
            |existing| {
                use std::hash::BuildHasher;
                hasher.hash_one(existing.key.as_bytes())
            },
        ) {
            hashbrown::hash_table::Entry::Occupied(mut occupied) => *occupied.get_mut() = slot,
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(slot);
            }
        }
    }

    fn remove_placement(&mut self, user_id: &UserId) {
        let key = user_id.as_str().as_bytes();
        if let Ok(occupied) = self
            .users
            .find_entry(self.hash(key), |slot| slot.key.as_bytes() == key)
        {
            occupied.remove();
        }
    }

    /// Applies one watched change. The events of a revision may be several, so the state is
    /// complete only up to the revision before; `advance` completes it.
    pub fn apply(&mut self, event: &Event) {
        assert!(
            event.revision > self.revision,
            "event at revision {} applied to a cache complete up to {}",
            event.revision,
            self.revision
        );
        match &event.change {
            Change::Placed(placement) => self.put_placement(placement),
            Change::Forgotten { user_id, .. } => self.remove_placement(user_id),
            Change::Location(location) => {
                self.put_location(location.clone());
            }
            Change::Policy(policy) => {
                self.policies.insert(policy.residency, policy.clone());
            }
        }
        self.revision = self.revision.max(Revision(event.revision.0 - 1));
    }

    /// Every change up to `revision` has arrived (a progress notice).
    pub fn advance(&mut self, revision: Revision) {
        self.revision = self.revision.max(revision);
    }

    fn target_of(&self, slot: &Slot) -> Option<&LocationId> {
        (slot.target != NO_TARGET).then(|| &self.locations[slot.target as usize].id)
    }

    /// The access rule of the nodes (`residency_core::decide`) over the cached state.
    pub fn check(
        &self,
        user_id: &UserId,
        accessor_jurisdiction: Jurisdiction,
        operation: AccessOperation,
    ) -> Decision {
        let Some(slot) = self.slot(user_id) else {
            return residency_core::decide(None, None, None, accessor_jurisdiction, operation);
        };
        let location = &self.locations[slot.location as usize];
        let facts = residency_core::PlacementFacts {
            residency: slot.residency,
            location_id: &location.id,
            move_target: self.target_of(slot),
            epoch: slot.epoch,
        };
        residency_core::decide(
            Some(facts),
            self.policies.get(&slot.residency),
            Some(location),
            accessor_jurisdiction,
            operation,
        )
    }

    pub fn lookup(&self, user_id: &UserId) -> Option<CachedPlacement> {
        let slot = self.slot(user_id)?;
        Some(self.placement_of(user_id.clone(), slot))
    }

    fn placement_of(&self, user_id: UserId, slot: &Slot) -> CachedPlacement {
        CachedPlacement {
            user_id,
            residency: slot.residency,
            location_id: self.locations[slot.location as usize].id.clone(),
            move_target: self.target_of(slot).cloned(),
            epoch: slot.epoch,
            mod_revision: slot.mod_revision,
        }
    }

    /// A SHA-256 over every cached placement, location and policy in key order: equal for two
    /// caches (or a cache and a listing) holding the same data, whatever order it came in.
    pub fn digest(&self) -> (String, u64) {
        use residency_core::{codec, keys};
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> =
            Vec::with_capacity(self.users.len() + self.locations.len() + self.policies.len());
        for slot in &self.users {
            let user_id = std::str::from_utf8(slot.key.as_bytes())
                .ok()
                .and_then(|text| UserId::parse(text).ok())
                .expect("the cache keys only valid user ids");
            let placement = self.placement_of(user_id, slot);
            let value = format!(
                "{}|{}|{}|{}|{}",
                placement.residency,
                placement.location_id,
                placement
                    .move_target
                    .as_ref()
                    .map_or("", LocationId::as_str),
                placement.epoch,
                placement.mod_revision
            );
            pairs.push((keys::placement_key(&placement.user_id), value.into_bytes()));
        }
        pairs.extend(
            self.locations
                .iter()
                .filter(|location| location.create_revision.0 > 0)
                .map(|location| (keys::location_key(&location.id), codec::encode(location))),
        );
        pairs.extend(
            self.policies
                .values()
                .map(|policy| (keys::policy_key(policy.residency), codec::encode(policy))),
        );
        pairs.sort_unstable();
        let mut digest = StateDigest::new();
        for (key, value) in &pairs {
            digest.update(key, value);
        }
        digest.finish()
    }
}

/// The proof of freshness: which probe answers the cache has caught up with. Pure: the times
/// are given, not read.
#[derive(Debug, Clone, Default)]
pub struct FreshnessProof {
    /// The newest probe the cache has caught up with: (sent at, revision answered).
    proven: Option<(Instant, Revision)>,
    /// Probes answered with a revision the cache has not reached yet, oldest first.
    pending: VecDeque<(Instant, Revision)>,
}

impl FreshnessProof {
    /// When the newest proof's probe was sent: the cache holds the state of then or later.
    pub fn proven_at(&self) -> Option<Instant> {
        self.proven.map(|(sent, _)| sent)
    }

    /// A probe sent at `sent` answered `revision`; the cache is complete up to `cache`.
    pub fn probe_answered(&mut self, sent: Instant, revision: Revision, cache: Revision) {
        if self.proven.is_some_and(|(proven, _)| proven >= sent) {
            return;
        }
        if revision <= cache {
            self.proven = Some((sent, revision));
            self.pending.retain(|(pending, _)| *pending > sent);
            return;
        }
        // A newer probe that asks for no more than an older pending one makes that one moot.
        self.pending
            .retain(|(_, pending_revision)| *pending_revision < revision);
        if self.pending.len() == PENDING_PROOFS_MAX {
            self.pending.pop_front();
        }
        self.pending.push_back((sent, revision));
    }

    /// The cache is now complete up to `cache`: the pending probes it reached become proofs.
    pub fn caught_up(&mut self, cache: Revision) {
        while let Some(&(sent, revision)) = self.pending.front() {
            if revision > cache {
                break;
            }
            self.pending.pop_front();
            if self.proven.is_none_or(|(proven, _)| proven < sent) {
                self.proven = Some((sent, revision));
            }
        }
    }

    /// The cache went back to `cache` (a listing from an older snapshot): a proof for a newer
    /// revision no longer holds and waits again.
    pub fn regressed(&mut self, cache: Revision) {
        if let Some((sent, revision)) = self.proven
            && revision > cache
        {
            self.proven = None;
            self.pending.push_front((sent, revision));
        }
    }
}

/// What the checker and its background tasks share.
#[derive(Debug)]
struct Shared {
    state: RwLock<CacheState>,
    proof: Mutex<FreshnessProof>,
    /// The newest proof's time, in nanoseconds after `started` plus one; 0: none. Read by every
    /// check without a lock.
    proven_at_nanos: AtomicU64,
    started: Instant,
    staleness_bound: Duration,
    hits: AtomicU64,
    not_fresh: AtomicU64,
    relists: AtomicU64,
    rewatches: AtomicU64,
}

impl Shared {
    fn freshness_at(&self, now: Instant, revision: Revision) -> CacheFreshness {
        let nanos = self.proven_at_nanos.load(Ordering::Acquire);
        let lag = (nanos > 0).then(|| {
            let proven = self.started + Duration::from_nanos(nanos - 1);
            now.saturating_duration_since(proven)
        });
        CacheFreshness {
            revision,
            lag,
            fresh: lag.is_some_and(|lag| lag <= self.staleness_bound),
        }
    }

    /// Publishes the proof's time for the checks to read.
    fn publish(&self, proof: &FreshnessProof) {
        let nanos = proof.proven_at().map_or(0, |proven| {
            u64::try_from(proven.saturating_duration_since(self.started).as_nanos())
                .unwrap_or(u64::MAX - 1)
                + 1
        });
        self.proven_at_nanos.store(nanos, Ordering::Release);
    }

    /// Runs `change` on the state, then lets the proof catch up with the state's revision.
    fn update(&self, change: impl FnOnce(&mut CacheState)) {
        let revision = {
            let mut state = self.state.write().expect("cache state lock poisoned");
            change(&mut state);
            state.revision()
        };
        let mut proof = self.proof.lock().expect("proof lock poisoned");
        proof.caught_up(revision);
        self.publish(&proof);
    }

    fn replace(&self, fresh: CacheState) {
        let revision = fresh.revision();
        *self.state.write().expect("cache state lock poisoned") = fresh;
        let mut proof = self.proof.lock().expect("proof lock poisoned");
        proof.regressed(revision);
        proof.caught_up(revision);
        self.publish(&proof);
    }

    fn probe_answered(&self, sent: Instant, revision: Revision) {
        let cache = self
            .state
            .read()
            .expect("cache state lock poisoned")
            .revision();
        let mut proof = self.proof.lock().expect("proof lock poisoned");
        proof.probe_answered(sent, revision, cache);
        self.publish(&proof);
    }
}

/// The registry's state in this process, for access checks and lookups without a network
/// round trip; see the module documentation for how it proves its freshness.
#[derive(Debug)]
pub struct CachedChecker {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for CachedChecker {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl CachedChecker {
    /// Starts following the registry through `client`: lists the state, watches from there,
    /// and probes for freshness, all in background tasks on the current tokio runtime. Until
    /// the first proof of freshness, checks deny with `CACHE_NOT_FRESH` (see `wait_fresh`).
    pub fn start(client: Client, options: CacheOptions) -> CachedChecker {
        let shared = Arc::new(Shared {
            state: RwLock::default(),
            proof: Mutex::default(),
            proven_at_nanos: AtomicU64::new(0),
            started: Instant::now(),
            staleness_bound: options.staleness_bound,
            hits: AtomicU64::new(0),
            not_fresh: AtomicU64::new(0),
            relists: AtomicU64::new(0),
            rewatches: AtomicU64::new(0),
        });
        let client = Arc::new(client);
        let follow = tokio::spawn(follow(shared.clone(), client.clone(), options.clone()));
        let probe = tokio::spawn(probe(shared.clone(), client, options));
        CachedChecker {
            shared,
            tasks: vec![follow, probe],
        }
    }

    /// May a caller in `accessor_jurisdiction` perform `operation` on the user's data? The
    /// nodes' rule over the cached state; `CACHE_NOT_FRESH` when the cache cannot prove it is
    /// within its staleness bound.
    pub fn check_access(
        &self,
        user_id: &UserId,
        accessor_jurisdiction: Jurisdiction,
        operation: AccessOperation,
    ) -> CachedDecision {
        let now = Instant::now();
        let state = self.shared.state.read().expect("cache state lock poisoned");
        let freshness = self.shared.freshness_at(now, state.revision());
        if !freshness.fresh {
            self.shared.not_fresh.fetch_add(1, Ordering::Relaxed);
            return CachedDecision {
                decision: Decision::Deny {
                    reason: DenyReason::CacheNotFresh,
                },
                revision: state.revision(),
            };
        }
        self.shared.hits.fetch_add(1, Ordering::Relaxed);
        CachedDecision {
            decision: state.check(user_id, accessor_jurisdiction, operation),
            revision: state.revision(),
        }
    }

    /// The user's placement as cached, `None` if the user has none; an error when the cache
    /// cannot prove it is within its staleness bound.
    pub fn lookup(&self, user_id: &UserId) -> Result<Option<CachedPlacement>, NotFresh> {
        let now = Instant::now();
        let state = self.shared.state.read().expect("cache state lock poisoned");
        let freshness = self.shared.freshness_at(now, state.revision());
        if !freshness.fresh {
            self.shared.not_fresh.fetch_add(1, Ordering::Relaxed);
            return Err(NotFresh { freshness });
        }
        self.shared.hits.fetch_add(1, Ordering::Relaxed);
        Ok(state.lookup(user_id))
    }

    /// The revision the cache reflects and how old its proof of freshness is.
    pub fn freshness(&self) -> CacheFreshness {
        let revision = self
            .shared
            .state
            .read()
            .expect("cache state lock poisoned")
            .revision();
        self.shared.freshness_at(Instant::now(), revision)
    }

    /// Waits until the cache is fresh, up to `timeout`.
    pub async fn wait_fresh(&self, timeout: Duration) -> Result<CacheFreshness, NotFresh> {
        let deadline = Instant::now() + timeout;
        loop {
            let freshness = self.freshness();
            if freshness.fresh {
                return Ok(freshness);
            }
            if Instant::now() >= deadline {
                return Err(NotFresh { freshness });
            }
            tokio::time::sleep(Duration::from_millis(WAIT_POLL_MS)).await;
        }
    }

    /// Waits until the cache holds every change up to `revision` (say, a write this process
    /// just made: `Client::highest_revision`) and is fresh, up to `timeout`.
    pub async fn wait_revision(
        &self,
        revision: Revision,
        timeout: Duration,
    ) -> Result<CacheFreshness, NotFresh> {
        let deadline = Instant::now() + timeout;
        loop {
            let freshness = self.freshness();
            if freshness.fresh && freshness.revision >= revision {
                return Ok(freshness);
            }
            if Instant::now() >= deadline {
                return Err(NotFresh { freshness });
            }
            tokio::time::sleep(Duration::from_millis(WAIT_POLL_MS)).await;
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.shared.hits.load(Ordering::Relaxed),
            not_fresh: self.shared.not_fresh.load(Ordering::Relaxed),
            relists: self.shared.relists.load(Ordering::Relaxed),
            rewatches: self.shared.rewatches.load(Ordering::Relaxed),
        }
    }

    /// The digest of the cached data (see `CacheState::digest`) and the revision it is at.
    pub fn digest(&self) -> (Revision, String, u64) {
        let state = self.shared.state.read().expect("cache state lock poisoned");
        let (digest, count) = state.digest();
        (state.revision(), digest, count)
    }
}

/// Lists, then watches, for as long as the checker lives: re-lists when the history has been
/// compacted past the cache, watches again after any other failure.
async fn follow(shared: Arc<Shared>, client: Arc<Client>, options: CacheOptions) {
    let progress_interval = options
        .probe_interval
        .max(Duration::from_millis(PROGRESS_INTERVAL_MS_MIN));
    let mut pause_ms = RETRY_PAUSE_MS_MIN;
    let mut listed = false;
    let mut must_list = true;
    loop {
        if must_list {
            let mut fresh = CacheState::default();
            let listed_revision = client
                .list_state_into(options.allow_recent_snapshot, |item| fresh.add(item))
                .await;
            match listed_revision {
                Ok(revision) => {
                    if listed {
                        shared.relists.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("residency_cache_relists_total").increment(1);
                    }
                    tracing::info!(
                        revision = revision.0,
                        placements = fresh.placements_count(),
                        "cache listed the registry's state"
                    );
                    shared.replace(fresh.listed_at(revision));
                    listed = true;
                    must_list = false;
                    pause_ms = RETRY_PAUSE_MS_MIN;
                }
                Err(error) => {
                    tracing::warn!(%error, "cache could not list the registry's state");
                    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                    pause_ms = (pause_ms * 2).min(RETRY_PAUSE_MS_MAX);
                    continue;
                }
            }
        }
        let from = shared
            .state
            .read()
            .expect("cache state lock poisoned")
            .revision();
        let mut watcher = client
            .watch(Revision(from.0 + 1), "", None)
            .progress_every(progress_interval);
        let error = loop {
            match watcher.next().await {
                Ok(Some(WatchItem::Event(event))) => {
                    shared.update(|state| state.apply(&event));
                    pause_ms = RETRY_PAUSE_MS_MIN;
                }
                Ok(Some(WatchItem::Progress(revision))) => {
                    shared.update(|state| state.advance(revision));
                    pause_ms = RETRY_PAUSE_MS_MIN;
                }
                Ok(None) => break None,
                Err(error) => break Some(error),
            }
        };
        shared.rewatches.fetch_add(1, Ordering::Relaxed);
        if let Some(error) = error {
            if error.reason() == Some(ReasonCode::WatchCompacted) {
                tracing::warn!("the watch history moved past the cache; listing again");
                must_list = true;
                continue;
            }
            tracing::warn!(%error, "cache watch failed; watching again");
        }
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        pause_ms = (pause_ms * 2).min(RETRY_PAUSE_MS_MAX);
    }
}

/// Asks for the linearizable revision every `probe_interval` and records the answers as
/// proofs; publishes the cache's metrics as it goes.
async fn probe(shared: Arc<Shared>, client: Arc<Client>, options: CacheOptions) {
    let mut ticks = tokio::time::interval(options.probe_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let sent = Instant::now();
        // An answer slower than the bound could never prove freshness within it.
        let answer = tokio::time::timeout(
            options.staleness_bound,
            client.current_revision(residency_types::Consistency::Linearizable),
        )
        .await;
        match answer {
            Ok(Ok(revision)) => shared.probe_answered(sent, revision),
            Ok(Err(error)) => tracing::debug!(%error, "cache freshness probe failed"),
            Err(_) => tracing::debug!("cache freshness probe timed out"),
        }
        publish_metrics(&shared);
    }
}

fn publish_metrics(shared: &Shared) {
    let revision = shared
        .state
        .read()
        .expect("cache state lock poisoned")
        .revision();
    let freshness = shared.freshness_at(Instant::now(), revision);
    metrics::gauge!("residency_cache_revision").set(revision.0 as f64);
    if let Some(lag) = freshness.lag {
        metrics::gauge!("residency_cache_lag_seconds").set(lag.as_secs_f64());
    }
    metrics::gauge!("residency_cache_fresh").set(if freshness.fresh { 1.0 } else { 0.0 });
    metrics::counter!("residency_cache_hits_total").absolute(shared.hits.load(Ordering::Relaxed));
    metrics::counter!("residency_cache_not_fresh_total")
        .absolute(shared.not_fresh.load(Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use residency_types::{CallerId, Labels, LocationState, PlacementState, ReasonText};

    use super::*;

    fn us() -> Jurisdiction {
        Jurisdiction::parse("US").expect("US")
    }

    fn location(id: &str, jurisdiction: &str, state: LocationState) -> Location {
        Location {
            id: LocationId::parse(id).expect("location id"),
            jurisdiction: Jurisdiction::parse(jurisdiction).expect("jurisdiction"),
            labels: Labels::default(),
            state,
            create_revision: Revision(1),
            mod_revision: Revision(1),
        }
    }

    fn placement(user: &str, location_id: &str, revision: u64) -> Placement {
        Placement {
            user_id: UserId::parse(user).expect("user id"),
            residency: us(),
            location_id: LocationId::parse(location_id).expect("location id"),
            state: PlacementState::Active,
            epoch: 1,
            create_revision: Revision(revision),
            mod_revision: Revision(revision),
            updated_at_ms: 0,
            updated_by: CallerId::parse("test").expect("caller"),
            updated_by_authenticated: false,
            reason: ReasonText::parse("").expect("reason"),
        }
    }

    fn listing() -> StateListing {
        StateListing {
            revision: Revision(10),
            locations: vec![
                location("us-east-1/pg-1", "US", LocationState::Active),
                location("us-west-2/pg-2", "US", LocationState::Active),
            ],
            policies: vec![Policy {
                residency: us(),
                storage: BTreeSet::from([us()]),
                access: BTreeSet::from([us()]),
                mod_revision: Revision(2),
            }],
            placements: vec![placement("alice", "us-east-1/pg-1", 5)],
        }
    }

    fn event(revision: u64, index: u32, change: Change) -> Event {
        Event {
            revision: Revision(revision),
            index,
            change,
        }
    }

    fn user(id: &str) -> UserId {
        UserId::parse(id).expect("user id")
    }

    #[test]
    fn the_cache_decides_by_the_nodes_rule_and_follows_events() {
        let mut state = CacheState::from_listing(listing());
        let cn = Jurisdiction::parse("CN").expect("CN");
        assert!(matches!(
            state.check(&user("alice"), us(), AccessOperation::Write),
            Decision::Allow { epoch: 1, .. }
        ));
        assert_eq!(
            state.check(&user("alice"), cn, AccessOperation::Read),
            Decision::Deny {
                reason: DenyReason::AccessorJurisdictionNotAllowed
            }
        );
        assert_eq!(
            state.check(&user("bob"), us(), AccessOperation::Read),
            Decision::Deny {
                reason: DenyReason::UnknownUser
            }
        );
        // Two changes at revision 11: complete only up to 10 until the progress notice.
        state.apply(&event(
            11,
            0,
            Change::Placed(placement("bob", "us-west-2/pg-2", 11)),
        ));
        state.apply(&event(
            11,
            1,
            Change::Forgotten {
                user_id: user("alice"),
                location_id: LocationId::parse("us-east-1/pg-1").expect("id"),
            },
        ));
        assert_eq!(state.revision(), Revision(10));
        state.advance(Revision(11));
        assert_eq!(state.revision(), Revision(11));
        assert!(state.lookup(&user("alice")).is_none());
        assert!(matches!(
            state.check(&user("bob"), us(), AccessOperation::Read),
            Decision::Allow { .. }
        ));
        // A moving user may be read but not written.
        let mut moving = placement("bob", "us-west-2/pg-2", 12);
        moving.state = PlacementState::Moving {
            target: LocationId::parse("us-east-1/pg-1").expect("id"),
        };
        state.apply(&event(12, 0, Change::Placed(moving)));
        assert_eq!(
            state.check(&user("bob"), us(), AccessOperation::Write),
            Decision::Deny {
                reason: DenyReason::UserMoving
            }
        );
        // A policy change reaches every check at once.
        state.apply(&event(
            13,
            0,
            Change::Policy(Policy {
                residency: us(),
                storage: BTreeSet::from([us()]),
                access: BTreeSet::new(),
                mod_revision: Revision(13),
            }),
        ));
        assert_eq!(
            state.check(&user("bob"), us(), AccessOperation::Read),
            Decision::Deny {
                reason: DenyReason::AccessorJurisdictionNotAllowed
            }
        );
    }

    #[test]
    #[should_panic(expected = "applied to a cache complete up to")]
    fn an_event_the_cache_already_covers_is_our_bug() {
        let mut state = CacheState::from_listing(listing());
        state.apply(&event(
            10,
            0,
            Change::Placed(placement("bob", "us-west-2/pg-2", 10)),
        ));
    }

    #[test]
    fn the_digest_depends_on_the_data_not_on_the_order_it_came_in() {
        let a = CacheState::from_listing(listing());
        let mut reversed = listing();
        reversed.locations.reverse();
        let b = CacheState::from_listing(reversed);
        assert_eq!(a.digest(), b.digest());
        let mut c = a.clone();
        c.apply(&event(
            11,
            0,
            Change::Placed(placement("bob", "us-west-2/pg-2", 11)),
        ));
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn a_probe_proves_freshness_only_once_the_cache_reaches_its_revision() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut proof = FreshnessProof::default();
        // The cache is at 10; the cluster was at 12 when the probe was sent.
        proof.probe_answered(at(0), Revision(12), Revision(10));
        assert_eq!(proof.proven_at(), None);
        proof.caught_up(Revision(11));
        assert_eq!(proof.proven_at(), None);
        proof.caught_up(Revision(12));
        assert_eq!(proof.proven_at(), Some(at(0)));
        // A later probe the cache already covers moves the proof forward at once.
        proof.probe_answered(at(100), Revision(12), Revision(12));
        assert_eq!(proof.proven_at(), Some(at(100)));
        // An answer to an older probe never moves it back.
        proof.probe_answered(at(50), Revision(12), Revision(12));
        assert_eq!(proof.proven_at(), Some(at(100)));
        // Pending probes are proven in order as the cache catches up.
        proof.probe_answered(at(200), Revision(20), Revision(12));
        proof.probe_answered(at(300), Revision(30), Revision(12));
        proof.caught_up(Revision(25));
        assert_eq!(proof.proven_at(), Some(at(200)));
        proof.caught_up(Revision(30));
        assert_eq!(proof.proven_at(), Some(at(300)));
    }

    #[test]
    fn a_cache_listed_again_from_an_older_snapshot_loses_the_newer_proof() {
        let start = Instant::now();
        let mut proof = FreshnessProof::default();
        proof.probe_answered(start, Revision(50), Revision(50));
        assert_eq!(proof.proven_at(), Some(start));
        proof.regressed(Revision(40));
        assert_eq!(proof.proven_at(), None);
        proof.caught_up(Revision(49));
        assert_eq!(proof.proven_at(), None);
        proof.caught_up(Revision(50));
        assert_eq!(proof.proven_at(), Some(start));
        // A listing at or past the proven revision keeps the proof.
        proof.regressed(Revision(50));
        assert_eq!(proof.proven_at(), Some(start));
    }

    #[test]
    fn pending_probes_stay_bounded() {
        let start = Instant::now();
        let mut proof = FreshnessProof::default();
        for n in 0..(PENDING_PROOFS_MAX as u64 * 3) {
            proof.probe_answered(
                start + Duration::from_millis(n),
                Revision(100 + n),
                Revision(1),
            );
        }
        assert_eq!(proof.pending.len(), PENDING_PROOFS_MAX);
    }
}
