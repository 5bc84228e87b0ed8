//! Segment files: naming, the header, batch framing, the recovery scan and the resync
//! scan that finds the next valid batch after damage.
//!
//! ```text
//! segment    = header batch*
//! header     = "SLSP" | version u16 LE | reserved u16 (=0) | segment id u64 LE        (16 bytes)
//!
//! version 2 (written by this build):
//! batch      = "SLB2" | len u32 LE | committed.segment u64 LE | committed.offset u64 LE
//!              | payload crc32 u32 LE | header crc32 u32 LE | payload[len]            (32-byte header)
//! header crc = crc32fast over the header's first 28 bytes, then the batch's own segment id
//!              and offset (u64 LE each; implied by where the batch is, not stored)
//! payload crc = crc32fast over the payload
//! committed  = the spool's committed end when the batch was appended: everything before it
//!              had been committed (and so acknowledged) by then
//!
//! version 1 (read only):
//! batch      = len u32 LE | crc32 u32 LE (over the 4 length bytes, then the payload) | payload[len]
//! ```
//!
//! Why version 2: a version 1 batch has nothing to look for, so one damaged length field
//! hides every batch after it. A version 2 header can be found again by its magic and
//! proven by its own checksum, so a scan resynchronises on the next valid batch and
//! damage costs only the batches it touched. The header checksum binds the header to
//! its place: a batch header that appears inside a payload (a log line can contain any
//! bytes) does not validate anywhere but where the writer put it. A damaged payload
//! under a valid header costs exactly that batch: its length is trusted, so the scan
//! never looks for batches inside it. The committed mark lets recovery say whether
//! damaged bytes had been acknowledged (see `spool.rs`).
//!
//! The segment id is repeated in the header so a file copied or renamed by hand is
//! noticed. A spool written by an older build keeps its version 1 segments readable;
//! the writer starts a version 2 segment rather than appending to one.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{Position, SpoolError};

pub(crate) const MAGIC: [u8; 4] = *b"SLSP";
/// The segment format this build writes.
pub(crate) const VERSION: u16 = 2;
/// Bytes before the first batch of a segment (both versions).
pub const SEGMENT_HEADER_LEN: u64 = 16;
/// Bytes before each batch's payload (version 2, the format written).
pub const BATCH_HEADER_LEN: u64 = 32;
pub(crate) const BATCH_HEADER_LEN_V1: u64 = 8;
pub(crate) const BATCH_MAGIC: [u8; 4] = *b"SLB2";
/// Largest payload of one batch. Bounds the allocation a damaged length field could cause.
pub const MAX_BATCH_BYTES: u32 = 256 * 1024 * 1024;

const SUFFIX: &str = ".seg";

/// A segment's batch framing, from its header's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// Length and CRC only: damage cannot be resynchronised past.
    V1,
    /// Magic, length, committed mark, payload CRC, header CRC.
    V2,
}

pub(crate) fn file_name(id: u64) -> String {
    format!("{id:020}{SUFFIX}")
}

pub(crate) fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(file_name(id))
}

/// The id of a segment file name, or None for any other file.
pub(crate) fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn header(id: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&id.to_le_bytes());
    h
}

/// Checks a segment header and returns its batch format; the error says what is wrong.
pub(crate) fn check_header(
    h: &[u8; SEGMENT_HEADER_LEN as usize],
    id: u64,
) -> Result<Format, String> {
    if h[0..4] != MAGIC {
        return Err(format!(
            "bad magic {:?} (expected \"SLSP\"): not a spool segment",
            &h[0..4]
        ));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    let format = match version {
        1 => Format::V1,
        2 => Format::V2,
        _ => {
            return Err(format!(
                "unsupported segment format version {version} (this build reads versions 1 and 2)"
            ))
        }
    };
    if h[6..8] != [0, 0] {
        return Err("reserved header bytes are not zero".into());
    }
    let stored = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if stored != id {
        return Err(format!(
            "header names segment {stored} but the file name says {id}"
        ));
    }
    Ok(format)
}

/// The 32-byte header of a batch written at `at` when the spool's committed end was
/// `committed`.
pub(crate) fn batch_header(
    at: Position,
    committed: Position,
    payload: &[u8],
) -> [u8; BATCH_HEADER_LEN as usize] {
    let mut h = [0u8; BATCH_HEADER_LEN as usize];
    h[0..4].copy_from_slice(&BATCH_MAGIC);
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&committed.segment.to_le_bytes());
    h[16..24].copy_from_slice(&committed.offset.to_le_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let crc = header_crc(&h, at);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn header_crc(h: &[u8; BATCH_HEADER_LEN as usize], at: Position) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[0..28]);
    crc.update(&at.segment.to_le_bytes());
    crc.update(&at.offset.to_le_bytes());
    crc.finalize()
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// What lies at one offset of a version 2 segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// A valid batch; its payload is in the buffer if it was asked for.
    Batch { len: u32, committed: Position },
    /// A header that checks out over a payload that does not: this batch is lost, and
    /// its extent is known.
    BadPayload { len: u32 },
    /// No valid batch header starts here, or its payload would cross the limit.
    NoHeader,
}

