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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use sluice_core::tls::ReloadingServerConfig;
use sluice_forward::{
    decode_client_frame, decode_hint, encode_ack, ClientFrame, DecodeError, DecodeHint, EventBatch,
    Framer, KeyLookup, Limits, Refusal, RejectReason, ServerCodec, ServerFrame, ServerHandshake,
    SharedKey, Verdict, ALIVE_ACK, DRAINING_ACK,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, DecodePool, Held, FREE_BUFFER};
use crate::config::{AckMode, RateLimit, ServerSection};
use crate::metrics::RelayMetrics;
use crate::refusals::Refusals;
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
    /// Ingest memory, all connections together (`max_inflight_bytes`).
    pub budget: Budget,
    /// Where frames are inflated and decoded (`decode_threads`).
    pub pool: DecodePool,
    /// Where agents' reports go ([`take_report`]).
    pub ledger: Arc<std::sync::Mutex<crate::ledger::Ledger>>,
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
    let refusals = Arc::new(Refusals::new(state.config.refusal_backoff.get()));
    let rate = state
        .config
        .rate_limit
        .as_ref()
        .map(|l| Arc::new(ClientRate::new(l)));
    let mut rate_cleaned = tokio::time::Instant::now();
    {
        let (state, stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => { state.metrics.inflight_bytes.set(state.budget.in_use() as i64); }
                }
            }
        });
    }
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
        if refusals
            .blocked(peer.ip(), std::time::Instant::now())
            .is_some()
        {
            // Logged once when the backoff began; each refused connection is counted.
            state.metrics.reject(RejectReason::RefusalBackoff);
            continue;
        }
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
            }
        }
        if rate_cleaned.elapsed() > Duration::from_secs(60) {
            refusals.forget_expired(std::time::Instant::now());
            rate_cleaned = tokio::time::Instant::now();
        }
        let state = state.clone();
        let conns = conns.clone();
        let rate = rate.clone();
        let refusals = refusals.clone();
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
            match connection(stream, link).await {
                Ok(()) => refusals.cleared(peer.ip()),
                Err(reject) => {
                    tracing::warn!(%peer, reason = reject.reason.as_label(), "{}", reject.message);
                    state.metrics.reject(reject.reason);
                    match reject.reason {
                        // The client sent what no Forward server takes: a bomb, garbage.
                        RejectReason::FrameTooLarge | RejectReason::Malformed => {
                            let now = std::time::Instant::now();
                            if let Some(backoff) = refusals.refused(peer.ip(), now) {
                                tracing::warn!(ip = %peer.ip(), ?backoff, "frames from this address were refused {} times in a row: its new connections are refused for {backoff:?} (server.refusal_backoff; its open connections go on)", crate::refusals::STREAK);
                            }
                        }
                        _ => {}
                    }
                }
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

/// Reads whole frames off a socket, holding [`Budget`] for what it buffers.
///
/// Everything it buffers beyond [`FREE_BUFFER`] is held as budget before it is read, so
/// a connection short of budget stops reading (its client is slowed by TCP) instead of
/// growing the relay. Cancel-safe: all state lives here, so a read interrupted by a
/// timer resumes where it stopped.
struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    framer: Framer,
    /// Budget held for `buf`.
    held: Held,
    /// Bytes read since the rate limit last looked.
    read: u64,
    /// Bytes read over the connection's life (heartbeats included: the idle timeout
    /// looks at this).
    total: u64,
    /// The last read is waiting for budget (named when the frame times out).
    waiting_for_budget: bool,
    /// The connection is waiting on the relay (memory budget, the spool writer, its rate
    /// limit, decoding) rather than on the client: the acker then tells a client that
    /// probes it that the relay is alive ([`ALIVE_ACK`]).
    busy: Arc<AtomicBool>,
    max_decompressed: usize,
    /// The budget planned for the frame begun, once its header is read.
    plan: Option<usize>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(io: R, limits: Limits, budget: &Budget) -> Self {
        FrameReader {
            io,
            buf: BytesMut::new(),
            framer: Framer::new(limits),
            held: budget.none(),
            read: 0,
            total: 0,
            waiting_for_budget: false,
            busy: Arc::default(),
            max_decompressed: limits.max_decompressed_bytes,
            plan: None,
        }
    }

    fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// What the frame begun in the buffer needs in all: for a PackedForward frame, whose
    /// header announces its size, the whole frame and what decoding it makes, at once,
    /// so that a connection never holds part of what it needs while it waits for the
    /// rest (many connections each holding part of the budget would wait on each other
    /// for ever). Other frames grow by a read window at a time.
    fn budget_for_frame(&mut self) -> usize {
        let next_read = self.buf.len() + READ_WINDOW;
        if self.buf.is_empty() {
            return next_read;
        }
        if self.plan.is_none() {
            let hint = decode_hint(&self.buf);
            if let Some(len) = hint.entries_len {
                // The options map (chunk id, provenance: up to 9 bytes an event) follows
                // the entries; the estimate's margin covers it.
                let frame = self.framer.need().max(self.buf.len());
                self.plan = Some(frame + output_estimate(&hint, len, self.max_decompressed));
            }
        }
        self.plan.unwrap_or(0).max(next_read)
    }

    /// The next whole frame, with the budget held for its bytes; `None` at a clean end
    /// of stream (between frames).
    async fn next(&mut self, budget: &Budget) -> Option<Result<(BytesMut, Held), DecodeError>> {
        loop {
            match self.framer.next_frame(&mut self.buf) {
                Err(e) => return Some(Err(e)),
                Ok(Some(frame)) => {
                    // The frame takes what was held for it (its decoding included).
                    self.plan = None;
                    let held = self.held.split(self.held.bytes());
                    return Some(Ok((frame, held)));
                }
                Ok(None) => {}
            }
            let want = self.budget_for_frame().saturating_sub(FREE_BUFFER);
            if self.held.bytes() < want && !budget.try_grow(&mut self.held, want) {
                self.waiting_for_budget = true;
                let _busy = Busy::new(&self.busy);
                budget.grow(&mut self.held, want).await;
            }
            self.waiting_for_budget = false;
            // Hand the socket at most READ_WINDOW bytes of spare room: tokio-rustls
            // zero-fills all the unfilled space it is given on every read, and a frame
            // buffer grown to megabytes made that memset a sixth of the relay's CPU.
            self.buf.reserve(READ_WINDOW);
            let (io, buf) = (&mut self.io, &mut self.buf);
            let spare = buf.spare_capacity_mut();
            let window = spare.len().min(READ_WINDOW);
            let mut room = ReadBuf::uninit(&mut spare[..window]);
            if let Err(e) =
                std::future::poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut room)).await
            {
                return Some(Err(DecodeError::Io(e)));
            }
            let n = room.filled().len();
            // SAFETY: the reader initialised and filled these n bytes of the spare room.
            unsafe { buf.set_len(buf.len() + n) };
            self.read += n as u64;
            self.total += n as u64;
            if n == 0 {
                return match self.buf.is_empty() {
                    true => None,
                    false => Some(Err(DecodeError::UnexpectedEof {
                        buffered: self.buf.len(),
                    })),
                };
            }
        }
    }
}

