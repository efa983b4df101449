//! The workloads against the registry, through `residency-client` as a service would call it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message;
use residency_client::{Client, ClientOptions, TlsOptions, WatchItem};
use residency_proto::pb;
use residency_types::{
    AccessOperation, AssignItem, Change, Consistency, Decision, Jurisdiction, LocationId, Revision,
    UserId,
};

use crate::driver::{Op, scatter};
use crate::{Plan, Workload, preload_user_id};

/// Rows per BatchAssign of the `import` workload: the size `residencyctl user import` sends.
pub const IMPORT_BATCH_ROWS: usize = 500;
/// Users per BatchLookup of the `batch-lookup` workload.
pub const BATCH_LOOKUP_USERS: usize = 100;
/// One write in this many of the `mixed` workload (the rest are access checks): 5%.
const MIXED_WRITE_EVERY: u64 = 20;
/// Watch events whose lag is measured in the `mixed` workload, at most (16 bytes each).
const LAG_SAMPLES_MAX: usize = 1_000_000;

/// What every registry workload shares.
#[derive(Debug)]
pub struct Registry {
    pub clients: Vec<Arc<Client>>,
    pub locations: Vec<LocationId>,
    /// The `AtLeast` token of the lookups: the revision the preload ended at, as a service
    /// holds the token of its last write.
    pub token: Revision,
}

/// The bench writes and reads as the operator: RESIDENCY_CERTS_DIR, or the local cluster's
/// data/certs; plaintext if there are none.
pub fn client_options() -> Result<ClientOptions, String> {
    Ok(ClientOptions {
        timeout: Duration::from_secs(30),
        caller: "residency-bench".to_string(),
        tls: TlsOptions::discover("operator").map_err(|error| error.to_string())?,
    })
}

fn user_id(text: &str) -> Result<UserId, String> {
    UserId::parse(text).map_err(|error| error.to_string())
}

