//! `residencyctl check USER --service S --jurisdiction J [--operation read|write]`.

use residency_client::Client;
use residency_types::{AccessOperation, CallerId, Decision, Jurisdiction, UserId};
use serde_json::json;

use crate::Failure;
use crate::cmd::user::ConsistencyArg;
use crate::output::{self, OutputFormat};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OperationArg {
    Read,
    Write,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    user_id: String,
    /// The calling service.
    #[arg(long)]
    service: String,
    /// The jurisdiction the calling service runs in.
    #[arg(long)]
    jurisdiction: String,
    #[arg(long, value_enum, default_value_t = OperationArg::Read)]
    operation: OperationArg,
    #[arg(long, default_value = "linearizable")]
    consistency: ConsistencyArg,
}

/// Exit code of a deny, so scripts can branch on it.
const DENIED_EXIT_CODE: u8 = 4;

pub async fn run(client: &Client, format: OutputFormat, args: CheckArgs) -> Result<(), Failure> {
    let user_id = UserId::parse(args.user_id)?;
    CallerId::parse(args.service.clone())?;
    let jurisdiction = Jurisdiction::parse(&args.jurisdiction)?;
    let operation = match args.operation {
        OperationArg::Read => AccessOperation::Read,
        OperationArg::Write => AccessOperation::Write,
    };
    let checked = client
        .check_access(
            &user_id,
            &args.service,
            jurisdiction,
            operation,
            args.consistency.0,
        )
        .await?;
    let value = match &checked.decision {
        Decision::Allow {
            location_id,
            location_jurisdiction,
            epoch,
            move_target,
        } => json!({
            "allowed": true,
            "location_id": location_id.as_str(),
            "location_jurisdiction": location_jurisdiction.as_str(),
            "epoch": epoch,
            "move_target_location_id": move_target.as_ref().map(|target| target.as_str()),
            "revision": checked.revision.0,
        }),
        Decision::Deny { reason } => json!({
            "allowed": false,
            "deny_reason": reason.as_str(),
            "revision": checked.revision.0,
        }),
    };
    match format {
        OutputFormat::Json => output::json(&value),
        OutputFormat::Table => match &checked.decision {
            Decision::Allow {
                location_id,
                location_jurisdiction,
                epoch,
                move_target,
            } => {
                let moving = move_target
                    .as_ref()
                    .map(|target| format!("   moving to: {target}"))
                    .unwrap_or_default();
                output::line(&format!(
                    "ALLOW   location: {location_id} ({location_jurisdiction})   epoch: {epoch}   revision: {}{moving}",
                    checked.revision
                ));
            }
            Decision::Deny { reason } => {
                output::line(&format!(
                    "DENY    reason: {}   revision: {}",
                    reason.as_str(),
                    checked.revision
                ));
            }
        },
    }
    match checked.decision {
        Decision::Allow { .. } => Ok(()),
        Decision::Deny { reason } => Err(Failure {
            exit_code: DENIED_EXIT_CODE,
            message: format!("access denied: {}", reason.as_str()),
        }),
    }
}
