//! Request decoding and validation, as a node does it before anything is proposed: the bytes of
//! a message decode (or fail to) with prost, then every field goes through the domain parsers.
//! Also the client's reading of a CheckAccess answer, which must fail closed. No input may
//! panic; an allow must come only from a well-formed allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use residency_proto::convert::{
    access_operation_from_pb, assign_item_from_pb, consistency_from_pb, decision_from_pb,
    jurisdictions_from_pb, labels_from_pb, location_state_from_pb, write_context_from_pb,
};
use residency_proto::pb;
use residency_types::{Decision, Jurisdiction, LocationId, UserId};

fn ids(user_id: &str, location_id: &str) {
    let _ = UserId::parse(user_id);
    let _ = LocationId::parse(location_id);
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 8 {
        0 => {
            if let Ok(request) = pb::AssignRequest::decode(bytes) {
                ids(&request.user_id, &request.location_id);
                let _ = Jurisdiction::parse(&request.residency);
                let _ = write_context_from_pb(request.context);
            }
        }
        1 => {
            if let Ok(request) = pb::BatchAssignRequest::decode(bytes) {
                for item in request.items {
                    let _ = assign_item_from_pb(item);
                }
                let _ = write_context_from_pb(request.context);
            }
        }
        2 => {
            if let Ok(request) = pb::CheckAccessRequest::decode(bytes) {
                let _ = UserId::parse(request.user_id);
                let _ = access_operation_from_pb(request.operation);
                let _ = consistency_from_pb(request.consistency);
                if let Some(accessor) = request.accessor {
                    let _ = Jurisdiction::parse(&accessor.jurisdiction);
                }
            }
        }
        3 => {
            if let Ok(request) = pb::PutPolicyRequest::decode(bytes) {
                let _ = Jurisdiction::parse(&request.residency);
                let _ = jurisdictions_from_pb("storage", &request.storage);
                let _ = jurisdictions_from_pb("access", &request.access);
            }
        }
        4 => {
            if let Ok(request) = pb::PutLocationRequest::decode(bytes) {
                let _ = LocationId::parse(request.location_id);
                let _ = labels_from_pb(request.labels);
            }
        }
        5 => {
            if let Ok(request) = pb::SetLocationStateRequest::decode(bytes) {
                let _ = location_state_from_pb(request.state);
            }
        }
        6 => {
            if let Ok(request) = pb::LookupRequest::decode(bytes) {
                let _ = UserId::parse(request.user_id);
                let _ = consistency_from_pb(request.consistency);
            }
        }
        _ => {
            // The client's side: whatever a server (or an attacker in between) answers, only a
            // well-formed allow is an allow.
            if let Ok(response) = pb::CheckAccessResponse::decode(bytes)
                && let Decision::Allow { .. } = decision_from_pb(&response)
            {
                assert!(
                    response.allowed,
                    "an allow from a response that does not allow"
                );
            }
        }
    }
});
