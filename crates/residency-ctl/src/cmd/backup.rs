//! `residencyctl backup create FILE`.

use std::path::PathBuf;

use clap::Subcommand;
use residency_client::Client;
use serde_json::json;

use crate::Failure;
use crate::output::{self, OutputFormat};

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Streams a consistent backup of the whole state from a running cluster into FILE (from the
    /// first endpoint; nothing stops). The file is complete and checked (SHA-256 end to end)
    /// before it appears. Restore it with `residencyd restore`.
    ///
    /// Example: residencyctl backup create registry-2026-11-29.backup
    Create { file: PathBuf },
}

pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: BackupCommand,
) -> Result<(), Failure> {
    match command {
        BackupCommand::Create { file } => {
            let summary = client.backup_to(&file).await?;
            match format {
                OutputFormat::Json => output::json(&json!({
                    "file": file.display().to_string(),
                    "node_id": summary.node_id,
                    "revision": summary.revision,
                    "size_bytes": summary.size_bytes,
                    "sha256": summary.sha256_hex,
                })),
                OutputFormat::Table => output::line(&format!(
                    "backup of node {} at revision {} written to {} ({} bytes, sha256 {})",
                    summary.node_id,
                    summary.revision,
                    file.display(),
                    summary.size_bytes,
                    summary.sha256_hex
                )),
            }
            Ok(())
        }
    }
}
