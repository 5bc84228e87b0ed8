//! Frames: finding them in the byte stream, the four event modes, and the tokio codecs
//! for both ends of a connection.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::batch::{
    normalise_entries, push_hour, read_record, read_time, write_entry_header, EventBatch,
};
use crate::error::{malformed, DecodeError};
use crate::gzip::{gunzip, trailer_size};
use crate::handshake::{Helo, Ping, Pong};
use crate::limits::{Limits, MAX_DEPTH};
use crate::msgpack::{
    parse_head, read_key, read_string, scan, write_array_len, write_bin, write_map_len, write_str,
    Head, Reader, Scan,
};
use crate::options::{read_options, with_provenance, write_options, Options, Provenance};

/// Nesting allowed in a whole frame: frame array, entries array and entry array around
/// a record that may itself nest [`MAX_DEPTH`] levels.
const FRAME_DEPTH: usize = MAX_DEPTH + 3;

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

/// Cuts complete frames out of a connection's read buffer, without decoding them: a
/// server that decodes elsewhere (a thread pool) reads with this and decodes each frame
/// with [`decode_client_frame`].
#[derive(Clone, Copy, Debug)]
pub struct Framer {
    limits: Limits,
    /// A lower bound of the size of the frame at the front of the buffer: until that many
    /// bytes are buffered there is no point scanning again (avoids rescanning a large
    /// Forward-mode frame for every read).
    need: usize,
}

impl Framer {
    pub fn new(limits: Limits) -> Self {
        Framer { limits, need: 0 }
    }

    /// A lower bound of the size of the frame at the front of the buffer, as far as it
    /// has been scanned (0 when no frame is begun).
    pub fn need(&self) -> usize {
        self.need
    }

    /// The next complete frame at the front of `src`, split off it; `None` until one is
    /// complete. An error (a frame over the limit, bad msgpack) leaves the stream out of
    /// sync: close it.
    pub fn next_frame(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, DecodeError> {
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
/// use sluice_forward::*;
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

/// Writes one whole CompressedPackedForward frame:
/// `[tag, bin(gzip), {"size": count, "compressed": "gzip", "chunk": chunk_id, "sluice": {..}}]`.
///
/// `gzipped_entries` are canonical entries (see [`write_entry`](crate::write_entry)),
/// gzipped, e.g. by [`gzip_entries`](crate::gzip_entries); several concatenated gzip members are fine.
///
/// ```
/// # use sluice_forward::*;
/// let mut entries = Vec::new();
/// write_entry(&mut entries, EventTime::now(), &[("message", b"hi")]);
/// let provenance = Provenance { source: "agent-1/app.log".into(), seqs: vec![0], offsets: vec![0] };
/// let mut out = bytes::BytesMut::new();
/// encode_compressed_packed_forward("app", &gzip_entries(&entries), 1, "c1", Some(&provenance), &mut out);
/// ```
///
/// `out` is any buffer (a `BytesMut`, a `Vec<u8>` the caller reuses); it grows as
/// needed, so callers that know the size reserve it first.
pub fn encode_compressed_packed_forward(
    tag: &str,
    gzipped_entries: &[u8],
    count: usize,
    chunk_id: &str,
    provenance: Option<&Provenance>,
    out: &mut impl bytes::BufMut,
) {
    write_array_len(out, 3);
    write_str(out, tag);
    write_bin(out, gzipped_entries);
    write_options(out, count, Some("gzip"), Some(chunk_id), provenance);
}

/// The tag of a probe ([`encode_probe`]).
pub const PROBE_TAG: &str = "sluice.probe";

/// The tag of a sluice agent's report: one event whose record's `report` field holds,
/// as JSON, the seq ranges the relays acknowledged per (tag, hour, source).
/// sluice-relay keeps it in its ledger and acknowledges it; it is never spooled.
pub const REPORT_TAG: &str = "sluice.report";

/// The chunk id of the last acknowledgement a draining relay sends before it closes a
/// connection: every chunk it read was acknowledged before it, and it reads no more.
pub const DRAINING_ACK: &str = "sluice:draining";

/// The chunk id of an acknowledgement sluice-relay sends, every second, to a client that
/// probes while the relay holds it up (a chunk waiting for a full spool or slow sinks, a
/// read waiting for memory budget): the relay is alive, the client should wait.
pub const ALIVE_ACK: &str = "sluice:alive";

/// Writes a probe: a PackedForward frame with no entries that asks for an ack,
/// `["sluice.probe", bin(""), {"size": 0, "chunk": chunk_id}]`. It carries no event, so a
/// server answers it as soon as it reads it; sluice-relay answers it ahead of the
/// acknowledgements still waiting for the spool. A client that hears nothing for a
/// while sends one to learn whether the server (and the path to it) is still there.
pub fn encode_probe(chunk_id: &str, out: &mut BytesMut) {
    write_array_len(out, 3);
    write_str(out, PROBE_TAG);
    write_bin(out, &[]);
    write_options(out, 0, None, Some(chunk_id), None);
}

/// Writes the acknowledgement `{"ack": chunk_id}` a server sends for a chunk.
pub fn encode_ack(chunk_id: &str, out: &mut BytesMut) {
    write_map_len(out, 1);
    write_str(out, "ack");
    write_str(out, chunk_id);
}

// ---- decoding ---------------------------------------------------------------------------

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
        if let Some(i) = p.offsets.windows(2).position(|w| w[0] >= w[1]) {
            return Err(malformed(format!(
                "option sluice.off is not ascending at entry {}",
                i + 1
            )));
        }
    }
    Ok(())
}

/// What decoding a frame will need, read from its first bytes without decoding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecodeHint {
    /// A heartbeat (`nil`): nothing to decode.
    pub heartbeat: bool,
    /// The length of a PackedForward frame's entries (its bin/str), once its header is
    /// buffered; None for the other modes (their size shows only as they arrive).
    pub entries_len: Option<usize>,
    /// Its entries are gzip (they start with the gzip magic): decoding inflates them.
    pub gzip: bool,
    /// The uncompressed size the last gzip member's trailer announces, once all the
    /// entries are buffered (0 before, or if not gzip). Right for the usual single
    /// member; a client can lie, so a hint only.
    pub announced: usize,
}

/// Looks at the start of a frame (a prefix, or the whole frame as
/// [`Framer::next_frame`] returns it) to tell what decoding it will need, so a server
/// can budget memory before it buffers or inflates anything.
pub fn decode_hint(frame: &[u8]) -> DecodeHint {
    let mut hint = DecodeHint {
        heartbeat: frame == [0xc0],
        ..DecodeHint::default()
    };
    let mut r = Reader::new(frame);
    let Some(len) = (|| {
        let Head::Array(2..=3) = r.head().ok()? else {
            return None;
        };
        read_string(&mut r, "tag").ok()?;
        match r.head().ok()? {
            Head::Str(n) | Head::Bin(n) => Some(n),
            _ => None,
        }
    })() else {
        return hint;
    };
    hint.entries_len = Some(len);
    let payload = r.rest();
    hint.gzip = payload.starts_with(&[0x1f, 0x8b]);
    if hint.gzip && payload.len() >= len {
        hint.announced = trailer_size(&payload[..len]);
    }
    hint
}

/// Decodes one complete frame from a client (as [`Framer::next_frame`] cut it); `None`
/// for a heartbeat.
pub fn decode_client_frame(
    frame: &[u8],
    limits: &Limits,
) -> Result<Option<ClientFrame>, DecodeError> {
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
