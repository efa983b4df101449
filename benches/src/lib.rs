//! Benchmarks of the registry. Each binary under `src/bin/` measures one thing and prints a
//! table with medians over repeated rounds, so a claim is always a ratio from one run on one
//! machine. Run them with `--release`:
//!
//! - `log-append`: the Raft log store's durable append rate and latency per batch size, next
//!   to a plain append-only file with `fdatasync` (the alternative a purpose-built log would
//!   use), to back the storage decision in `docs/storage.md`.

use std::time::Duration;

use residency_types::{
    AssignItem, CallerId, Command, Jurisdiction, LocationId, ReasonText, RequestId, UserId,
    WriteBody,
};

/// A write of realistic size: ids and texts as a migration tool would send them.
pub fn sample_command(n: u64) -> Command {
    Command {
        request_id: RequestId::parse(format!("bench-request-{n:012}")).expect("valid request id"),
        caller: CallerId::parse("spiffe://residency.local/service/migration")
            .expect("valid caller"),
        reason: ReasonText::parse("bulk placement of new users").expect("valid reason"),
        stamped_at_ms: 1_800_000_000_000 + n,
        caller_authenticated: false,
        body: WriteBody::Assign(AssignItem {
            user_id: UserId::parse(format!("user-{n:012}")).expect("valid user id"),
            residency: Jurisdiction::US,
            location_id: LocationId::parse(format!("us-east-1/oci-ashburn/pg-{:03}", n % 500))
                .expect("valid location"),
            expected_mod_revision: None,
        }),
    }
}

/// The median of some durations (the upper one for an even count).
pub fn median(mut samples: Vec<Duration>) -> Duration {
    assert!(!samples.is_empty(), "median of nothing");
    samples.sort();
    samples[samples.len() / 2]
}

/// The `q` quantile (0..=1) of some durations.
pub fn quantile(mut samples: Vec<Duration>, q: f64) -> Duration {
    assert!(!samples.is_empty(), "quantile of nothing");
    samples.sort();
    let index = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[index]
}

/// The cluster's active US locations, where the benchmarks place their users.
pub async fn active_us_locations(
    client: &residency_client::Client,
) -> anyhow::Result<Vec<LocationId>> {
    let locations: Vec<LocationId> = client
        .list_locations(residency_types::Consistency::Linearizable)
        .await?
        .into_iter()
        .filter(|location| {
            location.jurisdiction == Jurisdiction::US
                && location.state == residency_types::LocationState::Active
        })
        .map(|location| location.id)
        .collect();
    anyhow::ensure!(
        !locations.is_empty(),
        "the cluster has no active US location to place users at: start it with \
         ./cluster/local.sh up"
    );
    Ok(locations)
}
