//! The base file: the state at one revision as an immutable sorted file of compressed blocks
//! with an index, read through the page cache (`pread`) and a bounded cache of decoded blocks.
//!
//! It is what the state becomes once sled holds only the changes made since (the plan in
//! docs/scaling.md): a snapshot build merges the last base with those changes into a new base,
//! a learner adopts a received base as it is, and a read looks in sled first, then here.
//!
//! ```text
//! "RRBASE01"                                magic, 8 bytes
//! u32 BE length, header, u32 BE CRC32       the SnapshotMeta as JSON, and its checksum
//! repeated, the blocks:
//!   u32 BE stored length, u32 BE CRC32 of the stored bytes, stored bytes
//!   (a zstd frame; decompressed: repeated varint key length, varint value length, key, value,
//!   the pairs in strictly increasing key order, about BLOCK_RAW_BYTES_TARGET of them)
//! the index, one entry per block:
//!   varint key length, the block's first key, u64 BE offset, u32 BE stored length,
//!   u32 BE raw length, u32 BE pairs
//! the footer, FOOTER_BYTES:
//!   u64 BE index offset, u64 BE index length, u64 BE pairs, u64 BE blocks,
//!   u32 BE CRC32 of the index, u32 BE CRC32 of the footer's bytes before it, "RRBASE01"
//! ```
//!
//! Opening a base checks its header, footer and index and the checksum of every block (no
//! decompression); `verify` also decodes every block and checks the order and the counts, as an
//! install does before it adopts a received file. A block whose checksum fails when it is read
//! later is reported as corruption, never served.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::{SnapshotMeta, StoreError};

const MAGIC: &[u8; 8] = b"RRBASE01";
/// The decoded bytes a block holds, about: a block ends at the first pair that reaches it.
/// A point read that misses the cache decodes one block: 2,000,000 placement-sized pairs read
/// at random through the 64 MiB cache took 15 us a read with 16 KiB blocks, 9.2 with 8 KiB
/// and 9.4 with 4 KiB (the file 2% and 10% larger); zstd still finds the repeats between
/// neighbouring keys.
const BLOCK_RAW_BYTES_TARGET: usize = 8 * 1024;
/// zstd's fastest level: blocks are written once per snapshot build and read often.
const BLOCK_ZSTD_LEVEL: i32 = 1;
/// The same bounds as the snapshot stream's: keys are ids and names, values placements and
/// request records, all far below these.
const KEY_BYTES_MAX: usize = 4_096;
const VALUE_BYTES_MAX: usize = 1 << 20;
/// A block holds at least one pair, so its decoded size is at most the target plus one pair.
const BLOCK_RAW_BYTES_MAX: usize = BLOCK_RAW_BYTES_TARGET + KEY_BYTES_MAX + VALUE_BYTES_MAX + 20;
/// What zstd may need for an incompressible block of the largest size, with room to spare.
const BLOCK_STORED_BYTES_MAX: usize = BLOCK_RAW_BYTES_MAX + BLOCK_RAW_BYTES_MAX / 64 + 1_024;
const HEADER_BYTES_MAX: usize = 1 << 20;
/// An index entry is a key and 20 bytes: this bounds the index of a file of about 10^7
/// blocks (10^11 pairs), far past what one group holds (docs/scaling.md).
const INDEX_BYTES_MAX: u64 = 1 << 30;
const FOOTER_BYTES: usize = 8 * 4 + 4 + 4 + MAGIC.len();
/// Decoded blocks kept for reads, in bytes: a state of 100,000 placements fits whole.
pub const BLOCK_CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// The file is read in pieces of this size when every block's checksum is checked.
const VERIFY_READ_BYTES: usize = 1 << 20;

