//! The read API the server answers queries with. Each read takes the state read lock, so the
//! placements it returns and the revision it reports belong to the same applied state.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use residency_core::StateDigest;
use residency_types::{Placement, Revision, UserId};

use crate::StoreError;
use crate::state_machine::{Shared, TreeView};

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
        let tree = self.shared.state.read().await;
        let placement = residency_core::lookup(&TreeView(&tree), user_id)?;
        Ok((placement, self.applied_revision()))
    }

    pub async fn batch_lookup(
        &self,
        user_ids: &[UserId],
    ) -> Result<(Vec<Option<Placement>>, Revision), StoreError> {
        let tree = self.shared.state.read().await;
        let view = TreeView(&tree);
        let placements = user_ids
            .iter()
            .map(|user_id| residency_core::lookup(&view, user_id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((placements, self.applied_revision()))
    }

    /// The state digest at the current applied revision (holds the read lock while hashing).
    pub async fn digest(&self) -> Result<DigestAt, StoreError> {
        let tree = self.shared.state.clone().read_owned().await;
        let revision = self.applied_revision();
        tokio::task::spawn_blocking(move || {
            let mut digest = StateDigest::new();
            for item in tree.iter() {
                let (key, value) = item?;
                digest.update(&key, &value);
            }
            let (sha256_hex, pairs) = digest.finish();
            Ok(DigestAt {
                revision,
                sha256_hex,
                pairs,
            })
        })
        .await
        .expect("digest thread panicked")
    }
}
