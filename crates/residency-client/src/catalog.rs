//! The location catalog and residency policies.

use std::collections::BTreeSet;

use residency_proto::convert::consistency_to_pb;
use residency_proto::pb;
use residency_types::{
    Consistency, Jurisdiction, Labels, Location, LocationId, LocationState, Policy, Revision,
};

use crate::{Client, ClientError, WriteOptions, catalog_client};

/// A location or policy as written or read, and the revision of that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    /// For writes: whether this call created it.
    pub created: bool,
    pub revision: Revision,
}

/// What a policy would find in breach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDryRun {
    pub placements_in_breach: u64,
    pub jurisdictions: Vec<String>,
    pub sample_user_ids: Vec<String>,
    pub sample_truncated: bool,
    pub revision: Revision,
}

fn location_of(response: pb::LocationResponse) -> Result<Versioned<Location>, ClientError> {
    let location = response
        .location
        .ok_or_else(|| ClientError::Protocol("an answer without its location".into()))?;
    Ok(Versioned {
        value: Location::try_from(location)?,
        created: response.created,
        revision: Revision(response.revision),
    })
}

fn policy_of(response: pb::PolicyResponse) -> Result<Versioned<Policy>, ClientError> {
    let policy = response
        .policy
        .ok_or_else(|| ClientError::Protocol("an answer without its policy".into()))?;
    Ok(Versioned {
        value: Policy::try_from(policy)?,
        created: response.created,
        revision: Revision(response.revision),
    })
}

fn codes(jurisdictions: &BTreeSet<Jurisdiction>) -> Vec<String> {
    jurisdictions.iter().map(ToString::to_string).collect()
}

fn location_state_to_pb(state: LocationState) -> pb::LocationState {
    match state {
        LocationState::Active => pb::LocationState::Active,
        LocationState::Draining => pb::LocationState::Draining,
        LocationState::Retired => pb::LocationState::Retired,
    }
}

impl Client {
    pub async fn put_location(
        &self,
        location_id: &LocationId,
        jurisdiction: Jurisdiction,
        labels: &Labels,
        options: Option<WriteOptions>,
    ) -> Result<Versioned<Location>, ClientError> {
        let options = options.unwrap_or_default();
        let message = pb::PutLocationRequest {
            location_id: location_id.to_string(),
            jurisdiction: jurisdiction.to_string(),
            labels: Some(pb::Labels {
                provider: labels.provider.clone(),
                region: labels.region.clone(),
                zone: labels.zone.clone(),
            }),
            context: Some(self.context(&options)),
        };
        let response = self
            .call(message, |channel, request| async move {
                catalog_client(channel).put_location(request).await
            })
            .await?;
        let versioned = location_of(response)?;
        self.note_revision(versioned.revision);
        Ok(versioned)
    }

    pub async fn set_location_state(
        &self,
        location_id: &LocationId,
        state: LocationState,
        options: Option<WriteOptions>,
    ) -> Result<Versioned<Location>, ClientError> {
        let options = options.unwrap_or_default();
        let message = pb::SetLocationStateRequest {
            location_id: location_id.to_string(),
            state: location_state_to_pb(state) as i32,
            context: Some(self.context(&options)),
        };
        let response = self
            .call(message, |channel, request| async move {
                catalog_client(channel).set_location_state(request).await
            })
            .await?;
        let versioned = location_of(response)?;
        self.note_revision(versioned.revision);
        Ok(versioned)
    }

    pub async fn get_location(
        &self,
        location_id: &LocationId,
        consistency: Consistency,
    ) -> Result<Versioned<Location>, ClientError> {
        let message = pb::GetLocationRequest {
            location_id: location_id.to_string(),
            consistency: Some(consistency_to_pb(consistency)),
        };
        let response = self
            .call(message, |channel, request| async move {
                catalog_client(channel).get_location(request).await
            })
            .await?;
        let versioned = location_of(response)?;
        self.note_revision(versioned.revision);
        Ok(versioned)
    }

    /// Every location, following pages.
    pub async fn list_locations(
        &self,
        consistency: Consistency,
    ) -> Result<Vec<Location>, ClientError> {
        let mut locations = Vec::new();
        let mut after = String::new();
        loop {
            let message = pb::ListLocationsRequest {
                after,
                limit: 0,
                consistency: Some(consistency_to_pb(consistency)),
            };
            let response = self
                .call(message, |channel, request| async move {
                    catalog_client(channel).list_locations(request).await
                })
                .await?;
            for location in response.locations {
                locations.push(Location::try_from(location)?);
            }
            if response.next_after.is_empty() {
                return Ok(locations);
            }
            after = response.next_after;
        }
    }

    pub async fn put_policy(
        &self,
        residency: Jurisdiction,
        storage: &BTreeSet<Jurisdiction>,
        access: &BTreeSet<Jurisdiction>,
        options: Option<WriteOptions>,
    ) -> Result<Versioned<Policy>, ClientError> {
        let options = options.unwrap_or_default();
        let message = pb::PutPolicyRequest {
            residency: residency.to_string(),
            storage: codes(storage),
            access: codes(access),
            context: Some(self.context(&options)),
        };
        let response = self
            .call(message, |channel, request| async move {
                catalog_client(channel).put_policy(request).await
            })
            .await?;
        let versioned = policy_of(response)?;
        self.note_revision(versioned.revision);
        Ok(versioned)
    }

    pub async fn get_policy(
        &self,
        residency: Jurisdiction,
        consistency: Consistency,
    ) -> Result<Versioned<Policy>, ClientError> {
        let message = pb::GetPolicyRequest {
            residency: residency.to_string(),
            consistency: Some(consistency_to_pb(consistency)),
        };
        let response = self
            .call(message, |channel, request| async move {
                catalog_client(channel).get_policy(request).await
            })
            .await?;
        let versioned = policy_of(response)?;
        self.note_revision(versioned.revision);
        Ok(versioned)
    }

    pub async fn list_policies(
        &self,
        consistency: Consistency,
    ) -> Result<Vec<Policy>, ClientError> {
        let message = pb::ListPoliciesRequest {
            consistency: Some(consistency_to_pb(consistency)),
        };
        let response = self
            .call(message, |channel, request| async move {
                catalog_client(channel).list_policies(request).await
            })
            .await?;
        response
            .policies
            .into_iter()
            .map(|policy| Ok(Policy::try_from(policy)?))
            .collect()
    }

    pub async fn dry_run_policy(
        &self,
        residency: Jurisdiction,
        storage: &BTreeSet<Jurisdiction>,
        consistency: Consistency,
    ) -> Result<PolicyDryRun, ClientError> {
        let message = pb::DryRunPolicyRequest {
            residency: residency.to_string(),
            storage: codes(storage),
            consistency: Some(consistency_to_pb(consistency)),
        };
        let response = self
            .call(message, |channel, request| async move {
                catalog_client(channel).dry_run_policy(request).await
            })
            .await?;
        Ok(PolicyDryRun {
            placements_in_breach: response.placements_in_breach,
            jurisdictions: response.jurisdictions,
            sample_user_ids: response.sample_user_ids,
            sample_truncated: response.sample_truncated,
            revision: Revision(response.header.map_or(0, |header| header.revision)),
        })
    }
}
