//! Frames: finding them in the byte stream, the four event modes, options, and the
//! tokio codecs for both ends of a connection.

use std::io::{self, Write};

use bytes::{BufMut, Bytes, BytesMut};
use flate2::write::GzEncoder;
use flate2::Compression;
use flate2::{Decompress, FlushDecompress, Status};
use tokio_util::codec::{Decoder, Encoder};

use super::batch::{
    normalise_entries, push_hour, read_record, read_time, write_entry_header, EventBatch,
};
use super::handshake::{Helo, Ping, Pong};
use super::msgpack::{
    parse_head, scan, write_array_len, write_bin, write_map_len, write_str, write_uint, Head,
    Reader, Scan,
};
use super::{malformed, DecodeError, Limits, MAX_DEPTH};

/// Nesting allowed in a whole frame: frame array, entries array and entry array around
/// a record that may itself nest [`MAX_DEPTH`] levels.
const FRAME_DEPTH: usize = MAX_DEPTH + 3;

/// Key of sluice's provenance in the option map.
const PROVENANCE_KEY: &str = "sluice";

/// Where a batch's events come from, so the relay can drop resent duplicates.
///
/// Travels in the option map as `"sluice": {"src": <str>, "seq": [<uint>, ...]}` with one
/// strictly ascending sequence number per entry; other implementations ignore it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Provenance {
    pub source: String,
    pub seqs: Vec<u64>,
}

/// The option map of an event frame. Keys this codec does not know are skipped.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Options {
    /// Number of entries, as the client declared it.
    pub size: Option<u64>,
    /// Chunk id; the server acknowledges it with `{"ack": chunk}`.
    pub chunk: Option<String>,
    /// `"gzip"` for CompressedPackedForward.
    pub compressed: Option<String>,
    pub provenance: Option<Provenance>,
}

/// What a server reads from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    Events(EventBatch),
    Ping(Ping),
}

/// What a client reads from a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame {
    Helo(Helo),
    Pong(Pong),
    /// The chunk id of an acknowledged frame.
    Ack(String),
}

// ---- framing ----------------------------------------------------------------------------

/// Cuts complete frames out of a connection's read buffer.
#[derive(Clone, Copy, Debug)]
struct Framer {
    limits: Limits,
    /// A lower bound of the size of the frame at the front of the buffer: until that many
    /// bytes are buffered there is no point scanning again (avoids rescanning a large
    /// Forward-mode frame for every read).
    need: usize,
}

impl Framer {
    fn new(limits: Limits) -> Self {
        Framer { limits, need: 0 }
    }

    fn next_frame(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, DecodeError> {
        let limit = self.limits.max_frame_bytes;
        if src.is_empty() || src.len() < self.need {
            return Ok(None);
        }
        match scan(src, FRAME_DEPTH)? {
            Scan::Complete(n) if n > limit => {
                Err(DecodeError::FrameTooLarge { limit, at_least: n })
            }
            Scan::Complete(n) => {
                self.need = 0;
                Ok(Some(src.split_to(n)))
            }
            Scan::Incomplete { at_least } if at_least > limit => {
                Err(DecodeError::FrameTooLarge { limit, at_least })
            }
            Scan::Incomplete { at_least } => {
                self.need = at_least;
                Ok(None)
            }
        }
    }
}

fn eof_check<T>(decoded: Option<T>, buf: &BytesMut) -> Result<Option<T>, DecodeError> {
    match decoded {
        None if !buf.is_empty() => Err(DecodeError::UnexpectedEof {
            buffered: buf.len(),
        }),
        other => Ok(other),
    }
}

/// The server end of a connection: decodes [`ClientFrame`]s, encodes [`ServerFrame`]s.
///
/// Heartbeats (`nil`) are skipped. After an error the stream is out of sync; close it.
///
/// ```
/// use bytes::BytesMut;
/// use sluice_core::forward::*;
/// use tokio_util::codec::Decoder;
///
/// // ["app", 1700000000, {"k": "v"}] in Message mode, arriving in two reads.
/// let wire = b"\x93\xa3app\xce\x65\x53\xf1\x00\x81\xa1k\xa1v";
/// let mut codec = ServerCodec::new(Limits::default());
/// let mut buf = BytesMut::from(&wire[..5]);
/// assert!(codec.decode(&mut buf)?.is_none());
/// buf.extend_from_slice(&wire[5..]);
/// let Some(ClientFrame::Events(batch)) = codec.decode(&mut buf)? else { panic!() };
/// assert_eq!((batch.tag.as_str(), batch.count), ("app", 1));
/// # Ok::<(), DecodeError>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ServerCodec {
    framer: Framer,
}

