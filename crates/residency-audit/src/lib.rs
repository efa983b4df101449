//! The audit file: one JSON record per line, each chained to the one before by a SHA-256 hash.
//!
//! A node appends a record for every admin change it serves, every request its authorization
//! refuses, and every access check it answers with a deny. The file is the one place where user
//! ids appear in clear (ordinary logs never hold them), so it is written only by the node and
//! read by operators.
//!
//! Record `n` holds `prev`, the hash of record `n - 1` (all zeros for the first), and `hash`, the
//! SHA-256 of `prev` and the record's own fields. [`verify`] recomputes the chain: an edited
//! record no longer matches its hash, a deleted one leaves a gap in `seq` and a `prev` that does
//! not match, two swapped ones break `seq` order and both links. What a chain alone cannot show
//! is a cut-off tail: compare the last `seq` and `hash` with the node's own (its log line
//! `audit file opened` and the `residency_audit_records` gauge) or with an earlier copy.
//!
//! This crate is pure: it builds and checks records; the node's writer does the file IO.

use std::io::{BufRead, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest line a verifier reads, in bytes: a record's fields are bounded far below it.
pub const RECORD_LINE_BYTES_MAX: usize = 64 * 1024;
/// The `prev` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The record format; a verifier refuses records of another.
pub const RECORD_FORMAT: u32 = 1;

/// What happened, as the node reports it; the chain fields are added when it is appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Milliseconds since 1970, by the node's clock.
    pub at_ms: u64,
    /// The node that served the request.
    pub node: u64,
    /// The caller's certificate identity, or `anonymous`.
    pub identity: String,
    /// The caller's address as the node saw it.
    pub remote: String,
    /// The RPC, as `Service/Method`.
    pub action: String,
    /// What the request was about: a user id, a location id, a jurisdiction, a node id; empty
    /// when it names nothing.
    pub subject: String,
    /// `OK`, `DENY:<deny reason>` for a denied access check, or the reason code of a refusal.
    pub outcome: String,
    /// The revision the answer carried, 0 when it carried none.
    pub revision: u64,
}

/// A record as it stands in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub format: u32,
    /// 1 for the file's first record, then one more per record.
    pub seq: u64,
    #[serde(flatten)]
    pub entry: AuditEntry,
    pub prev: String,
    pub hash: String,
}

/// The fields a record's hash covers, in a fixed order.
#[derive(Serialize)]
struct Hashed<'a> {
    format: u32,
    seq: u64,
    entry: &'a AuditEntry,
    prev: &'a str,
}

fn hash_of(format: u32, seq: u64, entry: &AuditEntry, prev: &str) -> String {
    let body = serde_json::to_vec(&Hashed {
        format,
        seq,
        entry,
        prev,
    })
    .expect("an audit entry always serializes");
    let mut hasher = Sha256::new();
    hasher.update(prev.as_bytes());
    hasher.update(b"\n");
    hasher.update(&body);
    hex::encode(hasher.finalize())
}

/// Where the chain stands: the next record's `seq` and `prev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub next_seq: u64,
    pub prev: String,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            next_seq: 1,
            prev: GENESIS_HASH.to_string(),
        }
    }
}

impl Chain {
    /// The chain after `record`.
    pub fn after(record: &AuditRecord) -> Chain {
        Chain {
            next_seq: record.seq.saturating_add(1),
            prev: record.hash.clone(),
        }
    }

    /// Seals `entry` as the next record and moves the chain past it.
    pub fn append(&mut self, entry: AuditEntry) -> AuditRecord {
        let hash = hash_of(RECORD_FORMAT, self.next_seq, &entry, &self.prev);
        let record = AuditRecord {
            format: RECORD_FORMAT,
            seq: self.next_seq,
            entry,
            prev: std::mem::replace(&mut self.prev, hash.clone()),
            hash,
        };
        self.next_seq = self.next_seq.saturating_add(1);
        record
    }
}

impl AuditRecord {
    /// The record as one line of the file, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("an audit record always serializes");
        line.push('\n');
        line
    }

    /// Whether `hash` matches the record's fields.
    pub fn hash_matches(&self) -> bool {
        hash_of(self.format, self.seq, &self.entry, &self.prev) == self.hash
    }
}

/// One thing wrong with a file, at a line (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: u64,
    pub message: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    pub records: u64,
    /// The last record's `seq` and `hash`: compare them with the node's to see a cut-off tail.
    pub last_seq: u64,
    pub last_hash: String,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks a whole audit file: every line a record, every hash its content's, every record
