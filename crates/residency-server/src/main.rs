//! `residencyd`: one registry node. Reads its TOML config, applies flag overrides, sets up
//! logging and signals, and hands over to `residency_server::run`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use residency_server::config::{Config, LogFormat};
use residency_server::{Listeners, observability};

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
    /// Overrides `log.format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
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
    let args = Args::parse();
    let config = load(&args)?.validate().context("invalid configuration")?;
    if args.check_config {
        println!("{config:#?}");
        return Ok(());
    }
    observability::init_tracing(&config.log);
    let listeners = Listeners::bind(&config).await?;
    residency_server::run(config, listeners, shutdown_signal()).await
}
