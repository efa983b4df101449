//! The test harness: real `residencyd` processes on loopback, each with its own sled directory,
//! started, killed and restarted the way an operator (or a crash) would.
//!
//! Tests run one cluster at a time (`serially`): on a 2-core machine two clusters at once make
//! election timing a matter of luck. When a test fails, the cluster's directory (configs, data,
//! each node's log) is kept and its path printed.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use residency_client::{Client, ClientOptions, TlsOptions, pb};
use residency_types::{Jurisdiction, Labels, LocationId};

pub mod docker;
pub mod history;

/// How long a cluster may take to elect a leader after start or after losing one.
pub const LEADER_WAIT: Duration = Duration::from_secs(30);
/// How long a node may take to open its client port.
const PORT_WAIT: Duration = Duration::from_secs(30);
/// How long a node gets to stop on SIGTERM before it is killed.
const STOP_WAIT: Duration = Duration::from_secs(15);

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The locations every cluster starts with, and their jurisdictions.
pub const SEEDED_LOCATIONS: [(&str, &str); 4] = [
    ("us-east-1/pg-1", "US"),
    ("us-west-2/pg-2", "US"),
    ("us-central-1/pg-3", "US"),
    ("eu-central-1/pg-9", "DE"),
];

/// The US locations of the seeded catalog, by number, for tests that spread users over them.
pub fn us_location(n: usize) -> &'static str {
    SEEDED_LOCATIONS[n % 3].0
}

/// Runs `test` on its own runtime while no other cluster test runs in this process.
pub fn serially<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) {
    let _guard = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(test());
}

/// Where cargo put `residencyd`: beside the directory of this test binary (`target/debug`).
fn residencyd_path() -> PathBuf {
    binary_path("residencyd")
}

/// Where cargo put one of the project's binaries (`cargo test --workspace` builds them).
fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// Where the harness looks for node ports: below Linux's default ephemeral range
/// (32768–60999), so an outgoing connection of some other process cannot take a port between
/// the moment the harness checks it and the moment the node binds it.
const TEST_PORT_FIRST: u16 = 20_000;
const TEST_PORTS_COUNT: u16 = 12_000;

/// How far apart two test processes start looking: more ports than one process takes. The
/// processes that run at once (nextest runs each test in its own) have pids a few apart, each
/// test's nodes taking some between them; starting `pid` ports in, as before, put two such
/// processes on the same ports, and one node in a while lost its port to another test's node
/// between the harness's check and its bind.
const TEST_PORTS_PER_PROCESS: u32 = 64;

