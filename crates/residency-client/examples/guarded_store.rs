//! A service that keeps users' documents in storage locations and asks the registry, through
//! `CachedChecker`, before every operation: the pattern services should copy.
//!
//! Against the local cluster (`./cluster/local.sh up`):
//!
//! `cargo run -p residency-client --example guarded_store`
//!
//! (or give the endpoints: `-- 127.0.0.1:7101,127.0.0.1:7102`). It places a demo user, then
//! shows an allowed write and read, a denied foreign accessor, a move (reads allowed, writes
//! denied), and a write fenced off by the epoch after the move. It exits non-zero if any step
//! does not go as the rules say.
//!
//! What to copy:
//! 1. One checker per process, started at boot; take no traffic before `wait_fresh`.
//! 2. Ask before every operation, with the jurisdiction the caller acts from.
//! 3. Treat anything but `Allow` as a refusal, `CACHE_NOT_FRESH` included, and say why.
//! 4. Use the location the decision names, never one remembered from earlier, and hand the
//!    epoch to the storage as a fencing token: storage refuses an epoch older than it has seen,
//!    so a write decided before a move cannot land after it.
//! 5. After writing to the registry yourself, `wait_revision` before trusting the cache with it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use residency_client::{
    CacheOptions, CachedChecker, Client, ClientOptions, LOCAL_ENDPOINTS, TlsOptions,
};
use residency_types::{AccessOperation, Decision, Jurisdiction, LocationId, UserId};

/// A stand-in for the storage: documents per location, and the newest epoch each user's data
/// has been written with there (the fence).
#[derive(Debug, Default)]
struct Storage {
    documents: HashMap<(LocationId, UserId), String>,
    epochs: HashMap<UserId, u64>,
}

impl Storage {
    fn write(
        &mut self,
        at: &LocationId,
        user: &UserId,
        epoch: u64,
        document: &str,
    ) -> Result<(), String> {
        let newest = self.epochs.get(user).copied().unwrap_or(0);
        if epoch < newest {
            return Err(format!("fenced: epoch {epoch} is older than {newest}"));
        }
        self.epochs.insert(user.clone(), epoch);
        self.documents
            .insert((at.clone(), user.clone()), document.to_string());
        Ok(())
    }
}

/// Why the service refused an operation.
#[derive(Debug)]
enum Refused {
    Registry(&'static str),
    Storage(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Registry(reason) => write!(f, "refused by the registry: {reason}"),
            Refused::Storage(why) => write!(f, "refused by the storage: {why}"),
        }
    }
}

/// What a step answered, for the output.
fn outcome<T: std::fmt::Debug>(result: &Result<T, Refused>) -> String {
    match result {
        Ok(value) => format!("ok: {value:?}"),
        Err(refused) => refused.to_string(),
    }
}

/// The service: every operation asks the checker first.
struct GuardedStore {
    checker: CachedChecker,
    storage: Mutex<Storage>,
}

impl GuardedStore {
    fn put(
        &self,
        user: &UserId,
        caller: Jurisdiction,
        document: &str,
    ) -> Result<LocationId, Refused> {
        match self
            .checker
            .check_access(user, caller, AccessOperation::Write)
            .decision
        {
            Decision::Allow {
                location_id, epoch, ..
            } => {
                self.storage
                    .lock()
                    .expect("storage lock")
                    .write(&location_id, user, epoch, document)
                    .map_err(Refused::Storage)?;
                Ok(location_id)
            }
            Decision::Deny { reason } => Err(Refused::Registry(reason.as_str())),
        }
    }

    fn get(&self, user: &UserId, caller: Jurisdiction) -> Result<Option<String>, Refused> {
        match self
            .checker
            .check_access(user, caller, AccessOperation::Read)
            .decision
        {
            // During a move, reads come from the source, which `location_id` still names.
            Decision::Allow { location_id, .. } => Ok(self
                .storage
                .lock()
                .expect("storage lock")
                .documents
                .get(&(location_id, user.clone()))
                .cloned()),
            Decision::Deny { reason } => Err(Refused::Registry(reason.as_str())),
        }
    }
}

