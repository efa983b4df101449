//! `residency.v1.Registry`: lookups, writes, moves and the access check. Input is validated
//! here, before anything is proposed; a refusal changes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use residency_proto::convert::{
    access_operation_from_pb, assign_item_from_pb, consistency_from_pb, consistency_mode,
    decision_to_pb, write_context_from_pb,
};
use residency_proto::pb;
use residency_proto::pb::registry_server::Registry;
use residency_proto::pb::{
    AssignRequest, AssignResponse, AssignedItem, BatchAssignRequest, BatchAssignResponse,
    BatchLookupEntry, BatchLookupRequest, BatchLookupResponse, BeginMoveRequest,
    CheckAccessRequest, CheckAccessResponse, ForgetRequest, ForgetResponse, LookupRequest,
    LookupResponse, MoveResponse, MoveStepRequest, ReadHeader,
};
use residency_types::limits::{BATCH_ASSIGN_ITEMS_MAX, BATCH_LOOKUP_IDS_MAX};
use residency_types::{
    AssignItem, CallerId, Decision, Jurisdiction, LocationId, Outcome, ReasonCode, Revision,
    UserId, ValidationError, WriteBody,
};
use tonic::{Request, Response, Status};

use crate::auth::{Caller, caller_of};
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
}

/// The deadline of a request: the client's, capped by the node's limit.
pub fn timeout_of<T>(node: &Node, request: &Request<T>) -> Duration {
    request_timeout(
        request.metadata(),
        Duration::from_millis(node.config.limits.request_timeout_ms_max),
    )
}

/// What every read answer says about the state it came from.
pub fn read_header(node: &Node, barrier: ReadBarrier, revision: Revision) -> ReadHeader {
    ReadHeader {
        revision: revision.0,
        served_by: node.id(),
        consistency: consistency_mode(barrier.consistency) as i32,
        millis_since_leader_contact: barrier.millis_since_leader_contact,
    }
}

pub fn unexpected(outcome: Outcome) -> ApiError {
    ApiError::internal(format!(
        "the write produced an unexpected outcome: {outcome:?}"
    ))
}

/// Validates the write's context, sends the write to the leader, and splits its answer: the
/// outcome and revision, or the rule that refused it.
pub async fn write(
    node: &Node,
    caller: &Caller,
    context: Option<pb::WriteContext>,
    body: WriteBody,
) -> Result<(Outcome, Revision), ApiError> {
    let mut context = write_context_from_pb(context)?;
    // With TLS, the identity recorded is the certificate's, whatever the request states.
    let authenticated = match &caller.identity {
        Some(identity) => {
            context.caller = identity.caller_id();
            true
        }
        None => false,
    };
    let result = node.write(context, authenticated, body).await?;
    match result.outcome {
        Some(Outcome::Rejected(rejection)) => Err(ApiError::Rejected(rejection)),
        Some(outcome) => Ok((outcome, result.revision)),
        None => Err(ApiError::internal("a write was applied without an outcome")),
    }
}

fn moved((outcome, revision): (Outcome, Revision)) -> Result<MoveResponse, ApiError> {
    match outcome {
        Outcome::Moved { placement } => Ok(MoveResponse {
            placement: Some((&placement).into()),
            revision: revision.0,
        }),
        other => Err(unexpected(other)),
    }
}

