//! The compose deployment (`cluster/docker-compose.yml`) driven from a test: its own project,
//! subnet, host ports and node configs, so it runs beside a user's deployment; and the faults
//! the suite injects: SIGKILL, freeze (`docker pause`), restart, and partitions made with
//! iptables inside a node's network namespace.
//!
//! Everything goes through the `docker` and `docker-compose` command lines. A step that fails
//! panics with the command and its output: the suite must fail loudly, never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use residency_client::{Client, ClientOptions};

/// The image the suite builds and runs (unoptimised binaries: quicker to build in CI).
pub const TEST_IMAGE: &str = "residency-registry:test";
/// Node names, by node id - 1.
pub const SERVICES: [&str; 3] = ["us-east", "us-central", "us-west"];
/// How long a deployment may take to start, elect and become ready.
const UP_WAIT: Duration = Duration::from_secs(120);

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Runs a command; panics with its output if it fails. Returns stdout.
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{command:?} did not start: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Builds the test image once per process with `cluster/docker.sh build` (static binaries,
/// FROM scratch). Panics, loudly, when Docker is missing or the build fails.
pub fn build_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = repo_root();
        run(Command::new(root.join("cluster/docker.sh"))
            .arg("build")
            .env("RESIDENCY_PROFILE", "debug")
            .env("RESIDENCY_IMAGE", TEST_IMAGE)
            .current_dir(&root));
    });
}

/// `docker compose` (v2) if present, else `docker-compose` (v1).
fn compose_program() -> Vec<String> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// How a node is cut off from its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Nothing in or out between the node and its peers (clients still reach it).
    Both,
    /// The node hears its peers but what it sends them is lost.
    Outgoing,
    /// The node's messages reach its peers; theirs to it are lost.
    Incoming,
}

/// A running compose deployment of three nodes.
#[derive(Debug)]
pub struct Deployment {
    pub project: String,
    /// Configs, and on failure the kept history and node logs.
    pub dir: PathBuf,
    subnet: String,
    pub client_ports: [u16; 3],
    pub metrics_ports: [u16; 3],
    compose: Vec<String>,
    /// The suite's own CA and certificates, in `dir`.
    security: crate::Security,
}