/// `plan.clients` clients (each with its own connections), the active US locations, and
/// `plan.users` users placed, unless the last of them is placed already.
pub async fn prepare(plan: &Plan) -> anyhow::Result<Registry> {
    let options = client_options().map_err(anyhow::Error::msg)?;
    let clients: Vec<Arc<Client>> = (0..plan.clients)
        .map(|_| Client::new(plan.endpoints.clone(), options.clone()).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let client = clients[0].clone();
    let locations = residency_benches::active_us_locations(&client).await?;
    let last = UserId::parse(preload_user_id(plan.users - 1))?;
    if client
        .lookup(&last, Consistency::Linearizable)
        .await?
        .placement
        .is_some()
    {
        println!("registry: {} users already placed", plan.users);
    } else {
        place_users(
            client.clone(),
            &locations,
            plan.users,
            PRELOAD_BATCHES_IN_FLIGHT,
        )
        .await?;
    }
    let token = client.current_revision(Consistency::Linearizable).await?;
    Ok(Registry {
        clients,
        locations,
        token,
    })
}

/// Batches in flight while preloading the users of the read workloads.
const PRELOAD_BATCHES_IN_FLIGHT: usize = 8;

/// Places users `0..users` (the preloaded ones) with `in_flight` batches at once; returns
/// how long it took.
pub async fn place_users(
    client: Arc<Client>,
    locations: &[LocationId],
    users: usize,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let locations = Arc::new(locations.to_vec());
    let op: Op = Arc::new(move |_, seq| {
        let (client, locations) = (client.clone(), locations.clone());
        Box::pin(async move {
            let first = seq as usize * IMPORT_BATCH_ROWS;
            let rows = first..(first + IMPORT_BATCH_ROWS).min(users);
            place_batch(&client, rows, &locations, preload_user_id).await
        })
    });
    crate::preload_with(op, users.div_ceil(IMPORT_BATCH_ROWS), in_flight, "registry").await?;
    Ok(started.elapsed())
}

/// Places the users of `rows` (named by `name`) at the locations in turn, in one BatchAssign.
async fn place_batch(
    client: &Client,
    rows: std::ops::Range<usize>,
    locations: &[LocationId],
    name: impl Fn(usize) -> String,
) -> Result<u64, String> {
    let items = rows
        .map(|n| {
            Ok(AssignItem {
                user_id: user_id(&name(n))?,
                residency: Jurisdiction::US,
                location_id: locations[n % locations.len()].clone(),
                expected_mod_revision: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    client
        .batch_assign(&items, None)
        .await
        .map_err(|error| error.to_string())?;
    Ok(items.len() as u64)
}

/// The encoded size of a preloaded placement as the registry answers it: the value size the
/// etcd side stores, so both move the same bytes.
pub async fn placement_bytes(registry: &Registry) -> anyhow::Result<usize> {
    let user = UserId::parse(preload_user_id(0))?;
    let read = registry.clients[0]
        .lookup(&user, Consistency::Linearizable)
        .await?;
    let placement = read
        .placement
        .context("the first preloaded user has no placement")?;
    Ok(pb::Placement::from(&placement).encoded_len())
}

fn consistency_of(workload: Workload, token: Revision) -> Consistency {
    match workload {
        Workload::LookupAtLeast => Consistency::AtLeast(token),
        Workload::LookupStale => Consistency::Stale,
        _ => Consistency::Linearizable,
    }
}

/// A preloaded user picked by a sequence number.
fn some_user(seq: u64, users: u64) -> Result<UserId, String> {
    user_id(&preload_user_id((scatter(seq) % users) as usize))
}

/// A user no run has placed before.
fn new_user(run: &str, seq: u64) -> Result<UserId, String> {
    user_id(&format!("bench-w-{run}-{seq}"))
}

async fn check(client: &Client, user: &UserId) -> Result<u64, String> {
    let checked = client
        .check_access(
            user,
            "bench",
            Jurisdiction::US,
            AccessOperation::Read,
            Consistency::Linearizable,
        )
        .await
        .map_err(|error| error.to_string())?;
    match checked.decision {
        Decision::Allow { .. } => Ok(1),
        Decision::Deny { reason } => Err(format!("a preloaded user was denied: {reason:?}")),
    }
}

/// Assigns the `seq`th new user of a run, at the locations in turn.
async fn assign_new(
    client: &Client,
    run: &str,
    seq: u64,
    locations: &[LocationId],
) -> Result<residency_client::Assigned, String> {
    let location = &locations[seq as usize % locations.len()];
    client
        .assign(&new_user(run, seq)?, Jurisdiction::US, location, None)
        .await
        .map_err(|error| error.to_string())
}

/// When each write of the `mixed` workload was acknowledged, and the lag of its watch event.
#[derive(Debug, Default)]
pub struct LagProbe {
    acknowledged: Mutex<HashMap<u64, Instant>>,
    lags_ns: Mutex<Vec<u64>>,
    events: AtomicU64,
}

impl LagProbe {
    fn acknowledged(&self, revision: Revision, at: Instant) {
        let mut acknowledged = self.acknowledged.lock().expect("lag probe lock");
        if acknowledged.len() < LAG_SAMPLES_MAX {
            acknowledged.insert(revision.0, at);
        }
    }

    fn delivered(&self, revision: Revision, at: Instant) {
        self.events.fetch_add(1, Ordering::Relaxed);
        // An event may come before the writer hears its acknowledgement: then it is parked
        // and the lag is taken as zero, the watcher having been no later than the writer.
        let acked = self
            .acknowledged
            .lock()
            .expect("lag probe lock")
            .remove(&revision.0);
        let lag = acked.map_or(0, |acked| {
            u64::try_from(at.saturating_duration_since(acked).as_nanos()).unwrap_or(u64::MAX)
        });
        let mut lags = self.lags_ns.lock().expect("lag probe lock");
        if lags.len() < LAG_SAMPLES_MAX {
            lags.push(lag);
        }
    }

    /// The lags measured so far, sorted, and the events seen.
    pub fn lags(&self) -> (Vec<u64>, u64) {
        let mut lags = self.lags_ns.lock().expect("lag probe lock").clone();
        lags.sort_unstable();
        (lags, self.events.load(Ordering::Relaxed))
    }
}

/// Watches the `mixed` workload's new users from a client of its own and feeds the probe
/// until aborted.
pub fn start_lag_watch(
    plan: &Plan,
    scope: &str,
    probe: Arc<LagProbe>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let options = client_options().map_err(anyhow::Error::msg)?;
    let client = Client::new(plan.endpoints.clone(), options)?;
    let prefix = format!("bench-w-{scope}-");
    Ok(tokio::spawn(async move {
        let mut watcher = client
            .watch(Revision(0), &prefix, None)
            .progress_every(Duration::from_millis(100));
        while let Ok(Some(item)) = watcher.next().await {
            if let WatchItem::Event(event) = item
                && matches!(event.change, Change::Placed(_))
            {
                probe.delivered(event.revision, Instant::now());
            }
        }
    }))
}

/// The operation of one workload against the registry, and what it sends. New users are
/// named within `scope`, unique to one round of one workload.
pub fn op_for(
    workload: Workload,
    registry: &Registry,
    plan: &Plan,
    scope: &str,
    probe: Option<Arc<LagProbe>>,
) -> (Op, String) {
    let clients: Arc<Vec<Arc<Client>>> = Arc::new(registry.clients.clone());
    let locations: Arc<Vec<LocationId>> = Arc::new(registry.locations.clone());
    let users = plan.users as u64;
    let run: Arc<str> = Arc::from(scope);
    let token = registry.token;
    match workload {
        Workload::LookupLinearizable
        | Workload::LookupLinearizableOne
        | Workload::LookupAtLeast
        | Workload::LookupStale => {
            let consistency = consistency_of(workload, token);
            let op: Op = Arc::new(move |task, seq| {
                let client = clients[task % clients.len()].clone();
                Box::pin(async move {
                    let read = client
                        .lookup(&some_user(seq, users)?, consistency)
                        .await
                        .map_err(|error| error.to_string())?;
                    if read.placement.is_none() {
                        return Err("a preloaded user has no placement".to_string());
                    }
                    Ok(1)
                })
            });
            let what = match consistency {
                Consistency::Linearizable => "Lookup, LINEARIZABLE".to_string(),
                Consistency::AtLeast(_) => "Lookup, AT_LEAST the preload's revision".to_string(),
                Consistency::Stale => "Lookup, STALE".to_string(),
            };
            (op, what)
        }
        Workload::BatchLookup => {
            let op: Op = Arc::new(move |task, seq| {
                let client = clients[task % clients.len()].clone();
                Box::pin(async move {
                    let ids = (0..BATCH_LOOKUP_USERS as u64)
                        .map(|n| some_user(seq * BATCH_LOOKUP_USERS as u64 + n, users))
                        .collect::<Result<Vec<_>, _>>()?;
                    let read = client
                        .batch_lookup(&ids, Consistency::Linearizable)
                        .await
                        .map_err(|error| error.to_string())?;
                    if read.placement.iter().any(Option::is_none) {
                        return Err("a preloaded user has no placement".to_string());
                    }
                    Ok(ids.len() as u64)
                })
            });
            (
                op,
                format!("BatchLookup of {BATCH_LOOKUP_USERS} users, LINEARIZABLE"),
            )
        }
        Workload::CheckAccess => {
            let op: Op = Arc::new(move |task, seq| {
                let client = clients[task % clients.len()].clone();
                Box::pin(async move { check(&client, &some_user(seq, users)?).await })
            });
            (op, "CheckAccess, LINEARIZABLE".to_string())
        }
        Workload::Assign(_) => {
            let op: Op = Arc::new(move |task, seq| {
                let (client, locations, run) = (
                    clients[task % clients.len()].clone(),
                    locations.clone(),
                    run.clone(),
                );
                Box::pin(async move {
                    assign_new(&client, &run, seq, &locations).await?;
                    Ok(1)
                })
            });
            (op, "Assign of a new user".to_string())
        }
        Workload::Mixed => {
            let probe = probe.unwrap_or_default();
            let op: Op = Arc::new(move |task, seq| {
                let (client, locations, run, probe) = (
                    clients[task % clients.len()].clone(),
                    locations.clone(),
                    run.clone(),
                    probe.clone(),
                );
                Box::pin(async move {
                    if scatter(seq ^ 0x5EED).is_multiple_of(MIXED_WRITE_EVERY) {
                        let assigned = assign_new(&client, &run, seq, &locations).await?;
                        probe.acknowledged(assigned.revision, Instant::now());
                        Ok(1)
                    } else {
                        check(&client, &some_user(seq, users)?).await
                    }
                })
            });
            (
                op,
                "95% CheckAccess (LINEARIZABLE), 5% Assign of a new user; a watcher on the new \
                 users"
                    .to_string(),
            )
        }
        Workload::Import => {
            let op: Op = Arc::new(move |task, seq| {
                let (client, locations, run) = (
                    clients[task % clients.len()].clone(),
                    locations.clone(),
                    run.clone(),
                );
                Box::pin(async move {
                    let first = seq as usize * IMPORT_BATCH_ROWS;
                    let rows = first..first + IMPORT_BATCH_ROWS;
                    place_batch(&client, rows, &locations, |n| format!("bench-i-{run}-{n}")).await
                })
            });
            (
                op,
                format!("BatchAssign of {IMPORT_BATCH_ROWS} new users (items/s = rows/s)"),
            )
        }
    }
}

/// A node's counters of applied log entries and of the writes they carried.
#[derive(Debug, Clone, Copy)]
pub struct AppliedCounts {
    entries: f64,
    writes: f64,
}

impl AppliedCounts {
    /// Writes per entry applied since `before`; `None` if no write was applied (a read
    /// workload).
    pub fn writes_per_entry_since(&self, before: &AppliedCounts) -> Option<f64> {
        let writes = self.writes - before.writes;
        let entries = self.entries - before.entries;
        (writes > 0.0 && entries > 0.0).then(|| writes / entries)
    }
}

/// Reads `residency_entries_applied_total` and `residency_writes_applied_total` from the
/// metrics listener at `address` (plain HTTP, `/metrics`).
pub async fn applied_counts(address: &str) -> anyhow::Result<AppliedCounts> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to the metrics listener {address}"))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    let counter = |name: &str| -> f64 {
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Ok(AppliedCounts {
        entries: counter("residency_entries_applied_total"),
        writes: counter("residency_writes_applied_total"),
    })
}
