//! What the forward_* end-to-end tests share: a relay with a `file` sink and TLS, a
//! blocking Forward client over rustls that can misbehave on purpose, and checks on the
//! relay's log and metrics.

#![allow(dead_code)] // each test file uses a different part

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use sluice_core::tls::{client_config, ClientTlsFiles};
use sluice_e2e::*;
use sluice_forward::{
    encode_compressed_packed_forward, gzip_entries, write_entry, AwaitingPong, ClientCodec,
    ClientFrame, ClientHandshake, ClientHandshakeError, EventBatch, EventTime, Limits, Options,
    Pong, ServerFrame,
};
use tokio_util::codec::{Decoder, Encoder};

pub const MAX_FRAME: usize = 1 << 20;

/// The relay of the forward_* tests: TLS with `server`, 1 MiB frames, a 5 s handshake
/// timeout, PONG as "relay-under-test", and one `file` sink ("file", `dir/sink.ndjson`).
/// Tests add keys (`spec.config.server.shared_key = ..`) and start it.
pub fn relay_spec(dir: &Path, server: &Issued) -> RelaySpec {
    let mut spec = RelaySpec::new(dir, "bad-input", server.server_tls());
    spec.config.server.max_frame = ByteSize(MAX_FRAME as u64);
    spec.config.server.handshake_timeout = Span::secs(5);
    spec.config.server.hostname = "relay-under-test".into();
    spec.config
        .sinks
        .push(file_sink("file", &dir.join("sink.ndjson")));
    spec
}

pub fn start_relay(dir: &Path, server: &Issued) -> Relay {
    relay_spec(dir, server).start()
}

/// Checks on how the relay turned a bad connection away.
pub trait Rejections {
    /// Waits for the one warning about `peer` (any peer when `None`) that contains
    /// `cause`, checks it is the only warning about that peer, and that the rejection
    /// was counted under `reason`. Returns the line.
    fn expect_rejected(&self, peer: Option<SocketAddr>, reason: &str, cause: &str) -> String;
}

impl Rejections for Relay {
    fn expect_rejected(&self, peer: Option<SocketAddr>, reason: &str, cause: &str) -> String {
        let peer_field = peer.map(|p| format!("peer={p}"));
        let matching = |log: &str| -> Vec<String> {
            log.lines()
                .filter(|l| l.contains("WARN"))
                .filter(|l| peer_field.as_ref().is_none_or(|p| l.contains(p.as_str())))
                .map(str::to_owned)
                .collect()
        };
        wait_for(
            &format!("a warning about {peer:?} containing {cause:?}"),
            Duration::from_secs(15),
            || {
                matching(&self.plain_log())
                    .iter()
                    .any(|l| l.contains(cause))
            },
        );
        let lines = matching(&self.plain_log());
        let line = lines.iter().find(|l| l.contains(cause)).unwrap().clone();
        if peer.is_some() {
            assert_eq!(lines.len(), 1, "one warning per bad connection: {lines:#?}");
        } else {
            assert!(line.contains("peer=127.0.0.1:"), "names the peer: {line}");
        }
        assert!(line.contains(&format!("reason=\"{reason}\"")), "{line}");
        wait_for(
            &format!("connections_rejected{{reason={reason:?}}} to count it"),
            Duration::from_secs(5),
            || self.rejected(reason) >= 1.0,
        );
        eprintln!("relay said: {line}");
        line
    }
}

pub fn tls_files(ca: &Path, client: Option<&Issued>, name: &str) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: Some(ca.to_owned()),
        cert: client.map(|c| c.cert.clone()),
        key: client.map(|c| c.key.clone()),
        server_name: Some(name.to_string()),
    }
}

/// A Forward client over TLS, blocking, for tests: sends raw bytes and reads server frames.
pub struct Conn {
    pub tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    pub local: SocketAddr,
    codec: ClientCodec,
    buf: BytesMut,
}

impl Conn {
    /// Connects and finishes the TLS handshake (as far as the client can tell: with
    /// TLS 1.3 a refused client certificate shows only on the first read).
    pub fn connect(addr: SocketAddr, files: &ClientTlsFiles) -> io::Result<Conn> {
        let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        Conn::handshake(sock, files)
    }

