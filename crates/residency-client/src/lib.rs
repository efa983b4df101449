//! A typed async client for the Residency Registry.
//!
//! Give it the client endpoints of the nodes (`host:port`); it finds the leader for writes by
//! following the leader hints in UNAVAILABLE answers, moves on to the next endpoint when one is
//! unreachable, and retries within the call's deadline. A write keeps its request id across
//! retries, so the registry applies it once however often it is sent.
//!
//! ```no_run
//! # async fn example() -> Result<(), residency_client::ClientError> {
//! use residency_client::{Client, ClientOptions};
//! use residency_types::{Consistency, Jurisdiction, LocationId, UserId};
//!
//! let client = Client::new(vec!["127.0.0.1:7101".into()], ClientOptions::default())?;
//! let user = UserId::parse("user-42").expect("valid id");
//! let location = LocationId::parse("us-east-1/pg-1").expect("valid id");
//! client.assign(&user, Jurisdiction::US, &location, None).await?;
//! let read = client.lookup(&user, Consistency::Linearizable).await?;
//! println!("{:?} at revision {}", read.placement, read.revision);
//! # Ok(()) }
//! ```

mod backup;
pub mod cache;
mod catalog;
mod cluster;
mod error;
mod registry;
mod watch;

pub use backup::BackupSummary;
pub use cache::{CacheOptions, CachedChecker, CachedDecision};
pub use catalog::{PolicyDryRun, Versioned};
pub use registry::{Checked, Moved};
pub use watch::{ListedItem, StateListing, WatchItem, Watcher};

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use error::ClientError;
pub use residency_proto::pb;
use residency_proto::pb::catalog_client::CatalogClient;
use residency_proto::pb::cluster_client::ClusterClient;
use residency_proto::pb::registry_client::RegistryClient;
use residency_types::{Consistency, Placement, ReasonCode, Revision};
use tonic::transport::{Channel, Endpoint};

/// The endpoints a client is given when none are: the local three-node cluster.
pub const LOCAL_ENDPOINTS: &str = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";
/// Where the local cluster keeps its certificates, relative to the repository root.
pub const LOCAL_CERTS_DIR: &str = "data/certs";
/// Largest message the client accepts, in bytes (the server's default limit).
pub(crate) const MESSAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// First pause between retries, doubled after each pause up to the maximum, in milliseconds.
const RETRY_BACKOFF_MS_MIN: u64 = 50;
const RETRY_BACKOFF_MS_MAX: u64 = 1_000;
/// Attempts of one call at most, whatever its deadline.
const CALL_ATTEMPTS_MAX: usize = 64;
const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// HTTP/2 pings on idle connections, and how long one may go unanswered before the connection
/// is taken for dead (a node frozen or cut off without its connections closing).
const KEEPALIVE_INTERVAL_MS: u64 = 10_000;
const KEEPALIVE_TIMEOUT_MS: u64 = 5_000;
/// How long spread reads keep off an endpoint that failed at the transport level.
const ENDPOINT_REST_MS: u64 = 2_000;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The deadline of one call, retries included.
    pub timeout: Duration,
    /// The name recorded with writes when the cluster runs without TLS. With TLS, the registry
    /// records the identity of the client's certificate instead.
    pub caller: String,
    /// Mutual TLS towards the nodes; `None` speaks plaintext (a cluster with TLS off).
    pub tls: Option<TlsOptions>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(10),
            caller: String::new(),
            tls: None,
        }
    }
}

/// The CA that signed the nodes' certificates, and the client's own certificate and key (PEM).
/// The nodes' certificates are checked against the CA and against the host of the endpoint
/// (an IP address or a DNS name in their SANs).
#[derive(Clone)]
pub struct TlsOptions {
    pub ca_pem: Vec<u8>,
    /// The client's certificate and key; without them, only what the cluster grants anonymous
    /// callers is allowed (usually nothing).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|error| {
        ClientError::Config(format!(
            "cannot read the {what} {}: {error}",
            path.display()
        ))
    })
}

impl TlsOptions {
    /// From files: the CA, and the client's certificate and key if given.
    pub fn from_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<TlsOptions, ClientError> {
        let ca_pem = read_pem(ca, "CA certificate")?;
        let identity = match identity {
            Some((cert, key)) => Some((read_pem(cert, "certificate")?, read_pem(key, "key")?)),
            None => None,
        };
        Ok(TlsOptions { ca_pem, identity })
    }

    /// From a directory `residencyctl certs init` wrote: `ca.pem`, `<name>.pem`, `<name>.key`.
    pub fn from_dir(dir: &std::path::Path, name: &str) -> Result<TlsOptions, ClientError> {
        TlsOptions::from_files(
            &dir.join("ca.pem"),
            Some((
                &dir.join(format!("{name}.pem")),
                &dir.join(format!("{name}.key")),
            )),
        )
    }

