//! `residencyctl audit`: check a node's audit file, and show its last records. Offline: copy
//! the file from the node (`<data_dir>/audit.jsonl`), or run on the node's host.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use residency_audit::AuditRecord;

use crate::Failure;
use crate::output::OutputFormat;

/// Records `audit tail` prints at most.
const TAIL_RECORDS_MAX: usize = 100_000;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recomputes the hash chain of audit files: exit 0 if every record is intact and in
    /// place, 1 with each problem (an edited, removed, added or moved record) otherwise. Prints
    /// the last record's seq and hash: compare them with the node's `audit file opened` log line
    /// or an earlier copy to see a cut-off tail.
    ///
    /// Example: residencyctl audit verify data/node1/audit.jsonl
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Prints the last records of an audit file.
    ///
    /// Example: residencyctl audit tail data/node1/audit.jsonl -n 20
    Tail {
        file: PathBuf,
        #[arg(long, short = 'n', default_value_t = 20)]
        count: usize,
    },
}

fn open(path: &Path) -> Result<BufReader<File>, Failure> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|error| Failure {
            exit_code: 1,
            message: format!("cannot read {}: {error}", path.display()),
        })
}

fn verify(files: &[PathBuf], output: OutputFormat) -> Result<(), Failure> {
    let mut broken = 0;
    let mut reports = Vec::new();
    for path in files {
        let report = residency_audit::verify(open(path)?).map_err(|error| Failure {
            exit_code: 1,
            message: format!("cannot read {}: {error}", path.display()),
        })?;
        if !report.is_intact() {
            broken += 1;
        }
        match output {
            OutputFormat::Json => reports.push(serde_json::json!({
                "file": path.display().to_string(),
                "intact": report.is_intact(),
                "records": report.records,
                "last_seq": report.last_seq,
                "last_hash": report.last_hash,
                "problems": report.problems.iter().map(|p| serde_json::json!({"line": p.line, "message": p.message})).collect::<Vec<_>>(),
            })),
            OutputFormat::Table => {
                let verdict = if report.is_intact() { "intact" } else { "BROKEN" };
                println!(
                    "{}: {verdict}, {} records, last seq {} hash {}",
                    path.display(),
                    report.records,
                    report.last_seq,
                    report.last_hash
                );
                for problem in &report.problems {
                    println!("  line {}: {}", problem.line, problem.message);
                }
            }
        }
    }
    if output == OutputFormat::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).expect("a report serializes")
        );
    }
    if broken > 0 {
        return Err(Failure {
            exit_code: 1,
            message: format!(
                "AUDIT_CHAIN_BROKEN: {broken} of {} file(s) failed verification",
                files.len()
            ),
        });
    }
    Ok(())
}

fn tail(path: &Path, count: usize, output: OutputFormat) -> Result<(), Failure> {
    use std::io::BufRead;
    let count = count.min(TAIL_RECORDS_MAX);
    let mut last: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in open(path)?.lines() {
        let line = line.map_err(|error| Failure {
            exit_code: 1,
            message: format!("cannot read {}: {error}", path.display()),
        })?;
        if last.len() == count {
            last.pop_front();
        }
        if count > 0 {
            last.push_back(line);
        }
    }
    for line in last {
        match (output, serde_json::from_str::<AuditRecord>(&line)) {
            (OutputFormat::Json, _) | (_, Err(_)) => println!("{line}"),
            (OutputFormat::Table, Ok(record)) => {
                let entry = &record.entry;
                println!(
                    "{:>6}  {}  node {}  {}  {}  {}  {}  rev {}",
                    record.seq,
                    entry.at_ms,
                    entry.node,
                    entry.identity,
                    entry.action,
                    entry.outcome,
                    entry.subject,
                    entry.revision
                );
            }
        }
    }
    Ok(())
}

pub fn run(command: AuditCommand, output: OutputFormat) -> Result<(), Failure> {
    match command {
        AuditCommand::Verify { files } => verify(&files, output),
        AuditCommand::Tail { file, count } => tail(&file, count, output),
    }
}
