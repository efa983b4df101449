//! Every size limit of the domain, in one place, with the unit last in the name.

/// A user id is 1..=128 bytes of `[A-Za-z0-9._:@-]`.
pub const USER_ID_BYTES_MAX: usize = 128;
/// A location id is 1..=256 bytes of `[A-Za-z0-9._:/-]`, e.g. `us-east-1/oci-ashburn/pg-042`.
pub const LOCATION_ID_BYTES_MAX: usize = 256;
/// A request id (idempotency key) is 1..=128 bytes of `[A-Za-z0-9._:@-]`.
pub const REQUEST_ID_BYTES_MAX: usize = 128;
/// A caller identity is 1..=256 bytes of printable ASCII without spaces.
pub const CALLER_ID_BYTES_MAX: usize = 256;
/// A free-text reason attached to a write: at most 512 bytes of UTF-8, no control characters.
pub const REASON_TEXT_BYTES_MAX: usize = 512;
/// How many user ids one `BatchLookup` may name.
pub const BATCH_LOOKUP_IDS_MAX: usize = 1_000;
/// How many revisions a request id is remembered for after its write was applied. A retry
/// arriving later than this is treated as a new write: at 1,000 writes/s that is about 17
/// minutes, far longer than any client retries. Each remembered id costs a few hundred bytes
/// of state, so the window also bounds that cost (about 0.5 GB on disk at most).
pub const REQUEST_DEDUP_WINDOW_REVISIONS: u64 = 1_000_000;