fn expect<T: std::fmt::Debug>(
    step: &str,
    result: &Result<T, Refused>,
    ok: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "{} {step} ({})",
        if ok { "ok  " } else { "FAIL" },
        outcome(result)
    );
    if ok {
        Ok(())
    } else {
        Err(format!("step failed: {step}").into())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoints = std::env::args()
        .nth(1)
        .unwrap_or_else(|| LOCAL_ENDPOINTS.to_string());
    let endpoints: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    let options = ClientOptions {
        timeout: Duration::from_secs(10),
        caller: "example-guarded-store".to_string(),
        // A service with the writer role in the local cluster (RESIDENCY_CERTS_DIR, or the
        // local cluster's data/certs).
        tls: TlsOptions::discover("service-onboarding")?,
    };
    // The registry client this service uses for its own (rare) registry writes.
    let client = Client::new(endpoints.clone(), options.clone())?;
    let store = GuardedStore {
        checker: CachedChecker::start(Client::new(endpoints, options)?, CacheOptions::default()),
        storage: Mutex::default(),
    };
    store.checker.wait_fresh(Duration::from_secs(60)).await?;

    // Onboarding: place the demo user at the first active US location.
    let locations = client
        .list_locations(residency_types::Consistency::Linearizable)
        .await?;
    let mut us_locations = locations.iter().filter(|location| {
        location.jurisdiction == Jurisdiction::US
            && location.state == residency_types::LocationState::Active
    });
    let (Some(home), Some(away)) = (us_locations.next(), us_locations.next()) else {
        return Err("the registry needs two active US locations".into());
    };
    let user = UserId::parse(format!("example-user-{}", std::process::id()))?;
    client
        .assign(&user, Jurisdiction::US, &home.id, None)
        .await?;
    store
        .checker
        .wait_revision(client.highest_revision(), Duration::from_secs(30))
        .await?;

    let cn = Jurisdiction::parse("CN")?;
    let written = store.put(&user, Jurisdiction::US, "v1");
    let ok = matches!(&written, Ok(at) if *at == home.id);
    expect("a US service writes at the user's location", &written, ok)?;
    let read = store.get(&user, Jurisdiction::US);
    let ok = matches!(&read, Ok(Some(document)) if document == "v1");
    expect("and reads it back", &read, ok)?;
    let foreign = store.get(&user, cn);
    let ok = matches!(
        foreign,
        Err(Refused::Registry("ACCESSOR_JURISDICTION_NOT_ALLOWED"))
    );
    expect("a CN accessor is refused by the policy", &foreign, ok)?;

    // A decision taken before the move, to be used after it (a slow request).
    let before_move = store
        .checker
        .check_access(&user, Jurisdiction::US, AccessOperation::Write);

    client.begin_move(&user, &away.id, None).await?;
    store
        .checker
        .wait_revision(client.highest_revision(), Duration::from_secs(30))
        .await?;
    let during = store.put(&user, Jurisdiction::US, "v2");
    let ok = matches!(during, Err(Refused::Registry("USER_MOVING")));
    expect("while the data moves, writes are refused", &during, ok)?;
    let read = store.get(&user, Jurisdiction::US);
    let ok = matches!(&read, Ok(Some(document)) if document == "v1");
    expect("and reads still come from the source", &read, ok)?;

    // The data is copied (here: the one document), then the move completes; the epoch rises.
    {
        let mut storage = store.storage.lock().expect("storage lock");
        let document = storage.documents[&(home.id.clone(), user.clone())].clone();
        storage
            .documents
            .insert((away.id.clone(), user.clone()), document);
    }
    let moved = client.complete_move(&user, None).await?;
    store
        .checker
        .wait_revision(client.highest_revision(), Duration::from_secs(30))
        .await?;
    let after = store.put(&user, Jurisdiction::US, "v3");
    let ok = matches!(&after, Ok(at) if *at == away.id);
    expect("after the move, writes go to the new location", &after, ok)?;

    // The slow request finally writes with its old decision: the storage fences it off.
    let Decision::Allow {
        location_id, epoch, ..
    } = before_move.decision
    else {
        return Err("the decision before the move was not an allow".into());
    };
    let late = store
        .storage
        .lock()
        .expect("storage lock")
        .write(&location_id, &user, epoch, "late")
        .map_err(Refused::Storage);
    let step = format!(
        "a write decided at epoch {epoch} is fenced off at epoch {}",
        moved.placement.epoch
    );
    expect(&step, &late, late.is_err())?;

    client.forget(&user, None).await?;
    let stats = store.checker.stats();
    println!(
        "cache: {:?}; {} checks answered in-process",
        store.checker.freshness(),
        stats.hits
    );
    Ok(())
}