    pub fn handshake(sock: TcpStream, files: &ClientTlsFiles) -> io::Result<Conn> {
        let config = client_config(files).expect("client TLS config");
        let name = ServerName::try_from(files.server_name.clone().unwrap()).unwrap();
        let conn =
            rustls::ClientConnection::new(Arc::clone(&config), name).map_err(io::Error::other)?;
        sock.set_read_timeout(Some(Duration::from_secs(15)))?;
        let local = sock.local_addr()?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Conn {
            tls,
            local,
            codec: ClientCodec::new(Limits::default()),
            buf: BytesMut::new(),
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    /// The next frame from the relay; `Ok(None)` when it closed the connection.
    pub fn next_frame(&mut self) -> io::Result<Option<ServerFrame>> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).map_err(io::Error::other)? {
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 4096];
            match self.tls.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// HELO / PING / PONG as "test-client"; returns whether the relay accepted the key.
    pub fn authenticate(&mut self, key: &str) -> io::Result<bool> {
        self.authenticate_as("test-client", key)
    }

    /// HELO / PING / PONG as `hostname`; returns whether the relay accepted the key.
    pub fn authenticate_as(&mut self, hostname: &str, key: &str) -> io::Result<bool> {
        let (pong, awaiting) = self.ping(hostname, key)?;
        match awaiting.receive_pong(pong) {
            Ok(_) => Ok(true),
            Err(ClientHandshakeError::Refused { .. }) => Ok(false),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// HELO / PING as `hostname`; returns the relay's PONG as it came on the wire
    /// (unchecked), with the client state that checks it.
    pub fn ping(&mut self, hostname: &str, key: &str) -> io::Result<(Pong, AwaitingPong)> {
        let Some(ServerFrame::Helo(helo)) = self.next_frame()? else {
            return Err(io::Error::other("expected HELO"));
        };
        let (ping, awaiting) = ClientHandshake::new(helo).ping(hostname, key, None);
        let mut out = BytesMut::new();
        self.codec.encode(ClientFrame::Ping(ping), &mut out)?;
        self.send(&out)?;
        match self.next_frame()? {
            Some(ServerFrame::Pong(pong)) => Ok((pong, awaiting)),
            other => Err(io::Error::other(format!("expected PONG, got {other:?}"))),
        }
    }

    /// Sends one chunk of `count` events and waits for its acknowledgement.
    pub fn send_acked(&mut self, prefix: &str, first: u64, count: u64) -> io::Result<()> {
        let id = format!("{prefix}{first}");
        self.send(&chunk(prefix, first, count, &id))?;
        match self.next_frame()? {
            Some(ServerFrame::Ack(got)) if got == id => Ok(()),
            other => Err(io::Error::other(format!(
                "expected ack {id}, got {other:?}"
            ))),
        }
    }

    /// close_notify, then FIN.
    pub fn close(mut self) {
        self.tls.conn.send_close_notify();
        let _ = self.tls.flush();
        let _ = self.tls.sock.shutdown(Shutdown::Write);
    }

    /// Waits (up to the read timeout) until the relay closes the connection.
    pub fn expect_closed(&mut self) {
        match self.next_frame() {
            Ok(None) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the relay did not close the connection")
            }
            Err(_) => {} // reset, or a TLS alert
            Ok(Some(frame)) => panic!("unexpected frame {frame:?}"),
        }
    }
}

/// A connection the TLS layer refuses, on one side or the other: connects with `files`,
/// sends a chunk if the handshake lets it, and waits for the connection to end. Returns
/// the client's address (the relay's "peer") and the client-side error, if any.
pub fn refused(
    addr: SocketAddr,
    files: &ClientTlsFiles,
    prefix: &str,
) -> (SocketAddr, Option<io::Error>) {
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    let local = sock.local_addr().unwrap();
    match Conn::handshake(sock, files) {
        Err(e) => (local, Some(e)),
        Ok(mut conn) => {
            let _ = conn.send(&chunk(prefix, 1, 10, "x"));
            conn.expect_closed();
            (local, None)
        }
    }
}

/// One CompressedPackedForward chunk of events `{"message": "<prefix><n:08>"}`.
pub fn chunk(prefix: &str, first: u64, count: u64, id: &str) -> Vec<u8> {
    let mut entries = Vec::new();
    for n in first..first + count {
        let message = format!("{prefix}{n:08}");
        write_entry(
            &mut entries,
            EventTime::now(),
            &[("message", message.as_bytes())],
        );
    }
    let mut out = BytesMut::new();
    encode_compressed_packed_forward(
        "forward.test",
        &gzip_entries(&entries),
        count as usize,
        id,
        None,
        &mut out,
    );
    out.to_vec()
}

/// Messages starting with `prefix` that the file sink wrote.
pub fn delivered(sink: &Path, prefix: &str) -> HashSet<String> {
    let text = std::fs::read_to_string(sink).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["record"]["message"].as_str().map(str::to_owned))
        .filter(|m| m.starts_with(prefix))
        .collect()
}

pub fn wait_delivered(relay: &Relay, prefix: &str, count: u64) {
    wait_for(
        &format!("{count} events {prefix}* in the file sink"),
        Duration::from_secs(20),
        || delivered(&relay.sink_file("file"), prefix).len() as u64 == count,
    );
}

/// A well-behaved client on a new connection is acknowledged and its events delivered.
pub fn good_client_still_served(relay: &Relay, files: &ClientTlsFiles, key: Option<&str>) {
    let mut conn = Conn::connect(relay.forward, files).expect("good client connects");
    if let Some(key) = key {
        assert!(conn.authenticate(key).unwrap(), "good key accepted");
    }
    conn.send_acked("good-", 1, 500).expect("good chunk acked");
    conn.close();
    wait_delivered(relay, "good-", 500);
}

/// Deterministic noise (xorshift), so a failure can be replayed.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub server: Issued,
}