    /// The certificates a tool on a developer's machine uses: the directory in
    /// `RESIDENCY_CERTS_DIR`, or else `data/certs` (the local cluster's) if it holds a `ca.pem`,
    /// presenting `<name>.pem`; `None` (plaintext) if neither exists.
    pub fn discover(name: &str) -> Result<Option<TlsOptions>, ClientError> {
        let dir = match std::env::var_os("RESIDENCY_CERTS_DIR") {
            Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
            _ => {
                let local = std::path::PathBuf::from(LOCAL_CERTS_DIR);
                if !local.join("ca.pem").exists() {
                    return Ok(None);
                }
                local
            }
        };
        TlsOptions::from_dir(&dir, name).map(Some)
    }

    fn config(&self) -> tonic::transport::ClientTlsConfig {
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        match &self.identity {
            Some((cert, key)) => config.identity(tonic::transport::Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

/// A placement as read, and the state it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read<T> {
    pub placement: T,
    /// The revision of the state read; use it as an `AtLeast` token elsewhere.
    pub revision: Revision,
    pub served_by: u64,
    /// For stale reads: how long since the answering node heard from a leader.
    pub millis_since_leader_contact: Option<u64>,
}

/// The result of an assign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub placement: Placement,
    pub created: bool,
    pub revision: Revision,
}

/// Options of a write beyond its body.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Only if the placement's mod_revision is this (0: must not exist).
    pub expected_mod_revision: Option<Revision>,
    /// The idempotency key; a fresh random one when `None`.
    pub request_id: Option<String>,
    /// Why the write is made, recorded with it.
    pub reason: String,
}

#[derive(Debug)]
pub struct Client {
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Where to send the next call first: the last leader we learned of, or the last endpoint
    /// that answered.
    preferred: Mutex<Option<String>>,
    /// The highest revision any answer has carried: the token for reading one's own writes.
    highest_revision: AtomicU64,
    /// Turns of the read rotation over the endpoints.
    read_turn: AtomicUsize,
    /// Endpoints that failed at the transport level, and until when reads skip them.
    resting: Mutex<HashMap<String, Instant>>,
    options: ClientOptions,
}

/// Where a call goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The leader, as last learned: writes, and reads that need the leader's read index.
    Leader,
    /// The next endpoint in rotation: reads any node can serve alone (`AtLeast`, `Stale`).
    Spread,
}

impl Route {
    pub(crate) fn for_read(consistency: Consistency) -> Route {
        match consistency {
            Consistency::Linearizable => Route::Leader,
            Consistency::AtLeast(_) | Consistency::Stale => Route::Spread,
        }
    }
}

/// What one attempt at one endpoint tells the retry loop.
enum Attempt<T> {
    Done(T),
    Retry {
        next: Option<String>,
        pause: bool,
        error: ClientError,
    },
}

impl Client {
    pub fn new(endpoints: Vec<String>, options: ClientOptions) -> Result<Client, ClientError> {
        let endpoints: Vec<String> = endpoints
            .into_iter()
            .map(|endpoint| endpoint.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".to_string()));
        }
        Ok(Client {
            endpoints,
            channels: Mutex::default(),
            preferred: Mutex::default(),
            highest_revision: AtomicU64::new(0),
            read_turn: AtomicUsize::new(0),
            resting: Mutex::default(),
            options,
        })
    }

    /// The highest revision this client has seen in any answer (a write's, or a read's).
    pub fn highest_revision(&self) -> Revision {
        Revision(self.highest_revision.load(Ordering::SeqCst))
    }

    /// Reads that include every write this client has seen acknowledged, from whichever node
    /// answers first: `AtLeast` its highest revision. Read-your-writes without the leader.
    pub fn read_your_writes(&self) -> Consistency {
        Consistency::AtLeast(self.highest_revision())
    }

    /// Raises the highest revision seen to `revision`.
    pub(crate) fn note_revision(&self, revision: Revision) {
        self.highest_revision
            .fetch_max(revision.0, Ordering::SeqCst);
    }

    /// The endpoint a spread read goes to first: the next in rotation that has not failed in
    /// the last `ENDPOINT_REST_MS`.
    fn next_reader(&self) -> String {
        let now = Instant::now();
        let mut resting = self.resting.lock().expect("resting lock poisoned");
        resting.retain(|_, until| *until > now);
        let turn = self.read_turn.fetch_add(1, Ordering::Relaxed);
        (0..self.endpoints.len())
            .map(|step| &self.endpoints[(turn + step) % self.endpoints.len()])
            .find(|endpoint| !resting.contains_key(*endpoint))
            .unwrap_or(&self.endpoints[turn % self.endpoints.len()])
            .clone()
    }

    /// Keeps spread reads off `endpoint` for a while after it failed at the transport level.
    fn rest(&self, endpoint: &str) {
        let until = Instant::now() + Duration::from_millis(ENDPOINT_REST_MS);
        self.resting
            .lock()
            .expect("resting lock poisoned")
            .insert(endpoint.to_string(), until);
    }

