//! gzip, the one way sluice compresses and inflates: the entries of a
//! CompressedPackedForward frame (agent, tests, tools), the relay's inflater with its
//! decompression cap, and the NDJSON objects the relay's object sink writes.
//!
//! Whole buffers go through libraries that work on a buffer at once: the agent's chunks
//! through ISA-L's igzip at level 1 (about twice libdeflate level 1's speed, 4-5% larger
//! output), the relay's frames through libdeflate (about 1.5 times zlib-rs's inflate
//! speed); see bench/RESULTS.md, "Compression", and `sluice-gzip-compare`. The object
//! sink's lines, a stream, go through igzip's streaming API ([`GzipWriter`]).
//!
//! Levels are part of the behaviour (chunk sizes, CPU per event), so each helper keeps
//! the one its callers always used: [`gzip_entries`] the default level, the agent's
//! [`Gzip`] and the object sink's [`GzipWriter`] the fast one.

use std::io::{self, Write};

use flate2::write::GzEncoder;
use flate2::Compression;
use flate2::{Decompress, FlushDecompress, Status};
use isal_sys::igzip_lib::{
    isal_deflate, isal_deflate_init, isal_deflate_stateless, isal_deflate_stateless_init,
    isal_zstate_state_ZSTATE_END, isal_zstream, COMP_OK, IGZIP_GZIP, ISAL_DEF_LVL1_DEFAULT,
    NO_FLUSH,
};

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

/// gzip at level 1 for the agent's chunks: ISA-L's igzip, one-shot ("stateless"), with
/// one stream, one level buffer and one output buffer reused for all chunks (a fresh
/// compressor per chunk allocates and frees a few hundred KiB every time).
///
/// igzip level 1 compresses log chunks at about twice libdeflate level 1's speed for a
/// 4-5% larger output, and the agent spends most of its CPU here (bench/RESULTS.md,
/// "Compression"). Any inflater reads it: it is one plain RFC 1952 member.
pub struct Gzip {
    // 82 KiB of C state: on the heap, and never moved while ISA-L holds pointers into
    // it (only during a call).
    stream: Box<isal_zstream>,
    level_buf: Vec<u8>,
    out: Vec<u8>,
}

/// Bytes of output that always hold a member of `len` input bytes: stored blocks cost 5
/// bytes per 64 KiB at worst, plus the gzip header, trailer and a block header.
fn gzip_bound(len: usize) -> usize {
    len + len / 4096 + 1024
}

impl Default for Gzip {
    fn default() -> Gzip {
        // SAFETY: isal_zstream is plain C data (integers and pointers); all zeroes is
        // what `isal_deflate_stateless_init` expects to start from, and it sets the rest.
        let stream: Box<isal_zstream> = unsafe { Box::new(std::mem::zeroed()) };
        Gzip {
            stream,
            level_buf: vec![0; ISAL_DEF_LVL1_DEFAULT as usize],
            out: Vec::new(),
        }
    }
}

impl Gzip {
    /// `input` as one gzip member (RFC 1952), in a buffer reused by the next call.
    pub fn compress(&mut self, input: &[u8]) -> &[u8] {
        let bound = gzip_bound(input.len());
        if self.out.len() < bound {
            // Zeroed once up to the largest chunk seen, then reused.
            self.out.resize(bound, 0);
        }
        match self.igzip(input) {
            Some(n) => &self.out[..n],
            None => {
                // Cannot happen with a buffer of the bound's size and a chunk under 4
                // GiB; never send a broken member.
                tracing::error!(
                    len = input.len(),
                    "igzip failed; compressing this chunk with flate2"
                );
                let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
                let _ = gz.write_all(input);
                self.out = gz.finish().unwrap_or_default();
                &self.out
            }
        }
    }