fn expected(revision: Option<u64>) -> Option<Revision> {
    revision.map(Revision)
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
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
                header: Some(read_header(&self.node, barrier, revision)),
                placement: Some((&placement).into()),
            })
        })
        .await
    }

    async fn batch_lookup(
        &self,
        request: Request<BatchLookupRequest>,
    ) -> Result<Response<BatchLookupResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
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
                header: Some(read_header(&self.node, barrier, revision)),
                entries,
            })
        })
        .await
    }

    async fn assign(
        &self,
        request: Request<AssignRequest>,
    ) -> Result<Response<AssignResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("Assign", timeout, async {
            let body = WriteBody::Assign(AssignItem {
                user_id: UserId::parse(request.user_id)?,
                residency: Jurisdiction::parse(&request.residency)?,
                location_id: LocationId::parse(request.location_id)?,
                expected_mod_revision: expected(request.expected_mod_revision),
            });
            match write(&self.node, &caller, request.context, body).await? {
                (Outcome::Assigned { placement, created }, revision) => Ok(AssignResponse {
                    placement: Some((&placement).into()),
                    created,
                    revision: revision.0,
                }),
                (other, _) => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn forget(
        &self,
        request: Request<ForgetRequest>,
    ) -> Result<Response<ForgetResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("Forget", timeout, async {
            let body = WriteBody::Forget {
                user_id: UserId::parse(request.user_id)?,
                expected_mod_revision: expected(request.expected_mod_revision),
            };
            match write(&self.node, &caller, request.context, body).await? {
                (Outcome::Forgotten { .. }, revision) => Ok(ForgetResponse {
                    revision: revision.0,
                }),
                (other, _) => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn batch_assign(
        &self,
        request: Request<BatchAssignRequest>,
    ) -> Result<Response<BatchAssignResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("BatchAssign", timeout, async {
            let count = request.items.len();
            if count == 0 {
                return Err(ApiError::invalid(
                    ReasonCode::InvalidArgument,
                    "items",
                    "has no item",
                ));
            }
            if count > BATCH_ASSIGN_ITEMS_MAX {
                return Err(ApiError::invalid(
                    ReasonCode::BatchTooLarge,
                    "items",
                    format!("has {count} items; a batch holds 1 to {BATCH_ASSIGN_ITEMS_MAX}"),
                ));
            }
            let items = request
                .items
                .into_iter()
                .map(assign_item_from_pb)
                .collect::<Result<Vec<_>, _>>()?;
            let mut seen = BTreeSet::new();
            if let Some(index) = items
                .iter()
                .position(|item| !seen.insert(item.user_id.clone()))
            {
                return Err(ApiError::invalid(
                    ReasonCode::DuplicateUserInBatch,
                    "items",
                    format!("item {index} names a user an earlier item already names"),
                ));
            }
            match write(
                &self.node,
                &caller,
                request.context,
                WriteBody::BatchAssign { items },
            )
            .await?
            {
                (Outcome::BatchAssigned { items }, revision) => Ok(BatchAssignResponse {
                    items: items
                        .iter()
                        .map(|item| AssignedItem {
                            placement: Some((&item.placement).into()),
                            created: item.created,
                        })
                        .collect(),
                    revision: revision.0,
                }),
                (other, _) => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn begin_move(
        &self,
        request: Request<BeginMoveRequest>,
    ) -> Result<Response<MoveResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("BeginMove", timeout, async {
            let body = WriteBody::BeginMove {
                user_id: UserId::parse(request.user_id)?,
                target: LocationId::parse(request.target_location_id)?,
                expected_mod_revision: expected(request.expected_mod_revision),
            };
            moved(write(&self.node, &caller, request.context, body).await?)
        })
        .await
    }

    async fn complete_move(
        &self,
        request: Request<MoveStepRequest>,
    ) -> Result<Response<MoveResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("CompleteMove", timeout, async {
            let body = WriteBody::CompleteMove {
                user_id: UserId::parse(request.user_id)?,
                expected_mod_revision: expected(request.expected_mod_revision),
            };
            moved(write(&self.node, &caller, request.context, body).await?)
        })
        .await
    }

    async fn abort_move(
        &self,
        request: Request<MoveStepRequest>,
    ) -> Result<Response<MoveResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("AbortMove", timeout, async {
            let body = WriteBody::AbortMove {
                user_id: UserId::parse(request.user_id)?,
                expected_mod_revision: expected(request.expected_mod_revision),
            };
            moved(write(&self.node, &caller, request.context, body).await?)
        })
        .await
    }

    async fn check_access(
        &self,
        request: Request<CheckAccessRequest>,
    ) -> Result<Response<CheckAccessResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("CheckAccess", timeout, async {
            let user_id = UserId::parse(request.user_id)?;
            let accessor = request.accessor.ok_or_else(|| {
                ApiError::invalid(
                    ReasonCode::InvalidAccessor,
                    "accessor",
                    "a check names the accessor's service and jurisdiction",
                )
            })?;
            let invalid_accessor = |field: &'static str| {
                move |error: ValidationError| {
                    ApiError::invalid(ReasonCode::InvalidAccessor, field, error.message)
                }
            };
            let service = CallerId::parse(accessor.service)
                .map_err(invalid_accessor("accessor.service"))?;
            let accessor_jurisdiction = Jurisdiction::parse(&accessor.jurisdiction)
                .map_err(invalid_accessor("accessor.jurisdiction"))?;
            let operation = access_operation_from_pb(request.operation)?;
            let consistency = consistency_from_pb(request.consistency)?;
            let barrier = self
                .node
                .read_barrier(consistency, wait_budget(timeout))
                .await?;
            let (decision, revision) = self
                .node
                .reader
                .query(|view| {
                    Ok(residency_core::check_access(
                        view,
                        &user_id,
                        accessor_jurisdiction,
                        operation,
                    )?)
                })
                .await
                .map_err(ApiError::internal)?;
            let outcome = match &decision {
                Decision::Allow { .. } => "ALLOW",
                Decision::Deny { reason } => reason.as_str(),
            };
            metrics::counter!("residency_access_checks_total", "decision" => outcome).increment(1);
            if let Decision::Deny { reason } = &decision {
                // The audit file is where a denied check's user id goes, never the logs.
                let audit = &self.node.audit;
                audit.queue(audit.entry(
                    "/residency.v1.Registry/CheckAccess",
                    caller.name(),
                    &caller.remote,
                    format!(
                        "user {user_id} accessor {service} in {accessor_jurisdiction} operation {operation:?}"
                    ),
                    &format!("DENY:{}", reason.as_str()),
                    revision.0,
                ));
            }
            let mut response = decision_to_pb(&decision);
            response.header = Some(read_header(&self.node, barrier, revision));
            Ok(response)
        })
        .await
    }

    async fn current_revision(
        &self,
        request: Request<pb::CurrentRevisionRequest>,
    ) -> Result<Response<pb::CurrentRevisionResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let request = request.into_inner();
        observe("CurrentRevision", timeout, async {
            let consistency = consistency_from_pb(request.consistency)?;
            let barrier = self
                .node
                .read_barrier(consistency, wait_budget(timeout))
                .await?;
            let revision = self.node.reader.applied_revision();
            Ok(pb::CurrentRevisionResponse {
                header: Some(read_header(&self.node, barrier, revision)),
            })
        })
        .await
    }

    type ExportPlacementsStream = crate::backup::ExportStream;

    async fn export_placements(
        &self,
        _request: Request<pb::ExportPlacementsRequest>,
    ) -> Result<Response<Self::ExportPlacementsStream>, Status> {
        let stream = self.node.export_placements().await.map_err(Status::from)?;
        Ok(Response::new(stream))
    }
}