impl ServerCodec {
    pub fn new(limits: Limits) -> Self {
        ServerCodec {
            framer: Framer::new(limits),
        }
    }
}

impl Decoder for ServerCodec {
    type Item = ClientFrame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ClientFrame>, DecodeError> {
        while let Some(frame) = self.framer.next_frame(src)? {
            if let Some(decoded) = decode_client_frame(&frame, &self.framer.limits)? {
                return Ok(Some(decoded));
            }
        }
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<ClientFrame>, DecodeError> {
        let decoded = self.decode(buf)?;
        eof_check(decoded, buf)
    }
}

impl Encoder<ServerFrame> for ServerCodec {
    type Error = io::Error;

    fn encode(&mut self, frame: ServerFrame, out: &mut BytesMut) -> io::Result<()> {
        match frame {
            ServerFrame::Helo(helo) => helo.encode(out),
            ServerFrame::Pong(pong) => pong.encode(out),
            ServerFrame::Ack(chunk) => encode_ack(&chunk, out),
        }
        Ok(())
    }
}

/// The client end of a connection: decodes [`ServerFrame`]s, encodes [`ClientFrame`]s
/// (events as plain PackedForward) and already-encoded frames given as [`Bytes`], such as
/// those [`encode_compressed_packed_forward`] writes.
#[derive(Clone, Copy, Debug)]
pub struct ClientCodec {
    framer: Framer,
}

impl ClientCodec {
    pub fn new(limits: Limits) -> Self {
        ClientCodec {
            framer: Framer::new(limits),
        }
    }
}

impl Decoder for ClientCodec {
    type Item = ServerFrame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ServerFrame>, DecodeError> {
        while let Some(frame) = self.framer.next_frame(src)? {
            if let Some(decoded) = decode_server_frame(&frame)? {
                return Ok(Some(decoded));
            }
        }
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<ServerFrame>, DecodeError> {
        let decoded = self.decode(buf)?;
        eof_check(decoded, buf)
    }
}

impl Encoder<ClientFrame> for ClientCodec {
    type Error = io::Error;

    /// Events go out as PackedForward `[tag, bin(entries), {"size", "chunk"?, "sluice"?}]`,
    /// uncompressed whatever `options.compressed` says.
    fn encode(&mut self, frame: ClientFrame, out: &mut BytesMut) -> io::Result<()> {
        match frame {
            ClientFrame::Events(batch) => {
                write_array_len(out, 3);
                write_str(out, &batch.tag);
                write_bin(out, &batch.entries);
                write_options(
                    out,
                    batch.count,
                    None,
                    batch.options.chunk.as_deref(),
                    batch.options.provenance.as_ref(),
                );
            }
            ClientFrame::Ping(ping) => ping.encode(out),
        }
        Ok(())
    }
}

impl Encoder<Bytes> for ClientCodec {
    type Error = io::Error;

