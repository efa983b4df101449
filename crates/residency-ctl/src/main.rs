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
use std::path::PathBuf;

use residency_client::{Client, ClientOptions, LOCAL_ENDPOINTS, TlsOptions};

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
    /// The name recorded with writes on a cluster without TLS (with TLS, the certificate's
    /// identity is recorded instead).
    #[arg(long, global = true, env = "RESIDENCY_CALLER", default_value = "")]
    caller: String,
    /// Mutual TLS with the files `certs init` wrote in DIR: ca.pem and <CERT_NAME>.pem/.key.
    /// Without this or --ca, ./data/certs is used if it holds a ca.pem (the local cluster's).
    #[arg(long, global = true, env = "RESIDENCY_CERTS_DIR")]
    certs_dir: Option<PathBuf>,
    /// Which certificate of the certs dir to present.
    #[arg(
        long,
        global = true,
        env = "RESIDENCY_CERT_NAME",
        default_value = "operator"
    )]
    cert_name: String,
    /// Mutual TLS with these files: the CA that signed the nodes' certificates...
    /// Takes precedence over --certs-dir.
    #[arg(long, global = true, env = "RESIDENCY_CA")]
    ca: Option<PathBuf>,
    /// ...and the client's certificate and key (both, or neither for an anonymous caller).
    #[arg(long, global = true, env = "RESIDENCY_CERT", requires = "ca")]
    cert: Option<PathBuf>,
    #[arg(long, global = true, env = "RESIDENCY_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Speak plaintext to a cluster running with TLS off (whatever the other TLS flags say).
    #[arg(long, global = true)]
    plaintext: bool,
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
    /// Development certificates: init (a CA and a cluster's certificates), issue, show. Offline.
    #[command(subcommand)]
    Certs(cmd::certs::CertsCommand),
    /// The audit file of a node: verify its hash chain, show its last records. Offline.
    #[command(subcommand)]
    Audit(cmd::audit::AuditCommand),
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
    // The offline commands need no client.
    let offline = match cli.command {
        Command::Certs(command) => Some(cmd::certs::run(command)),
        Command::Audit(command) => Some(cmd::audit::run(command, cli.output)),
        command => {
            return online(
                cli.endpoints,
                cli.output,
                timeout,
                cli.caller,
                tls_choice(
                    cli.plaintext,
                    cli.certs_dir,
                    &cli.cert_name,
                    cli.ca,
                    cli.cert.zip(cli.key),
                ),
                command,
            )
            .await;
        }
    };
    finish(offline.expect("an offline command ran"))
}

/// Where the local cluster's certificates are, relative to the repository root.
const LOCAL_CERTS_DIR: &str = "data/certs";

/// TLS as the flags ask: explicit files, a certs dir, the local cluster's certs if present,
/// or plaintext.
fn tls_choice(
    plaintext: bool,
    certs_dir: Option<PathBuf>,
    cert_name: &str,
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<Option<TlsOptions>, residency_client::ClientError> {
    if plaintext {
        return Ok(None);
    }
    if let Some(ca) = ca {
        let identity = identity
            .as_ref()
            .map(|(cert, key)| (cert.as_path(), key.as_path()));
        return TlsOptions::from_files(&ca, identity).map(Some);
    }
    let dir = certs_dir.or_else(|| {
        let local = PathBuf::from(LOCAL_CERTS_DIR);
        local.join("ca.pem").exists().then_some(local)
    });
    match dir {
        Some(dir) => TlsOptions::from_dir(&dir, cert_name).map(Some),
        None => Ok(None),
    }
}

fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message.replace('\n', " "));
            ExitCode::from(failure.exit_code)
        }
    }
}

async fn online(
    endpoints: Vec<String>,
    output: crate::output::OutputFormat,
    timeout: Duration,
    caller: String,
    tls: Result<Option<TlsOptions>, residency_client::ClientError>,
    command: Command,
) -> ExitCode {
    let tls = match tls {
        Ok(tls) => tls,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let options = ClientOptions {
        timeout,
        caller,
        tls,
    };
    let client = match Client::new(endpoints, options) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Status => cmd::cluster::status(&client, output).await,
        Command::Cluster(command) => cmd::cluster::run(&client, output, command).await,
        // An import shares its client among the batches it keeps in flight.
        Command::User(cmd::user::UserCommand::Import(args)) => {
            cmd::transfer::import(client, output, args).await
        }
        Command::User(command) => cmd::user::run(&client, output, command).await,
        Command::Watch(args) => cmd::watch::run(&client, output, args).await,
        Command::Backup(command) => cmd::backup::run(&client, output, command).await,
        Command::Member(command) => cmd::member::run(&client, output, command).await,
        Command::Location(command) => cmd::location::run(&client, output, command).await,
        Command::Policy(command) => cmd::policy::run(&client, output, command).await,
        Command::Check(args) => cmd::check::run(&client, output, args).await,
        Command::Certs(_) | Command::Audit(_) => {
            unreachable!("offline commands run without a client")
        }
    };
    finish(result)
}
