//! `residency.v1.Registry`: lookups and writes. Input is validated here, before anything is
//! proposed; a refusal changes nothing.

use std::sync::Arc;
use std::time::Duration;

use residency_proto::convert::{consistency_from_pb, consistency_mode, write_context_from_pb};
use residency_proto::pb::registry_server::Registry;
use residency_proto::pb::{
    AssignRequest, AssignResponse, BatchLookupEntry, BatchLookupRequest, BatchLookupResponse,
    ForgetRequest, ForgetResponse, LookupRequest, LookupResponse, ReadHeader,
};
use residency_types::limits::BATCH_LOOKUP_IDS_MAX;
use residency_types::{Jurisdiction, LocationId, Outcome, ReasonCode, Revision, UserId, WriteBody};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::grpc::{observe, request_timeout, wait_budget};
use crate::node::{Node, ReadBarrier};

#[derive(Debug, Clone)]
pub struct RegistryService {
    node: Arc<Node>,
}

impl RegistryService {
    pub fn new(node: Arc<Node>) -> RegistryService {
        RegistryService { node }
    }

    fn timeout<T>(&self, request: &Request<T>) -> Duration {
        request_timeout(
            request.metadata(),
            Duration::from_millis(self.node.config.limits.request_timeout_ms_max),
        )
    }

    fn header(&self, barrier: ReadBarrier, revision: Revision) -> ReadHeader {
        ReadHeader {
            revision: revision.0,
            served_by: self.node.id(),
            consistency: consistency_mode(barrier.consistency) as i32,
            millis_since_leader_contact: barrier.millis_since_leader_contact,
        }
    }
}

fn unexpected(outcome: Option<Outcome>) -> ApiError {
    ApiError::internal(format!(
        "the write produced an unexpected outcome: {outcome:?}"
    ))
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        let timeout = self.timeout(&request);
        let request = request.into_inner();
        observe("Lookup", timeout, async {
            let user_id = UserId::parse(request.user_id)?;
            let consistency = consistency_from_pb(request.consistency)?;
            let barrier = self
                .node
                .read_barrier(consistency, wait_budget(timeout))
                .await?;
            let (placement, revision) = self
                .node
                .reader
                .lookup(&user_id)
                .await
                .map_err(ApiError::internal)?;
            let placement = placement.ok_or(ApiError::UserNotFound { revision })?;
            Ok(LookupResponse {
                header: Some(self.header(barrier, revision)),
                placement: Some((&placement).into()),
            })
        })
        .await
    }

    async fn batch_lookup(
        &self,
        request: Request<BatchLookupRequest>,
    ) -> Result<Response<BatchLookupResponse>, Status> {
        let timeout = self.timeout(&request);
        let request = request.into_inner();
        observe("BatchLookup", timeout, async {
            let count = request.user_ids.len();
            if count == 0 {
                return Err(ApiError::invalid(
                    ReasonCode::InvalidArgument,
                    "user_ids",
                    "names no user id",
                ));
            }
            if count > BATCH_LOOKUP_IDS_MAX {
                return Err(ApiError::invalid(
                    ReasonCode::BatchTooLarge,
                    "user_ids",
                    format!("names {count} ids; a batch holds 1 to {BATCH_LOOKUP_IDS_MAX}"),
                ));
            }
            let user_ids = request
                .user_ids
                .into_iter()
                .map(UserId::parse)
                .collect::<Result<Vec<_>, _>>()?;
            let consistency = consistency_from_pb(request.consistency)?;
            let barrier = self
                .node
                .read_barrier(consistency, wait_budget(timeout))
                .await?;
            let (placements, revision) = self
                .node
                .reader
                .batch_lookup(&user_ids)
                .await
                .map_err(ApiError::internal)?;
            let entries = user_ids
                .iter()
                .zip(placements)
                .map(|(user_id, placement)| BatchLookupEntry {
                    user_id: user_id.to_string(),
                    placement: placement.as_ref().map(Into::into),
                })
                .collect();
            Ok(BatchLookupResponse {
                header: Some(self.header(barrier, revision)),
                entries,
            })
        })
        .await
    }

    async fn assign(
        &self,
        request: Request<AssignRequest>,
    ) -> Result<Response<AssignResponse>, Status> {
        let timeout = self.timeout(&request);
        let request = request.into_inner();
        observe("Assign", timeout, async {
            let body = WriteBody::Assign {
                user_id: UserId::parse(request.user_id)?,
                residency: Jurisdiction::parse(&request.residency)?,
                location_id: LocationId::parse(request.location_id)?,
                expected_mod_revision: request.expected_mod_revision.map(Revision),
            };
            let context = write_context_from_pb(request.context)?;
            let result = self.node.write(context, body).await?;
            match result.outcome {
                Some(Outcome::Assigned { placement, created }) => Ok(AssignResponse {
                    placement: Some((&placement).into()),
                    created,
                    revision: result.revision.0,
                }),
                Some(Outcome::Rejected(rejection)) => Err(ApiError::Rejected(rejection)),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn forget(
        &self,
        request: Request<ForgetRequest>,
    ) -> Result<Response<ForgetResponse>, Status> {
        let timeout = self.timeout(&request);
        let request = request.into_inner();
        observe("Forget", timeout, async {
            let body = WriteBody::Forget {
                user_id: UserId::parse(request.user_id)?,
                expected_mod_revision: request.expected_mod_revision.map(Revision),
            };
            let context = write_context_from_pb(request.context)?;
            let result = self.node.write(context, body).await?;
            match result.outcome {
                Some(Outcome::Forgotten { .. }) => Ok(ForgetResponse {
                    revision: result.revision.0,
                }),
                Some(Outcome::Rejected(rejection)) => Err(ApiError::Rejected(rejection)),
                other => Err(unexpected(other)),
            }
        })
        .await
    }
}
