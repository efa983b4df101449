//! A recorded history of operations on a few users, and a checker over it, in the shape of
//! etcd's robustness tests and Jepsen's register checks.
//!
//! Every write assigns a user with a reason no other write uses (`w-<client>-<seq>`), so a read
//! names exactly the write it saw. The registry orders the writes of a user by their revision
//! (`mod_revision`), and the checker first makes sure that order is one real time allows.
//! Writes the leader put into one log entry share its revision; they were concurrent (a write
//! answered before another was sent goes into an earlier entry), the entry applies them in some
//! order, and only the last of them is ever read: so writes may tie on a revision, a tie
//! between writes that real time orders is a violation, and so is a revision seen holding two
//! values. Then
//! linearizability of a register with unique values comes down to pairwise checks: no read sees
//! a write from its future, none misses a write that completed before it began, and reads never
//! go back in time against each other or against the writes that follow them.
//!
//! Outcomes: `Ok` (answered), `Failed` (refused for sure, never applied), `Unknown` (a timeout or
//! a lost connection: the write may or may not apply, at any time after it was sent). An
//! unknown write that some read saw counts as applied, at the revision it was seen with; one
//! nobody saw is left out.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// How a read asked to be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    Linearizable,
    /// At least this revision (the client's token).
    AtLeast(u64),
    Stale,
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    Write { value: String },
    Read { mode: ReadMode },
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A write: applied at `revision`. A read: saw `value` (None: no placement) written at
    /// `revision` (0 with no value), from state at `read_at`.
    Ok {
        value: Option<String>,
        revision: u64,
        read_at: u64,
    },
    Failed,
    Unknown,
}

/// One operation: who, on which user, what, when (nanoseconds since the run began) and how it
/// ended. `complete` is when the answer (or the timeout) came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub client: u32,
    pub key: String,
    pub kind: OpKind,
    pub invoke: u64,
    pub complete: u64,
    pub outcome: Outcome,
}

/// A way the history breaks the registry's promises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A read returned a value no write wrote, or one whose write was refused.
    PhantomValue { key: String, value: String },
    /// The same value seen with two revisions, or a write acknowledged at another revision than
    /// the one its value is read with, or two values at one revision.
    RevisionMismatch { key: String, detail: String },
    /// A write that completed before another was invoked got the later revision.
    WritesOutOfOrder {
        key: String,
        first: String,
        second: String,
    },
    /// A read saw a write that was invoked only after the read completed.
    ReadFromFuture { key: String, value: String },
    /// A read missed a write that completed before the read was invoked (a stale read).
    StaleRead {
        key: String,
        missed: String,
        saw: Option<String>,
        mode: ReadMode,
    },
    /// A read that began after another read completed saw an older write.
    NonMonotonicReads { key: String, detail: String },
    /// An AT_LEAST read answered from state older than its token, or missed a write at or
    /// below its token.
    BelowToken { key: String, detail: String },
    /// After healing, the last acknowledged write of a user is not what a read sees.
    LostWrite { key: String, value: String },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// A write as the checker sees it once outcomes are resolved: applied at `revision`.
#[derive(Debug, Clone)]
struct AppliedWrite {
    value: String,
    revision: u64,
    invoke: u64,
    /// `u64::MAX` for an unknown write that was observed: it may have completed any time.
    complete: u64,
}

/// Checks `history` and returns every violation found (empty: the history is consistent).
pub fn check(history: &[Op]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut violations = Vec::new();
    for (key, ops) in by_key {
        check_key(key, &ops, &mut violations);
    }
    violations
}