thread_local! {
    /// A zstd decompression context per thread, kept: making one for every block read cost
    /// more than decompressing a small block.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn push_varint(out: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint at `bytes[*at..]`, moving `at` past it; `None` if it is cut off or over 2^35.
fn read_varint(bytes: &[u8], at: &mut usize) -> Option<usize> {
    let mut value = 0_usize;
    for shift in (0..35).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// Where one block is and what it holds, from the index.
#[derive(Debug, Clone)]
struct BlockEntry {
    first_key: Box<[u8]>,
    offset: u64,
    stored_len: u32,
    raw_len: u32,
    pairs: u32,
}

/// Writes a base file from pairs given in strictly increasing key order.
pub struct BaseWriter {
    out: BufWriter<File>,
    offset: u64,
    raw: Vec<u8>,
    block_first_key: Option<Vec<u8>>,
    block_pairs: u32,
    last_key: Option<Vec<u8>>,
    index: Vec<BlockEntry>,
    pairs: u64,
    compressor: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for BaseWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseWriter")
            .field("pairs", &self.pairs)
            .field("blocks", &self.index.len())
            .finish_non_exhaustive()
    }
}

/// What a finished base file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseSummary {
    pub pairs: u64,
    pub blocks: u64,
    pub bytes: u64,
}

impl BaseWriter {
    /// Starts a base file in `file` (empty, opened for writing) for the state described by
    /// `meta`.
    pub fn new(file: File, meta: &SnapshotMeta) -> Result<BaseWriter, StoreError> {
        let header = serde_json::to_vec(meta).expect("snapshot meta always serializes");
        assert!(header.len() <= HEADER_BYTES_MAX, "snapshot meta too large");
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        out.write_all(MAGIC)?;
        out.write_all(&(header.len() as u32).to_be_bytes())?;
        out.write_all(&header)?;
        out.write_all(&crc32fast::hash(&header).to_be_bytes())?;
        Ok(BaseWriter {
            out,
            offset: (MAGIC.len() + 4 + header.len() + 4) as u64,
            raw: Vec::with_capacity(BLOCK_RAW_BYTES_TARGET * 2),
            block_first_key: None,
            block_pairs: 0,
            last_key: None,
            index: Vec::new(),
            pairs: 0,
            compressor: zstd::bulk::Compressor::new(BLOCK_ZSTD_LEVEL)?,
        })
    }

    /// Adds the next pair. Keys must come in strictly increasing order: a caller that breaks
    /// it has a bug (its source was not sorted), so that is an assertion.
    pub fn pair(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        assert!(key.len() <= KEY_BYTES_MAX, "state key over the base limit");
        assert!(
            value.len() <= VALUE_BYTES_MAX,
            "state value over the base limit"
        );
        if let Some(last) = &self.last_key {
            assert!(
                key > last.as_slice(),
                "base pairs out of order: the source was not sorted"
            );
        }
        if self.block_first_key.is_none() {
            self.block_first_key = Some(key.to_vec());
        }
        push_varint(&mut self.raw, key.len());
        push_varint(&mut self.raw, value.len());
        self.raw.extend_from_slice(key);
        self.raw.extend_from_slice(value);
        self.block_pairs += 1;
        self.pairs += 1;
        match &mut self.last_key {
            Some(last) => {
                last.clear();
                last.extend_from_slice(key);
            }
            None => self.last_key = Some(key.to_vec()),
        }
        if self.raw.len() >= BLOCK_RAW_BYTES_TARGET {
            self.end_block()?;
        }
        Ok(())
    }

    fn end_block(&mut self) -> Result<(), StoreError> {
        let Some(first_key) = self.block_first_key.take() else {
            return Ok(());
        };
        let stored = self.compressor.compress(&self.raw)?;
        assert!(stored.len() <= BLOCK_STORED_BYTES_MAX, "zstd grew a block");
        self.out.write_all(&(stored.len() as u32).to_be_bytes())?;
        self.out
            .write_all(&crc32fast::hash(&stored).to_be_bytes())?;
        self.out.write_all(&stored)?;
        self.index.push(BlockEntry {
            first_key: first_key.into_boxed_slice(),
            offset: self.offset,
            stored_len: stored.len() as u32,
            raw_len: self.raw.len() as u32,
            pairs: self.block_pairs,
        });
        self.offset += 8 + stored.len() as u64;
        self.raw.clear();
        self.block_pairs = 0;
        Ok(())
    }

