//! The Raft log's entries on disk: append-only segment files, made durable by their own
//! group-commit thread (`write` then `fdatasync`), outside sled.
//!
//! Why not sled: every sled `flush()` hands its buffer to sled's IO thread pool, and the
//! profile of the write path (docs/performance.md) put 45% of the leader's CPU there, in futex
//! wake-ups. A plain file appends and syncs from one thread, with no hand-off.
//!
//! ```text
//! raft-log/segment-<first index, 20 digits>.log
//!   repeated: u32 BE length, u32 BE CRC32 of those 4 bytes, then that many bytes of a
//!             checksummed record (`record.rs`)
//! ```
//!
//! A segment holds consecutive entries from the index in its name. Appends go to the last
//! segment until it passes `SEGMENT_BYTES_MAX`, or until the next entry does not follow the
//! last one (after a purge of the whole log an install jumps ahead; openraft's storage tests
//! append with gaps), then a new one starts. The length has its own checksum so that a damaged
//! length is told apart from a record whose write was cut short.
//!
//! A segment is made `SEGMENT_BYTES_MAX` long when it is created (a sparse file: zeroes not yet
//! on disk), and appends write over its zeroes. A file whose size does not change needs only
//! its data written by `fdatasync`; one that grows with every append needs its inode written
//! too, a second device write before the sync returns (about a third of each sync's time on
//! this project's machines, docs/performance.md). So the data of a segment ends at the first
//! frame boundary followed only by zeroes, or at the end of the file.
//!
//! Purge deletes whole segments; a segment's entries at or below the purge point stay in the
//! file, unread. Truncate zeroes the file from the cut on. On open every record is read back
//! and checked: a record cut short at the end of the last segment is a write that never
//! completed (never acknowledged, since the sync comes after it) and is cut off; anything
//! else that does not read back is corruption, and the store refuses to open. In a
//! preallocated segment a write cut short does not end early, it leaves zeroes where its rest
//! should be: see `cut_short` for how that is told apart from damage.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::durable::{SyncWaiter, sync_directory};
use crate::record::{entry_log_id, seal_entry, unseal_entry};
use crate::{Entry, LogId, StoreError};

/// A segment takes no new entries once it is this large.
pub(crate) const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// The largest record a frame may announce. Commands are bounded far below this
/// (`limits::COMMAND_BYTES_MAX`); a larger length is damage, not an entry.
const RECORD_BYTES_MAX: u32 = 16 * 1024 * 1024;
const FRAME_HEADER_BYTES: u64 = 8;
/// The unit a write cut short leaves whole or not at all: a disk writes whole sectors, and a
/// process killed inside a write has copied whole pages of it (both multiples of this). Where
/// a write stopped, the frame holds a piece of this size, at a multiple of it in the file,
/// that is still all zeroes.
const TORN_WRITE_UNIT_BYTES: usize = 512;
const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".log";
/// Appends queued to the log's sync thread, at most this many before senders wait.
const SYNC_QUEUE_DEPTH_MAX: usize = 4_096;
/// The newest entries are also kept in memory, up to this many bytes of their records: the
/// leader sends them to the followers and hands them to its state machine right after
/// appending them, and reading them back from the file (a read, a checksum and a decode each
/// time, per follower) cost more than keeping them.
const RECENT_ENTRIES_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Frames bound for one segment, from byte `base` on.
#[derive(Default)]
struct Run {
    segment: Option<u64>,
    base: u64,
    frames: Vec<u8>,
}

/// Where one entry's record lies.
#[derive(Debug, Clone, Copy)]
struct Slot {
    segment: u64,
    offset: u64,
    length: u32,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    bytes: u64,
}

struct Inner {
    /// By the index of their first entry.
    segments: BTreeMap<u64, Segment>,
    /// The index the log continues from when it holds no entry (after a purge of everything).
    floor: u64,
    slots: BTreeMap<u64, Slot>,
    /// The newest entries, decoded, and the bytes of their records (see
    /// `RECENT_ENTRIES_BYTES_MAX`): always a suffix of `slots`.
    recent: BTreeMap<u64, (Entry, usize)>,
    recent_bytes: usize,
    last_log_id: Option<LogId>,
    /// The id of the last entry known durable: the entry just below `LogFiles::synced_next`.
    durable_last: Option<LogId>,
    /// Files written since the sync thread last took them, and whether a segment was created
    /// (a directory entry to sync).
    unsynced: Vec<Arc<File>>,
    directory_unsynced: bool,
    /// Bumped by every truncate: a sync that started before one must not report entries past
    /// the cut as durable.
    generation: u64,
}

impl Inner {
    fn next_index(&self) -> u64 {
        self.slots
            .last_key_value()
            .map_or(self.floor, |(index, _)| index + 1)
    }

