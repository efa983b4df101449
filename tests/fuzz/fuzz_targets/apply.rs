//! `apply` over arbitrary sequences of log entries, each of one to four writes as the leader
//! groups them, built from the input over a small universe of users, locations and
//! jurisdictions so the rules meet each other often. It must never panic, must be deterministic
//! (two replicas reach the same bytes), must answer a retried request id with its first result
//! (in a later entry or in the same one), must answer exactly as the leader's check before
//! proposing answered on the same state, must decide an entry's writes exactly as the same
//! writes one per entry would be decided (the outcome of each; revisions aside), and must never
//! leave a placement in breach of its policy (I1): an access check from the user's own
//! jurisdiction never finds the location unavailable or in a jurisdiction the policy forbids.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use residency_core::memory::MemoryState;
use residency_types::{
    AccessOperation, AssignItem, CallerId, Command, Decision, DenyReason, Jurisdiction, Labels,
    LocationId, LocationState, Outcome, ReasonText, RequestId, Revision, UserId, WriteBody,
};

/// Entries per input at most.
const ENTRIES_MAX: usize = 32;
/// Writes per entry at most.
const ENTRY_WRITES_MAX: u8 = 4;

const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
const LOCATIONS: [&str; 4] = [
    "us-east-1/a",
    "us-west-2/b",
    "eu-central-1/c",
    "ca-central-1/d",
];
const JURISDICTIONS: [&str; 3] = ["US", "DE", "CA"];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn pick<'b>(&mut self, from: &[&'b str]) -> Option<&'b str> {
        Some(from[usize::from(self.byte()?) % from.len()])
    }

    fn user(&mut self) -> Option<UserId> {
        Some(UserId::parse(self.pick(&USERS)?).expect("valid"))
    }

    fn location(&mut self) -> Option<LocationId> {
        Some(LocationId::parse(self.pick(&LOCATIONS)?).expect("valid"))
    }

    fn jurisdiction(&mut self) -> Option<Jurisdiction> {
        Some(Jurisdiction::parse(self.pick(&JURISDICTIONS)?).expect("valid"))
    }

    fn jurisdictions(&mut self) -> Option<BTreeSet<Jurisdiction>> {
        let mask = self.byte()?;
        Some(
            JURISDICTIONS
                .iter()
                .enumerate()
                .filter(|(bit, _)| mask & (1 << bit) != 0)
                .map(|(_, code)| Jurisdiction::parse(code).expect("valid"))
                .collect(),
        )
    }

    fn expected(&mut self) -> Option<Option<Revision>> {
        let byte = self.byte()?;
        Some((byte & 0x80 != 0).then_some(Revision(u64::from(byte & 0x7f))))
    }

    fn item(&mut self) -> Option<AssignItem> {
        Some(AssignItem {
            user_id: self.user()?,
            residency: self.jurisdiction()?,
            location_id: self.location()?,
            expected_mod_revision: self.expected()?,
        })
    }

    fn body(&mut self) -> Option<WriteBody> {
        Some(match self.byte()? % 9 {
            0 => WriteBody::Assign(self.item()?),
            1 => {
                let count = usize::from(self.byte()? % 5);
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.item()?);
                }
                WriteBody::BatchAssign { items }
            }
            2 => WriteBody::Forget {
                user_id: self.user()?,
                expected_mod_revision: self.expected()?,
            },
            3 => WriteBody::BeginMove {
                user_id: self.user()?,
                target: self.location()?,
                expected_mod_revision: self.expected()?,
            },
            4 => WriteBody::CompleteMove {
                user_id: self.user()?,
                expected_mod_revision: self.expected()?,
            },
            5 => WriteBody::AbortMove {
                user_id: self.user()?,
                expected_mod_revision: self.expected()?,
            },
            6 => WriteBody::PutLocation {
                location_id: self.location()?,
                jurisdiction: self.jurisdiction()?,
                labels: Labels::default(),
            },
            7 => WriteBody::SetLocationState {
                location_id: self.location()?,
                state: match self.byte()? % 3 {
                    0 => LocationState::Active,
                    1 => LocationState::Draining,
                    _ => LocationState::Retired,
                },
            },
            _ => WriteBody::PutPolicy {
                residency: self.jurisdiction()?,
                storage: self.jurisdictions()?,
                access: self.jurisdictions()?,
            },
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut replica_a = MemoryState::new();
    let mut replica_b = MemoryState::new();
    // The same writes, each applied on its own at its entry's revision: the reference for how
    // an entry's writes are decided.
    let mut one_by_one = MemoryState::new();
    let mut sent: Vec<(Command, Outcome)> = Vec::new();
    let mut step = 0_u64;
    for entry in 0..ENTRIES_MAX {
        let revision = Revision(entry as u64 + 1);
        let Some(size) = input.byte() else { break };
        let mut commands: Vec<Command> = Vec::new();
        for _ in 0..=(size % ENTRY_WRITES_MAX) {
            let Some(selector) = input.byte() else { break };
            step += 1;
            // Now and then, a retry of an earlier write: same id, same body, perhaps one of
            // this very entry.
            let command = if selector % 8 == 0 && !(sent.is_empty() && commands.is_empty()) {
                let earlier: Vec<&Command> = sent
                    .iter()
                    .map(|(command, _)| command)
                    .chain(commands.iter())
                    .collect();
                earlier[usize::from(selector) % earlier.len()].clone()
            } else {
                let Some(body) = input.body() else { break };
                Command {
                    request_id: RequestId::parse(format!("req-{step}")).expect("valid"),
                    caller: CallerId::parse("fuzz").expect("valid"),
                    caller_authenticated: true,
                    reason: ReasonText::parse("fuzz").expect("valid"),
                    stamped_at_ms: 1_700_000_000_000 + step,
                    body,
                }
            };
            commands.push(command);
        }
        if commands.is_empty() {
            break;
        }
        // The leader's check before proposing answers each write as apply then does.
        let checked = replica_a.check(revision, &commands);
        let results = replica_a.apply_entry(revision, &commands);
        assert_eq!(
            replica_a.request_index(),
            &replica_a.loaded_request_index(),
            "the request index kept entry by entry is not the one the state holds"
        );
        assert_eq!(
            checked, results,
            "the check and apply answered an entry differently"
        );
        let again = replica_b.apply_entry(revision, &commands);
        assert_eq!(
            results, again,
            "two replicas answered one entry differently"
        );
        assert_eq!(results.len(), commands.len(), "one answer per write");
        for (command, result) in commands.into_iter().zip(results) {
            let outcome = result.outcome.expect("a write has an outcome");
            if let Some((_, first)) = sent
                .iter()
                .find(|(earlier, _)| earlier.request_id == command.request_id)
            {
                // A retry changes nothing, so the reference does not apply it: its writes
                // applied one by one at one revision would each replace the entry's request
                // records, which a real entry writes once.
                assert_eq!(&outcome, first, "a retry got another answer");
            } else {
                let alone = one_by_one.apply(revision, Some(&command));
                assert_eq!(
                    Some(&outcome),
                    alone.outcome.as_ref(),
                    "a write in an entry of several was decided otherwise than alone"
                );
                sent.push((command, outcome));
            }
        }
        for user in USERS {
            let user = UserId::parse(user).expect("valid");
            assert_eq!(
                replica_a.lookup(&user),
                one_by_one.lookup(&user),
                "an entry of several writes left another placement than its writes one by one"
            );
            let Some(placement) = replica_a.lookup(&user) else {
                continue;
            };
            let decision = residency_core::check_access(
                &replica_a,
                &user,
                placement.residency,
                AccessOperation::Read,
            )
            .expect("the state decodes");
            if let Decision::Deny { reason } = decision {
                assert!(
                    !matches!(
                        reason,
                        DenyReason::StorageJurisdictionNotAllowed | DenyReason::LocationUnavailable
                    ),
                    "a placement in breach: {placement:?} ({reason:?})"
                );
            }
        }
    }
    assert_eq!(replica_a.digest(), replica_b.digest(), "replicas diverged");
});
