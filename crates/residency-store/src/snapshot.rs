//! The snapshot file: written and read as a stream, never held in memory as one blob.
//!
//! The file is one zstd frame (level `SNAPSHOT_ZSTD_LEVEL`, with zstd's own content checksum)
//! whose content is the stream below. A file that begins with the stream itself (written
//! before snapshots were compressed, such as an old backup) is read as well.
//!
//! ```text
//! "RRSNAP01"                       magic, 8 bytes
//! u32 BE header length, header     the SnapshotMeta as JSON
//! repeated: u32 BE key length, u32 BE value length, key, value     every state pair, in key order
//! u32 BE 0xFFFF_FFFF, u64 BE pair count, u32 BE CRC32 of every byte before the CRC
//! ```
//!
//! A file whose trailer is missing or whose CRC does not match is refused before anything of it
//! replaces the state.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};

use crate::{SnapshotMeta, StoreError};

/// One (key, value) pair of the state.
pub type StatePair = (Vec<u8>, Vec<u8>);

const MAGIC: &[u8; 8] = b"RRSNAP01";
const END_MARKER: u32 = u32::MAX;
/// The header is a small JSON document; anything larger is not one of ours.
const HEADER_BYTES_MAX: u32 = 1 << 20;
/// Keys are user ids, request ids and metadata names, all far below this.
const KEY_BYTES_MAX: u32 = 4_096;
/// Values are placements and request records, far below this.
const VALUE_BYTES_MAX: u32 = 1 << 20;
const IO_BUFFER_BYTES: usize = 256 * 1024;
/// zstd's fastest level: a snapshot of placements shrinks tenfold or more at a few hundred MB/s,
/// far faster than the state is walked or loaded.
const SNAPSHOT_ZSTD_LEVEL: i32 = 1;
/// How every zstd frame begins.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// A writer that keeps a running CRC of everything written.
struct Checksummed<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type Compressed = zstd::stream::write::Encoder<'static, BufWriter<File>>;

pub struct SnapshotWriter {
    out: Checksummed<Compressed>,
    pairs: u64,
}

impl std::fmt::Debug for SnapshotWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriter")
            .field("pairs", &self.pairs)
            .finish_non_exhaustive()
    }
}

impl SnapshotWriter {
    pub fn new(file: File, meta: &SnapshotMeta) -> Result<SnapshotWriter, StoreError> {
        let header = serde_json::to_vec(meta).expect("snapshot meta always serializes");
        let mut inner = zstd::stream::write::Encoder::new(
            BufWriter::with_capacity(IO_BUFFER_BYTES, file),
            SNAPSHOT_ZSTD_LEVEL,
        )?;
        inner.include_checksum(true)?;
        let mut out = Checksummed {
            inner,
            hasher: crc32fast::Hasher::new(),
        };
        out.write_all(MAGIC)?;
        out.write_all(&(header.len() as u32).to_be_bytes())?;
        out.write_all(&header)?;
        Ok(SnapshotWriter { out, pairs: 0 })
    }

    pub fn pair(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        assert!(
            key.len() <= KEY_BYTES_MAX as usize,
            "state key over the snapshot limit"
        );
        assert!(
            value.len() <= VALUE_BYTES_MAX as usize,
            "state value over the snapshot limit"
        );
        self.out.write_all(&(key.len() as u32).to_be_bytes())?;
        self.out.write_all(&(value.len() as u32).to_be_bytes())?;
        self.out.write_all(key)?;
        self.out.write_all(value)?;
        self.pairs += 1;
        Ok(())
    }

    /// Writes the trailer and fsyncs the file.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        self.out.write_all(&END_MARKER.to_be_bytes())?;
        self.out.write_all(&self.pairs.to_be_bytes())?;
        let crc = self.out.hasher.clone().finalize();
        self.out.inner.write_all(&crc.to_be_bytes())?;
        let file = self
            .out
            .inner
            .finish()?
            .into_inner()
            .map_err(|error| error.into_error())?;
        file.sync_all()?;
        Ok(self.pairs)
    }
}

