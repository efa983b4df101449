//! `residencyctl watch [--from REV] [--prefix P] [--location L]`.

use residency_client::{Client, WatchItem};
use residency_types::{Change, LocationId, Revision};
use serde_json::json;

use crate::Failure;
use crate::cmd::user::placement_json;
use crate::output::{self, OutputFormat};

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The first revision to print; by default, from the next write on.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Only users whose id starts with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Only changes at (or moving to, or of) this location.
    #[arg(long)]
    location: Option<String>,
}

pub async fn run(client: &Client, format: OutputFormat, args: WatchArgs) -> Result<(), Failure> {
    let location = args.location.map(LocationId::parse).transpose()?;
    let mut watcher = client.watch(Revision(args.from), &args.prefix, location.as_ref());
    while let Some(item) = watcher.next().await? {
        match (item, format) {
            (WatchItem::Event(event), OutputFormat::Json) => {
                let change = match &event.change {
                    Change::Placed(placement) => json!({ "placed": placement_json(placement) }),
                    Change::Forgotten {
                        user_id,
                        location_id,
                    } => {
                        json!({ "forgotten": { "user_id": user_id.as_str(), "location_id": location_id.as_str() } })
                    }
                    Change::Location(location) => json!({ "location": {
                        "location_id": location.id.as_str(),
                        "jurisdiction": location.jurisdiction.as_str(),
                        "state": location.state.as_str(),
                    } }),
                    Change::Policy(policy) => json!({ "policy": {
                        "residency": policy.residency.as_str(),
                        "storage": policy.storage.iter().map(|code| code.as_str()).collect::<Vec<_>>(),
                        "access": policy.access.iter().map(|code| code.as_str()).collect::<Vec<_>>(),
                    } }),
                };
                output::line(&json!({ "revision": event.revision.0, "index": event.index, "change": change }).to_string());
            }
            (WatchItem::Progress(revision), OutputFormat::Json) => {
                output::line(&json!({ "progress": revision.0 }).to_string());
            }
            (WatchItem::Event(event), OutputFormat::Table) => {
                let what = match &event.change {
                    Change::Placed(placement) => match placement.state.move_target() {
                        Some(target) => format!(
                            "{} at {} moving to {target} (epoch {})",
                            placement.user_id, placement.location_id, placement.epoch
                        ),
                        None => format!(
                            "{} at {} (epoch {})",
                            placement.user_id, placement.location_id, placement.epoch
                        ),
                    },
                    Change::Forgotten {
                        user_id,
                        location_id,
                    } => format!("{user_id} forgotten (was at {location_id})"),
                    Change::Location(location) => {
                        format!(
                            "location {} ({}) {}",
                            location.id,
                            location.jurisdiction,
                            location.state.as_str()
                        )
                    }
                    Change::Policy(policy) => format!("policy {} updated", policy.residency),
                };
                output::line(&format!("{}.{}  {what}", event.revision, event.index));
            }
            (WatchItem::Progress(_), OutputFormat::Table) => {}
        }
    }
    Ok(())
}
