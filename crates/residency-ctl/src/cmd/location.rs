//! `residencyctl location add|get|list|drain|activate|retire`.

use clap::Subcommand;
use residency_client::{Client, Versioned};
use residency_types::{Jurisdiction, Labels, Location, LocationId, LocationState};
use serde_json::json;

use crate::Failure;
use crate::cmd::user::{ConsistencyArg, ContextArgs};
use crate::output::{self, OutputFormat};

#[derive(Debug, Subcommand)]
pub enum LocationCommand {
    /// Registers a storage location (or updates its labels). Its jurisdiction is fixed.
    ///
    /// Example: residencyctl location add us-east-1/oci-ashburn/pg-043 --jurisdiction US --provider oci --region us-east-1 --zone us-east-1a
    Add {
        location_id: String,
        /// ISO 3166-1 alpha-2 code of where the location is.
        #[arg(long)]
        jurisdiction: String,
        #[arg(long, default_value = "")]
        provider: String,
        #[arg(long, default_value = "")]
        region: String,
        #[arg(long, default_value = "")]
        zone: String,
        #[command(flatten)]
        write: ContextArgs,
    },
    /// Shows one location.
    ///
    /// Example: residencyctl location get us-east-1/oci-ashburn/pg-042
    Get {
        location_id: String,
        #[arg(long, default_value = "linearizable")]
        consistency: ConsistencyArg,
    },
    /// Lists every location.
    ///
    /// Example: residencyctl location list -o json
    List {
        #[arg(long, default_value = "linearizable")]
        consistency: ConsistencyArg,
    },
    /// Keeps the location's placements but takes no new ones.
    ///
    /// Example: residencyctl location drain us-east-1/oci-ashburn/pg-042
    Drain {
        location_id: String,
        #[command(flatten)]
        write: ContextArgs,
    },
    /// Takes new placements again (from draining).
    ///
    /// Example: residencyctl location activate us-east-1/oci-ashburn/pg-042
    Activate {
        location_id: String,
        #[command(flatten)]
        write: ContextArgs,
    },
    /// Retires an empty location for good.
    ///
    /// Example: residencyctl location retire us-east-1/oci-ashburn/pg-042
    Retire {
        location_id: String,
        #[command(flatten)]
        write: ContextArgs,
    },
}

fn location_json(location: &Location) -> serde_json::Value {
    json!({
        "location_id": location.id.as_str(),
        "jurisdiction": location.jurisdiction.as_str(),
        "provider": location.labels.provider,
        "region": location.labels.region,
        "zone": location.labels.zone,
        "state": location.state.as_str(),
        "create_revision": location.create_revision.0,
        "mod_revision": location.mod_revision.0,
    })
}

fn print_locations(format: OutputFormat, locations: &[Location]) {
    match format {
        OutputFormat::Json => output::json(
            &json!({ "locations": locations.iter().map(location_json).collect::<Vec<_>>() }),
        ),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = locations
                .iter()
                .map(|location| {
                    vec![
                        location.id.to_string(),
                        location.jurisdiction.to_string(),
                        location.labels.provider.clone(),
                        location.labels.region.clone(),
                        location.labels.zone.clone(),
                        location.state.as_str().to_string(),
                        location.mod_revision.to_string(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "LOCATION",
                    "JURISDICTION",
                    "PROVIDER",
                    "REGION",
                    "ZONE",
                    "STATE",
                    "MODIFIED",
                ],
                &rows,
            );
        }
    }
}

fn print_written(format: OutputFormat, written: &Versioned<Location>) {
    match format {
        OutputFormat::Json => output::json(&json!({
            "location": location_json(&written.value),
            "created": written.created,
            "revision": written.revision.0,
        })),
        OutputFormat::Table => print_locations(format, std::slice::from_ref(&written.value)),
    }
}

async fn set_state(
    client: &Client,
    format: OutputFormat,
    location_id: String,
    state: LocationState,
    write: ContextArgs,
) -> Result<(), Failure> {
    let location_id = LocationId::parse(location_id)?;
    let written = client
        .set_location_state(&location_id, state, Some(write.options()))
        .await?;
    print_written(format, &written);
    Ok(())
}

pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: LocationCommand,
) -> Result<(), Failure> {
    match command {
        LocationCommand::Add {
            location_id,
            jurisdiction,
            provider,
            region,
            zone,
            write,
        } => {
            let location_id = LocationId::parse(location_id)?;
            let jurisdiction = Jurisdiction::parse(&jurisdiction)?;
            let labels = Labels::parse(&provider, &region, &zone)?;
            let written = client
                .put_location(&location_id, jurisdiction, &labels, Some(write.options()))
                .await?;
            print_written(format, &written);
            Ok(())
        }
        LocationCommand::Get {
            location_id,
            consistency,
        } => {
            let location_id = LocationId::parse(location_id)?;
            let read = client.get_location(&location_id, consistency.0).await?;
            print_written(format, &read);
            Ok(())
        }
        LocationCommand::List { consistency } => {
            let locations = client.list_locations(consistency.0).await?;
            print_locations(format, &locations);
            Ok(())
        }
        LocationCommand::Drain { location_id, write } => {
            set_state(client, format, location_id, LocationState::Draining, write).await
        }
        LocationCommand::Activate { location_id, write } => {
            set_state(client, format, location_id, LocationState::Active, write).await
        }
        LocationCommand::Retire { location_id, write } => {
            set_state(client, format, location_id, LocationState::Retired, write).await
        }
    }
}
