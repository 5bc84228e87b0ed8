//! The forward output: sends sealed chunks to a relay over TLS, keeps at most
//! `in_flight` of them unacknowledged, and reports each acknowledgement back to the
//! reading thread (which moves the checkpoint).
//!
//! All chunks go to one relay at a time, so one source's chunks arrive in order at the
//! relay that holds its dedup state. When the connection fails, every unacknowledged
//! chunk is resent, in order, on a new connection — to the next relay when the current
//! one cannot be reached or refuses us. Reconnects back off exponentially with jitter.
//!
//! A late ack alone is no reason to leave a relay: in `end_to_end` mode a relay acks only
//! once its required sinks have the chunk, and every relay it could move to would spool
//! (and deliver) a copy of the whole window. So when the oldest chunk is `ack_timeout`
//! late, the agent checks the relay with a second, short-lived connection (Fluentd's
//! `heartbeat_type transport`: TCP, TLS and the shared-key handshake, then closed). A relay
//! that answers is waited for on the same connection (one warning per episode,
//! `sluice_agent_ack_waits_total`), and checked again every `ack_timeout`; one that does
//! not answer is left, and the window resent to the next relay.

use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use rustls::pki_types::ServerName;
use sluice_forward::{
    ClientCodec, ClientFrame, ClientHandshake, ClientHandshakeError, DecodeError, Limits,
    ServerFrame,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::config::{split_host_port, OutputConfig};
use crate::metrics::AgentMetrics;
use crate::pipeline::{Chunk, Commit};

pub struct Output {
    pub config: OutputConfig,
    pub agent_id: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub metrics: Arc<AgentMetrics>,
}

struct InFlight {
    chunk: Chunk,
    sent_at: Option<Instant>,
}

/// Why a session with a relay ended.
enum End {
    /// Nothing left to send and the input is closed.
    Done,
    Failed {
        reason: Failure,
        message: String,
    },
}

/// What went wrong with a relay: the `relay_errors{reason}` label, and what decides
/// whether the agent stays on that relay or fails over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// No TCP connection.
    Connect,
    /// The TLS handshake failed or timed out.
    Tls,
    /// The HELO/PING/PONG handshake failed.
    Auth,
    /// A chunk was not acknowledged in time, and the relay did not answer a new
    /// connection either (hung, overloaded past answering, or cut off).
    AckTimeout,
    /// Writing to the connection failed.
    Io,
    /// The relay sent something it should not have.
    Protocol,
    /// The relay closed the connection.
    Closed,
}

impl Failure {
    fn as_label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Tls => "tls",
            Failure::Auth => "auth",
            Failure::AckTimeout => "ack_timeout",
            Failure::Io => "io",
            Failure::Protocol => "protocol",
            Failure::Closed => "closed",
        }
    }

    /// A relay that cannot be reached, refuses us, or does not answer is left at once;
    /// a connection that merely broke is worth retrying on the same relay.
    fn relay_unusable(self) -> bool {
        match self {
            Failure::Connect | Failure::Tls | Failure::Auth | Failure::AckTimeout => true,
            Failure::Io | Failure::Protocol | Failure::Closed => false,
        }
    }
}

/// A connection to a relay: TCP, or TLS over TCP.
type RelayStream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// The oldest chunk is overdue and the relay still answers: the agent waits for it.
struct AckWait {
    /// When the chunk that was overdue first had been sent.
    since: Instant,
    /// When to check the relay again if no ack came meanwhile.
    next_probe: Instant,
}

fn failed(reason: Failure, message: impl Into<String>) -> End {
    End::Failed {
        reason,
        message: message.into(),
    }
}

