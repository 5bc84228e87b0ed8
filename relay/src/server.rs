//! The Forward protocol server: accepts TLS (or, when configured, plain TCP)
//! connections, authenticates them (HELO/PING/PONG shared key), decodes chunks, hands
//! them to the spool writer and acknowledges each chunk once it is durable (or, in
//! `end_to_end` mode, once every required sink has it).
//!
//! Every way a client can misbehave ends *that* connection with one warning naming the
//! peer and the cause, and a `connections_rejected{reason}` count; nothing a client does
//! blocks the others. Nothing unacknowledged is ever considered delivered: a connection
//! that dies with chunks in flight simply leaves them to be resent.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use sluice_core::tls::ReloadingServerConfig;
use sluice_forward::{
    encode_ack, ClientFrame, DecodeError, KeyLookup, Limits, Refusal, RejectReason, ServerCodec,
    ServerFrame, ServerHandshake, SharedKey, Verdict,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;

use crate::config::{AckMode, RateLimit, ServerSection};
use crate::metrics::RelayMetrics;
use crate::writer::{Accepted, WriteRequest, WriterMsg};
use sluice_spool::Position;

pub struct ServerState {
    pub config: ServerSection,
    pub tls: Option<ReloadingServerConfig>,
    pub writer: mpsc::Sender<WriterMsg>,
    /// Delivered positions of the required sinks, for end-to-end acks.
    pub required_sinks: Vec<watch::Receiver<Position>>,
    /// In `end_to_end` mode: the furthest spool position an acknowledgement waits for.
    /// Each connection raises it before it waits; the required sinks' drivers read it
    /// and deliver what they gathered at once, instead of at their size or age limit
    /// (an object sink's `max_object_age` would otherwise hold every ack that long).
    pub ack_demand: Option<Arc<watch::Sender<Position>>>,
    pub metrics: Arc<RelayMetrics>,
}

/// Open connections per client IP address (`max_connections_per_ip`).
#[derive(Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection's place in [`PerIp`], given back when dropped.
struct IpSlot {
    table: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, limit: usize) -> Option<IpSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Chunks a connection may have waiting for durability before it stops reading.
const IN_FLIGHT_PER_CONNECTION: usize = 64;

pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    stop: CancellationToken,
    conns: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(state.config.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let rate = state
        .config
        .rate_limit
        .as_ref()
        .map(|l| Arc::new(ClientRate::new(l)));
    let mut rate_cleaned = tokio::time::Instant::now();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = state.config.max_connections, "connection refused: max_connections reached");
            state.metrics.reject(RejectReason::MaxConnections);
            continue;
        };
        let Some(ip_slot) = per_ip.take(peer.ip(), state.config.max_connections_per_ip) else {
            let reason = RejectReason::MaxConnectionsPerIp;
            tracing::warn!(%peer, reason = reason.as_label(), limit = state.config.max_connections_per_ip, "connection refused: max_connections_per_ip reached for this address");
            state.metrics.reject(reason);
            continue;
        };
        let _ = stream.set_nodelay(true);
        if let Some(rate) = &rate {
            if rate_cleaned.elapsed() > Duration::from_secs(60) {
                rate.limiter.retain_recent();
                rate_cleaned = tokio::time::Instant::now();
            }
        }
        let state = state.clone();
        let conns = conns.clone();
        let rate = rate.clone();
        let connection_id = NEXT_CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            state.metrics.connections_total.inc();
            state.metrics.connections_active.inc();
            let link = Link {
                peer,
                connection: connection_id,
                handshake_deadline: tokio::time::Instant::now()
                    + state.config.handshake_timeout.get(),
                state: &state,
                conns,
                rate,
            };
            if let Err(reject) = connection(stream, link).await {
                tracing::warn!(%peer, reason = reject.reason.as_label(), "{}", reject.message);
                state.metrics.reject(reject.reason);
            }
            state.metrics.connections_active.dec();
            // The slots are free before the (possibly waiting) message to the writer.
            drop(permit);
            drop(ip_slot);
            // Behind every chunk this connection handed to the writer: it can lift the
            // ordering guard of a chunk that failed on this connection.
            let _ = state.writer.send(WriterMsg::Closed(connection_id)).await;
        });
    }
}

