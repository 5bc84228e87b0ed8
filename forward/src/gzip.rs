//! gzip, the one way sluice compresses and inflates: the entries of a
//! CompressedPackedForward frame (agent, tests, tools), the relay's inflater with its
//! decompression cap, and the NDJSON objects the relay's object sink writes.
//!
//! Levels are part of the behaviour (chunk sizes, CPU per event), so each helper keeps
//! the one its callers always used: [`gzip_entries`] the default level, the agent's
//! [`Gzip`] and the object sink's [`GzipWriter`] the fast one.

use std::io::{self, Write};

use flate2::write::GzEncoder;
use flate2::Compression;
use flate2::{Decompress, FlushDecompress, Status};

use crate::error::DecodeError;

/// Gzips entries for [`encode_compressed_packed_forward`](crate::encode_compressed_packed_forward),
/// at the default level, in one member.
pub fn gzip_entries(entries: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(
        Vec::with_capacity(entries.len() / 4 + 64),
        Compression::default(),
    );
    // Writing into a Vec cannot fail.
    gz.write_all(entries).expect("gzip into a Vec");
    gz.finish().expect("gzip into a Vec")
}

/// gzip with one deflate state for all chunks. A fresh compressor per chunk allocates and
/// frees a few hundred KiB every time, which only churns (and fragments) the heap.
pub struct Gzip {
    deflate: flate2::Compress,
    out: Vec<u8>,
}

impl Default for Gzip {
    fn default() -> Gzip {
        Gzip {
            deflate: flate2::Compress::new(Compression::fast(), false),
            out: Vec::new(),
        }
    }
}

impl Gzip {
    /// `input` as one gzip member (RFC 1952), in a buffer reused by the next call.
    pub fn compress(&mut self, input: &[u8]) -> &[u8] {
        // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=unknown
        const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        self.out.clear();
        self.out.extend_from_slice(&HEADER);
        self.deflate.reset();
        let mut consumed = 0;
        loop {
            self.out.reserve((input.len() - consumed) / 2 + 4096);
            let before = self.deflate.total_in();
            let status = self.deflate.compress_vec(
                &input[consumed..],
                &mut self.out,
                flate2::FlushCompress::Finish,
            );
            consumed += (self.deflate.total_in() - before) as usize;
            match status {
                Ok(flate2::Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) => {
                    // Cannot happen with a valid state; never send a broken member.
                    tracing::error!(error = %e, "deflate failed; compressing this chunk afresh");
                    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
                    let _ = gz.write_all(input);
                    self.out = gz.finish().unwrap_or_default();
                    return &self.out;
                }
            }
        }
        let mut crc = flate2::Crc::new();
        crc.update(input);
        self.out.extend_from_slice(&crc.sum().to_le_bytes());
        self.out
            .extend_from_slice(&(input.len() as u32).to_le_bytes());
        &self.out
    }
}

/// A gzip member written piece by piece (the object sink's NDJSON lines), at the fast
/// level, into memory.
pub struct GzipWriter(GzEncoder<Vec<u8>>);

impl GzipWriter {
    /// `capacity`: bytes of compressed output to allocate up front.
    pub fn with_capacity(capacity: usize) -> Self {
        GzipWriter(GzEncoder::new(
            Vec::with_capacity(capacity),
            Compression::fast(),
        ))
    }

    /// The whole member, trailer included.
    pub fn finish(self) -> io::Result<Vec<u8>> {
        self.0.finish()
    }
}

impl Write for GzipWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

// ---- inflating ----------------------------------------------------------------------------

/// The uncompressed size the last gzip member's trailer (ISIZE) announces; 0 if `data`
/// is too short to have one. Exact for a single member, a hint otherwise.
pub(crate) fn trailer_size(data: &[u8]) -> usize {
    match data.len().checked_sub(4) {
        Some(at) => {
            u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize
        }
        None => 0,
    }
}

