//! The node's configuration: a TOML file (every field documented in `docs/configuration.md`),
//! overridden by flags, validated once into a `ValidConfig` that the rest of the node receives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use residency_types::identity::check_trust_domain;
use residency_types::limits::COMMAND_BYTES_MAX;
use residency_types::{Jurisdiction, Role, RoleTable};
use serde::Deserialize;

/// Raft timing and snapshot settings, in milliseconds, entries and bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Build a snapshot once the state's sled tree holds this many changes since the last one
    /// (checked every second), whatever the entries: a bulk import carries 500 per entry.
    pub snapshot_live_changes_max: u64,
    /// Entries kept in the log behind a snapshot, so a briefly lagging follower needs no snapshot.
    pub max_in_snapshot_log_to_keep: u64,
    pub snapshot_chunk_bytes_max: u64,
    /// How long each snapshot chunk but the last may take to reach a receiver and be answered.
    pub install_snapshot_timeout_ms: u64,
    /// How long a snapshot's last chunk waits for the receiver to install the snapshot (its
    /// answer comes once the install is durable); a large state takes minutes.
    pub snapshot_install_wait_ms: u64,
    pub max_payload_entries: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            // Also openraft 0.9's deadline for every AppendEntries: raise it for clusters that
            // take bulk loads on slow machines (see docs/configuration.md).
            heartbeat_interval_ms: 100,
            // A wide window relative to the 150 ms election tick makes openraft 0.9's repeated
            // split vote (one random timeout per process) unlikely; the watchdog covers the rest.
            // Failover takes longer than this window: a follower first waits out the leader
            // lease (election_timeout_ms_max), so expect 4 to 6 s with these values.
            election_timeout_ms_min: 1_000,
            election_timeout_ms_max: 3_000,
            snapshot_logs_since_last: 10_000,
            snapshot_live_changes_max: 2_000_000,
            max_in_snapshot_log_to_keep: 1_000,
            snapshot_chunk_bytes_max: 1024 * 1024,
            install_snapshot_timeout_ms: 10_000,
            snapshot_install_wait_ms: 1_800_000,
            // The network layer also cuts every AppendEntries to about 256 KiB of entries (see
            // `network.rs`), so this count only bounds messages of small entries.
            max_payload_entries: 300,
        }
    }
}

/// The largest `limits.proposal_bytes_max`: an entry stays far below the log's largest record
/// (16 MiB), and a replication message of one such entry below the peer message limit.
const PROPOSAL_BYTES_CEILING: usize = 8 * 1024 * 1024;

/// Limits on requests, in bytes and milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest gRPC message accepted or sent on the client listener.
    pub grpc_message_bytes_max: usize,
    /// Largest message between peers: a replication message (about 256 KiB of entries, plus
    /// one largest command) or a snapshot chunk, with framing.
    pub peer_message_bytes_max: usize,
    /// The deadline of a request that names none, and the cap on any deadline a client names.
    pub request_timeout_ms_max: u64,
    /// Timeout of one peer RPC other than Raft's own (forwarded writes, read index, status).
    pub peer_rpc_timeout_ms: u64,
    /// How long Status waits for each member's own figures.
    pub status_member_timeout_ms: u64,
    /// Reads waiting for a shared read-index round; more are refused with RESOURCE_EXHAUSTED.
    pub read_index_waiters_max: usize,
    /// Requests being served on the client listener at once; more are refused at once with
    /// RESOURCE_EXHAUSTED (`OVERLOADED`), never queued. Streams count until they start.
    pub requests_in_flight_max: usize,
    /// Of those, what one caller (one identity; without a certificate, one address) may hold:
    /// past it, `OVERLOADED` for that caller only.
    pub caller_requests_in_flight_max: usize,
    /// Requests per second one caller (one identity; without a certificate, one address) may
    /// send, and how many it may send at once after a quiet spell. More are refused with
    /// RESOURCE_EXHAUSTED (`RATE_LIMITED`); other callers are not affected.
    pub caller_requests_per_second: u32,
    pub caller_requests_burst: u32,
    /// HTTP/2 streams one connection may have open at once on the client listener.
    pub connection_streams_max: u32,
    /// HTTP/2 pings on every connection, and how long one may stay unanswered before the
    /// connection is closed: half-open connections do not linger.
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// Writes one log entry carries at most: the leader groups the writes that queue while an
    /// entry is on its way to the log (see `proposer.rs`). A follower's call that forwards
    /// writes to the leader carries at most as many.
    pub proposal_writes_max: usize,
    /// The encoded writes of one entry (or one forwarding call) add up to at most this; a write
    /// larger than what is left goes into the next. At least `COMMAND_BYTES_MAX` (64 KiB).
    pub proposal_bytes_max: usize,
    /// Writes waiting for the next entry on the leader (or for the next call to the leader on
    /// a follower); more are refused at once with RESOURCE_EXHAUSTED (`OVERLOADED`).
    pub proposal_queue_writes_max: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            grpc_message_bytes_max: 4 * 1024 * 1024,
            peer_message_bytes_max: 16 * 1024 * 1024,
            request_timeout_ms_max: 10_000,
            peer_rpc_timeout_ms: 5_000,
            status_member_timeout_ms: 1_000,
            read_index_waiters_max: 10_000,
            requests_in_flight_max: 4_096,
            caller_requests_in_flight_max: 2_048,
            caller_requests_per_second: 50_000,
            caller_requests_burst: 100_000,
            connection_streams_max: 1_024,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            proposal_writes_max: 1_024,
            proposal_bytes_max: 1024 * 1024,
            // The client listener's requests in flight, plus what followers forward.
            proposal_queue_writes_max: 8_192,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// sled's page cache, in bytes.
    pub cache_capacity_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            cache_capacity_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `info,openraft=warn`; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info,openraft=warn".to_string(),
        }
    }
}

