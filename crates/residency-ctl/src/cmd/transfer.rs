//! `residencyctl user import FILE` and `user export`: bulk placements in and out.
//!
//! Import streams the file twice, holding one batch per request in flight: first to count rows
//! and hash the content, then to send atomic batches whose request ids derive from that hash and
//! the batch's first row, so running the same import again applies nothing twice. A batch the
//! registry refuses names its bad items; those go to the rejects file with their reasons and the
//! rest of the batch is sent again under a derived id.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use residency_client::{Client, ClientError, WriteOptions};
use residency_types::limits::BATCH_ASSIGN_ITEMS_MAX;
use residency_types::{AssignItem, Jurisdiction, LocationId, ReasonCode, UserId};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use crate::Failure;
use crate::output::{self, OutputFormat};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// `user_id,residency,location_id` per line; a header line with those names is skipped.
    Csv,
    /// One JSON object per line: {"user_id": .., "residency": .., "location_id": ..}.
    Jsonl,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    file: PathBuf,
    /// The file's format; by default from its extension (.csv, otherwise JSON lines).
    #[arg(long, value_enum)]
    format: Option<ImportFormat>,
    /// Where refused rows go, one JSON object each (default: FILE.rejects.jsonl).
    #[arg(long)]
    rejects: Option<PathBuf>,
    /// Rows per atomic batch.
    #[arg(long, default_value_t = BATCH_ASSIGN_ITEMS_MAX)]
    batch_size: usize,
    /// Batches sent at once.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Why, recorded with every placement.
    #[arg(long, default_value = "bulk import")]
    reason: String,
}

/// Rounds of re-sending a batch without its refused items.
const RESUBMIT_ROUNDS_MAX: usize = 3;
const PROGRESS_INTERVAL_MS: u64 = 1_000;
/// Batches sent at once, at most.
const IN_FLIGHT_MAX: usize = 64;
/// A batch is sent once its ids add up to this many bytes, whatever its row count, so that it
/// stays below the registry's command size limit (64 KiB) with room for the rest.
const BATCH_ID_BYTES_MAX: usize = 40 * 1024;

fn row_bytes(item: &AssignItem) -> usize {
    item.user_id.as_str().len() + item.location_id.as_str().len() + 16
}

struct Row {
    line: usize,
    item: AssignItem,
}

struct Rejected {
    line: usize,
    user_id: String,
    reason: String,
    message: String,
}

fn parse_line(
    text: &str,
    format: ImportFormat,
) -> Result<Option<AssignItem>, (String, String, String)> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let (user_id, residency, location_id) = match format {
        ImportFormat::Csv => {
            let fields: Vec<&str> = text.split(',').map(str::trim).collect();
            if fields == ["user_id", "residency", "location_id"] {
                return Ok(None);
            }
            let [user_id, residency, location_id] = fields[..] else {
                return Err((
                    String::new(),
                    "INVALID_ARGUMENT".into(),
                    "expected user_id,residency,location_id".into(),
                ));
            };
            (
                user_id.to_string(),
                residency.to_string(),
                location_id.to_string(),
            )
        }
        ImportFormat::Jsonl => {
            let value: serde_json::Value = serde_json::from_str(text).map_err(|error| {
                (
                    String::new(),
                    "INVALID_ARGUMENT".to_string(),
                    format!("not JSON: {error}"),
                )
            })?;
            let field = |name: &str| {
                value
                    .get(name)
                    .and_then(|field| field.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            (field("user_id"), field("residency"), field("location_id"))
        }
    };
    let invalid = |error: residency_types::ValidationError| {
        (user_id.clone(), error.code.to_string(), error.to_string())
    };
    Ok(Some(AssignItem {
        user_id: UserId::parse(user_id.clone()).map_err(invalid)?,
        residency: Jurisdiction::parse(&residency).map_err(invalid)?,
        location_id: LocationId::parse(location_id.clone()).map_err(invalid)?,
        expected_mod_revision: None,
    }))
}

/// Counts the rows and hashes the content, for progress and for the batches' request ids.
fn survey(path: &Path) -> Result<(usize, String), Failure> {
    let file = std::fs::File::open(path).map_err(|error| Failure {
        exit_code: 2,
        message: format!("{}: {error}", path.display()),
    })?;
    let mut hasher = Sha256::new();
    let mut rows = 0;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|error| Failure {
            exit_code: 1,
            message: format!("{}: {error}", path.display()),
        })?;
        hasher.update(line.as_bytes());
        hasher.update(b"\n");
        rows += 1;
    }
    Ok((rows, hex::encode(&hasher.finalize()[..8])))
}