/// The most one read may fill; a TLS record is at most 16 KiB of plaintext.
const READ_WINDOW: usize = 64 * 1024;

/// Uncompressed frames up to this size are decoded on the connection's own task.
const DECODE_INLINE: usize = 16 * 1024;

/// A decoded frame and the budget held for it until the spool has it.
struct Decoded {
    frame: Option<ClientFrame>,
    held: Held,
}

/// Decodes `frame` on the pool, holding budget for what decoding makes. `frame_held` is
/// the budget held for the frame's bytes; it is given back once they are decoded.
///
/// The output is budgeted before decoding from an estimate (the gzip trailer, or twice
/// the frame), and decoded with that estimate as its limit; an estimate that proves too
/// small (several gzip members, a client that lies) is raised once to
/// `max_decompressed` and the frame decoded again. Waiting for budget while holding
/// some is bounded by `frame_timeout`, so clients stalled on each other's budget cannot
/// wedge the relay.
async fn decode(
    frame: BytesMut,
    frame_held: Held,
    state: &ServerState,
    limits: Limits,
) -> Result<Decoded, Reject> {
    let hint = decode_hint(&frame);
    if hint.heartbeat {
        return Ok(Decoded {
            frame: None,
            held: frame_held,
        });
    }
    let max = limits.max_decompressed_bytes;
    // A gzip member inflates to at least what its trailer announces (modulo 4 GiB, and
    // the limit is far below): past the limit, it is refused without inflating a byte.
    // A trailer that lies low only moves the refusal to inflating up to the limit.
    if hint.gzip && hint.announced > max {
        return Err(decode_reject(
            DecodeError::DecompressedTooLarge { limit: max },
            0,
        ));
    }
    let entries = hint.entries_len.unwrap_or(frame.len());
    let mut estimate = output_estimate(&hint, entries, max);
    // The reader held budget for the frame and, for PackedForward, for decoding it: decode
    // within that rather than wait for more while holding it (only a frame that
    // inflates past it waits, below, bounded by frame_timeout).
    let mut held = frame_held;
    let have = (held.bytes() + FREE_BUFFER).saturating_sub(frame.len());
    if hint.entries_len.is_some() && have >= entries {
        let wanted = (frame.len() + estimate).saturating_sub(FREE_BUFFER);
        if !state.budget.try_grow(&mut held, wanted) {
            estimate = estimate.min(have);
        }
    }
    let mut bytes = frame;
    loop {
        let need = (bytes.len() + estimate).saturating_sub(FREE_BUFFER);
        let holding = held.bytes();
        reserve(state, &mut held, need, holding).await?;
        let limits = Limits {
            max_decompressed_bytes: estimate,
            ..limits
        };
        // A small uncompressed frame (fluent-logger sends one event per frame) costs less
        // to decode than to hand to another thread, and its cost is bounded by its size.
        let (decoded, back) = match !hint.gzip && bytes.len() <= DECODE_INLINE {
            true => (decode_client_frame(&bytes, &limits), bytes),
            false => {
                state
                    .pool
                    .run(move || (decode_client_frame(&bytes, &limits), bytes))
                    .await
            }
        };
        match decoded {
            Err(DecodeError::DecompressedTooLarge { .. }) if estimate < max => {
                estimate = max;
                bytes = back;
            }
            Err(e) => return Err(decode_reject(e, 0)),
            Ok(decoded) => {
                drop(back);
                let size = match &decoded {
                    Some(ClientFrame::Events(b)) => b.entries.len(),
                    _ => 0,
                };
                held.shrink(size);
                return Ok(Decoded {
                    frame: decoded,
                    held,
                });
            }
        }
    }
}