/// Why a connection was closed by the relay.
pub struct Reject {
    pub reason: RejectReason,
    pub message: String,
}

fn reject(reason: RejectReason, message: impl Into<String>) -> Reject {
    Reject {
        reason,
        message: message.into(),
    }
}

/// What a connection's tasks share.
struct Link<'a> {
    peer: SocketAddr,
    /// Unique per connection (for the spool writer's ordering guard).
    connection: u64,
    /// TLS and HELO/PING/PONG together must be done by then (accept + handshake_timeout):
    /// one budget for the whole handshake, so a client cannot take it twice.
    handshake_deadline: tokio::time::Instant,
    state: &'a ServerState,
    conns: CancellationToken,
    rate: Option<Arc<ClientRate>>,
}

/// The per-client ingest limit (`server.rate_limit`), a GCRA bucket of bytes per client.
///
/// A client is the hostname it authenticated with (HELO/PING/PONG), or its IP address
/// without the handshake, so every connection of one client shares one budget. It is
/// enforced by backpressure: after each frame the connection's reader waits until the
/// bytes it read are within the budget, and while it waits the socket is not read, so TCP
/// flow control slows the client down. Nothing is dropped; other clients never wait.
struct ClientRate {
    limiter: governor::DefaultKeyedRateLimiter<String>,
    burst: NonZeroU32,
}

impl ClientRate {
    fn new(limit: &RateLimit) -> Self {
        // The config validation keeps both within 1..=u32::MAX.
        let clamp =
            |b: u64| NonZeroU32::new(b.clamp(1, u32::MAX as u64) as u32).unwrap_or(NonZeroU32::MIN);
        let rate = clamp(limit.bytes_per_sec.as_u64());
        let burst = clamp(limit.burst.unwrap_or(limit.bytes_per_sec).as_u64());
        ClientRate {
            limiter: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            burst,
        }
    }

    /// Waits until `client` may have sent `bytes` more.
    async fn admit(&self, client: &String, mut bytes: u64) {
        while bytes > 0 {
            let n = bytes.min(self.burst.get() as u64) as u32;
            // n <= burst, so the bucket can always hold it eventually.
            let _ = self
                .limiter
                .until_key_n_ready(client, NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
                .await;
            bytes -= n as u64;
        }
    }
}

/// Counts the bytes read from a socket, for the rate limit.
struct Metered<R> {
    inner: R,
    read: u64,
    /// Bytes read over the connection's life (heartbeats included: the idle timeout
    /// looks at this, since the decoder swallows heartbeats without yielding a frame).
    total: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for Metered<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Hand the inner reader at most READ_WINDOW bytes of the buffer: tokio-rustls
        // zero-fills all the unfilled space it is given on every read, and a frame
        // buffer grown to megabytes made that memset a sixth of the relay's CPU.
        let window = buf.remaining().min(READ_WINDOW);
        let mut sub = buf.take(window);
        let polled = Pin::new(&mut self.inner).poll_read(cx, &mut sub);
        let n = sub.filled().len();
        // SAFETY: the inner reader initialised and filled these n bytes of buf's unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        self.read += n as u64;
        self.total += n as u64;
        polled
    }
}

/// The most one read may fill; a TLS record is at most 16 KiB of plaintext.
const READ_WINDOW: usize = 64 * 1024;