impl Output {
    pub async fn run(
        self,
        mut chunks: mpsc::Receiver<Chunk>,
        commits: Sender<Commit>,
        abort: CancellationToken,
    ) {
        let relays = &self.config.relays;
        // Spread agents over relays; stay on one while it is healthy.
        let mut current = self
            .agent_id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % relays.len();
        let mut window: VecDeque<InFlight> = VecDeque::new();
        let mut backoff = self.config.retry_min.get();
        let mut input_open = true;
        // Whether the last session on `current` ended without a single ack.
        let mut fruitless = false;
        loop {
            if !input_open && window.is_empty() {
                return;
            }
            let relay = relays[current].clone();
            let started = Instant::now();
            let acked_before = self.metrics.chunks_acked.get();
            let end = tokio::select! {
                _ = abort.cancelled() => {
                    if !window.is_empty() {
                        tracing::warn!(unacknowledged = window.len(), "shutdown timeout: unacknowledged chunks will be re-read from the files at the next start");
                    }
                    return;
                }
                end = self.session(&relay, &mut window, &mut chunks, &mut input_open, &commits) => end,
            };
            match end {
                End::Done => return,
                End::Failed { reason, message } => {
                    self.metrics.relay_error(reason.as_label());
                    tracing::warn!(relay = %relay, reason = reason.as_label(), unacknowledged = window.len(), "{message}");
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = self.config.retry_min.get();
                    }
                    // A relay that cannot be reached or does not answer is left at once. A
                    // connection that merely broke is retried on the same relay first, so a
                    // source's chunks keep going where its dedup state is; only a second
                    // failure in a row without any ack moves on.
                    let progress = self.metrics.chunks_acked.get() > acked_before;
                    let unreachable = reason.relay_unusable();
                    if relays.len() > 1 && (unreachable || (fruitless && !progress)) {
                        current = (current + 1) % relays.len();
                        tracing::info!(from = %relay, to = %relays[current], "failing over to the next relay");
                        fruitless = false;
                    } else {
                        fruitless = !progress;
                    }
                    for f in window.iter_mut() {
                        f.sent_at = None;
                    }
                    let jitter = rand::random::<f64>() * 0.5 + 0.75;
                    let wait = backoff.mul_f64(jitter);
                    tokio::select! {
                        _ = abort.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(self.config.retry_max.get());
                }
            }
        }
    }

    async fn session(
        &self,
        relay: &str,
        window: &mut VecDeque<InFlight>,
        chunks: &mut mpsc::Receiver<Chunk>,
        input_open: &mut bool,
        commits: &Sender<Commit>,
    ) -> End {
        match self.connect(relay).await {
            Ok(stream) => {
                self.exchange(stream, relay, window, chunks, input_open, commits)
                    .await
            }
            Err(end) => end,
        }
    }

