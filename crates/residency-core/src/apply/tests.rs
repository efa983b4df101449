//! Data-driven tests of the deterministic apply, run against the in-memory model: the rules
//! that keep data where its residency allows, moves, the catalog, policies and idempotence.

use std::collections::BTreeSet;

use residency_types::command::ItemRejection;
use residency_types::limits::REQUEST_DEDUP_WINDOW_REQUESTS;
use residency_types::{
    AccessOperation, ApplyResult, AssignItem, CallerId, Command, Decision, DenyReason,
    Jurisdiction, Labels, LocationId, LocationState, Outcome, PlacementState, ReasonText,
    Rejection, RequestId, Revision, UserId, WriteBody,
};

use crate::memory::MemoryState;
use crate::requests::RequestIndex;
use crate::{check_access, dry_run_policy};

fn user(text: &str) -> UserId {
    UserId::parse(text).expect("valid user")
}

fn loc(text: &str) -> LocationId {
    LocationId::parse(text).expect("valid location")
}

fn jur(text: &str) -> Jurisdiction {
    Jurisdiction::parse(text).expect("valid jurisdiction")
}

fn set(codes: &[&str]) -> BTreeSet<Jurisdiction> {
    codes.iter().map(|code| jur(code)).collect()
}

fn item(user_id: &str, residency: &str, location_id: &str, expected: Option<u64>) -> AssignItem {
    AssignItem {
        user_id: user(user_id),
        residency: jur(residency),
        location_id: loc(location_id),
        expected_mod_revision: expected.map(Revision),
    }
}

fn assign(user_id: &str, location_id: &str) -> WriteBody {
    WriteBody::Assign(item(user_id, "US", location_id, None))
}

fn put_location(location_id: &str, jurisdiction: &str) -> WriteBody {
    WriteBody::PutLocation {
        location_id: loc(location_id),
        jurisdiction: jur(jurisdiction),
        labels: Labels::default(),
    }
}

fn put_policy(residency: &str, storage: &[&str], access: &[&str]) -> WriteBody {
    WriteBody::PutPolicy {
        residency: jur(residency),
        storage: set(storage),
        access: set(access),
    }
}

fn set_state(location_id: &str, state: LocationState) -> WriteBody {
    WriteBody::SetLocationState {
        location_id: loc(location_id),
        state,
    }
}

fn begin_move(user_id: &str, target: &str) -> WriteBody {
    WriteBody::BeginMove {
        user_id: user(user_id),
        target: loc(target),
        expected_mod_revision: None,
    }
}

fn complete_move(user_id: &str) -> WriteBody {
    WriteBody::CompleteMove {
        user_id: user(user_id),
        expected_mod_revision: None,
    }
}

fn abort_move(user_id: &str) -> WriteBody {
    WriteBody::AbortMove {
        user_id: user(user_id),
        expected_mod_revision: None,
    }
}

fn forget(user_id: &str, expected: Option<u64>) -> WriteBody {
    WriteBody::Forget {
        user_id: user(user_id),
        expected_mod_revision: expected.map(Revision),
    }
}

/// A state and the log applied to it, one revision per write.
#[derive(Debug, Clone, Default)]
struct Registry {
    state: MemoryState,
    revision: u64,
}

impl Registry {
    /// Two US locations, one in another region, one German location, and the US policy
    /// (store: US; access: US). The DE policy stores in DE and allows access from DE and US.
    fn seeded() -> Registry {
        let mut registry = Registry::default();
        for body in [
            put_location("us-east-1/pg-1", "US"),
            put_location("us-west-2/pg-2", "US"),
            put_location("us-central-1/pg-3", "US"),
            put_location("eu-central-1/pg-9", "DE"),
            put_policy("US", &["US"], &["US"]),
            put_policy("DE", &["DE"], &["DE", "US"]),
        ] {
            registry.ok(body);
        }
        registry
    }

    fn command(&self, request_id: &str, body: WriteBody) -> Command {
        Command {
            request_id: RequestId::parse(request_id).expect("valid request id"),
            caller: CallerId::parse("test").expect("valid caller"),
            caller_authenticated: false,
            reason: ReasonText::parse("test").expect("valid reason"),
            stamped_at_ms: 1_700_000_000_000 + self.revision,
            body,
        }
    }

    fn write_as(&mut self, request_id: &str, body: WriteBody) -> Outcome {
        self.revision += 1;
        let command = self.command(request_id, body);
        let result = self.state.apply(Revision(self.revision), Some(&command));
        self.assert_index_is_what_the_state_holds();
        result.outcome.expect("a write has an outcome")
    }

    /// The request index kept from each entry's changes is the one loaded from the pairs.
    fn assert_index_is_what_the_state_holds(&self) {
        assert_eq!(
            self.state.request_index(),
            &self.state.loaded_request_index(),
            "the request index drifted from the state at revision {}",
            self.revision
        );
    }

    /// Applies several writes as one log entry, at one revision; one answer per write.
    fn entry<S: AsRef<str>>(&mut self, writes: Vec<(S, WriteBody)>) -> Vec<ApplyResult> {
        self.revision += 1;
        let commands: Vec<Command> = writes
            .into_iter()
            .map(|(request_id, body)| self.command(request_id.as_ref(), body))
            .collect();
        let results = self.state.apply_entry(Revision(self.revision), &commands);
        self.assert_index_is_what_the_state_holds();
        results
    }

    fn write(&mut self, body: WriteBody) -> Outcome {
        let request_id = format!("req-{}", self.revision + 1);
        self.write_as(&request_id, body)
    }

    fn ok(&mut self, body: WriteBody) -> Outcome {
        let outcome = self.write(body.clone());
        assert!(
            !matches!(outcome, Outcome::Rejected(_)),
            "{body:?} was refused: {outcome:?}"
        );
        outcome
    }

    /// Applies `body`, expects the refusal `code`, and checks that nothing but the request
    /// record changed.
    fn refused(&mut self, body: WriteBody) -> Rejection {
        let before = self.state.data_digest();
        let outcome = self.write(body.clone());
        let Outcome::Rejected(rejection) = outcome else {
            panic!("{body:?} should have been refused, got {outcome:?}");
        };
        assert_eq!(
            self.state.data_digest(),
            before,
            "a refused {body:?} changed the state"
        );
        rejection
    }