    /// Writes the last block, the index and the footer, and fsyncs the file.
    pub fn finish(mut self) -> Result<BaseSummary, StoreError> {
        self.end_block()?;
        let mut index = Vec::new();
        for entry in &self.index {
            push_varint(&mut index, entry.first_key.len());
            index.extend_from_slice(&entry.first_key);
            index.extend_from_slice(&entry.offset.to_be_bytes());
            index.extend_from_slice(&entry.stored_len.to_be_bytes());
            index.extend_from_slice(&entry.raw_len.to_be_bytes());
            index.extend_from_slice(&entry.pairs.to_be_bytes());
        }
        self.out.write_all(&index)?;
        let mut footer = Vec::with_capacity(FOOTER_BYTES);
        footer.extend_from_slice(&self.offset.to_be_bytes());
        footer.extend_from_slice(&(index.len() as u64).to_be_bytes());
        footer.extend_from_slice(&self.pairs.to_be_bytes());
        footer.extend_from_slice(&(self.index.len() as u64).to_be_bytes());
        footer.extend_from_slice(&crc32fast::hash(&index).to_be_bytes());
        let footer_crc = crc32fast::hash(&footer);
        footer.extend_from_slice(&footer_crc.to_be_bytes());
        footer.extend_from_slice(MAGIC);
        debug_assert_eq!(footer.len(), FOOTER_BYTES);
        self.out.write_all(&footer)?;
        let file = self.out.into_inner().map_err(|error| error.into_error())?;
        file.sync_all()?;
        Ok(BaseSummary {
            pairs: self.pairs,
            blocks: self.index.len() as u64,
            bytes: self.offset + index.len() as u64 + FOOTER_BYTES as u64,
        })
    }
}

/// One block, decoded: its bytes and where each pair starts.
#[derive(Debug)]
struct Block {
    raw: Vec<u8>,
    starts: Vec<u32>,
}

impl Block {
    fn decode(raw: Vec<u8>, expected_pairs: u32) -> Result<Block, StoreError> {
        let mut starts = Vec::with_capacity(expected_pairs as usize);
        let mut at = 0;
        let mut previous: Option<&[u8]> = None;
        while at < raw.len() {
            let start = at;
            let damaged = || StoreError::corrupt("base file: a block's pair is cut off");
            let key_len = read_varint(&raw, &mut at).ok_or_else(damaged)?;
            let value_len = read_varint(&raw, &mut at).ok_or_else(damaged)?;
            if key_len > KEY_BYTES_MAX || value_len > VALUE_BYTES_MAX {
                return Err(StoreError::corrupt(format!(
                    "base file: a pair of {key_len}/{value_len} bytes is over the limits"
                )));
            }
            let end = at + key_len + value_len;
            if end > raw.len() {
                return Err(damaged());
            }
            let key = &raw[at..at + key_len];
            if previous.is_some_and(|previous| key <= previous) {
                return Err(StoreError::corrupt(
                    "base file: a block's keys are not sorted",
                ));
            }
            previous = Some(key);
            starts.push(start as u32);
            at = end;
        }
        if starts.len() != expected_pairs as usize {
            return Err(StoreError::corrupt(format!(
                "base file: a block holds {} pairs, its index says {expected_pairs}",
                starts.len()
            )));
        }
        Ok(Block { raw, starts })
    }

    /// The key and value of the pair at position `at` (checked when decoded).
    fn pair(&self, at: usize) -> (&[u8], &[u8]) {
        let mut cursor = self.starts[at] as usize;
        let key_len = read_varint(&self.raw, &mut cursor).expect("checked when decoded");
        let value_len = read_varint(&self.raw, &mut cursor).expect("checked when decoded");
        let key = &self.raw[cursor..cursor + key_len];
        let value = &self.raw[cursor + key_len..cursor + key_len + value_len];
        (key, value)
    }

    /// The position of the first pair whose key is `>= key`.
    fn seek(&self, key: &[u8]) -> usize {
        self.starts.partition_point(|&start| {
            let mut cursor = start as usize;
            let key_len = read_varint(&self.raw, &mut cursor).expect("checked when decoded");
            let _ = read_varint(&self.raw, &mut cursor).expect("checked when decoded");
            &self.raw[cursor..cursor + key_len] < key
        })
    }

    fn bytes(&self) -> usize {
        self.raw.len() + self.starts.len() * 4
    }
}

/// Decoded blocks, bounded in bytes, evicted by a clock (a block read since the hand last
/// passed stays one more round), so a scan does not flush what point reads keep using.
#[derive(Debug, Default)]
struct BlockCache {
    blocks: HashMap<u32, (Arc<Block>, bool)>,
    ring: std::collections::VecDeque<u32>,
    bytes: usize,
}