async fn connection(stream: tokio::net::TcpStream, link: Link<'_>) -> Result<(), Reject> {
    let (peer, state) = (link.peer, link.state);
    let handshake = state.config.handshake_timeout.get();
    match &state.tls {
        Some(tls) => {
            // Look at the first byte before handing the socket to rustls: a port probe
            // (connect, close) is not an error worth a warning, and a client speaking plain
            // Forward to this port deserves to be told so in those words.
            let deadline = link.handshake_deadline;
            let mut first = [0u8; 1];
            match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
                Err(_) => {
                    return Err(reject(
                        RejectReason::TlsTimeout,
                        format!("no TLS handshake started within {handshake:?}"),
                    ))
                }
                Ok(Err(e)) => return Err(reject(RejectReason::Io, format!("reading failed: {e}"))),
                Ok(Ok(0)) => {
                    tracing::debug!(%peer, "closed before sending anything (a port probe?)");
                    return Ok(());
                }
                Ok(Ok(_)) if first[0] != TLS_HANDSHAKE_RECORD => {
                    return Err(plaintext_reject(first[0]))
                }
                Ok(Ok(_)) => {}
            }
            let (config, reload_error) = tls.current();
            if let Some(e) = reload_error {
                tracing::warn!(error = %e, "TLS files changed but could not be loaded; still serving the previous certificate");
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let tls_stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(tls_handshake_reject(&e)),
                Err(_) => {
                    return Err(reject(
                        RejectReason::TlsTimeout,
                        format!("TLS handshake not finished within {handshake:?}"),
                    ))
                }
            };
            session(tls_stream, link).await
        }
        None => session(stream, link).await,
    }
}