    /// Writes an already-encoded frame as it is.
    fn encode(&mut self, frame: Bytes, out: &mut BytesMut) -> io::Result<()> {
        out.extend_from_slice(&frame);
        Ok(())
    }
}

// ---- encoding ---------------------------------------------------------------------------

fn write_options(
    out: &mut impl BufMut,
    size: usize,
    compressed: Option<&str>,
    chunk: Option<&str>,
    provenance: Option<&Provenance>,
) {
    let n = 1 + [compressed.is_some(), chunk.is_some(), provenance.is_some()]
        .iter()
        .filter(|present| **present)
        .count();
    write_map_len(out, n);
    write_str(out, "size");
    write_uint(out, size as u64);
    if let Some(compressed) = compressed {
        write_str(out, "compressed");
        write_str(out, compressed);
    }
    if let Some(chunk) = chunk {
        write_str(out, "chunk");
        write_str(out, chunk);
    }
    if let Some(p) = provenance {
        write_str(out, PROVENANCE_KEY);
        write_map_len(out, 2);
        write_str(out, "src");
        write_str(out, &p.source);
        write_str(out, "seq");
        write_array_len(out, p.seqs.len());
        for &seq in &p.seqs {
            write_uint(out, seq);
        }
    }
}

/// Writes one whole CompressedPackedForward frame:
/// `[tag, bin(gzip), {"size": count, "compressed": "gzip", "chunk": chunk_id, "sluice": {..}}]`.
///
/// `gzipped_entries` are canonical entries (see [`write_entry`](super::write_entry)),
/// gzipped, e.g. by [`gzip_entries`]; several concatenated gzip members are fine.
///
/// ```
/// # use sluice_core::forward::*;
/// let mut entries = Vec::new();
/// write_entry(&mut entries, EventTime::now(), &[("message", b"hi")]);
/// let provenance = Provenance { source: "agent-1/app.log".into(), seqs: vec![0] };
/// let mut out = bytes::BytesMut::new();
/// encode_compressed_packed_forward("app", &gzip_entries(&entries), 1, "c1", Some(&provenance), &mut out);
/// ```
pub fn encode_compressed_packed_forward(
    tag: &str,
    gzipped_entries: &[u8],
    count: usize,
    chunk_id: &str,
    provenance: Option<&Provenance>,
    out: &mut BytesMut,
) {
    out.reserve(gzipped_entries.len() + tag.len() + chunk_id.len() + 64);
    write_array_len(out, 3);
    write_str(out, tag);
    write_bin(out, gzipped_entries);
    write_options(out, count, Some("gzip"), Some(chunk_id), provenance);
}

/// Gzips entries for [`encode_compressed_packed_forward`].
pub fn gzip_entries(entries: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(
        Vec::with_capacity(entries.len() / 4 + 64),
        Compression::default(),
    );
    // Writing into a Vec cannot fail.
    gz.write_all(entries).expect("gzip into a Vec");
    gz.finish().expect("gzip into a Vec")
}

/// Writes the acknowledgement `{"ack": chunk_id}` a server sends for a chunk.
pub fn encode_ack(chunk_id: &str, out: &mut BytesMut) {
    write_map_len(out, 1);
    write_str(out, "ack");
    write_str(out, chunk_id);
}

// ---- decoding ---------------------------------------------------------------------------

/// Reads a str (or bin) that must be UTF-8; `what` names the field in errors.
pub(crate) fn read_string(r: &mut Reader<'_>, what: &str) -> Result<String, DecodeError> {
    let bytes = read_bytes(r, what)?;
    String::from_utf8(bytes).map_err(|_| malformed(format!("{what} is not valid UTF-8")))
}

/// Reads a str or bin as bytes; `what` names the field in errors.
pub(crate) fn read_bytes(r: &mut Reader<'_>, what: &str) -> Result<Vec<u8>, DecodeError> {
    let head = r.head()?;
    match r.bytes_after(head)? {
        Some(bytes) => Ok(bytes.to_vec()),
        None => Err(malformed(format!(
            "{what} is a {}, not a string",
            head.kind()
        ))),
    }
}

pub(crate) fn read_bool(r: &mut Reader<'_>, what: &str) -> Result<bool, DecodeError> {
    match r.head()? {
        Head::Bool(b) => Ok(b),
        other => Err(malformed(format!(
            "{what} is a {}, not a bool",
            other.kind()
        ))),
    }
}

fn read_uint(r: &mut Reader<'_>, what: &str) -> Result<u64, DecodeError> {
    match r.head()? {
        Head::Uint(v) => Ok(v),
        Head::Int(v) if v >= 0 => Ok(v as u64),
        other => Err(malformed(format!(
            "{what} is a {}, not an unsigned int",
            other.kind()
        ))),
    }
}

/// Reads the header of a map (`what` names it), or `None` for nil.
pub(crate) fn read_map_len(r: &mut Reader<'_>, what: &str) -> Result<Option<usize>, DecodeError> {
    match r.head()? {
        Head::Map(n) => Ok(Some(n)),
        Head::Nil => Ok(None),
        other => Err(malformed(format!(
            "{what} is a {}, not a map",
            other.kind()
        ))),
    }
}

/// Reads a map key; `None` (key consumed) if it is neither str nor bin.
pub(crate) fn read_key<'a>(r: &mut Reader<'a>) -> Result<Option<&'a [u8]>, DecodeError> {
    let head = r.head()?;
    match r.bytes_after(head)? {
        Some(key) => Ok(Some(key)),
        None => {
            r.skip_after(head, MAX_DEPTH)?;
            Ok(None)
        }
    }
}

/// Provenance as found in the option map, its `seq` array not decoded yet: the option
/// map may come before the entries are counted (PackedForward needs `compressed` first),
/// and a seq array is only worth allocating once it is known to have one element per
/// entry. Otherwise one byte of frame could cost eight of memory.
struct RawProvenance<'a> {
    source: String,
    seq: &'a [u8],
}

