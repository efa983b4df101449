//! `residencyctl user assign|get|forget`.

use std::str::FromStr;

use clap::Subcommand;
use residency_client::{Client, WriteOptions};
use residency_types::{Consistency, Jurisdiction, LocationId, Placement, Revision, UserId};
use serde_json::json;

use crate::Failure;
use crate::output::{self, OutputFormat};

/// `linearizable` (default), `stale`, or `at-least=REVISION`.
#[derive(Debug, Clone, Copy)]
pub struct ConsistencyArg(pub Consistency);

impl FromStr for ConsistencyArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "linearizable" => Ok(ConsistencyArg(Consistency::Linearizable)),
            "stale" => Ok(ConsistencyArg(Consistency::Stale)),
            _ => match text.strip_prefix("at-least=").map(str::parse::<u64>) {
                Some(Ok(revision)) => Ok(ConsistencyArg(Consistency::AtLeast(Revision(revision)))),
                _ => Err(format!(
                    "{text:?}: expected linearizable, stale or at-least=REVISION"
                )),
            },
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    /// Apply only if the placement's mod_revision is this (0: only if it does not exist).
    #[arg(long)]
    expected_mod_revision: Option<u64>,
    #[command(flatten)]
    context: ContextArgs,
}

impl WriteArgs {
    pub fn options(self) -> WriteOptions {
        WriteOptions {
            expected_mod_revision: self.expected_mod_revision.map(Revision),
            ..self.context.options()
        }
    }
}

/// What every write carries: its idempotency key and reason (catalog writes have no
/// compare-and-set, so they take only these).
#[derive(Debug, clap::Args)]
pub struct ContextArgs {
    /// Idempotency key: a retry with the same id is applied once. Random if not given.
    #[arg(long)]
    request_id: Option<String>,
    /// Why, recorded with the write.
    #[arg(long, default_value = "")]
    reason: String,
}