async fn session<S>(stream: S, link: Link<'_>) -> Result<(), Reject>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Link {
        peer,
        connection,
        handshake_deadline,
        state,
        conns,
        rate,
    } = link;
    let (read, mut write) = tokio::io::split(stream);
    let read = Metered {
        inner: read,
        read: 0,
        total: 0,
    };
    let limits = Limits {
        max_frame_bytes: state.config.max_frame.as_usize(),
        max_decompressed_bytes: state.config.max_decompressed.as_usize(),
    };
    let mut frames = FramedRead::new(read, ServerCodec::new(limits));
    let mut codec = ServerCodec::new(limits);
    let mut out = BytesMut::with_capacity(256);

    let client = if state.config.requires_auth() {
        authenticate(
            &mut frames,
            &mut write,
            &mut codec,
            &mut out,
            state,
            handshake_deadline,
        )
        .await?
    } else {
        peer.ip().to_string()
    };

    // Acks go out in order from a second task, so reading never waits for durability
    // (up to IN_FLIGHT_PER_CONNECTION chunks), and a slow spool backs up into this socket.
    let (ack_tx, mut ack_rx) = mpsc::channel::<(
        Option<String>,
        oneshot::Receiver<Result<Accepted, String>>,
    )>(IN_FLIGHT_PER_CONNECTION);
    let end_to_end = state.config.ack == AckMode::EndToEnd;
    let mut required = state.required_sinks.clone();
    let demand = state.ack_demand.clone();
    let metrics = state.metrics.clone();
    let mut acker = tokio::spawn(async move {
        let mut out = BytesMut::with_capacity(128);
        while let Some((chunk, reply)) = ack_rx.recv().await {
            let accepted = match reply.await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    return Err(reject(
                        RejectReason::Spool,
                        format!("chunk not accepted: {e}; closing so the client resends"),
                    ))
                }
                Err(_) => {
                    return Err(reject(
                        RejectReason::Shutdown,
                        "relay shutting down before the chunk was durable",
                    ))
                }
            };
            if accepted.duplicates > 0 {
                tracing::debug!(
                    chunk = chunk.as_deref().unwrap_or("-"),
                    new = accepted.accepted,
                    duplicates = accepted.duplicates,
                    "resent chunk: events already spooled were trimmed"
                );
            }
            // A frame without a chunk id asks for no ack, so nothing waits for its sinks:
            // holding the connection's window for it would only slow the sender down
            // (fluent-logger sends one frame per event) without protecting anything.
            if end_to_end && chunk.is_some() {
                if let Some(demand) = &demand {
                    demand.send_if_modified(|furthest| {
                        let further = accepted.end > *furthest;
                        if further {
                            *furthest = accepted.end;
                        }
                        further
                    });
                }
                for sink in &mut required {
                    if sink.wait_for(|p| *p >= accepted.end).await.is_err() {
                        return Err(reject(
                            RejectReason::Shutdown,
                            "relay shutting down before a sink had the chunk",
                        ));
                    }
                }
            }
            if let Some(id) = chunk {
                out.clear();
                encode_ack(&id, &mut out);
                if let Err(e) = write.write_all(&out).await {
                    return Err(reject(RejectReason::Io, format!("writing ack failed: {e}")));
                }
                metrics.acks_sent.inc();
            }
        }
        let _ = write.shutdown().await;
        Ok(())
    });

    let idle = state.config.idle_timeout.get();
    let frame_timeout = state.config.frame_timeout.get();
    // Woken this often to check both timeouts: a frame begun is noticed within a
    // quarter of frame_timeout, so it is closed by 1.25 x frame_timeout at the latest.
    let step = idle.min(frame_timeout / 4).max(Duration::from_millis(10));
    // The acker ends early only on an error (a chunk the spool refused, a failed write):
    // then the connection closes at once, so the client resends now rather than after
    // its ack timeout.
    let mut acker_ended = None;
    let mut seen = 0u64;
    let mut last_byte = tokio::time::Instant::now();
    // When a partial frame was first seen waiting: bytes trickling in do not reset it,
    // only a whole frame does (slowloris).
    let mut frame_begun: Option<tokio::time::Instant> = None;
    let result = loop {
        let next = tokio::select! {
            _ = conns.cancelled() => break Ok(()),
            ended = &mut acker => {
                acker_ended = Some(ended);
                break Ok(());
            }
            n = tokio::time::timeout(step, frames.next()) => n,
        };
        let frame = match next {
            // Heartbeats are bytes without a frame: they keep the connection alive.
            Err(_) => {
                let now = tokio::time::Instant::now();
                if frames.get_ref().total != seen {
                    seen = frames.get_ref().total;
                    last_byte = now;
                }
                if frames.read_buffer().is_empty() {
                    frame_begun = None;
                } else if now.duration_since(*frame_begun.get_or_insert(now)) >= frame_timeout {
                    break Err(reject(
                        RejectReason::FrameTimeout,
                        format!(
                            "a frame begun was not finished within frame_timeout ({frame_timeout:?}; {} bytes buffered); closing",
                            frames.read_buffer().len()
                        ),
                    ));
                }
                if now.duration_since(last_byte) >= idle {
                    break Err(reject(
                        RejectReason::Idle,
                        format!("no data for {idle:?}; closing idle connection"),
                    ));
                }
                continue;
            }
            Ok(None) => break Ok(()),
            // A TLS peer that closes without close_notify between frames lost nothing:
            // frames are self-delimiting, so only a cut inside a frame is an error.
            Ok(Some(Err(DecodeError::Io(e))))
                if e.kind() == io::ErrorKind::UnexpectedEof && frames.read_buffer().is_empty() =>
            {
                tracing::debug!(%peer, "client closed without TLS close_notify");
                break Ok(());
            }
            Ok(Some(Err(e))) => break Err(decode_reject(e, frames.read_buffer().len())),
            Ok(Some(Ok(frame))) => {
                frame_begun = None;
                last_byte = tokio::time::Instant::now();
                frame
            }
        };
        seen = frames.get_ref().total;
        if let Some(rate) = &rate {
            let read = std::mem::take(&mut frames.get_mut().read);
            tokio::select! {
                _ = conns.cancelled() => break Ok(()),
                _ = rate.admit(&client, read) => {}
            }
        }
        match frame {
            ClientFrame::Ping(_) => {
                break Err(reject(
                    RejectReason::Protocol,
                    "unexpected PING after the handshake",
                ))
            }
            ClientFrame::Events(batch) => {
                let chunk = batch.options.chunk.clone();
                let (tx, rx) = oneshot::channel();
                if state
                    .writer
                    .send(WriterMsg::Write(WriteRequest {
                        batch,
                        connection,
                        reply: tx,
                    }))
                    .await
                    .is_err()
                {
                    break Err(reject(RejectReason::Shutdown, "relay shutting down"));
                }
                if ack_tx.send((chunk, rx)).await.is_err() {
                    break Ok(()); // the acker ended with its own error, reported below
                }
            }
        }
    };
    drop(ack_tx);
    let acked = match acker_ended {
        Some(ended) => ended,
        None => acker.await,
    }
    .unwrap_or(Ok(()));
    result.and(acked)
}

