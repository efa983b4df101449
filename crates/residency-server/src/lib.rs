//! A registry node as a library: `run(config, listeners, shutdown)` starts Raft over the store,
//! serves clients, peers and metrics on their own listeners, and stops cleanly when `shutdown`
//! resolves. `residencyd` is a thin binary over it; tests can start nodes on port 0.
//!
//! - [`config`]: the TOML configuration and its validation.
//! - [`node`]: the read barrier per consistency mode and the write path to the leader;
//!   [`proposer`]: many writes per log entry on the leader; [`forwarder`]: a follower's writes
//!   to the leader in groups.
//! - [`read_index`]: linearizable reads sharing read-index rounds.
//! - [`network`] / [`peer_service`]: Raft and node-to-node traffic on the peer listener;
//!   [`call_stream`]: peer calls made one at a time, on one long-lived stream.
//! - [`registry_service`], [`catalog_service`], [`cluster_service`]: the public gRPC API on the
//!   client listener.
//! - [`tls`], [`auth`], [`audit_log`]: mutual TLS, who may call what and load shedding, the
//!   audit file.
//! - [`error`]: the one table from errors to gRPC statuses and reason codes.
//! - [`observability`]: metrics, health, readiness and logging; [`watchdog`]: the election guard.

pub mod audit_log;
pub mod auth;
pub mod backup;
pub mod call_stream;
pub mod catalog_service;
pub mod cluster_service;
pub mod config;
pub mod error;
pub mod forwarder;
pub mod grpc;
pub mod membership;
pub mod network;
pub mod node;
pub mod observability;
pub mod peer_service;
pub mod proposer;
pub mod read_index;
pub mod registry_service;
pub mod snapshot_sender;
#[cfg(test)]
mod test_peer;
pub mod tls;
pub mod watch_service;
pub mod watchdog;
pub mod write_queue;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::SnapshotPolicy;
use residency_proto::pb::catalog_server::CatalogServer;
use residency_proto::pb::cluster_server::ClusterServer;
use residency_proto::pb::registry_server::RegistryServer;
use residency_proto::peer_pb::peer_server::PeerServer;
use residency_store::{NodeInfo, Raft, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::config::ValidConfig;
use crate::network::{NetworkFactory, PeerChannels};
use crate::node::Node;

/// Streams a peer may open and reset before the peer listener has accepted them, at most,
/// before h2 ends the connection. h2's default (20) guards against rapid-reset floods. But a
/// leader whose appends miss their deadline resets one stream per try, every heartbeat, for as
/// long as a partition lasts; when it heals they arrive together, and at 20 the peer's
/// connection was cut again and again, holding the cluster without a stable leader for seconds
/// after an asymmetric partition (found by the fault suite). Only nodes speak on the peer
/// listener, so the bound is raised there alone; the client listener keeps h2's.
const PEER_PENDING_RESET_STREAMS_MAX: usize = 1_024;

/// How long in-flight requests get to finish once shutdown starts.
const SHUTDOWN_GRACE_MS: u64 = 5_000;
/// How often the node looks whether Raft stopped on a fatal error. Polled, not awaited on
/// openraft's metrics channel: that channel changes with every append, commit and apply, and
/// waking a waiter (here, the process's main thread) thousands of times a second cost the
/// leader about half a core in futex wake-ups (docs/performance.md).
const RAFT_STATE_CHECK_MS: u64 = 200;

/// The node's three listeners, bound before `run` so tests can use port 0.
#[derive(Debug)]
pub struct Listeners {
    pub client: TcpListener,
    pub peer: TcpListener,
    pub metrics: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &ValidConfig) -> anyhow::Result<Listeners> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))
        };
        Ok(Listeners {
            client: bind(config.listen_client).await?,
            peer: bind(config.listen_peer).await?,
            metrics: bind(config.listen_metrics).await?,
        })
    }
}

