//! The node's audit file (`<data_dir>/audit.jsonl`): records appended by one writer thread,
//! chained by `residency_audit::Chain`, written and `fdatasync`ed in batches.
//!
//! Admin changes wait until their record is on disk before they are answered. Refusals and
//! denied checks are queued without waiting; past `AUDIT_QUEUE_RECORDS_MAX` queued records they
//! are counted in `residency_audit_dropped_total` and logged, not allowed to block the node.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use residency_audit::{AuditEntry, AuditRecord, Chain};
use tokio::sync::oneshot;

/// Records waiting for the writer at most.
pub const AUDIT_QUEUE_RECORDS_MAX: usize = 65_536;
/// Records written between two syncs at most.
const AUDIT_BATCH_RECORDS_MAX: usize = 4_096;
/// How much of the file's end is read at start to find where its chain stands, in bytes.
const AUDIT_TAIL_READ_BYTES: u64 = 2 * residency_audit::RECORD_LINE_BYTES_MAX as u64;
/// The longest subject, action, identity or address a record keeps, in bytes; longer ones are
/// cut (at a character boundary) and marked. Keeps every line far below
/// `residency_audit::RECORD_LINE_BYTES_MAX`, whatever a client sends.
pub const AUDIT_FIELD_BYTES_MAX: usize = 1_024;
/// The file's name in the data directory.
pub const AUDIT_FILE_NAME: &str = "audit.jsonl";

type Ack = oneshot::Sender<std::io::Result<()>>;

struct Job {
    entry: AuditEntry,
    ack: Option<Ack>,
}

/// The handle requests append through. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    sender: SyncSender<Job>,
    node_id: u64,
    path: Arc<PathBuf>,
    written: Arc<AtomicU64>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("action", &self.entry.action)
            .finish()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Where the file's chain stands, cutting off an incomplete last line (a write cut short by a
