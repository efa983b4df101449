//! `residencyctl member list|add-learner|promote|remove`.

use std::time::Duration;

use clap::Subcommand;
use residency_client::Client;

use crate::Failure;
use crate::cmd::cluster::print_members;
use crate::output::{self, OutputFormat};

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Lists the members with their roles and progress (as `status`).
    ///
    /// Example: residencyctl member list
    List,
    /// Adds the node listening for peers at PEER_ADDR as a learner. Its jurisdiction must be the
    /// cluster's required one.
    ///
    /// Example: residencyctl member add-learner 127.0.0.1:7204
    AddLearner { peer_addr: String },
    /// Makes a learner a voter once it has caught up, showing its lag while it waits.
    ///
    /// Example: residencyctl member promote 4 --catch-up-timeout-ms 60000
    Promote {
        node_id: u64,
        /// How long to wait for the learner to catch up.
        #[arg(long, default_value_t = 60_000)]
        catch_up_timeout_ms: u64,
        /// How far behind the leader it may still be, in log entries.
        #[arg(long, default_value_t = 100)]
        max_lag_entries: u64,
    },
    /// Removes a voter or learner from the cluster (then stop its process).
    ///
    /// Example: residencyctl member remove 3
    Remove { node_id: u64 },
}

/// The longest catch-up wait the server accepts.
const CATCH_UP_TIMEOUT_MS_MAX: u64 = 600_000;

/// How often `promote` prints the learner's lag while it waits.
const LAG_REPORT_INTERVAL_MS: u64 = 1_000;

/// The client deadline a promotion needs: the catch-up wait plus the change itself.
pub fn promote_timeout(catch_up_timeout_ms: u64) -> Duration {
    Duration::from_millis(catch_up_timeout_ms + 15_000)
}

async fn report_lag(client: &Client, node_id: u64) {
    loop {
        tokio::time::sleep(Duration::from_millis(LAG_REPORT_INTERVAL_MS)).await;
        if let Ok(status) = client.status().await {
            let lag = status
                .members
                .iter()
                .find(|member| member.id == node_id)
                .and_then(|member| member.lag_entries);
            let lag = lag.map_or_else(|| "unknown".to_string(), |lag| lag.to_string());
            eprintln!("waiting for node {node_id} to catch up: {lag} entries behind");
        }
    }
}

pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: MemberCommand,
) -> Result<(), Failure> {
    let response = match command {
        MemberCommand::List => {
            let status = crate::cmd::cluster::joined_status(client).await?;
            print_members(format, status.leader_id, &status.members);
            return Ok(());
        }
        MemberCommand::AddLearner { peer_addr } => client.add_learner(&peer_addr).await?,
        MemberCommand::Promote {
            node_id,
            catch_up_timeout_ms,
            max_lag_entries,
        } => {
            if catch_up_timeout_ms == 0 || catch_up_timeout_ms > CATCH_UP_TIMEOUT_MS_MAX {
                return Err(Failure {
                    exit_code: 2,
                    message: format!("--catch-up-timeout-ms is 1..={CATCH_UP_TIMEOUT_MS_MAX}"),
                });
            }
            let promotion = client.promote(node_id, catch_up_timeout_ms, max_lag_entries);
            tokio::select! {
                result = promotion => result?,
                () = report_lag(client, node_id) => unreachable!("the lag report runs until the promotion ends"),
            }
        }
        MemberCommand::Remove { node_id } => client.remove_member(node_id).await?,
    };
    print_members(format, None, &response.members);
    if format == OutputFormat::Table {
        output::line("membership changed");
    }
    Ok(())
}
