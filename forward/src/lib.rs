//! The Fluentd Forward Protocol v1 as sluice speaks it: what an agent sends, what a relay
//! reads back, and the HELO/PING/PONG handshake between them.
//!
//! This crate is the wire layer only. It does no I/O of its own: the codecs plug into
//! `tokio_util::codec`, and the handshake is a state machine ([`ClientHandshake`],
//! [`ServerHandshake`]) that turns received messages into messages to send, so the
//! agent, the relay, tests and tools share one implementation whatever socket they use.
//! It links no TLS, HTTP or metrics crate, so a crate that only reads records (the
//! parsers plugin) stays small.
//!
//! # Modules, bottom up
//!
//! Each module imports only modules on a line above its own (`scripts/check-module-cycles`
//! checks that no two modules import each other, directly or through a chain):
//!
//! 1. `error` (what can go wrong), `limits` (how much a peer may send)
//! 2. `msgpack` (the untrusted-input reader, typed readers, writers), `gzip` (compress,
//!    and inflate under the decompression cap), `reject` (why a server closes a connection)
//! 3. `options` (the chunk option map: `size`, `chunk`, `compressed`, provenance)
//! 4. `batch` (entries and their times), `handshake` (HELO/PING/PONG messages, digests,
//!    `ct_eq`), `json` (records as JSON)
//! 5. `auth` (the handshake state machines), `frame` (framing, the four modes, codecs)
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
//! use sluice_forward::*;
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

mod auth;
mod batch;
mod error;
mod frame;
mod gzip;
mod handshake;
mod json;
mod limits;
mod msgpack;
mod options;
mod reject;
#[cfg(test)]
mod tests;

pub use auth::{
    Authenticated, AuthenticatedClient, AwaitingPong, ClientHandshake, ClientHandshakeError,
    KeyLookup, Refusal, ServerHandshake, SharedKey, Verdict,
};
pub use batch::{
    push_hour, set_entry_time, write_entry, write_entry_header, Entry, EntryIter, EventBatch,
    EventTime, ENTRY_HEADER_LEN,
};
pub use error::DecodeError;
pub use frame::{
    decode_client_frame, decode_hint, encode_ack, encode_compressed_packed_forward, encode_probe,
    ClientCodec, ClientFrame, DecodeHint, Framer, ServerCodec, ServerFrame, ALIVE_ACK,
    DRAINING_ACK, PROBE_TAG, REPORT_TAG,
};
pub use gzip::{gunzip, gzip_entries, recycle, Gzip, GzipWriter, RECYCLED_MAX_BYTES};
pub use handshake::{ct_eq, password_digest, shared_key_digest, Helo, Ping, Pong};
pub use json::{record_field, record_path_value, record_to_json, record_value, FieldValue};
pub use limits::{Limits, MAX_DEPTH};
pub use options::{Options, Provenance};
pub use reject::RejectReason;
