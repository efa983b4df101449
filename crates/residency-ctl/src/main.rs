//! `residencyctl`: the operator's command line for the Residency Registry.
//!
//! Exit codes: 0 success; 1 the request failed (a one-line reason on stderr, starting with the
//! stable reason code); 2 bad usage; 3 the user has no placement (`user get`); 4 access denied
//! (`check`).

mod cmd;
mod output;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use residency_client::{Client, ClientOptions, LOCAL_ENDPOINTS};

use crate::output::OutputFormat;

#[derive(Debug, Parser)]
#[command(
    name = "residencyctl",
    version,
    about = "Operate and query a Residency Registry cluster"
)]
struct Cli {
    /// Client endpoints of the cluster's nodes, comma-separated host:port.
    #[arg(long, global = true, env = "RESIDENCY_ENDPOINTS", default_value = LOCAL_ENDPOINTS, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// How to print results.
    #[arg(long, short, global = true, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    /// Deadline of each request, retries included, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    /// The identity recorded with writes (unauthenticated until mutual TLS is on).
    #[arg(long, global = true, env = "RESIDENCY_CALLER", default_value = "")]
    caller: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Members, roles, leader, term, and commit and applied index per node.
    ///
    /// Example: residencyctl status -o json
    Status,
    /// Prints changes as they are applied, in order, from a revision on, until interrupted.
    ///
    /// Example: residencyctl watch --from 120 --prefix user- -o json
    Watch(cmd::watch::WatchArgs),
    /// Backups of a running cluster (restore with `residencyd restore`).
    #[command(subcommand)]
    Backup(cmd::backup::BackupCommand),
    /// Membership: list, add-learner, promote, remove.
    #[command(subcommand)]
    Member(cmd::member::MemberCommand),
    /// Cluster life: bootstrap, status, digest.
    #[command(subcommand)]
    Cluster(cmd::cluster::ClusterCommand),
    /// Placements: assign, get, move, forget.
    #[command(subcommand)]
    User(cmd::user::UserCommand),
    /// The location catalog: add, get, list, drain, activate, retire.
    #[command(subcommand)]
    Location(cmd::location::LocationCommand),
    /// Residency policies: set, get, list, dry-run.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
    /// May this service, running in this jurisdiction, touch this user's data? Exit code 4 on a deny.
    ///
    /// Example: residencyctl check alice --service payments --jurisdiction US --operation write
    Check(cmd::check::CheckArgs),
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub exit_code: u8,
    pub message: String,
}

impl From<residency_client::ClientError> for Failure {
    fn from(error: residency_client::ClientError) -> Self {
        Failure {
            exit_code: 1,
            message: error.to_string(),
        }
    }
}

impl From<residency_types::ValidationError> for Failure {
    fn from(error: residency_types::ValidationError) -> Self {
        Failure {
            exit_code: 2,
            message: format!("{}: {error}", error.code),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut timeout = Duration::from_millis(cli.timeout_ms);
    if let Command::Member(cmd::member::MemberCommand::Promote {
        catch_up_timeout_ms,
        ..
    }) = &cli.command
    {
        timeout = timeout.max(cmd::member::promote_timeout(*catch_up_timeout_ms));
    }
    let options = ClientOptions {
        timeout,
        caller: cli.caller.clone(),
    };
    let client = match Client::new(cli.endpoints.clone(), options) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Status => cmd::cluster::status(&client, cli.output).await,
        Command::Cluster(command) => cmd::cluster::run(&client, cli.output, command).await,
        // An import shares its client among the batches it keeps in flight.
        Command::User(cmd::user::UserCommand::Import(args)) => {
            cmd::transfer::import(client, cli.output, args).await
        }
        Command::User(command) => cmd::user::run(&client, cli.output, command).await,
        Command::Watch(args) => cmd::watch::run(&client, cli.output, args).await,
        Command::Backup(command) => cmd::backup::run(&client, cli.output, command).await,
        Command::Member(command) => cmd::member::run(&client, cli.output, command).await,
        Command::Location(command) => cmd::location::run(&client, cli.output, command).await,
        Command::Policy(command) => cmd::policy::run(&client, cli.output, command).await,
        Command::Check(args) => cmd::check::run(&client, cli.output, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message.replace('\n', " "));
            ExitCode::from(failure.exit_code)
        }
    }
}