/// Whether the client listener asks callers for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertificates {
    /// A caller without a certificate from the cluster's CA cannot connect.
    Required,
    /// A caller without a certificate connects and gets `auth.anonymous_role`, if any.
    Optional,
}

/// TLS on the client and peer listeners (rustls). The section is required: a node runs without
/// TLS only when it says so (`enabled = false`), for development.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub enabled: bool,
    /// The CA that signs every node's, service's and operator's certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// This node's certificate (PEM): URI SAN `spiffe://<trust_domain>/node/<node_id>`, subject
    /// country = `jurisdiction`.
    pub cert_file: Option<PathBuf>,
    /// This node's private key (PEM, PKCS#8).
    pub key_file: Option<PathBuf>,
    #[serde(default = "client_certificates_default")]
    pub client_certificates: ClientCertificates,
    #[serde(default = "trust_domain_default")]
    pub trust_domain: String,
    /// How long a connection may take to finish its TLS handshake.
    #[serde(default = "handshake_timeout_ms_default")]
    pub handshake_timeout_ms: u64,
}

fn client_certificates_default() -> ClientCertificates {
    ClientCertificates::Required
}

fn trust_domain_default() -> String {
    residency_types::identity::TRUST_DOMAIN_DEFAULT.to_string()
}

fn handshake_timeout_ms_default() -> u64 {
    5_000
}

/// Who may call what on the client listener (with TLS on).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Identity or `.../*` pattern to role (`reader`, `writer`, `admin`).
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    /// The role of a caller without a certificate (`client_certificates = "optional"` only).
    pub anonymous_role: Option<String>,
}

/// TLS as validated: the files, and the role table.
#[derive(Debug, Clone)]
pub struct ValidTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_certificates: ClientCertificates,
    pub trust_domain: String,
    pub handshake_timeout_ms: u64,
    pub roles: RoleTable,
    pub anonymous_role: Option<Role>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addresses {
    pub client: Option<String>,
    pub peer: Option<String>,
    pub metrics: Option<String>,
}

/// Addresses other nodes and clients should use, when not the bound ones (behind NAT, in
/// containers). Metrics are scraped where they listen, so they have none.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvertiseAddresses {
    pub client: Option<String>,
    pub peer: Option<String>,
}

/// The file as written. Optional sections take the defaults listed in docs/configuration.md.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node_id: Option<u64>,
    pub jurisdiction: Option<String>,
    /// The jurisdiction every member of the cluster must declare (invariant I6); "US" if unset.
    pub required_jurisdiction: Option<String>,
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub listen: Addresses,
    #[serde(default)]
    pub advertise: AdvertiseAddresses,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub log: LogConfig,
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// A configuration that passed validation; the only kind the node accepts.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub node_id: u64,
    pub jurisdiction: Jurisdiction,
    pub required_jurisdiction: Jurisdiction,
    pub data_dir: PathBuf,
    pub listen_client: SocketAddr,
    pub listen_peer: SocketAddr,
    pub listen_metrics: SocketAddr,
    /// Addresses other nodes and clients use; `None` means "the bound listen address".
    pub advertise_client: Option<String>,
    pub advertise_peer: Option<String>,
    pub raft: RaftConfig,
    pub limits: LimitsConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    /// `None`: TLS is off (development only), every caller is anonymous and may do anything.
    pub tls: Option<ValidTls>,
    /// Settings that are valid but have no effect, for the node to log at start.
    pub warnings: Vec<String>,
}