    fn check(&self, user_id: &str, accessor: &str, operation: AccessOperation) -> Decision {
        check_access(&self.state, &user(user_id), jur(accessor), operation)
            .expect("memory reads never fail")
    }
}

#[test]
fn assign_creates_then_updates_keeping_create_revision() {
    let mut registry = Registry::seeded();
    assert!(matches!(
        registry.ok(assign("alice", "us-east-1/pg-1")),
        Outcome::Assigned { created: true, .. }
    ));
    let Outcome::Assigned { placement, created } = registry.ok(assign("alice", "us-west-2/pg-2"))
    else {
        panic!("assign answers Assigned");
    };
    assert!(!created);
    assert_eq!(placement.location_id.as_str(), "us-west-2/pg-2");
    assert_eq!(placement.create_revision, Revision(7));
    assert_eq!(placement.mod_revision, Revision(8));
    assert_eq!(
        placement.epoch, 2,
        "moving the data by assign raises the fencing epoch"
    );
    assert!(!placement.updated_by_authenticated);
}

#[test]
fn a_us_user_can_never_be_placed_outside_the_us_by_any_path() {
    let mut registry = Registry::seeded();
    registry.ok(assign("alice", "us-east-1/pg-1"));
    registry.ok(assign("bob", "us-west-2/pg-2"));
    let cases: Vec<(WriteBody, Rejection)> = vec![
        (
            assign("carol", "eu-central-1/pg-9"),
            Rejection::StorageJurisdictionNotAllowed {
                residency: jur("US"),
                location_jurisdiction: jur("DE"),
            },
        ),
        (
            assign("alice", "eu-central-1/pg-9"),
            Rejection::StorageJurisdictionNotAllowed {
                residency: jur("US"),
                location_jurisdiction: jur("DE"),
            },
        ),
        (
            WriteBody::BatchAssign {
                items: vec![
                    item("dave", "US", "us-east-1/pg-1", None),
                    item("erin", "US", "eu-central-1/pg-9", None),
                    item("frank", "US", "us-west-2/pg-2", None),
                ],
            },
            Rejection::BatchRefused {
                items: vec![ItemRejection {
                    index: 1,
                    rejection: Rejection::StorageJurisdictionNotAllowed {
                        residency: jur("US"),
                        location_jurisdiction: jur("DE"),
                    },
                }],
            },
        ),
        (
            begin_move("alice", "eu-central-1/pg-9"),
            Rejection::StorageJurisdictionNotAllowed {
                residency: jur("US"),
                location_jurisdiction: jur("DE"),
            },
        ),
        (
            put_location("us-east-1/pg-1", "DE"),
            Rejection::LocationJurisdictionImmutable {
                location_id: loc("us-east-1/pg-1"),
                current: jur("US"),
                requested: jur("DE"),
            },
        ),
        (
            put_policy("US", &["DE"], &["US"]),
            Rejection::PolicyBreach {
                residency: jur("US"),
                placements: 2,
                jurisdictions: vec![jur("US")],
            },
        ),
        (
            assign("gina", "nowhere/pg-0"),
            Rejection::LocationNotFound {
                location_id: loc("nowhere/pg-0"),
            },
        ),
        (
            WriteBody::Assign(item("hank", "CA", "us-east-1/pg-1", None)),
            Rejection::NoPolicy {
                residency: jur("CA"),
            },
        ),
        (
            WriteBody::Assign(item("alice", "DE", "eu-central-1/pg-9", None)),
            Rejection::ResidencyChangeRefused {
                current: jur("US"),
                requested: jur("DE"),
            },
        ),
        (
            set_state("us-east-1/pg-1", LocationState::Retired),
            Rejection::LocationInUse {
                location_id: loc("us-east-1/pg-1"),
                placements: 1,
            },
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(registry.refused(body.clone()), expected, "{body:?}");
    }
    // A draining location keeps what it has and takes nothing new.
    registry.ok(set_state("us-central-1/pg-3", LocationState::Draining));
    let draining = Rejection::LocationNotActive {
        location_id: loc("us-central-1/pg-3"),
        state: LocationState::Draining,
    };
    assert_eq!(
        registry.refused(assign("ivan", "us-central-1/pg-3")),
        draining
    );
    assert_eq!(
        registry.refused(begin_move("alice", "us-central-1/pg-3")),
        draining
    );
}

#[test]
fn racing_a_policy_change_and_an_assign_never_leaves_a_breach_whatever_the_order() {
    // Both were valid against the state their senders saw; the log decides, and apply checks
    // each against the state at its own position.
    let allow_both = || {
        let mut registry = Registry::seeded();
        registry.ok(put_policy("US", &["US", "DE"], &["US"]));
        registry
    };
    let mut assign_first = allow_both();
    assign_first.ok(assign("alice", "eu-central-1/pg-9"));
    let breach = assign_first.refused(put_policy("US", &["US"], &["US"]));
    assert_eq!(
        breach,
        Rejection::PolicyBreach {
            residency: jur("US"),
            placements: 1,
            jurisdictions: vec![jur("DE")]
        }
    );

    let mut policy_first = allow_both();
    policy_first.ok(put_policy("US", &["US"], &["US"]));
    let refused = policy_first.refused(assign("alice", "eu-central-1/pg-9"));
    assert!(matches!(
        refused,
        Rejection::StorageJurisdictionNotAllowed { .. }
    ));
}

#[test]
fn a_policy_dry_run_counts_and_samples_the_placements_in_breach() {
    let mut registry = Registry::seeded();
    registry.ok(put_policy("US", &["US", "DE"], &["US"]));
    registry.ok(assign("alice", "eu-central-1/pg-9"));
    registry.ok(assign("bob", "us-east-1/pg-1"));
    registry.ok(WriteBody::Assign(item(
        "dieter",
        "DE",
        "eu-central-1/pg-9",
        None,
    )));
    let dry_run = dry_run_policy(&registry.state, jur("US"), &set(&["US"])).expect("dry run");
    assert_eq!(dry_run.placements_in_breach, 1);
    assert_eq!(dry_run.jurisdictions, vec![jur("DE")]);
    assert_eq!(
        dry_run.sample,
        vec![user("alice")],
        "only US users in breach, not the DE user beside them"
    );
    let harmless =
        dry_run_policy(&registry.state, jur("US"), &set(&["US", "DE"])).expect("dry run");
    assert_eq!(
        (harmless.placements_in_breach, harmless.sample.len()),
        (0, 0)
    );
}

#[test]
fn a_batch_applies_all_items_or_none() {
    let mut registry = Registry::seeded();
    let good = WriteBody::BatchAssign {
        items: vec![
            item("a1", "US", "us-east-1/pg-1", None),
            item("a2", "US", "us-west-2/pg-2", Some(0)),
        ],
    };
    let Outcome::BatchAssigned { items } = registry.ok(good) else {
        panic!("batch answers BatchAssigned")
    };
    assert_eq!(items.len(), 2);
    assert!(
        items
            .iter()
            .all(|item| item.created && item.placement.mod_revision == Revision(7))
    );
    let mixed = WriteBody::BatchAssign {
        items: vec![
            item("b1", "US", "us-east-1/pg-1", None),
            item("a2", "US", "us-east-1/pg-1", Some(0)),
        ],
    };
    let Rejection::BatchRefused { items } = registry.refused(mixed) else {
        panic!("refused as a batch")
    };
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].index, 1);
    assert!(matches!(
        items[0].rejection,
        Rejection::RevisionMismatch { .. }
    ));
    assert_eq!(
        registry.state.lookup(&user("b1")),
        None,
        "the good item of a refused batch did not apply"
    );
}

