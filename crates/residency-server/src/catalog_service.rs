//! `residency.v1.Catalog`: storage locations and residency policies. Writes go through the log
//! like placements; reads take the same consistency modes as lookups.

use std::sync::Arc;

use residency_proto::convert::{
    consistency_from_pb, jurisdictions_from_pb, labels_from_pb, location_state_from_pb,
};
use residency_proto::pb::catalog_server::Catalog;
use residency_proto::pb::{
    DryRunPolicyRequest, DryRunPolicyResponse, GetLocationRequest, GetPolicyRequest,
    ListLocationsRequest, ListLocationsResponse, ListPoliciesRequest, ListPoliciesResponse,
    LocationResponse, PolicyResponse, PutLocationRequest, PutPolicyRequest,
    SetLocationStateRequest,
};
use residency_types::limits::CATALOG_PAGE_MAX;
use residency_types::{Jurisdiction, LocationId, Outcome, ReasonCode, Revision, WriteBody};
use tonic::{Request, Response, Status};

use crate::auth::{audit_note, caller_of};
use crate::error::ApiError;
use crate::grpc::{observe, wait_budget};
use crate::node::Node;
use crate::registry_service::{read_header, timeout_of, unexpected, write};

#[derive(Debug, Clone)]
pub struct CatalogService {
    node: Arc<Node>,
}

impl CatalogService {
    pub fn new(node: Arc<Node>) -> CatalogService {
        CatalogService { node }
    }
}

fn location_written(
    (outcome, revision): (Outcome, Revision),
) -> Result<LocationResponse, ApiError> {
    match outcome {
        Outcome::LocationWritten { location, created } => Ok(LocationResponse {
            location: Some((&location).into()),
            created,
            revision: revision.0,
        }),
        other => Err(unexpected(other)),
    }
}