impl Probe {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Probe::Batch { .. } => "no damage",
            Probe::BadPayload { .. } => "payload checksum mismatch under a valid batch header",
            Probe::NoHeader => {
                "no valid batch header (bad magic, length or header checksum, or cut short)"
            }
        }
    }
}

/// Reads what is at `off` of segment `seg`, looking no further than `limit`. With `keep`
/// the payload of a valid batch is left in `buf`; without it `buf` is only scratch space
/// and stays small (the recovery scan).
pub(crate) fn probe(
    file: &File,
    seg: u64,
    off: u64,
    limit: u64,
    buf: &mut Vec<u8>,
    keep: bool,
) -> io::Result<Probe> {
    buf.clear();
    if off + BATCH_HEADER_LEN > limit {
        return Ok(Probe::NoHeader);
    }
    let mut h = [0u8; BATCH_HEADER_LEN as usize];
    file.read_exact_at(&mut h, off)?;
    let at = Position {
        segment: seg,
        offset: off,
    };
    if h[0..4] != BATCH_MAGIC || u32_at(&h, 28) != header_crc(&h, at) {
        return Ok(Probe::NoHeader);
    }
    let len = u32_at(&h, 4);
    let start = off + BATCH_HEADER_LEN;
    if len > MAX_BATCH_BYTES || start + u64::from(len) > limit {
        return Ok(Probe::NoHeader);
    }
    let committed = Position {
        segment: u64_at(&h, 8),
        offset: u64_at(&h, 16),
    };
    let crc = if keep {
        buf.resize(len as usize, 0);
        file.read_exact_at(buf, start)?;
        crc32fast::hash(buf)
    } else {
        buf.resize((len as usize).min(64 * 1024), 0);
        let mut hasher = crc32fast::Hasher::new();
        let mut done = 0u64;
        while done < u64::from(len) {
            let n = (u64::from(len) - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], start + done)?;
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        hasher.finalize()
    };
    if crc != u32_at(&h, 24) {
        buf.clear();
        return Ok(Probe::BadPayload { len });
    }
    Ok(Probe::Batch { len, committed })
}

/// Where a damaged stretch ends and how many batches it cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resync {
    /// Offset of the next valid batch, or `limit` if none follows.
    pub next: u64,
    /// Batches lost: every batch whose header was found, plus one for each stretch that
    /// starts where a batch should start. A lower bound when headers were damaged too.
    pub batches: u64,
}

/// Scans forward from `from`, where `first` (not a valid batch) was found, to the next
/// valid batch before `limit`. Never looks inside a batch whose header is valid.
pub(crate) fn resync(
    file: &File,
    seg: u64,
    from: u64,
    first: Probe,
    limit: u64,
    buf: &mut Vec<u8>,
) -> io::Result<Resync> {
    let mut off = from;
    let mut found = first;
    let mut batches = 1;
    loop {
        off = match found {
            Probe::Batch { .. } => return Ok(Resync { next: off, batches }),
            Probe::BadPayload { len } => off + BATCH_HEADER_LEN + u64::from(len),
            Probe::NoHeader => find_magic(file, off + 1, limit, buf)?,
        };
        if off >= limit {
            return Ok(Resync {
                next: limit,
                batches,
            });
        }
        // After a skipped batch the scan stands where the next batch should start.
        let at_boundary = matches!(found, Probe::BadPayload { .. });
        found = probe(file, seg, off, limit, buf, false)?;
        match found {
            Probe::BadPayload { .. } => batches += 1,
            Probe::NoHeader if at_boundary => batches += 1,
            _ => {}
        }
    }
}

/// The offset of the next batch magic at or after `from` (a candidate only), or `limit`.
fn find_magic(file: &File, from: u64, limit: u64, buf: &mut Vec<u8>) -> io::Result<u64> {
    const BLOCK: usize = 64 * 1024;
    buf.resize(BLOCK, 0);
    let mut off = from;
    while off + BATCH_MAGIC.len() as u64 <= limit {
        let n = ((limit - off) as usize).min(BLOCK);
        file.read_exact_at(&mut buf[..n], off)?;
        if let Some(i) = buf[..n].windows(4).position(|w| w == BATCH_MAGIC) {
            return Ok(off + i as u64);
        }
        if off + n as u64 >= limit {
            break;
        }
        // Overlap by three bytes so a magic across two blocks is found.
        off += (n - (BATCH_MAGIC.len() - 1)) as u64;
    }
    Ok(limit)
}