    fn channel(&self, endpoint: &str) -> Result<Channel, ClientError> {
        let mut channels = self.channels.lock().expect("channel lock poisoned");
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let config_error = |error: tonic::transport::Error| {
            ClientError::Config(format!("endpoint {endpoint:?}: {error}"))
        };
        let mut builder = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
            .map_err(config_error)?
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .http2_keep_alive_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
            .keep_alive_timeout(Duration::from_millis(KEEPALIVE_TIMEOUT_MS))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(tls) = &self.options.tls {
            builder = builder.tls_config(tls.config()).map_err(config_error)?;
        }
        let channel = builder.connect_lazy();
        channels.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }

    fn request<T>(&self, message: T, remaining: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(remaining);
        request
    }

    /// Runs `call` against endpoints until it succeeds, fails for good, or the deadline passes.
    async fn with_retries<T, F, Fut>(&self, route: Route, call: F) -> Result<T, ClientError>
    where
        F: Fn(String, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.options.timeout;
        let first = match route {
            Route::Leader => self
                .preferred
                .lock()
                .expect("preferred lock poisoned")
                .clone(),
            Route::Spread => Some(self.next_reader()),
        };
        let mut next = first.unwrap_or_else(|| self.endpoints[0].clone());
        let mut rotation = 0;
        let mut backoff_ms = RETRY_BACKOFF_MS_MIN;
        let mut failed: Vec<String> = Vec::new();
        let mut last_error = None;
        for _ in 0..CALL_ATTEMPTS_MAX {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let attempt = match call(next.clone(), remaining).await {
                Ok(value) => Attempt::Done(value),
                Err(status) => classify(status),
            };
            let (hinted, pause, error) = match attempt {
                Attempt::Done(value) => {
                    if route == Route::Leader {
                        *self.preferred.lock().expect("preferred lock poisoned") = Some(next);
                    }
                    return Ok(value);
                }
                Attempt::Retry { next, pause, error } => (next, pause, error),
            };
            if !error.is_retryable() {
                return Err(error);
            }
            if error.is_transport() {
                self.rest(&next);
            }
            failed.push(next.clone());
            // Report the most telling failure: a server's reason beats a later transport error
            // (such as running out of deadline while retrying).
            let keep_previous = error.reason().is_none()
                && last_error
                    .as_ref()
                    .is_some_and(|e: &ClientError| e.reason().is_some());
            if !keep_previous {
                last_error = Some(error);
            }
            // Follow a leader hint at once, unless that node already failed us in this call:
            // then the hint is stale (the cluster is electing) and we wait and rotate instead.
            let fresh_hint = hinted.filter(|leader| !failed.contains(leader));
            let follow_at_once = fresh_hint.is_some() && !pause;
            next = match fresh_hint {
                Some(leader) => leader,
                None => {
                    rotation += 1;
                    self.endpoints[rotation % self.endpoints.len()].clone()
                }
            };
            if route == Route::Leader {
                *self.preferred.lock().expect("preferred lock poisoned") = Some(next.clone());
            }
            if !follow_at_once {
                let pause_ms =
                    backoff_ms.min(u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX));
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                backoff_ms = (backoff_ms * 2).min(RETRY_BACKOFF_MS_MAX);
                failed.clear();
            }
        }
        Err(last_error.unwrap_or(ClientError::Deadline))
    }

    /// Sends one RPC with retries: `rpc` gets a channel to the endpoint chosen for the attempt.
    pub(crate) async fn call<Req, Resp, F, Fut>(
        &self,
        message: Req,
        rpc: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.call_routed(Route::Leader, message, rpc).await
    }

    /// `call`, starting where `route` says.
    pub(crate) async fn call_routed<Req, Resp, F, Fut>(
        &self,
        route: Route,
        message: Req,
        rpc: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let rpc = &rpc;
        let message = &message;
        self.with_retries(route, |endpoint, remaining| async move {
            let channel = self
                .channel(&endpoint)
                .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
            rpc(channel, self.request(message.clone(), remaining)).await
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// The context of a write: its request id (random unless given), caller and reason.
    pub(crate) fn context(&self, options: &WriteOptions) -> pb::WriteContext {
        pb::WriteContext {
            request_id: options
                .request_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            caller: self.options.caller.clone(),
            reason: options.reason.clone(),
        }
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The endpoints this client was given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }
}

pub(crate) fn registry_client(channel: Channel) -> RegistryClient<Channel> {
    RegistryClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

pub(crate) fn catalog_client(channel: Channel) -> CatalogClient<Channel> {
    CatalogClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

pub(crate) fn cluster_client(channel: Channel) -> ClusterClient<Channel> {
    ClusterClient::new(channel)
}

fn classify<T>(status: tonic::Status) -> Attempt<T> {
    let error = ClientError::from_status(status);
    match &error {
        ClientError::Status {
            reason: Some(ReasonCode::NotLeader),
            leader_addr,
            ..
        } => Attempt::Retry {
            next: leader_addr.clone(),
            pause: leader_addr.is_none(),
            error,
        },
        ClientError::Status {
            reason: Some(ReasonCode::NoLeader | ReasonCode::QuorumUnavailable),
            ..
        } => Attempt::Retry {
            next: None,
            pause: true,
            error,
        },
        _ => Attempt::Retry {
            next: None,
            pause: false,
            error,
        },
    }
}