/// What decoding `entries_len` bytes of entries may make: the gzip trailer's size or 8×
/// the compressed size, whichever is larger (logs gzip 3–10×), or twice an uncompressed
/// frame (normalising event times can grow it); never past `max_decompressed`.
fn output_estimate(hint: &DecodeHint, entries_len: usize, max_decompressed: usize) -> usize {
    match hint.gzip {
        true => hint.announced.max(entries_len.saturating_mul(8)),
        false => entries_len.saturating_mul(2).saturating_add(4096),
    }
    .min(max_decompressed)
}

/// Grows `held` to `to`; waits at most `frame_timeout` if the connection already holds
/// budget (`holding` bytes), for as long as it takes if it holds none.
async fn reserve(
    state: &ServerState,
    held: &mut Held,
    to: usize,
    holding: usize,
) -> Result<(), Reject> {
    if state.budget.try_grow(held, to) {
        return Ok(());
    }
    if holding == 0 {
        state.budget.grow(held, to).await;
        return Ok(());
    }
    let wait = state.config.frame_timeout.get();
    match tokio::time::timeout(wait, state.budget.grow(held, to)).await {
        Ok(()) => Ok(()),
        Err(_) => Err(reject(
            RejectReason::MemoryBudget,
            format!(
                "no memory budget for {to} bytes within frame_timeout ({wait:?}): server.max_inflight_bytes ({}) is held by other connections; closing so this one's share comes back (the client resends)",
                state.config.max_inflight_bytes
            ),
        )),
    }
}

/// The name a client's certificate gives it: its first DNS name, else its common name.
fn certificate_name(cert: &rustls_pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                return Some(dns.to_string());
            }
        }
    }
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

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
            let cert_name = match state.config.requires_client_cert() {
                true => tls_stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(certificate_name),
                false => None,
            };
            session(tls_stream, link, cert_name).await
        }
        None => session(stream, link, None).await,
    }
}