/// linked to the one before, `seq` from 1 without gaps. Reading stops with a problem at a line
/// longer than [`RECORD_LINE_BYTES_MAX`]; an IO error is returned as such.
pub fn verify(mut input: impl BufRead) -> std::io::Result<Report> {
    let mut report = Report {
        last_hash: GENESIS_HASH.to_string(),
        ..Report::default()
    };
    let mut expected = Chain::default();
    let mut line_number = 0u64;
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        let read = Read::take(input.by_ref(), RECORD_LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut buffer)?;
        if read == 0 {
            break;
        }
        line_number += 1;
        let problem = |message: String| Problem {
            line: line_number,
            message,
        };
        if buffer.last() != Some(&b'\n') {
            let message = if buffer.len() > RECORD_LINE_BYTES_MAX {
                format!("longer than {RECORD_LINE_BYTES_MAX} bytes; stopped reading")
            } else {
                "the last line is incomplete (a write cut short, or a cut-off file)".to_string()
            };
            report.problems.push(problem(message));
            break;
        }
        let record: AuditRecord = match serde_json::from_slice(&buffer[..buffer.len() - 1]) {
            Ok(record) => record,
            Err(error) => {
                report
                    .problems
                    .push(problem(format!("not an audit record: {error}")));
                // The next record cannot link to this line; expect what it would have set.
                expected.next_seq = expected.next_seq.saturating_add(1);
                continue;
            }
        };
        report.records += 1;
        if record.format != RECORD_FORMAT {
            report.problems.push(problem(format!(
                "record format {} is not {RECORD_FORMAT}",
                record.format
            )));
        }
        if !record.hash_matches() {
            report.problems.push(problem(format!(
                "record {}: its hash does not match its content (the record was edited)",
                record.seq
            )));
        }
        if record.seq != expected.next_seq {
            report.problems.push(problem(format!(
                "record {} where record {} belongs (a record was removed, added or moved)",
                record.seq, expected.next_seq
            )));
        }
        if record.prev != expected.prev {
            report.problems.push(problem(format!(
                "record {} does not link to the record before it (a record was removed, added or moved)",
                record.seq
            )));
        }
        expected = Chain::after(&record);
        report.last_seq = record.seq;
        report.last_hash = record.hash;
    }
    Ok(report)
}

/// The file's last record, for a writer that reopens it: `None` for an empty file. A final line
/// without its newline (a write cut short by a crash) is reported as `torn_bytes` for the writer
/// to cut off and record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    pub last: Option<AuditRecord>,
    /// Bytes after the last complete line.
    pub torn_bytes: u64,
}

/// Reads where a file's chain ends, from its bytes.
pub fn tail(bytes: &[u8]) -> Result<Tail, String> {
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => end + 1,
        None => 0,
    };
    let torn_bytes = (bytes.len() - complete) as u64;
    if complete == 0 {
        return Ok(Tail {
            last: None,
            torn_bytes,
        });
    }
    let start = bytes[..complete - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    let record: AuditRecord = serde_json::from_slice(&bytes[start..complete - 1])
        .map_err(|error| format!("the last complete line is not an audit record: {error}"))?;
    Ok(Tail {
        last: Some(record),
        torn_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> AuditEntry {
        AuditEntry {
            at_ms: 1_700_000_000_000 + n,
            node: 1,
            identity: "spiffe://residency.local/operator/alice".to_string(),
            remote: "127.0.0.1:5000".to_string(),
            action: "residency.v1.Catalog/PutPolicy".to_string(),
            subject: format!("user-{n}"),
            outcome: "OK".to_string(),
            revision: n,
        }
    }

    fn file(count: u64) -> Vec<String> {
        let mut chain = Chain::default();
        (1..=count)
            .map(|n| chain.append(entry(n)).to_line())
            .collect()
    }

    fn check(lines: &[String]) -> Report {
        verify(lines.concat().as_bytes()).expect("in memory")
    }

    #[test]
    fn an_untouched_file_verifies() {
        let lines = file(5);
        let report = check(&lines);
        assert!(report.is_intact(), "{:?}", report.problems);
        assert_eq!((report.records, report.last_seq), (5, 5));
        assert!(check(&[]).is_intact());
        let tail = tail(lines.concat().as_bytes()).expect("tail");
        assert_eq!(tail.last.expect("last").hash, report.last_hash);
        assert_eq!(tail.torn_bytes, 0);
    }

    #[test]
    fn an_edited_record_is_detected() {
        let mut lines = file(5);
        lines[2] = lines[2].replace("user-3", "user-9");
        let report = check(&lines);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].line, 3);
        assert!(report.problems[0].message.contains("edited"));
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
        let mut lines = file(5);
        let mut record: AuditRecord = serde_json::from_str(lines[2].trim_end()).expect("record");
        record.entry.outcome = "PERMISSION_DENIED".to_string();
        record.hash = hash_of(record.format, record.seq, &record.entry, &record.prev);
        lines[2] = record.to_line();
        let report = check(&lines);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].line, 4);
    }

    #[test]
    fn a_deleted_record_is_detected() {
        let mut lines = file(5);
        lines.remove(1);
        let report = check(&lines);
        assert!(!report.is_intact());
        assert!(report.problems.iter().all(|p| p.line == 2));
        let mut first_gone = file(3);
        first_gone.remove(0);
        assert!(!check(&first_gone).is_intact());
    }

    #[test]
    fn swapped_records_are_detected() {
        let mut lines = file(5);
        lines.swap(1, 3);
        let report = check(&lines);
        let lines_at_fault: Vec<u64> = report.problems.iter().map(|p| p.line).collect();
        assert!(lines_at_fault.contains(&2) && lines_at_fault.contains(&4));
    }

    #[test]
    fn garbage_and_torn_lines_are_problems_not_panics() {
        let mut lines = file(3);
        lines.insert(1, "not json\n".to_string());
        assert!(!check(&lines).is_intact());
        let mut torn = file(3).concat();
        torn.truncate(torn.len() - 10);
        let report = verify(torn.as_bytes()).expect("in memory");
        assert!(report.problems[0].message.contains("incomplete"));
        let tail = tail(torn.as_bytes()).expect("tail");
        assert_eq!(tail.last.expect("last").seq, 2);
        assert!(tail.torn_bytes > 0);
        let long = "x".repeat(RECORD_LINE_BYTES_MAX + 10);
        assert!(!verify(long.as_bytes()).expect("in memory").is_intact());
    }
}