impl Deployment {
    /// Starts a deployment with `raft_toml` as every node's `[raft]` section, initialises it,
    /// seeds the test catalog and waits until every node is ready.
    pub async fn up(name: &str, raft_toml: &str) -> Deployment {
        build_image();
        let dir = tempfile::Builder::new()
            .prefix(&format!("residency-{name}-"))
            .tempdir()
            .expect("deployment dir")
            .keep();
        // A subnet of its own: 172.30.N.0/24 with N from the pid, so runs in parallel differ.
        let subnet = format!("172.30.{}", 16 + std::process::id() % 200);
        // Mutual TLS, as deployed: the suite's own CA and certificates. The nodes run as uid
        // 65532 in their containers: their keys are handed to that user.
        let security = crate::Security::tls(&dir, 3);
        let certs = security.certs().expect("tls").to_path_buf();
        for id in 1..=3 {
            let key = certs.join(format!("node{id}.key"));
            run(Command::new("chown").arg("65532:65532").arg(&key));
        }
        let client_ports = [crate::free_port(), crate::free_port(), crate::free_port()];
        let metrics_ports = [crate::free_port(), crate::free_port(), crate::free_port()];
        for (index, service) in SERVICES.iter().enumerate() {
            let id = index + 1;
            let config = format!(
                "# {service}, written by the fault suite.\nnode_id = {id}\njurisdiction = \"US\"\n\
                 data_dir = \"/data\"\n\n[listen]\nclient = \"0.0.0.0:7101\"\npeer = \"0.0.0.0:7201\"\n\
                 metrics = \"0.0.0.0:7301\"\n\n[advertise]\nclient = \"127.0.0.1:{}\"\n\
                 peer = \"{subnet}.1{id}:7201\"\n\n[raft]\n{raft_toml}\n\n[storage]\n\
                 cache_capacity_bytes = 16777216\n\n[log]\nformat = \"text\"\n\
                 filter = \"info,openraft=info\"\n\n[tls]\nenabled = true\n\
                 ca_file = \"/etc/residency/tls/ca.pem\"\ncert_file = \"/etc/residency/tls/node.pem\"\n\
                 key_file = \"/etc/residency/tls/node.key\"\n\n{}",
                client_ports[index],
                crate::TEST_ROLES
            );
            std::fs::write(dir.join(format!("node{id}.toml")), config).expect("node config");
        }
        let deployment = Deployment {
            project: format!("residency-{name}-{}", std::process::id()),
            dir,
            subnet,
            client_ports,
            metrics_ports,
            compose: compose_program(),
            security,
        };
        deployment.compose_run(&["up", "-d", "--no-build"]);
        let peers: Vec<String> = (1..=3)
            .map(|id| format!("{}.1{id}:7201", deployment.subnet))
            .collect();
        let first = deployment.client_for(1, Duration::from_secs(10));
        let deadline = Instant::now() + UP_WAIT;
        loop {
            match first.initialize(peers.clone()).await {
                Ok(_) => break,
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "the deployment did not initialise: {error}\n{}",
                        deployment.logs()
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        deployment.wait_all_ready().await;
        deployment.seed_catalog().await;
        deployment
    }

    fn compose_command(&self) -> Command {
        let mut command = Command::new(&self.compose[0]);
        command
            .args(&self.compose[1..])
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(repo_root().join("cluster/docker-compose.yml"))
            .env("RESIDENCY_IMAGE", TEST_IMAGE)
            .env("RESIDENCY_CONFIG_DIR", &self.dir)
            .env(
                "RESIDENCY_CERTS_DIR",
                self.security.certs().expect("the deployment runs with TLS"),
            )
            .env("RESIDENCY_SUBNET", &self.subnet)
            .env("RESIDENCY_RESTART", "no");
        for (index, port) in self.client_ports.iter().enumerate() {
            command.env(
                format!("RESIDENCY_CLIENT_PORT_{}", index + 1),
                port.to_string(),
            );
        }
        for (index, port) in self.metrics_ports.iter().enumerate() {
            command.env(
                format!("RESIDENCY_METRICS_PORT_{}", index + 1),
                port.to_string(),
            );
        }
        command
    }

    fn compose_run(&self, args: &[&str]) -> String {
        run(self.compose_command().args(args))
    }

    /// The container id of node `id`.
    pub fn container(&self, id: u64) -> String {
        let service = SERVICES[usize::try_from(id - 1).expect("node id")];
        let id = self.compose_run(&["ps", "-q", service]);
        let id = id.trim().to_string();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    fn docker(&self, args: &[&str]) -> String {
        run(Command::new("docker").args(args))
    }

    /// SIGKILL: the process dies at once; its container stays down until `start`.
    pub fn kill(&self, id: u64) {
        self.docker(&["kill", "-s", "KILL", &self.container(id)]);
    }

    pub fn start(&self, id: u64) {
        self.docker(&["start", &self.container(id)]);
    }

    /// SIGTERM, a clean stop, then a start.
    pub fn restart(&self, id: u64) {
        self.docker(&["restart", "-t", "15", &self.container(id)]);
    }

    /// Freezes every process of the node (cgroup freezer): alive, sockets open, silent.
    pub fn pause(&self, id: u64) {
        self.docker(&["pause", &self.container(id)]);
    }

    pub fn unpause(&self, id: u64) {
        self.docker(&["unpause", &self.container(id)]);
    }

    /// The node's address on the deployment's network.
    fn address(&self, id: u64) -> String {
        format!("{}.1{id}", self.subnet)
    }

    /// Runs iptables inside node `id`'s network namespace.
    fn iptables(&self, id: u64, rule: &[&str]) {
        let pid = self.docker(&["inspect", "-f", "{{.State.Pid}}", &self.container(id)]);
        run(Command::new("nsenter")
            .args(["-t", pid.trim(), "-n", "iptables", "-w"])
            .args(rule));
    }

    /// Cuts node `id` off from its peers (not from clients: they come through the published
    /// ports from the network's gateway).
    pub fn partition(&self, id: u64, cut: Cut) {
        for peer in (1..=3).filter(|peer| *peer != id) {
            let address = self.address(peer);
            if matches!(cut, Cut::Both | Cut::Incoming) {
                self.iptables(id, &["-A", "INPUT", "-s", &address, "-j", "DROP"]);
            }
            if matches!(cut, Cut::Both | Cut::Outgoing) {
                self.iptables(id, &["-A", "OUTPUT", "-d", &address, "-j", "DROP"]);
            }
        }
    }

    /// Removes every cut made on node `id`.
    pub fn heal(&self, id: u64) {
        self.iptables(id, &["-F", "INPUT"]);
        self.iptables(id, &["-F", "OUTPUT"]);
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.client_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// The operator's client options.
    fn options(&self, timeout: Duration) -> ClientOptions {
        let mut options = self.security.options("operator", timeout);
        options.caller = "fault-suite".to_string();
        options
    }

    /// A client of every node with a `timeout` per call.
    pub fn client(&self, timeout: Duration) -> Client {
        Client::new(self.endpoints(), self.options(timeout)).expect("client")
    }

    /// A client of node `id` only.
    pub fn client_for(&self, id: u64, timeout: Duration) -> Client {
        let options = self.options(timeout);
        let endpoint = format!(
            "127.0.0.1:{}",
            self.client_ports[usize::try_from(id - 1).expect("id")]
        );
        Client::new(vec![endpoint], options).expect("client")
    }

    /// The leader, as node `asked` sees it.
    pub async fn leader_seen_by(&self, asked: u64) -> Option<u64> {
        let status = self
            .client_for(asked, Duration::from_secs(3))
            .status()
            .await
            .ok()?;
        status
            .members
            .into_iter()
            .find(|member| member.id == asked)
            .and_then(|member| member.leader_id)
    }

    /// Waits until every node agrees on one leader, and returns it.
    pub async fn wait_leader(&self) -> u64 {
        let deadline = Instant::now() + UP_WAIT;
        loop {
            let mut seen = Vec::new();
            for id in 1..=3 {
                seen.push(self.leader_seen_by(id).await);
            }
            if let Some(Some(leader)) = seen.first().copied()
                && seen.iter().all(|view| *view == Some(leader))
            {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {UP_WAIT:?}: {seen:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Whether node `id` answers /readyz with 200.
    pub fn ready(&self, id: u64) -> bool {
        use std::io::{Read, Write};
        let port = self.metrics_ports[usize::try_from(id - 1).expect("id")];
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if write!(stream, "GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
            .lines()
            .next()
            .is_some_and(|line| line.contains(" 200 "))
    }

    /// Whether node `id`'s container is running (it exits if its process does).
    pub fn running(&self, id: u64) -> bool {
        self.docker(&["inspect", "-f", "{{.State.Running}}", &self.container(id)])
            .trim()
            == "true"
    }

    /// Waits until node `id` is ready; fails at once, with the logs, if its process exited.
    pub async fn wait_ready(&self, id: u64) {
        let deadline = Instant::now() + UP_WAIT;
        while !self.ready(id) {
            assert!(
                self.running(id),
                "node {id} exited; the logs:\n{}",
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "node {id} is not ready within {UP_WAIT:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every node is ready (leader known, quorum, caught up).
    pub async fn wait_all_ready(&self) {
        let deadline = Instant::now() + UP_WAIT;
        while !(1..=3).all(|id| self.ready(id)) {
            assert!(
                Instant::now() < deadline,
                "the deployment is not ready within {UP_WAIT:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn seed_catalog(&self) {
        crate::seed_test_catalog(&self.client(Duration::from_secs(30))).await;
    }

    /// The logs of every node.
    pub fn logs(&self) -> String {
        self.compose_command()
            .args(["logs", "--no-color", "--timestamps"])
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_else(|error| format!("(no logs: {error})"))
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::fs::write(self.dir.join("nodes.log"), self.logs());
            eprintln!(
                "fault suite failed; configs, history and node logs kept in {}",
                self.dir.display()
            );
        }
        // Heal whatever cut is left, so `down` can stop the containers.
        for id in 1..=3 {
            let _ = self
                .compose_command()
                .args(["unpause", SERVICES[id - 1]])
                .output();
        }
        let _ = self
            .compose_command()
            .args(["down", "--volumes", "-t", "5"])
            .output();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