/// A reader that keeps a running CRC of everything read.
struct ChecksummedReader<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: Read> ChecksummedReader<R> {
    fn exact<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut bytes = [0_u8; N];
        self.inner.read_exact(&mut bytes).map_err(truncated)?;
        self.hasher.update(&bytes);
        Ok(bytes)
    }

    fn bytes(&mut self, length: u32) -> Result<Vec<u8>, StoreError> {
        let mut bytes = vec![0_u8; length as usize];
        self.inner.read_exact(&mut bytes).map_err(truncated)?;
        self.hasher.update(&bytes);
        Ok(bytes)
    }
}

fn truncated(error: io::Error) -> StoreError {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        StoreError::corrupt("snapshot file ends before its trailer")
    } else if error.kind() == io::ErrorKind::InvalidData {
        StoreError::corrupt(format!("snapshot file does not decompress: {error}"))
    } else {
        StoreError::Io(error)
    }
}

/// A snapshot's bytes as stored: compressed, or (an old file) not.
enum Stored<R: BufRead> {
    Plain(R),
    Compressed(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Read for Stored<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Stored::Plain(inner) => inner.read(buffer),
            // zstd reports a damaged frame as an error of kind `Other`: it is damage.
            Stored::Compressed(inner) => inner.read(buffer).map_err(|error| {
                if error.kind() == io::ErrorKind::UnexpectedEof {
                    error
                } else {
                    io::Error::new(io::ErrorKind::InvalidData, error)
                }
            }),
        }
    }
}

/// Reads a snapshot file as a stream: the header, then pairs, then a trailer whose count and
/// CRC are checked. Any damage is a `StoreError`, never a panic (fuzzed: `tests/fuzz`).
pub struct SnapshotReader<R: BufRead = BufReader<File>> {
    input: ChecksummedReader<Stored<R>>,
    pairs: u64,
    finished: bool,
}

impl<R: BufRead> std::fmt::Debug for SnapshotReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("pairs", &self.pairs)
            .finish_non_exhaustive()
    }
}

impl SnapshotReader {
    /// Reads the header; pairs follow through `next_pair`.
    pub fn open(file: File) -> Result<(SnapshotReader, SnapshotMeta), StoreError> {
        SnapshotReader::from_reader(BufReader::with_capacity(IO_BUFFER_BYTES, file))
    }
}

impl<R: BufRead> SnapshotReader<R> {
    /// As `open`, from any buffered reader.
    pub fn from_reader(mut inner: R) -> Result<(SnapshotReader<R>, SnapshotMeta), StoreError> {
        let stored = if inner.fill_buf()?.starts_with(&ZSTD_MAGIC) {
            Stored::Compressed(zstd::stream::read::Decoder::with_buffer(inner)?)
        } else {
            Stored::Plain(inner)
        };
        let mut input = ChecksummedReader {
            inner: stored,
            hasher: crc32fast::Hasher::new(),
        };
        if &input.exact::<8>()? != MAGIC {
            return Err(StoreError::corrupt(
                "not a registry snapshot file (bad magic)",
            ));
        }
        let header_len = u32::from_be_bytes(input.exact::<4>()?);
        if header_len > HEADER_BYTES_MAX {
            return Err(StoreError::corrupt(format!(
                "snapshot header of {header_len} bytes"
            )));
        }
        let header = input.bytes(header_len)?;
        let meta: SnapshotMeta = serde_json::from_slice(&header)
            .map_err(|error| StoreError::corrupt(format!("snapshot header: {error}")))?;
        Ok((
            SnapshotReader {
                input,
                pairs: 0,
                finished: false,
            },
            meta,
        ))
    }

