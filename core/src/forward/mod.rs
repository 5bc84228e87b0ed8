//! The Fluentd Forward Protocol v1 codec: what an agent sends, what a relay reads back.
//!
//! # Wire format
//!
//! A connection carries a stream of MessagePack values, one per frame, with no other
//! framing. A client sends one of
//!
//! | mode | frame |
//! |---|---|
//! | Message | `[tag, time, record, option?]` |
//! | Forward | `[tag, [[time, record], ...], option?]` |
//! | PackedForward | `[tag, bin\|str(<<[time, record]>>*), option?]` |
//! | CompressedPackedForward | as PackedForward, the bin gzipped, option `{"compressed": "gzip"}` |
//! | PING (handshake) | `["PING", hostname, shared_key_salt, shared_key_hexdigest, username, password_digest]` |
//! | heartbeat | `nil` (skipped by the decoder) |
//!
//! and a server sends `["HELO", {"nonce", "auth", "keepalive"}]`,
//! `["PONG", auth_ok, reason, hostname, shared_key_hexdigest]` or `{"ack": chunk}`.
//!
//! `time` is an int (seconds), a float (seconds; some clients send it) or the EventTime
//! ext (type 0, 8 bytes: u32 BE seconds, u32 BE nanoseconds, as `fixext 8` or `ext 8`).
//! The option map carries `size` (entry count), `chunk` (id the server must `ack`),
//! `compressed`, and sluice's own provenance under `"sluice"`:
//! `{"src": <source id>, "seq": [<one uint per entry, ascending>]}`; other
//! implementations ignore keys they do not know, and so does this decoder.
//!
//! # What the decoder guarantees
//!
//! - Every mode decodes to one [`EventBatch`] whose `entries` hold canonical entries
//!   (`[EventTime ext, record]`), with the record bytes exactly as sent. When every entry
//!   already is canonical — what sluice agents send — the gunzipped buffer is kept as-is:
//!   one gunzip and one validation pass per frame.
//! - The end of a frame is found by a scanner that does not allocate; as soon as the bytes
//!   buffered for an unfinished frame, or the size its headers already declare, exceed
//!   [`Limits::max_frame_bytes`], decoding fails with [`DecodeError::FrameTooLarge`].
//!   Gunzip output is capped at [`Limits::max_decompressed_bytes`].
//! - Containers nest at most [`MAX_DEPTH`] levels inside a record; nothing recurses
//!   deeper than that, nothing panics on network data, and every error says which field
//!   of which entry is wrong.
//! - `size`, when sent, must equal the number of entries; provenance, when sent, must
//!   have one strictly ascending sequence number per entry.
//!
//! # Example
//!
//! ```
//! use bytes::BytesMut;
//! use sluice_core::forward::*;
//! use tokio_util::codec::Decoder;
//!
//! let mut entries = Vec::new();
//! write_entry(&mut entries, EventTime { secs: 1_700_000_000, nanos: 5 }, &[("message", b"hello")]);
//! let gz = gzip_entries(&entries);
//! let mut wire = BytesMut::new();
//! encode_compressed_packed_forward("app.web", &gz, 1, "chunk-1", None, &mut wire);
//!
//! let mut server = ServerCodec::new(Limits::default());
//! let Some(ClientFrame::Events(batch)) = server.decode(&mut wire)? else { panic!() };
//! assert_eq!(batch.options.chunk.as_deref(), Some("chunk-1"));
//! let entry = batch.iter().next().unwrap()?;
//! assert_eq!(record_field(entry.record, "message")?, Some(&b"hello"[..]));
//! # Ok::<(), DecodeError>(())
//! ```

mod batch;
mod frame;
mod handshake;
mod json;
mod msgpack;
#[cfg(test)]
mod tests;

use std::io;

pub use batch::{
    set_entry_time, write_entry, write_entry_header, Entry, EntryIter, EventBatch, EventTime,
    ENTRY_HEADER_LEN,
};
pub use frame::{
    encode_ack, encode_compressed_packed_forward, gzip_entries, ClientCodec, ClientFrame, Options,
    Provenance, ServerCodec, ServerFrame,
};
pub use handshake::{password_digest, shared_key_digest, Helo, Ping, Pong};
pub use json::{record_field, record_to_json, record_value, FieldValue};

/// How deeply arrays and maps may nest inside one record (the record map is level 1).
pub const MAX_DEPTH: usize = 64;

/// Size limits for one connection's decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, in bytes as it is on the wire.
    pub max_frame_bytes: usize,
    /// Largest gunzipped entries of one CompressedPackedForward frame.
    pub max_decompressed_bytes: usize,
}

impl Default for Limits {
    /// 16 MiB frames, 64 MiB decompressed.
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 << 20,
            max_decompressed_bytes: 64 << 20,
        }
    }
}

/// Why bytes from a peer could not be decoded. After any of these the connection's
/// stream is no longer in sync and should be closed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame too large: at least {at_least} bytes, limit {limit}")]
    FrameTooLarge { limit: usize, at_least: usize },
    /// Gunzipped entries, or entries rewritten to canonical form, would pass
    /// [`Limits::max_decompressed_bytes`].
    #[error("entries exceed the limit of {limit} bytes once decompressed or made canonical")]
    DecompressedTooLarge { limit: usize },
    #[error("malformed frame: {what}")]
    Malformed { what: String },
    #[error("values nest deeper than {limit} levels")]
    NestingTooDeep { limit: usize },
    #[error("option size is {declared} but the frame holds {actual} entries")]
    SizeMismatch { declared: u64, actual: usize },
    #[error("unsupported compression {0:?} (only \"gzip\")")]
    UnsupportedCompression(String),
    #[error("corrupt gzip entries: {0}")]
    Gzip(#[source] io::Error),
    #[error("not a Forward frame: a {found} where an array was expected")]
    NotAFrame { found: &'static str },
    #[error("connection closed inside a frame ({buffered} bytes buffered)")]
    UnexpectedEof { buffered: usize },
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub(crate) fn malformed(what: impl Into<String>) -> DecodeError {
    DecodeError::Malformed { what: what.into() }
}
