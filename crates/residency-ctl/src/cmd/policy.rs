//! `residencyctl policy set|get|list|dry-run`.

use std::collections::BTreeSet;

use clap::Subcommand;
use residency_client::Client;
use residency_types::{Jurisdiction, Policy};
use serde_json::json;

use crate::Failure;
use crate::cmd::user::{ConsistencyArg, ContextArgs};
use crate::output::{self, OutputFormat};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Creates or replaces the policy for a residency. Refused if existing placements would
    /// be left in breach (see `dry-run`).
    ///
    /// Example: residencyctl policy set US --storage US --access US
    Set {
        /// The residency jurisdiction the policy governs.
        residency: String,
        /// Jurisdictions where such data may be stored, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        storage: Vec<String>,
        /// Jurisdictions from which such data may be accessed, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        access: Vec<String>,
        #[command(flatten)]
        write: ContextArgs,
    },
    /// Shows the policy for a residency.
    ///
    /// Example: residencyctl policy get US
    Get {
        residency: String,
        #[arg(long, default_value = "linearizable")]
        consistency: ConsistencyArg,
    },
    /// Lists every policy.
    ///
    /// Example: residencyctl policy list
    List {
        #[arg(long, default_value = "linearizable")]
        consistency: ConsistencyArg,
    },
    /// What `set` with this storage set would find in breach, changing nothing.
    ///
    /// Example: residencyctl policy dry-run US --storage US,CA
    DryRun {
        residency: String,
        #[arg(long, value_delimiter = ',', required = true)]
        storage: Vec<String>,
        #[arg(long, default_value = "linearizable")]
        consistency: ConsistencyArg,
    },
}

fn jurisdictions(codes: &[String]) -> Result<BTreeSet<Jurisdiction>, Failure> {
    codes
        .iter()
        .map(|code| Ok(Jurisdiction::parse(code.trim())?))
        .collect()
}

fn joined(jurisdictions: &BTreeSet<Jurisdiction>) -> String {
    jurisdictions
        .iter()
        .map(Jurisdiction::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

fn policy_json(policy: &Policy) -> serde_json::Value {
    json!({
        "residency": policy.residency.as_str(),
        "storage": policy.storage.iter().map(Jurisdiction::as_str).collect::<Vec<_>>(),
        "access": policy.access.iter().map(Jurisdiction::as_str).collect::<Vec<_>>(),
        "mod_revision": policy.mod_revision.0,
    })
}

fn print_policies(format: OutputFormat, policies: &[Policy]) {
    match format {
        OutputFormat::Json => output::json(
            &json!({ "policies": policies.iter().map(policy_json).collect::<Vec<_>>() }),
        ),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = policies
                .iter()
                .map(|policy| {
                    vec![
                        policy.residency.to_string(),
                        joined(&policy.storage),
                        joined(&policy.access),
                        policy.mod_revision.to_string(),
                    ]
                })
                .collect();
            output::table(&["RESIDENCY", "STORAGE", "ACCESS", "MODIFIED"], &rows);
        }
    }
}

pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: PolicyCommand,
) -> Result<(), Failure> {
    match command {
        PolicyCommand::Set {
            residency,
            storage,
            access,
            write,
        } => {
            let residency = Jurisdiction::parse(&residency)?;
            let written = client
                .put_policy(
                    residency,
                    &jurisdictions(&storage)?,
                    &jurisdictions(&access)?,
                    Some(write.options()),
                )
                .await?;
            print_policies(format, std::slice::from_ref(&written.value));
            Ok(())
        }
        PolicyCommand::Get {
            residency,
            consistency,
        } => {
            let read = client
                .get_policy(Jurisdiction::parse(&residency)?, consistency.0)
                .await?;
            print_policies(format, std::slice::from_ref(&read.value));
            Ok(())
        }
        PolicyCommand::List { consistency } => {
            let policies = client.list_policies(consistency.0).await?;
            print_policies(format, &policies);
            Ok(())
        }
        PolicyCommand::DryRun {
            residency,
            storage,
            consistency,
        } => {
            let dry_run = client
                .dry_run_policy(
                    Jurisdiction::parse(&residency)?,
                    &jurisdictions(&storage)?,
                    consistency.0,
                )
                .await?;
            match format {
                OutputFormat::Json => output::json(&json!({
                    "placements_in_breach": dry_run.placements_in_breach,
                    "jurisdictions": dry_run.jurisdictions,
                    "sample_user_ids": dry_run.sample_user_ids,
                    "sample_truncated": dry_run.sample_truncated,
                    "revision": dry_run.revision.0,
                })),
                OutputFormat::Table => {
                    output::line(&format!(
                        "placements in breach: {} (stored in: {})   revision: {}",
                        dry_run.placements_in_breach,
                        if dry_run.jurisdictions.is_empty() {
                            "-".to_string()
                        } else {
                            dry_run.jurisdictions.join(",")
                        },
                        dry_run.revision
                    ));
                    for user_id in &dry_run.sample_user_ids {
                        output::line(&format!("  {user_id}"));
                    }
                    if dry_run.sample_truncated {
                        output::line("  (sample search stopped at its bound)");
                    }
                }
            }
            Ok(())
        }
    }
}
