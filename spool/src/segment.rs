//! Segment files: naming, the header, batch framing and the recovery scan.
//!
//! ```text
//! segment   = header batch*
//! header    = "SLSP" | version u16 LE (=1) | reserved u16 (=0) | segment id u64 LE   (16 bytes)
//! batch     = len u32 LE | crc32 u32 LE | payload[len]
//! crc32     = crc32fast over the 4 length bytes followed by the payload
//! ```
//!
//! The segment id is repeated in the header so a file copied or renamed by hand is noticed.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::SpoolError;

pub(crate) const MAGIC: [u8; 4] = *b"SLSP";
pub(crate) const VERSION: u16 = 1;
/// Bytes before the first batch of a segment.
pub const SEGMENT_HEADER_LEN: u64 = 16;
/// Bytes before each batch's payload.
pub const BATCH_HEADER_LEN: u64 = 8;
/// Largest payload of one batch. Bounds the allocation a damaged length field could cause.
pub const MAX_BATCH_BYTES: u32 = 256 * 1024 * 1024;

const SUFFIX: &str = ".seg";

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

/// Checks a segment header; the error says what is wrong.
pub(crate) fn check_header(h: &[u8; SEGMENT_HEADER_LEN as usize], id: u64) -> Result<(), String> {
    if h[0..4] != MAGIC {
        return Err(format!(
            "bad magic {:?} (expected \"SLSP\"): not a spool segment",
            &h[0..4]
        ));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(format!(
            "unsupported segment format version {version} (this build reads version {VERSION})"
        ));
    }
    if h[6..8] != [0, 0] {
        return Err("reserved header bytes are not zero".into());
    }
    let stored = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if stored != id {
        return Err(format!(
            "header names segment {stored} but the file name says {id}"
        ));
    }
    Ok(())
}

/// Fills the 8-byte batch header for `payload`.
pub(crate) fn batch_header(payload: &[u8]) -> [u8; BATCH_HEADER_LEN as usize] {
    let len = (payload.len() as u32).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(payload);
    let mut h = [0u8; BATCH_HEADER_LEN as usize];
    h[0..4].copy_from_slice(&len);
    h[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Splits a batch header into (len, crc).
pub(crate) fn parse_batch_header(h: &[u8; BATCH_HEADER_LEN as usize]) -> (u32, u32) {
    let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    (len, crc)
}

pub(crate) fn batch_crc(len: u32, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(payload);
    crc.finalize()
}

/// What the recovery scan found in one segment file.
#[derive(Debug)]
pub(crate) enum Scan {
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

/// Reads a whole segment sequentially and classifies it. Uses a fixed buffer, so a
/// damaged length field cannot cause a large allocation.
pub(crate) fn scan(path: &Path, id: u64) -> Result<Scan, SpoolError> {
    let file = File::open(path).map_err(|e| SpoolError::io("open segment", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| SpoolError::io("stat segment", path, e))?
        .len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let read_err = |e: io::Error| SpoolError::io("read segment", path, e);

    if file_len < SEGMENT_HEADER_LEN {
        // A crash between creating the file and writing its header.
        return Ok(Scan::Torn {
            valid_len: 0,
            file_len,
            batches: 0,
        });
    }
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    r.read_exact(&mut h).map_err(read_err)?;
    if let Err(reason) = check_header(&h, id) {
        return Ok(Scan::Corrupt { offset: 0, reason });
    }

    let mut chunk = vec![0u8; 64 * 1024];
    let mut off = SEGMENT_HEADER_LEN;
    let mut batches = 0u64;
    loop {
        let left = file_len - off;
        if left == 0 {
            return Ok(Scan::Clean { len: off, batches });
        }
        let torn = Scan::Torn {
            valid_len: off,
            file_len,
            batches,
        };
        if left < BATCH_HEADER_LEN {
            return Ok(torn);
        }
        let mut bh = [0u8; BATCH_HEADER_LEN as usize];
        r.read_exact(&mut bh).map_err(read_err)?;
        let (len, crc) = parse_batch_header(&bh);
        let end = off + BATCH_HEADER_LEN + u64::from(len);
        if end > file_len {
            // The write of this batch did not finish.
            return Ok(torn);
        }
        if len > MAX_BATCH_BYTES {
            return Ok(Scan::Corrupt {
                offset: off,
                reason: format!("batch length {len} exceeds the limit of {MAX_BATCH_BYTES}"),
            });
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&bh[0..4]);
        let mut remaining = len as usize;
        while remaining > 0 {
            let n = remaining.min(chunk.len());
            r.read_exact(&mut chunk[..n]).map_err(read_err)?;
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
            if rest_is_zero(&mut r, &mut chunk).map_err(read_err)? {
                return Ok(torn);
            }
            return Ok(Scan::Corrupt {
                offset: off,
                reason: "checksum mismatch with more data after it".into(),
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
    fn batch_header_crc_covers_length() {
        let h = batch_header(b"abc");
        let (len, crc) = parse_batch_header(&h);
        assert_eq!(len, 3);
        assert_eq!(crc, batch_crc(3, b"abc"));
        assert_ne!(crc, crc32fast::hash(b"abc"));
    }
}