    /// TCP, then TLS unless `insecure`; the Forward handshake is the caller's.
    async fn connect(&self, relay: &str) -> Result<RelayStream, End> {
        let connect_timeout = self.config.connect_timeout.get();
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(relay)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(failed(Failure::Connect, format!("cannot connect: {e}"))),
            Err(_) => {
                return Err(failed(
                    Failure::Connect,
                    format!("no connection within {connect_timeout:?}"),
                ))
            }
        };
        let _ = tcp.set_nodelay(true);
        let Some(config) = &self.tls else {
            return Ok(Either::Left(tcp));
        };
        let name = match &self.config.tls.server_name {
            Some(n) => n.clone(),
            None => split_host_port(relay).map(|(h, _)| h).unwrap_or_default(),
        };
        let Ok(server_name) = ServerName::try_from(name.clone()) else {
            return Err(failed(
                Failure::Tls,
                format!("{name:?} is not a valid TLS server name"),
            ));
        };
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        match tokio::time::timeout(connect_timeout, connector.connect(server_name, tcp)).await {
            Ok(Ok(tls)) => Ok(Either::Right(tls)),
            Ok(Err(e)) => Err(failed(Failure::Tls, format!("TLS handshake with the relay failed: {e} (check output.tls.ca and output.tls.server_name)"))),
            Err(_) => Err(failed(Failure::Tls, format!("TLS handshake not finished within {connect_timeout:?}"))),
        }
    }

    /// Whether `relay` answers: a new connection with the same transport and handshake
    /// as a session (Fluentd's `heartbeat_type transport`), closed at once, sending no
    /// data. With TLS or a shared key the relay process itself has to answer; over plain
    /// TCP without a key only its kernel does (a hung process still completes the TCP
    /// handshake from its listen backlog), so that setup proves less.
    async fn probe(&self, relay: &str) -> Result<(), (Failure, String)> {
        let unanswered = |end: End| match end {
            End::Failed { reason, message } => (reason, message),
            End::Done => (Failure::Protocol, "probe ended without an answer".into()),
        };
        let stream = self.connect(relay).await.map_err(unanswered)?;
        let (read, mut write) = tokio::io::split(stream);
        if let Some(key) = &self.config.shared_key {
            let mut frames = FramedRead::new(read, ClientCodec::new(Limits::default()));
            self.authenticate(key, &mut frames, &mut write)
                .await
                .map_err(unanswered)?;
        }
        let _ = write.shutdown().await;
        Ok(())
    }

    async fn exchange<S>(
        &self,
        stream: S,
        relay: &str,
        window: &mut VecDeque<InFlight>,
        chunks: &mut mpsc::Receiver<Chunk>,
        input_open: &mut bool,
        commits: &Sender<Commit>,
    ) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (read, mut write) = tokio::io::split(stream);
        let mut frames = FramedRead::new(read, ClientCodec::new(Limits::default()));
        if let Some(key) = &self.config.shared_key {
            if let Err(end) = self.authenticate(key, &mut frames, &mut write).await {
                return end;
            }
        }
        // Resend everything unacknowledged, in order.
        for f in window.iter_mut() {
            if let Err(e) = write.write_all(&f.chunk.frame).await {
                return failed(Failure::Io, format!("resending failed: {e}"));
            }
            f.sent_at = Some(Instant::now());
            self.metrics.chunks_resent.inc();
        }
        self.metrics.in_flight.set(window.len() as i64);
        let ack_timeout = self.config.ack_timeout.get();
        let heartbeat = self.config.heartbeat_interval.get();
        let mut last_write = Instant::now();
        // An overdue ack starts a probe of the relay (a second connection); while the
        // relay answers, this connection keeps waiting (`wait`).
        let mut probe: Option<futures::future::BoxFuture<'_, Result<(), (Failure, String)>>> = None;
        let mut wait: Option<AckWait> = None;
        loop {
            if !*input_open && window.is_empty() {
                let _ = write.shutdown().await;
                return End::Done;
            }
            // An idle connection gets a heartbeat; with data flowing, chunks are enough.
            let beat_at = if heartbeat.is_zero() {
                Instant::now() + Duration::from_secs(3600)
            } else {
                last_write + heartbeat
            };
            let oldest = window.front().and_then(|f| f.sent_at);
            let deadline = match (&wait, oldest) {
                (_, None) => Instant::now() + Duration::from_secs(3600),
                (Some(w), Some(_)) => w.next_probe,
                (None, Some(t)) => t + ack_timeout,
            };
            let room = window.len() < self.config.in_flight && *input_open;
            tokio::select! {
                chunk = chunks.recv(), if room => match chunk {
                    Some(chunk) => {
                        if let Err(e) = write.write_all(&chunk.frame).await {
                            window.push_back(InFlight { chunk, sent_at: None });
                            return failed(Failure::Io, format!("sending failed: {e}"));
                        }
                        self.metrics.chunks_sent.inc();
                        last_write = Instant::now();
                        window.push_back(InFlight { chunk, sent_at: Some(Instant::now()) });
                        self.metrics.in_flight.set(window.len() as i64);
                    }
                    None => *input_open = false,
                },
                frame = frames.next() => match frame {
                    Some(Ok(ServerFrame::Ack(id))) => {
                        let Some(at) = window.iter().position(|f| f.chunk.id == id) else {
                            tracing::warn!(ack = %id, "relay acknowledged a chunk that is not in flight; ignored");
                            continue;
                        };
                        // Acks come in order; one for a later chunk would mean the relay
                        // skipped one, so keep the earlier ones in flight (resent on timeout).
                        let done = window.remove(at).map(|f| f.chunk);
                        if let Some(chunk) = done {
                            self.metrics.chunks_acked.inc();
                            self.metrics.events_acked.inc_by(chunk.count as u64);
                            let blocked = window.iter().take(at).any(|f| f.chunk.input == chunk.input && f.chunk.source == chunk.source);
                            if !blocked {
                                let _ = commits.send(Commit { input: chunk.input, source: chunk.source, end: chunk.end });
                            }
                        }
                        self.metrics.in_flight.set(window.len() as i64);
                        // Acks flow again once the oldest chunk left is not overdue: the
                        // episode (and any probe for it) is over.
                        let overdue = window.front().and_then(|f| f.sent_at).is_some_and(|t| t.elapsed() >= ack_timeout);
                        if !overdue {
                            probe = None;
                            if let Some(w) = wait.take() {
                                tracing::info!(relay = %relay, waited = ?w.since.elapsed(), "acknowledgements resumed");
                            }
                        }
                    }
                    Some(Ok(other)) => return failed(Failure::Protocol, format!("unexpected frame from the relay: {}", frame_name(&other))),
                    Some(Err(e)) => return failed(Failure::Protocol, format!("bad response from the relay: {e}")),
                    None => return failed(Failure::Closed, "the relay closed the connection"),
                },
                _ = tokio::time::sleep_until(deadline.into()), if probe.is_none() => {
                    probe = Some(Box::pin(self.probe(relay)));
                }
                answered = async { probe.as_mut().expect("guarded by is_some").await }, if probe.is_some() => {
                    probe = None;
                    let age = oldest.map(|t| t.elapsed()).unwrap_or_default();
                    match answered {
                        Err((reason, message)) => {
                            return failed(Failure::AckTimeout, format!(
                                "no acknowledgement for {age:?} (ack_timeout {ack_timeout:?}), and the relay does not answer a new connection ({}: {message}); resending to the next relay",
                                reason.as_label()
                            ));
                        }
                        Ok(()) => {
                            let next_probe = Instant::now() + ack_timeout;
                            match &mut wait {
                                Some(w) => {
                                    tracing::debug!(relay = %relay, oldest_chunk_age = ?age, "still no acknowledgement; the relay still answers");
                                    w.next_probe = next_probe;
                                }
                                None => {
                                    self.metrics.ack_waits.inc();
                                    tracing::warn!(relay = %relay, oldest_chunk_age = ?age, unacknowledged = window.len(), "no acknowledgement within ack_timeout ({ack_timeout:?}), but the relay still answers: waiting on it instead of failing over (in end_to_end mode its sinks may be slow; another relay would only spool a second copy)");
                                    wait = Some(AckWait { since: oldest.unwrap_or_else(Instant::now), next_probe });
                                }
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(beat_at.into()) => {
                    // Forward's heartbeat: a msgpack nil, skipped by servers.
                    if let Err(e) = write.write_all(&[0xc0]).await {
                        return failed(Failure::Io, format!("heartbeat to an idle relay failed: {e}"));
                    }
                    self.metrics.heartbeats.inc();
                    last_write = Instant::now();
                }
            }
        }
    }

    async fn authenticate<R, W>(
        &self,
        key: &str,
        frames: &mut FramedRead<R, ClientCodec>,
        write: &mut W,
    ) -> Result<(), End>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let timeout = self.config.connect_timeout.get();
        let helo = match tokio::time::timeout(timeout, frames.next()).await {
            Ok(Some(Ok(ServerFrame::Helo(h)))) => h,
            Ok(Some(Ok(other))) => {
                return Err(failed(
                    Failure::Auth,
                    format!("expected HELO, got {}", frame_name(&other)),
                ))
            }
            Ok(Some(Err(e))) => return Err(failed(Failure::Auth, format!("bad HELO: {e}"))),
            Ok(None) => {
                return Err(failed(
                    Failure::Auth,
                    "the relay closed the connection before HELO",
                ))
            }
            Err(_) => {
                return Err(failed(
                    Failure::Auth,
                    format!("no HELO within {timeout:?}; does the relay have a shared_key?"),
                ))
            }
        };
        let user = match (&self.config.username, &self.config.password) {
            (Some(user), Some(password)) => Some((user.as_str(), password.as_str())),
            _ => None,
        };
        // An auth salt in HELO is no reason to give up without a user: Fluent Bit sends
        // one to everybody. The PING then has an empty user and the PONG decides.
        let (ping, awaiting) = ClientHandshake::new(helo).ping(&self.agent_id, key, user);
        let mut out = BytesMut::new();
        ClientCodec::new(Limits::default())
            .encode(ClientFrame::Ping(ping), &mut out)
            .map_err(|e| failed(Failure::Auth, format!("encoding PING: {e}")))?;
        write
            .write_all(&out)
            .await
            .map_err(|e| failed(Failure::Io, format!("sending PING: {e}")))?;
        let pong = match tokio::time::timeout(timeout, frames.next()).await {
            Ok(Some(Ok(ServerFrame::Pong(p)))) => p,
            Ok(Some(Ok(other))) => {
                return Err(failed(
                    Failure::Auth,
                    format!("expected PONG, got {}", frame_name(&other)),
                ))
            }
            // A TLS peer that closes without close_notify shows as an unexpected EOF.
            Ok(Some(Err(DecodeError::Io(e)))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(failed(Failure::Auth, CLOSED_WITHOUT_PONG))
            }
            Ok(Some(Err(e))) => return Err(failed(Failure::Auth, format!("bad PONG: {e}"))),
            Ok(None) => return Err(failed(Failure::Auth, CLOSED_WITHOUT_PONG)),
            Err(_) => return Err(failed(Failure::Auth, format!("no PONG within {timeout:?}"))),
        };
        awaiting
            .receive_pong(pong)
            .map(|_authenticated| ())
            .map_err(|e| failed(Failure::Auth, handshake_message(&e)))
    }
}

const CLOSED_WITHOUT_PONG: &str = "the relay closed the connection during authentication, \
     without a PONG (Fluent Bit's in_forward does that when the shared key is wrong: check output.shared_key)";

/// A failed handshake in the agent operator's words, naming the config keys involved.
fn handshake_message(e: &ClientHandshakeError) -> String {
    match e {
        ClientHandshakeError::Refused {
            reason,
            without_user: false,
        } => format!("the relay refused the handshake; its PONG says: {reason:?}"),
        ClientHandshakeError::Refused {
            reason,
            without_user: true,
        } => format!(
            "the relay refused the handshake; its PONG says: {reason:?} (its HELO offered user \
             authentication and output.username is not set: if the relay has users, set \
             output.username and output.password; otherwise check output.shared_key)"
        ),
        ClientHandshakeError::WrongDigest => {
            "the relay's PONG digest is wrong: it does not know our shared key".into()
        }
        ClientHandshakeError::SameHostname => {
            "the relay's PONG claims this agent's own hostname (output.shared_key is not proven by an echoed digest): refused; give the relay a server.hostname of its own".into()
        }
    }
}

fn frame_name(f: &ServerFrame) -> &'static str {
    match f {
        ServerFrame::Helo(_) => "HELO",
        ServerFrame::Pong(_) => "PONG",
        ServerFrame::Ack(_) => "ack",
    }
}