#[test]
fn a_completed_move_raises_the_epoch_once_and_an_aborted_one_changes_nothing() {
    let mut registry = Registry::seeded();
    registry.ok(assign("alice", "us-east-1/pg-1"));
    let before = registry.state.clone();

    let Outcome::Moved { placement } = registry.ok(begin_move("alice", "us-west-2/pg-2")) else {
        panic!("moved")
    };
    assert_eq!(
        placement.state,
        PlacementState::Moving {
            target: loc("us-west-2/pg-2")
        }
    );
    assert_eq!(
        (placement.location_id.as_str(), placement.epoch),
        ("us-east-1/pg-1", 1)
    );
    // While it moves: no second move, no assign, no forget, and the target cannot be retired.
    assert_eq!(
        registry.refused(begin_move("alice", "us-central-1/pg-3")),
        Rejection::UserMoving
    );
    assert_eq!(
        registry.refused(assign("alice", "us-central-1/pg-3")),
        Rejection::UserMoving
    );
    assert_eq!(
        registry.refused(forget("alice", None)),
        Rejection::UserMoving
    );
    assert!(matches!(
        registry.refused(set_state("us-west-2/pg-2", LocationState::Retired)),
        Rejection::LocationInUse { placements: 1, .. }
    ));
    registry.ok(abort_move("alice"));
    let after = registry.state.lookup(&user("alice")).expect("placed");
    let original = before.lookup(&user("alice")).expect("placed");
    assert_eq!(
        (&after.location_id, after.epoch, &after.state),
        (&original.location_id, 1, &PlacementState::Active)
    );
    assert_eq!(
        registry.refused(complete_move("alice")),
        Rejection::UserNotMoving
    );
    assert_eq!(
        registry.refused(abort_move("alice")),
        Rejection::UserNotMoving
    );

    registry.ok(begin_move("alice", "us-west-2/pg-2"));
    let Outcome::Moved { placement } = registry.ok(complete_move("alice")) else {
        panic!("moved")
    };
    assert_eq!(
        (placement.location_id.as_str(), placement.epoch),
        ("us-west-2/pg-2", 2)
    );
    assert_eq!(placement.state, PlacementState::Active);
    assert_eq!(
        registry.refused(begin_move("alice", "us-west-2/pg-2")),
        Rejection::MoveTargetIsCurrent
    );
    // The source is empty now and can be retired; the target holds alice and cannot.
    registry.ok(set_state("us-east-1/pg-1", LocationState::Retired));
    assert!(matches!(
        registry.refused(set_state("us-west-2/pg-2", LocationState::Retired)),
        Rejection::LocationInUse { .. }
    ));
    assert!(matches!(
        registry.refused(put_location("us-east-1/pg-1", "US")),
        Rejection::LocationRetired { .. }
    ));
    assert!(matches!(
        registry.refused(set_state("us-east-1/pg-1", LocationState::Active)),
        Rejection::LocationRetired { .. }
    ));
}

