//! Response metadata keys shared by server and clients, and helpers to read them back.

use residency_types::ReasonCode;

/// The stable reason code of an error (`REVISION_MISMATCH`, `NOT_LEADER`, ...).
pub const REASON_KEY: &str = "residency-reason";
/// The leader's node id, when the answering node knows it.
pub const LEADER_ID_KEY: &str = "residency-leader-id";
/// The leader's client address (`host:port`), to redirect to.
pub const LEADER_ADDR_KEY: &str = "residency-leader-addr";
/// The revision an error answer was read at (e.g. with USER_NOT_FOUND on Lookup).
pub const REVISION_KEY: &str = "residency-revision";

fn text<'a>(status: &'a tonic::Status, key: &str) -> Option<&'a str> {
    status
        .metadata()
        .get(key)
        .and_then(|value| value.to_str().ok())
}

/// The reason code of a status from our servers, if it carries one we know.
pub fn reason(status: &tonic::Status) -> Option<ReasonCode> {
    text(status, REASON_KEY).and_then(ReasonCode::parse)
}

/// The leader hint of a status: its node id and client address, when given.
pub fn leader_hint(status: &tonic::Status) -> (Option<u64>, Option<String>) {
    let id = text(status, LEADER_ID_KEY).and_then(|id| id.parse().ok());
    let addr = text(status, LEADER_ADDR_KEY).map(str::to_string);
    (id, addr)
}

pub fn revision(status: &tonic::Status) -> Option<u64> {
    text(status, REVISION_KEY).and_then(|revision| revision.parse().ok())
}
