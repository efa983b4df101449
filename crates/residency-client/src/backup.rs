//! Taking a backup into a file, checked end to end.

use std::path::Path;

use residency_proto::pb;
use residency_proto::pb::backup_chunk::Part;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::{Client, ClientError, cluster_client};

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The node that made it, and the revision it stands at.
    pub node_id: u64,
    pub revision: u64,
    pub size_bytes: u64,
    pub sha256_hex: String,
}

fn protocol(message: &str) -> ClientError {
    ClientError::Protocol(message.to_string())
}

impl Client {
    /// Streams a backup from the first endpoint into `path`. The bytes go to `path.partial`
    /// first; only when their SHA-256 and size match the node's trailer is the file synced and
    /// renamed into place, so `path` never holds a partial or damaged backup.
    pub async fn backup_to(&self, path: &Path) -> Result<BackupSummary, ClientError> {
        let channel = self.channel(&self.endpoints()[0])?;
        let mut stream = cluster_client(channel)
            .max_decoding_message_size(1024 * 1024)
            .backup(pb::BackupRequest {})
            .await
            .map_err(ClientError::from_status)?
            .into_inner();
        let io = |error: std::io::Error| {
            ClientError::Protocol(format!("writing {}: {error}", path.display()))
        };
        let partial = std::path::PathBuf::from(format!("{}.partial", path.display()));
        let mut file = tokio::fs::File::create(&partial).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut written = 0_u64;
        let mut header = None;
        let mut trailer = None;
        while let Some(chunk) = stream.message().await.map_err(ClientError::from_status)? {
            match chunk.part {
                Some(Part::Header(first)) if header.is_none() && written == 0 => {
                    header = Some(first)
                }
                Some(Part::Data(data)) if header.is_some() && trailer.is_none() => {
                    hasher.update(&data);
                    written += data.len() as u64;
                    file.write_all(&data).await.map_err(io)?;
                }
                Some(Part::Trailer(last)) if header.is_some() && trailer.is_none() => {
                    trailer = Some(last)
                }
                _ => return Err(protocol("the backup stream is out of order")),
            }
        }
        let header = header.ok_or_else(|| protocol("the backup stream had no header"))?;
        let trailer =
            trailer.ok_or_else(|| protocol("the backup stream ended before its trailer"))?;
        let sha256_hex = hex::encode(hasher.finalize());
        if trailer.sha256_hex != sha256_hex
            || trailer.size_bytes != written
            || header.size_bytes != written
        {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(protocol(
                "the backup arrived damaged (its checksum or size does not match)",
            ));
        }
        file.sync_all().await.map_err(io)?;
        drop(file);
        tokio::fs::rename(&partial, path).await.map_err(io)?;
        Ok(BackupSummary {
            node_id: header.node_id,
            revision: header.revision,
            size_bytes: written,
            sha256_hex,
        })
    }
}

impl Client {
    /// Every placement at one revision, handed to `each` in user-id order, from the first
    /// endpoint. Returns the revision.
    pub async fn export_placements<F>(
        &self,
        mut each: F,
    ) -> Result<residency_types::Revision, ClientError>
    where
        F: FnMut(residency_types::Placement) -> Result<(), ClientError>,
    {
        let channel = self.channel(&self.endpoints()[0])?;
        let mut stream = crate::registry_client(channel)
            .export_placements(pb::ExportPlacementsRequest {})
            .await
            .map_err(ClientError::from_status)?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(ClientError::from_status)?
            .ok_or_else(|| protocol("the export ended before its first message"))?;
        let revision = residency_types::Revision(first.revision);
        for placement in first.placements {
            each(residency_types::Placement::try_from(placement)?)?;
        }
        while let Some(chunk) = stream.message().await.map_err(ClientError::from_status)? {
            for placement in chunk.placements {
                each(residency_types::Placement::try_from(placement)?)?;
            }
        }
        Ok(revision)
    }
}
