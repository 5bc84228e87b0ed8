//! The forward output: sends sealed chunks to a relay over TLS, keeps at most
//! `in_flight` of them unacknowledged, and reports each acknowledgement back to the
//! reading thread (which moves the checkpoint).
//!
//! All chunks go to one relay at a time, so one source's chunks arrive in order at the
//! relay that holds its dedup state. When the connection fails, or an ack is late, every
//! unacknowledged chunk is resent, in order, on a new connection — to the next relay
//! when the current one cannot be reached. Reconnects back off exponentially with jitter.

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
    /// A chunk was not acknowledged in time.
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
        let connect_timeout = self.config.connect_timeout.get();
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(relay)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return failed(Failure::Connect, format!("cannot connect: {e}")),
            Err(_) => {
                return failed(
                    Failure::Connect,
                    format!("no connection within {connect_timeout:?}"),
                )
            }
        };
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => {
                self.exchange(tcp, window, chunks, input_open, commits)
                    .await
            }
            Some(config) => {
                let name = match &self.config.tls.server_name {
                    Some(n) => n.clone(),
                    None => split_host_port(relay).map(|(h, _)| h).unwrap_or_default(),
                };
                let Ok(server_name) = ServerName::try_from(name.clone()) else {
                    return failed(
                        Failure::Tls,
                        format!("{name:?} is not a valid TLS server name"),
                    );
                };
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                match tokio::time::timeout(connect_timeout, connector.connect(server_name, tcp)).await {
                    Ok(Ok(tls)) => self.exchange(tls, window, chunks, input_open, commits).await,
                    Ok(Err(e)) => failed(Failure::Tls, format!("TLS handshake with the relay failed: {e} (check output.tls.ca and output.tls.server_name)")),
                    Err(_) => failed(Failure::Tls, format!("TLS handshake not finished within {connect_timeout:?}")),
                }
            }
        }
    }

    async fn exchange<S>(
        &self,
        stream: S,
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
            let deadline = window
                .front()
                .and_then(|f| f.sent_at)
                .map(|t| t + ack_timeout)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
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
                    }
                    Some(Ok(other)) => return failed(Failure::Protocol, format!("unexpected frame from the relay: {}", frame_name(&other))),
                    Some(Err(e)) => return failed(Failure::Protocol, format!("bad response from the relay: {e}")),
                    None => return failed(Failure::Closed, "the relay closed the connection"),
                },
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return failed(Failure::AckTimeout, format!("no acknowledgement within {ack_timeout:?}; resending on a new connection"));
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
