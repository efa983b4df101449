//! Streaming a backup: a fresh snapshot, sent as a header, the file in bounded chunks, and a
//! SHA-256 trailer. Memory use is one chunk and a small channel, whatever the state's size.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use residency_proto::pb::{BackupChunk, BackupHeader, BackupTrailer, backup_chunk};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::error::ApiError;
use crate::node::Node;

/// Bytes per data chunk.
const BACKUP_CHUNK_BYTES: usize = 256 * 1024;
/// Chunks buffered between the file reader and the network, at most.
const BACKUP_CHUNKS_IN_FLIGHT_MAX: usize = 4;
/// How long the fresh snapshot may take to build before the backup gives up.
const BACKUP_SNAPSHOT_WAIT_MS_MAX: u64 = 300_000;
/// How often the state's live tree is measured against `raft.snapshot_live_changes_max`.
const LIVE_CHANGES_CHECK_INTERVAL_MS: u64 = 1_000;

pub type BackupStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;

fn chunk(part: backup_chunk::Part) -> Result<BackupChunk, Status> {
    Ok(BackupChunk { part: Some(part) })
}

impl Node {
    /// Asks for a snapshot build whenever the state's live sled tree holds at least
    /// `raft.snapshot_live_changes_max` changes since the last build, until the node stops: a
    /// build moves them into the base file, so sled (its disk, its open after a restart) stays
    /// small whatever the entries carry.
    pub async fn snapshot_when_live_tree_full(self: std::sync::Arc<Self>) {
        let bound = self.config.raft.snapshot_live_changes_max;
        loop {
            tokio::time::sleep(Duration::from_millis(LIVE_CHANGES_CHECK_INTERVAL_MS)).await;
            if self.raft.metrics().borrow().running_state.is_err() {
                return;
            }
            let changes = self.reader.live_changes();
            metrics::gauge!("residency_state_live_changes").set(changes as f64);
            if changes >= bound {
                tracing::info!(
                    changes,
                    bound,
                    "the state's live tree is full: building a snapshot"
                );
                if self.raft.trigger().snapshot().await.is_err() {
                    return;
                }
            }
        }
    }