    fn remember(&mut self, entry: Entry, record_bytes: usize) {
        let index = entry.log_id.index;
        if let Some((_, replaced)) = self.recent.insert(index, (entry, record_bytes)) {
            self.recent_bytes -= replaced;
        }
        self.recent_bytes += record_bytes;
        while self.recent_bytes > RECENT_ENTRIES_BYTES_MAX {
            let Some((_, (_, bytes))) = self.recent.pop_first() else {
                break;
            };
            self.recent_bytes -= bytes;
        }
    }

    /// Keeps only the remembered entries that `keep` says the log still holds.
    fn forget_recent(&mut self, keep: impl Fn(u64) -> bool) {
        self.recent.retain(|index, _| keep(*index));
        self.recent_bytes = self.recent.values().map(|(_, bytes)| bytes).sum();
    }

    fn mark_unsynced(&mut self, file: &Arc<File>) {
        if !self.unsynced.iter().any(|seen| Arc::ptr_eq(seen, file)) {
            self.unsynced.push(file.clone());
        }
    }
}

pub(crate) struct LogFiles {
    dir: PathBuf,
    /// `SEGMENT_BYTES_MAX`, smaller in tests.
    segment_bytes_max: u64,
    inner: Mutex<Inner>,
    /// One more than the last index known durable (0: none).
    synced_next: tokio::sync::watch::Sender<u64>,
    sync_requests: Mutex<Option<mpsc::SyncSender<SyncWaiter>>>,
    sync_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for LogFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogFiles")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{first_index:020}{SEGMENT_SUFFIX}"))
}

fn segment_index(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?
        .parse()
        .ok()
}

fn frame_header(length: u32) -> [u8; FRAME_HEADER_BYTES as usize] {
    let length = length.to_be_bytes();
    let mut header = [0_u8; FRAME_HEADER_BYTES as usize];
    header[..4].copy_from_slice(&length);
    header[4..].copy_from_slice(&crc32fast::hash(&length).to_be_bytes());
    header
}

/// What reading a segment found at its end.
enum Tail {
    /// The data ends at this offset: the file ends there, or only zeroes follow (the
    /// preallocated space no append has reached).
    End(u64),
    /// A frame whose write was cut short starts at this offset.
    Torn(u64),
}

/// Whether a frame that does not check out, `bytes[start..end]`, is a write cut short rather
/// than damage: nothing after it was ever written (all zeroes to the end of the file), and
/// some piece of it, `TORN_WRITE_UNIT_BYTES` long and at a multiple of that in the file
/// (clipped to the frame), is all zeroes, as the unwritten rest of a write reads in a
/// preallocated segment. A damaged byte in the last frame leaves no such piece, and stops the
/// log from opening as any other damage does.
fn cut_short(bytes: &[u8], start: usize, end: usize) -> bool {
    let end = end.min(bytes.len());
    if bytes[end..].iter().any(|&byte| byte != 0) {
        return false;
    }
    let mut piece = start;
    while piece < end {
        let piece_end = ((piece / TORN_WRITE_UNIT_BYTES + 1) * TORN_WRITE_UNIT_BYTES).min(end);
        if bytes[piece..piece_end].iter().all(|&byte| byte == 0) {
            return true;
        }
        piece = piece_end;
    }
    false
}

/// Reads the records of one segment whose first entry is `first_index`; calls `found` with the
/// index, offset and record of each, or skips decoding those at or below `skip_through`.
fn read_segment(
    path: &Path,
    first_index: u64,
    skip_through: Option<u64>,
    found: impl FnMut(u64, u64, &[u8], bool) -> Result<(), StoreError>,
) -> Result<Tail, StoreError> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    scan_segment(&bytes, path, first_index, skip_through, found)
}

/// The frames of one segment's bytes (see `read_segment`).
fn scan_segment(
    bytes: &[u8],
    path: &Path,
    first_index: u64,
    skip_through: Option<u64>,
    mut found: impl FnMut(u64, u64, &[u8], bool) -> Result<(), StoreError>,
) -> Result<Tail, StoreError> {
    let mut offset = 0_u64;
    let mut index = first_index;
    while (offset as usize) < bytes.len() {
        let start = offset as usize;
        let rest = &bytes[start..];
        // The preallocated space no append has reached, or where the file grew first.
        if rest.iter().all(|&byte| byte == 0) {
            return Ok(Tail::End(offset));
        }
        // A write cut short by the end of the file leaves less than a header.
        if rest.len() < FRAME_HEADER_BYTES as usize {
            return Ok(Tail::Torn(offset));
        }
        let length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let checksum = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if checksum != crc32fast::hash(&rest[..4]) || length == 0 || length > RECORD_BYTES_MAX {
            if cut_short(bytes, start, start + FRAME_HEADER_BYTES as usize) {
                return Ok(Tail::Torn(offset));
            }
            return Err(StoreError::corrupt(format!(
                "log entry {index}: damaged record frame in {}",
                path.display()
            )));
        }
        let end = FRAME_HEADER_BYTES as usize + length as usize;
        if rest.len() < end {
            // The header is whole and sound: the record's write was cut short.
            return Ok(Tail::Torn(offset));
        }
        let record = &rest[FRAME_HEADER_BYTES as usize..end];
        // Checked here only for the last frame (`cut_short` looks for anything after it
        // first): `found` checks every record it decodes.
        if cut_short(bytes, start, start + end) && !crate::record::checksum_holds(record) {
            return Ok(Tail::Torn(offset));
        }
        let skipped = skip_through.is_some_and(|purged| index <= purged);
        found(index, offset + FRAME_HEADER_BYTES, record, skipped)?;
        offset += end as u64;
        index += 1;
    }
    Ok(Tail::End(offset))
}

