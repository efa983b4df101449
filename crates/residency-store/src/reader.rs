//! The read API the server answers queries with. The placements a read returns and the revision
//! it reports always belong to the same applied state (see `read_consistent`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use residency_core::StateDigest;
use residency_types::{ApplyResult, Command, Placement, Revision, UserId};

use crate::StoreError;
use crate::layers::{Layers, Merged, PairSource};
use crate::state_machine::Shared;
pub use crate::state_machine::StateView;

/// Optimistic read attempts before a read waits for the state lock instead.
const OPTIMISTIC_READ_ATTEMPTS_MAX: usize = 64;

#[derive(Clone)]
pub struct StateReader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StateReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader")
            .field("applied", &self.applied_revision())
            .finish()
    }
}

/// A digest of every replicated pair at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestAt {
    pub revision: Revision,
    pub sha256_hex: String,
    pub pairs: u64,
}

impl StateReader {
    pub(crate) fn new(shared: Arc<Shared>) -> StateReader {
        StateReader { shared }
    }

    /// Where the proposer registers for answers from apply (`answers.rs`).
    pub fn answer_board(&self) -> crate::AnswerBoard {
        self.shared.answers.clone()
    }

    /// Changes written into the state's live sled tree since its last snapshot build (or since
    /// the node started): the server builds a snapshot past a bound, so sled stays small.
    pub fn live_changes(&self) -> u64 {
        self.shared.live_changes.load(Ordering::Relaxed)
    }

    /// The revision of the last applied entry on this node (0 before any).
    pub fn applied_revision(&self) -> Revision {
        Revision(
            self.shared
                .applied_next
                .load(Ordering::SeqCst)
                .saturating_sub(1),
        )
    }

    pub async fn lookup(
        &self,
        user_id: &UserId,
    ) -> Result<(Option<Placement>, Revision), StoreError> {
        self.read_consistent(|view| Ok(residency_core::lookup(view, user_id)?))
            .await
    }

    pub async fn batch_lookup(
        &self,
        user_ids: &[UserId],
    ) -> Result<(Vec<Option<Placement>>, Revision), StoreError> {
        self.read_consistent(|view| {
            user_ids
                .iter()
                .map(|user_id| Ok(residency_core::lookup(view, user_id)?))
                .collect()
        })
        .await
    }

    /// Runs a query of the core against one applied state, with that state's revision.
    pub async fn query<T>(
        &self,
        read: impl Fn(&StateView<'_>) -> Result<T, StoreError>,
    ) -> Result<(T, Revision), StoreError> {
        self.read_consistent(read).await
    }

    /// What applying `commands` as the next entry would answer, one result per write, against
    /// the current state, without writing: the check before proposing, once for a whole group,
    /// each write seeing what the ones before it would leave. Apply checks again against the
    /// state at the entry's position.
    ///
    /// It holds the state lock for reading (applies wait for it; reads do not),
    /// never the optimistic path: `apply` asserts the state's invariants (a counter never goes
    /// below zero, ...) and a state torn by a concurrent apply would trip them before the
    /// seqlock could say "read again". The fault suite's crash-during-snapshot-install run found
    /// exactly that: a leader panicked on a torn pre-check.
    pub async fn evaluate(&self, commands: &[Command]) -> Result<Vec<ApplyResult>, StoreError> {
        let layers = self.shared.state.read().await;
        let next = Revision(self.applied_revision().0 + 1);
        let requests = self
            .shared
            .requests
            .read()
            .expect("request index lock poisoned");
        Ok(residency_core::check(
            &StateView(&layers),
            &*requests,
            next,
            commands,
        )?)
    }

    /// Runs `read` against one applied state and returns its result with that state's revision.
    /// Optimistic first (a seqlock: no lock shared with applies); after
    /// `OPTIMISTIC_READ_ATTEMPTS_MAX` collisions with applies it takes the state lock instead,
    /// so a read always finishes.
    async fn read_consistent<T>(
        &self,
        read: impl Fn(&StateView<'_>) -> Result<T, StoreError>,
    ) -> Result<(T, Revision), StoreError> {
        let shared = &self.shared;
        for _ in 0..OPTIMISTIC_READ_ATTEMPTS_MAX {
            let before = shared.change_seq.load(Ordering::SeqCst);
            if !before.is_multiple_of(2) {
                tokio::task::yield_now().await;
                continue;
            }
            let layers = shared
                .read_layers
                .read()
                .expect("read layers lock poisoned")
                .clone();
            let result = read(&StateView(&layers));
            let revision = self.applied_revision();
            if shared.change_seq.load(Ordering::SeqCst) == before {
                return result.map(|value| (value, revision));
            }
            // The state changed under the read (an error included: a build or an install may
            // have dropped a tree being read); try again.
        }
        let layers = shared.state.read().await;
        let value = read(&StateView(&layers))?;
        Ok((value, self.applied_revision()))
    }

    /// A receiver that sees the applied revision change.
    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.applied_notify.subscribe()
    }

    /// The node's current snapshot, opened (it cannot be deleted while the file is open).
    pub fn open_current_snapshot(
        &self,
    ) -> Result<Option<(crate::SnapshotMeta, std::fs::File)>, StoreError> {
        self.shared.open_current_snapshot()
    }

    /// The state digest at the current applied revision. Like a snapshot build, it walks the
    /// state as of its start while applies go on (see `capture.rs`).
    pub async fn digest(&self) -> Result<DigestAt, StoreError> {
        let (walking, layers, revision) = self
            .shared
            .start_walk(|_| Ok(self.applied_revision()))
            .await?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let _walking = walking;
            digest_as_of_start(&shared, &layers).map(|(sha256_hex, pairs)| DigestAt {
                revision,
                sha256_hex,
                pairs,
            })
        })
        .await
        .expect("digest thread panicked")
    }
}

/// The digest of the layers as of the walk's start: the live tree through the capture, merged
/// with the frozen trees and the base, which do not change.
fn digest_as_of_start(shared: &Shared, layers: &Layers) -> Result<(String, u64), StoreError> {
    let mut digest = StateDigest::new();
    let mut sources: Vec<Box<dyn PairSource + Send + '_>> = vec![Box::new(
        crate::capture::AsOfStart::new(&shared.capture, &layers.live),
    )];
    for tree in &layers.frozen {
        sources.push(Box::new(tree.iter()));
    }
    if let Some(base) = &layers.base {
        sources.push(Box::new(base.pairs_from(b"", false)));
    }
    let mut walk = Merged::new(sources);
    while let Some((key, value)) = walk.next_pair()? {
        digest.update(&key, &value);
    }
    Ok(digest.finish())
}
