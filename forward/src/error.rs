//! What can go wrong decoding bytes from a peer.

use std::io;

/// Why bytes from a peer could not be decoded. After any of these the connection's
/// stream is no longer in sync and should be closed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame too large: at least {at_least} bytes, limit {limit}")]
    FrameTooLarge { limit: usize, at_least: usize },
    /// Gunzipped entries, or entries rewritten to canonical form, would pass
    /// [`Limits::max_decompressed_bytes`](crate::Limits::max_decompressed_bytes).
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