    /// One call of `isal_deflate_stateless` over all of `input` into `self.out`; the
    /// member's length, or None if ISA-L refused.
    fn igzip(&mut self, input: &[u8]) -> Option<usize> {
        let (avail_in, avail_out) = (
            u32::try_from(input.len()).ok()?,
            u32::try_from(self.out.len()).ok()?,
        );
        let s = &mut *self.stream;
        // SAFETY: `s` is a valid, exclusively borrowed isal_zstream. The pointers set
        // below stay valid for the call: `input` is borrowed, `self.out` and
        // `self.level_buf` are not touched until it returns, and ISA-L only reads
        // `next_in` although its type is `*mut`.
        unsafe {
            isal_deflate_stateless_init(s);
            s.level = 1;
            s.level_buf = self.level_buf.as_mut_ptr();
            s.level_buf_size = self.level_buf.len() as u32;
            s.gzip_flag = IGZIP_GZIP as u16;
            s.flush = NO_FLUSH as u16;
            s.end_of_stream = 1;
            s.next_in = input.as_ptr() as *mut u8;
            s.avail_in = avail_in;
            s.next_out = self.out.as_mut_ptr();
            s.avail_out = avail_out;
            let rc = isal_deflate_stateless(s);
            let done = rc == COMP_OK as i32 && s.avail_in == 0;
            let n = s.total_out as usize;
            // No pointer into our buffers outlives the call.
            s.next_in = std::ptr::null_mut();
            s.next_out = std::ptr::null_mut();
            s.level_buf = std::ptr::null_mut();
            done.then_some(n)
        }
    }
}

// SAFETY: the stream's pointers are null between calls (set only for the duration of
// `igzip`, which takes `&mut self`), so a Gzip owns nothing thread-bound.
unsafe impl Send for Gzip {}

/// A gzip member written piece by piece (the object sink's NDJSON lines) into `W`: ISA-L's
/// igzip at level 1 as a stream (`isal_deflate`), one member however many writes, each
/// write's output handed to `W` as it comes (in pieces of at most 64 KiB).
///
/// An error (from ISA-L or from `W`) ends the writer: input already taken may not have
/// reached `W`, so every later call fails too (the object sink then fails the delivery
/// and repeats it from the spool). Dropped without `finish`, the member has no trailer.
///
/// Against flate2's fast level (zlib-rs) on the same lines it compresses at about twice
/// the speed for a somewhat better ratio (bench/RESULTS.md, "object sink"). Memory: the
/// C state (~82 KiB), the level buffer (276 KiB) and the 64 KiB output buffer, about what
/// zlib-rs held (~420 KiB).
pub struct GzipWriter<W: Write> {
    // On the heap and never moved while ISA-L holds pointers into it (only during a
    // call); `level_buf` is set once and lives as long as the stream.
    stream: Box<isal_zstream>,
    _level_buf: Vec<u8>,
    out: Vec<u8>,
    inner: Option<W>,
}

impl<W: Write> GzipWriter<W> {
    pub fn new(inner: W) -> Self {
        // SAFETY: as in `Gzip::default`: all zeroes is plain C data, and
        // `isal_deflate_init` sets what a stream needs.
        let mut stream: Box<isal_zstream> = unsafe { Box::new(std::mem::zeroed()) };
        let mut level_buf = vec![0; ISAL_DEF_LVL1_DEFAULT as usize];
        // SAFETY: `stream` is valid and exclusively ours; `level_buf`'s heap buffer is
        // owned by the writer beside the stream and never reallocated, so the pointer
        // stays valid as long as the stream is used.
        unsafe {
            isal_deflate_init(&mut *stream);
            stream.level = 1;
            stream.level_buf = level_buf.as_mut_ptr();
            stream.level_buf_size = level_buf.len() as u32;
            stream.gzip_flag = IGZIP_GZIP as u16;
            stream.flush = NO_FLUSH as u16;
        }
        GzipWriter {
            stream,
            _level_buf: level_buf,
            out: vec![0; 1 << 16],
            inner: Some(inner),
        }
    }

    /// Compresses all of `input` (and with `end`, ends the member), handing what each
    /// `isal_deflate` call produced to the inner writer.
    fn deflate(&mut self, input: &[u8], end: bool) -> io::Result<()> {
        let inner = self
            .inner
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip member already finished or failed"))?;
        let avail_in = u32::try_from(input.len())
            .map_err(|_| io::Error::other("a gzip write of 4 GiB or more"))?;
        let s = &mut *self.stream;
        s.next_in = input.as_ptr() as *mut u8;
        s.avail_in = avail_in;
        s.end_of_stream = u16::from(end);
        loop {
            s.next_out = self.out.as_mut_ptr();
            s.avail_out = self.out.len() as u32;
            // SAFETY: `s` is valid and exclusively borrowed; `next_in` points into
            // `input` (borrowed for this call; ISA-L only reads it), `next_out` into
            // `self.out` (not touched until the call returns), `level_buf` into the
            // writer's own buffer.
            let rc = unsafe { isal_deflate(s) };
            let produced = self.out.len() - s.avail_out as usize;
            s.next_out = std::ptr::null_mut();
            let written = match rc == COMP_OK as i32 {
                true => inner.write_all(&self.out[..produced]),
                false => Err(io::Error::other(format!("igzip failed (code {rc})"))),
            };
            if let Err(e) = written {
                s.next_in = std::ptr::null_mut();
                self.inner = None;
                return Err(e);
            }
            let done = if end {
                s.internal_state.state == isal_zstate_state_ZSTATE_END
            } else {
                // All input taken, and room was left: nothing more is pending output.
                s.avail_in == 0 && s.avail_out > 0
            };
            if done {
                s.next_in = std::ptr::null_mut();
                return Ok(());
            }
        }
    }

