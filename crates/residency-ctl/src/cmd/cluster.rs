//! `residencyctl status`, `cluster status`, `cluster init`.

use clap::Subcommand;
use residency_client::Client;
use residency_client::pb::{MemberRole, MemberStatus, RaftState};
use serde_json::json;

use crate::Failure;
use crate::output::{self, OutputFormat, optional};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Same as `residencyctl status`.
    Status,
    /// Forms a new cluster from the nodes at these peer addresses (the first endpoint's node
    /// must be one of them). Refused if that node already belongs to a cluster.
    Init {
        /// Peer addresses (host:port) of every initial voter, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<String>,
    },
}

pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: ClusterCommand,
) -> Result<(), Failure> {
    match command {
        ClusterCommand::Status => status(client, format).await,
        ClusterCommand::Init { peers } => {
            let response = client.initialize(peers).await?;
            print_members(format, None, &response.members);
            Ok(())
        }
    }
}

fn role_name(role: i32) -> &'static str {
    match MemberRole::try_from(role) {
        Ok(MemberRole::Voter) => "voter",
        Ok(MemberRole::Learner) => "learner",
        _ => "unknown",
    }
}

fn state_name(state: i32) -> &'static str {
    match RaftState::try_from(state) {
        Ok(RaftState::Leader) => "leader",
        Ok(RaftState::Follower) => "follower",
        Ok(RaftState::Candidate) => "candidate",
        Ok(RaftState::Learner) => "learner",
        Ok(RaftState::Shutdown) => "shutdown",
        Ok(RaftState::Unreachable) => "unreachable",
        _ => "unknown",
    }
}

fn member_json(member: &MemberStatus) -> serde_json::Value {
    json!({
        "id": member.id,
        "client_addr": member.client_addr,
        "peer_addr": member.peer_addr,
        "jurisdiction": member.jurisdiction,
        "role": role_name(member.role),
        "state": state_name(member.state),
        "term": member.term,
        "leader_id": member.leader_id,
        "last_log_index": member.last_log_index,
        "committed_index": member.committed_index,
        "applied_index": member.applied_index,
        "snapshot_index": member.snapshot_index,
        "lag_entries": member.lag_entries,
        "error": if member.error.is_empty() { None } else { Some(&member.error) },
    })
}

fn print_members(format: OutputFormat, leader_id: Option<u64>, members: &[MemberStatus]) {
    match format {
        OutputFormat::Json => output::json(&json!({
            "leader_id": leader_id,
            "members": members.iter().map(member_json).collect::<Vec<_>>(),
        })),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = members
                .iter()
                .map(|member| {
                    vec![
                        member.id.to_string(),
                        member.client_addr.clone(),
                        member.peer_addr.clone(),
                        member.jurisdiction.clone(),
                        role_name(member.role).to_string(),
                        state_name(member.state).to_string(),
                        member.term.to_string(),
                        optional(member.committed_index),
                        optional(member.applied_index),
                        optional(member.lag_entries),
                        member.error.clone(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "ID",
                    "CLIENT",
                    "PEER",
                    "JURISDICTION",
                    "ROLE",
                    "STATE",
                    "TERM",
                    "COMMITTED",
                    "APPLIED",
                    "LAG",
                    "ERROR",
                ],
                &rows,
            );
        }
    }
}

pub async fn status(client: &Client, format: OutputFormat) -> Result<(), Failure> {
    let status = client.status().await?;
    if !status.initialized {
        return Err(Failure {
            exit_code: 1,
            message: format!(
                "CLUSTER_NOT_INITIALIZED: node {} has not joined a cluster; see `residencyctl cluster init`",
                status.served_by
            ),
        });
    }
    if format == OutputFormat::Table {
        let leader = status
            .leader_id
            .map_or_else(|| "none".to_string(), |id| id.to_string());
        output::line(&format!(
            "leader: {leader}   term: {}   answered by: node {}",
            status.term, status.served_by
        ));
    }
    print_members(format, status.leader_id, &status.members);
    Ok(())
}
