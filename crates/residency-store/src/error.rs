//! Storage errors: IO, sled, and corruption. Converted to openraft's `StorageError` at the trait
//! boundary, where openraft treats them as fatal for the node.

use std::io;

use openraft::{ErrorSubject, ErrorVerb};

use crate::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt storage: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn corrupt(message: impl Into<String>) -> Self {
        StoreError::Corrupt(message.into())
    }

    pub fn into_storage(self, subject: ErrorSubject<u64>, verb: ErrorVerb) -> StorageError {
        let error = match self {
            StoreError::Io(error) => error,
            other => io::Error::other(other.to_string()),
        };
        StorageError::from_io_error(subject, verb, error)
    }
}

impl From<residency_core::CodecError> for StoreError {
    fn from(error: residency_core::CodecError) -> Self {
        StoreError::Corrupt(error.to_string())
    }
}

impl<E: std::error::Error + 'static> From<residency_core::CoreError<E>> for StoreError {
    fn from(error: residency_core::CoreError<E>) -> Self {
        StoreError::Corrupt(error.to_string())
    }
}

/// Shorthand for the conversions at the openraft trait boundary.
pub(crate) fn log_error(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError {
    move |error| error.into_storage(ErrorSubject::Logs, verb)
}

pub(crate) fn sm_error(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError {
    move |error| error.into_storage(ErrorSubject::StateMachine, verb)
}

pub(crate) fn snapshot_error(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError {
    move |error| error.into_storage(ErrorSubject::Snapshot(None), verb)
}