#[tonic::async_trait]
impl Catalog for CatalogService {
    async fn put_location(
        &self,
        request: Request<PutLocationRequest>,
    ) -> Result<Response<LocationResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let note = audit_note(&request);
        note.subject(request.get_ref().location_id.clone());
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("PutLocation", timeout, async {
            let body = WriteBody::PutLocation {
                location_id: LocationId::parse(request.location_id)?,
                jurisdiction: Jurisdiction::parse(&request.jurisdiction)?,
                labels: labels_from_pb(request.labels)?,
            };
            let (outcome, revision) = write(&self.node, &caller, request.context, body).await?;
            note.revision(revision.0);
            location_written((outcome, revision))
        })
        .await
    }

    async fn get_location(
        &self,
        request: Request<GetLocationRequest>,
    ) -> Result<Response<LocationResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let request = request.into_inner();
        observe("GetLocation", timeout, async {
            let location_id = LocationId::parse(request.location_id)?;
            let consistency = consistency_from_pb(request.consistency)?;
            self.node
                .read_barrier(consistency, wait_budget(timeout))
                .await?;
            let (location, revision) = self
                .node
                .reader
                .query(|view| Ok(residency_core::query::location(view, &location_id)?))
                .await
                .map_err(ApiError::internal)?;
            let location = location.ok_or_else(|| ApiError::LocationNotFound {
                location_id: location_id.to_string(),
                revision,
            })?;
            Ok(LocationResponse {
                location: Some((&location).into()),
                created: false,
                revision: revision.0,
            })
        })
        .await
    }

    async fn list_locations(
        &self,
        request: Request<ListLocationsRequest>,
    ) -> Result<Response<ListLocationsResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let request = request.into_inner();
        observe("ListLocations", timeout, async {
            let after = match request.after.as_str() {
                "" => None,
                after => Some(LocationId::parse(after)?),
            };
            let limit = match request.limit as usize {
                0 => CATALOG_PAGE_MAX,
                limit => limit.min(CATALOG_PAGE_MAX),
            };
            let consistency = consistency_from_pb(request.consistency)?;
            let barrier = self
                .node
                .read_barrier(consistency, wait_budget(timeout))
                .await?;
            let (locations, revision) = self
                .node
                .reader
                .query(|view| Ok(residency_core::list_locations(view, after.as_ref(), limit)?))
                .await
                .map_err(ApiError::internal)?;
            let next_after = match locations.last() {
                Some(last) if locations.len() == limit => last.id.to_string(),
                _ => String::new(),
            };
            Ok(ListLocationsResponse {
                header: Some(read_header(&self.node, barrier, revision)),
                locations: locations.iter().map(Into::into).collect(),
                next_after,
            })
        })
        .await
    }

    async fn set_location_state(
        &self,
        request: Request<SetLocationStateRequest>,
    ) -> Result<Response<LocationResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let note = audit_note(&request);
        note.subject(request.get_ref().location_id.clone());
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("SetLocationState", timeout, async {
            let body = WriteBody::SetLocationState {
                location_id: LocationId::parse(request.location_id)?,
                state: location_state_from_pb(request.state)?,
            };
            let (outcome, revision) = write(&self.node, &caller, request.context, body).await?;
            note.revision(revision.0);
            location_written((outcome, revision))
        })
        .await
    }

    async fn put_policy(
        &self,
        request: Request<PutPolicyRequest>,
    ) -> Result<Response<PolicyResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let note = audit_note(&request);
        note.subject(request.get_ref().residency.clone());
        let caller = caller_of(&request);
        let request = request.into_inner();
        observe("PutPolicy", timeout, async {
            let body = WriteBody::PutPolicy {
                residency: Jurisdiction::parse(&request.residency)?,
                storage: jurisdictions_from_pb("storage", &request.storage)?,
                access: jurisdictions_from_pb("access", &request.access)?,
            };
            let written = write(&self.node, &caller, request.context, body).await?;
            note.revision(written.1.0);
            match written {
                (Outcome::PolicyWritten { policy, created }, revision) => Ok(PolicyResponse {
                    policy: Some((&policy).into()),
                    created,
                    revision: revision.0,
                }),
                (other, _) => Err(unexpected(other)),
            }
        })
        .await
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PolicyResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let request = request.into_inner();
        observe("GetPolicy", timeout, async {
            let residency = Jurisdiction::parse(&request.residency)?;
            let consistency = consistency_from_pb(request.consistency)?;
            self.node
                .read_barrier(consistency, wait_budget(timeout))
                .await?;
            let (policy, revision) = self
                .node
                .reader
                .query(|view| Ok(residency_core::query::policy(view, residency)?))
                .await
                .map_err(ApiError::internal)?;
            let policy = policy.ok_or_else(|| ApiError::PolicyNotFound {
                residency: residency.to_string(),
                revision,
            })?;
            Ok(PolicyResponse {
                policy: Some((&policy).into()),
                created: false,
                revision: revision.0,
            })
        })
        .await
    }

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let request = request.into_inner();
        observe("ListPolicies", timeout, async {
            let consistency = consistency_from_pb(request.consistency)?;
            let barrier = self
                .node
                .read_barrier(consistency, wait_budget(timeout))
                .await?;
            // One policy per assigned ISO code at most: 249, below the page limit.
            let (policies, revision) = self
                .node
                .reader
                .query(|view| Ok(residency_core::list_policies(view, CATALOG_PAGE_MAX)?))
                .await
                .map_err(ApiError::internal)?;
            Ok(ListPoliciesResponse {
                header: Some(read_header(&self.node, barrier, revision)),
                policies: policies.iter().map(Into::into).collect(),
            })
        })
        .await
    }

    async fn dry_run_policy(
        &self,
        request: Request<DryRunPolicyRequest>,
    ) -> Result<Response<DryRunPolicyResponse>, Status> {
        let timeout = timeout_of(&self.node, &request);
        let request = request.into_inner();
        observe("DryRunPolicy", timeout, async {
            let residency = Jurisdiction::parse(&request.residency)?;
            let storage = jurisdictions_from_pb("storage", &request.storage)?;
            let consistency = consistency_from_pb(request.consistency)?;
            let barrier = self.node.read_barrier(consistency, wait_budget(timeout)).await?;
            let (dry_run, revision) = self
                .node
                .reader
                .query(|view| Ok(residency_core::dry_run_policy(view, residency, &storage)?))
                .await
                .map_err(ApiError::internal)?;
            if dry_run.placements_in_breach > 0 {
                tracing::debug!(code = %ReasonCode::PolicyBreach, "a policy dry run found placements in breach");
            }
            Ok(DryRunPolicyResponse {
                header: Some(read_header(&self.node, barrier, revision)),
                placements_in_breach: dry_run.placements_in_breach,
                jurisdictions: dry_run.jurisdictions.iter().map(ToString::to_string).collect(),
                sample_user_ids: dry_run.sample.iter().map(ToString::to_string).collect(),
                sample_truncated: dry_run.sample_truncated,
            })
        })
        .await
    }
}
