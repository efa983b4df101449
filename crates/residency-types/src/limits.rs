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
/// A location label (provider, region, zone) is at most this many bytes.
pub const LABEL_BYTES_MAX: usize = 64;
/// The largest command the leader proposes, encoded. Every value kept in sled stays well below
/// its 128 KiB blob threshold (blobs are never synced: see docs/storage.md), and a bounded
/// number of entries fits one replication message.
pub const COMMAND_BYTES_MAX: usize = 64 * 1024;
/// The largest request record kept for deduplication, encoded; a larger one (only a refused
/// batch naming many long ids) is not kept, and a retry of it is decided afresh, which is safe
/// because a refused write applied nothing.
pub const REQUEST_RECORD_BYTES_MAX: usize = 100 * 1024;
/// How many placements one `BatchAssign` may carry; all apply or none do.
pub const BATCH_ASSIGN_ITEMS_MAX: usize = 500;
/// How many placements a policy dry run lists by id (it counts all of them).
pub const POLICY_DRY_RUN_SAMPLE_MAX: usize = 20;
/// How many locations or policies one list call returns at most.
pub const CATALOG_PAGE_MAX: usize = 1_000;
/// How many revisions of change history watchers can resume from, at most. Older events are
/// dropped as new revisions are applied; a watch asking for one gets the compaction revision and
/// re-lists.
pub const WATCH_HISTORY_REVISIONS: u64 = 100_000;
/// How many events the change history holds, at most: whole entries' events are dropped from
/// the oldest on while it holds more. One entry may carry many writes, so a bound in revisions
/// alone would not bound the history's size. At 10,000 writes/s this is the last 100 s.
pub const WATCH_HISTORY_EVENTS_MAX: u64 = 1_000_000;
/// How many bytes of encoded events the change history holds, at most, the same way.
pub const WATCH_HISTORY_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// How many user ids one `BatchLookup` may name.
pub const BATCH_LOOKUP_IDS_MAX: usize = 1_000;
/// How many request ids are remembered: the newest this many. A retry that arrives after this
/// many newer writes is treated as a new write: at 10,000 writes/s that is 100 s, far longer
/// than a client retries within one deadline. Counted in writes, not revisions, because one
/// revision (one log entry) may carry many writes. Each remembered id costs a few hundred bytes
/// of state, so the window also bounds that cost.
pub const REQUEST_DEDUP_WINDOW_REQUESTS: u64 = 1_000_000;