impl BlockCache {
    fn get(&mut self, number: u32) -> Option<Arc<Block>> {
        let (block, referenced) = self.blocks.get_mut(&number)?;
        *referenced = true;
        Some(block.clone())
    }

    fn insert(&mut self, number: u32, block: Arc<Block>, bytes_max: usize) {
        let bytes = block.bytes();
        if bytes > bytes_max || self.blocks.contains_key(&number) {
            return;
        }
        while self.bytes + bytes > bytes_max {
            let Some(victim) = self.ring.pop_front() else {
                break;
            };
            let entry = self
                .blocks
                .get_mut(&victim)
                .expect("every number in the ring is cached");
            if entry.1 {
                entry.1 = false;
                self.ring.push_back(victim);
            } else {
                let (evicted, _) = self.blocks.remove(&victim).expect("just found");
                self.bytes -= evicted.bytes();
            }
        }
        self.bytes += bytes;
        self.blocks.insert(number, (block, false));
        self.ring.push_back(number);
    }
}

/// Where a base's bytes are read from: its file, or (for the fuzz target) memory.
trait Source: Send + Sync {
    fn read_exact_at(&self, bytes: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl Source for File {
    fn read_exact_at(&self, bytes: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, bytes, offset)
    }
}

impl Source for Vec<u8> {
    fn read_exact_at(&self, bytes: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let piece = start
            .checked_add(bytes.len())
            .and_then(|end| self.get(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        bytes.copy_from_slice(piece);
        Ok(())
    }
}

/// An open base file.
pub struct Base {
    file: Box<dyn Source>,
    meta: SnapshotMeta,
    index: Vec<BlockEntry>,
    pairs: u64,
    bytes: u64,
    cache: Mutex<BlockCache>,
    cache_bytes_max: usize,
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("pairs", &self.pairs)
            .field("blocks", &self.index.len())
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

fn read_at(file: &dyn Source, offset: u64, length: usize) -> Result<Vec<u8>, StoreError> {
    let mut bytes = vec![0_u8; length];
    file.read_exact_at(&mut bytes, offset).map_err(|error| {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            StoreError::corrupt("base file ends early")
        } else {
            StoreError::Io(error)
        }
    })?;
    Ok(bytes)
}

impl Base {
    /// Opens the base file at `path`: checks its header, footer, index and every block's
    /// checksum; a damaged file is refused with what is wrong with it.
    pub fn open(path: &Path) -> Result<Base, StoreError> {
        Base::open_with_cache(path, BLOCK_CACHE_BYTES_MAX)
    }

    pub(crate) fn open_with_cache(path: &Path, cache_bytes_max: usize) -> Result<Base, StoreError> {
        let file = File::open(path)?;
        let bytes = file.metadata()?.len();
        Base::from_source(
            Box::new(file),
            bytes,
            &path.display().to_string(),
            cache_bytes_max,
        )
    }

    /// As `open`, from a file already open (a snapshot handed over by openraft).
    pub fn from_file(file: File) -> Result<Base, StoreError> {
        let bytes = file.metadata()?.len();
        Base::from_source(Box::new(file), bytes, "(open file)", BLOCK_CACHE_BYTES_MAX)
    }

    /// As `open`, from bytes in memory (the fuzz target).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Base, StoreError> {
        let length = bytes.len() as u64;
        Base::from_source(
            Box::new(bytes),
            length,
            "(in memory)",
            BLOCK_CACHE_BYTES_MAX,
        )
    }

    /// Whether a file beginning with `prefix` is a base file.
    pub fn is_base(prefix: &[u8]) -> bool {
        prefix.starts_with(MAGIC)
    }

    fn from_source(
        source: Box<dyn Source>,
        bytes: u64,
        name: &str,
        cache_bytes_max: usize,
    ) -> Result<Base, StoreError> {
        let file = &*source;
        let corrupt = |what: &str| StoreError::corrupt(format!("base file {name}: {what}"));
        let opening = (MAGIC.len() + 4) as u64;
        if bytes < opening + FOOTER_BYTES as u64 {
            return Err(corrupt("shorter than a header and a footer"));
        }
        let start = read_at(file, 0, MAGIC.len() + 4)?;
        if &start[..MAGIC.len()] != MAGIC {
            return Err(corrupt("not a registry base file (bad magic)"));
        }
        let header_len = be_u32(&start[MAGIC.len()..]) as usize;
        if header_len > HEADER_BYTES_MAX || opening + header_len as u64 + 4 > bytes {
            return Err(corrupt("header length out of bounds"));
        }
        let header = read_at(file, opening, header_len + 4)?;
        if crc32fast::hash(&header[..header_len]) != be_u32(&header[header_len..]) {
            return Err(corrupt("header checksum mismatch"));
        }
        let meta: SnapshotMeta = serde_json::from_slice(&header[..header_len])
            .map_err(|error| corrupt(&format!("header: {error}")))?;
        let blocks_start = opening + header_len as u64 + 4;

        let footer = read_at(file, bytes - FOOTER_BYTES as u64, FOOTER_BYTES)?;
        if &footer[FOOTER_BYTES - MAGIC.len()..] != MAGIC {
            return Err(corrupt("no footer (the file is cut short)"));
        }
        if crc32fast::hash(&footer[..36]) != be_u32(&footer[36..]) {
            return Err(corrupt("footer checksum mismatch"));
        }
        let index_offset = be_u64(&footer[0..]);
        let index_len = be_u64(&footer[8..]);
        let pairs = be_u64(&footer[16..]);
        let block_count = be_u64(&footer[24..]);
        let index_crc = be_u32(&footer[32..]);
        if index_len > INDEX_BYTES_MAX
            || index_offset < blocks_start
            || index_offset.checked_add(index_len) != Some(bytes - FOOTER_BYTES as u64)
        {
            return Err(corrupt("index out of bounds"));
        }
        let raw_index = read_at(file, index_offset, index_len as usize)?;
        if crc32fast::hash(&raw_index) != index_crc {
            return Err(corrupt("index checksum mismatch"));
        }
        let index = Base::parse_index(&raw_index, blocks_start, index_offset)
            .map_err(|what| corrupt(&what))?;
        if index.len() as u64 != block_count {
            return Err(corrupt("the footer's block count disagrees with the index"));
        }
        let counted: u64 = index.iter().map(|entry| u64::from(entry.pairs)).sum();
        if counted != pairs {
            return Err(corrupt("the footer's pair count disagrees with the index"));
        }
        let base = Base {
            file: source,
            meta,
            index,
            pairs,
            bytes,
            cache: Mutex::default(),
            cache_bytes_max,
        };
        base.check_block_sums().map_err(|error| match error {
            StoreError::Corrupt(what) => corrupt(&what),
            other => other,
        })?;
        Ok(base)
    }

    fn parse_index(
        raw: &[u8],
        blocks_start: u64,
        blocks_end: u64,
    ) -> Result<Vec<BlockEntry>, String> {
        let mut index = Vec::new();
        let mut at = 0;
        let mut expected_offset = blocks_start;
        while at < raw.len() {
            let key_len = read_varint(raw, &mut at).ok_or("index entry cut off")?;
            if key_len > KEY_BYTES_MAX || at + key_len + 20 > raw.len() {
                return Err("index entry out of bounds".into());
            }
            let first_key: Box<[u8]> = raw[at..at + key_len].into();
            at += key_len;
            let offset = be_u64(&raw[at..]);
            let stored_len = be_u32(&raw[at + 8..]);
            let raw_len = be_u32(&raw[at + 12..]);
            let pairs = be_u32(&raw[at + 16..]);
            at += 20;
            if offset != expected_offset
                || stored_len as usize > BLOCK_STORED_BYTES_MAX
                || raw_len as usize > BLOCK_RAW_BYTES_MAX
                || pairs == 0
            {
                return Err("index entry does not match the blocks".into());
            }
            if index
                .last()
                .is_some_and(|last: &BlockEntry| first_key <= last.first_key)
            {
                return Err("index keys are not sorted".into());
            }
            expected_offset = offset + 8 + u64::from(stored_len);
            index.push(BlockEntry {
                first_key,
                offset,
                stored_len,
                raw_len,
                pairs,
            });
        }
        if expected_offset != blocks_end {
            return Err("the blocks do not end where the index begins".into());
        }
        Ok(index)
    }

    /// Reads every block's stored bytes and checks their checksums, without decoding.
    fn check_block_sums(&self) -> Result<(), StoreError> {
        let Some(first) = self.index.first() else {
            return Ok(());
        };
        let last = self.index.last().expect("not empty");
        let end = last.offset + 8 + u64::from(last.stored_len);
        let mut next_block = 0;
        let mut window_start = first.offset;
        while next_block < self.index.len() {
            // Read whole blocks, at least one, about VERIFY_READ_BYTES at a time.
            let mut window_end = window_start;
            let mut through = next_block;
            while through < self.index.len() {
                let entry = &self.index[through];
                let block_end = entry.offset + 8 + u64::from(entry.stored_len);
                if through > next_block && block_end - window_start > VERIFY_READ_BYTES as u64 {
                    break;
                }
                window_end = block_end;
                through += 1;
            }
            debug_assert!(window_end <= end);
            let bytes = read_at(
                &*self.file,
                window_start,
                (window_end - window_start) as usize,
            )?;
            for entry in &self.index[next_block..through] {
                let at = (entry.offset - window_start) as usize;
                let stored = be_u32(&bytes[at..]) as usize;
                let sum = be_u32(&bytes[at + 4..]);
                let body = &bytes[at + 8..at + 8 + entry.stored_len as usize];
                if stored != entry.stored_len as usize || crc32fast::hash(body) != sum {
                    return Err(StoreError::corrupt(format!(
                        "block at offset {} fails its checksum",
                        entry.offset
                    )));
                }
            }
            next_block = through;
            window_start = window_end;
        }
        Ok(())
    }

    /// Decodes every block and checks that the keys rise across the whole file and that the
    /// counts match: what an install checks before it adopts a received file.
    pub fn verify(&self) -> Result<(), StoreError> {
        let mut previous_last: Option<Vec<u8>> = None;
        for number in 0..self.index.len() {
            let block = self.read_block(number)?;
            let (first, _) = block.pair(0);
            if first != &*self.index[number].first_key {
                return Err(StoreError::corrupt(
                    "base file: a block's first key disagrees with the index",
                ));
            }
            if previous_last.as_deref().is_some_and(|last| first <= last) {
                return Err(StoreError::corrupt(
                    "base file: the blocks' keys are not sorted",
                ));
            }
            previous_last = Some(block.pair(block.starts.len() - 1).0.to_vec());
        }
        Ok(())
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    pub fn pairs(&self) -> u64 {
        self.pairs
    }

    /// The file's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reads and decodes block `number` from the file (not from the cache).
    fn read_block(&self, number: usize) -> Result<Block, StoreError> {
        let entry = &self.index[number];
        let bytes = read_at(&*self.file, entry.offset, 8 + entry.stored_len as usize)?;
        let body = &bytes[8..];
        if be_u32(&bytes[4..]) != crc32fast::hash(body) {
            return Err(StoreError::corrupt(format!(
                "base file: block at offset {} fails its checksum",
                entry.offset
            )));
        }
        let raw = DECOMPRESSOR
            .with(|decompressor| {
                let mut decompressor = decompressor.borrow_mut();
                let decompressor = match &mut *decompressor {
                    Some(decompressor) => decompressor,
                    None => decompressor.insert(zstd::bulk::Decompressor::new()?),
                };
                decompressor.decompress(body, entry.raw_len as usize)
            })
            .map_err(|error| {
                StoreError::corrupt(format!("base file: a block does not decompress: {error}"))
            })?;
        if raw.len() != entry.raw_len as usize {
            return Err(StoreError::corrupt(
                "base file: a block's size disagrees with the index",
            ));
        }
        Block::decode(raw, entry.pairs)
    }

    /// Block `number`, from the cache or read into it.
    fn cached_block(&self, number: usize) -> Result<Arc<Block>, StoreError> {
        let key = u32::try_from(number).expect("fewer than 2^32 blocks");
        if let Some(block) = self.cache.lock().expect("block cache lock").get(key) {
            return Ok(block);
        }
        let block = Arc::new(self.read_block(number)?);
        self.cache.lock().expect("block cache lock").insert(
            key,
            block.clone(),
            self.cache_bytes_max,
        );
        Ok(block)
    }

    /// The block that would hold `key`, if any.
    fn block_for(&self, key: &[u8]) -> Option<usize> {
        let after = self.index.partition_point(|entry| &*entry.first_key <= key);
        after.checked_sub(1)
    }

    /// The value of `key`, if the base holds it.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(number) = self.block_for(key) else {
            return Ok(None);
        };
        let block = self.cached_block(number)?;
        let at = block.seek(key);
        if at < block.starts.len() {
            let (found, value) = block.pair(at);
            if found == key {
                return Ok(Some(value.to_vec()));
            }
        }
        Ok(None)
    }

