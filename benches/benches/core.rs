//! Micro-benchmarks of the pure core and the codecs (criterion):
//! `cargo bench -p residency-benches --bench core`.
//!
//! - `apply/*`: one command applied by `residency_core::apply` to an in-memory state holding
//!   a seeded catalog and 100,000 placements (the rules, the counters, the encodings; no IO).
//! - `validate/*`: a request's fields checked into domain types, as a node does first.
//! - `digest/*`: the state digest over 10,000 key/value pairs.
//! - `codec/*`: a state value (version byte + postcard), a Raft log record (format byte + CRC32
//!   + postcard), and the protobuf messages of a lookup.

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use residency_core::memory::MemoryState;
use residency_core::{StateDigest, codec};
use residency_proto::pb;
use residency_types::{
    AccessOperation, ApplyResult, AssignItem, CallerId, Command, Jurisdiction, Labels, LocationId,
    Outcome, ReasonText, RequestId, Revision, UserId, WriteBody,
};

const PRELOADED_USERS: u64 = 100_000;
const BATCH_ITEMS: u64 = 500;
const DIGEST_PAIRS: usize = 10_000;

fn location(n: u64) -> LocationId {
    LocationId::parse(format!("us-east-1/oci-ashburn/pg-{:03}", n % 3)).expect("valid location")
}

fn user(n: u64) -> UserId {
    UserId::parse(format!("user-{n:012}")).expect("valid user id")
}

fn command(n: u64, body: WriteBody) -> Command {
    Command {
        request_id: RequestId::parse(format!("bench-{n:012}")).expect("valid request id"),
        caller: CallerId::parse("spiffe://residency.local/service/bench").expect("valid caller"),
        caller_authenticated: false,
        reason: ReasonText::parse("benchmark").expect("valid reason"),
        stamped_at_ms: 1_800_000_000_000 + n,
        body,
    }
}

fn assign(n: u64) -> WriteBody {
    WriteBody::Assign(AssignItem {
        user_id: user(n),
        residency: Jurisdiction::US,
        location_id: location(n),
        expected_mod_revision: None,
    })
}

fn applied(result: &ApplyResult) -> bool {
    !matches!(result.outcome, None | Some(Outcome::Rejected(_)))
}

/// Three US locations, the US policy, and `users` placements.
fn seeded(users: u64) -> (MemoryState, u64) {
    let mut state = MemoryState::new();
    let mut revision = 0;
    let us: BTreeSet<Jurisdiction> = [Jurisdiction::US].into_iter().collect();
    let mut bodies: Vec<WriteBody> = (0..3)
        .map(|n| WriteBody::PutLocation {
            location_id: location(n),
            jurisdiction: Jurisdiction::US,
            labels: Labels::default(),
        })
        .collect();
    bodies.push(WriteBody::PutPolicy {
        residency: Jurisdiction::US,
        storage: us.clone(),
        access: us,
    });
    for (n, body) in bodies.into_iter().enumerate() {
        revision += 1;
        let result = state.apply(
            Revision(revision),
            Some(&command(n as u64 + 1_000_000, body)),
        );
        assert!(applied(&result), "seeding failed: {result:?}");
    }
    for n in 0..users {
        revision += 1;
        let result = state.apply(Revision(revision), Some(&command(n, assign(n))));
        assert!(applied(&result), "preloading failed: {result:?}");
    }
    (state, revision)
}

/// What `apply` decides for `command` as the only write of the entry at `at` (the mutations
/// returned, not written).
fn decide_alone(state: &MemoryState, at: Revision, command: &Command) -> residency_core::Applied {
    residency_core::apply(
        state,
        state.request_index(),
        at,
        std::slice::from_ref(command),
    )
    .expect("reads")
}

