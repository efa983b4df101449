//! Who may call what: a tower layer in front of both gRPC listeners.
//!
//! On the client listener it finds the caller's identity in its verified certificate, sheds load
//! (a cap on requests in flight, a rate per caller), and checks the caller's role against the
//! method's (`client_method_access`, one table for every RPC). On the peer listener it admits
//! only nodes of the cluster's trust domain whose certificate carries the cluster's
//! jurisdiction. A refusal is answered here, before the request is decoded, so it changes
//! nothing; refusals for identity or role are recorded in the audit file.
//!
//! Handlers find the admitted [`Caller`] in the request's extensions (see [`caller_of`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use residency_types::{Identity, Jurisdiction, Role};
use rustls::pki_types::CertificateDer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::audit_log::AuditLog;
use crate::error::ApiError;
use crate::tls::{CertIdentity, cert_identity, peer_node};

/// Certificates whose parsed identity is kept, so a connection's requests parse it once.
const IDENTITY_CACHE_ENTRIES_MAX: usize = 4_096;
/// Callers whose rate is tracked at once; idle ones are dropped first.
const RATE_BUCKETS_MAX: usize = 16_384;

/// What a method on the client listener asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone who could connect: the health service.
    Open,
    /// At least this role.
    Needs(Role),
}

/// The role every RPC of the client listener needs, by gRPC path. A method not listed here
/// needs `admin` (and is then answered UNIMPLEMENTED), so a new RPC is closed until placed.
pub fn client_method_access(path: &str) -> Access {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Needs(Role::Admin);
    };
    match (service, method) {
        ("grpc.health.v1.Health", _) => Access::Open,
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _) => {
            Access::Needs(Role::Reader)
        }
        ("residency.v1.Registry", "Lookup" | "BatchLookup" | "CheckAccess" | "CurrentRevision")
        | ("residency.v1.Watch", "Watch" | "ListState")
        | (
            "residency.v1.Catalog",
            "GetLocation" | "ListLocations" | "GetPolicy" | "ListPolicies" | "DryRunPolicy",
        )
        | ("residency.v1.Cluster", "Status" | "Digest") => Access::Needs(Role::Reader),
        (
            "residency.v1.Registry",
            "Assign" | "Forget" | "BatchAssign" | "BeginMove" | "CompleteMove" | "AbortMove",
        ) => Access::Needs(Role::Writer),
        (
            "residency.v1.Registry",
            // An export is every placement at once: bulk egress, as a backup is.
            "ExportPlacements",
        )
        | ("residency.v1.Catalog", "PutLocation" | "SetLocationState" | "PutPolicy")
        | (
            "residency.v1.Cluster",
            "Initialize" | "AddLearner" | "Promote" | "RemoveMember" | "Backup",
        ) => Access::Needs(Role::Admin),
        _ => Access::Needs(Role::Admin),
    }
}

/// The caller as admitted: handlers read it from the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// From the certificate; `None` without TLS or without a certificate.
    pub identity: Option<Identity>,
    pub role: Option<Role>,
    /// The address the request came from.
    pub remote: String,
}

impl Caller {
    /// The identity's URI, or `anonymous`.
    pub fn name(&self) -> &str {
        self.identity.as_ref().map_or("anonymous", Identity::uri)
    }
}

/// The admitted caller of `request`, or an anonymous one (a request made in-process).
pub fn caller_of<T>(request: &tonic::Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller {
            identity: None,
            role: None,
            remote: String::new(),
        })
}

/// What an audited change was about and the revision it was written at, filled in by its
/// handler (see [`audit_note`]) and read by the layer when it records the answer.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<(String, u64)>>);

impl AuditNote {
    /// What the request was about: a location, a jurisdiction, a node.
    pub fn subject(&self, subject: impl Into<String>) {
        self.0.lock().expect("audit note lock").0 = subject.into();
    }

    /// The revision the change was written at.
    pub fn revision(&self, revision: u64) {
        self.0.lock().expect("audit note lock").1 = revision;
    }
}

/// The audit note of this request; notes on a request that is not audited go nowhere.
pub fn audit_note<T>(request: &tonic::Request<T>) -> AuditNote {
    request
        .extensions()
        .get::<AuditNote>()
        .cloned()
        .unwrap_or_default()
}