#[test]
fn check_access_answers_every_reason_and_fails_closed() {
    let mut registry = Registry::seeded();
    registry.ok(assign("alice", "us-east-1/pg-1"));
    registry.ok(WriteBody::Assign(item(
        "dieter",
        "DE",
        "eu-central-1/pg-9",
        None,
    )));
    registry.ok(assign("mover", "us-east-1/pg-1"));
    registry.ok(begin_move("mover", "us-west-2/pg-2"));
    let deny = |reason| Decision::Deny { reason };
    let cases = [
        (
            "nobody",
            "US",
            AccessOperation::Read,
            deny(DenyReason::UnknownUser),
        ),
        (
            "alice",
            "DE",
            AccessOperation::Read,
            deny(DenyReason::AccessorJurisdictionNotAllowed),
        ),
        (
            "alice",
            "CN",
            AccessOperation::Write,
            deny(DenyReason::AccessorJurisdictionNotAllowed),
        ),
        (
            "mover",
            "US",
            AccessOperation::Write,
            deny(DenyReason::UserMoving),
        ),
        (
            "dieter",
            "CN",
            AccessOperation::Read,
            deny(DenyReason::AccessorJurisdictionNotAllowed),
        ),
    ];
    for (user_id, accessor, operation, expected) in cases {
        assert_eq!(
            registry.check(user_id, accessor, operation),
            expected,
            "{user_id} from {accessor}"
        );
    }
    let allowed = registry.check("alice", "US", AccessOperation::Write);
    assert_eq!(
        allowed,
        Decision::Allow {
            location_id: loc("us-east-1/pg-1"),
            location_jurisdiction: jur("US"),
            epoch: 1,
            move_target: None
        }
    );
    let reading_a_mover = registry.check("mover", "US", AccessOperation::Read);
    assert!(matches!(
        reading_a_mover,
        Decision::Allow {
            move_target: Some(_),
            ..
        }
    ));
    assert!(matches!(
        registry.check("dieter", "US", AccessOperation::Read),
        Decision::Allow { .. }
    ));

    // Fail closed when the registry's own records are missing: no policy, no location.
    let mut without_policy = Registry::default();
    without_policy.ok(put_location("us-east-1/pg-1", "US"));
    without_policy.ok(put_policy("US", &["US"], &["US"]));
    without_policy.ok(assign("alice", "us-east-1/pg-1"));
    without_policy
        .state
        .remove_for_test(&crate::keys::policy_key(jur("US")));
    assert_eq!(
        without_policy.check("alice", "US", AccessOperation::Read),
        deny(DenyReason::NoPolicy)
    );
    without_policy.ok(put_policy("US", &["US"], &["US"]));
    without_policy
        .state
        .remove_for_test(&crate::keys::location_key(&loc("us-east-1/pg-1")));
    assert_eq!(
        without_policy.check("alice", "US", AccessOperation::Read),
        deny(DenyReason::LocationUnavailable)
    );
}

#[test]
fn expected_mod_revision_guards_writes() {
    let mut registry = Registry::seeded();
    let first = registry.ok(WriteBody::Assign(item(
        "bob",
        "US",
        "us-east-1/pg-1",
        Some(0),
    )));
    let Outcome::Assigned { placement, .. } = first else {
        panic!("assigned")
    };
    let stale = WriteBody::Assign(item("bob", "US", "us-west-2/pg-2", Some(0)));
    assert_eq!(
        registry.refused(stale),
        Rejection::RevisionMismatch {
            expected: Revision(0),
            actual: placement.mod_revision
        }
    );
    assert!(matches!(
        registry.refused(forget("bob", Some(99))),
        Rejection::RevisionMismatch { .. }
    ));
    registry.ok(forget("bob", Some(placement.mod_revision.0)));
    assert_eq!(
        registry.refused(forget("bob", None)),
        Rejection::UserNotFound
    );
}

#[test]
fn a_retried_request_returns_its_first_result_and_applies_once() {
    let mut registry = Registry::seeded();
    let first = registry.write_as("same", assign("dave", "us-east-1/pg-1"));
    registry.ok(assign("dave", "us-west-2/pg-2"));
    let retry = registry.write_as("same", assign("dave", "us-east-1/pg-1"));
    assert_eq!(first, retry, "the retry answers the first result");
    let placement = registry.state.lookup(&user("dave")).expect("placed");
    assert_eq!(
        placement.location_id.as_str(),
        "us-west-2/pg-2",
        "the retry did not apply again"
    );
    let reused = registry.write_as("same", assign("erin", "us-east-1/pg-1"));
    assert_eq!(reused, Outcome::Rejected(Rejection::RequestIdReused));
    assert_eq!(registry.state.lookup(&user("erin")), None);
}

#[test]
fn the_same_log_gives_the_same_digest_and_a_different_log_does_not() {
    let log: Vec<WriteBody> = (0..200)
        .map(|n| match n % 6 {
            0 if n >= 6 => begin_move(&format!("u{}", n - 5), "us-west-2/pg-2"),
            5 => forget(&format!("u{}", n - 1), None),
            _ => assign(
                &format!("u{n}"),
                &format!(
                    "us-{}",
                    ["east-1/pg-1", "west-2/pg-2", "central-1/pg-3"][n % 3]
                ),
            ),
        })
        .collect();
    let run = |log: &[WriteBody]| {
        let mut registry = Registry::seeded();
        for body in log {
            registry.write(body.clone());
        }
        registry.state.digest()
    };
    assert_eq!(run(&log), run(&log));
    assert_ne!(run(&log), run(&log[..199]));
}

#[test]
fn request_ids_age_out_after_the_window_counted_in_writes() {
    use crate::requests::RequestWindow;
    let window = |registry: &Registry| -> RequestWindow {
        crate::codec::decode(
            &registry
                .state
                .get_for_test(crate::keys::REQUEST_WINDOW_KEY)
                .expect("a window"),
        )
        .expect("decodes")
    };
    let mut registry = Registry::seeded();
    let first = registry.write_as("old", assign("gina", "us-east-1/pg-1"));
    assert_eq!(
        window(&registry),
        RequestWindow {
            remembered: 7,
            oldest: Revision(1)
        },
        "the six writes of the seeding at revisions 1..=6, then \"old\" at 7"
    );
    // Stand in for a million ids remembered since, without applying them: the window says it
    // holds all but five more than it may, so the next write pushes out the seeding's six, one
    // entry at a time, and stops before "old", which the window still needs.
    registry.state.put_for_test(
        crate::keys::REQUEST_WINDOW_KEY,
        crate::codec::encode(&RequestWindow {
            remembered: REQUEST_DEDUP_WINDOW_REQUESTS + 5,
            oldest: Revision(1),
        }),
    );
    registry.ok(assign("hal", "us-east-1/pg-1"));
    assert_eq!(window(&registry).oldest, Revision(7));
    let retry = registry.write_as("old", assign("gina", "us-east-1/pg-1"));
    assert_eq!(retry, first, "still inside the window: the first result");
    // The next remembered write pushes "old" out (a refusal is remembered too).
    registry.refused(assign("ida", "eu-central-1/pg-9"));
    assert_eq!(
        window(&registry),
        RequestWindow {
            remembered: REQUEST_DEDUP_WINDOW_REQUESTS,
            oldest: Revision(8)
        }
    );
    assert_eq!(
        registry
            .state
            .get_for_test(&crate::keys::request_ids_key(Revision(7), 0)),
        None,
        "the index of the entry that aged out went with it"
    );
    let again = registry.write_as("old", assign("gina", "us-east-1/pg-1"));
    let Outcome::Assigned { placement, created } = again else {
        panic!("past the window the write is new: {again:?}")
    };
    assert!(!created, "gina was placed by the first write");
    assert_eq!(placement.mod_revision, Revision(registry.revision));
}

