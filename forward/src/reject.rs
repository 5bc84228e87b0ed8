//! Why a Forward server closes a connection, as one closed set of reasons.
//!
//! The reasons are a metric label (`connections_rejected_total{reason}`) that dashboards
//! and alerts select on, so [`RejectReason::as_label`] is the one place their spelling
//! lives; adding a reason is a change to this enum, never a new string somewhere else.

use std::fmt;

use crate::error::DecodeError;

/// Why a server refused or closed a client's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// `max_connections` connections were open already.
    MaxConnections,
    /// `max_connections_per_ip` connections from this address were open already.
    MaxConnectionsPerIp,
    /// A frame begun and not finished within the frame timeout (a slowloris client).
    FrameTimeout,
    /// No TLS handshake started, or finished, within the handshake timeout.
    TlsTimeout,
    /// The client speaks plain TCP to a TLS port.
    Plaintext,
    /// The TLS handshake failed (certificates, alerts).
    Tls,
    /// Reading or writing the socket failed.
    Io,
    /// The HELO/PING/PONG handshake failed or did not happen.
    Auth,
    /// A valid frame that is not allowed here (a PING after the handshake).
    Protocol,
    /// A frame, or its gunzipped entries, beyond the configured limits.
    FrameTooLarge,
    /// The connection ended inside a frame.
    Truncated,
    /// Bytes that are not a valid Forward frame.
    Malformed,
    /// Nothing, not even a heartbeat, for the idle timeout.
    Idle,
    /// The spool refused a chunk; the client resends it on a new connection.
    Spool,
    /// The server is shutting down.
    Shutdown,
    /// The connection held part of the relay's memory budget (`max_inflight_bytes`) and
    /// could not get the rest it needed within the frame timeout; closed so that budget
    /// held by a stalled client comes back. The client resends.
    MemoryBudget,
    /// A chunk's source id belongs to another client than the one that authenticated
    /// (`server.bind_sources`).
    SourceIdentity,
    /// The address's frames were refused several times in a row; its new connections
    /// are closed for a while (`server.refusal_backoff`).
    RefusalBackoff,
}

impl RejectReason {
    /// The metric label, exactly as the relay has always exported it.
    pub fn as_label(self) -> &'static str {
        match self {
            RejectReason::MaxConnections => "max_connections",
            RejectReason::MaxConnectionsPerIp => "max_connections_per_ip",
            RejectReason::FrameTimeout => "frame_timeout",
            RejectReason::TlsTimeout => "tls_timeout",
            RejectReason::Plaintext => "plaintext",
            RejectReason::Tls => "tls",
            RejectReason::Io => "io",
            RejectReason::Auth => "auth",
            RejectReason::Protocol => "protocol",
            RejectReason::FrameTooLarge => "frame_too_large",
            RejectReason::Truncated => "truncated",
            RejectReason::Malformed => "malformed",
            RejectReason::Idle => "idle",
            RejectReason::Spool => "spool",
            RejectReason::Shutdown => "shutdown",
            RejectReason::MemoryBudget => "memory_budget",
            RejectReason::SourceIdentity => "source_identity",
            RejectReason::RefusalBackoff => "refusal_backoff",
        }
    }

    /// The reason a decoder error closes a connection with.
    ///
    /// ```
    /// # use sluice_forward::{DecodeError, RejectReason};
    /// let e = DecodeError::FrameTooLarge { limit: 1, at_least: 2 };
    /// assert_eq!(RejectReason::of_decode_error(&e).as_label(), "frame_too_large");
    /// ```
    pub fn of_decode_error(e: &DecodeError) -> RejectReason {
        match e {
            DecodeError::FrameTooLarge { .. } | DecodeError::DecompressedTooLarge { .. } => {
                RejectReason::FrameTooLarge
            }
            DecodeError::UnexpectedEof { .. } => RejectReason::Truncated,
            DecodeError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                RejectReason::Truncated
            }
            DecodeError::Io(_) => RejectReason::Io,
            _ => RejectReason::Malformed,
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}