#[cfg(test)]
mod tests {
    //! The output against fake relays on loopback (plain TCP, no key): a relay that holds
    //! its ack but still takes connections is waited for; one that stops taking
    //! connections is left for the next.

    use super::*;
    use crate::source::SourceId;
    use sluice_forward::{encode_ack, encode_compressed_packed_forward, gzip_entries, write_entry};
    use sluice_forward::{ClientFrame, EventTime, ServerCodec};
    use tokio::net::TcpListener;

    fn chunk(id: &str) -> Chunk {
        let mut entries = Vec::new();
        write_entry(&mut entries, EventTime::now(), &[("message", b"hi")]);
        let mut frame = BytesMut::new();
        encode_compressed_packed_forward("app", &gzip_entries(&entries), 1, id, None, &mut frame);
        Chunk {
            id: id.into(),
            input: 0,
            source: SourceId("s".into()),
            end: 1,
            count: 1,
            frame: frame.freeze(),
        }
    }

    fn output(relays: &[std::net::SocketAddr]) -> Output {
        let config: OutputConfig = serde_json::from_value(serde_json::json!({
            "relays": relays.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "insecure": true,
            "ack_timeout": "200ms",
            "connect_timeout": "500ms",
            "retry_min": "10ms",
            "retry_max": "50ms",
        }))
        .unwrap();
        Output {
            config,
            agent_id: "agent".into(),
            tls: None,
            metrics: Arc::new(AgentMetrics::default()),
        }
    }