/// Sends one batch, re-sending it without refused items; returns applied and refused rows.
async fn send_batch(
    client: Arc<Client>,
    id: String,
    mut rows: Vec<Row>,
    reason: String,
) -> (usize, Vec<Rejected>) {
    let mut rejected = Vec::new();
    for round in 0..=RESUBMIT_ROUNDS_MAX {
        if rows.is_empty() {
            break;
        }
        let request_id = if round == 0 {
            id.clone()
        } else {
            format!("{id}-r{round}")
        };
        let items: Vec<AssignItem> = rows.iter().map(|row| row.item.clone()).collect();
        let options = WriteOptions {
            request_id: Some(request_id),
            reason: reason.clone(),
            ..WriteOptions::default()
        };
        match client.batch_assign(&items, Some(options)).await {
            Ok(_) => return (rows.len(), rejected),
            Err(ClientError::Status {
                reason: Some(ReasonCode::BatchRefused),
                refused_items,
                ..
            }) if !refused_items.is_empty() && round < RESUBMIT_ROUNDS_MAX => {
                let refused: std::collections::BTreeMap<usize, (String, String)> = refused_items
                    .into_iter()
                    .map(|(index, code, message)| (index as usize, (code, message)))
                    .collect();
                let mut kept = Vec::with_capacity(rows.len());
                for (index, row) in rows.into_iter().enumerate() {
                    match refused.get(&index) {
                        Some((code, message)) => rejected.push(Rejected {
                            line: row.line,
                            user_id: row.item.user_id.to_string(),
                            reason: code.clone(),
                            message: message.clone(),
                        }),
                        None => kept.push(row),
                    }
                }
                rows = kept;
            }
            Err(error) => {
                let code = error
                    .reason()
                    .map_or_else(|| "UNAVAILABLE".to_string(), |code| code.to_string());
                let message = error.to_string();
                rejected.extend(rows.drain(..).map(|row| Rejected {
                    line: row.line,
                    user_id: row.item.user_id.to_string(),
                    reason: code.clone(),
                    message: message.clone(),
                }));
            }
        }
    }
    (0, rejected)
}