static NEXT_TEST_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A port no one listens on now, outside the ephemeral range; each test process starts at its
/// own offset (`TEST_PORTS_PER_PROCESS` per pid) and walks forward, so two test processes
/// running at once do not try the same ports.
fn free_port() -> u16 {
    use std::sync::atomic::Ordering;
    let spread = u64::from(std::process::id()) * u64::from(TEST_PORTS_PER_PROCESS);
    let seed = u16::try_from(spread % u64::from(TEST_PORTS_COUNT))
        .expect("the offset is below TEST_PORTS_COUNT");
    let _ = NEXT_TEST_PORT.compare_exchange(0, seed.max(1), Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..TEST_PORTS_COUNT {
        let offset = NEXT_TEST_PORT.fetch_add(1, Ordering::SeqCst) % TEST_PORTS_COUNT;
        let port = TEST_PORT_FIRST + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {TEST_PORT_FIRST}..+{TEST_PORTS_COUNT}");
}

#[derive(Debug)]
pub struct NodeHandle {
    pub id: u64,
    pub client_port: u16,
    pub peer_port: u16,
    pub metrics_port: u16,
    pub data_dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl NodeHandle {
    pub fn client_addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Writes the config of node `id` under `dir` on fresh ports, with mutual TLS from the
    /// certificates in `certs` (see [`Security`]) or plaintext.
    fn configure(
        dir: &Path,
        id: u64,
        jurisdiction: &str,
        raft_toml: &str,
        security: &Security,
    ) -> NodeHandle {
        let data_dir = dir.join(format!("node{id}"));
        fs::create_dir_all(&data_dir).expect("node dir");
        let (client_port, peer_port, metrics_port) = (free_port(), free_port(), free_port());
        let config_path = dir.join(format!("node{id}.toml"));
        let config = format!(
            "node_id = {id}\njurisdiction = \"{jurisdiction}\"\ndata_dir = \"{}\"\n\n[listen]\n\
             client = \"127.0.0.1:{client_port}\"\npeer = \"127.0.0.1:{peer_port}\"\n\
             metrics = \"127.0.0.1:{metrics_port}\"\n\n[raft]\n{raft_toml}\n\n\
             [storage]\ncache_capacity_bytes = 16777216\n\n{}",
            data_dir.display(),
            security.node_toml(id)
        );
        fs::write(&config_path, config).expect("node config");
        let log_path = dir.join(format!("node{id}.log"));
        NodeHandle {
            id,
            client_port,
            peer_port,
            metrics_port,
            data_dir,
            config_path,
            log_path,
            child: None,
        }
    }

    /// The last lines of this node's log, for failure messages.
    fn log_tail(&self) -> String {
        const LOG_TAIL_LINES: usize = 20;
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("node log file");
        let child = Command::new(residencyd_path())
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info,openraft=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("residencyd starts");
        self.child = Some(child);
    }

    fn signal(&mut self, signal: i32) {
        let child = self.child.as_mut().expect("node is running");
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        let sent = send_signal(pid, signal);
        assert!(sent, "signal {signal} to node {} failed", self.id);
    }

    /// SIGKILL: the process dies at once, as in a crash; the page cache survives.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let mut child = self.child.take().expect("node is running");
        child.wait().expect("reap node");
    }

    /// SIGSTOP: the process freezes (alive, its sockets open, answering nothing) until `thaw`.
    pub fn freeze(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT: a frozen process runs again.
    pub fn thaw(&mut self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("node is running");
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("poll node") {
                assert!(
                    status.success(),
                    "node {} exited with {status} on SIGTERM",
                    self.id
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "node {} did not stop within {STOP_WAIT:?} of SIGTERM",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[allow(unsafe_code)]
fn send_signal(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child this harness spawned.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// How a test cluster's nodes talk: mutual TLS with certificates `residencyctl certs init`
/// made (the default, as deployed), or plaintext.
#[derive(Debug, Clone)]
pub enum Security {
    /// The directory with `ca.pem`, `node<N>.pem/.key`, `operator.pem/.key` (an admin) and
    /// `service-reader`, `service-writer` and `service-stranger` (no role).
    Tls(PathBuf),
    /// TLS as above, with more lines for the nodes' `[tls]` section and an `[auth]` section.
    TlsWith {
        certs: PathBuf,
        tls_toml: String,
        auth_toml: String,
    },
    Plaintext,
}

/// The role table of every TLS test cluster.
pub const TEST_ROLES: &str = "[auth.roles]\n\
    \"spiffe://residency.local/operator/*\" = \"admin\"\n\
    \"spiffe://residency.local/service/writer\" = \"writer\"\n\
    \"spiffe://residency.local/service/reader\" = \"reader\"\n";

impl Security {
    /// Makes a CA and the certificates of nodes 1..=`nodes` and the test identities in `dir`.
    pub fn tls(dir: &Path, nodes: u64) -> Security {
        let certs = dir.join("certs");
        let output = Command::new(binary_path("residencyctl"))
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .args(["--nodes", &nodes.to_string()])
            .args([
                "--service",
                "reader",
                "--service",
                "writer",
                "--service",
                "stranger",
            ])
            .output()
            .expect("residencyctl certs init runs");
        assert!(
            output.status.success(),
            "certs init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Security::Tls(certs)
    }

    /// This security with `tls_toml` added to the nodes' `[tls]` section and `auth_toml` as
    /// their `[auth]` section (before the role table).
    pub fn with(self, tls_toml: &str, auth_toml: &str) -> Security {
        let certs = self
            .certs()
            .expect("only TLS has more to say")
            .to_path_buf();
        Security::TlsWith {
            certs,
            tls_toml: tls_toml.to_string(),
            auth_toml: auth_toml.to_string(),
        }
    }

    /// Issues node `id`'s certificate for `jurisdiction`, unless it exists.
    pub fn issue_node(&self, id: u64, jurisdiction: &str) {
        let Some(certs) = self.certs() else { return };
        if certs.join(format!("node{id}.pem")).exists() {
            return;
        }
        let output = Command::new(binary_path("residencyctl"))
            .args(["certs", "issue", "--kind", "node", "--dir"])
            .arg(certs)
            .args(["--name", &id.to_string(), "--jurisdiction", jurisdiction])
            .output()
            .expect("residencyctl certs issue runs");
        assert!(
            output.status.success(),
            "certs issue failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The `[tls]` and `[auth]` sections of node `id`'s config.
    fn node_toml(&self, id: u64) -> String {
        let (tls_toml, auth_toml) = match self {
            Security::TlsWith {
                tls_toml,
                auth_toml,
                ..
            } => (tls_toml.as_str(), auth_toml.as_str()),
            _ => ("", ""),
        };
        match self.certs() {
            Some(certs) => format!(
                "[tls]\nenabled = true\nca_file = \"{0}/ca.pem\"\ncert_file = \"{0}/node{id}.pem\"\n\
                 key_file = \"{0}/node{id}.key\"\n{tls_toml}\n\n[auth]\n{auth_toml}\n\n{TEST_ROLES}",
                certs.display()
            ),
            None => "[tls]\nenabled = false\n".to_string(),
        }
    }

    /// Client options presenting the certificate `<name>.pem` (e.g. `operator`,
    /// `service-reader`).
    pub fn options(&self, name: &str, timeout: Duration) -> ClientOptions {
        ClientOptions {
            timeout,
            caller: "cluster-test".to_string(),
            tls: self
                .certs()
                .map(|certs| TlsOptions::from_dir(certs, name).expect("certs")),
        }
    }

    /// The certificates' directory, if TLS is on.
    pub fn certs(&self) -> Option<&Path> {
        match self {
            Security::Tls(certs) | Security::TlsWith { certs, .. } => Some(certs),
            Security::Plaintext => None,
        }
    }
}

/// A cluster of real processes, its directory removed when the test passes.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: BTreeMap<u64, NodeHandle>,
    pub security: Security,
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts `size` nodes with `raft_toml` as their `[raft]` section, forms the cluster and
    /// waits for a leader.
    pub async fn start(size: u64, raft_toml: &str) -> Cluster {
        Cluster::start_secured(size, raft_toml, true).await
    }

    /// As `start`, with TLS off: for the rules that only a cluster without certificates can
    /// reach (a node that states a foreign jurisdiction in its config).
    pub async fn start_plaintext(size: u64, raft_toml: &str) -> Cluster {
        Cluster::start_secured(size, raft_toml, false).await
    }

    /// As `start`, with more TLS and authorization settings for every node (see
    /// `Security::with`).
    pub async fn start_with(
        size: u64,
        raft_toml: &str,
        tls_toml: &str,
        auth_toml: &str,
    ) -> Cluster {
        Cluster::start_configured(size, raft_toml, |dir| {
            Security::tls(dir, size).with(tls_toml, auth_toml)
        })
        .await
    }

    async fn start_secured(size: u64, raft_toml: &str, tls: bool) -> Cluster {
        Cluster::start_configured(size, raft_toml, |dir| {
            if tls {
                Security::tls(dir, size)
            } else {
                Security::Plaintext
            }
        })
        .await
    }

    async fn start_configured(
        size: u64,
        raft_toml: &str,
        security: impl FnOnce(&Path) -> Security,
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("residency-cluster-")
            .tempdir()
            .expect("cluster dir");
        let security = security(dir.path());
        let mut nodes = BTreeMap::new();
        for id in 1..=size {
            nodes.insert(
                id,
                NodeHandle::configure(dir.path(), id, "US", raft_toml, &security),
            );
        }
        let mut cluster = Cluster {
            nodes,
            security,
            dir: Some(dir),
        };
        cluster.start_all().await;
        let peers: Vec<String> = cluster.nodes.values().map(NodeHandle::peer_addr).collect();
        let first = cluster.client_for(1);
        first.initialize(peers).await.expect("cluster initializes");
        cluster.wait_for_leader(None).await;
        cluster.seed_catalog().await;
        cluster
    }

    /// Builds a new cluster of `size` nodes from a backup with `residencyd restore` on each,
    /// starts them (no `cluster init`: the restored state names them) and waits for a leader.
    pub async fn start_restored(backup: &Path, size: u64, raft_toml: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("residency-restored-")
            .tempdir()
            .expect("cluster dir");
        let security = Security::tls(dir.path(), size);
        let mut nodes = BTreeMap::new();
        for id in 1..=size {
            nodes.insert(
                id,
                NodeHandle::configure(dir.path(), id, "US", raft_toml, &security),
            );
        }
        let members: Vec<String> = nodes
            .values()
            .map(|node| {
                format!(
                    "--member={}={}/{}",
                    node.id,
                    node.peer_addr(),
                    node.client_addr()
                )
            })
            .collect();
        for node in nodes.values() {
            let output = Command::new(residencyd_path())
                .arg("--config")
                .arg(&node.config_path)
                .arg("restore")
                .arg("--backup")
                .arg(backup)
                .args(&members)
                .output()
                .expect("residencyd restore runs");
            assert!(
                output.status.success(),
                "restore failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let mut cluster = Cluster {
            nodes,
            security,
            dir: Some(dir),
        };
        cluster.start_all().await;
        cluster.wait_for_leader(None).await;
        cluster
    }

    /// The catalog every test starts from: three US locations, one German one, the US policy
    /// (store: US; access: US) and the DE policy (store: DE; access: DE and US).
    async fn seed_catalog(&self) {
        seed_test_catalog(&self.client()).await;
    }

    /// Starts one more node, not yet a member, declaring `jurisdiction` (and, with TLS, with
    /// a certificate for it); returns its id.
    pub async fn add_node(&mut self, jurisdiction: &str, raft_toml: &str) -> u64 {
        let id = self.configure_node(jurisdiction, jurisdiction, raft_toml);
        let node = self.node(id);
        node.start();
        wait_listening(node).await;
        id
    }

    /// Writes the config of one more node declaring `jurisdiction`, with a certificate for
    /// `cert_jurisdiction` (TLS only); returns its id. Nothing is started.
    pub fn configure_node(
        &mut self,
        jurisdiction: &str,
        cert_jurisdiction: &str,
        raft_toml: &str,
    ) -> u64 {
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        self.security.issue_node(id, cert_jurisdiction);
        let dir = self
            .dir
            .as_ref()
            .expect("the cluster directory lives as long as the cluster");
        let node = NodeHandle::configure(dir.path(), id, jurisdiction, raft_toml, &self.security);
        self.nodes.insert(id, node);
        id
    }

    /// Starts node `id` and waits for it to exit on its own (a node that must refuse to
    /// start); returns its log.
    pub async fn start_expecting_exit(&mut self, id: u64) -> String {
        let node = self.node(id);
        node.start();
        let deadline = Instant::now() + PORT_WAIT;
        loop {
            let child = node.child.as_mut().expect("started");
            if let Ok(Some(status)) = child.try_wait() {
                assert!(!status.success(), "node {id} exited successfully");
                node.child = None;
                return fs::read_to_string(&node.log_path).unwrap_or_default();
            }
            assert!(
                Instant::now() < deadline,
                "node {id} kept running; its log ends:\n{}",
                node.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts every node and waits for their client ports.
    async fn start_all(&mut self) {
        for node in self.nodes.values_mut() {
            node.start();
        }
        for node in self.nodes.values_mut() {
            wait_listening(node).await;
        }
    }

    pub fn node(&mut self, id: u64) -> &mut NodeHandle {
        self.nodes.get_mut(&id).expect("no such node")
    }

    /// The operator's (an admin's) client options.
    fn options(&self) -> ClientOptions {
        self.security.options("operator", Duration::from_secs(20))
    }

    /// A client that knows every node, as the operator.
    pub fn client(&self) -> Client {
        let endpoints = self.nodes.values().map(NodeHandle::client_addr).collect();
        Client::new(endpoints, self.options()).expect("client")
    }

    /// A client of every node presenting the certificate `<name>.pem` of the cluster's certs.
    pub fn client_as(&self, name: &str) -> Client {
        let endpoints = self.nodes.values().map(NodeHandle::client_addr).collect();
        Client::new(
            endpoints,
            self.security.options(name, Duration::from_secs(10)),
        )
        .expect("client")
    }

    /// A client that talks to node `id` only.
    pub fn client_for(&self, id: u64) -> Client {
        Client::new(vec![self.nodes[&id].client_addr()], self.options()).expect("client")
    }

    /// A client for node `id` with a short deadline, for calls expected to fail.
    pub fn impatient_client_for(&self, id: u64, timeout: Duration) -> Client {
        let mut options = self.options();
        options.timeout = timeout;
        Client::new(vec![self.nodes[&id].client_addr()], options).expect("client")
    }

    /// A raw gRPC channel to node `id`'s client port as the operator, to send what the typed
    /// client would refuse to build.
    pub async fn raw_channel(&self, id: u64) -> tonic::transport::Channel {
        self.raw_channel_as(id, "operator").await
    }

    /// A raw gRPC channel to node `id`'s client port presenting `<name>.pem`.
    pub async fn raw_channel_as(&self, id: u64, name: &str) -> tonic::transport::Channel {
        let address = self.nodes[&id].client_addr();
        let endpoint = match self.security.certs() {
            Some(certs) => {
                let read = |name: &str| fs::read(certs.join(name)).expect("certificate file");
                tonic::transport::Endpoint::from_shared(format!("https://{address}"))
                    .expect("endpoint")
                    .tls_config(
                        tonic::transport::ClientTlsConfig::new()
                            .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
                            .identity(tonic::transport::Identity::from_pem(
                                read(&format!("{name}.pem")),
                                read(&format!("{name}.key")),
                            )),
                    )
                    .expect("tls config")
            }
            None => tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .expect("endpoint"),
        };
        endpoint.connect().await.expect("connect")
    }

    /// A raw registry client for node `id` (see `raw_channel`).
    pub async fn raw_registry(
        &self,
        id: u64,
    ) -> pb::registry_client::RegistryClient<tonic::transport::Channel> {
        pb::registry_client::RegistryClient::new(self.raw_channel(id).await)
    }

    /// Node `id`'s own view of itself.
    pub async fn member_status(&self, id: u64) -> pb::MemberStatus {
        let status = self.client_for(id).status().await.expect("status");
        status
            .members
            .into_iter()
            .find(|member| member.id == id)
            .expect("node lists itself")
    }

    /// Waits until the running nodes agree on a leader (other than `not`) and returns it.
    pub async fn wait_for_leader(&self, not: Option<u64>) -> u64 {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let mut seen = Vec::new();
            for node in self.nodes.values().filter(|node| node.is_running()) {
                let client = self.impatient_client_for(node.id, Duration::from_secs(2));
                let member = client.status().await.ok().and_then(|status| {
                    status
                        .members
                        .into_iter()
                        .find(|member| member.id == node.id)
                });
                seen.push(member.and_then(|member| member.leader_id));
            }
            if let Some(Some(leader)) = seen.first().copied()
                && seen.iter().all(|view| *view == Some(leader))
                && Some(leader) != not
                && self.nodes[&leader].is_running()
            {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {LEADER_WAIT:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) {
        self.wait_applied_within(id, index, LEADER_WAIT).await;
    }

    /// Waits until node `id` has applied at least `index`, for at most `patience`. A node that
    /// does not list itself yet (a learner before its first snapshot) has applied nothing.
    pub async fn wait_applied_within(&self, id: u64, index: u64, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            let status = self.client_for(id).status().await.expect("status");
            let applied = status
                .members
                .into_iter()
                .find(|member| member.id == id)
                .and_then(|member| member.applied_index)
                .unwrap_or(0);
            if applied >= index {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} applied only {applied} of {index}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn restart(&mut self, id: u64) {
        self.node(id).start();
    }

    /// Runs `residencyctl` against this cluster's nodes; returns its exit code, stdout, stderr.
    pub fn ctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let endpoints: Vec<String> = self
            .nodes
            .values()
            .filter(|node| node.is_running())
            .map(NodeHandle::client_addr)
            .collect();
        let mut command = Command::new(binary_path("residencyctl"));
        command.arg("--endpoints").arg(endpoints.join(","));
        match self.security.certs() {
            Some(certs) => command.arg("--certs-dir").arg(certs),
            None => command.arg("--plaintext"),
        };
        let output = command.args(args).output().expect("residencyctl runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    }

    /// Everything the nodes have logged so far (at `info` level, openraft included).
    pub fn logs(&self) -> String {
        self.nodes
            .values()
            .map(|node| fs::read_to_string(&node.log_path).unwrap_or_default())
            .collect()
    }

    /// What node `id` has logged so far.
    pub fn node_log(&self, id: u64) -> String {
        fs::read_to_string(&self.nodes[&id].log_path).unwrap_or_default()
    }

    /// GETs `path` from node `id`'s metrics listener; returns the status line and the body.
    pub fn http_get(&self, id: u64, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.nodes[&id].metrics_port))
            .expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        let status = response.lines().next().unwrap_or_default().to_string();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub async fn wait_serving(&mut self, id: u64) {
        wait_listening(self.node(id)).await;
    }
}

/// Waits until `node` accepts connections on its client port; fails at once, with the tail of
/// its log, if the process exits first.
async fn wait_listening(node: &mut NodeHandle) {
    let port = node.client_port;
    let deadline = Instant::now() + PORT_WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Some(child) = node.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            node.child = None;
            panic!(
                "node {} exited ({status}) before opening port {port}; its log ends:\n{}",
                node.id,
                node.log_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "node {} did not open port {port} within {PORT_WAIT:?}; its log ends:\n{}",
            node.id,
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "cluster test failed; configs, data and node logs kept in {}",
                kept.display()
            );
        }
    }
}

/// Registers the seeded locations and the US and DE policies through `client`.
pub async fn seed_test_catalog(client: &Client) {
    for (location, jurisdiction) in SEEDED_LOCATIONS {
        let location = LocationId::parse(location).expect("valid location");
        let jurisdiction = Jurisdiction::parse(jurisdiction).expect("valid jurisdiction");
        client
            .put_location(&location, jurisdiction, &Labels::default(), None)
            .await
            .expect("location registered");
    }
    for (residency, storage, access) in [
        ("US", &["US"][..], &["US"][..]),
        ("DE", &["DE"][..], &["DE", "US"][..]),
    ] {
        let codes = |codes: &[&str]| {
            codes
                .iter()
                .map(|code| Jurisdiction::parse(code).expect("valid"))
                .collect()
        };
        let residency = Jurisdiction::parse(residency).expect("valid jurisdiction");
        client
            .put_policy(residency, &codes(storage), &codes(access), None)
            .await
            .expect("policy set");
    }
}