#[test]
fn an_entry_of_many_writes_indexes_its_ids_in_chunks_and_ages_out_whole() {
    let mut registry = Registry::seeded();
    let writes: Vec<(String, WriteBody)> = (0..600)
        .map(|n| {
            (
                format!("many-{n}"),
                assign(&format!("m{n}"), "us-east-1/pg-1"),
            )
        })
        .collect();
    registry.entry(writes);
    let revision = Revision(registry.revision);
    for chunk in 0..3 {
        assert!(
            registry
                .state
                .get_for_test(&crate::keys::request_ids_key(revision, chunk))
                .is_some(),
            "600 ids take three keys"
        );
    }
    assert!(
        registry
            .state
            .get_for_test(&crate::keys::request_ids_key(revision, 3))
            .is_none()
    );
    let retry = registry.write_as("many-599", assign("m599", "us-east-1/pg-1"));
    assert!(
        matches!(retry, Outcome::Assigned { created: true, placement } if placement.mod_revision == revision)
    );
}

/// Rewrites the record of `request_id`, remembered by the entry at `revision` for `body`, the
/// way states kept it before records were kept per entry: one `r/` key with the whole body.
fn keep_record_the_old_way(
    registry: &mut Registry,
    request_id: &str,
    revision: Revision,
    body: WriteBody,
) {
    use crate::requests::{RequestRecord, RequestRecords};
    let records_key = crate::keys::request_records_key(revision, 0);
    let records: RequestRecords = crate::codec::decode(
        &registry
            .state
            .get_for_test(&records_key)
            .expect("the entry kept its records"),
    )
    .expect("decodes");
    let id = RequestId::parse(request_id).expect("valid");
    let kept = records
        .records
        .into_iter()
        .find(|record| record.request_id == id)
        .expect("the id is among them");
    registry.state.remove_for_test(&records_key);
    registry.state.put_for_test(
        &crate::keys::request_key(&id),
        crate::codec::encode(&RequestRecord {
            body,
            result: kept.result,
        }),
    );
}

#[test]
fn request_ids_of_a_state_from_before_grouping_age_out_by_revision() {
    let mut registry = Registry::seeded();
    let first = registry.write_as("legacy", assign("gina", "us-east-1/pg-1"));
    let applied_at = registry.revision;
    // Rewrite the id's index and record the way states kept them when one revision was one
    // write.
    keep_record_the_old_way(
        &mut registry,
        "legacy",
        Revision(applied_at),
        assign("gina", "us-east-1/pg-1"),
    );
    let index_key = crate::keys::request_ids_key(Revision(applied_at), 0);
    assert!(registry.state.get_for_test(&index_key).is_some());
    registry.state.remove_for_test(&index_key);
    registry.state.put_for_test(
        &crate::keys::request_by_revision_key(Revision(applied_at)),
        crate::codec::encode(&RequestId::parse("legacy").expect("valid")),
    );
    let window = 1_000_000;
    registry.revision = applied_at + window - 3;
    let reused = registry.write_as("legacy", assign("gina", "us-west-2/pg-2"));
    assert_eq!(reused, Outcome::Rejected(Rejection::RequestIdReused));
    let retry = registry.write_as("legacy", assign("gina", "us-east-1/pg-1"));
    assert_eq!(retry, first, "inside the legacy window: the first result");
    let again = registry.write_as("legacy", assign("gina", "us-east-1/pg-1"));
    assert!(
        matches!(&again, Outcome::Assigned { placement, .. } if placement.mod_revision == Revision(applied_at + window)),
        "at the end of the legacy window the write is new: {again:?}"
    );
    assert_eq!(
        registry.state.get_for_test(&crate::keys::request_key(
            &RequestId::parse("legacy").expect("valid")
        )),
        None,
        "the old record went with its window"
    );
}

/// A state written after writes were grouped but before records were kept per entry: its ids
/// are indexed per entry (`Q/`), its records are one `r/` key each. Retries find them, and
/// they age out with their entry.
#[test]
fn request_records_of_a_state_from_before_records_per_entry_answer_and_age_out() {
    use crate::requests::RequestWindow;
    let mut registry = Registry::seeded();
    let first = registry.write_as("older", assign("gina", "us-east-1/pg-1"));
    let applied_at = Revision(registry.revision);
    keep_record_the_old_way(
        &mut registry,
        "older",
        applied_at,
        assign("gina", "us-east-1/pg-1"),
    );
    let retry = registry.write_as("older", assign("gina", "us-east-1/pg-1"));
    assert_eq!(retry, first, "the old record answers the retry");
    let reused = registry.write_as("older", forget("gina", None));
    assert_eq!(reused, Outcome::Rejected(Rejection::RequestIdReused));
    // Make the window full, so that the next write pushes out everything up to "older".
    registry.state.put_for_test(
        crate::keys::REQUEST_WINDOW_KEY,
        crate::codec::encode(&RequestWindow {
            remembered: REQUEST_DEDUP_WINDOW_REQUESTS + 7,
            oldest: Revision(1),
        }),
    );
    registry.ok(assign("hal", "us-east-1/pg-1"));
    let id = RequestId::parse("older").expect("valid");
    assert_eq!(
        registry.state.get_for_test(&crate::keys::request_key(&id)),
        None,
        "the old record aged out with its entry"
    );
    assert!(registry.state.request_index().places(&id).is_empty());
    let again = registry.write_as("older", assign("gina", "us-east-1/pg-1"));
    assert!(
        matches!(&again, Outcome::Assigned { placement, .. } if placement.mod_revision == Revision(registry.revision)),
        "past the window the write is new: {again:?}"
    );
}

