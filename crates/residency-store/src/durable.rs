//! The node's sled database and what makes writes to it durable.
//!
//! sled's `flush()` writes its log with `sync_file_range`, which is not an fsync: it survives
//! a process kill, not a power loss. So a write is durable here only after `flush()` *and* an
//! `fdatasync` on sled's `db` file. One dedicated thread does both for every pending request at
//! once (group commit): requests that arrive while a sync runs share the next one. Votes and
//! snapshot steps wait for it; log appends do not (the log has its own files and sync thread,
//! `log_file.rs`). We never call `flush_async()`, which can hang every sled database in the
//! process once seven calls are pending.
//!
//! A failed fsync aborts the process: after a failed fsync the page cache may have dropped the
//! dirty pages, so carrying on could acknowledge writes that are not on disk ("fsyncgate").

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::StoreError;

/// How the store is opened. Every field is set by the caller; there are no hidden defaults.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// sled's page cache per node, in bytes. sled's own default is 1 GiB.
    pub cache_capacity_bytes: u64,
}

/// sled writes a value over 128 KiB to a file in `blobs/` that is never synced, so no value we
/// store may come near it: commands and request records are bounded well below this, and the
/// store asserts it (a larger value would be our bug, and a silent durability hole).
pub const SLED_INLINE_VALUE_BYTES_MAX: usize = 120 * 1024;

/// Something waiting for the next durable point.
pub(crate) type SyncWaiter = Box<dyn FnOnce() + Send>;

/// Requests queued to the flusher thread, at most this many before senders wait.
const SYNC_QUEUE_DEPTH_MAX: usize = 4_096;

#[derive(Clone)]
pub struct Durable {
    db: sled::Db,
    dir: PathBuf,
    flusher: Arc<Flusher>,
    /// The last index the durable current snapshot covers, plus one (0: no snapshot). The log
    /// never purges past it (see `LogStore::purge`).
    snapshot_floor: Arc<std::sync::atomic::AtomicU64>,
    /// A snapshot from the leader is being received or installed.
    installing: Arc<std::sync::atomic::AtomicBool>,
    /// The furthest purge openraft asked for and the log held back; also the lock every purge
    /// takes, so two never interleave.
    pub(crate) held_back_purge: Arc<Mutex<Option<crate::LogId>>>,
    /// The Raft log's segment files, once `LogStore::open` has opened them.
    log_files: Arc<std::sync::OnceLock<Arc<crate::log_file::LogFiles>>>,
}