    /// The pairs from the first key `>= start` on, in order. `cache` says whether the blocks
    /// it reads go into the block cache: a point read's neighbours will be read again, a whole
    /// walk's (a build, a digest) will not.
    pub fn pairs_from(self: &Arc<Self>, start: &[u8], cache: bool) -> BaseCursor {
        let block = self.block_for(start).unwrap_or(0);
        BaseCursor {
            base: self.clone(),
            next_block: block,
            current: None,
            seek: Some(start.to_vec()),
            cache,
            previous_last: None,
        }
    }
}

/// A walk over a base's pairs in key order (see `Base::pairs_from`).
#[derive(Debug)]
pub struct BaseCursor {
    base: Arc<Base>,
    next_block: usize,
    current: Option<(Arc<Block>, usize)>,
    seek: Option<Vec<u8>>,
    cache: bool,
    /// The last key of the block read last: each block must begin past it (a block's own
    /// order is checked when it is decoded), so a walk of a damaged file that `verify` was not
    /// run on still never yields keys out of order.
    previous_last: Option<Vec<u8>>,
}

impl BaseCursor {
    /// The next pair, or `None` past the last.
    pub fn next_pair(&mut self) -> Result<Option<crate::snapshot::StatePair>, StoreError> {
        loop {
            if let Some((block, at)) = &mut self.current {
                if *at < block.starts.len() {
                    let (key, value) = block.pair(*at);
                    *at += 1;
                    return Ok(Some((key.to_vec(), value.to_vec())));
                }
                self.current = None;
            }
            if self.next_block >= self.base.index.len() {
                return Ok(None);
            }
            let block = if self.cache {
                self.base.cached_block(self.next_block)?
            } else {
                Arc::new(self.base.read_block(self.next_block)?)
            };
            self.next_block += 1;
            let (first, _) = block.pair(0);
            if self
                .previous_last
                .as_deref()
                .is_some_and(|last| first <= last)
            {
                return Err(StoreError::corrupt(
                    "base file: the blocks' keys are not sorted",
                ));
            }
            self.previous_last = Some(block.pair(block.starts.len() - 1).0.to_vec());
            let at = match self.seek.take() {
                Some(start) => block.seek(&start),
                None => 0,
            };
            self.current = Some((block, at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 1),
                index,
            )),
            last_membership: crate::StoredMembership::default(),
            snapshot_id: format!("test-{index}"),
        }
    }