fn bench_apply(c: &mut Criterion) {
    let (mut state, mut revision) = seeded(PRELOADED_USERS);
    let mut next = PRELOADED_USERS;
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(1));
    group.bench_function("assign_new_user", |b| {
        b.iter_batched(
            || {
                next += 1;
                revision += 1;
                (Revision(revision), command(next, assign(next)))
            },
            |(at, command)| decide_alone(&state, at, &command),
            BatchSize::SmallInput,
        );
    });
    group.bench_function("assign_refused_foreign_location", |b| {
        let foreign = command(
            u64::MAX,
            WriteBody::Assign(AssignItem {
                user_id: user(1),
                residency: Jurisdiction::US,
                location_id: LocationId::parse("eu-central-1/oci-frankfurt/pg-001")
                    .expect("valid location"),
                expected_mod_revision: None,
            }),
        );
        b.iter(|| {
            residency_core::apply(
                &state,
                state.request_index(),
                Revision(revision + 1),
                std::slice::from_ref(black_box(&foreign)),
            )
        });
    });
    group.throughput(Throughput::Elements(BATCH_ITEMS));
    group.bench_function("batch_assign_500_new_users", |b| {
        b.iter_batched(
            || {
                revision += 1;
                let items = (0..BATCH_ITEMS)
                    .map(|_| {
                        next += 1;
                        AssignItem {
                            user_id: user(next),
                            residency: Jurisdiction::US,
                            location_id: location(next),
                            expected_mod_revision: None,
                        }
                    })
                    .collect();
                (
                    Revision(revision),
                    command(next, WriteBody::BatchAssign { items }),
                )
            },
            |(at, command)| decide_alone(&state, at, &command),
            BatchSize::SmallInput,
        );
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("assign_applied_into_the_state", |b| {
        b.iter_batched(
            || {
                next += 1;
                revision += 1;
                (Revision(revision), command(next, assign(next)))
            },
            |(at, command)| state.apply(at, Some(&command)),
            BatchSize::SmallInput,
        );
    });
    group.bench_function("check_access", |b| {
        let us = Jurisdiction::US;
        let mut n = 0;
        b.iter(|| {
            n = (n + 7_919) % PRELOADED_USERS;
            residency_core::check_access(&state, &user(n), us, AccessOperation::Read)
        });
    });
    group.finish();
}

fn bench_validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("user_id", |b| {
        b.iter(|| UserId::parse(black_box("user-000000012345")).expect("valid"));
    });
    group.bench_function("assign_item_from_pb", |b| {
        let item = pb::AssignItem {
            user_id: "user-000000012345".to_string(),
            residency: "US".to_string(),
            location_id: "us-east-1/oci-ashburn/pg-042".to_string(),
            expected_mod_revision: None,
        };
        b.iter_batched(
            || item.clone(),
            |item| residency_proto::convert::assign_item_from_pb(item).expect("valid"),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn bench_digest(c: &mut Criterion) {
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..DIGEST_PAIRS)
        .map(|n| {
            (
                format!("p/user-{n:012}").into_bytes(),
                vec![u8::try_from(n % 251).expect("fits"); 120],
            )
        })
        .collect();
    let mut group = c.benchmark_group("digest");
    group.throughput(Throughput::Elements(DIGEST_PAIRS as u64));
    group.bench_function("10k_pairs", |b| {
        b.iter(|| {
            let mut digest = StateDigest::new();
            for (key, value) in &pairs {
                digest.update(key, value);
            }
            digest.finish()
        });
    });
    group.finish();
}

fn bench_codecs(c: &mut Criterion) {
    let (state, revision) = seeded(10);
    let placement = state.lookup(&user(3)).expect("placed");
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    let value = codec::encode(&placement);
    group.bench_function("state_value_encode", |b| {
        b.iter(|| codec::encode(black_box(&placement)))
    });
    group.bench_function("state_value_decode", |b| {
        b.iter(|| codec::decode::<residency_types::Placement>(black_box(&value)).expect("decodes"));
    });
    let entry = residency_store::Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), revision + 1),
        payload: openraft::EntryPayload::Normal(residency_types::Proposal::new(vec![command(
            7,
            assign(7),
        )])),
    };
    let record = residency_store::record::seal_entry(&entry);
    group.bench_function("log_record_seal", |b| {
        b.iter(|| residency_store::record::seal_entry(black_box(&entry)));
    });
    group.bench_function("log_record_unseal", |b| {
        b.iter(|| {
            residency_store::record::unseal_entry(black_box(&record), "bench").expect("unseals")
        });
    });
    let response = pb::LookupResponse {
        placement: Some(pb::Placement::from(&placement)),
        header: Some(pb::ReadHeader {
            revision: revision + 1,
            served_by: 1,
            consistency: pb::ConsistencyMode::Linearizable.into(),
            millis_since_leader_contact: Some(0),
        }),
    };
    let bytes = response.encode_to_vec();
    group.bench_function("lookup_response_encode", |b| {
        b.iter(|| black_box(&response).encode_to_vec());
    });
    group.bench_function("lookup_response_decode", |b| {
        b.iter(|| pb::LookupResponse::decode(black_box(bytes.as_slice())).expect("decodes"));
    });
    group.bench_function("placement_from_pb", |b| {
        b.iter_batched(
            || pb::Placement::from(&placement),
            |message| residency_types::Placement::try_from(message).expect("valid"),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_apply,
    bench_validate,
    bench_digest,
    bench_codecs
);
criterion_main!(benches);
