//! `residencyd`: one registry node. Reads its TOML config, applies flag overrides, sets up
//! logging and signals, and hands over to `residency_server::run`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use std::collections::BTreeMap;

use residency_server::config::{Config, LogFormat, ValidConfig};
use residency_server::{Listeners, observability};
use residency_store::{NodeInfo, StoreOptions, restore};

/// mimalloc instead of glibc's malloc: under a bulk import glibc's `_int_malloc`,
/// `malloc_consolidate` and `unlink_chunk` took about a third of the leader's CPU samples, most
/// of it for sled's short-lived page views (docs/performance.md, "What bounds the writes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps memory a node freed before it gives it back to the OS. Its default
/// (1 s) had sled's IO buffers and the apply's encodings, freed and allocated again all the
/// time under writes, faulted back in page by page: about a tenth of a follower's CPU. Ten
/// seconds keeps them through a steady load and still returns memory after a peak
/// (docs/performance.md).
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 10_000;
/// `mi_option_purge_delay` in `mimalloc.h` (the same position in mimalloc v2 and v3); the
/// Rust bindings name no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[allow(unsafe_code)]
fn tune_allocator() {
    // SAFETY: `mi_option_set` takes two integers and may be called at any time from any
    // thread; it only changes when mimalloc returns freed memory, never what it allocates.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
}

#[derive(Debug, Parser)]
#[command(name = "residencyd", version, about = "A Residency Registry node")]
struct Args {
    /// The node's TOML configuration (see docs/configuration.md).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides `node_id`.
    #[arg(long)]
    node_id: Option<u64>,
    /// Overrides `jurisdiction`.
    #[arg(long)]
    jurisdiction: Option<String>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `listen.client`.
    #[arg(long)]
    listen_client: Option<String>,
    /// Overrides `listen.peer`.
    #[arg(long)]
    listen_peer: Option<String>,
    /// Overrides `listen.metrics`.
    #[arg(long)]
    listen_metrics: Option<String>,
    /// Turns TLS on with the files `residencyctl certs init --dir DIR` wrote: `DIR/ca.pem`,
    /// `DIR/node<ID>.pem` and `DIR/node<ID>.key` (other `[tls]` settings kept).
    #[arg(long, conflicts_with = "insecure_no_tls")]
    tls_dir: Option<PathBuf>,
    /// Turns TLS off whatever the file says (`tls.enabled = false`): plaintext, every caller
    /// may do anything, peers are not authenticated. For development and for measuring what
    /// TLS costs, never for a deployment.
    #[arg(long)]
    insecure_no_tls: bool,
    /// Overrides `log.format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Offline>,
}

/// Work on a node's data while the node is not running.
#[derive(Debug, clap::Subcommand)]
enum Offline {
    /// Builds this node's data (its config's data_dir, which must not hold a store yet) from a
    /// backup, as a member of a new cluster. Run it on every node of the new cluster with the
    /// same backup and the same --member list, then start the nodes: no `cluster init`.
    ///
    /// Example: residencyd --config node1.toml restore --backup registry.backup
    ///   --member 1=10.0.0.1:7201/10.0.0.1:7101 --member 2=10.0.0.2:7201/10.0.0.2:7101
    ///   --member 3=10.0.0.3:7201/10.0.0.3:7101
    Restore {
        #[arg(long)]
        backup: PathBuf,
        /// A member of the new cluster: ID=PEER_ADDR/CLIENT_ADDR. Repeat for each member.
        #[arg(long = "member", required = true)]
        members: Vec<String>,
    },
    /// Reads a whole backup file and checks it (count and checksum); prints its revision.
    VerifyBackup { backup: PathBuf },
    /// Asks a running node whether it is ready (`GET /readyz` on its metrics listener) and exits
    /// 0 if so, 1 if not: the container healthcheck, which has no shell or curl to use.
    ///
    /// Example: residencyd health --addr 127.0.0.1:7301
    Health {
        /// The node's metrics listener.
        #[arg(long, default_value = "127.0.0.1:7301")]
        addr: String,
        /// Ask `/healthz` (the process answers) instead of `/readyz` (it can serve reads).
        #[arg(long)]
        live: bool,
    },
}

/// How long the health probe waits for the node, in milliseconds.
const HEALTH_PROBE_TIMEOUT_MS: u64 = 2_000;

