//! What every client RPC shares: its deadline and its metrics.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::{Response, Status};
use tracing::Instrument;

use crate::error::ApiError;

/// The deadline a client set with `grpc-timeout`, capped at `max`; `max` if it set none.
pub fn request_timeout(metadata: &MetadataMap, max: Duration) -> Duration {
    let asked = metadata
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout);
    asked.map_or(max, |asked| asked.min(max))
}

/// Parses the gRPC wire form of a timeout: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3_600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The part of a deadline a read barrier may spend waiting, so that its own clear error
/// ("revision not reached") reaches the client before the deadline does.
pub fn wait_budget(timeout: Duration) -> Duration {
    timeout.mul_f64(0.9)
}

/// Runs one RPC within its deadline and records its outcome. Metric labels are the method and
/// the reason code only: never a user id or a location.
pub async fn observe<T>(
    method: &'static str,
    timeout: Duration,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    // Every log line of the request carries its method (never a user id or location).
    let span = tracing::info_span!("rpc", method);
    let result = match tokio::time::timeout(timeout, work).instrument(span).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::DeadlineExceeded(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        )),
    };
    let outcome = match &result {
        Ok(_) => "OK",
        Err(error) => error.reason_code().as_str(),
    };
    metrics::counter!("residency_rpc_requests_total", "method" => method, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("residency_rpc_duration_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
    if let Err(error) = &result {
        tracing::debug!(method, %error, "request failed");
    }
    result.map(Response::new).map_err(Status::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_are_capped() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "1H".parse().expect("ascii"));
        assert_eq!(
            request_timeout(&metadata, Duration::from_secs(10)),
            Duration::from_secs(10)
        );
        assert_eq!(
            request_timeout(&MetadataMap::new(), Duration::from_secs(3)),
            Duration::from_secs(3)
        );
    }
}