fn check_key(key: &str, ops: &[&Op], violations: &mut Vec<Violation>) {
    let key_string = key.to_string();
    // Every write by value, with what is known of its fate.
    let mut writes: HashMap<&str, &Op> = HashMap::new();
    for op in ops {
        if let OpKind::Write { value } = &op.kind {
            let previous = writes.insert(value.as_str(), op);
            assert!(
                previous.is_none(),
                "the workload wrote {value} twice: values must be unique"
            );
        }
    }
    // What reads saw: value -> revision, checked for consistency.
    let mut seen_at: HashMap<&str, u64> = HashMap::new();
    let mut value_at: HashMap<u64, &str> = HashMap::new();
    for op in ops {
        let (
            OpKind::Read { .. },
            Outcome::Ok {
                value, revision, ..
            },
        ) = (&op.kind, &op.outcome)
        else {
            continue;
        };
        let Some(value) = value else {
            continue;
        };
        match writes.get(value.as_str()) {
            None => violations.push(Violation::PhantomValue {
                key: key_string.clone(),
                value: value.clone(),
            }),
            Some(write) if write.outcome == Outcome::Failed => {
                violations.push(Violation::PhantomValue {
                    key: key_string.clone(),
                    value: value.clone(),
                });
            }
            Some(_) => {}
        }
        if let Some(previous) = seen_at.insert(value.as_str(), *revision)
            && previous != *revision
        {
            violations.push(Violation::RevisionMismatch {
                key: key_string.clone(),
                detail: format!("{value} seen at revisions {previous} and {revision}"),
            });
        }
        if let Some(other) = value_at.insert(*revision, value.as_str())
            && other != value
        {
            violations.push(Violation::RevisionMismatch {
                key: key_string.clone(),
                detail: format!("revision {revision} seen holding {other} and {value}"),
            });
        }
    }
    // The writes that applied, ordered by revision.
    let mut applied: Vec<AppliedWrite> = Vec::new();
    for (value, op) in &writes {
        match &op.outcome {
            Outcome::Ok { revision, .. } => {
                if let Some(seen) = seen_at.get(value)
                    && seen != revision
                {
                    violations.push(Violation::RevisionMismatch {
                        key: key_string.clone(),
                        detail: format!(
                            "{value} acknowledged at revision {revision}, read at {seen}"
                        ),
                    });
                }
                applied.push(AppliedWrite {
                    value: value.to_string(),
                    revision: *revision,
                    invoke: op.invoke,
                    complete: op.complete,
                });
            }
            Outcome::Unknown => {
                if let Some(revision) = seen_at.get(value) {
                    applied.push(AppliedWrite {
                        value: value.to_string(),
                        revision: *revision,
                        invoke: op.invoke,
                        complete: u64::MAX,
                    });
                }
            }
            Outcome::Failed => {}
        }
    }
    applied.sort_by_key(|write| write.revision);
    // Real time orders the writes: one that completed before another began has the lower
    // revision, never the same (writes that share an entry's revision were concurrent).
    for later in &applied {
        for earlier in &applied {
            if earlier.complete < later.invoke && earlier.revision >= later.revision {
                violations.push(Violation::WritesOutOfOrder {
                    key: key_string.clone(),
                    first: earlier.value.clone(),
                    second: later.value.clone(),
                });
            }
        }
    }
    let reads: Vec<(&Op, ReadMode, Option<&String>, u64, u64)> = ops
        .iter()
        .filter_map(|op| match (&op.kind, &op.outcome) {
            (
                OpKind::Read { mode },
                Outcome::Ok {
                    value,
                    revision,
                    read_at,
                },
            ) => Some((*op, *mode, value.as_ref(), *revision, *read_at)),
            _ => None,
        })
        .collect();
    for &(read, mode, value, revision, read_at) in &reads {
        // Never a write from the read's future, whatever the mode.
        if let Some(value) = value
            && let Some(write) = writes.get(value.as_str())
            && write.invoke > read.complete
        {
            violations.push(Violation::ReadFromFuture {
                key: key_string.clone(),
                value: value.clone(),
            });
        }
        match mode {
            ReadMode::Linearizable => {
                // Every write that completed before the read began is visible (or overwritten).
                for write in &applied {
                    if write.complete < read.invoke && write.revision > revision {
                        violations.push(Violation::StaleRead {
                            key: key_string.clone(),
                            missed: write.value.clone(),
                            saw: value.cloned(),
                            mode,
                        });
                    }
                }
                // A write that began after the read completed is not visible yet.
                for write in &applied {
                    if read.complete < write.invoke && write.revision <= revision {
                        violations.push(Violation::ReadFromFuture {
                            key: key_string.clone(),
                            value: value.cloned().unwrap_or_default(),
                        });
                    }
                }
            }
            ReadMode::AtLeast(token) => {
                if read_at < token {
                    violations.push(Violation::BelowToken {
                        key: key_string.clone(),
                        detail: format!("answered from revision {read_at}, token {token}"),
                    });
                }
                for write in &applied {
                    if write.revision <= token && write.revision > revision {
                        violations.push(Violation::BelowToken {
                            key: key_string.clone(),
                            detail: format!(
                                "token {token} but the read missed {} (revision {})",
                                write.value, write.revision
                            ),
                        });
                    }
                }
            }
            ReadMode::Stale => {}
        }
    }
    // Linearizable reads do not go back in time against each other.
    for &(first, first_mode, first_value, first_revision, _) in &reads {
        for &(second, second_mode, second_value, second_revision, _) in &reads {
            let both_linearizable =
                first_mode == ReadMode::Linearizable && second_mode == ReadMode::Linearizable;
            if both_linearizable
                && first.complete < second.invoke
                && second_revision < first_revision
            {
                violations.push(Violation::NonMonotonicReads {
                    key: key_string.clone(),
                    detail: format!(
                        "{first_value:?} (revision {first_revision}) then {second_value:?} \
                         (revision {second_revision})"
                    ),
                });
            }
        }
    }
}