/// Content type of a TLS record carrying a handshake message (a ClientHello comes first).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

fn plaintext_reject(first: u8) -> Reject {
    let looks_like = match first {
        0x90..=0x9f | 0xdc | 0xdd => "a plain Forward frame",
        b'A'..=b'Z' => "text, perhaps HTTP",
        _ => "not a TLS ClientHello",
    };
    reject(
        RejectReason::Plaintext,
        format!(
            "not TLS: the first byte 0x{first:02x} is {looks_like}; the client speaks plain TCP to this TLS port (configure TLS on the client, or use a listener with insecure = true)"
        ),
    )
}

/// Names what went wrong in a TLS handshake in the operator's words. rustls reports the
/// client's refusal of *our* certificate only as the alert the client sent, so the alert
/// is translated into its usual cause.
fn tls_handshake_reject(e: &io::Error) -> Reject {
    use rustls::{AlertDescription, CertificateError, Error, InvalidMessage};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return reject(RejectReason::Tls, format!("TLS handshake failed: {e}"));
    };
    let message = match tls {
        Error::InvalidMessage(InvalidMessage::InvalidContentType) => {
            return reject(
                RejectReason::Plaintext,
                "not TLS: the client speaks plain TCP to this TLS port (configure TLS on the client, or a separate listener with insecure = true)",
            )
        }
        Error::AlertReceived(alert) => {
            let cause = match alert {
                AlertDescription::UnknownCA => "it does not trust the CA that signed the relay's certificate",
                AlertDescription::CertificateExpired => "it says the relay's certificate is expired or not yet valid",
                AlertDescription::BadCertificate => "the relay's certificate is not valid for the name the client connected to (hostname mismatch?) or is malformed",
                AlertDescription::CertificateUnknown => "it could not verify the relay's certificate",
                _ => "the client aborted the handshake",
            };
            format!("TLS handshake failed: the client sent alert {alert:?}: {cause}")
        }
        Error::NoCertificatesPresented => {
            "TLS handshake failed: the client presented no certificate, but server.tls.client_auth = \"required\"".to_string()
        }
        Error::InvalidCertificate(cert) => {
            let cause = match cert {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the client's certificate is expired"
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the client's certificate is not valid yet"
                }
                CertificateError::UnknownIssuer => {
                    "the client's certificate is not signed by server.tls.client_ca (unknown CA)"
                }
                _ => "the client's certificate was refused",
            };
            format!("TLS handshake failed: {cause} ({cert})")
        }
        other => format!("TLS handshake failed: {other}"),
    };
    reject(RejectReason::Tls, message)
}

/// Maps a decoder error to a reason and a message. `buffered` is what the connection had
/// read of an unfinished frame when the error happened.
fn decode_reject(e: DecodeError, buffered: usize) -> Reject {
    let reason = RejectReason::of_decode_error(&e);
    match &e {
        DecodeError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => reject(
            reason,
            format!("connection closed inside a frame ({buffered} bytes buffered; TLS closed without close_notify)"),
        ),
        DecodeError::Io(_) => reject(reason, format!("reading failed: {e}; closing connection")),
        _ => reject(reason, format!("bad frame: {e}; closing connection")),
    }
}