/// Several writes in one entry: each decides on what the ones before it left, each has its
/// own answer, they share the entry's revision, and a refusal touches none of its neighbours.
#[test]
fn the_writes_of_one_entry_are_decided_in_order_each_on_its_own() {
    let mut registry = Registry::seeded();
    let outcomes = |results: &[ApplyResult]| -> Vec<Outcome> {
        results
            .iter()
            .map(|result| result.outcome.clone().expect("a write has an outcome"))
            .collect()
    };

    // A refused write between two good ones: only it is refused.
    let results = registry.entry(vec![
        ("g-1", assign("ann", "us-east-1/pg-1")),
        ("g-2", assign("ben", "eu-central-1/pg-9")),
        ("g-3", assign("cat", "us-west-2/pg-2")),
    ]);
    let revision = Revision(registry.revision);
    assert!(results.iter().all(|result| result.revision == revision));
    let got = outcomes(&results);
    assert!(
        matches!(&got[0], Outcome::Assigned { placement, created: true } if placement.mod_revision == revision)
    );
    assert!(matches!(
        &got[1],
        Outcome::Rejected(Rejection::StorageJurisdictionNotAllowed { .. })
    ));
    assert!(matches!(&got[2], Outcome::Assigned { created: true, .. }));
    assert!(registry.state.lookup(&user("ann")).is_some());
    assert_eq!(registry.state.lookup(&user("ben")), None);
    assert!(registry.state.lookup(&user("cat")).is_some());

    // The same request id twice: applied once, both answered with the first result.
    let results = registry.entry(vec![
        ("twice", assign("dan", "us-east-1/pg-1")),
        ("twice", assign("dan", "us-east-1/pg-1")),
    ]);
    assert_eq!(
        results[0], results[1],
        "the second answers the first result"
    );
    let placement = registry.state.lookup(&user("dan")).expect("placed");
    assert_eq!(placement.epoch, 1, "applied once");
    assert!(matches!(
        outcomes(&results)[0],
        Outcome::Assigned { created: true, .. }
    ));

    // Two writes to one user, in arrival order: the second's expected_mod_revision is checked
    // against what the first left (the entry's own revision), not the state before the entry.
    let before = registry
        .state
        .lookup(&user("ann"))
        .expect("placed")
        .mod_revision;
    let results = registry.entry(vec![
        (
            "move-ann",
            WriteBody::Assign(item("ann", "US", "us-west-2/pg-2", Some(before.0))),
        ),
        (
            "stale-ann",
            WriteBody::Assign(item("ann", "US", "us-central-1/pg-3", Some(before.0))),
        ),
    ]);
    let revision = Revision(registry.revision);
    let got = outcomes(&results);
    assert!(matches!(&got[0], Outcome::Assigned { placement, .. } if placement.epoch == 2));
    assert_eq!(
        got[1],
        Outcome::Rejected(Rejection::RevisionMismatch {
            expected: before,
            actual: revision
        })
    );
    let results = registry.entry(vec![
        (
            "move-ann-2",
            WriteBody::Assign(item("ann", "US", "us-central-1/pg-3", None)),
        ),
        (
            "move-ann-3",
            WriteBody::Assign(item(
                "ann",
                "US",
                "us-east-1/pg-1",
                Some(registry.revision + 1),
            )),
        ),
    ]);
    let got = outcomes(&results);
    assert!(
        matches!(&got[1], Outcome::Assigned { placement, .. } if placement.epoch == 4 && placement.location_id.as_str() == "us-east-1/pg-1"),
        "the second write saw the first's mod_revision: {got:?}"
    );

    // A write and a forget of one user: the forget sees the placement the write made.
    let results = registry.entry(vec![
        ("eve-in", assign("eve", "us-east-1/pg-1")),
        ("eve-out", forget("eve", None)),
        ("eve-again", forget("eve", None)),
    ]);
    let got = outcomes(&results);
    assert!(matches!(&got[0], Outcome::Assigned { created: true, .. }));
    assert!(matches!(&got[1], Outcome::Forgotten { .. }));
    assert_eq!(got[2], Outcome::Rejected(Rejection::UserNotFound));
    assert_eq!(registry.state.lookup(&user("eve")), None);
}

/// One entry of writes leaves the same data, counters included, as the same writes one per
/// entry, and its events are numbered across its writes.
#[test]
fn an_entry_of_writes_leaves_the_data_of_the_same_writes_one_by_one() {
    let bodies: Vec<WriteBody> = (0..40)
        .map(|n| match n % 5 {
            0 | 1 => assign(&format!("w{}", n % 13), "us-east-1/pg-1"),
            2 => assign(&format!("w{}", n % 13), "us-west-2/pg-2"),
            3 => forget(&format!("w{}", (n + 3) % 13), None),
            _ => assign(&format!("w{}", n % 13), "eu-central-1/pg-9"),
        })
        .collect();
    let mut one_by_one = Registry::seeded();
    let single: Vec<Outcome> = bodies
        .iter()
        .enumerate()
        .map(|(n, body)| one_by_one.write_as(&format!("r{n}"), body.clone()))
        .collect();
    let mut grouped = Registry::seeded();
    let results = grouped.entry(
        bodies
            .iter()
            .enumerate()
            .map(|(n, body)| (format!("r{n}"), body.clone()))
            .collect(),
    );
    let kinds = |outcomes: Vec<Outcome>| -> Vec<std::mem::Discriminant<Outcome>> {
        outcomes.iter().map(std::mem::discriminant).collect()
    };
    assert_eq!(
        kinds(
            results
                .iter()
                .map(|r| r.outcome.clone().expect("outcome"))
                .collect()
        ),
        kinds(single),
        "the same decisions, write by write"
    );
    let placements = |registry: &Registry| -> Vec<Option<(String, u64)>> {
        (0..13)
            .map(|n| {
                registry
                    .state
                    .lookup(&user(&format!("w{n}")))
                    .map(|placement| (placement.location_id.to_string(), placement.epoch))
            })
            .collect()
    };
    assert_eq!(placements(&grouped), placements(&one_by_one));
    assert_eq!(
        crate::query::placements_count(&grouped.state).expect("count"),
        crate::query::placements_count(&one_by_one.state).expect("count")
    );
    let revision = Revision(grouped.revision);
    let events = crate::query::events(&grouped.state, revision, None, 1_000).expect("events");
    assert!(!events.is_empty());
    for (position, event) in events.iter().enumerate() {
        assert_eq!(event.revision, revision);
        assert_eq!(event.index as usize, position, "numbered across the writes");
    }
    let chunk: crate::apply::EventChunk = crate::codec::decode(
        &grouped
            .state
            .get_for_test(&crate::keys::event_chunk_key(revision, 0))
            .expect("kept"),
    )
    .expect("decodes");
    assert!(!chunk.more, "the entry's events in one key");
    // Paging through them, a few at a time, gives each once, in order.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = crate::query::events(&grouped.state, revision, after, 3).expect("events");
        let Some(last) = page.last() else { break };
        after = Some((last.revision, last.index));
        paged.extend(page);
    }
    assert_eq!(paged, events);
}