fn write_rejects(out: &mut impl Write, rejects: &[Rejected]) -> std::io::Result<()> {
    for reject in rejects {
        let line = json!({ "row": reject.line, "user_id": reject.user_id, "reason": reject.reason, "message": reject.message });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

pub async fn import(client: Client, format: OutputFormat, args: ImportArgs) -> Result<(), Failure> {
    let file_format =
        args.format.unwrap_or_else(
            || match args.file.extension().and_then(|ext| ext.to_str()) {
                Some("csv") => ImportFormat::Csv,
                _ => ImportFormat::Jsonl,
            },
        );
    if args.batch_size == 0
        || args.batch_size > BATCH_ASSIGN_ITEMS_MAX
        || args.in_flight == 0
        || args.in_flight > IN_FLIGHT_MAX
    {
        return Err(Failure {
            exit_code: 2,
            message: format!(
                "--batch-size is 1..={BATCH_ASSIGN_ITEMS_MAX} and --in-flight 1..={IN_FLIGHT_MAX}"
            ),
        });
    }
    let (total_lines, content_id) = survey(&args.file)?;
    let rejects_path = args
        .rejects
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.rejects.jsonl", args.file.display())));
    let io = |error: std::io::Error| Failure {
        exit_code: 1,
        message: format!("{error}"),
    };
    let mut rejects_file =
        std::io::BufWriter::new(std::fs::File::create(&rejects_path).map_err(io)?);
    let client = Arc::new(client);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let (mut applied, mut refused, mut lines_done) = (0_usize, 0_usize, 0_usize);
    let mut in_flight: JoinSet<(usize, usize, Vec<Rejected>)> = JoinSet::new();
    let reader = BufReader::new(std::fs::File::open(&args.file).map_err(io)?);
    let mut batch: Vec<Row> = Vec::with_capacity(args.batch_size);
    let mut batch_bytes = 0_usize;
    let mut lines = reader.lines().enumerate().peekable();
    loop {
        let line = lines.next();
        if let Some((index, text)) = &line {
            let text = text.as_ref().map_err(|error| Failure {
                exit_code: 1,
                message: error.to_string(),
            })?;
            match parse_line(text, file_format) {
                Ok(Some(item)) => {
                    batch_bytes += row_bytes(&item);
                    batch.push(Row {
                        line: index + 1,
                        item,
                    });
                }
                Ok(None) => lines_done += 1,
                Err((user_id, reason, message)) => {
                    lines_done += 1;
                    refused += 1;
                    write_rejects(
                        &mut rejects_file,
                        &[Rejected {
                            line: index + 1,
                            user_id,
                            reason,
                            message,
                        }],
                    )
                    .map_err(io)?;
                }
            }
        }
        let full = batch.len() == args.batch_size
            || batch_bytes >= BATCH_ID_BYTES_MAX
            || (line.is_none() && !batch.is_empty());
        if full {
            let first_line = batch[0].line;
            let rows = std::mem::take(&mut batch);
            batch_bytes = 0;
            let count = rows.len();
            let id = format!("import-{content_id}-{first_line}");
            let (client, reason) = (client.clone(), args.reason.clone());
            in_flight.spawn(async move {
                let (done, rejected) = send_batch(client, id, rows, reason).await;
                (count, done, rejected)
            });
        }
        while in_flight.len() >= args.in_flight || (line.is_none() && !in_flight.is_empty()) {
            let (count, done, rejected) = in_flight
                .join_next()
                .await
                .expect("a batch is in flight")
                .expect("batch task");
            lines_done += count;
            applied += done;
            refused += rejected.len();
            write_rejects(&mut rejects_file, &rejected).map_err(io)?;
            if last_progress.elapsed() >= Duration::from_millis(PROGRESS_INTERVAL_MS) {
                last_progress = Instant::now();
                let rate = lines_done as f64 / started.elapsed().as_secs_f64().max(0.001);
                let eta = total_lines.saturating_sub(lines_done) as f64 / rate.max(1.0);
                eprintln!(
                    "{lines_done}/{total_lines} rows  {rate:.0} rows/s  ETA {eta:.0} s  ({refused} refused)"
                );
            }
        }
        if line.is_none() {
            break;
        }
    }
    rejects_file.flush().map_err(io)?;
    let elapsed = started.elapsed().as_secs_f64();
    let rate = applied as f64 / elapsed.max(0.001);
    match format {
        OutputFormat::Json => output::json(&json!({
            "file": args.file.display().to_string(),
            "applied": applied,
            "refused": refused,
            "rejects_file": rejects_path.display().to_string(),
            "seconds": elapsed,
            "rows_per_second": rate,
        })),
        OutputFormat::Table => output::line(&format!(
            "imported {applied} rows, refused {refused} (see {}), in {elapsed:.1} s: {rate:.0} rows/s",
            rejects_path.display()
        )),
    }
    Ok(())
}

pub async fn export(client: &Client, file: Option<PathBuf>) -> Result<(), Failure> {
    let io = |error: std::io::Error| Failure {
        exit_code: 1,
        message: error.to_string(),
    };
    let mut out: Box<dyn Write> = match &file {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(io)?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut count = 0_u64;
    let mut failed = None;
    let revision = client
        .export_placements(|placement| {
            let line = crate::cmd::user::placement_json(&placement);
            if let Err(error) = writeln!(out, "{line}") {
                failed.get_or_insert(error);
            }
            count += 1;
            Ok(())
        })
        .await?;
    if let Some(error) = failed {
        return Err(io(error));
    }
    out.flush().map_err(io)?;
    eprintln!("exported {count} placements at revision {revision}");
    Ok(())
}