/// Decodes a whole segment from its bytes as opening the log would: every frame checked, every
/// record unsealed as an entry. Returns the entries and whether the segment ends in a torn
/// record. For the fuzz targets (`tests/fuzz`): damaged bytes must give an error, not a panic.
pub fn decode_segment(bytes: &[u8]) -> Result<(Vec<Entry>, bool), StoreError> {
    let mut entries = Vec::new();
    let tail = scan_segment(bytes, Path::new("fuzzed"), 1, None, |_, _, record, _| {
        entries.push(unseal_entry(record, "log entry")?);
        Ok(())
    })?;
    Ok((entries, matches!(tail, Tail::Torn(_))))
}

impl LogFiles {
    /// Opens the log under `dir` (creating it), reads every record back and checks it. Entries
    /// at or below `last_purged` are not decoded; the first one after it must be
    /// `last_purged + 1`, and the rest follow without a gap. Entries at or below `committed`
    /// (decoded when they were appended, and again whenever they are read) have their
    /// checksum and log id checked, not their whole body decoded; the rest are decoded whole,
    /// so that a record that cannot be applied stops the node here rather than in an apply.
    pub(crate) fn open(
        dir: &Path,
        last_purged: Option<LogId>,
        committed: Option<LogId>,
    ) -> Result<Arc<LogFiles>, StoreError> {
        LogFiles::open_with(dir, last_purged, committed, SEGMENT_BYTES_MAX)
    }

    fn open_with(
        dir: &Path,
        last_purged: Option<LogId>,
        committed: Option<LogId>,
        segment_bytes_max: u64,
    ) -> Result<Arc<LogFiles>, StoreError> {
        let committed_through = committed.map(|log_id| log_id.index);
        std::fs::create_dir_all(dir)?;
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for item in std::fs::read_dir(dir)? {
            let path = item?.path();
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("");
            match segment_index(name) {
                Some(first_index) => found.push((first_index, path)),
                None => {
                    return Err(StoreError::corrupt(format!(
                        "unexpected file in the log directory: {}",
                        path.display()
                    )));
                }
            }
        }
        found.sort();
        let purged_through = last_purged.map(|log_id| log_id.index);
        let mut inner = Inner {
            segments: BTreeMap::new(),
            floor: purged_through.map_or(0, |index| index + 1),
            slots: BTreeMap::new(),
            recent: BTreeMap::new(),
            recent_bytes: 0,
            last_log_id: None,
            durable_last: None,
            unsynced: Vec::new(),
            directory_unsynced: false,
            generation: 0,
        };
        let count = found.len();
        for (position, (first_index, path)) in found.into_iter().enumerate() {
            let tail = read_segment(
                &path,
                first_index,
                purged_through,
                |index, offset, record, skipped| {
                    if skipped {
                        return Ok(());
                    }
                    let what = || format!("log entry {index}");
                    let log_id = if committed_through.is_some_and(|through| index <= through) {
                        entry_log_id(record, &what())?
                    } else {
                        unseal_entry(record, &what())?.log_id
                    };
                    if log_id.index != index {
                        return Err(StoreError::corrupt(format!(
                            "log entry at position {index} says it is {}",
                            log_id.index
                        )));
                    }
                    let expected = match purged_through {
                        None if inner.slots.is_empty() => index,
                        _ => inner.next_index(),
                    };
                    if index != expected {
                        return Err(StoreError::corrupt(format!(
                            "log gap: expected {expected}, found {index}"
                        )));
                    }
                    inner.slots.insert(
                        index,
                        Slot {
                            segment: first_index,
                            offset,
                            length: record.len() as u32,
                        },
                    );
                    inner.last_log_id = Some(log_id);
                    Ok(())
                },
            )?;
            let last = position + 1 == count;
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let bytes = match tail {
                Tail::End(offset) => offset,
                Tail::Torn(offset) => {
                    if !last {
                        return Err(StoreError::corrupt(format!(
                            "log segment {} is cut short before the segments after it",
                            path.display()
                        )));
                    }
                    tracing::warn!(
                        segment = %path.display(),
                        offset,
                        "cutting off a log record whose write never completed"
                    );
                    // Zeroes from the cut on: the torn bytes must not be read as a frame.
                    file.set_len(offset)?;
                    offset
                }
            };
            if last {
                // The segment appends go to (one written before segments were preallocated,
                // or just cut) is made full length.
                preallocate(&file, bytes, segment_bytes_max)?;
            }
            // What a crashed process wrote may still be only in the page cache: from here on
            // it counts as durable, so make it so (the size too, if it changed above).
            file.sync_all()?;
            inner.segments.insert(
                first_index,
                Segment {
                    file: Arc::new(file),
                    path,
                    bytes,
                },
            );
        }
        sync_directory(dir)?;
        let synced = inner.next_index();
        inner.durable_last = inner.last_log_id;
        let (sync_sender, pending) = mpsc::sync_channel(SYNC_QUEUE_DEPTH_MAX);
        let log = Arc::new(LogFiles {
            dir: dir.to_path_buf(),
            segment_bytes_max,
            inner: Mutex::new(inner),
            synced_next: tokio::sync::watch::Sender::new(synced),
            sync_requests: Mutex::new(Some(sync_sender)),
            sync_thread: Mutex::new(None),
        });
        let weak = Arc::downgrade(&log);
        let thread = std::thread::Builder::new()
            .name("residency-log-fsync".to_string())
            .spawn(move || run_log_sync(weak, pending))?;
        *log.sync_thread.lock().expect("sync thread lock poisoned") = Some(thread);
        Ok(log)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("log lock poisoned")
    }

