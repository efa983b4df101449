//! Checksummed records for the Raft log and vote: a format byte, a CRC32 of the body, then the
//! body (postcard). A record whose checksum fails is corruption, reported, never served.
//!
//! Log entries have two formats. Format 2 (`seal_entry`) is an entry whose writes are a
//! `Proposal`, several per entry. Format 1 is an entry of the single `Command` the log held
//! before writes were grouped; `unseal_entry` still reads it, as a proposal of one write, so a
//! node's log from before keeps applying to the same state. Votes and the log's own metadata
//! are format 1.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Entry, StoreError};

const RECORD_FORMAT_V1: u8 = 1;
/// A log entry whose payload is a `Proposal`.
const ENTRY_FORMAT_GROUPED: u8 = 2;
const RECORD_HEADER_BYTES: usize = 5;

fn seal_as<T: Serialize>(format: u8, value: &T) -> Vec<u8> {
    // Our own types and openraft's always serialize; a failure is a bug, not the world's fault.
    let body = postcard::to_stdvec(value).expect("raft records always serialize");
    let mut bytes = Vec::with_capacity(RECORD_HEADER_BYTES + body.len());
    bytes.push(format);
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    bytes
}

/// The record's format byte and its body, once the checksum holds.
fn checked_body<'a>(bytes: &'a [u8], what: &str) -> Result<(u8, &'a [u8]), StoreError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(StoreError::corrupt(format!(
            "{what}: record of {} bytes is torn",
            bytes.len()
        )));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let body = &bytes[RECORD_HEADER_BYTES..];
    let actual = crc32fast::hash(body);
    if stored != actual {
        return Err(StoreError::corrupt(format!(
            "{what}: checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        )));
    }
    Ok((bytes[0], body))
}

/// Whether the record's checksum holds (its format and body are not looked at).
pub(crate) fn checksum_holds(bytes: &[u8]) -> bool {
    checked_body(bytes, "").is_ok()
}

fn decode_body<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(body).map_err(|error| StoreError::corrupt(format!("{what}: {error}")))
}

fn unknown_format(what: &str, format: u8) -> StoreError {
    StoreError::corrupt(format!("{what}: unknown record format {format}"))
}

/// A vote or a piece of the log's metadata, sealed.
pub fn seal<T: Serialize>(value: &T) -> Vec<u8> {
    seal_as(RECORD_FORMAT_V1, value)
}

pub fn unseal<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    match checked_body(bytes, what)? {
        (RECORD_FORMAT_V1, body) => decode_body(body, what),
        (format, _) => Err(unknown_format(what, format)),
    }
}

/// A log entry, sealed in the current format.
pub fn seal_entry(entry: &Entry) -> Vec<u8> {
    seal_as(ENTRY_FORMAT_GROUPED, entry)
}

/// The log id of a log entry in either format, once the record's checksum holds, without
/// decoding the rest: an entry begins with its log id in both.
pub fn entry_log_id(bytes: &[u8], what: &str) -> Result<crate::LogId, StoreError> {
    match checked_body(bytes, what)? {
        (ENTRY_FORMAT_GROUPED | RECORD_FORMAT_V1, body) => postcard::take_from_bytes(body)
            .map(|(log_id, _rest)| log_id)
            .map_err(|error| StoreError::corrupt(format!("{what}: {error}"))),
        (format, _) => Err(unknown_format(what, format)),
    }
}

/// A log entry in either format; one from before grouping comes back as a proposal of one.
pub fn unseal_entry(bytes: &[u8], what: &str) -> Result<Entry, StoreError> {
    match checked_body(bytes, what)? {
        (ENTRY_FORMAT_GROUPED, body) => decode_body(body, what),
        (RECORD_FORMAT_V1, body) => Ok(legacy::grouped(decode_body(body, what)?)),
        (format, _) => Err(unknown_format(what, format)),
    }
}

/// The log entry as it was before writes were grouped: one `Command` per entry.
mod legacy {
    use residency_types::{ApplyResult, Command, Proposal};

    openraft::declare_raft_types!(
        /// Only to decode format-1 entries: the same types, but a single command per entry.
        pub TypeConfig:
            D = Command,
            R = ApplyResult,
            NodeId = crate::NodeId,
            Node = crate::NodeInfo,
            Entry = openraft::Entry<TypeConfig>,
            SnapshotData = tokio::fs::File,
            AsyncRuntime = openraft::TokioRuntime,
    );

    pub type Entry = openraft::Entry<TypeConfig>;

    /// The same entry in today's type: its command as a proposal of one.
    pub fn grouped(entry: Entry) -> crate::Entry {
        let payload = match entry.payload {
            openraft::EntryPayload::Blank => openraft::EntryPayload::Blank,
            openraft::EntryPayload::Normal(command) => {
                openraft::EntryPayload::Normal(Proposal::new(vec![command]))
            }
            openraft::EntryPayload::Membership(membership) => {
                openraft::EntryPayload::Membership(membership)
            }
        };
        crate::Entry {
            log_id: entry.log_id,
            payload,
        }
    }

    /// A format-1 record of an entry of at most one write, as a node from before grouping
    /// wrote it (for tests).
    #[cfg(test)]
    pub fn seal(entry: &crate::Entry) -> Vec<u8> {
        let payload = match &entry.payload {
            openraft::EntryPayload::Blank => openraft::EntryPayload::Blank,
            openraft::EntryPayload::Normal(proposal) => {
                let [command] = proposal.commands.as_slice() else {
                    panic!("an entry from before grouping has one write");
                };
                openraft::EntryPayload::Normal(command.clone())
            }
            openraft::EntryPayload::Membership(membership) => {
                openraft::EntryPayload::Membership(membership.clone())
            }
        };
        let entry = Entry {
            log_id: entry.log_id,
            payload,
        };
        super::seal_as(super::RECORD_FORMAT_V1, &entry)
    }
}

#[cfg(test)]
pub(crate) use legacy::seal as seal_legacy_entry;