pub fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "relay");
    let server = ca.issue("server", &["localhost", "127.0.0.1"], false);
    Setup { dir, ca, server }
}

/// One CompressedPackedForward chunk like [`chunk`], carrying provenance: `source` and
/// the seqs `first..first + count` (or the given seqs).
pub fn chunk_from(source: &str, prefix: &str, seqs: &[u64], id: &str) -> Vec<u8> {
    let mut entries = Vec::new();
    for n in seqs {
        let message = format!("{prefix}{n:08}");
        write_entry(
            &mut entries,
            EventTime::now(),
            &[("message", message.as_bytes())],
        );
    }
    let provenance = sluice_forward::Provenance {
        source: source.to_string(),
        seqs: seqs.to_vec(),
        offsets: Vec::new(),
    };
    let mut out = BytesMut::new();
    encode_compressed_packed_forward(
        "forward.test",
        &gzip_entries(&entries),
        seqs.len(),
        id,
        Some(&provenance),
        &mut out,
    );
    out.to_vec()
}

impl Conn {
    /// Sends `bytes` (a chunk with id `id`) and waits for its acknowledgement.
    pub fn send_expect_ack(&mut self, bytes: &[u8], id: &str) -> io::Result<()> {
        self.send(bytes)?;
        match self.next_frame()? {
            Some(ServerFrame::Ack(got)) if got == id => Ok(()),
            other => Err(io::Error::other(format!(
                "expected ack {id}, got {other:?}"
            ))),
        }
    }
}

/// An uncompressed PackedForward chunk whose events carry `pad` bytes of filler each, so
/// its size on the wire is what the test says.
pub fn padded_chunk(prefix: &str, first: u64, count: u64, pad: usize, id: &str) -> Vec<u8> {
    let filler = "x".repeat(pad);
    let mut entries = Vec::new();
    for n in first..first + count {
        let message = format!("{prefix}{n:08}");
        write_entry(
            &mut entries,
            EventTime::now(),
            &[("message", message.as_bytes()), ("pad", filler.as_bytes())],
        );
    }
    let batch = EventBatch {
        hours: Vec::new(),
        tag: "forward.limits".into(),
        entries,
        count: count as usize,
        options: Options {
            chunk: Some(id.to_string()),
            ..Options::default()
        },
    };
    let mut out = BytesMut::new();
    ClientCodec::new(Default::default())
        .encode(ClientFrame::Events(batch), &mut out)
        .unwrap();
    out.to_vec()
}