    pub(crate) fn last_log_id(&self) -> Option<LogId> {
        self.lock().last_log_id
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().slots.is_empty()
    }

    /// The index the next appended entry follows on from (the floor after a full purge).
    pub(crate) fn next_index(&self) -> u64 {
        self.lock().next_index()
    }

    /// One more than the last index known durable, as it changes.
    pub(crate) fn durable_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.synced_next.subscribe()
    }

    /// One more than the last index known durable, and that entry's id.
    pub(crate) fn durable(&self) -> (u64, Option<LogId>) {
        let inner = self.lock();
        (*self.synced_next.borrow(), inner.durable_last)
    }

    /// Has the sync thread sync what is written so far, without waiting for it.
    pub(crate) fn sync_soon(&self) {
        self.after_sync(Box::new(|| {}));
    }

    /// Writes `entries` after the last one (not yet durable: see `after_sync`). Returns how
    /// many it wrote.
    pub(crate) fn append(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let mut appended = 0_u64;
        // Frames for one segment at a time, written with one call.
        let mut run = Run::default();
        for entry in entries {
            let index = entry.log_id.index;
            let follows = !inner.slots.is_empty() && index == inner.next_index();
            let active = inner
                .segments
                .last_key_value()
                .map(|(first, segment)| (*first, segment.bytes));
            let segment = match active {
                Some((first, bytes)) if follows && bytes < self.segment_bytes_max => first,
                _ => index,
            };
            if run.segment != Some(segment) {
                self.write_run(&mut inner, std::mem::take(&mut run))?;
                self.ensure_segment(&mut inner, segment)?;
                run.segment = Some(segment);
                run.base = inner.segments[&segment].bytes;
            }
            let record = seal_entry(&entry);
            let length = u32::try_from(record.len())
                .ok()
                .filter(|length| *length <= RECORD_BYTES_MAX)
                .expect("commands are bounded far below a log record's limit");
            run.frames.extend_from_slice(&frame_header(length));
            let offset = run.base + run.frames.len() as u64;
            run.frames.extend_from_slice(&record);
            inner.slots.insert(
                index,
                Slot {
                    segment,
                    offset,
                    length,
                },
            );
            inner.last_log_id = Some(entry.log_id);
            inner.remember(entry, record.len());
            // The segment's size moves with the run, so that the next entry sees it.
            inner
                .segments
                .get_mut(&segment)
                .expect("ensured above")
                .bytes = run.base + run.frames.len() as u64;
            appended += 1;
        }
        self.write_run(&mut inner, run)?;
        Ok(appended)
    }

    fn ensure_segment(&self, inner: &mut Inner, first: u64) -> Result<(), StoreError> {
        if inner.segments.contains_key(&first) {
            return Ok(());
        }
        let path = segment_path(&self.dir, first);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        preallocate(&file, 0, self.segment_bytes_max)?;
        inner.segments.insert(
            first,
            Segment {
                file: Arc::new(file),
                path,
                bytes: 0,
            },
        );
        inner.directory_unsynced = true;
        Ok(())
    }

    fn write_run(&self, inner: &mut Inner, run: Run) -> Result<(), StoreError> {
        let Some(segment) = run.segment else {
            return Ok(());
        };
        let file = inner.segments[&segment].file.clone();
        file.write_all_at(&run.frames, run.base)?;
        inner.mark_unsynced(&file);
        Ok(())
    }

    /// Calls `waiter` once everything appended before this call is on disk.
    pub(crate) fn after_sync(&self, waiter: SyncWaiter) {
        self.sync_requests
            .lock()
            .expect("sync queue lock poisoned")
            .as_ref()
            .expect("the queue closes only when the log is dropped")
            .send(waiter)
            .expect("the log's sync thread lives as long as the log");
    }

    /// `after_sync` for code on a blocking thread: returns once everything appended is durable.
    pub(crate) fn sync_blocking(&self) {
        crate::durable::block_until_synced(|waiter| self.after_sync(waiter));
    }

    /// Waits until the entry at `index` is durable, if the log holds it. An apply calls this
    /// so that the state (in sled, synced on its own schedule) never gets ahead of the durable
    /// log. Entries handed to the state machine that the log does not hold (openraft's storage
    /// tests apply some directly) are not waited for.
    pub(crate) async fn wait_durable(&self, index: u64) {
        let mut synced = self.synced_next.subscribe();
        if *synced.borrow() > index {
            return;
        }
        {
            if !self.lock().slots.contains_key(&index) {
                return;
            }
        }
        // The sender lives in `self`, which outlives this wait; the entry is committed, so no
        // truncate removes it while we wait.
        let _ = synced.wait_for(|&next| next > index).await;
    }

    /// The entries in `start..end` that the log holds, in order.
    pub(crate) fn read(&self, start: u64, end: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let inner = self.lock();
        let end = end.unwrap_or(u64::MAX);
        if start >= end {
            return Ok(Vec::new());
        }
        inner
            .slots
            .range(start..end)
            .map(|(index, slot)| match inner.recent.get(index) {
                Some((entry, _)) => Ok(entry.clone()),
                None => read_slot(&inner, *index, slot),
            })
            .collect()
    }

    /// Removes the entries from `index` on, durably.
    pub(crate) fn truncate(&self, index: u64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let removed = inner.slots.split_off(&index);
        inner.forget_recent(|kept| kept < index);
        let Some((_, cut)) = removed.first_key_value() else {
            return Ok(());
        };
        inner.generation += 1;
        let later: Vec<u64> = inner
            .segments
            .range(cut.segment + 1..)
            .map(|(first, _)| *first)
            .collect();
        for first in later {
            let segment = inner.segments.remove(&first).expect("listed above");
            std::fs::remove_file(&segment.path)?;
        }
        let frame_start = cut.offset - FRAME_HEADER_BYTES;
        if frame_start == 0 {
            let segment = inner
                .segments
                .remove(&cut.segment)
                .expect("a slot's segment exists");
            std::fs::remove_file(&segment.path)?;
        } else {
            let segment = inner
                .segments
                .get_mut(&cut.segment)
                .expect("a slot's segment exists");
            // Zeroes from the cut on (the file keeps its preallocated length): the entries cut
            // off must not be read back on the next open.
            segment.file.set_len(frame_start)?;
            preallocate(&segment.file, frame_start, self.segment_bytes_max)?;
            segment.file.sync_all()?;
            segment.bytes = frame_start;
        }
        sync_directory(&self.dir)?;
        inner.last_log_id = match inner.slots.last_key_value() {
            Some((index, slot)) => Some(read_slot(&inner, *index, slot)?.log_id),
            None => None,
        };
        if inner.slots.is_empty() {
            inner.floor = inner.floor.min(index);
        }
        let next = inner.next_index();
        let mut lowered = false;
        self.synced_next.send_modify(|synced| {
            lowered = *synced > next;
            *synced = (*synced).min(next);
        });
        if lowered {
            // Everything below the cut was durable already.
            inner.durable_last = inner.last_log_id;
        }
        Ok(())
    }

    /// Forgets the entries through `index` and deletes every segment that holds nothing else.
    /// The caller has made the purge point durable first.
    pub(crate) fn purge(&self, index: u64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.slots = inner.slots.split_off(&(index + 1));
        inner.forget_recent(|kept| kept > index);
        inner.floor = inner.floor.max(index + 1);
        if inner.slots.is_empty() {
            // The log's last id is then the purge point, which the caller keeps.
            inner.last_log_id = None;
        }
        // A segment goes when the next one starts at or below the purge point's successor, or
        // when the log holds nothing past the purge point.
        let firsts: Vec<u64> = inner.segments.keys().copied().collect();
        let mut removed = false;
        for (position, first) in firsts.iter().enumerate() {
            let covered = match firsts.get(position + 1) {
                Some(next) => *next <= index + 1,
                None => inner.slots.is_empty(),
            };
            if !covered {
                break;
            }
            let segment = inner.segments.remove(first).expect("listed above");
            std::fs::remove_file(&segment.path)?;
            removed = true;
        }
        if removed {
            sync_directory(&self.dir)?;
        }
        Ok(())
    }
}

