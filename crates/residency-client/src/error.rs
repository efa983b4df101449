//! What a call can fail with, decoded from the server's status and reason code.

use residency_proto::metadata;
use residency_types::{ReasonCode, ValidationError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused or failed the call; `reason` is its stable reason code. Without one
    /// (the call never reached our server) the gRPC code stands in, e.g. `UNAVAILABLE`.
    #[error("{}: {message}", label(*reason, *code))]
    Status {
        code: tonic::Code,
        reason: Option<ReasonCode>,
        message: String,
        leader_addr: Option<String>,
        revision: Option<u64>,
        /// For BATCH_REFUSED: each refused item's index, reason code and message.
        refused_items: Vec<(u32, String, String)>,
    },
    /// No endpoint could be reached, or the deadline passed during retries.
    #[error(
        "DEADLINE_EXCEEDED: no answer before the deadline; a write may or may not have been applied"
    )]
    Deadline,
    #[error("the server answered something this client cannot read: {0}")]
    Protocol(String),
    #[error("invalid data from the server: {0}")]
    Invalid(#[from] ValidationError),
    #[error("client configuration: {0}")]
    Config(String),
}

fn label(reason: Option<ReasonCode>, code: tonic::Code) -> String {
    match reason {
        Some(reason) => reason.to_string(),
        None => grpc_code_name(code).to_string(),
    }
}

fn grpc_code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl ClientError {
    pub fn from_status(status: tonic::Status) -> ClientError {
        let (_, leader_addr) = metadata::leader_hint(&status);
        let refused_items =
            <residency_proto::pb::BatchRefusal as prost::Message>::decode(status.details())
                .map(|refusal| {
                    refusal
                        .items
                        .into_iter()
                        .map(|item| (item.index, item.reason, item.message))
                        .collect()
                })
                .unwrap_or_default();
        ClientError::Status {
            refused_items,
            code: status.code(),
            reason: metadata::reason(&status),
            message: status.message().to_string(),
            leader_addr,
            revision: metadata::revision(&status),
        }
    }

    /// The stable reason code, when the server gave one.
    pub fn reason(&self) -> Option<ReasonCode> {
        match self {
            ClientError::Status { reason, .. } => *reason,
            ClientError::Deadline => Some(ReasonCode::DeadlineExceeded),
            _ => None,
        }
    }

    /// Whether the call failed before reaching a node's service (no reason code, UNAVAILABLE):
    /// the endpoint is down or unreachable.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            ClientError::Status {
                code: tonic::Code::Unavailable,
                reason: None,
                ..
            }
        )
    }

    /// Whether sending the same call again (to this or another node) may succeed. Writes are
    /// safe to resend: they keep their request id.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { code, reason, .. } => {
                matches!(
                    code,
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                ) || matches!(
                    // Load shed: retried after a pause, within the call's deadline.
                    reason,
                    Some(ReasonCode::Overloaded | ReasonCode::RateLimited)
                )
            }
            ClientError::Deadline => true,
            _ => false,
        }
    }
}