fn socket_addr(field: &'static str, text: Option<&String>) -> Result<SocketAddr, ConfigError> {
    let text = text.ok_or_else(|| invalid(field, "is required"))?;
    text.parse().map_err(|error| {
        invalid(
            field,
            format!("{text:?} is not host:port with an IP host ({error})"),
        )
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    pub fn validate(self) -> Result<ValidConfig, ConfigError> {
        let node_id = self
            .node_id
            .ok_or_else(|| invalid("node_id", "is required"))?;
        if node_id == 0 {
            return Err(invalid("node_id", "must be at least 1"));
        }
        let jurisdiction_text = self
            .jurisdiction
            .ok_or_else(|| invalid("jurisdiction", "is required"))?;
        let jurisdiction = Jurisdiction::parse(&jurisdiction_text)
            .map_err(|error| invalid("jurisdiction", error.message))?;
        let required_text = self
            .required_jurisdiction
            .unwrap_or_else(|| "US".to_string());
        let required_jurisdiction = Jurisdiction::parse(&required_text)
            .map_err(|error| invalid("required_jurisdiction", error.message))?;
        let data_dir = self
            .data_dir
            .ok_or_else(|| invalid("data_dir", "is required"))?;
        let raft = &self.raft;
        if raft.heartbeat_interval_ms == 0 {
            return Err(invalid("raft.heartbeat_interval_ms", "must be positive"));
        }
        if raft.election_timeout_ms_min < 3 * raft.heartbeat_interval_ms {
            return Err(invalid(
                "raft.election_timeout_ms_min",
                "must be at least 3 × raft.heartbeat_interval_ms, or followers campaign between heartbeats",
            ));
        }
        if raft.election_timeout_ms_max < 2 * raft.election_timeout_ms_min {
            return Err(invalid(
                "raft.election_timeout_ms_max",
                "must be at least 2 × raft.election_timeout_ms_min: a narrow window risks repeated split votes",
            ));
        }
        if raft.snapshot_logs_since_last == 0
            || raft.snapshot_live_changes_max == 0
            || raft.max_payload_entries == 0
        {
            return Err(invalid(
                "raft",
                "snapshot_logs_since_last, snapshot_live_changes_max and max_payload_entries \
                 must be positive",
            ));
        }
        let limits = &self.limits;
        // A snapshot chunk, or a full replication batch of the largest commands, travels in
        // one peer message with a little framing around it.
        let framing_bytes = 1024 * 1024;
        if raft.snapshot_chunk_bytes_max + framing_bytes > limits.peer_message_bytes_max as u64 {
            return Err(invalid(
                "raft.snapshot_chunk_bytes_max",
                "must be at least 1 MiB below limits.peer_message_bytes_max",
            ));
        }
        if limits.proposal_bytes_max < COMMAND_BYTES_MAX
            || limits.proposal_bytes_max > PROPOSAL_BYTES_CEILING
        {
            return Err(invalid(
                "limits.proposal_bytes_max",
                format!(
                    "must be from {COMMAND_BYTES_MAX} (one largest write) to {PROPOSAL_BYTES_CEILING} bytes"
                ),
            ));
        }
        // At least one entry always travels, however large.
        let replication_bytes =
            crate::network::REPLICATION_MESSAGE_BYTES_TARGET + limits.proposal_bytes_max;
        if (replication_bytes as u64).saturating_add(framing_bytes)
            > limits.peer_message_bytes_max as u64
        {
            return Err(invalid(
                "limits.peer_message_bytes_max",
                format!(
                    "must hold a replication message ({replication_bytes} bytes) and 1 MiB of framing"
                ),
            ));
        }
        if limits.grpc_message_bytes_max < 2 * COMMAND_BYTES_MAX {
            return Err(invalid(
                "limits.grpc_message_bytes_max",
                "must hold at least two of the largest commands",
            ));
        }
        if limits.request_timeout_ms_max == 0
            || limits.peer_rpc_timeout_ms == 0
            || limits.status_member_timeout_ms == 0
            || limits.read_index_waiters_max == 0
            || limits.requests_in_flight_max == 0
            || limits.caller_requests_in_flight_max == 0
            || limits.caller_requests_per_second == 0
            || limits.caller_requests_burst == 0
            || limits.connection_streams_max == 0
            || limits.keepalive_interval_ms == 0
            || limits.keepalive_timeout_ms == 0
            || limits.proposal_writes_max == 0
            || limits.proposal_queue_writes_max == 0
        {
            return Err(invalid("limits", "every limit must be positive"));
        }
        if limits.caller_requests_in_flight_max > limits.requests_in_flight_max {
            return Err(invalid(
                "limits.caller_requests_in_flight_max",
                "must not exceed limits.requests_in_flight_max",
            ));
        }
        if raft.install_snapshot_timeout_ms == 0 {
            return Err(invalid(
                "raft.install_snapshot_timeout_ms",
                "must be positive",
            ));
        }
        if raft.snapshot_install_wait_ms < raft.install_snapshot_timeout_ms {
            return Err(invalid(
                "raft.snapshot_install_wait_ms",
                "must be at least raft.install_snapshot_timeout_ms",
            ));
        }
        if self.storage.cache_capacity_bytes < 1024 * 1024 {
            return Err(invalid(
                "storage.cache_capacity_bytes",
                "must be at least 1 MiB",
            ));
        }
        let listen_client = socket_addr("listen.client", self.listen.client.as_ref())?;
        let listen_peer = socket_addr("listen.peer", self.listen.peer.as_ref())?;
        let listen_metrics = socket_addr("listen.metrics", self.listen.metrics.as_ref())?;
        let tls = validate_tls(self.tls, &self.auth)?;
        let mut warnings = Vec::new();
        if tls.is_none() && (!self.auth.roles.is_empty() || self.auth.anonymous_role.is_some()) {
            warnings.push(
                "[auth] has no effect with TLS off: every caller may do anything".to_string(),
            );
        }
        Ok(ValidConfig {
            node_id,
            jurisdiction,
            required_jurisdiction,
            data_dir,
            listen_client,
            listen_peer,
            listen_metrics,
            advertise_client: self.advertise.client,
            advertise_peer: self.advertise.peer,
            raft: self.raft,
            limits: self.limits,
            storage: self.storage,
            log: self.log,
            tls,
            warnings,
        })
    }
}

fn validate_tls(
    tls: Option<TlsConfig>,
    auth: &AuthConfig,
) -> Result<Option<ValidTls>, ConfigError> {
    let tls = tls.ok_or_else(|| {
        invalid(
            "tls",
            "is required: give ca_file, cert_file and key_file (residencyctl certs init makes them), \
             or say enabled = false to run without TLS (development only)",
        )
    })?;
    if !tls.enabled {
        return Ok(None);
    }
    let file = |field: &'static str, value: Option<PathBuf>| {
        value.ok_or_else(|| invalid(field, "is required when tls.enabled = true"))
    };
    check_trust_domain(&tls.trust_domain)
        .map_err(|error| invalid("tls.trust_domain", error.to_string()))?;
    if tls.handshake_timeout_ms == 0 {
        return Err(invalid("tls.handshake_timeout_ms", "must be positive"));
    }
    let mut entries = Vec::with_capacity(auth.roles.len());
    for (pattern, role) in &auth.roles {
        let role = Role::parse(role).map_err(|error| invalid("auth.roles", error.to_string()))?;
        entries.push((pattern.as_str(), role));
    }
    let roles =
        RoleTable::new(entries).map_err(|error| invalid("auth.roles", error.to_string()))?;
    let anonymous_role = match &auth.anonymous_role {
        None => None,
        Some(text) if text == "none" => None,
        Some(text) => Some(
            Role::parse(text).map_err(|error| invalid("auth.anonymous_role", error.to_string()))?,
        ),
    };
    if anonymous_role.is_some() && tls.client_certificates == ClientCertificates::Required {
        return Err(invalid(
            "auth.anonymous_role",
            "needs tls.client_certificates = \"optional\": with certificates required, nobody is anonymous",
        ));
    }
    Ok(Some(ValidTls {
        ca_file: file("tls.ca_file", tls.ca_file)?,
        cert_file: file("tls.cert_file", tls.cert_file)?,
        key_file: file("tls.key_file", tls.key_file)?,
        client_certificates: tls.client_certificates,
        trust_domain: tls.trust_domain,
        handshake_timeout_ms: tls.handshake_timeout_ms,
        roles,
        anonymous_role,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ValidConfig, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("test.toml"),
            source: Box::new(source),
        })?;
        config.validate()
    }

    const MINIMAL: &str = r#"
node_id = 1
jurisdiction = "US"
data_dir = "data/node1"
[listen]
client = "127.0.0.1:7101"
peer = "127.0.0.1:7201"
metrics = "127.0.0.1:7301"
[tls]
enabled = false
"#;

    #[test]
    fn a_minimal_config_takes_the_documented_defaults() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.raft.heartbeat_interval_ms, 100);
        assert_eq!(config.jurisdiction, Jurisdiction::US);
    }

    #[test]
    fn bad_configs_name_the_field_at_fault() {
        let cases = [
            (MINIMAL.replace("node_id = 1", "node_id = 0"), "node_id"),
            (MINIMAL.replace("\"US\"", "\"usa\""), "jurisdiction"),
            (
                MINIMAL.replace("127.0.0.1:7201", "localhost"),
                "listen.peer",
            ),
            (
                format!(
                    "{MINIMAL}[raft]\nelection_timeout_ms_min = 1000\nelection_timeout_ms_max = 1500\n"
                ),
                "raft.election_timeout_ms_max",
            ),
            (
                format!("{MINIMAL}[raft]\nheartbeat_interval_ms = 500\n"),
                "raft.election_timeout_ms_min",
            ),
            (
                format!("required_jurisdiction = \"U\"\n{MINIMAL}"),
                "required_jurisdiction",
            ),
            (
                format!("{MINIMAL}[limits]\nstatus_member_timeout_ms = 0\n"),
                "limits",
            ),
            (
                format!("{MINIMAL}[raft]\nsnapshot_install_wait_ms = 9999\n"),
                "raft.snapshot_install_wait_ms",
            ),
        ];
        for (text, field) in cases {
            match parse(&text) {
                Err(ConfigError::Invalid { field: found, .. }) => assert_eq!(found, field),
                other => panic!("expected an error on {field}, got {other:?}"),
            }
        }
        assert!(matches!(
            parse(&format!("{MINIMAL}unknown = 1\n")),
            Err(ConfigError::Parse { .. })
        ));
        let tls_on = MINIMAL.replace(
            "enabled = false",
            "enabled = true\nca_file = \"ca.pem\"\ncert_file = \"n.pem\"\nkey_file = \"n.key\"",
        );
        assert!(parse(&tls_on).expect("valid").tls.is_some());
        let tls_cases = [
            (MINIMAL.replace("[tls]\nenabled = false\n", ""), "tls"),
            (
                MINIMAL.replace("enabled = false", "enabled = true"),
                "tls.ca_file",
            ),
            (
                format!("{tls_on}trust_domain = \"Bad Domain\"\n"),
                "tls.trust_domain",
            ),
            (
                format!(
                    "{tls_on}[auth.roles]\n\"spiffe://residency.local/service/*\" = \"root\"\n"
                ),
                "auth.roles",
            ),
            (
                format!("{tls_on}[auth.roles]\n\"spiffe://residency.local/serv*\" = \"reader\"\n"),
                "auth.roles",
            ),
            (
                format!("{tls_on}[auth]\nanonymous_role = \"reader\"\n"),
                "auth.anonymous_role",
            ),
        ];
        for (text, field) in tls_cases {
            match parse(&text) {
                Err(ConfigError::Invalid { field: found, .. }) => {
                    assert_eq!(found, field, "{text}")
                }
                other => panic!("expected an error on {field}, got {other:?}"),
            }
        }
        let optional = format!(
            "{tls_on}client_certificates = \"optional\"\n[auth]\nanonymous_role = \"reader\"\n"
        );
        assert_eq!(
            parse(&optional)
                .expect("valid")
                .tls
                .expect("tls")
                .anonymous_role,
            Some(Role::Reader)
        );
        let metrics_advertised = format!("{MINIMAL}[advertise]\nmetrics = \"127.0.0.1:1\"\n");
        assert!(matches!(
            parse(&metrics_advertised),
            Err(ConfigError::Parse { .. })
        ));
    }
}