/// Gunzips at most `limit` bytes. The output buffer starts at the size the gzip trailer
/// announces (exact for one member, as sluice agents send) and otherwise doubles, but
/// never to more than `limit + 1` bytes, whatever the input claims.
pub fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    // Sized from the last member's ISIZE trailer (right for the usual single member),
    // never past the limit; decompress_vec writes into spare capacity, so nothing is
    // zeroed first, and crc32fast checks each member with the CPU's CRC instructions.
    let announced = trailer_size(data);
    let cap = limit.saturating_add(1);
    let mut out = Vec::with_capacity(announced.max(4096).min(cap));
    let mut rest = data;
    // Concatenated gzip members, as Fluent Bit sends them.
    loop {
        let member_start = out.len();
        let header = gzip_header_len(rest)?;
        let body = &rest[header..];
        let mut z = Decompress::new(false);
        loop {
            if out.len() == out.capacity() {
                if out.capacity() >= cap {
                    return Err(DecodeError::DecompressedTooLarge { limit });
                }
                let target = (out.capacity() * 2).min(cap);
                out.reserve_exact(target - out.len());
            }
            let (in_before, out_before) = (z.total_in(), out.len());
            let status = z
                .decompress_vec(
                    &body[z.total_in() as usize..],
                    &mut out,
                    FlushDecompress::None,
                )
                .map_err(|e| gzip_error(format!("corrupt deflate data: {e}")))?;
            if status == Status::StreamEnd {
                break;
            }
            if z.total_in() == in_before && out.len() == out_before && out.len() < out.capacity() {
                return Err(gzip_error(
                    "gzip member ends before its deflate stream does",
                ));
            }
        }
        let trailer_at = header + z.total_in() as usize;
        let trailer = rest
            .get(trailer_at..trailer_at + 8)
            .ok_or_else(|| gzip_error("gzip member without its CRC32/ISIZE trailer"))?;
        let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let size = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
        let produced = &out[member_start..];
        if crc32fast::hash(produced) != crc {
            return Err(gzip_error("gzip CRC32 mismatch: the data is corrupt"));
        }
        if produced.len() as u32 != size {
            return Err(gzip_error("gzip ISIZE mismatch: the data is corrupt"));
        }
        rest = &rest[trailer_at + 8..];
        if rest.is_empty() {
            break;
        }
    }
    if out.len() > limit {
        return Err(DecodeError::DecompressedTooLarge { limit });
    }
    Ok(out)
}

pub(crate) fn gzip_error(message: impl Into<String>) -> DecodeError {
    DecodeError::Gzip(io::Error::new(io::ErrorKind::InvalidData, message.into()))
}

/// Length of a gzip member header (RFC 1952), with its optional fields.
fn gzip_header_len(d: &[u8]) -> Result<usize, DecodeError> {
    if d.len() < 10 || d[0] != 0x1f || d[1] != 0x8b {
        return Err(gzip_error("not gzip data (no 1f 8b magic)"));
    }
    if d[2] != 8 {
        return Err(gzip_error(format!(
            "gzip compression method {} is not deflate",
            d[2]
        )));
    }
    let flags = d[3];
    let mut at = 10usize;
    let short = || gzip_error("gzip header cut short");
    if flags & 0x04 != 0 {
        let len = d.get(at..at + 2).ok_or_else(short)?;
        at += 2 + u16::from_le_bytes([len[0], len[1]]) as usize;
    }
    for flag in [0x08, 0x10] {
        if flags & flag != 0 {
            let nul = d
                .get(at..)
                .ok_or_else(short)?
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(short)?;
            at += nul + 1;
        }
    }
    if flags & 0x02 != 0 {
        at += 2;
    }
    if at > d.len() {
        return Err(short());
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn gzip_members_decode_and_the_state_is_reused() {
        let mut gzip = Gzip::default();
        let big: Vec<u8> = (0..3_000_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for input in [&b"hello, world\n"[..], &big, b"", b"again"] {
            let member = gzip.compress(input).to_vec();
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&member[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, input);
            assert_eq!(gunzip(&member, input.len()).unwrap(), input);
        }
    }

    #[test]
    fn every_compressor_inflates_within_the_cap_only() {
        let input = b"{\"message\":\"hello\"}\n".repeat(100);
        let mut writer = GzipWriter::with_capacity(16);
        writer.write_all(&input).unwrap();
        let streamed = writer.finish().unwrap();
        for member in [gzip_entries(&input), streamed] {
            assert_eq!(gunzip(&member, input.len()).unwrap(), input);
            assert!(matches!(
                gunzip(&member, input.len() - 1),
                Err(DecodeError::DecompressedTooLarge { .. })
            ));
        }
    }
}