/// Which listener a layer guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Client,
    Peer,
}

/// Load limits of the client listener.
#[derive(Debug, Clone, Copy)]
pub struct Shedding {
    pub requests_in_flight_max: usize,
    /// Of those, what one caller may hold, so one caller cannot take the whole node.
    pub caller_requests_in_flight_max: usize,
    pub caller_requests_per_second: u32,
    pub caller_requests_burst: u32,
}

/// The TLS side of authorization: the trust domain, the roles, the cluster's jurisdiction.
#[derive(Debug, Clone)]
pub struct TlsPolicy {
    pub trust_domain: String,
    pub roles: residency_types::RoleTable,
    pub anonymous_role: Option<Role>,
    pub jurisdiction: Jurisdiction,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refreshed: Instant,
}

/// The shared state of one listener's layer.
#[derive(Debug)]
pub struct Authorizer {
    listener: Listener,
    /// `None`: TLS is off, every caller is anonymous and treated as `admin`.
    tls: Option<TlsPolicy>,
    shedding: Shedding,
    in_flight: Arc<Semaphore>,
    /// Requests in flight per caller (rate key), for `caller_requests_in_flight_max`.
    caller_in_flight: Arc<Mutex<HashMap<String, usize>>>,
    identities: Mutex<HashMap<Vec<u8>, Result<CertIdentity, String>>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    audit: AuditLog,
}

/// What admission hands the service: the caller, and the in-flight permits held until the
/// answer's head is sent.
#[derive(Debug)]
struct Admitted {
    caller: Caller,
    permit: Option<(OwnedSemaphorePermit, CallerSlot)>,
    /// An admin call on the client listener, recorded in the audit file with its outcome.
    audited: bool,
}

/// One of a caller's requests in flight; gives its slot back when dropped.
#[derive(Debug)]
struct CallerSlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("caller in-flight lock");
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

fn remote_of<B>(request: &http::Request<B>) -> String {
    let extensions = request.extensions();
    extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.get_ref().remote_addr())
        .or_else(|| {
            extensions
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
        })
        .map_or_else(String::new, |addr| addr.to_string())
}

fn peer_certificate<B>(request: &http::Request<B>) -> Option<CertificateDer<'static>> {
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .and_then(|certs| certs.first().cloned())
}

impl Authorizer {
    pub fn new(
        listener: Listener,
        tls: Option<TlsPolicy>,
        shedding: Shedding,
        audit: AuditLog,
    ) -> Arc<Authorizer> {
        Arc::new(Authorizer {
            listener,
            tls,
            shedding,
            in_flight: Arc::new(Semaphore::new(shedding.requests_in_flight_max)),
            caller_in_flight: Arc::default(),
            identities: Mutex::default(),
            buckets: Mutex::default(),
            audit,
        })
    }

    /// The holder of `cert`, parsed once per certificate.
    fn holder(&self, cert: &CertificateDer<'_>) -> Result<CertIdentity, String> {
        let mut cache = self.identities.lock().expect("identity cache lock");
        if let Some(known) = cache.get(cert.as_ref()) {
            return known.clone();
        }
        let parsed = cert_identity(cert).map_err(|error| error.to_string());
        if cache.len() >= IDENTITY_CACHE_ENTRIES_MAX {
            cache.clear();
        }
        cache.insert(cert.to_vec(), parsed.clone());
        parsed
    }

    /// Takes one token from `key`'s bucket; false when it has none left. Past
    /// `RATE_BUCKETS_MAX` tracked callers (after dropping the full buckets), new callers share
    /// one overflow bucket: spraying new identities or addresses buys no extra rate.
    fn take_token(&self, key: &str) -> bool {
        let rate = f64::from(self.shedding.caller_requests_per_second);
        let burst = f64::from(self.shedding.caller_requests_burst);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate buckets lock");
        let mut key = key;
        if buckets.len() >= RATE_BUCKETS_MAX && !buckets.contains_key(key) {
            // Drop the buckets that have refilled: their callers lose nothing.
            buckets.retain(|_, bucket| {
                bucket.tokens + now.duration_since(bucket.refreshed).as_secs_f64() * rate < burst
            });
            if buckets.len() >= RATE_BUCKETS_MAX {
                key = OVERFLOW_BUCKET;
            }
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            refreshed: now,
        });
        let elapsed = now.duration_since(bucket.refreshed).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refreshed = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The caller's share of the rate (`key` is its `rate_key`): one token, or `RATE_LIMITED`.
    fn rate(&self, caller: &Caller, key: &str) -> Result<(), ApiError> {
        if self.take_token(key) {
            return Ok(());
        }
        Err(ApiError::RateLimited(format!(
            "{} sent more than {} requests per second to this node (burst {}); retry with backoff",
            caller.name(),
            self.shedding.caller_requests_per_second,
            self.shedding.caller_requests_burst
        )))
    }