/// `GET /readyz` (or `/healthz`) on `addr`: Ok if the node answers 200.
fn health(addr: &str, live: bool) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_millis(HEALTH_PROBE_TIMEOUT_MS);
    let target = addr
        .to_socket_addrs()
        .with_context(|| format!("{addr:?} is not an address"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("the node at {addr} does not answer"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let path = if live { "/healthz" } else { "/readyz" };
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.take(64 * 1024).read_to_string(&mut response)?;
    let status = response.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.contains(" 200 "),
        "{path} at {addr}: {status} {}",
        response
            .split_once("\r\n\r\n")
            .map_or("", |(_, body)| body.trim())
    );
    println!("{path} at {addr}: {status}");
    Ok(())
}

fn parse_member(text: &str, jurisdiction: &str) -> anyhow::Result<(u64, NodeInfo)> {
    let (id, addresses) = text
        .split_once('=')
        .context("a member is ID=PEER_ADDR/CLIENT_ADDR")?;
    let (peer_addr, client_addr) = addresses
        .split_once('/')
        .context("a member is ID=PEER_ADDR/CLIENT_ADDR")?;
    let id: u64 = id
        .parse()
        .with_context(|| format!("{id:?} is not a node id"))?;
    anyhow::ensure!(
        id > 0 && !peer_addr.is_empty() && !client_addr.is_empty(),
        "a member is ID=PEER_ADDR/CLIENT_ADDR"
    );
    let info = NodeInfo {
        client_addr: client_addr.to_string(),
        peer_addr: peer_addr.to_string(),
        jurisdiction: jurisdiction.to_string(),
    };
    Ok((id, info))
}

fn verify_backup(backup: &std::path::Path) -> anyhow::Result<()> {
    let verified = restore::verify_backup(backup)
        .with_context(|| format!("{} is not a sound backup", backup.display()))?;
    println!(
        "{}: a sound backup at revision {} ({} pairs)",
        backup.display(),
        verified.applied.index,
        verified.pairs
    );
    Ok(())
}

fn offline(command: Offline, config: ValidConfig) -> anyhow::Result<()> {
    match command {
        Offline::VerifyBackup { backup } => verify_backup(&backup)?,
        Offline::Health { addr, live } => health(&addr, live)?,
        Offline::Restore { backup, members } => {
            anyhow::ensure!(
                config.jurisdiction == config.required_jurisdiction,
                "this node declares {} but the cluster requires {}: it cannot be restored as a member",
                config.jurisdiction,
                config.required_jurisdiction
            );
            let jurisdiction = config.required_jurisdiction.to_string();
            let members = members
                .iter()
                .map(|member| parse_member(member, &jurisdiction))
                .collect::<anyhow::Result<BTreeMap<u64, NodeInfo>>>()?;
            let options = StoreOptions {
                cache_capacity_bytes: config.storage.cache_capacity_bytes,
            };
            let restored =
                restore::restore(&config.data_dir, options, &backup, config.node_id, members)
                    .with_context(|| {
                        format!(
                            "restoring {} into {}",
                            backup.display(),
                            config.data_dir.display()
                        )
                    })?;
            println!(
                "node {} restored at revision {} ({} pairs) into {}",
                config.node_id,
                restored.applied.index,
                restored.pairs,
                config.data_dir.display()
            );
        }
    }
    Ok(())
}

fn load(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.node_id = args.node_id.or(config.node_id);
    config.jurisdiction = args.jurisdiction.clone().or(config.jurisdiction);
    config.data_dir = args.data_dir.clone().or(config.data_dir);
    config.listen.client = args.listen_client.clone().or(config.listen.client);
    config.listen.peer = args.listen_peer.clone().or(config.listen.peer);
    config.listen.metrics = args.listen_metrics.clone().or(config.listen.metrics);
    if let Some(dir) = &args.tls_dir {
        let id = config
            .node_id
            .context("--tls-dir needs the node id (node_id or --node-id)")?;
        let mut tls = config.tls.take().unwrap_or_else(|| {
            toml::from_str("enabled = true").expect("a minimal [tls] section parses")
        });
        tls.enabled = true;
        tls.ca_file = Some(dir.join("ca.pem"));
        tls.cert_file = Some(dir.join(format!("node{id}.pem")));
        tls.key_file = Some(dir.join(format!("node{id}.key")));
        config.tls = Some(tls);
    }
    if args.insecure_no_tls {
        let mut tls = config.tls.take().unwrap_or_else(|| {
            toml::from_str("enabled = false").expect("a minimal [tls] section parses")
        });
        tls.enabled = false;
        config.tls = Some(tls);
    }
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    Ok(config)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tune_allocator();
    let args = Args::parse();
    // Checking a backup or probing a node needs no configuration.
    match &args.command {
        Some(Offline::VerifyBackup { backup }) => return verify_backup(backup),
        Some(Offline::Health { addr, live }) => return health(addr, *live),
        _ => {}
    }
    let config = load(&args)?.validate().context("invalid configuration")?;
    if let Some(command) = args.command {
        return offline(command, config);
    }
    if args.check_config {
        println!("{config:#?}");
        return Ok(());
    }
    observability::init_tracing(&config.log);
    let listeners = Listeners::bind(&config).await?;
    residency_server::run(config, listeners, shutdown_signal()).await
}