    /// The next pair, or `None` after a trailer whose count and CRC check out.
    pub fn next_pair(&mut self) -> Result<Option<StatePair>, StoreError> {
        assert!(!self.finished, "read past the end of a snapshot");
        let key_len = u32::from_be_bytes(self.input.exact::<4>()?);
        if key_len == END_MARKER {
            self.finished = true;
            let count = u64::from_be_bytes(self.input.exact::<8>()?);
            let computed = self.input.hasher.clone().finalize();
            let mut stored = [0_u8; 4];
            self.input
                .inner
                .read_exact(&mut stored)
                .map_err(truncated)?;
            if count != self.pairs {
                return Err(StoreError::corrupt(format!(
                    "snapshot trailer counts {count} pairs, the file holds {}",
                    self.pairs
                )));
            }
            if u32::from_be_bytes(stored) != computed {
                return Err(StoreError::corrupt("snapshot checksum mismatch"));
            }
            // Nothing may follow the trailer; reading on to the end also makes zstd check the
            // frame's own checksum, which comes after the content.
            let mut after = [0_u8; 1];
            if self.input.inner.read(&mut after).map_err(truncated)? != 0 {
                return Err(StoreError::corrupt("bytes after the snapshot's trailer"));
            }
            return Ok(None);
        }
        let value_len = u32::from_be_bytes(self.input.exact::<4>()?);
        if key_len > KEY_BYTES_MAX || value_len > VALUE_BYTES_MAX {
            return Err(StoreError::corrupt(format!(
                "snapshot pair of {key_len}/{value_len} bytes is over the limits"
            )));
        }
        let key = self.input.bytes(key_len)?;
        let value = self.input.bytes(value_len)?;
        self.pairs += 1;
        Ok(Some((key, value)))
    }
}

/// The pairs of a snapshot file of either format, in key order: a base file (`base.rs`, what
/// builds write since 2026-12-08) or the stream above (older snapshots and backups).
#[derive(Debug)]
pub enum SnapshotPairs<R: BufRead = BufReader<File>> {
    Stream(SnapshotReader<R>),
    Base(crate::base::BaseCursor),
}

impl<R: BufRead> SnapshotPairs<R> {
    /// The next pair, or `None` past the last (for a stream, after its trailer checked out).
    pub fn next_pair(&mut self) -> Result<Option<StatePair>, StoreError> {
        match self {
            SnapshotPairs::Stream(reader) => reader.next_pair(),
            SnapshotPairs::Base(cursor) => cursor.next_pair(),
        }
    }
}

/// Opens a snapshot file of either format: its pairs and its meta. A base file's header,
/// index and block checksums are checked here, a stream's as it is read.
pub fn open_snapshot(file: File) -> Result<(SnapshotPairs, SnapshotMeta), StoreError> {
    use std::os::unix::fs::FileExt;
    let mut prefix = [0_u8; 8];
    let read = file.read_at(&mut prefix, 0)?;
    if crate::base::Base::is_base(&prefix[..read]) {
        let base = std::sync::Arc::new(crate::base::Base::from_file(file)?);
        let meta = base.meta().clone();
        return Ok((SnapshotPairs::Base(base.pairs_from(b"", false)), meta));
    }
    let (reader, meta) = SnapshotReader::open(file)?;
    Ok((SnapshotPairs::Stream(reader), meta))
}

/// As `open_snapshot`, from bytes in memory (the fuzz target).
pub fn snapshot_from_bytes(
    bytes: &[u8],
) -> Result<(SnapshotPairs<&[u8]>, SnapshotMeta), StoreError> {
    if crate::base::Base::is_base(bytes) {
        let base = std::sync::Arc::new(crate::base::Base::from_bytes(bytes.to_vec())?);
        let meta = base.meta().clone();
        return Ok((SnapshotPairs::Base(base.pairs_from(b"", false)), meta));
    }
    let (reader, meta) = SnapshotReader::from_reader(bytes)?;
    Ok((SnapshotPairs::Stream(reader), meta))
}
