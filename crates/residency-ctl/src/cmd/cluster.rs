//! `residencyctl status`, `cluster status [--watch]`, `cluster init`, `cluster digest`.

use clap::Subcommand;
use residency_client::Client;
use residency_client::pb::{MemberRole, MemberStatus, RaftState};
use serde_json::json;

use crate::Failure;
use crate::output::{self, OutputFormat, optional};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Same as `residencyctl status`; `--watch` refreshes it every interval until interrupted.
    ///
    /// Example: residencyctl cluster status --watch --interval-ms 1000
    Status {
        #[arg(long)]
        watch: bool,
        /// Refresh interval for --watch, in milliseconds.
        #[arg(long, default_value_t = 2_000)]
        interval_ms: u64,
    },
    /// Asks every member for its state digest and reports whether they agree at one revision.
    /// Exits 1 if any member cannot answer or two members disagree.
    ///
    /// Example: residencyctl cluster digest
    Digest,
    /// Forms a new cluster from the nodes at these peer addresses (the first endpoint's node
    /// must be one of them). Refused if that node already belongs to a cluster.
    ///
    /// Example: residencyctl --endpoints 127.0.0.1:7101 cluster init --peers 127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203
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
        ClusterCommand::Status { watch: false, .. } => status(client, format).await,
        ClusterCommand::Status {
            watch: true,
            interval_ms,
        } => loop {
            // Clear the screen and home the cursor, like `watch`.
            if format == OutputFormat::Table {
                output::line("\x1b[2J\x1b[H");
            }
            if let Err(failure) = status(client, format).await {
                output::line(&format!("error: {}", failure.message));
            }
            tokio::time::sleep(std::time::Duration::from_millis(interval_ms)).await;
        },
        ClusterCommand::Digest => digest(client, format).await,
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

pub fn print_members(format: OutputFormat, leader_id: Option<u64>, members: &[MemberStatus]) {
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

/// The cluster's status, or a failure naming what to do if the answering node has not joined.
pub async fn joined_status(
    client: &Client,
) -> Result<residency_client::pb::StatusResponse, Failure> {
    let status = client.status().await?;
    if !status.initialized || status.members.is_empty() {
        return Err(Failure {
            exit_code: 1,
            message: format!(
                "CLUSTER_NOT_INITIALIZED: node {} has not joined a cluster: form one with `residencyctl cluster init`, or add it to one with `residencyctl member add-learner`",
                status.served_by
            ),
        });
    }
    Ok(status)
}

pub async fn status(client: &Client, format: OutputFormat) -> Result<(), Failure> {
    let status = joined_status(client).await?;
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

/// Attempts at finding every member at one revision (a cluster under writes moves on between
/// two answers), and the pause between them.
const DIGEST_ATTEMPTS_MAX: usize = 20;
const DIGEST_RETRY_MS: u64 = 250;

async fn digest(client: &Client, format: OutputFormat) -> Result<(), Failure> {
    let status = joined_status(client).await?;
    let options = client.options().clone();
    let mut last = Vec::new();
    for _ in 0..DIGEST_ATTEMPTS_MAX {
        let mut digests = Vec::new();
        for member in &status.members {
            let one = Client::new(vec![member.client_addr.clone()], options.clone())?;
            match one.digest().await {
                Ok(digest) => digests.push((member.id, Some(digest))),
                Err(error) => {
                    return Err(Failure {
                        exit_code: 1,
                        message: format!(
                            "MEMBER_UNREACHABLE: node {} did not give its digest: {error}",
                            member.id
                        ),
                    });
                }
            }
        }
        let revisions: std::collections::BTreeSet<u64> = digests
            .iter()
            .filter_map(|(_, digest)| digest.as_ref().map(|digest| digest.revision))
            .collect();
        last = digests;
        if revisions.len() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(DIGEST_RETRY_MS)).await;
    }
    let answers: Vec<(u64, u64, String, u64)> = last
        .iter()
        .filter_map(|(id, digest)| {
            digest
                .as_ref()
                .map(|d| (*id, d.revision, d.sha256_hex.clone(), d.pairs))
        })
        .collect();
    let same_revision = answers.windows(2).all(|pair| pair[0].1 == pair[1].1);
    let agree = same_revision && answers.windows(2).all(|pair| pair[0].2 == pair[1].2);
    match format {
        OutputFormat::Json => output::json(&json!({
            "agree": agree,
            "same_revision": same_revision,
            "members": answers.iter().map(|(id, revision, sha, pairs)| json!({
                "id": id, "revision": revision, "sha256": sha, "pairs": pairs,
            })).collect::<Vec<_>>(),
        })),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = answers
                .iter()
                .map(|(id, revision, sha, pairs)| {
                    vec![
                        id.to_string(),
                        revision.to_string(),
                        sha.clone(),
                        pairs.to_string(),
                    ]
                })
                .collect();
            output::table(&["ID", "REVISION", "SHA256", "PAIRS"], &rows);
        }
    }
    if !same_revision {
        return Err(Failure {
            exit_code: 1,
            message: format!(
                "REVISION_NOT_REACHED: the members did not stand at one revision in {DIGEST_ATTEMPTS_MAX} attempts; retry when writes pause"
            ),
        });
    }
    if !agree {
        return Err(Failure {
            exit_code: 1,
            message: "DIGEST_MISMATCH: members disagree at the same revision".to_string(),
        });
    }
    if format == OutputFormat::Table {
        output::line(&format!(
            "all {} members agree at revision {}",
            answers.len(),
            answers.first().map_or(0, |a| a.1)
        ));
    }
    Ok(())
}