/// Splits a version 1 batch header into (len, crc).
pub(crate) fn parse_batch_header_v1(h: &[u8; BATCH_HEADER_LEN_V1 as usize]) -> (u32, u32) {
    (u32_at(h, 0), u32_at(h, 4))
}

pub(crate) fn batch_crc_v1(len: u32, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(payload);
    crc.finalize()
}

/// What the recovery scan found in one segment file.
#[derive(Debug)]
pub(crate) enum Scan {
    /// The segment header is damaged: nothing in the file can be trusted.
    BadHeader {
        reason: String,
    },
    V1(ScanV1),
    V2(ScanV2),
}

/// A version 1 segment, classified as before version 2 existed.
#[derive(Debug)]
pub(crate) enum ScanV1 {
    /// Every byte belongs to a valid batch.
    Clean { len: u64, batches: u64 },
    /// Valid up to `valid_len`; what follows looks like an interrupted write (an
    /// incomplete header or payload, a bad last batch, or a zero-filled tail).
    Torn {
        valid_len: u64,
        file_len: u64,
        batches: u64,
    },
    /// Damage that an interrupted append cannot explain.
    Corrupt { offset: u64, reason: String },
}

/// A version 2 segment: its valid batches and the stretches between them that hold none.
#[derive(Debug)]
pub(crate) struct ScanV2 {
    pub file_len: u64,
    pub batches: u64,
    pub gaps: Vec<Gap>,
    /// The committed mark of the last valid batch.
    pub last_committed: Option<Position>,
}

/// A stretch of a version 2 segment without a valid batch.
#[derive(Debug, Clone)]
pub(crate) struct Gap {
    pub from: u64,
    pub to: u64,
    pub batches: u64,
    /// Valid batches before it in the segment.
    pub batches_before: u64,
    pub reason: &'static str,
}

/// Reads a whole segment once and classifies it. Uses a bounded buffer, so a damaged
/// length field cannot cause a large allocation.
pub(crate) fn scan(path: &Path, id: u64) -> Result<Scan, SpoolError> {
    let file = File::open(path).map_err(|e| SpoolError::io("open segment", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| SpoolError::io("stat segment", path, e))?
        .len();
    let read_err = |e: io::Error| SpoolError::io("read segment", path, e);
    if file_len < SEGMENT_HEADER_LEN {
        // A crash between creating the file and writing its header.
        return Ok(Scan::V1(ScanV1::Torn {
            valid_len: 0,
            file_len,
            batches: 0,
        }));
    }
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0).map_err(read_err)?;
    match check_header(&h, id) {
        Err(reason) => Ok(Scan::BadHeader { reason }),
        Ok(Format::V1) => scan_v1(file, file_len).map(Scan::V1).map_err(read_err),
        Ok(Format::V2) => scan_v2(&file, id, file_len).map(Scan::V2).map_err(read_err),
    }
}

fn scan_v2(file: &File, id: u64, file_len: u64) -> io::Result<ScanV2> {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut s = ScanV2 {
        file_len,
        batches: 0,
        gaps: Vec::new(),
        last_committed: None,
    };
    let mut off = SEGMENT_HEADER_LEN;
    while off < file_len {
        let found = probe(file, id, off, file_len, &mut buf, false)?;
        if let Probe::Batch { len, committed } = found {
            s.batches += 1;
            s.last_committed = Some(committed);
            off += BATCH_HEADER_LEN + u64::from(len);
            continue;
        }
        let r = resync(file, id, off, found, file_len, &mut buf)?;
        s.gaps.push(Gap {
            from: off,
            to: r.next,
            batches: r.batches,
            batches_before: s.batches,
            reason: found.reason(),
        });
        off = r.next;
    }
    Ok(s)
}

