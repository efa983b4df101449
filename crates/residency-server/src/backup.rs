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

pub type BackupStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;

fn chunk(part: backup_chunk::Part) -> Result<BackupChunk, Status> {
    Ok(BackupChunk { part: Some(part) })
}

impl Node {
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

/// Placements per export message.
const EXPORT_PAGE_PLACEMENTS: usize = 1_000;

pub type ExportStream =
    Pin<Box<dyn Stream<Item = Result<residency_proto::pb::ExportPlacementsChunk, Status>> + Send>>;

impl Node {
    /// Streams every placement of a fresh snapshot: one revision, no lock held while sending.
    pub async fn export_placements(&self) -> Result<ExportStream, ApiError> {
        use residency_proto::pb::ExportPlacementsChunk;
        let (revision, file) = self.fresh_snapshot().await?;
        let (sender, receiver) = mpsc::channel(BACKUP_CHUNKS_IN_FLIGHT_MAX);
        tokio::task::spawn_blocking(move || {
            let send =
                |chunk: Result<ExportPlacementsChunk, Status>| sender.blocking_send(chunk).is_ok();
            if !send(Ok(ExportPlacementsChunk {
                revision,
                placements: Vec::new(),
            })) {
                return;
            }
            let read = residency_store::snapshot::SnapshotReader::open(file);
            let mut reader = match read {
                Ok((reader, _)) => reader,
                Err(error) => {
                    send(Err(Status::internal(format!(
                        "reading the snapshot: {error}"
                    ))));
                    return;
                }
            };
            let mut page = Vec::with_capacity(EXPORT_PAGE_PLACEMENTS);
            loop {
                match reader.next_pair() {
                    Ok(Some((key, value))) => {
                        if !key.starts_with(residency_core::keys::PLACEMENT_PREFIX) {
                            continue;
                        }
                        match residency_core::codec::decode::<residency_types::Placement>(&value) {
                            Ok(placement) => page.push((&placement).into()),
                            Err(error) => {
                                send(Err(Status::internal(format!(
                                    "a placement does not decode: {error}"
                                ))));
                                return;
                            }
                        }
                        if page.len() == EXPORT_PAGE_PLACEMENTS {
                            let full = std::mem::replace(
                                &mut page,
                                Vec::with_capacity(EXPORT_PAGE_PLACEMENTS),
                            );
                            if !send(Ok(ExportPlacementsChunk {
                                revision,
                                placements: full,
                            })) {
                                return;
                            }
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
            if !page.is_empty() {
                send(Ok(ExportPlacementsChunk {
                    revision,
                    placements: page,
                }));
            }
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }
}