/// HELO / PING / PONG. Returns the client's hostname, which names the client from here on.
async fn authenticate<R, W>(
    frames: &mut FramedRead<R, ServerCodec>,
    write: &mut W,
    codec: &mut ServerCodec,
    out: &mut BytesMut,
    state: &ServerState,
    deadline: tokio::time::Instant,
) -> Result<String, Reject>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = &state.config;
    // With users configured, HELO carries a salt for the password digest.
    let handshake = ServerHandshake::new(&config.hostname, !config.users.is_empty());
    out.clear();
    codec
        .encode(ServerFrame::Helo(handshake.helo().clone()), out)
        .map_err(|e| reject(RejectReason::Io, format!("encoding HELO: {e}")))?;
    let timeout = config.handshake_timeout.get();
    match tokio::time::timeout_at(deadline, write.write_all(out)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(reject(RejectReason::Io, format!("sending HELO: {e}"))),
        Err(_) => {
            return Err(reject(
                RejectReason::Auth,
                format!("HELO not taken within handshake_timeout ({timeout:?})"),
            ))
        }
    }
    let ping = match tokio::time::timeout_at(deadline, frames.next()).await {
        Err(_) => {
            return Err(reject(
                RejectReason::Auth,
                format!("no PING within handshake_timeout ({timeout:?}, TLS included)"),
            ))
        }
        Ok(None) => return Err(reject(RejectReason::Auth, "closed during the handshake")),
        Ok(Some(Err(e))) => return Err(decode_reject(e, frames.read_buffer().len())),
        Ok(Some(Ok(ClientFrame::Events(_)))) => return Err(reject(
            RejectReason::Auth,
            "sent events before authenticating (PING expected; is the client's shared_key set?)",
        )),
        Ok(Some(Ok(ClientFrame::Ping(p)))) => p,
    };
    let verdict = handshake.receive_ping(ping, &ConfiguredKeys(config));
    out.clear();
    codec
        .encode(ServerFrame::Pong(verdict.pong().clone()), out)
        .map_err(|e| reject(RejectReason::Io, format!("encoding PONG: {e}")))?;
    let sent = tokio::time::timeout_at(deadline, write.write_all(out)).await;
    match verdict {
        Verdict::Accepted { client, .. } => match sent {
            Ok(Ok(())) => Ok(client.into_hostname()),
            // Acks after half a PONG would garble the stream: close instead.
            Ok(Err(e)) => Err(reject(RejectReason::Io, format!("sending PONG: {e}"))),
            Err(_) => Err(reject(
                RejectReason::Auth,
                format!("PONG not taken within handshake_timeout ({timeout:?})"),
            )),
        },
        // The details stay in the relay's log: the PONG tells a client only that it failed.
        Verdict::Refused {
            client_hostname,
            refusal,
            ..
        } => Err(reject(
            RejectReason::Auth,
            format!(
                "{} (client hostname {client_hostname:?})",
                refusal_message(&refusal)
            ),
        )),
    }
}

/// The relay's keys and users as the handshake looks them up.
struct ConfiguredKeys<'a>(&'a ServerSection);

impl KeyLookup for ConfiguredKeys<'_> {
    fn shared_key(&self, client_hostname: &str) -> SharedKey<'_> {
        match (self.0.client_keys.get(client_hostname), &self.0.shared_key) {
            (Some(own), _) => SharedKey::Own(own),
            (None, Some(shared)) => SharedKey::Default(shared),
            (None, None) => SharedKey::Unknown,
        }
    }

    fn password(&self, username: &str) -> Option<&str> {
        self.0.users.get(username).map(String::as_str)
    }
}

/// A refusal in the operator's words, naming the config keys involved.
fn refusal_message(refusal: &Refusal) -> String {
    match refusal {
        Refusal::OwnKeyMismatch => {
            "shared key mismatch: not the key server.client_keys has for this hostname".into()
        }
        Refusal::KeyMismatch => "shared key mismatch".into(),
        Refusal::UnknownClient => {
            "unknown client: its hostname is not in server.client_keys and there is no shared_key"
                .into()
        }
        Refusal::NoUsername => "no username sent, but server.users requires one".into(),
        Refusal::UnknownUser(user) => format!("unknown user {user:?}"),
        Refusal::WrongPassword(user) => format!("wrong password for user {user:?}"),
    }
}
