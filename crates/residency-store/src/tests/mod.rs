//! The store against openraft's storage test suite, plus our own durability and corruption checks.

use openraft::testing::{StoreBuilder, Suite};

use crate::{LogStore, StateMachineStore, StorageError, StoreOptions, TypeConfig};

pub(crate) fn test_options() -> StoreOptions {
    StoreOptions {
        cache_capacity_bytes: 16 * 1024 * 1024,
    }
}

struct TempStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempStoreBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log_store, state_machine, _) = crate::open(dir.path(), test_options())
            .await
            .expect("store opens");
        Ok((dir, log_store, state_machine))
    }
}

#[test]
fn passes_the_openraft_storage_suite() {
    if let Err(error) = Suite::test_all(TempStoreBuilder) {
        panic!("the store fails openraft's storage suite: {error}");
    }
}