async fn session<S>(stream: S, link: Link<'_>, cert_name: Option<String>) -> Result<(), Reject>
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
    let limits = Limits {
        max_frame_bytes: state.config.max_frame.as_usize(),
        max_decompressed_bytes: state.config.max_decompressed.as_usize(),
    };
    let budget = &state.budget;
    let mut frames = FrameReader::new(read, limits, budget);
    let mut codec = ServerCodec::new(limits);
    let mut out = BytesMut::with_capacity(256);

    // Who the client is: the hostname it authenticated with, else the name in its
    // certificate; None for an anonymous client (then its IP address names it).
    let identity: Option<Arc<str>> = if state.config.requires_auth() {
        let hostname = authenticate(
            &mut frames,
            &mut write,
            &mut codec,
            &mut out,
            state,
            handshake_deadline,
        )
        .await?;
        Some(hostname.into())
    } else {
        cert_name.map(Into::into)
    };
    let client = identity
        .as_deref()
        .map_or_else(|| peer.ip().to_string(), str::to_string);
    let bind = state.config.binds_sources() && identity.is_some();

    // Acks go out in order from a second task, so reading never waits for durability
    // (up to IN_FLIGHT_PER_CONNECTION chunks), and a slow spool backs up into this socket.
    // Each entry holds its chunk's budget until the spool has the chunk.
    let (ack_tx, mut ack_rx) = mpsc::channel::<(
        Option<String>,
        oneshot::Receiver<Result<Accepted, String>>,
        Held,
    )>(IN_FLIGHT_PER_CONNECTION);
    let end_to_end = state.config.ack == AckMode::EndToEnd;
    let required = state.required_sinks.clone();
    let demand = state.ack_demand.clone();
    let metrics = state.metrics.clone();
    let ack_write_timeout = state.config.frame_timeout.get();
    // Probes (chunks without events) are answered at once, ahead of the acks that wait
    // for the spool: they ask whether this relay still reads and answers, not whether a
    // chunk is durable, and a client decides from the answer whether to stay.
    let (probe_tx, mut probe_rx) = mpsc::channel::<String>(IN_FLIGHT_PER_CONNECTION);
    // Set once the client sent a probe (a sluice agent): only such a client is sent
    // ALIVE_ACK, which would confuse a Fluentd or Fluent Bit client waiting for its ack.
    let probing = Arc::new(AtomicBool::new(false));
    let busy = frames.busy.clone();
    // Set when the relay drains: the acker then ends with DRAINING_ACK.
    let draining = Arc::new(AtomicBool::new(false));
    let mut acker = tokio::spawn({
        let (draining, probing) = (draining.clone(), probing.clone());
        async move {
            // While the relay holds the client up (a chunk waiting for the spool or the
            // sinks, or the reader waiting on the relay), a probe may sit unread behind
            // it: say the relay is alive instead, so backpressure stays backpressure.
            let mut alive = tokio::time::interval(ALIVE_EVERY);
            alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut out = BytesMut::with_capacity(128);
            // The oldest chunk's way to its ack: the spool's reply, then (end_to_end)
            // the required sinks.
            let mut head: Option<futures::future::BoxFuture<'_, Result<Option<String>, Reject>>> =
                None;
            let mut chunks_open = true;
            loop {
                if !chunks_open && head.is_none() {
                    break;
                }
                let id = tokio::select! {
                    biased;
                    Some(id) = probe_rx.recv() => Some((id, false)),
                    _ = alive.tick(), if probing.load(Ordering::Relaxed) => {
                        let held_up = head.is_some() || busy.load(Ordering::Relaxed);
                        held_up.then(|| (ALIVE_ACK.to_string(), false))
                    }
                    settled = async { head.as_mut().expect("guarded").await }, if head.is_some() => {
                        head = None;
                        settled?.map(|id| (id, true))
                    }
                    next = ack_rx.recv(), if head.is_none() && chunks_open => {
                        match next {
                            Some((chunk, reply, held)) => {
                                head = Some(Box::pin(settle(chunk, reply, held, end_to_end, &demand, required.clone())));
                            }
                            None => chunks_open = false,
                        }
                        None
                    }
                };
                if let Some((id, chunk)) = id {
                    write_ack(&mut write, &mut out, &id, ack_write_timeout).await?;
                    // Chunks only: probes and ALIVE_ACK acknowledge no data.
                    if chunk {
                        metrics.acks_sent.inc();
                    }
                }
            }
            if draining.load(Ordering::Relaxed) && probing.load(Ordering::Relaxed) {
                // Every chunk read was answered above; nothing more is read. Only a
                // client that probes (a sluice agent) is told: it is an ack no other
                // client asked for.
                let _ = write_ack(&mut write, &mut out, DRAINING_ACK, ack_write_timeout).await;
            }
            let _ = write.shutdown().await;
            Ok(())
        }
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
            _ = conns.cancelled() => break drain(&draining),
            ended = &mut acker => {
                acker_ended = Some(ended);
                break Ok(());
            }
            n = tokio::time::timeout(step, frames.next(budget)) => n,
        };
        let (frame, frame_held) = match next {
            // Heartbeats are bytes without a frame: they keep the connection alive.
            Err(_) => {
                let now = tokio::time::Instant::now();
                if frames.total != seen {
                    seen = frames.total;
                    last_byte = now;
                }
                if frames.buffered() == 0 {
                    frame_begun = None;
                } else if now.duration_since(*frame_begun.get_or_insert(now)) >= frame_timeout {
                    let waiting = match frames.waiting_for_budget {
                        true => ", waiting for memory budget (server.max_inflight_bytes)",
                        false => "",
                    };
                    break Err(reject(
                        RejectReason::FrameTimeout,
                        format!(
                            "a frame begun was not finished within frame_timeout ({frame_timeout:?}; {} bytes buffered{waiting}); closing",
                            frames.buffered()
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
                if e.kind() == io::ErrorKind::UnexpectedEof && frames.buffered() == 0 =>
            {
                tracing::debug!(%peer, "client closed without TLS close_notify");
                break Ok(());
            }
            Ok(Some(Err(e))) => break Err(decode_reject(e, frames.buffered())),
            Ok(Some(Ok(frame))) => {
                frame_begun = None;
                last_byte = tokio::time::Instant::now();
                frame
            }
        };
        seen = frames.total;
        if let Some(rate) = &rate {
            let read = std::mem::take(&mut frames.read);
            let _busy = Busy::new(&frames.busy);
            tokio::select! {
                _ = conns.cancelled() => break drain(&draining),
                _ = rate.admit(&client, read) => {}
            }
        }
        let decoded = {
            let _busy = Busy::new(&frames.busy);
            tokio::select! {
                _ = conns.cancelled() => break drain(&draining),
                d = decode(frame, frame_held, state, limits) => d,
            }
        };
        let Decoded { frame, held } = match decoded {
            Ok(d) => d,
            Err(e) => break Err(e),
        };
        match frame {
            None => continue, // a heartbeat
            Some(ClientFrame::Ping(_)) => {
                break Err(reject(
                    RejectReason::Protocol,
                    "unexpected PING after the handshake",
                ))
            }
            Some(ClientFrame::Events(batch)) => {
                if bind {
                    if let Some(e) = foreign_source(&batch, identity.as_deref().unwrap_or("")) {
                        break Err(e);
                    }
                }
                let chunk = batch.options.chunk.clone();
                if batch.tag == sluice_forward::REPORT_TAG {
                    // An agent's report: into the ledger, acknowledged, never spooled.
                    take_report(&batch, &peer, identity.as_deref(), bind, state);
                    let (tx, rx) = oneshot::channel();
                    let _ = tx.send(Ok(Accepted {
                        end: Position::default(),
                        accepted: batch.count,
                        duplicates: 0,
                    }));
                    if ack_tx.send((chunk, rx, held)).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                if batch.count == 0 {
                    // A probe: nothing to spool, answered at once.
                    if let Some(id) = chunk {
                        probing.store(true, Ordering::Relaxed);
                        if probe_tx.send(id).await.is_err() {
                            break Ok(()); // the acker ended with its own error, reported below
                        }
                    }
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                let _busy = Busy::new(&frames.busy);
                if state
                    .writer
                    .send(WriterMsg::Write(WriteRequest {
                        batch,
                        connection,
                        client: identity.clone(),
                        reply: tx,
                    }))
                    .await
                    .is_err()
                {
                    break Err(reject(RejectReason::Shutdown, "relay shutting down"));
                }
                if ack_tx.send((chunk, rx, held)).await.is_err() {
                    break Ok(()); // the acker ended with its own error, reported below
                }
            }
        }
    };
    drop(ack_tx);
    drop(probe_tx);
    let acked = match acker_ended {
        Some(ended) => ended,
        None => acker.await,
    };
    let acked = match acked {
        Ok(acked) => acked,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Ok(()), // cancelled at shutdown
    };
    result.and(acked)
}

/// Cells in one agent report, at most (an agent sends at most 5,000 per frame).
const MAX_REPORT_CELLS: usize = 50_000;

/// Takes an agent's report (tag [`sluice_forward::REPORT_TAG`]) into the ledger's
/// `agents`: each cell's seqs are added to what the relay has (reports are cumulative,
/// so a repeat changes nothing). An unreadable report, or, with `bind_sources`, a cell of
/// a source not the client's own, is refused with a warning naming the peer; the rest
/// of the report is kept.
fn take_report(
    batch: &sluice_forward::EventBatch,
    peer: &std::net::SocketAddr,
    identity: Option<&str>,
    bind: bool,
    state: &ServerState,
) {
    #[derive(serde::Deserialize)]
    struct Cell {
        tag: String,
        hour: u64,
        source: String,
        seqs: sluice_core::ranges::SeqRanges,
    }
    #[derive(serde::Deserialize)]
    struct Wire {
        version: u32,
        #[serde(default)]
        agent: String,
        cells: Vec<Cell>,
    }
    let refuse = |why: String| {
        state.metrics.agent_reports_refused.inc();
        tracing::warn!(%peer, "agent report refused: {why}");
    };
    for entry in batch.iter() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return refuse(format!("entry unreadable: {e}")),
        };
        let json = match sluice_forward::record_field(entry.record, "report") {
            Ok(Some(json)) => json,
            Ok(None) => return refuse("the record has no field \"report\"".into()),
            Err(e) => return refuse(e.to_string()),
        };
        let wire: Wire = match serde_json::from_slice(json) {
            Ok(w) => w,
            Err(e) => return refuse(format!("field report: {e}")),
        };
        if wire.version != 1 {
            return refuse(format!(
                "report version {} (this relay reads version 1)",
                wire.version
            ));
        }
        if wire.cells.len() > MAX_REPORT_CELLS {
            return refuse(format!(
                "agent {:?}: {} cells in one report, more than {MAX_REPORT_CELLS}",
                wire.agent,
                wire.cells.len()
            ));
        }
        // Hours the ledger keeps: within its retention, and not far ahead of the clock.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 3600);
        let hours =
            now.saturating_sub(crate::writer::SEQ_HOURS)..=now + crate::writer::SEQ_FUTURE_HOURS;
        let (mut foreign, mut outside) = (None, 0usize);
        let cells: Vec<&Cell> = wire
            .cells
            .iter()
            .filter(|c| {
                if bind && !crate::record::owns(identity.unwrap_or(""), &c.source) {
                    foreign.get_or_insert(c.source.as_str());
                    return false;
                }
                if !hours.contains(&c.hour) {
                    outside += 1;
                    return false;
                }
                true
            })
            .collect();
        if let Some(source) = foreign {
            refuse(format!(
                "agent {:?} reports source {source:?}, which is not its own (bind_sources); its cells of foreign sources are left out",
                wire.agent
            ));
        }
        if outside > 0 {
            tracing::debug!(%peer, outside, "agent report cells outside the hours the ledger keeps, left out");
        }
        let mut ledger = state.ledger.lock().unwrap_or_else(|e| e.into_inner());
        for c in cells {
            ledger.agents.union(&c.tag, c.hour, &c.source, &c.seqs);
        }
        ledger.revision += 1;
        drop(ledger);
        state.metrics.agent_reports.inc();
    }
}

/// How often a client that probes hears [`ALIVE_ACK`] while the relay holds it up.
const ALIVE_EVERY: Duration = Duration::from_secs(1);

/// Marks a connection busy on the relay's side while alive.
struct Busy<'a>(&'a AtomicBool);

impl<'a> Busy<'a> {
    fn new(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Busy(flag)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The relay drains: the reader stops, and the acker answers what was read, then says so.
fn drain(draining: &AtomicBool) -> Result<(), Reject> {
    draining.store(true, Ordering::Relaxed);
    Ok(())
}

/// Waits until the chunk is durable (and, in `end_to_end` mode, at its required sinks);
/// gives the chunk id to acknowledge, if it asked for one.
async fn settle(
    chunk: Option<String>,
    reply: oneshot::Receiver<Result<Accepted, String>>,
    held: Held,
    end_to_end: bool,
    demand: &Option<Arc<watch::Sender<Position>>>,
    mut required: Vec<watch::Receiver<Position>>,
) -> Result<Option<String>, Reject> {
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
    // The spool has the chunk: its memory is free.
    drop(held);
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
        if let Some(demand) = demand {
            demand.send_if_modified(|furthest| {
                let further = accepted.end > *furthest;
                if further {
                    *furthest = accepted.end;
                }
                further
            });
        }
        for sink in required.iter_mut() {
            if sink.wait_for(|p| *p >= accepted.end).await.is_err() {
                return Err(reject(
                    RejectReason::Shutdown,
                    "relay shutting down before a sink had the chunk",
                ));
            }
        }
    }
    Ok(chunk)
}

/// Writes `{"ack": id}`; a client that stops reading its acks must not hold its slot
/// forever.
async fn write_ack<W: AsyncWrite + Unpin>(
    write: &mut W,
    out: &mut BytesMut,
    id: &str,
    timeout: Duration,
) -> Result<(), Reject> {
    out.clear();
    encode_ack(id, out);
    match tokio::time::timeout(timeout, write.write_all(out)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(reject(RejectReason::Io, format!("writing ack failed: {e}"))),
        Err(_) => Err(reject(
            RejectReason::Io,
            format!("the client took no ack for {timeout:?} (frame_timeout): it stopped reading; closing"),
        )),
    }
}

/// With `bind_sources`: the refusal of a chunk whose source id is not the client's own
/// (`{identity}:...`), or None when it is (or carries no provenance).
fn foreign_source(batch: &EventBatch, identity: &str) -> Option<Reject> {
    let source = &batch.options.provenance.as_ref()?.source;
    match crate::record::owns(identity, source) {
        true => None,
        false => Some(reject(
            RejectReason::SourceIdentity,
            format!(
                "chunk {} of tag {:?} claims source {source:?}, which is not this client's: it authenticated as {identity:?}, so its source ids must begin with \"{identity}:\" (server.bind_sources); closing without spooling it",
                batch.options.chunk.as_deref().unwrap_or("-"),
                batch.tag
            ),
        )),
    }
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
    frames: &mut FrameReader<R>,
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
    let events_first = || {
        reject(
            RejectReason::Auth,
            "sent events before authenticating (PING expected; is the client's shared_key set?)",
        )
    };
    let ping = loop {
        let frame = match tokio::time::timeout_at(deadline, frames.next(&state.budget)).await {
            Err(_) => {
                return Err(reject(
                    RejectReason::Auth,
                    format!("no PING within handshake_timeout ({timeout:?}, TLS included)"),
                ))
            }
            Ok(None) => return Err(reject(RejectReason::Auth, "closed during the handshake")),
            Ok(Some(Err(e))) => return Err(decode_reject(e, frames.buffered())),
            Ok(Some(Ok((frame, _held)))) => frame,
        };
        // Nothing is inflated for a client that has not authenticated.
        if decode_hint(&frame).gzip {
            return Err(events_first());
        }
        let limits = Limits {
            max_frame_bytes: frame.len(),
            max_decompressed_bytes: frame.len().saturating_mul(2).saturating_add(4096),
        };
        match decode_client_frame(&frame, &limits) {
            Ok(None) => continue, // a heartbeat
            Err(e) => return Err(decode_reject(e, 0)),
            Ok(Some(ClientFrame::Events(_))) => return Err(events_first()),
            Ok(Some(ClientFrame::Ping(p))) => break p,
        }
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