/// An entry whose events pass one key's bound keeps them in several, and a watcher pages
/// through them across the keys; the window drops every key of the entry.
#[test]
fn the_events_of_a_large_entry_span_several_keys_and_age_out_together() {
    let mut registry = Registry::seeded();
    let batches: Vec<(String, WriteBody)> = (0..4)
        .map(|batch| {
            let items = (0..250)
                .map(|n| item(&format!("big-{batch}-{n}"), "US", "us-east-1/pg-1", None))
                .collect();
            (format!("big-{batch}"), WriteBody::BatchAssign { items })
        })
        .collect();
    registry.entry(batches);
    let revision = Revision(registry.revision);
    let chunks = (0..)
        .take_while(|chunk| {
            registry
                .state
                .get_for_test(&crate::keys::event_chunk_key(revision, *chunk))
                .is_some()
        })
        .count() as u32;
    assert!(chunks > 1, "1,000 placements pass one key's bound");
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = crate::query::events(&registry.state, revision, after, 77).expect("events");
        let Some(last) = page.last() else { break };
        after = Some((last.revision, last.index));
        paged.extend(page);
    }
    let indexes: Vec<u32> = paged.iter().map(|event| event.index).collect();
    assert_eq!(indexes, (0..1_000).collect::<Vec<u32>>());
    let mut state = registry.state.clone();
    state.apply(
        Revision(revision.0 + residency_types::limits::WATCH_HISTORY_REVISIONS),
        None,
    );
    for chunk in 0..chunks {
        assert_eq!(
            state.get_for_test(&crate::keys::event_chunk_key(revision, chunk)),
            None
        );
    }
}

#[test]
fn a_retried_batch_answers_its_first_result_from_a_compact_record() {
    let mut registry = Registry::seeded();
    registry.ok(assign("u-0", "us-west-2/pg-2"));
    let items: Vec<AssignItem> = (0..500)
        .map(|n| {
            item(
                &format!("u-{n}"),
                "US",
                ["us-east-1/pg-1", "us-west-2/pg-2"][n % 2],
                None,
            )
        })
        .collect();
    let first = registry.write_as(
        "big-batch",
        WriteBody::BatchAssign {
            items: items.clone(),
        },
    );
    let Outcome::BatchAssigned { items: assigned } = &first else {
        panic!("applied: {first:?}")
    };
    assert_eq!(assigned[0].placement.epoch, 2, "u-0 moved: its epoch rose");
    assert!(!assigned[0].created && assigned[1].created);
    let applied_at = Revision(registry.revision);
    let retry = registry.write_as("big-batch", WriteBody::BatchAssign { items });
    assert_eq!(retry, first, "the rebuilt answer is the first answer");
    let record = registry
        .state
        .get_for_test(&crate::keys::request_records_key(applied_at, 0))
        .expect("the batch's record is kept");
    assert!(
        record.len() < 100 * 1024,
        "a 500-item batch record takes {} bytes",
        record.len()
    );
}

#[test]
fn the_placement_count_follows_creates_and_forgets() {
    let mut registry = Registry::seeded();
    let count = |registry: &Registry| {
        crate::query::placements_count(&registry.state).expect("memory reads never fail")
    };
    assert_eq!(count(&registry), 0);
    registry.ok(assign("a", "us-east-1/pg-1"));
    registry.ok(assign("b", "us-east-1/pg-1"));
    registry.ok(assign("a", "us-west-2/pg-2"));
    registry.refused(assign("c", "eu-central-1/pg-9"));
    assert_eq!(count(&registry), 2);
    registry.ok(forget("a", None));
    assert_eq!(count(&registry), 1);
}

#[test]
fn every_applied_change_becomes_one_event_in_order_and_old_ones_age_out() {
    use residency_types::Change;
    let mut registry = Registry::seeded();
    let seeded_events =
        crate::query::events(&registry.state, Revision(1), None, 100).expect("events");
    assert_eq!(seeded_events.len(), 6, "four locations and two policies");
    registry.ok(assign("alice", "us-east-1/pg-1"));
    registry.refused(assign("bob", "eu-central-1/pg-9"));
    registry.ok(WriteBody::BatchAssign {
        items: vec![
            item("b1", "US", "us-east-1/pg-1", None),
            item("b2", "US", "us-west-2/pg-2", None),
        ],
    });
    registry.ok(forget("alice", None));
    let events = crate::query::events(&registry.state, Revision(7), None, 100).expect("events");
    let summary: Vec<(u64, u32, String)> = events
        .iter()
        .map(|event| {
            let what = match &event.change {
                Change::Placed(placement) => format!("placed {}", placement.user_id),
                Change::Forgotten {
                    user_id,
                    location_id,
                } => format!("forgot {user_id} at {location_id}"),
                other => format!("{other:?}"),
            };
            (event.revision.0, event.index, what)
        })
        .collect();
    let expected = vec![
        (7, 0, "placed alice".to_string()),
        (9, 0, "placed b1".to_string()),
        (9, 1, "placed b2".to_string()),
        (10, 0, "forgot alice at us-east-1/pg-1".to_string()),
    ];
    assert_eq!(
        summary, expected,
        "the refused write at revision 8 made no event"
    );
    // Resuming after the batch's first event gives the rest.
    let after_first = (events[1].revision, events[1].index);
    let rest =
        crate::query::events(&registry.state, Revision(7), Some(after_first), 100).expect("events");
    assert_eq!(rest.len(), 2);

    let mut state = registry.state.clone();
    let window = residency_types::limits::WATCH_HISTORY_REVISIONS;
    state.apply(Revision(7 + window), None);
    let aged = crate::query::events(&state, Revision(1), None, 100).expect("events");
    assert!(
        aged.iter().all(|event| event.revision.0 != 7),
        "revision 7's event outlived the window"
    );
    let floor = crate::query::history_floor(&state).expect("reads");
    assert_eq!(
        crate::query::compacted_revision(Revision(7 + window), floor),
        Revision(7)
    );
}