    /// Ends the member (trailer included) and gives back the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.deflate(&[], true)?;
        Ok(self.inner.take().expect("taken only here"))
    }
}

impl<W: Write> Write for GzipWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.deflate(buf, false)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Nothing is forced out of the compressor (that would cost ratio); what it gave
        // is in the inner writer already.
        self.inner.as_mut().map_or(Ok(()), Write::flush)
    }
}

// SAFETY: between calls the stream points only into memory the writer owns on the heap
// (`level_buf`, stale bit-buffer pointers into `out`) or into ISA-L's static tables, all of
// which move with it or never move; `next_in`/`next_out` are null. Not `Sync`.
unsafe impl<W: Write + Send> Send for GzipWriter<W> {}

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

/// Gunzips at most `limit` bytes, every member of `data` (Fluent Bit sends several).
/// The output buffer starts at the size the last member's trailer announces (exact for
/// one member, as sluice agents send) and doubles when a member needs more, re-inflating
/// that member, but never to more than `limit + 1` bytes, whatever the input claims: a
/// bomb costs at most about twice the work of a limit-sized frame.
pub fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let cap = limit.saturating_add(1);
    let mut out = inflate_buffer(trailer_size(data).max(4096).min(cap));
    let mut rest = data;
    loop {
        match INFLATER.with(|d| d.member(rest, &mut out, cap)) {
            Inflated::Member(consumed) => {
                rest = &rest[consumed..];
                if rest.is_empty() {
                    break;
                }
            }
            Inflated::NoRoom => {
                if out.capacity() >= cap {
                    recycle(out);
                    return Err(DecodeError::DecompressedTooLarge { limit });
                }
                let target = (out.capacity() * 2).min(cap);
                out.reserve_exact(target - out.len());
            }
            // libdeflate says only "bad data": the streaming inflater names the cause
            // (and is the arbiter, should the two ever disagree).
            Inflated::Bad => {
                recycle(out);
                return gunzip_streaming(data, limit);
            }
        }
    }
    if out.len() > limit {
        recycle(out);
        return Err(DecodeError::DecompressedTooLarge { limit });
    }
    Ok(out)
}

/// Inflated buffers handed back by [`recycle`] for the next frames. A fresh buffer per
/// frame cost the relay a page fault and a zeroed page for every 4 KiB it inflated (9%
/// of its CPU at 2 M events/s, bench/RESULTS.md, issue 16). At most
/// `SPARE_BUFFERS` of at most `SPARE_MAX` bytes each are kept: memory outside the
/// relay's ingest budget, [`RECYCLED_MAX_BYTES`] in all.
static SPARE: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
const SPARE_BUFFERS: usize = 8;
/// An agent's 1 MiB chunk, inflated, fits; larger frames are not kept.
const SPARE_MAX: usize = 2 << 20;
/// The most memory buffers handed to [`recycle`] hold while they wait for reuse.
pub const RECYCLED_MAX_BYTES: usize = SPARE_BUFFERS * SPARE_MAX;

/// An empty buffer with room for `want` bytes, reused if one was handed back.
fn inflate_buffer(want: usize) -> Vec<u8> {
    let reused = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
    match reused {
        Some(mut b) => {
            b.reserve_exact(want);
            b
        }
        None => Vec::with_capacity(want),
    }
}

/// Hands back a buffer [`gunzip`] returned (an [`EventBatch`](crate::EventBatch)'s
/// entries once they are spooled), for the next frame to inflate into.
pub fn recycle(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > SPARE_MAX {
        return;
    }
    buf.clear();
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    if spare.len() < SPARE_BUFFERS {
        spare.push(buf);
    }
}

enum Inflated {
    /// One member inflated and appended; this many input bytes were its.
    Member(usize),
    /// The member does not fit in the spare capacity; nothing was appended.
    NoRoom,
    Bad,
}