fn raft_config(config: &ValidConfig) -> anyhow::Result<openraft::Config> {
    let raft = &config.raft;
    let openraft_config = openraft::Config {
        cluster_name: "residency-registry".to_string(),
        heartbeat_interval: raft.heartbeat_interval_ms,
        election_timeout_min: raft.election_timeout_ms_min,
        election_timeout_max: raft.election_timeout_ms_max,
        install_snapshot_timeout: raft.install_snapshot_timeout_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(raft.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: raft.max_in_snapshot_log_to_keep,
        snapshot_max_chunk_size: raft.snapshot_chunk_bytes_max,
        max_payload_entries: raft.max_payload_entries,
        ..openraft::Config::default()
    };
    Ok(openraft_config.validate()?)
}

/// A listener's connections with Nagle's algorithm off. tonic's `tcp_nodelay` applies only to
/// listeners it binds itself, not to ours: without this, a response written in two pieces
/// waited for the client's delayed acknowledgement of the first, about 40 ms, on some 1% of
/// requests (the p99 of reads at one client).
fn accepted_without_delay(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Resolves once the shutdown flag is raised.
pub(crate) async fn stopped(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

/// Runs a node until `shutdown` resolves or its Raft core stops on a fatal error.
pub async fn run(
    config: ValidConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let options = StoreOptions {
        cache_capacity_bytes: config.storage.cache_capacity_bytes,
    };
    let (log_store, state_machine, reader) = residency_store::open(&config.data_dir, options)
        .await
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let committed = log_store.committed_index();
    let log_progress = log_store.progress();
    log_store.lead_as(config.node_id);
    for warning in &config.warnings {
        tracing::warn!(%warning, "configuration");
    }
    let audit = audit_log::AuditLog::open(&config.data_dir, config.node_id)?;
    let node_tls = match &config.tls {
        Some(settings) => Some(tls::NodeTls::load(&config, settings)?),
        None => {
            tracing::warn!(
                "TLS is off (tls.enabled = false): every caller may do anything and peers are not \
                 authenticated; for development only"
            );
            None
        }
    };
    let info = NodeInfo {
        client_addr: match &config.advertise_client {
            Some(addr) => addr.clone(),
            None => listeners.client.local_addr()?.to_string(),
        },
        peer_addr: match &config.advertise_peer {
            Some(addr) => addr.clone(),
            None => listeners.peer.local_addr()?.to_string(),
        },
        jurisdiction: config.jurisdiction.to_string(),
    };
    let peers = PeerChannels::new(
        config.limits.peer_message_bytes_max,
        node_tls
            .as_ref()
            .map(|tls| tls.peer_connector(Duration::from_millis(network::PEER_CONNECT_TIMEOUT_MS))),
    );
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config(&config)?),
        NetworkFactory::new(
            peers.clone(),
            log_progress.clone(),
            Duration::from_millis(config.raft.snapshot_install_wait_ms),
        ),
        log_store,
        state_machine,
    )
    .await
    .context("cannot start raft")?;
    let node = Arc::new(Node::new(
        config.clone(),
        raft.clone(),
        reader,
        log_progress,
        committed,
        info.clone(),
        peers,
        audit.clone(),
    ));
    tracing::info!(node_id = config.node_id, client = %info.client_addr, peer = %info.peer_addr, "node started");

    tokio::spawn(watchdog::run(
        raft.clone(),
        config.node_id,
        Duration::from_millis(config.raft.election_timeout_ms_max),
    ));
    tokio::spawn(observability::sample_raft_metrics(node.clone()));
    tokio::spawn(node.clone().learn_ready_index());
    tokio::spawn(node.clone().snapshot_when_live_tree_full());

    let (stop, stop_flag) = watch::channel(false);
    let message_bytes_max = config.limits.grpc_message_bytes_max;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RegistryServer<registry_service::RegistryService>>()
        .await;
    // Reflection lists what this port serves: not the peer service, which shares the file set.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(residency_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("residency.v1.Registry")
            .with_service_name("residency.v1.Catalog")
            .with_service_name("residency.v1.Cluster")
            .with_service_name("residency.v1.Watch")
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let limits = &config.limits;
    let tls_policy = config.tls.as_ref().map(|settings| auth::TlsPolicy {
        trust_domain: settings.trust_domain.clone(),
        roles: settings.roles.clone(),
        anonymous_role: settings.anonymous_role,
        jurisdiction: config.required_jurisdiction,
    });
    let shedding = auth::Shedding {
        requests_in_flight_max: limits.requests_in_flight_max,
        caller_requests_in_flight_max: limits.caller_requests_in_flight_max,
        caller_requests_per_second: limits.caller_requests_per_second,
        caller_requests_burst: limits.caller_requests_burst,
    };
    let keepalive = |builder: tonic::transport::Server| {
        builder
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_millis(limits.keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(Duration::from_millis(limits.keepalive_timeout_ms)))
    };
    let mut client_builder = keepalive(tonic::transport::Server::builder())
        .max_concurrent_streams(limits.connection_streams_max);
    let mut peer_builder = keepalive(tonic::transport::Server::builder())
        .http2_max_pending_accept_reset_streams(Some(PEER_PENDING_RESET_STREAMS_MAX));
    if let Some(node_tls) = &node_tls {
        client_builder = client_builder
            .tls_config(node_tls.client_listener())
            .context("the client listener's TLS")?;
        peer_builder = peer_builder
            .tls_config(node_tls.peer_listener())
            .context("the peer listener's TLS")?;
    }
    let client_server = client_builder
        .layer(auth::AuthLayer::new(auth::Authorizer::new(
            auth::Listener::Client,
            tls_policy.clone(),
            shedding,
            audit.clone(),
        )))
        .add_service(
            RegistryServer::new(registry_service::RegistryService::new(node.clone()))
                .max_decoding_message_size(message_bytes_max)
                .max_encoding_message_size(message_bytes_max),
        )
        .add_service(
            CatalogServer::new(catalog_service::CatalogService::new(node.clone()))
                .max_decoding_message_size(message_bytes_max)
                .max_encoding_message_size(message_bytes_max),
        )
        .add_service(
            ClusterServer::new(cluster_service::ClusterService::new(node.clone()))
                .max_decoding_message_size(message_bytes_max)
                .max_encoding_message_size(message_bytes_max),
        )
        .add_service(
            residency_proto::pb::watch_server::WatchServer::new(watch_service::WatchService::new(
                node.clone(),
            ))
            .max_decoding_message_size(message_bytes_max)
            .max_encoding_message_size(message_bytes_max),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            accepted_without_delay(listeners.client),
            stopped(stop_flag.clone()),
        );
    let peer_server = peer_builder
        .layer(auth::AuthLayer::new(auth::Authorizer::new(
            auth::Listener::Peer,
            tls_policy,
            shedding,
            audit.clone(),
        )))
        .add_service(
            PeerServer::new(peer_service::PeerService::new(
                node.clone(),
                stop_flag.clone(),
            ))
            .max_decoding_message_size(config.limits.peer_message_bytes_max)
            .max_encoding_message_size(config.limits.peer_message_bytes_max),
        )
        .serve_with_incoming_shutdown(
            accepted_without_delay(listeners.peer),
            stopped(stop_flag.clone()),
        );
    let metrics_server = axum::serve(listeners.metrics, observability::router(node.clone()))
        .with_graceful_shutdown(stopped(stop_flag.clone()));
    let client_task = tokio::spawn(client_server);
    let peer_task = tokio::spawn(peer_server);
    let metrics_task = tokio::spawn(async move { metrics_server.await });

    let raft_metrics = raft.metrics();
    let raft_failed = async move {
        let mut tick = tokio::time::interval(Duration::from_millis(RAFT_STATE_CHECK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if raft_metrics.borrow().running_state.is_err() {
                return;
            }
        }
    };
    let fatal = tokio::select! {
        () = shutdown => false,
        () = raft_failed => true,
    };
    tracing::info!("shutting down");
    health_reporter
        .set_not_serving::<RegistryServer<registry_service::RegistryService>>()
        .await;
    let _ = stop.send(true);
    let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
    for task in [client_task, peer_task] {
        match tokio::time::timeout(grace, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "a listener ended with an error"),
            Ok(Err(error)) => tracing::warn!(%error, "a listener task failed"),
            Err(_) => tracing::warn!("a listener did not stop within the grace period"),
        }
    }
    let _ = tokio::time::timeout(grace, metrics_task).await;
    let raft_state = raft.metrics().borrow().running_state.clone();
    raft.shutdown()
        .await
        .context("raft did not shut down cleanly")?;
    if fatal {
        anyhow::bail!("raft stopped on a fatal error: {raft_state:?}");
    }
    tracing::info!("stopped");
    Ok(())
}