impl RawProvenance<'_> {
    fn decode(&self, count: usize) -> Result<Provenance, DecodeError> {
        let mut r = Reader::new(self.seq);
        let len = match r.head()? {
            Head::Array(len) => len,
            other => {
                return Err(malformed(format!(
                    "option sluice.seq is a {}, not an array",
                    other.kind()
                )))
            }
        };
        if len != count {
            return Err(malformed(format!(
                "option sluice.seq has {len} elements for {count} entries"
            )));
        }
        let mut seqs = Vec::with_capacity(len);
        for _ in 0..len {
            seqs.push(read_uint(&mut r, "option sluice.seq element")?);
        }
        Ok(Provenance {
            source: self.source.clone(),
            seqs,
        })
    }
}

fn read_options<'a>(
    r: &mut Reader<'a>,
) -> Result<(Options, Option<RawProvenance<'a>>), DecodeError> {
    let mut options = Options::default();
    let mut provenance = None;
    let Some(n) = read_map_len(r, "option")? else {
        return Ok((options, provenance));
    };
    for _ in 0..n {
        match read_key(r)? {
            Some(b"size") => options.size = Some(read_uint(r, "option size")?),
            Some(b"chunk") => options.chunk = Some(read_string(r, "option chunk")?),
            Some(b"compressed") => options.compressed = Some(read_string(r, "option compressed")?),
            Some(key) if key == PROVENANCE_KEY.as_bytes() => provenance = Some(read_provenance(r)?),
            _ => {
                r.value(MAX_DEPTH)?;
            }
        }
    }
    Ok((options, provenance))
}

fn read_provenance<'a>(r: &mut Reader<'a>) -> Result<RawProvenance<'a>, DecodeError> {
    let n = read_map_len(r, "option sluice")?.unwrap_or(0);
    let (mut source, mut seq) = (None, None);
    for _ in 0..n {
        match read_key(r)? {
            Some(b"src") => source = Some(read_string(r, "option sluice.src")?),
            Some(b"seq") => seq = Some(r.value(MAX_DEPTH)?),
            _ => {
                r.value(MAX_DEPTH)?;
            }
        }
    }
    match (source, seq) {
        (Some(source), Some(seq)) => Ok(RawProvenance { source, seq }),
        _ => Err(malformed("option sluice needs both src and seq")),
    }
}

/// Gunzips at most `limit` bytes. The output buffer starts at the size the gzip trailer
/// announces (exact for one member, as sluice agents send) and otherwise doubles, but
/// never to more than `limit + 1` bytes, whatever the input claims.
fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    // Sized from the last member's ISIZE trailer (right for the usual single member),
    // never past the limit; decompress_vec writes into spare capacity, so nothing is
    // zeroed first, and crc32fast checks each member with the CPU's CRC instructions.
    let announced = data
        .len()
        .checked_sub(4)
        .map(|at| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize)
        .unwrap_or(0);
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

