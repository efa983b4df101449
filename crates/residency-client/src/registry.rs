//! Placements: lookups, writes, moves and the access check.

use residency_proto::convert::{access_operation_to_pb, consistency_to_pb, decision_from_pb};
use residency_proto::pb;
use residency_types::{
    AccessOperation, AssignItem, Consistency, Decision, Jurisdiction, LocationId, Placement,
    ReasonCode, Revision, UserId,
};

use crate::{Assigned, Client, ClientError, Read, Route, WriteOptions, registry_client};

fn header_of<T>(client: &Client, header: Option<pb::ReadHeader>, value: T) -> Read<T> {
    let header = header.unwrap_or_default();
    client.note_revision(Revision(header.revision));
    Read {
        placement: value,
        revision: Revision(header.revision),
        served_by: header.served_by,
        millis_since_leader_contact: header.millis_since_leader_contact,
    }
}

fn placement_of(placement: Option<pb::Placement>) -> Result<Placement, ClientError> {
    let placement = placement
        .ok_or_else(|| ClientError::Protocol("an answer without its placement".to_string()))?;
    Ok(Placement::try_from(placement)?)
}

/// The result of a move step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub placement: Placement,
    pub revision: Revision,
}

/// An access decision and the revision it was made at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    pub revision: Revision,
}

impl Client {
    /// A user's placement, `None` if the user has none.
    pub async fn lookup(
        &self,
        user_id: &UserId,
        consistency: Consistency,
    ) -> Result<Read<Option<Placement>>, ClientError> {
        let message = pb::LookupRequest {
            user_id: user_id.to_string(),
            consistency: Some(consistency_to_pb(consistency)),
        };
        let answer = self
            .call_routed(
                Route::for_read(consistency),
                message,
                |channel, request| async move { registry_client(channel).lookup(request).await },
            )
            .await;
        match answer {
            Ok(response) => {
                let placement = response.placement.map(Placement::try_from).transpose()?;
                Ok(header_of(self, response.header, placement))
            }
            Err(ClientError::Status {
                reason: Some(ReasonCode::UserNotFound),
                revision,
                ..
            }) => Ok(Read {
                placement: None,
                revision: {
                    self.note_revision(Revision(revision.unwrap_or(0)));
                    Revision(revision.unwrap_or(0))
                },
                served_by: 0,
                millis_since_leader_contact: None,
            }),
            Err(error) => Err(error),
        }
    }

