//! Data-driven tests of the deterministic apply, run against the in-memory model.

use residency_types::limits::REQUEST_DEDUP_WINDOW_REVISIONS;
use residency_types::{
    CallerId, Command, Jurisdiction, LocationId, Outcome, ReasonText, Rejection, RequestId,
    Revision, UserId, WriteBody,
};

use crate::memory::MemoryState;

fn assign(request: &str, user: &str, location: &str, expected: Option<u64>) -> Command {
    command(
        request,
        WriteBody::Assign {
            user_id: UserId::parse(user).expect("valid user"),
            residency: Jurisdiction::US,
            location_id: LocationId::parse(location).expect("valid location"),
            expected_mod_revision: expected.map(Revision),
        },
    )
}

fn forget(request: &str, user: &str, expected: Option<u64>) -> Command {
    command(
        request,
        WriteBody::Forget {
            user_id: UserId::parse(user).expect("valid user"),
            expected_mod_revision: expected.map(Revision),
        },
    )
}

fn command(request: &str, body: WriteBody) -> Command {
    Command {
        request_id: RequestId::parse(request).expect("valid request id"),
        caller: CallerId::parse("test").expect("valid caller"),
        reason: ReasonText::parse("test").expect("valid reason"),
        stamped_at_ms: 1_700_000_000_000,
        body,
    }
}

/// Applies commands at revisions 1, 2, ... and returns the state and each outcome.
fn run(commands: &[Command]) -> (MemoryState, Vec<Option<Outcome>>) {
    let mut state = MemoryState::new();
    let outcomes = commands
        .iter()
        .enumerate()
        .map(|(index, command)| {
            state
                .apply(Revision(index as u64 + 1), Some(command))
                .outcome
        })
        .collect();
    (state, outcomes)
}

fn user(text: &str) -> UserId {
    UserId::parse(text).expect("valid user")
}

#[test]
fn assign_creates_then_updates_keeping_create_revision() {
    let (state, outcomes) = run(&[
        assign("r1", "alice", "us-east/pg-1", None),
        assign("r2", "alice", "us-west/pg-2", None),
    ]);
    assert!(matches!(
        &outcomes[0],
        Some(Outcome::Assigned { created: true, .. })
    ));
    assert!(matches!(
        &outcomes[1],
        Some(Outcome::Assigned { created: false, .. })
    ));
    let placement = state.lookup(&user("alice")).expect("alice is placed");
    assert_eq!(placement.location_id.as_str(), "us-west/pg-2");
    assert_eq!(
        (placement.create_revision, placement.mod_revision),
        (Revision(1), Revision(2))
    );
    assert_eq!(placement.epoch, 1);
    assert_eq!(placement.updated_at_ms, 1_700_000_000_000);
}

#[test]
fn expected_mod_revision_guards_assign_and_forget() {
    let cases: &[(&[Command], Option<Outcome>)] = &[
        // Revision 0 means "must not exist yet".
        (&[assign("r1", "bob", "l", Some(0))], None),
        (
            &[
                assign("r1", "bob", "l", None),
                assign("r2", "bob", "l", Some(0)),
            ],
            Some(Outcome::Rejected(Rejection::RevisionMismatch {
                expected: Revision(0),
                actual: Revision(1),
            })),
        ),
        (
            &[
                assign("r1", "bob", "l", None),
                assign("r2", "bob", "l", Some(1)),
            ],
            None,
        ),
        (
            &[assign("r1", "bob", "l", None), forget("r2", "bob", Some(7))],
            Some(Outcome::Rejected(Rejection::RevisionMismatch {
                expected: Revision(7),
                actual: Revision(1),
            })),
        ),
        (
            &[forget("r1", "nobody", None)],
            Some(Outcome::Rejected(Rejection::UserNotFound)),
        ),
    ];
    for (commands, expected_rejection) in cases {
        let (_, outcomes) = run(commands);
        let last = outcomes.last().expect("one outcome per command").clone();
        match expected_rejection {
            Some(rejection) => assert_eq!(last.as_ref(), Some(rejection), "{commands:?}"),
            None => assert!(
                !matches!(last, Some(Outcome::Rejected(_))),
                "{commands:?}: {last:?}"
            ),
        }
    }
}

#[test]
fn a_rejected_write_changes_no_placement() {
    let (before, _) = run(&[assign("r1", "carol", "l", None)]);
    let (after, _) = run(&[
        assign("r1", "carol", "l", None),
        assign("r2", "carol", "m", Some(5)),
    ]);
    assert_eq!(before.lookup(&user("carol")), after.lookup(&user("carol")));
}

#[test]
fn a_retried_request_returns_its_first_result_and_applies_once() {
    let first = assign("same", "dave", "us-east/pg-1", None);
    let (state, outcomes) = run(&[
        first.clone(),
        assign("other", "dave", "us-west/pg-9", None),
        first,
    ]);
    assert_eq!(
        outcomes[0], outcomes[2],
        "the retry answers the first result"
    );
    let placement = state.lookup(&user("dave")).expect("dave is placed");
    assert_eq!(
        placement.location_id.as_str(),
        "us-west/pg-9",
        "the retry did not apply again"
    );
    assert_eq!(placement.mod_revision, Revision(2));
}

#[test]
fn a_request_id_reused_for_another_write_is_rejected() {
    let (state, outcomes) = run(&[
        assign("id-1", "erin", "l", None),
        assign("id-1", "erin", "other-location", None),
    ]);
    assert_eq!(
        outcomes[1],
        Some(Outcome::Rejected(Rejection::RequestIdReused))
    );
    assert_eq!(
        state
            .lookup(&user("erin"))
            .expect("placed")
            .location_id
            .as_str(),
        "l"
    );
}

#[test]
fn forget_removes_the_placement() {
    let (state, outcomes) = run(&[
        assign("r1", "frank", "l", None),
        forget("r2", "frank", Some(1)),
    ]);
    assert_eq!(
        outcomes[1],
        Some(Outcome::Forgotten {
            user_id: user("frank")
        })
    );
    assert_eq!(state.lookup(&user("frank")), None);
}

#[test]
fn the_same_log_gives_the_same_digest_and_a_different_log_does_not() {
    let log: Vec<Command> = (0..200)
        .map(|n| match n % 5 {
            4 => forget(&format!("r{n}"), &format!("u{}", n - 1), None),
            _ => assign(
                &format!("r{n}"),
                &format!("u{n}"),
                &format!("us-east/pg-{}", n % 7),
                None,
            ),
        })
        .collect();
    let (first, _) = run(&log);
    let (second, _) = run(&log);
    assert_eq!(first.digest(), second.digest());
    let (shorter, _) = run(&log[..199]);
    assert_ne!(first.digest(), shorter.digest());
}

#[test]
fn request_ids_age_out_after_the_window() {
    let mut state = MemoryState::new();
    let first = assign("old", "gina", "l", None);
    state.apply(Revision(1), Some(&first));
    state.apply(Revision(REQUEST_DEDUP_WINDOW_REVISIONS), None);
    assert_eq!(
        state
            .apply(Revision(REQUEST_DEDUP_WINDOW_REVISIONS + 1), Some(&first))
            .revision,
        Revision(REQUEST_DEDUP_WINDOW_REVISIONS + 1),
        "past the window the id is forgotten, so the write applies as new"
    );
    let placement = state.lookup(&user("gina")).expect("placed");
    assert_eq!(
        placement.mod_revision,
        Revision(REQUEST_DEDUP_WINDOW_REVISIONS + 1)
    );
}