    /// Who calls, and why they may not (if so): the certificate's identity, the peer port's
    /// rule, the role table.
    fn identify<B>(
        &self,
        request: &http::Request<B>,
        tls: &TlsPolicy,
        access: Access,
    ) -> (Caller, Option<ApiError>) {
        let path = request.uri().path();
        let anonymous = Caller {
            identity: None,
            role: None,
            remote: remote_of(request),
        };
        let refuse = |message: String| match self.listener {
            Listener::Peer => ApiError::PeerNotAllowed(message),
            Listener::Client => ApiError::PermissionDenied(message),
        };
        let holder = match peer_certificate(request).map(|cert| self.holder(&cert)) {
            None => None,
            Some(Ok(holder)) => Some(holder),
            Some(Err(message)) => {
                let message = format!("the certificate names no identity we accept: {message}");
                return (anonymous, Some(refuse(message)));
            }
        };
        if self.listener == Listener::Peer {
            let Some(holder) = holder else {
                let message = "the peer port needs a node certificate".to_string();
                return (anonymous, Some(refuse(message)));
            };
            let refusal = peer_node(&holder, &tls.trust_domain, tls.jurisdiction)
                .err()
                .map(refuse);
            let caller = Caller {
                identity: Some(holder.identity),
                ..anonymous
            };
            return (caller, refusal);
        }
        let caller = match holder {
            Some(holder) => Caller {
                role: tls.roles.role_of(&holder.identity),
                identity: Some(holder.identity),
                ..anonymous
            },
            None => Caller {
                role: tls.anonymous_role,
                ..anonymous
            },
        };
        let refusal = match access {
            Access::Open => None,
            Access::Needs(needed) => match (&caller.identity, caller.role) {
                (_, Some(role)) if role >= needed => None,
                (None, None) => Some(ApiError::Unauthenticated(format!(
                    "{path} needs a client certificate with the {needed} role"
                ))),
                (_, None) => Some(refuse(format!(
                    "{} has no role on this cluster",
                    caller.name()
                ))),
                (_, Some(role)) => Some(refuse(format!(
                    "{} has the {role} role; {path} needs {needed}",
                    caller.name()
                ))),
            },
        };
        (caller, refusal)
    }

    /// Admits a request or says why not. On the client listener every call but health first
    /// takes its share of the caller's rate, refused ones included, so that refusals cannot
    /// flood the node or its audit file; then the role; then a permit of the in-flight cap.
    /// The peer port is never shed (Raft must not starve); its refusals are rate-limited only
    /// in what they write to the audit file (see `call`).
    fn admit<B>(&self, request: &http::Request<B>) -> Result<Admitted, Box<(ApiError, Caller)>> {
        let access = client_method_access(request.uri().path());
        let (caller, refusal) = match &self.tls {
            Some(tls) => self.identify(request, tls, access),
            // TLS off (development): nobody can be told apart, so nobody is refused.
            None => (
                Caller {
                    identity: None,
                    role: Some(Role::Admin),
                    remote: remote_of(request),
                },
                None,
            ),
        };
        if self.listener == Listener::Peer || access == Access::Open {
            return match refusal {
                None => Ok(Admitted {
                    caller,
                    permit: None,
                    audited: false,
                }),
                Some(error) => Err(Box::new((error, caller))),
            };
        }
        let key = rate_key(&caller);
        if let Err(error) = self.rate(&caller, &key) {
            return Err(Box::new((error, caller)));
        }
        if let Some(error) = refusal {
            return Err(Box::new((error, caller)));
        }
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let error = ApiError::Overloaded(format!(
                "{} requests in flight on this node; retry with backoff",
                self.shedding.requests_in_flight_max
            ));
            return Err(Box::new((error, caller)));
        };
        {
            let mut counts = self.caller_in_flight.lock().expect("caller in-flight lock");
            let count = counts.entry(key.clone()).or_insert(0);
            if *count >= self.shedding.caller_requests_in_flight_max {
                let error = ApiError::Overloaded(format!(
                    "{} has {} requests in flight on this node, its most; retry with backoff",
                    caller.name(),
                    self.shedding.caller_requests_in_flight_max
                ));
                return Err(Box::new((error, caller)));
            }
            *count += 1;
        }
        let slot = CallerSlot {
            counts: self.caller_in_flight.clone(),
            key,
        };
        Ok(Admitted {
            caller,
            permit: Some((permit, slot)),
            // The admin calls: every one is recorded, not only its refusal.
            audited: access == Access::Needs(Role::Admin),
        })
    }

    /// Whether a refusal goes to the audit file: always on the client listener (its refusals
    /// passed the rate), within the caller's rate on the peer port.
    fn audits_refusal(&self, caller: &Caller) -> bool {
        match self.listener {
            Listener::Client => true,
            Listener::Peer => self.take_token(&rate_key(caller)),
        }
    }
}