    /// Up to 1,000 users read at one revision, in request order; `None` for users not placed.
    pub async fn batch_lookup(
        &self,
        user_ids: &[UserId],
        consistency: Consistency,
    ) -> Result<Read<Vec<Option<Placement>>>, ClientError> {
        let message = pb::BatchLookupRequest {
            user_ids: user_ids.iter().map(ToString::to_string).collect(),
            consistency: Some(consistency_to_pb(consistency)),
        };
        let response = self
            .call_routed(Route::for_read(consistency), message, |channel, request| async move {
                registry_client(channel).batch_lookup(request).await
            })
            .await?;
        let placements = response
            .entries
            .into_iter()
            .map(|entry| entry.placement.map(Placement::try_from).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(header_of(self, response.header, placements))
    }

    pub async fn assign(
        &self,
        user_id: &UserId,
        residency: Jurisdiction,
        location_id: &LocationId,
        options: Option<WriteOptions>,
    ) -> Result<Assigned, ClientError> {
        let options = options.unwrap_or_default();
        // Made once, outside the retry loop: every retry carries the same request id.
        let message = pb::AssignRequest {
            user_id: user_id.to_string(),
            residency: residency.to_string(),
            location_id: location_id.to_string(),
            expected_mod_revision: options.expected_mod_revision.map(|revision| revision.0),
            context: Some(self.context(&options)),
        };
        let response = self
            .call(message, |channel, request| async move {
                registry_client(channel).assign(request).await
            })
            .await?;
        self.note_revision(Revision(response.revision));
        Ok(Assigned {
            placement: placement_of(response.placement)?,
            created: response.created,
            revision: Revision(response.revision),
        })
    }

    /// Several placements, all applied or none. A refusal is `BATCH_REFUSED`; `ClientError::
    /// batch_refusal` lists the items at fault.
    pub async fn batch_assign(
        &self,
        items: &[AssignItem],
        options: Option<WriteOptions>,
    ) -> Result<Vec<Assigned>, ClientError> {
        let options = options.unwrap_or_default();
        let message = pb::BatchAssignRequest {
            items: items
                .iter()
                .map(|item| pb::AssignItem {
                    user_id: item.user_id.to_string(),
                    residency: item.residency.to_string(),
                    location_id: item.location_id.to_string(),
                    expected_mod_revision: item.expected_mod_revision.map(|revision| revision.0),
                })
                .collect(),
            context: Some(self.context(&options)),
        };
        let response = self
            .call(message, |channel, request| async move {
                registry_client(channel).batch_assign(request).await
            })
            .await?;
        self.note_revision(Revision(response.revision));
        response
            .items
            .into_iter()
            .map(|item| {
                Ok(Assigned {
                    placement: placement_of(item.placement)?,
                    created: item.created,
                    revision: Revision(response.revision),
                })
            })
            .collect()
    }

    /// Deletes a placement; returns the revision it was deleted at.
    pub async fn forget(
        &self,
        user_id: &UserId,
        options: Option<WriteOptions>,
    ) -> Result<Revision, ClientError> {
        let options = options.unwrap_or_default();
        let message = pb::ForgetRequest {
            user_id: user_id.to_string(),
            expected_mod_revision: options.expected_mod_revision.map(|revision| revision.0),
            context: Some(self.context(&options)),
        };
        let response = self
            .call(message, |channel, request| async move {
                registry_client(channel).forget(request).await
            })
            .await?;
        self.note_revision(Revision(response.revision));
        Ok(Revision(response.revision))
    }

    pub async fn begin_move(
        &self,
        user_id: &UserId,
        target: &LocationId,
        options: Option<WriteOptions>,
    ) -> Result<Moved, ClientError> {
        let options = options.unwrap_or_default();
        let message = pb::BeginMoveRequest {
            user_id: user_id.to_string(),
            target_location_id: target.to_string(),
            expected_mod_revision: options.expected_mod_revision.map(|revision| revision.0),
            context: Some(self.context(&options)),
        };
        let response = self
            .call(message, |channel, request| async move {
                registry_client(channel).begin_move(request).await
            })
            .await?;
        self.note_revision(Revision(response.revision));
        Ok(Moved {
            placement: placement_of(response.placement)?,
            revision: Revision(response.revision),
        })
    }

    fn move_step(&self, user_id: &UserId, options: Option<WriteOptions>) -> pb::MoveStepRequest {
        let options = options.unwrap_or_default();
        pb::MoveStepRequest {
            user_id: user_id.to_string(),
            expected_mod_revision: options.expected_mod_revision.map(|revision| revision.0),
            context: Some(self.context(&options)),
        }
    }

    pub async fn complete_move(
        &self,
        user_id: &UserId,
        options: Option<WriteOptions>,
    ) -> Result<Moved, ClientError> {
        let message = self.move_step(user_id, options);
        let response = self
            .call(message, |channel, request| async move {
                registry_client(channel).complete_move(request).await
            })
            .await?;
        self.note_revision(Revision(response.revision));
        Ok(Moved {
            placement: placement_of(response.placement)?,
            revision: Revision(response.revision),
        })
    }

    pub async fn abort_move(
        &self,
        user_id: &UserId,
        options: Option<WriteOptions>,
    ) -> Result<Moved, ClientError> {
        let message = self.move_step(user_id, options);
        let response = self
            .call(message, |channel, request| async move {
                registry_client(channel).abort_move(request).await
            })
            .await?;
        self.note_revision(Revision(response.revision));
        Ok(Moved {
            placement: placement_of(response.placement)?,
            revision: Revision(response.revision),
        })
    }

    /// May `service` in `jurisdiction` perform `operation` on the user's data? An error is not
    /// an answer: callers must treat it as a deny.
    pub async fn check_access(
        &self,
        user_id: &UserId,
        service: &str,
        jurisdiction: Jurisdiction,
        operation: AccessOperation,
        consistency: Consistency,
    ) -> Result<Checked, ClientError> {
        let message = pb::CheckAccessRequest {
            user_id: user_id.to_string(),
            accessor: Some(pb::Accessor {
                service: service.to_string(),
                jurisdiction: jurisdiction.to_string(),
            }),
            operation: access_operation_to_pb(operation) as i32,
            consistency: Some(consistency_to_pb(consistency)),
        };
        let response = self
            .call_routed(Route::for_read(consistency), message, |channel, request| async move {
                registry_client(channel).check_access(request).await
            })
            .await?;
        let revision = Revision(response.header.as_ref().map_or(0, |header| header.revision));
        self.note_revision(revision);
        Ok(Checked {
            decision: decision_from_pb(&response),
            revision,
        })
    }
}