/// The leader's check before proposing answers every write of an entry exactly as applying
/// the entry then does, and writes nothing.
#[test]
fn the_check_before_proposing_answers_as_apply_does() {
    let mut registry = Registry::seeded();
    registry.ok(assign("kim", "us-east-1/pg-1"));
    let revision = Revision(registry.revision + 1);
    let commands: Vec<Command> = [
        ("c-1", assign("lee", "us-west-2/pg-2")),
        ("c-2", assign("max", "eu-central-1/pg-9")),
        ("c-1", assign("lee", "us-west-2/pg-2")),
        ("c-3", forget("kim", None)),
        ("c-4", forget("kim", None)),
        ("c-5", begin_move("lee", "us-central-1/pg-3")),
    ]
    .into_iter()
    .map(|(request_id, body)| registry.command(request_id, body))
    .collect();
    let before = registry.state.digest();
    let checked = registry.state.check(revision, &commands);
    assert_eq!(registry.state.digest(), before, "a check writes nothing");
    let applied = registry.state.apply_entry(revision, &commands);
    assert_eq!(checked, applied);
    assert!(matches!(
        checked[1].outcome,
        Some(Outcome::Rejected(
            Rejection::StorageJurisdictionNotAllowed { .. }
        ))
    ));
    assert_eq!(checked[0], checked[2], "a retry in the entry");
    assert_eq!(
        checked[4].outcome,
        Some(Outcome::Rejected(Rejection::UserNotFound))
    );
}

/// The watch history holds at most `WATCH_HISTORY_EVENTS_MAX` events and
/// `WATCH_HISTORY_BYTES_MAX` bytes: past either, whole entries' events go from the oldest on,
/// and watchers learn the new floor. The entry being applied keeps its own.
#[test]
fn the_watch_history_is_bounded_by_events_and_bytes_as_well_as_revisions() {
    use crate::apply::{EventWindow, HistoryHeld};
    use residency_types::limits::{WATCH_HISTORY_BYTES_MAX, WATCH_HISTORY_EVENTS_MAX};
    let mut registry = Registry::seeded();
    let window = |registry: &Registry| -> EventWindow {
        crate::codec::decode(
            &registry
                .state
                .get_for_test(crate::keys::EVENT_WINDOW_KEY)
                .expect("a window"),
        )
        .expect("decodes")
    };
    let seeded = window(&registry);
    assert_eq!(
        seeded.held.events, 6,
        "the seeding's six writes, one event each"
    );
    assert_eq!(seeded.oldest, Revision(0), "nothing dropped yet");
    let floor = |registry: &Registry| crate::query::history_floor(&registry.state).expect("reads");
    assert_eq!(floor(&registry), Revision(0));

    // Stand in for a long history: the window says it holds three events more than it may.
    registry.state.put_for_test(
        crate::keys::EVENT_WINDOW_KEY,
        crate::codec::encode(&EventWindow {
            held: HistoryHeld {
                events: WATCH_HISTORY_EVENTS_MAX + 3,
                bytes: seeded.held.bytes,
            },
            ..seeded
        }),
    );
    registry.ok(assign("ann", "us-east-1/pg-1"));
    // One more event: four over, so the entries at revisions 1 to 4 (one event each) go.
    assert_eq!(window(&registry).oldest, Revision(5));
    assert_eq!(window(&registry).held.events, WATCH_HISTORY_EVENTS_MAX);
    assert_eq!(floor(&registry), Revision(4));
    let events = crate::query::events(&registry.state, Revision(1), None, 100).expect("events");
    let revisions: Vec<u64> = events.iter().map(|event| event.revision.0).collect();
    assert_eq!(revisions, vec![5, 6, 7]);
    assert_eq!(
        crate::query::compacted_revision(Revision(registry.revision), floor(&registry)),
        Revision(4)
    );

    // The same by bytes: over by any amount, the oldest entries go until it is not.
    let now = window(&registry);
    registry.state.put_for_test(
        crate::keys::EVENT_WINDOW_KEY,
        crate::codec::encode(&EventWindow {
            held: HistoryHeld {
                events: 10,
                bytes: WATCH_HISTORY_BYTES_MAX + 1,
            },
            ..now
        }),
    );
    registry.ok(assign("ben", "us-east-1/pg-1"));
    assert!(window(&registry).oldest >= Revision(6));
    assert!(window(&registry).held.bytes <= WATCH_HISTORY_BYTES_MAX);
    // Never the entry being applied: with everything else gone, it stays over.
    registry.state.put_for_test(
        crate::keys::EVENT_WINDOW_KEY,
        crate::codec::encode(&EventWindow {
            held: HistoryHeld {
                events: WATCH_HISTORY_EVENTS_MAX * 2,
                bytes: WATCH_HISTORY_BYTES_MAX / 2,
            },
            ..window(&registry)
        }),
    );
    registry.ok(assign("cat", "us-east-1/pg-1"));
    assert_eq!(window(&registry).oldest, Revision(registry.revision));
    let events = crate::query::events(&registry.state, Revision(1), None, 100).expect("events");
    assert_eq!(events.len(), 1, "only the newest entry's event is left");
}
