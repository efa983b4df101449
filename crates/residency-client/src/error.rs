//! What a call can fail with, decoded from the server's status and reason code.

use residency_proto::metadata;
use residency_types::{ReasonCode, ValidationError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused or failed the call; `reason` is its stable reason code.
    #[error("{}: {message}", reason.map_or("UNKNOWN".to_string(), |code| code.to_string()))]
    Status {
        code: tonic::Code,
        reason: Option<ReasonCode>,
        message: String,
        leader_addr: Option<String>,
        revision: Option<u64>,
    },
    /// No endpoint could be reached, or the deadline passed during retries.
    #[error("no answer before the deadline; a write may or may not have been applied")]
    Deadline,
    #[error("the server answered something this client cannot read: {0}")]
    Protocol(String),
    #[error("invalid data from the server: {0}")]
    Invalid(#[from] ValidationError),
    #[error("client configuration: {0}")]
    Config(String),
}

impl ClientError {
    pub fn from_status(status: tonic::Status) -> ClientError {
        let (_, leader_addr) = metadata::leader_hint(&status);
        ClientError::Status {
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

    /// Whether sending the same call again (to this or another node) may succeed. Writes are
    /// safe to resend: they keep their request id.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { code, .. } => {
                matches!(
                    code,
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                )
            }
            ClientError::Deadline => true,
            _ => false,
        }
    }
}
