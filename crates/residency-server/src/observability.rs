//! The metrics listener: `/metrics` (Prometheus), `/healthz` (the process and its Raft core
//! run) and `/readyz` (a leader is known and this node has applied up to the commit index the
//! leader reported after this node started). Also the tracing setup and the sampler that turns
//! Raft's state into gauges.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::{LogConfig, LogFormat};
use crate::node::Node;

/// How often Raft's state is copied into gauges.
const METRICS_SAMPLE_INTERVAL_MS: u64 = 1_000;

/// The process-wide Prometheus recorder (one per process, whatever the number of nodes in it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("the metrics recorder is installed once per process")
        })
        .clone()
}

pub fn init_tracing(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Err(error) = result {
        eprintln!("tracing was already set up: {error}");
    }
}

#[derive(Clone)]
struct Probe {
    node: Arc<Node>,
    prometheus: PrometheusHandle,
}

pub fn router(node: Arc<Node>) -> Router {
    let probe = Probe {
        node,
        prometheus: prometheus(),
    };
    Router::new()
        .route(
            "/metrics",
            get(|State(probe): State<Probe>| async move { probe.prometheus.render() }),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(probe)
}

async fn healthz(State(probe): State<Probe>) -> (StatusCode, &'static str) {
    match probe.node.raft.metrics().borrow().running_state {
        Ok(()) => (StatusCode::OK, "ok\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "raft stopped\n"),
    }
}

async fn readyz(State(probe): State<Probe>) -> (StatusCode, String) {
    let node = &probe.node;
    let applied = node.reader.applied_revision().0;
    let Some((leader_id, _)) = node.leader() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no leader known\n".to_string(),
        );
    };
    // openraft 0.9 keeps a leader that lost its quorum in office; it cannot serve then.
    let quorum_window_ms = node.config.raft.election_timeout_ms_max;
    let quorum_ack_ms = node.raft.metrics().borrow().millis_since_quorum_ack;
    if leader_id == node.id() && quorum_ack_ms.is_none_or(|millis| millis > quorum_window_ms) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("leading without a quorum: last acknowledged {quorum_ack_ms:?} ms ago\n"),
        );
    }
    match node.ready_index.get() {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting to learn the cluster's commit index from the leader\n".to_string(),
        ),
        Some(&index) if applied < index => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("catching up: applied {applied} of {index}\n"),
        ),
        Some(_) => (StatusCode::OK, "ready\n".to_string()),
    }
}

/// Copies Raft's state into gauges until the node stops.
pub async fn sample_raft_metrics(node: Arc<Node>) {
    let prometheus = prometheus();
    loop {
        tokio::time::sleep(Duration::from_millis(METRICS_SAMPLE_INTERVAL_MS)).await;
        let metrics = node.raft.metrics().borrow().clone();
        if metrics.running_state.is_err() {
            return;
        }
        let is_leader = metrics.current_leader == Some(node.id());
        metrics::gauge!("residency_raft_term").set(metrics.current_term as f64);
        metrics::gauge!("residency_raft_is_leader").set(if is_leader { 1.0 } else { 0.0 });
        metrics::gauge!("residency_raft_leader_known").set(if metrics.current_leader.is_some() {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("residency_raft_last_log_index")
            .set(metrics.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("residency_raft_applied_index")
            .set(node.reader.applied_revision().0 as f64);
        metrics::gauge!("residency_raft_committed_index")
            .set(node.committed.get().unwrap_or(0) as f64);
        metrics::gauge!("residency_raft_snapshot_index")
            .set(metrics.snapshot.map_or(0.0, |log_id| log_id.index as f64));
        if let Ok((placements, _)) = node
            .reader
            .query(|view| Ok(residency_core::query::placements_count(view)?))
            .await
        {
            metrics::gauge!("residency_placements").set(placements as f64);
        }
        prometheus.run_upkeep();
    }
}