/// The bucket new callers share once `RATE_BUCKETS_MAX` are tracked.
const OVERFLOW_BUCKET: &str = "";

/// What a caller's rate is counted by: its identity, or without one its address's host.
fn rate_key(caller: &Caller) -> String {
    match &caller.identity {
        Some(identity) => identity.uri().to_string(),
        None => caller
            .remote
            .rsplit_once(':')
            .map_or(caller.remote.as_str(), |(host, _)| host)
            .to_string(),
    }
}

/// The layer for one listener.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authorizer: Arc<Authorizer>,
}

impl AuthLayer {
    pub fn new(authorizer: Arc<Authorizer>) -> AuthLayer {
        AuthLayer { authorizer }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            authorizer: self.authorizer.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    authorizer: Arc<Authorizer>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The gRPC code and reason of an answer, from its head (a refusal is trailers-only).
fn outcome_of<B>(response: &http::Response<B>) -> String {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    match header("grpc-status").as_deref() {
        None | Some("0") => "OK".to_string(),
        Some(code) => header(residency_proto::metadata::REASON_KEY)
            .unwrap_or_else(|| format!("GRPC_STATUS_{code}")),
    }
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let authorizer = self.authorizer.clone();
        match authorizer.admit(&request) {
            Err(refused) => {
                let (error, caller) = *refused;
                let path = request.uri().path();
                let outcome = error.reason_code();
                metrics::counter!("residency_requests_refused_total", "reason" => outcome.as_str())
                    .increment(1);
                if !matches!(error, ApiError::Overloaded(_) | ApiError::RateLimited(_))
                    && authorizer.audits_refusal(&caller)
                {
                    let audit = &authorizer.audit;
                    audit.queue(audit.entry(
                        path,
                        caller.name(),
                        &caller.remote,
                        String::new(),
                        outcome.as_str(),
                        0,
                    ));
                }
                let status = tonic::Status::from(error);
                Box::pin(async move { Ok(status.into_http()) })
            }
            Ok(admitted) => {
                let Admitted {
                    caller,
                    permit,
                    audited,
                } = admitted;
                // The usual tower move: the clone that was made ready serves this call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                if !audited {
                    request.extensions_mut().insert(caller);
                    let future = inner.call(request);
                    return Box::pin(async move {
                        let response = future.await;
                        drop(permit);
                        response
                    });
                }
                let path = request.uri().path().to_string();
                let note = AuditNote::default();
                request.extensions_mut().insert(note.clone());
                request.extensions_mut().insert(caller.clone());
                let future = inner.call(request);
                // An admin change runs to its end and is recorded in its own task: a client that
                // hangs up, or whose deadline passes, cannot leave a change without its record.
                let task = tokio::spawn(async move {
                    let response = future.await;
                    drop(permit);
                    if let Ok(response) = &response {
                        let (subject, noted_revision) =
                            note.0.lock().expect("audit note lock").clone();
                        let revision = response
                            .headers()
                            .get(residency_proto::metadata::REVISION_KEY)
                            .and_then(|value| value.to_str().ok())
                            .and_then(|text| text.parse().ok())
                            .unwrap_or(noted_revision);
                        let audit = &authorizer.audit;
                        let entry = audit.entry(
                            &path,
                            caller.name(),
                            &caller.remote,
                            subject,
                            &outcome_of(response),
                            revision,
                        );
                        audit.record(entry).await;
                    }
                    response
                });
                Box::pin(async move {
                    match task.await {
                        Ok(response) => response,
                        Err(error) if error.is_panic() => {
                            std::panic::resume_unwind(error.into_panic())
                        }
                        // The runtime is shutting down.
                        Err(_) => Ok(tonic::Status::from(ApiError::ShuttingDown).into_http()),
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_the_client_listener_has_its_role() {
        let set = public_method_paths();
        assert!(set.len() > 30, "{set:?}");
        for path in set {
            let access = client_method_access(&path);
            if path.starts_with("/residency.peer.v1.") {
                continue;
            }
            // Every public method is placed on purpose: reads for readers, writes for
            // writers, everything else for admins.
            let expected = if path.contains("/Lookup")
                || path.contains("/BatchLookup")
                || path.contains("/CheckAccess")
                || path.contains("/CurrentRevision")
                || path.starts_with("/residency.v1.Watch/")
                || path.contains("/Get")
                || path.contains("/List")
                || path.contains("/DryRunPolicy")
                || path.ends_with("/Status")
                || path.ends_with("/Digest")
            {
                Role::Reader
            } else if path.starts_with("/residency.v1.Registry/")
                && !path.ends_with("/ExportPlacements")
            {
                Role::Writer
            } else {
                Role::Admin
            };
            assert_eq!(access, Access::Needs(expected), "{path}");
        }
    }

    /// Every method of the public services, as gRPC paths, read from the descriptor set.
    fn public_method_paths() -> Vec<String> {
        // The descriptor set is a FileDescriptorSet; walk it with a tiny reader of the fields
        // we need (file = 1; package = 2, service = 6; service name = 1, method = 2; method
        // name = 1) rather than pull in prost-types.
        fn fields(mut bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
            let mut out = Vec::new();
            while !bytes.is_empty() {
                let key = prost::encoding::decode_varint(&mut bytes).expect("key");
                let (number, wire) = (key >> 3, key & 7);
                match wire {
                    0 => {
                        prost::encoding::decode_varint(&mut bytes).expect("varint");
                    }
                    2 => {
                        let len = prost::encoding::decode_varint(&mut bytes).expect("len") as usize;
                        out.push((number, bytes[..len].to_vec()));
                        bytes = &bytes[len..];
                    }
                    1 => bytes = &bytes[8..],
                    5 => bytes = &bytes[4..],
                    _ => panic!("unexpected wire type {wire}"),
                }
            }
            out
        }
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).expect("utf-8");
        let mut paths = Vec::new();
        for (number, file) in fields(residency_proto::FILE_DESCRIPTOR_SET) {
            assert_eq!(number, 1);
            let file = fields(&file);
            let package = file
                .iter()
                .find(|(n, _)| *n == 2)
                .map(|(_, b)| text(b))
                .unwrap_or_default();
            for (_, service) in file.iter().filter(|(n, _)| *n == 6) {
                let service = fields(service);
                let name = service
                    .iter()
                    .find(|(n, _)| *n == 1)
                    .map(|(_, b)| text(b))
                    .expect("service name");
                for (_, method) in service.iter().filter(|(n, _)| *n == 2) {
                    let method = fields(method);
                    let method_name = method
                        .iter()
                        .find(|(n, _)| *n == 1)
                        .map(|(_, b)| text(b))
                        .expect("method name");
                    paths.push(format!("/{package}.{name}/{method_name}"));
                }
            }
        }
        paths
    }

    #[test]
    fn health_is_open_and_unknown_methods_need_admin() {
        assert_eq!(
            client_method_access("/grpc.health.v1.Health/Check"),
            Access::Open
        );
        assert_eq!(
            client_method_access("/residency.v1.Registry/NoSuchMethod"),
            Access::Needs(Role::Admin)
        );
        assert_eq!(client_method_access("garbage"), Access::Needs(Role::Admin));
    }
}