/// Makes a segment whose data ends at `data_end` `segment_bytes_max` long, with zeroes past its
/// data (see the module's notes: appends then leave the file's size alone). A sparse extension:
/// nothing is written, so it costs no time and no disk until appends reach it.
fn preallocate(file: &File, data_end: u64, segment_bytes_max: u64) -> Result<(), StoreError> {
    if file.metadata()?.len() < segment_bytes_max && data_end < segment_bytes_max {
        file.set_len(segment_bytes_max)?;
    }
    Ok(())
}

fn read_slot(inner: &Inner, index: u64, slot: &Slot) -> Result<Entry, StoreError> {
    let mut record = vec![0_u8; slot.length as usize];
    inner.segments[&slot.segment]
        .file
        .read_exact_at(&mut record, slot.offset)?;
    let entry = unseal_entry(&record, &format!("log entry {index}"))?;
    assert_eq!(
        entry.log_id.index, index,
        "a log slot points at another entry"
    );
    Ok(entry)
}

impl Drop for LogFiles {
    fn drop(&mut self) {
        drop(self.sync_requests.lock().map(|mut sender| sender.take()));
        if let Ok(mut thread) = self.sync_thread.lock()
            && let Some(thread) = thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// The log's group commit: syncs every file written since the last round, then tells the
/// waiters. Holds the log only weakly, so that dropping the store ends it.
fn run_log_sync(log: std::sync::Weak<LogFiles>, pending: mpsc::Receiver<SyncWaiter>) {
    while let Ok(first) = pending.recv() {
        let mut waiters = vec![first];
        waiters.extend(pending.try_iter());
        let Some(log) = log.upgrade() else {
            break;
        };
        let (files, directory, generation, next, last) = {
            let mut inner = log.lock();
            let files = std::mem::take(&mut inner.unsynced);
            let directory = std::mem::take(&mut inner.directory_unsynced);
            let next = inner.next_index();
            (files, directory, inner.generation, next, inner.last_log_id)
        };
        let started = Instant::now();
        let synced = files
            .iter()
            .try_for_each(|file| file.sync_data())
            .and_then(|()| {
                if directory {
                    sync_directory(&log.dir)
                } else {
                    Ok(())
                }
            });
        if let Err(error) = synced {
            tracing::error!(%error, "fsync of the Raft log failed; aborting to avoid acknowledging lost writes");
            std::process::abort();
        }
        metrics::histogram!("residency_log_fsync_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("residency_log_fsync_batch_waiters").record(waiters.len() as f64);
        {
            let mut inner = log.lock();
            if inner.generation == generation && next > *log.synced_next.borrow() {
                inner.durable_last = last;
                log.synced_next.send_replace(next);
            }
        }
        drop(log);
        for waiter in waiters {
            waiter();
        }
    }
}

#[cfg(test)]
mod tests {
    //! Segments on their own: rotation, and truncate and purge across segment boundaries,
    //! each checked again after a reopen.

    use super::*;
    use crate::tests::{blank_entry, log_id};

    /// Small enough that a few entries fill a segment.
    const SMALL_SEGMENT_BYTES: u64 = 100;

    fn indexes(log: &LogFiles) -> Vec<u64> {
        log.read(0, None)
            .expect("entries read")
            .iter()
            .map(|entry| entry.log_id.index)
            .collect()
    }

    fn segment_names(dir: &Path) -> Vec<u64> {
        let mut firsts: Vec<u64> = std::fs::read_dir(dir)
            .expect("log dir lists")
            .map(|item| {
                let name = item.expect("entry").file_name();
                segment_index(name.to_str().expect("utf-8")).expect("only segments")
            })
            .collect();
        firsts.sort();
        firsts
    }

    fn reopen(dir: &Path, last_purged: Option<u64>) -> Arc<LogFiles> {
        LogFiles::open_with(
            dir,
            last_purged.map(|index| log_id(1, index)),
            None,
            SMALL_SEGMENT_BYTES,
        )
        .expect("log reopens")
    }

    #[test]
    fn segments_rotate_and_truncate_and_purge_across_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = reopen(dir.path(), None);
        log.append((0..40).map(|index| blank_entry(1, index)))
            .expect("appended");
        log.sync_blocking();
        let firsts = segment_names(dir.path());
        assert!(
            firsts.len() > 3,
            "40 entries fill several segments: {firsts:?}"
        );
        assert_eq!(firsts[0], 0);
        drop(log);

        let log = reopen(dir.path(), None);
        assert_eq!(indexes(&log), (0..40).collect::<Vec<_>>());
        // Cut in the middle of a segment that has segments after it.
        let cut = firsts[2] + 1;
        log.truncate(cut).expect("truncated");
        assert_eq!(indexes(&log), (0..cut).collect::<Vec<_>>());
        assert_eq!(log.last_log_id(), Some(log_id(1, cut - 1)));
        log.append((cut..cut + 5).map(|index| blank_entry(2, index)))
            .expect("appended after the cut");
        log.sync_blocking();
        drop(log);

        let log = reopen(dir.path(), None);
        assert_eq!(indexes(&log), (0..cut + 5).collect::<Vec<_>>());
        let entries = log.read(cut, None).expect("read");
        assert!(
            entries.iter().all(|entry| entry.log_id.leader_id.term == 2),
            "the entries after the cut are the new ones"
        );
        // Purge past the first two segments: they go, the rest stays.
        let purged = firsts[2] + 2;
        log.purge(purged).expect("purged");
        let left = segment_names(dir.path());
        assert!(
            !left.contains(&firsts[0]) && !left.contains(&firsts[1]),
            "segments wholly purged are deleted: {left:?}"
        );
        assert_eq!(indexes(&log), (purged + 1..cut + 5).collect::<Vec<_>>());
        drop(log);

        let log = reopen(dir.path(), Some(purged));
        assert_eq!(indexes(&log), (purged + 1..cut + 5).collect::<Vec<_>>());
        // Purge everything: the log continues after the purge point in a new segment.
        log.purge(cut + 10).expect("purged all");
        assert!(segment_names(dir.path()).is_empty(), "no segment is left");
        assert_eq!(log.last_log_id(), None);
        log.append([blank_entry(3, cut + 11)]).expect("appended");
        log.sync_blocking();
        drop(log);
        let log = reopen(dir.path(), Some(cut + 10));
        assert_eq!(indexes(&log), vec![cut + 11]);
        assert_eq!(segment_names(dir.path()), vec![cut + 11]);
    }

    /// Entries 0..20 over several small segments, synced, the log closed.
    fn write_twenty_entries(dir: &Path) {
        let log = reopen(dir, None);
        log.append((0..20).map(|index| blank_entry(1, index)))
            .expect("appended");
        log.sync_blocking();
    }

    #[test]
    fn a_segment_cut_short_before_later_segments_stops_the_log_from_opening() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_twenty_entries(dir.path());
        let first = segment_path(dir.path(), 0);
        let bytes = std::fs::metadata(&first).expect("segment").len();
        OpenOptions::new()
            .write(true)
            .open(&first)
            .expect("segment opens")
            .set_len(bytes - 3)
            .expect("cut");
        let refused = LogFiles::open_with(dir.path(), None, None, SMALL_SEGMENT_BYTES)
            .expect_err("a damaged log is refused");
        assert!(
            refused
                .to_string()
                .contains("cut short before the segments after it"),
            "refused with {refused}"
        );
    }

    /// Committed entries are read by checksum and log id alone: the same log results, and a
    /// damaged record among them is still refused.
    #[test]
    fn committed_entries_are_checked_without_being_decoded_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_twenty_entries(dir.path());
        let open_committed = |through: u64| {
            LogFiles::open_with(
                dir.path(),
                None,
                Some(log_id(1, through)),
                SMALL_SEGMENT_BYTES,
            )
        };
        for through in [0, 7, 19, 40] {
            let log = open_committed(through).expect("log opens");
            assert_eq!(indexes(&log), (0..20).collect::<Vec<_>>());
            assert_eq!(log.last_log_id(), Some(log_id(1, 19)));
            assert_eq!(log.read(5, Some(6)).expect("read")[0].log_id, log_id(1, 5));
        }
        let first = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&first).expect("segment");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&first, &bytes).expect("damaged");
        let refused = open_committed(19).expect_err("a damaged committed entry is refused");
        assert!(
            refused.to_string().contains("checksum mismatch"),
            "refused with {refused}"
        );
    }

    #[test]
    fn a_gap_between_segments_stops_the_log_from_opening() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_twenty_entries(dir.path());
        let firsts = segment_names(dir.path());
        std::fs::remove_file(segment_path(dir.path(), firsts[1])).expect("segment removed");
        let refused = LogFiles::open_with(dir.path(), None, None, SMALL_SEGMENT_BYTES)
            .expect_err("a log with a hole is refused");
        assert!(
            refused.to_string().contains("log gap"),
            "refused with {refused}"
        );
    }

    /// Large enough that a segment holds several entries and leaves preallocated space.
    const PREALLOCATED_SEGMENT_BYTES: u64 = 64 * 1024;

    fn reopen_preallocated(dir: &Path) -> Result<Arc<LogFiles>, StoreError> {
        LogFiles::open_with(dir, None, None, PREALLOCATED_SEGMENT_BYTES)
    }

    #[test]
    fn a_segment_is_made_full_length_and_its_zeroes_are_not_entries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = segment_path(dir.path(), 0);
        let log = reopen_preallocated(dir.path()).expect("log opens");
        log.append((0..10).map(|index| blank_entry(1, index)))
            .expect("appended");
        log.sync_blocking();
        let length = || std::fs::metadata(&first).expect("segment").len();
        assert_eq!(
            length(),
            PREALLOCATED_SEGMENT_BYTES,
            "appends do not grow it"
        );
        drop(log);

        let log = reopen_preallocated(dir.path()).expect("log reopens");
        assert_eq!(indexes(&log), (0..10).collect::<Vec<_>>());
        log.append((10..20).map(|index| blank_entry(1, index)))
            .expect("appends continue after the data, not after the zeroes");
        log.sync_blocking();
        drop(log);

        let log = reopen_preallocated(dir.path()).expect("log reopens");
        assert_eq!(indexes(&log), (0..20).collect::<Vec<_>>());
        log.truncate(5).expect("truncated");
        assert_eq!(
            length(),
            PREALLOCATED_SEGMENT_BYTES,
            "a cut keeps the length"
        );
        drop(log);

        let log = reopen_preallocated(dir.path()).expect("log reopens");
        assert_eq!(
            indexes(&log),
            (0..5).collect::<Vec<_>>(),
            "the entries cut off are not read back from the preallocated space"
        );
        assert_eq!(log.last_log_id(), Some(log_id(1, 4)));
    }

    /// Entries 0..=2 and a last entry, 3, long enough to span several torn-write units, in a
    /// preallocated segment, synced and closed. Returns where entry 3's frame starts and ends.
    fn write_a_long_last_entry(dir: &Path) -> (usize, usize) {
        let log = reopen_preallocated(dir).expect("log opens");
        let long = crate::tests::group_entry(
            1,
            3,
            (0..40)
                .map(|n| {
                    crate::tests::assign(
                        &format!("req-{n}"),
                        &format!("user-{n}"),
                        "US",
                        "us-east-1/pg-1",
                    )
                })
                .collect(),
        );
        log.append((0..3).map(|index| blank_entry(1, index)).chain([long]))
            .expect("appended");
        log.sync_blocking();
        let slot = log.lock().slots[&3];
        let start = (slot.offset - FRAME_HEADER_BYTES) as usize;
        let end = (slot.offset + u64::from(slot.length)) as usize;
        assert!(
            end - start > 3 * TORN_WRITE_UNIT_BYTES,
            "the entry spans several units"
        );
        (start, end)
    }

    fn rewrite_segment(dir: &Path, change: impl FnOnce(&mut Vec<u8>)) {
        let path = segment_path(dir, 0);
        let mut bytes = std::fs::read(&path).expect("segment reads");
        change(&mut bytes);
        std::fs::write(&path, bytes).expect("segment rewritten");
    }

    /// A process killed inside a write, or power lost before its sync, leaves the last frame's
    /// start and zeroes from a unit boundary on: cut off, and the log takes the entry again.
    #[test]
    fn a_write_cut_short_in_a_preallocated_segment_is_cut_off() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (start, end) = write_a_long_last_entry(dir.path());
        rewrite_segment(dir.path(), |bytes| {
            let unit = TORN_WRITE_UNIT_BYTES;
            let written_to = (start + FRAME_HEADER_BYTES as usize + 20).div_ceil(unit) * unit;
            bytes[written_to..end].fill(0);
        });
        let log = reopen_preallocated(dir.path()).expect("a torn last write is not damage");
        assert_eq!(indexes(&log), vec![0, 1, 2]);
        log.append([blank_entry(2, 3)]).expect("entry 3 again");
        log.sync_blocking();
        drop(log);
        let log = reopen_preallocated(dir.path()).expect("log reopens");
        assert_eq!(indexes(&log), vec![0, 1, 2, 3]);
        assert_eq!(log.last_log_id(), Some(log_id(2, 3)));
    }

    /// A damaged byte in the last frame, with only zeroes after it, is damage: the entry may
    /// have been acknowledged, so the log refuses to open rather than drop it.
    #[test]
    fn a_damaged_last_entry_in_a_preallocated_segment_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (start, end) = write_a_long_last_entry(dir.path());
        rewrite_segment(dir.path(), |bytes| bytes[(start + end) / 2] ^= 0x08);
        let refused = reopen_preallocated(dir.path()).expect_err("a damaged entry is refused");
        assert!(
            refused
                .to_string()
                .contains("log entry 3: checksum mismatch"),
            "refused with {refused}"
        );
    }
}