/// After healing: `final_reads` are linearizable reads of every key made once all writes
/// ended. Each must see the key's newest acknowledged write, or a newer one.
pub fn check_final(history: &[Op], final_reads: &[Op]) -> Vec<Violation> {
    let mut violations = Vec::new();
    for read in final_reads {
        let Outcome::Ok { revision, .. } = read.outcome else {
            violations.push(Violation::LostWrite {
                key: read.key.clone(),
                value: "(the final read failed)".to_string(),
            });
            continue;
        };
        let newest = history
            .iter()
            .filter(|op| op.key == read.key)
            .filter_map(|op| match (&op.kind, &op.outcome) {
                (OpKind::Write { value }, Outcome::Ok { revision, .. }) => Some((*revision, value)),
                _ => None,
            })
            .max_by_key(|(revision, _)| *revision);
        if let Some((newest_revision, value)) = newest
            && revision < newest_revision
        {
            violations.push(Violation::LostWrite {
                key: read.key.clone(),
                value: value.clone(),
            });
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(client: u32, value: &str, invoke: u64, complete: u64, outcome: Outcome) -> Op {
        Op {
            client,
            key: "u".to_string(),
            kind: OpKind::Write {
                value: value.to_string(),
            },
            invoke,
            complete,
            outcome,
        }
    }

    fn applied(revision: u64) -> Outcome {
        Outcome::Ok {
            value: None,
            revision,
            read_at: revision,
        }
    }

    fn read(mode: ReadMode, invoke: u64, complete: u64, saw: Option<(&str, u64)>) -> Op {
        Op {
            client: 9,
            key: "u".to_string(),
            kind: OpKind::Read { mode },
            invoke,
            complete,
            outcome: Outcome::Ok {
                value: saw.map(|(value, _)| value.to_string()),
                revision: saw.map_or(0, |(_, revision)| revision),
                read_at: saw.map_or(0, |(_, revision)| revision) + 1,
            },
        }
    }

    const LIN: ReadMode = ReadMode::Linearizable;

    #[test]
    fn concurrent_writes_may_share_an_entrys_revision_and_only_one_is_read() {
        let history = vec![
            write(1, "a", 0, 5, applied(10)),
            write(2, "b", 1, 5, applied(10)),
            read(LIN, 6, 7, Some(("b", 10))),
            read(LIN, 8, 9, Some(("b", 10))),
        ];
        assert_eq!(check(&history), Vec::new());
        assert_eq!(
            check_final(&history, &[read(LIN, 20, 21, Some(("b", 10)))]),
            Vec::new()
        );
    }

    #[test]
    fn a_revision_shared_by_writes_that_real_time_orders_is_a_violation() {
        let history = vec![
            write(1, "a", 0, 1, applied(10)),
            write(2, "b", 2, 3, applied(10)),
        ];
        let violations = check(&history);
        assert_eq!(
            violations,
            vec![Violation::WritesOutOfOrder {
                key: "u".to_string(),
                first: "a".to_string(),
                second: "b".to_string(),
            }]
        );
    }

    #[test]
    fn both_writes_of_one_revision_read_is_a_violation() {
        let history = vec![
            write(1, "a", 0, 5, applied(10)),
            write(2, "b", 1, 5, applied(10)),
            read(LIN, 6, 7, Some(("a", 10))),
            read(LIN, 8, 9, Some(("b", 10))),
        ];
        let violations = check(&history);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(matches!(
            &violations[0],
            Violation::RevisionMismatch { detail, .. } if detail.contains("holding a and b")
        ));
    }

    #[test]
    fn a_sequential_history_passes() {
        let history = vec![
            read(LIN, 0, 1, None),
            write(1, "a", 2, 3, applied(10)),
            read(LIN, 4, 5, Some(("a", 10))),
            write(2, "b", 6, 7, applied(12)),
            read(ReadMode::AtLeast(12), 8, 9, Some(("b", 12))),
            read(ReadMode::Stale, 10, 11, Some(("a", 10))),
            read(LIN, 12, 13, Some(("b", 12))),
        ];
        assert_eq!(check(&history), Vec::new());
        assert_eq!(
            check_final(&history, &[read(LIN, 20, 21, Some(("b", 12)))]),
            Vec::new()
        );
    }

    #[test]
    fn concurrent_operations_may_order_either_way() {
        // The read overlaps the write: seeing it or not are both linearizable.
        let history = vec![
            write(1, "a", 0, 1, applied(5)),
            write(2, "b", 2, 10, applied(7)),
            read(LIN, 3, 4, Some(("a", 5))),
            read(LIN, 5, 6, Some(("b", 7))),
        ];
        assert_eq!(check(&history), Vec::new());
    }

    #[test]
    fn an_unknown_write_may_apply_late_or_never() {
        let history = vec![
            write(1, "a", 0, 1, applied(5)),
            write(2, "lost", 2, 3, Outcome::Unknown),
            write(3, "late", 4, 5, Outcome::Unknown),
            read(LIN, 6, 7, Some(("a", 5))),
            read(LIN, 8, 9, Some(("late", 9))),
        ];
        assert_eq!(check(&history), Vec::new());
    }

    #[test]
    fn a_stale_linearizable_read_is_caught() {
        let history = vec![
            write(1, "a", 0, 1, applied(5)),
            write(1, "b", 2, 3, applied(6)),
            read(LIN, 4, 5, Some(("a", 5))),
        ];
        assert!(matches!(
            check(&history).as_slice(),
            [Violation::StaleRead { missed, .. }] if missed == "b"
        ));
        // The same read marked STALE is allowed to be old.
        let history = vec![
            write(1, "a", 0, 1, applied(5)),
            write(1, "b", 2, 3, applied(6)),
            read(ReadMode::Stale, 4, 5, Some(("a", 5))),
        ];
        assert_eq!(check(&history), Vec::new());
    }

    #[test]
    fn a_lost_write_is_caught() {
        let history = vec![
            write(1, "a", 0, 1, applied(5)),
            write(1, "b", 2, 3, applied(6)),
        ];
        let final_reads = [read(LIN, 10, 11, Some(("a", 5)))];
        assert!(matches!(
            check_final(&history, &final_reads).as_slice(),
            [Violation::LostWrite { value, .. }] if value == "b"
        ));
    }

    #[test]
    fn a_phantom_value_is_caught() {
        let history = vec![
            write(1, "a", 0, 1, applied(5)),
            write(2, "refused", 2, 3, Outcome::Failed),
            read(ReadMode::Stale, 4, 5, Some(("never-written", 8))),
            read(ReadMode::Stale, 6, 7, Some(("refused", 9))),
        ];
        let violations = check(&history);
        assert_eq!(
            violations
                .iter()
                .filter(|v| matches!(v, Violation::PhantomValue { .. }))
                .count(),
            2,
            "{violations:?}"
        );
    }

    #[test]
    fn reads_going_back_in_time_are_caught() {
        let history = vec![
            write(1, "a", 0, 1, applied(5)),
            write(2, "b", 2, 20, applied(6)),
            read(LIN, 3, 4, Some(("b", 6))),
            read(LIN, 5, 6, Some(("a", 5))),
        ];
        assert!(
            check(&history)
                .iter()
                .any(|v| matches!(v, Violation::NonMonotonicReads { .. }))
        );
    }

    #[test]
    fn a_read_from_the_future_is_caught() {
        let history = vec![
            read(LIN, 0, 1, Some(("a", 5))),
            write(1, "a", 2, 3, applied(5)),
        ];
        assert!(
            check(&history)
                .iter()
                .any(|v| matches!(v, Violation::ReadFromFuture { .. }))
        );
    }

    #[test]
    fn an_at_least_read_below_its_token_is_caught() {
        let history = vec![
            write(1, "a", 0, 1, applied(5)),
            write(1, "b", 2, 3, applied(6)),
            read(ReadMode::AtLeast(6), 4, 5, Some(("a", 5))),
        ];
        assert!(
            check(&history)
                .iter()
                .any(|v| matches!(v, Violation::BelowToken { .. }))
        );
    }

    #[test]
    fn writes_ordered_against_real_time_are_caught() {
        let history = vec![
            write(1, "a", 0, 1, applied(9)),
            write(2, "b", 2, 3, applied(5)),
        ];
        assert!(
            check(&history)
                .iter()
                .any(|v| matches!(v, Violation::WritesOutOfOrder { .. }))
        );
    }

    #[test]
    fn a_value_seen_at_two_revisions_is_caught() {
        let history = vec![
            write(1, "a", 0, 1, applied(5)),
            read(ReadMode::Stale, 2, 3, Some(("a", 5))),
            read(ReadMode::Stale, 4, 5, Some(("a", 7))),
        ];
        assert!(
            check(&history)
                .iter()
                .any(|v| matches!(v, Violation::RevisionMismatch { .. }))
        );
    }
}