    fn key(n: u32) -> Vec<u8> {
        format!("p/user-{n:09}").into_bytes()
    }

    fn value(n: u32) -> Vec<u8> {
        format!("placement of user {n}: US, loc-{}", n % 500).into_bytes()
    }

    fn write(path: &Path, count: u32) -> BaseSummary {
        let mut writer = BaseWriter::new(File::create(path).unwrap(), &meta(7)).unwrap();
        for n in 0..count {
            writer.pair(&key(n * 2), &value(n)).unwrap();
        }
        writer.finish().unwrap()
    }

    #[test]
    fn every_pair_is_found_and_absent_keys_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        let summary = write(&path, 20_000);
        assert_eq!(summary.pairs, 20_000);
        assert!(summary.blocks > 10, "{summary:?}");
        // Sequential ids compress: far below the raw pairs' size.
        assert!(summary.bytes < 20_000 * 20, "{summary:?}");
        let base = Base::open(&path).unwrap();
        base.verify().unwrap();
        assert_eq!(base.meta().snapshot_id, "test-7");
        assert_eq!(base.pairs(), 20_000);
        for n in (0..20_000).step_by(7) {
            assert_eq!(base.get(&key(n * 2)).unwrap(), Some(value(n)), "user {n}");
            assert_eq!(
                base.get(&key(n * 2 + 1)).unwrap(),
                None,
                "user {}",
                n * 2 + 1
            );
        }
        assert_eq!(base.get(b"a").unwrap(), None);
        assert_eq!(base.get(b"z").unwrap(), None);
    }

    #[test]
    fn a_walk_from_any_key_yields_the_rest_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        write(&path, 5_000);
        let base = Arc::new(Base::open(&path).unwrap());
        for (start, first) in [(b"".to_vec(), 0), (key(2_001), 1_001), (key(2_002), 1_001)] {
            for cache in [false, true] {
                let mut cursor = base.pairs_from(&start, cache);
                let mut n = first;
                while let Some((k, v)) = cursor.next_pair().unwrap() {
                    assert_eq!((k, v), (key(n * 2), value(n)));
                    n += 1;
                }
                assert_eq!(n, 5_000);
            }
        }
        assert!(base.pairs_from(b"q", true).next_pair().unwrap().is_none());
    }

    #[test]
    fn an_empty_base_opens_and_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        assert_eq!(write(&path, 0).pairs, 0);
        let base = Arc::new(Base::open(&path).unwrap());
        base.verify().unwrap();
        assert_eq!(base.get(&key(0)).unwrap(), None);
        assert!(base.pairs_from(b"", false).next_pair().unwrap().is_none());
    }

    #[test]
    fn the_block_cache_stays_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        write(&path, 20_000);
        let bound = 3 * BLOCK_RAW_BYTES_TARGET;
        let base = Base::open_with_cache(&path, bound).unwrap();
        for n in 0..20_000 {
            assert_eq!(base.get(&key(n * 2)).unwrap(), Some(value(n)));
            let cache = base.cache.lock().unwrap();
            assert!(cache.bytes <= bound, "{} > {bound}", cache.bytes);
            assert_eq!(cache.blocks.len(), cache.ring.len());
        }
    }

    /// Every byte of the file matters: flipping any one is refused when opened (header,
    /// blocks, index, footer) or, for a byte inside a block, also when read.
    #[test]
    fn damage_anywhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        write(&path, 3_000);
        let good = std::fs::read(&path).unwrap();
        let damaged = dir.path().join("damaged");
        let step = (good.len() / 400).max(1);
        for at in (0..good.len()).step_by(step).chain([good.len() - 1]) {
            let mut bytes = good.clone();
            bytes[at] ^= 0x20;
            std::fs::write(&damaged, &bytes).unwrap();
            match Base::open(&damaged) {
                Err(StoreError::Corrupt(_)) => {}
                Err(other) => panic!("byte {at}: {other}"),
                Ok(_) => panic!("byte {at} of {} flipped, and the file opened", good.len()),
            }
        }
        for cut in [0, 8, good.len() / 2, good.len() - 1] {
            std::fs::write(&damaged, &good[..cut]).unwrap();
            assert!(
                matches!(Base::open(&damaged), Err(StoreError::Corrupt(_))),
                "cut at {cut}"
            );
        }
    }

    /// A block damaged after the file was opened (a disk that lies) is refused when read.
    #[test]
    fn a_block_damaged_after_open_is_refused_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        write(&path, 3_000);
        let base = Base::open_with_cache(&path, 0).unwrap();
        let middle = base.index[base.index.len() / 2].clone();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(middle.offset + 8 + u64::from(middle.stored_len) / 2) as usize] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            base.get(&middle.first_key),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn varints_round_trip_and_refuse_cut_ones() {
        for value in [0, 1, 127, 128, 300, 16_383, 16_384, 1 << 20, (1 << 35) - 1] {
            let mut bytes = Vec::new();
            push_varint(&mut bytes, value);
            let mut at = 0;
            assert_eq!(read_varint(&bytes, &mut at), Some(value));
            assert_eq!(at, bytes.len());
            let mut at = 0;
            assert_eq!(read_varint(&bytes[..bytes.len() - 1], &mut at), None);
        }
        let mut at = 0;
        assert_eq!(read_varint(&[0xff; 6], &mut at), None);
    }

    #[test]
    #[should_panic(expected = "out of order")]
    fn pairs_out_of_order_are_a_bug() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer =
            BaseWriter::new(File::create(dir.path().join("base")).unwrap(), &meta(1)).unwrap();
        writer.pair(b"b", b"1").unwrap();
        writer.pair(b"a", b"2").unwrap();
    }
}