impl ContextArgs {
    pub fn options(self) -> WriteOptions {
        WriteOptions {
            expected_mod_revision: None,
            request_id: self.request_id,
            reason: self.reason,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Creates or updates a user's placement.
    ///
    /// Example: residencyctl user assign alice --residency US --location us-east-1/oci-ashburn/pg-042 --reason onboarding
    Assign {
        user_id: String,
        /// ISO 3166-1 alpha-2 code of the jurisdiction the user's data belongs to.
        #[arg(long)]
        residency: String,
        /// The storage location that holds the data.
        #[arg(long)]
        location: String,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Shows a user's placement.
    ///
    /// Example: residencyctl --endpoints 127.0.0.1:7102 user get alice --consistency at-least=42
    Get {
        user_id: String,
        /// linearizable (default), stale, or at-least=REVISION.
        #[arg(long, default_value = "linearizable")]
        consistency: ConsistencyArg,
    },
    /// Moves a user's data between locations: begin, then complete (epoch rises) or abort.
    #[command(subcommand)]
    Move(MoveCommand),
    /// Loads placements from a CSV or JSON-lines file in atomic batches; safe to run again.
    ///
    /// Example: residencyctl user import users.csv --rejects users.rejects.jsonl
    Import(crate::cmd::transfer::ImportArgs),
    /// Writes every placement at one revision as JSON lines (to FILE, or stdout).
    ///
    /// Example: residencyctl user export --file placements.jsonl
    Export {
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Deletes a user's placement.
    ///
    /// Example: residencyctl user forget alice --expected-mod-revision 42
    Forget {
        user_id: String,
        #[command(flatten)]
        write: WriteArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum MoveCommand {
    /// Starts the move to TARGET, which must satisfy the same rules as an assign.
    ///
    /// Example: residencyctl user move begin alice --target us-west-2/oci-phoenix/pg-013
    Begin {
        user_id: String,
        #[arg(long)]
        target: String,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Flips the placement to the target and raises its epoch.
    ///
    /// Example: residencyctl user move complete alice
    Complete {
        user_id: String,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Gives the move up; the placement stays where it was.
    ///
    /// Example: residencyctl user move abort alice
    Abort {
        user_id: String,
        #[command(flatten)]
        write: WriteArgs,
    },
}

async fn run_move(
    client: &Client,
    format: OutputFormat,
    command: MoveCommand,
) -> Result<(), Failure> {
    let moved = match command {
        MoveCommand::Begin {
            user_id,
            target,
            write,
        } => {
            let target = LocationId::parse(target)?;
            client
                .begin_move(&UserId::parse(user_id)?, &target, Some(write.options()))
                .await?
        }
        MoveCommand::Complete { user_id, write } => {
            client
                .complete_move(&UserId::parse(user_id)?, Some(write.options()))
                .await?
        }
        MoveCommand::Abort { user_id, write } => {
            client
                .abort_move(&UserId::parse(user_id)?, Some(write.options()))
                .await?
        }
    };
    print_placement(
        format,
        &moved.placement,
        json!({ "revision": moved.revision.0 }),
    );
    Ok(())
}

pub fn placement_json(placement: &Placement) -> serde_json::Value {
    json!({
        "user_id": placement.user_id.as_str(),
        "residency": placement.residency.as_str(),
        "location_id": placement.location_id.as_str(),
        "state": placement.state.as_str(),
        "move_target_location_id": placement.state.move_target().map(|target| target.as_str()),
        "epoch": placement.epoch,
        "create_revision": placement.create_revision.0,
        "mod_revision": placement.mod_revision.0,
        "updated_at_ms": placement.updated_at_ms,
        "updated_by": placement.updated_by.as_str(),
        "updated_by_authenticated": placement.updated_by_authenticated,
        "reason": placement.reason.as_str(),
    })
}

fn print_placement(format: OutputFormat, placement: &Placement, extra: serde_json::Value) {
    match format {
        OutputFormat::Json => {
            let mut value = json!({ "placement": placement_json(placement) });
            if let (Some(object), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
                object.extend(extra.clone());
            }
            output::json(&value);
        }
        OutputFormat::Table => {
            let row = vec![
                placement.user_id.to_string(),
                placement.residency.to_string(),
                placement.location_id.to_string(),
                match placement.state.move_target() {
                    Some(target) => format!("moving to {target}"),
                    None => placement.state.as_str().to_string(),
                },
                placement.epoch.to_string(),
                placement.create_revision.to_string(),
                placement.mod_revision.to_string(),
                placement.updated_by.to_string(),
            ];
            output::table(
                &[
                    "USER",
                    "RESIDENCY",
                    "LOCATION",
                    "STATE",
                    "EPOCH",
                    "CREATED",
                    "MODIFIED",
                    "BY",
                ],
                &[row],
            );
            if let Some(extra) = extra.as_object() {
                let notes: Vec<String> = extra
                    .iter()
                    .map(|(key, value)| format!("{key}: {value}"))
                    .collect();
                output::line(&notes.join("   "));
            }
        }
    }
}

pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: UserCommand,
) -> Result<(), Failure> {
    match command {
        UserCommand::Assign {
            user_id,
            residency,
            location,
            write,
        } => {
            let user_id = UserId::parse(user_id)?;
            let residency = Jurisdiction::parse(&residency)?;
            let location = LocationId::parse(location)?;
            let assigned = client
                .assign(&user_id, residency, &location, Some(write.options()))
                .await?;
            let extra = json!({ "created": assigned.created, "revision": assigned.revision.0 });
            print_placement(format, &assigned.placement, extra);
            Ok(())
        }
        UserCommand::Get {
            user_id,
            consistency,
        } => {
            let user_id = UserId::parse(user_id)?;
            let read = client.lookup(&user_id, consistency.0).await?;
            let Some(placement) = read.placement else {
                return Err(Failure {
                    exit_code: 3,
                    message: format!(
                        "USER_NOT_FOUND: {user_id} has no placement (revision {})",
                        read.revision
                    ),
                });
            };
            let mut extra = json!({ "revision": read.revision.0, "served_by": read.served_by });
            if let (Some(object), Some(millis)) =
                (extra.as_object_mut(), read.millis_since_leader_contact)
            {
                object.insert("millis_since_leader_contact".to_string(), json!(millis));
            }
            print_placement(format, &placement, extra);
            Ok(())
        }
        UserCommand::Import(_) => Err(Failure {
            exit_code: 2,
            message: "an import runs through cmd::transfer::import".into(),
        }),
        UserCommand::Export { file } => crate::cmd::transfer::export(client, file).await,
        UserCommand::Move(command) => run_move(client, format, command).await,
        UserCommand::Forget { user_id, write } => {
            let user_id = UserId::parse(user_id)?;
            let revision = client.forget(&user_id, Some(write.options())).await?;
            match format {
                OutputFormat::Json => output::json(
                    &json!({ "user_id": user_id.as_str(), "forgotten": true, "revision": revision.0 }),
                ),
                OutputFormat::Table => {
                    output::line(&format!("forgot {user_id} at revision {revision}"))
                }
            }
            Ok(())
        }
    }
}