/// The flusher thread and the queue into it, shared by every handle to the store.
struct Flusher {
    sync_requests: Option<mpsc::SyncSender<SyncWaiter>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Flusher {
    // The thread holds a clone of the sled `Db`, and sled keeps the directory locked until its
    // last clone is gone. Left to exit on its own, the thread would close the database some
    // time after the last handle was dropped, and reopening the directory (a node restart, a
    // test) could fail with "could not acquire lock". So close the queue and wait (at most one
    // fsync): the thread completes the waiters it holds and exits, dropping its clone, so the
    // database closes with the last of the store's own handles.
    fn drop(&mut self) {
        drop(self.sync_requests.take());
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            // A panic on that thread was reported when it happened; nothing is left to do.
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// How long opening waits for sled's directory lock to be released.
const SLED_LOCK_WAIT_MS_MAX: u64 = 5_000;
const SLED_LOCK_RETRY_MS: u64 = 10;

/// Opens sled, waiting a bounded time for its directory lock. After the last handle to a
/// database is dropped, sled's own I/O threads can hold the locked file a few milliseconds
/// longer, so an in-process reopen (tests, a restarted node in one process) can find it still
/// locked. A second process holding it keeps it past the wait, and gets the lock error.
pub fn open_sled(db_dir: &Path, cache_capacity_bytes: u64) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + std::time::Duration::from_millis(SLED_LOCK_WAIT_MS_MAX);
    loop {
        match sled::Config::new()
            .path(db_dir)
            .cache_capacity(cache_capacity_bytes)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(SLED_LOCK_RETRY_MS));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

impl Durable {
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Durable, StoreError> {
        std::fs::create_dir_all(dir)?;
        let db_dir = dir.join("sled");
        let db = open_sled(&db_dir, options.cache_capacity_bytes)?;
        // Any descriptor on the inode serves for fdatasync; sled never replaces its `db` file.
        let db_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(db_dir.join("db"))?;
        sync_directory(&db_dir)?;
        sync_directory(dir)?;
        let (sync_requests, pending) = mpsc::sync_channel(SYNC_QUEUE_DEPTH_MAX);
        let flusher_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("residency-fsync".to_string())
            .spawn(move || run_flusher(flusher_db, db_file, pending))?;
        let flusher = Flusher {
            sync_requests: Some(sync_requests),
            thread: Some(thread),
        };
        Ok(Durable {
            db,
            dir: dir.to_path_buf(),
            flusher: Arc::new(flusher),
            snapshot_floor: Arc::default(),
            installing: Arc::default(),
            held_back_purge: Arc::default(),
            log_files: Arc::default(),
        })
    }

    /// Called once, by `LogStore::open`.
    pub(crate) fn attach_log_files(&self, files: Arc<crate::log_file::LogFiles>) {
        assert!(
            self.log_files.set(files).is_ok(),
            "the log of a store is opened once"
        );
    }

    /// The Raft log's files; `None` only before `LogStore::open` (a state machine opened on its
    /// own, in tests).
    pub(crate) fn log_files(&self) -> Option<&Arc<crate::log_file::LogFiles>> {
        self.log_files.get()
    }

    /// The state machine's current snapshot is durable and covers up to `index`.
    pub(crate) fn set_snapshot_floor(&self, index: u64) {
        self.snapshot_floor
            .store(index + 1, std::sync::atomic::Ordering::SeqCst);
    }

    /// A snapshot from the leader is being received (`true`), or its install ended.
    pub(crate) fn set_installing(&self, installing: bool) {
        self.installing
            .store(installing, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn installing(&self) -> bool {
        self.installing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The last index the durable current snapshot covers, if there is one.
    pub(crate) fn snapshot_floor(&self) -> Option<u64> {
        self.snapshot_floor
            .load(std::sync::atomic::Ordering::SeqCst)
            .checked_sub(1)
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Calls `waiter` once everything written before this call is on disk.
    pub(crate) fn after_sync(&self, waiter: SyncWaiter) {
        self.flusher
            .sync_requests
            .as_ref()
            .expect("the queue closes only when the last handle is dropped")
            .send(waiter)
            .expect("the flusher thread lives as long as any handle to the store");
    }

    /// Waits until everything written before this call is on disk.
    pub async fn sync(&self) {
        let (done, synced) = tokio::sync::oneshot::channel();
        self.after_sync(Box::new(move || {
            let _ = done.send(());
        }));
        synced
            .await
            .expect("the flusher completes every waiter or aborts the process");
    }
}

impl Durable {
    /// `sync` for code already on a blocking thread (snapshot build and install).
    pub(crate) fn sync_blocking(&self) {
        block_until_synced(|waiter| self.after_sync(waiter));
    }
}

/// Queues a waiter with `queue` and blocks the thread until it is called. Every sync thread
/// calls each waiter or aborts the process.
pub(crate) fn block_until_synced(queue: impl FnOnce(SyncWaiter)) {
    let (done, synced) = mpsc::sync_channel(1);
    queue(Box::new(move || {
        let _ = done.send(());
    }));
    synced
        .recv()
        .expect("a sync thread calls every waiter or aborts the process");
}

fn run_flusher(db: sled::Db, db_file: File, pending: mpsc::Receiver<SyncWaiter>) {
    while let Ok(first) = pending.recv() {
        let mut waiters = vec![first];
        waiters.extend(pending.try_iter());
        let started = Instant::now();
        if let Err(error) = db
            .flush()
            .map_err(io::Error::from)
            .and_then(|_| db_file.sync_data())
        {
            tracing::error!(%error, "fsync of the node's database failed; aborting to avoid acknowledging lost writes");
            std::process::abort();
        }
        metrics::histogram!("residency_fsync_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("residency_fsync_batch_waiters").record(waiters.len() as f64);
        for waiter in waiters {
            waiter();
        }
    }
}

/// Makes a directory's entries (a created or renamed file) durable.
pub fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