    /// Builds a snapshot covering at least what this node has applied now, and opens it.
    async fn fresh_snapshot(&self) -> Result<(u64, std::fs::File), ApiError> {
        let applied = self.reader.applied_revision().0;
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|_| ApiError::ShuttingDown)?;
        let wait = self
            .raft
            .wait(Some(Duration::from_millis(BACKUP_SNAPSHOT_WAIT_MS_MAX)));
        wait.metrics(
            |metrics| {
                metrics
                    .snapshot
                    .is_some_and(|snapshot| snapshot.index >= applied)
            },
            "backup snapshot",
        )
        .await
        .map_err(|error| {
            ApiError::internal(format!(
                "the snapshot for the backup was not built: {error}"
            ))
        })?;
        let (meta, file) = self
            .reader
            .open_current_snapshot()
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::internal("no snapshot after building one"))?;
        let revision = meta.last_log_id.map_or(0, |log_id| log_id.index);
        Ok((revision, file))
    }

    pub async fn backup(&self) -> Result<BackupStream, ApiError> {
        let (revision, file) = self.fresh_snapshot().await?;
        let size_bytes = file.metadata().map_err(ApiError::internal)?.len();
        let header = BackupHeader {
            node_id: self.id(),
            revision,
            size_bytes,
        };
        tracing::info!(revision, size_bytes, "streaming a backup");
        let (sender, receiver) = mpsc::channel(BACKUP_CHUNKS_IN_FLIGHT_MAX);
        tokio::spawn(async move {
            if sender
                .send(chunk(backup_chunk::Part::Header(header)))
                .await
                .is_err()
            {
                return;
            }
            let mut file = tokio::fs::File::from_std(file);
            let mut hasher = Sha256::new();
            let mut sent = 0_u64;
            loop {
                let mut buffer = vec![0_u8; BACKUP_CHUNK_BYTES];
                let read = match file.read(&mut buffer).await {
                    Ok(0) => break,
                    Ok(read) => read,
                    Err(error) => {
                        let _ = sender
                            .send(Err(Status::internal(format!(
                                "reading the snapshot: {error}"
                            ))))
                            .await;
                        return;
                    }
                };
                buffer.truncate(read);
                hasher.update(&buffer);
                sent += read as u64;
                if sender
                    .send(chunk(backup_chunk::Part::Data(buffer)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let trailer = BackupTrailer {
                sha256_hex: hex::encode(hasher.finalize()),
                size_bytes: sent,
            };
            let _ = sender
                .send(chunk(backup_chunk::Part::Trailer(trailer)))
                .await;
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }
}

/// Items per export or list message.
const EXPORT_PAGE_ITEMS: usize = 1_000;

pub type ExportStream =
    Pin<Box<dyn Stream<Item = Result<residency_proto::pb::ExportPlacementsChunk, Status>> + Send>>;
pub type ListStateStream =
    Pin<Box<dyn Stream<Item = Result<residency_proto::pb::ListStateChunk, Status>> + Send>>;

/// What a snapshot export sends: placements only, or the catalog and policies too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExportScope {
    Placements,
    WholeState,
}

/// One page of an export, all of it at one revision.
#[derive(Debug, Default)]
struct ExportPage {
    locations: Vec<residency_proto::pb::Location>,
    policies: Vec<residency_proto::pb::Policy>,
    placements: Vec<residency_proto::pb::Placement>,
}

impl ExportPage {
    fn len(&self) -> usize {
        self.locations.len() + self.policies.len() + self.placements.len()
    }

    /// Decodes one pair of the snapshot into the page, if the scope wants it.
    fn add(&mut self, scope: ExportScope, key: &[u8], value: &[u8]) -> Result<(), String> {
        use residency_core::{codec, keys};
        let undecodable = |what: &str, error: residency_core::CodecError| {
            format!("a {what} in the snapshot does not decode: {error}")
        };
        if key.starts_with(keys::PLACEMENT_PREFIX) {
            let placement: residency_types::Placement =
                codec::decode(value).map_err(|error| undecodable("placement", error))?;
            self.placements.push((&placement).into());
        } else if scope == ExportScope::WholeState && key.starts_with(keys::LOCATION_PREFIX) {
            let location: residency_types::Location =
                codec::decode(value).map_err(|error| undecodable("location", error))?;
            self.locations.push((&location).into());
        } else if scope == ExportScope::WholeState && key.starts_with(keys::POLICY_PREFIX) {
            let policy: residency_types::Policy =
                codec::decode(value).map_err(|error| undecodable("policy", error))?;
            self.policies.push((&policy).into());
        }
        Ok(())
    }
}

/// Reads the snapshot `file` (at `revision`) in key order and hands `send` one page at a time;
/// stops when `send` says the receiver is gone. Runs on a blocking thread.
fn export_pages(
    file: std::fs::File,
    scope: ExportScope,
    send: impl Fn(Result<ExportPage, Status>) -> bool,
) {
    let mut reader = match residency_store::snapshot::open_snapshot(file) {
        Ok((reader, _)) => reader,
        Err(error) => {
            send(Err(Status::internal(format!(
                "reading the snapshot: {error}"
            ))));
            return;
        }
    };
    let mut page = ExportPage::default();
    loop {
        match reader.next_pair() {
            Ok(Some((key, value))) => {
                if let Err(error) = page.add(scope, &key, &value) {
                    send(Err(Status::internal(error)));
                    return;
                }
                if page.len() == EXPORT_PAGE_ITEMS && !send(Ok(std::mem::take(&mut page))) {
                    return;
                }
            }
            Ok(None) => break,
            Err(error) => {
                send(Err(Status::internal(format!(
                    "reading the snapshot: {error}"
                ))));
                return;
            }
        }
    }
    if page.len() > 0 {
        send(Ok(page));
    }
}

impl Node {
    /// Streams every placement of a fresh snapshot: one revision, no lock held while sending.
    pub async fn export_placements(&self) -> Result<ExportStream, ApiError> {
        use residency_proto::pb::ExportPlacementsChunk;
        let (revision, file) = self.fresh_snapshot().await?;
        let (sender, receiver) = mpsc::channel(BACKUP_CHUNKS_IN_FLIGHT_MAX);
        tokio::task::spawn_blocking(move || {
            let header = ExportPlacementsChunk {
                revision,
                placements: Vec::new(),
            };
            if sender.blocking_send(Ok(header)).is_err() {
                return;
            }
            export_pages(file, ExportScope::Placements, |page| {
                let chunk = page.map(|page| ExportPlacementsChunk {
                    revision,
                    placements: page.placements,
                });
                sender.blocking_send(chunk).is_ok()
            });
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    /// Streams the locations, policies and placements of one snapshot: a fresh one, or with
    /// `allow_recent` the node's newest if a watcher can still catch up from its revision.
    pub async fn list_state(&self, allow_recent: bool) -> Result<ListStateStream, ApiError> {
        use residency_proto::pb::ListStateChunk;
        let recent = if allow_recent {
            self.recent_snapshot().await?
        } else {
            None
        };
        let (revision, file) = match recent {
            Some(recent) => recent,
            None => self.fresh_snapshot().await?,
        };
        let (sender, receiver) = mpsc::channel(BACKUP_CHUNKS_IN_FLIGHT_MAX);
        tokio::task::spawn_blocking(move || {
            let header = ListStateChunk {
                revision,
                ..ListStateChunk::default()
            };
            if sender.blocking_send(Ok(header)).is_err() {
                return;
            }
            export_pages(file, ExportScope::WholeState, |page| {
                let chunk = page.map(|page| ListStateChunk {
                    revision,
                    locations: page.locations,
                    policies: page.policies,
                    placements: page.placements,
                });
                sender.blocking_send(chunk).is_ok()
            });
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    /// The node's newest snapshot, if it is within the newer half of the watch history: a
    /// watcher starting from its revision then has half the history's span to catch up.
    async fn recent_snapshot(&self) -> Result<Option<(u64, std::fs::File)>, ApiError> {
        let Some((meta, file)) = self
            .reader
            .open_current_snapshot()
            .map_err(ApiError::internal)?
        else {
            return Ok(None);
        };
        let revision = meta.last_log_id.map_or(0, |log_id| log_id.index);
        let (floor, applied) = self
            .reader
            .query(|view| Ok(residency_core::query::history_floor(view)?))
            .await
            .map_err(ApiError::internal)?;
        let compacted = residency_core::query::compacted_revision(applied, floor).0;
        let half_history = (applied.0 - compacted) / 2;
        Ok((revision >= compacted + half_history).then_some((revision, file)))
    }
}