fn gzip_error(message: impl Into<String>) -> DecodeError {
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

fn check_batch(batch: &EventBatch) -> Result<(), DecodeError> {
    if let Some(declared) = batch.options.size {
        if declared != batch.count as u64 {
            return Err(DecodeError::SizeMismatch {
                declared,
                actual: batch.count,
            });
        }
    }
    if let Some(p) = &batch.options.provenance {
        if let Some(i) = p.seqs.windows(2).position(|w| w[0] >= w[1]) {
            return Err(malformed(format!(
                "option sluice.seq is not ascending at entry {}",
                i + 1
            )));
        }
    }
    Ok(())
}

/// Decodes one complete frame from a client; `None` for a heartbeat.
fn decode_client_frame(frame: &[u8], limits: &Limits) -> Result<Option<ClientFrame>, DecodeError> {
    let mut r = Reader::new(frame);
    let n = match r.head()? {
        Head::Array(n) => n,
        Head::Nil => return Ok(None),
        other => {
            return Err(DecodeError::NotAFrame {
                found: other.kind(),
            })
        }
    };
    if n == 0 {
        return Err(malformed("empty array"));
    }
    let tag = read_string(&mut r, "tag")?;
    if n == 6 && tag == "PING" {
        return Ping::read(&mut r).map(|ping| Some(ClientFrame::Ping(ping)));
    }
    let second = match parse_head(r.rest())? {
        Some((head, _)) => head,
        None => return Err(malformed(format!("array of {n} elements with only a tag"))),
    };
    let with_options = |expected_without: usize| -> Result<bool, DecodeError> {
        match n.checked_sub(expected_without) {
            Some(0) => Ok(false),
            Some(1) => Ok(true),
            _ => Err(malformed(format!(
                "{} mode frame has {n} elements",
                mode_name(&second)
            ))),
        }
    };
    let mut hours = Vec::new();
    let (entries, count, options) = match second {
        Head::Array(_) => {
            // Forward: the entries array's elements are entries, exactly as in a packed stream.
            let with_options = with_options(2)?;
            let array = r.value(FRAME_DEPTH)?;
            let mut inner = Reader::new(array);
            inner.head()?;
            let raw = inner.rest();
            let (rewritten, count) =
                normalise_entries(raw, limits.max_decompressed_bytes, &mut hours)?;
            let options = if with_options {
                with_provenance(read_options(&mut r)?, count)?
            } else {
                Options::default()
            };
            (rewritten.unwrap_or_else(|| raw.to_vec()), count, options)
        }
        Head::Str(_) | Head::Bin(_) => {
            let with_options = with_options(2)?;
            let head = r.head()?;
            let raw = r.bytes_after(head)?.unwrap_or_default();
            let (options, provenance) = if with_options {
                read_options(&mut r)?
            } else {
                (Options::default(), None)
            };
            let limit = limits.max_decompressed_bytes;
            match options.compressed.as_deref() {
                None => {
                    let (rewritten, count) = normalise_entries(raw, limit, &mut hours)?;
                    let options = with_provenance((options, provenance), count)?;
                    (rewritten.unwrap_or_else(|| raw.to_vec()), count, options)
                }
                Some("gzip") => {
                    let unzipped = gunzip(raw, limit)?;
                    let (rewritten, count) = normalise_entries(&unzipped, limit, &mut hours)?;
                    let options = with_provenance((options, provenance), count)?;
                    (rewritten.unwrap_or(unzipped), count, options)
                }
                Some(other) => return Err(DecodeError::UnsupportedCompression(other.to_string())),
            }
        }
        Head::Uint(_) | Head::Int(_) | Head::F32(_) | Head::F64(_) | Head::Ext { .. } => {
            let with_options = with_options(3)?;
            let (time, _) =
                read_time(&mut r, false).map_err(|why| malformed(format!("time {why}")))?;
            let record = read_record(&mut r).map_err(|e| match e {
                DecodeError::Malformed { what } => malformed(format!("record {what}")),
                other => other,
            })?;
            let mut entries = Vec::with_capacity(record.len() + 11);
            write_entry_header(&mut entries, time);
            entries.extend_from_slice(record);
            push_hour(&mut hours, time);
            let options = if with_options {
                with_provenance(read_options(&mut r)?, 1)?
            } else {
                Options::default()
            };
            (entries, 1, options)
        }
        other => {
            return Err(malformed(format!(
                "second element is a {}; expected entries or a time",
                other.kind()
            )))
        }
    };
    let batch = EventBatch {
        tag,
        entries,
        count,
        options,
        hours,
    };
    check_batch(&batch)?;
    Ok(Some(ClientFrame::Events(batch)))
}

fn with_provenance(
    (mut options, provenance): (Options, Option<RawProvenance<'_>>),
    count: usize,
) -> Result<Options, DecodeError> {
    if let Some(p) = provenance {
        options.provenance = Some(p.decode(count)?);
    }
    Ok(options)
}

fn mode_name(second: &Head) -> &'static str {
    match second {
        Head::Array(_) => "Forward",
        Head::Str(_) | Head::Bin(_) => "PackedForward",
        _ => "Message",
    }
}

/// Decodes one complete frame from a server; `None` for a heartbeat.
fn decode_server_frame(frame: &[u8]) -> Result<Option<ServerFrame>, DecodeError> {
    let mut r = Reader::new(frame);
    match r.head()? {
        Head::Map(n) => {
            let mut ack = None;
            for _ in 0..n {
                match read_key(&mut r)? {
                    Some(b"ack") => ack = Some(read_string(&mut r, "ack")?),
                    _ => {
                        r.value(MAX_DEPTH)?;
                    }
                }
            }
            ack.map(|chunk| Some(ServerFrame::Ack(chunk)))
                .ok_or_else(|| malformed("response map without \"ack\""))
        }
        Head::Array(n) => {
            let kind = read_string(&mut r, "message type")?;
            match (kind.as_str(), n) {
                ("HELO", 2) => Helo::read(&mut r).map(|h| Some(ServerFrame::Helo(h))),
                ("PONG", 5) => Pong::read(&mut r).map(|p| Some(ServerFrame::Pong(p))),
                _ => Err(malformed(format!(
                    "unknown server message {kind:?} with {n} elements"
                ))),
            }
        }
        Head::Nil => Ok(None),
        other => Err(DecodeError::NotAFrame {
            found: other.kind(),
        }),
    }
}