/// One libdeflate decompressor per thread (the relay's decode pool, the agent's tests).
struct Inflater(std::ptr::NonNull<libdeflate_sys::libdeflate_decompressor>);

thread_local! {
    static INFLATER: Inflater = Inflater::new();
}

impl Inflater {
    fn new() -> Inflater {
        // SAFETY: a plain allocation; null only when out of memory.
        let p = unsafe { libdeflate_sys::libdeflate_alloc_decompressor() };
        Inflater(std::ptr::NonNull::new(p).expect("libdeflate: out of memory"))
    }

    /// Inflates the gzip member at the start of `data` into `out`'s spare capacity, but
    /// not past `cap` bytes of `out` in all (a reused buffer may be larger).
    fn member(&self, data: &[u8], out: &mut Vec<u8>, cap: usize) -> Inflated {
        let spare = out.capacity().min(cap).saturating_sub(out.len());
        let (mut consumed, mut produced) = (0usize, 0usize);
        // SAFETY: libdeflate reads at most `data.len()` bytes of `data` and writes at
        // most `spare` bytes from `out`'s end, which `out` has allocated; `produced` bytes
        // are initialised when it reports success, and only then is the length set. The
        // decompressor is this thread's own.
        let result = unsafe {
            libdeflate_sys::libdeflate_gzip_decompress_ex(
                self.0.as_ptr(),
                data.as_ptr().cast(),
                data.len(),
                out.as_mut_ptr().add(out.len()).cast(),
                spare,
                &mut consumed,
                &mut produced,
            )
        };
        match result {
            libdeflate_sys::libdeflate_result_LIBDEFLATE_SUCCESS if produced <= spare => {
                // SAFETY: see above.
                unsafe { out.set_len(out.len() + produced) };
                Inflated::Member(consumed)
            }
            libdeflate_sys::libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE => Inflated::NoRoom,
            _ => Inflated::Bad,
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: allocated by libdeflate_alloc_decompressor, freed once.
        unsafe { libdeflate_sys::libdeflate_free_decompressor(self.0.as_ptr()) }
    }
}

/// [`gunzip`] by flate2's streaming inflater, which tells what is wrong with a member.
fn gunzip_streaming(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
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
    fn chunks_are_compressed_not_just_wrapped() {
        // Log-like text, varied enough that stored blocks would show: level 0 (stored)
        // once passed for level 1 here, and every other test still held.
        let text: Vec<u8> = (0..20_000u32)
            .flat_map(|i| {
                format!(
                    "10.0.{}.{} - - \"GET /api/v1/items/{} HTTP/1.1\" 200 {}\n",
                    i % 256,
                    i % 97,
                    i * 7,
                    i * 13
                )
                .into_bytes()
            })
            .collect();
        let mut gzip = Gzip::default();
        let n = gzip.compress(&text).len();
        assert!(n * 3 < text.len(), "{} bytes gzipped to {n}", text.len());
    }

    #[test]
    fn every_member_is_inflated_even_when_members_are_alike() {
        // libdeflate's plain call stops after the first member and says nothing of the
        // rest: two equal members (whose last trailer matches the first) must still
        // give both.
        let a = gzip_entries(b"same records");
        let b = Gzip::default().compress(b"other").to_vec();
        for (frame, want) in [
            (
                [a.clone(), a.clone()].concat(),
                &b"same recordssame records"[..],
            ),
            (
                [a.clone(), b.clone(), a.clone()].concat(),
                b"same recordsothersame records",
            ),
        ] {
            assert_eq!(gunzip(&frame, 1 << 20).unwrap(), want);
        }
        // The first member bigger than the last one's trailer announces: the buffer grows.
        let big = vec![7u8; 100_000];
        let frame = [gzip_entries(&big), b.clone()].concat();
        let out = gunzip(&frame, 1 << 20).unwrap();
        assert_eq!(out.len(), 100_005);
        assert!(matches!(
            gunzip(&frame, 100_004),
            Err(DecodeError::DecompressedTooLarge { limit: 100_004 })
        ));
    }

    #[test]
    fn a_recycled_buffer_is_reused_and_never_lifts_the_cap() {
        let member = gzip_entries(&vec![3u8; 2 << 20]);
        // Room for the whole 2 MiB, but the limit is 1 MiB: refused all the same.
        recycle(Vec::with_capacity(SPARE_MAX));
        assert!(matches!(
            gunzip(&member, 1 << 20),
            Err(DecodeError::DecompressedTooLarge { limit }) if limit == 1 << 20
        ));
        let out = gunzip(&member, 4 << 20).unwrap();
        assert_eq!(out, vec![3u8; 2 << 20]);
        recycle(out);
        // What follows inflates into the recycled buffer (or a fresh one, should a test
        // running beside this one have taken it): the same answer either way.
        assert_eq!(gunzip(&gzip_entries(b"tiny"), 1 << 20).unwrap(), b"tiny");
    }

    #[test]
    fn a_trailer_that_lies_low_is_stopped_at_the_cap() {
        let mut bomb = gzip_entries(&vec![0u8; 8 << 20]);
        let n = bomb.len();
        bomb[n - 4..].copy_from_slice(&1024u32.to_le_bytes());
        assert!(matches!(
            gunzip(&bomb, 1 << 20),
            Err(DecodeError::DecompressedTooLarge { .. })
        ));
    }

    #[test]
    fn damage_is_named_by_its_cause() {
        let good = gzip_entries(b"hello, world, hello, world");
        let mut crc = good.clone();
        let n = crc.len();
        crc[n - 8] ^= 1;
        let mut cut = good.clone();
        cut.truncate(n - 3);
        for (data, why) in [
            (&b"plain text"[..], "no 1f 8b magic"),
            (&crc, "CRC32 mismatch"),
            (&cut, "without its CRC32/ISIZE trailer"),
        ] {
            let e = gunzip(data, 1 << 20).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    /// Log-like lines that gzip about 4x, and a stretch that does not compress at all.
    fn lines_and_noise() -> Vec<u8> {
        let mut data = Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..40_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(
                format!(
                    "{{\"n\":{i},\"path\":\"/api/{}\",\"id\":\"{x:016x}\"}}\n",
                    x % 977
                )
                .as_bytes(),
            );
            if i == 20_000 {
                for _ in 0..(1 << 17) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    data.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        data
    }

    /// One member however the input is cut, read whole by zlib-rs (flate2) and by our
    /// libdeflate gunzip: writes of 0, 1, 7 and 100 bytes, 64 KiB, and 1 MiB of noise in one
    /// write (more output than the writer's buffer).
    #[test]
    fn the_streaming_writer_makes_one_member_other_inflaters_read() {
        use std::io::Read;
        let data = lines_and_noise();
        for cut in [0usize, 1, 7, 100, 1 << 16, 3 << 20] {
            let mut w = GzipWriter::new(Vec::new());
            let mut at = 0;
            while at < data.len() {
                let n = cut.max(1).min(data.len() - at);
                if cut == 0 {
                    w.write_all(&[]).unwrap();
                }
                w.write_all(&data[at..at + n]).unwrap();
                at += n;
            }
            let member = w.finish().unwrap();
            let mut back = Vec::new();
            let mut d = flate2::read::GzDecoder::new(&member[..]);
            d.read_to_end(&mut back).unwrap();
            assert!(
                back == data,
                "cut {cut}: flate2 read {} of {} bytes",
                back.len(),
                data.len()
            );
            assert_eq!(
                d.into_inner().len(),
                0,
                "cut {cut}: one member, nothing after it"
            );
            assert!(gunzip(&member, data.len()).unwrap() == data, "cut {cut}");
            assert!(
                member.len() < data.len() * 2 / 3,
                "cut {cut}: {} bytes",
                member.len()
            );
        }
        let empty = GzipWriter::new(Vec::new()).finish().unwrap();
        assert_eq!(gunzip(&empty, 0).unwrap(), b"");
    }

    /// After the inner writer fails, the member cannot be trusted: every later call fails.
    #[test]
    fn the_streaming_writer_stops_at_the_first_error() {
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0 < buf.len() {
                    return Err(io::Error::other("disk full"));
                }
                self.0 -= buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let data = lines_and_noise();
        let mut w = GzipWriter::new(Full(100_000));
        let e = data
            .chunks(1 << 16)
            .find_map(|c| w.write_all(c).err())
            .expect("fails once full");
        assert_eq!(e.to_string(), "disk full");
        let again = w.write_all(b"more\n").unwrap_err().to_string();
        assert!(again.contains("finished or failed"), "{again}");
        assert!(w.finish().is_err());
    }

    #[test]
    fn every_compressor_inflates_within_the_cap_only() {
        let input = b"{\"message\":\"hello\"}\n".repeat(100);
        let mut writer = GzipWriter::new(Vec::new());
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