fn scan_v1(file: File, file_len: u64) -> io::Result<ScanV1> {
    let mut r = BufReader::with_capacity(1 << 20, file);
    r.seek_relative(SEGMENT_HEADER_LEN as i64)?;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut off = SEGMENT_HEADER_LEN;
    let mut batches = 0u64;
    loop {
        let left = file_len - off;
        if left == 0 {
            return Ok(ScanV1::Clean { len: off, batches });
        }
        let torn = ScanV1::Torn {
            valid_len: off,
            file_len,
            batches,
        };
        if left < BATCH_HEADER_LEN_V1 {
            return Ok(torn);
        }
        let mut bh = [0u8; BATCH_HEADER_LEN_V1 as usize];
        r.read_exact(&mut bh)?;
        let (len, crc) = parse_batch_header_v1(&bh);
        let end = off + BATCH_HEADER_LEN_V1 + u64::from(len);
        if end > file_len {
            // The write of this batch did not finish.
            return Ok(torn);
        }
        if len > MAX_BATCH_BYTES {
            return Ok(ScanV1::Corrupt {
                offset: off,
                reason: format!("batch length {len} exceeds the limit of {MAX_BATCH_BYTES}"),
            });
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&bh[0..4]);
        let mut remaining = len as usize;
        while remaining > 0 {
            let n = remaining.min(chunk.len());
            r.read_exact(&mut chunk[..n])?;
            hasher.update(&chunk[..n]);
            remaining -= n;
        }
        if hasher.finalize() != crc {
            if end == file_len {
                // The last batch is damaged: an interrupted write.
                return Ok(torn);
            }
            // Some file systems leave a zero-filled tail after a crash: if nothing but
            // zeros follows, it is a torn tail; otherwise real damage in the middle.
            if rest_is_zero(&mut r, &mut chunk)? {
                return Ok(torn);
            }
            return Ok(ScanV1::Corrupt {
                offset: off,
                reason: "checksum mismatch with more data after it (a version 1 segment cannot be resynchronised)".into(),
            });
        }
        batches += 1;
        off = end;
    }
}

fn rest_is_zero(r: &mut impl Read, chunk: &mut [u8]) -> io::Result<bool> {
    loop {
        let n = r.read(chunk)?;
        if n == 0 {
            return Ok(true);
        }
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(file_name(42), "00000000000000000042.seg");
        assert_eq!(parse_name(&file_name(42)), Some(42));
        assert_eq!(parse_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_name("42.seg"), None);
        assert_eq!(parse_name("0000000000000000004x.seg"), None);
        assert_eq!(parse_name("00000000000000000042.seg.corrupt"), None);
    }

    #[test]
    fn header_checks() {
        let h = header(7);
        assert!(check_header(&h, 7).is_ok());
        assert!(check_header(&h, 8).unwrap_err().contains("names segment 7"));
        let mut bad = h;
        bad[4] = 9;
        assert!(check_header(&bad, 7).unwrap_err().contains("version 9"));
        bad = h;
        bad[6] = 1;
        assert!(check_header(&bad, 7).unwrap_err().contains("reserved"));
        bad = h;
        bad[0] = b'X';
        assert!(check_header(&bad, 7).unwrap_err().contains("magic"));
    }

    #[test]
    fn a_batch_header_validates_only_where_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let at = Position {
            segment: 3,
            offset: 16,
        };
        let committed = Position {
            segment: 2,
            offset: 100,
        };
        let mut bytes = vec![0u8; 16];
        bytes.extend_from_slice(&batch_header(at, committed, b"abc"));
        bytes.extend_from_slice(b"abc");
        // The same batch copied to another offset (as a log line could carry it).
        let copy = bytes[16..].to_vec();
        bytes.extend_from_slice(&copy);
        std::fs::write(&path, &bytes).unwrap();
        let f = File::open(&path).unwrap();
        let mut buf = Vec::new();
        let limit = bytes.len() as u64;
        assert_eq!(
            probe(&f, 3, 16, limit, &mut buf, true).unwrap(),
            Probe::Batch { len: 3, committed }
        );
        assert_eq!(buf, b"abc");
        assert_eq!(
            probe(&f, 3, 51, limit, &mut buf, true).unwrap(),
            Probe::NoHeader
        );
        assert_eq!(
            probe(&f, 4, 16, limit, &mut buf, true).unwrap(),
            Probe::NoHeader
        );
        // Cut short by the limit: not a batch (yet).
        assert_eq!(
            probe(&f, 3, 16, 50, &mut buf, true).unwrap(),
            Probe::NoHeader
        );
    }

    #[test]
    fn v1_headers_still_parse() {
        let mut h = header(7);
        h[4] = 1;
        assert_eq!(check_header(&h, 7), Ok(Format::V1));
        assert_eq!(check_header(&header(7), 7), Ok(Format::V2));
        let (len, crc) = parse_batch_header_v1(&[3, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!((len, crc), (3, 1));
        assert_ne!(batch_crc_v1(3, b"abc"), crc32fast::hash(b"abc"));
    }
}