    /// A relay that reads chunks and acks each one only when `ack` is told its id.
    /// Connections that send nothing are probes.
    struct FakeRelay {
        addr: std::net::SocketAddr,
        received: Arc<std::sync::Mutex<Vec<String>>>,
        ack: tokio::sync::broadcast::Sender<String>,
        task: tokio::task::JoinHandle<()>,
    }

    impl FakeRelay {
        async fn start() -> FakeRelay {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let received = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (ack, _) = tokio::sync::broadcast::channel::<String>(16);
            let task = tokio::spawn({
                let (received, ack) = (received.clone(), ack.clone());
                async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        let (received, mut acks) = (received.clone(), ack.subscribe());
                        tokio::spawn(async move {
                            let (read, mut write) = tokio::io::split(stream);
                            let mut frames =
                                FramedRead::new(read, ServerCodec::new(Limits::default()));
                            let mut mine = Vec::new();
                            loop {
                                tokio::select! {
                                    frame = frames.next() => match frame {
                                        Some(Ok(ClientFrame::Events(b))) => {
                                            let id = b.options.chunk.clone().unwrap();
                                            received.lock().unwrap().push(id.clone());
                                            mine.push(id);
                                        }
                                        _ => return,
                                    },
                                    Ok(id) = acks.recv() => if mine.contains(&id) {
                                        let mut out = BytesMut::new();
                                        encode_ack(&id, &mut out);
                                        let _ = write.write_all(&out).await;
                                    },
                                }
                            }
                        });
                    }
                }
            });
            FakeRelay {
                addr,
                received,
                ack,
                task,
            }
        }

        fn received(&self) -> Vec<String> {
            self.received.lock().unwrap().clone()
        }

        /// Stops accepting connections (the listener closes); open ones go on.
        fn stop_listening(&self) {
            self.task.abort();
        }
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the chunk to reach one of the two relays: (the one it chose, the other).
    async fn chosen<'r>(a: &'r FakeRelay, b: &'r FakeRelay) -> (&'r FakeRelay, &'r FakeRelay) {
        until("the chunk to reach a relay", || {
            !a.received().is_empty() || !b.received().is_empty()
        })
        .await;
        match a.received().is_empty() {
            true => (b, a),
            false => (a, b),
        }
    }

    #[tokio::test]
    async fn a_late_ack_from_a_relay_that_answers_is_waited_for() {
        let (a, b) = (FakeRelay::start().await, FakeRelay::start().await);
        let out = output(&[a.addr, b.addr]);
        let metrics = out.metrics.clone();
        let (chunk_tx, chunk_rx) = mpsc::channel(4);
        let (commit_tx, commit_rx) = std::sync::mpsc::channel();
        let task = tokio::spawn(out.run(chunk_rx, commit_tx, CancellationToken::new()));
        chunk_tx.send(chunk("c1")).await.unwrap();
        let (active, other) = chosen(&a, &b).await;
        // The ack is late: one episode, then several more ack timeouts without an ack,
        // and still no failover and no resend.
        until("the late ack to be noticed", || {
            metrics.ack_waits.get() == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(metrics.ack_waits.get(), 1);
        assert_eq!(metrics.chunks_resent.get(), 0);
        assert!(
            other.received().is_empty(),
            "failed over to the other relay"
        );
        assert_eq!(active.received(), ["c1"]);
        active.ack.send("c1".into()).unwrap();
        until("the ack", || metrics.chunks_acked.get() == 1).await;
        assert_eq!(commit_rx.recv().unwrap().end, 1);
        // A second late ack is a second episode.
        chunk_tx.send(chunk("c2")).await.unwrap();
        until("a second episode", || metrics.ack_waits.get() == 2).await;
        active.ack.send("c2".into()).unwrap();
        drop(chunk_tx);
        task.await.unwrap();
        assert!(other.received().is_empty());
        let errors = metrics.relay_errors.get_or_create(&crate::metrics::Reason {
            reason: "ack_timeout".into(),
        });
        assert_eq!(errors.get(), 0);
    }

    #[tokio::test]
    async fn a_late_ack_from_a_relay_that_stopped_answering_fails_over() {
        let (a, b) = (FakeRelay::start().await, FakeRelay::start().await);
        let out = output(&[a.addr, b.addr]);
        let metrics = out.metrics.clone();
        let (chunk_tx, chunk_rx) = mpsc::channel(4);
        let (commit_tx, _commit_rx) = std::sync::mpsc::channel();
        let task = tokio::spawn(out.run(chunk_rx, commit_tx, CancellationToken::new()));
        chunk_tx.send(chunk("c1")).await.unwrap();
        let (active, other) = chosen(&a, &b).await;
        active.stop_listening();
        until("the chunk to be resent to the other relay", || {
            other.received() == ["c1"]
        })
        .await;
        let errors = metrics.relay_errors.get_or_create(&crate::metrics::Reason {
            reason: "ack_timeout".into(),
        });
        assert_eq!(errors.get(), 1);
        assert_eq!(metrics.ack_waits.get(), 0);
        other.ack.send("c1".into()).unwrap();
        drop(chunk_tx);
        task.await.unwrap();
        assert_eq!(metrics.chunks_acked.get(), 1);
    }
}