/// crash). Returns the chain and how many bytes were cut.
fn recover(file: &mut File, path: &Path) -> anyhow::Result<(Chain, u64)> {
    let length = file.metadata()?.len();
    let start = length.saturating_sub(AUDIT_TAIL_READ_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    // Reading from the middle of the file: skip to the first whole line. Records are far
    // shorter than the window, so a window without a line end is not a file we wrote.
    let skip = if start == 0 {
        0
    } else {
        match bytes.iter().position(|&b| b == b'\n') {
            Some(at) => at + 1,
            None => anyhow::bail!(
                "{}: its last {AUDIT_TAIL_READ_BYTES} bytes hold no line end; verify it with \
                 `residencyctl audit verify`, move it aside, and restart",
                path.display()
            ),
        }
    };
    let tail = residency_audit::tail(&bytes[skip..]).map_err(|message| {
        anyhow::anyhow!(
            "{}: {message}; verify it with `residencyctl audit verify`, move it aside, and restart",
            path.display()
        )
    })?;
    if tail.torn_bytes > 0 {
        file.set_len(length - tail.torn_bytes)?;
        file.sync_all()?;
    }
    let chain = tail.last.as_ref().map_or_else(Chain::default, Chain::after);
    Ok((chain, tail.torn_bytes))
}

/// `text`, or its first `AUDIT_FIELD_BYTES_MAX` bytes (to a character boundary) and a mark.
fn bounded(text: &str) -> String {
    if text.len() <= AUDIT_FIELD_BYTES_MAX {
        return text.to_string();
    }
    let mut end = AUDIT_FIELD_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

impl AuditLog {
    /// Opens (or creates) the audit file in `data_dir` and starts its writer thread.
    pub fn open(data_dir: &Path, node_id: u64) -> anyhow::Result<AuditLog> {
        let path = data_dir.join(AUDIT_FILE_NAME);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open the audit file {}", path.display()))?;
        let (chain, torn_bytes) = recover(&mut file, &path)?;
        tracing::info!(
            records = chain.next_seq - 1,
            last_hash = %chain.prev,
            "audit file opened"
        );
        let (sender, receiver) = sync_channel(AUDIT_QUEUE_RECORDS_MAX);
        let written = Arc::new(AtomicU64::new(chain.next_seq - 1));
        metrics::gauge!("residency_audit_records").set((chain.next_seq - 1) as f64);
        let thread_written = written.clone();
        std::thread::Builder::new()
            .name("residency-audit".to_string())
            .spawn(move || write_loop(file, chain, receiver, thread_written))
            .context("cannot start the audit writer")?;
        let log = AuditLog {
            sender,
            node_id,
            path: Arc::new(path),
            written,
        };
        if torn_bytes > 0 {
            tracing::warn!(
                torn_bytes,
                "the audit file ended in an incomplete line; cut it off"
            );
            log.queue(log.entry(
                "audit.repaired",
                "local",
                "",
                format!("{torn_bytes} bytes of an incomplete last line cut off at start"),
                "OK",
                0,
            ));
        }
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records written so far, in this file.
    pub fn records(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// A record of this node, now; the fields a client chose are cut to
    /// `AUDIT_FIELD_BYTES_MAX`. Hand it to `queue` or `record`.
    pub fn entry(
        &self,
        action: &str,
        identity: &str,
        remote: &str,
        subject: String,
        outcome: &str,
        revision: u64,
    ) -> AuditEntry {
        AuditEntry {
            at_ms: now_ms(),
            node: self.node_id,
            identity: bounded(identity),
            remote: bounded(remote),
            action: bounded(action),
            subject: bounded(&subject),
            outcome: bounded(outcome),
            revision,
        }
    }

    /// Queues a record without waiting for it; counted and logged if the queue is full.
    pub fn queue(&self, entry: AuditEntry) {
        let action = entry.action.clone();
        match self.sender.try_send(Job { entry, ack: None }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("residency_audit_dropped_total").increment(1);
                tracing::warn!(%action, "the audit queue is full: a record was dropped");
            }
            Err(TrySendError::Disconnected(_)) => {
                metrics::counter!("residency_audit_dropped_total").increment(1);
                tracing::error!(%action, "the audit writer has stopped: a record was dropped");
            }
        }
    }

    /// Appends a record and waits until it is on disk.
    pub async fn record(&self, entry: AuditEntry) {
        let action = entry.action.clone();
        let (ack, done) = oneshot::channel();
        let sender = self.sender.clone();
        let job = Job {
            entry,
            ack: Some(ack),
        };
        // `send` blocks while the queue is full: off the async threads.
        let sent = tokio::task::spawn_blocking(move || sender.send(job).is_ok())
            .await
            .unwrap_or(false);
        let result = if sent {
            done.await
                .unwrap_or_else(|_| Err(std::io::Error::other("the audit writer stopped")))
        } else {
            Err(std::io::Error::other("the audit writer stopped"))
        };
        if let Err(error) = result {
            metrics::counter!("residency_audit_write_errors_total").increment(1);
            tracing::error!(%error, %action, "an admin change could not be recorded in the audit file");
        }
    }
}

fn write_loop(mut file: File, mut chain: Chain, jobs: Receiver<Job>, written: Arc<AtomicU64>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < AUDIT_BATCH_RECORDS_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // The batch is sealed on a copy of the chain and written at once; if the write or the
        // sync fails, the file is cut back and the chain stays where the file ends.
        let mut sealed = chain.clone();
        let mut bytes = Vec::new();
        let mut acks = Vec::new();
        let lines = batch.len() as u64;
        for job in batch {
            let record: AuditRecord = sealed.append(job.entry);
            bytes.extend_from_slice(record.to_line().as_bytes());
            acks.extend(job.ack);
        }
        let result = file.metadata().map(|meta| meta.len()).and_then(|length| {
            let written = file.write_all(&bytes).and_then(|()| file.sync_data());
            if written.is_err() {
                // Best effort: a failing disk may refuse this too; the next start cuts a torn
                // line in any case.
                let _ = file.set_len(length);
            }
            written
        });
        match &result {
            Ok(()) => {
                chain = sealed;
                let total = written.fetch_add(lines, Ordering::Relaxed) + lines;
                metrics::gauge!("residency_audit_records").set(total as f64);
            }
            Err(error) => {
                metrics::counter!("residency_audit_write_errors_total").increment(1);
                tracing::error!(%error, records = lines, "cannot write the audit file");
            }
        }
        for ack in acks {
            let _ = ack.send(match &result {
                Ok(()) => Ok(()),
                Err(error) => Err(std::io::Error::new(error.kind(), error.to_string())),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_chain_across_restarts_and_a_torn_tail_is_cut_and_recorded() {
        let dir = tempfile::tempdir().expect("dir");
        let log = AuditLog::open(dir.path(), 1).expect("open");
        for n in 0..3 {
            log.record(log.entry("test.Action", "me", "here", format!("s{n}"), "OK", n))
                .await;
        }
        drop(log);
        let path = dir.path().join(AUDIT_FILE_NAME);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(b"{\"format\":1,\"seq\":4");
        std::fs::write(&path, &bytes).expect("write");
        let log = AuditLog::open(dir.path(), 1).expect("reopen");
        log.record(log.entry("test.Action", "me", "here", "s3".to_string(), "OK", 3))
            .await;
        let report =
            residency_audit::verify(std::io::BufReader::new(File::open(&path).expect("open")))
                .expect("verify");
        assert!(report.is_intact(), "{:?}", report.problems);
        assert_eq!(report.records, 5);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("audit.repaired"));
    }

    #[tokio::test]
    async fn fields_are_bounded_whatever_a_client_sends() {
        let dir = tempfile::tempdir().expect("dir");
        let log = AuditLog::open(dir.path(), 1).expect("open");
        let huge = "é".repeat(100_000);
        log.record(log.entry(&huge, &huge, &huge, huge.clone(), &huge, 1))
            .await;
        let text = std::fs::read_to_string(dir.path().join(AUDIT_FILE_NAME)).expect("read");
        assert!(
            text.len() < 6 * AUDIT_FIELD_BYTES_MAX,
            "{} bytes",
            text.len()
        );
        assert!(text.contains("(200000 bytes)"));
        let report = residency_audit::verify(text.as_bytes()).expect("verify");
        assert!(report.is_intact(), "{:?}", report.problems);
    }

    #[test]
    fn a_file_whose_tail_holds_no_line_end_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let long = "x".repeat(3 * residency_audit::RECORD_LINE_BYTES_MAX);
        std::fs::write(dir.path().join(AUDIT_FILE_NAME), long).expect("write");
        let error = AuditLog::open(dir.path(), 1).expect_err("refused");
        assert!(error.to_string().contains("no line end"), "{error}");
    }

    #[test]
    fn a_file_whose_last_line_is_not_a_record_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join(AUDIT_FILE_NAME), "garbage\n").expect("write");
        let error = AuditLog::open(dir.path(), 1).expect_err("refused");
        assert!(error.to_string().contains("audit verify"), "{error}");
    }
}
