//! Bad input against the real relay over real TLS on loopback: every way a client can
//! misbehave closes *that* connection with one warning naming the peer and the cause and
//! one `sluice_relay_connections_rejected_total{reason}` count; a well-behaved client on
//! another connection is still acknowledged and delivered, and whatever the bad
//! connection had acknowledged before it misbehaved reaches the sink too.
//!
//! No Kafka or S3 needed: the relay writes to a `file` sink in a temp dir.

mod forward_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use forward_common::*;
use sluice_e2e::*;

#[test]
fn random_bytes_close_only_that_connection() {
    let s = setup();
    let relay = start_relay(s.dir.path(), &s.server);
    let files = tls_files(&s.ca.ca, None, "localhost");

    let mut bad = Conn::connect(relay.forward, &files).unwrap();
    bad.send_acked("before-noise-", 1, 100).unwrap();
    let peer = bad.local;
    // With this seed the first byte is 0xb1, a short string: not a Forward frame.
    let _ = bad.send(&noise(64 << 10, 0x5eed_0001));
    bad.expect_closed();
    drop(bad);

    let line = relay.expect_rejected(Some(peer), "malformed", "bad frame");
    assert!(line.contains("not a Forward frame"), "{line}");
    good_client_still_served(&relay, &files, None);
    wait_delivered(&relay, "before-noise-", 100);
    assert_eq!(relay.rejected("malformed"), 1.0);
}

#[test]
fn truncated_frame_closes_only_that_connection() {
    let s = setup();
    let relay = start_relay(s.dir.path(), &s.server);
    let files = tls_files(&s.ca.ca, None, "localhost");

    let mut bad = Conn::connect(relay.forward, &files).unwrap();
    bad.send_acked("before-cut-", 1, 100).unwrap();
    let peer = bad.local;
    let whole = chunk("cut-", 1, 100, "cut");
    bad.send(&whole[..whole.len() / 2]).unwrap();
    bad.close();

    let line = relay.expect_rejected(Some(peer), "truncated", "connection closed inside a frame");
    assert!(
        line.contains(&format!("{} bytes", whole.len() / 2)),
        "{line}"
    );
    good_client_still_served(&relay, &files, None);
    wait_delivered(&relay, "before-cut-", 100);
    assert!(
        delivered(&relay.sink_file("file"), "cut-").is_empty(),
        "half a frame is nothing"
    );
}

#[test]
fn oversized_frame_is_refused_before_it_is_buffered() {
    let s = setup();
    let relay = start_relay(s.dir.path(), &s.server);
    let files = tls_files(&s.ca.ca, None, "localhost");

    let mut bad = Conn::connect(relay.forward, &files).unwrap();
    bad.send_acked("before-big-", 1, 100).unwrap();
    let peer = bad.local;
    // [tag, bin32 of 64 MiB, ...]: the header alone says it is too large, so the relay
    // closes the connection after a few bytes instead of reading 64 MiB.
    let mut header = vec![0x93, 0xa3, b'b', b'i', b'g', 0xc6];
    header.extend_from_slice(&(64u32 << 20).to_be_bytes());
    bad.send(&header).unwrap();
    let mut written = header.len();
    let filler = vec![0u8; 64 << 10];
    while written < 8 * MAX_FRAME && bad.send(&filler).is_ok() {
        written += filler.len();
    }
    bad.expect_closed();
    drop(bad);

    let line = relay.expect_rejected(Some(peer), "frame_too_large", "frame too large");
    assert!(line.contains(&format!("limit {MAX_FRAME}")), "{line}");
    good_client_still_served(&relay, &files, None);
    wait_delivered(&relay, "before-big-", 100);
}

#[test]
fn wrong_shared_key_is_refused() {
    let s = setup();
    let mut spec = relay_spec(s.dir.path(), &s.server);
    spec.config.server.shared_key = Some("the right key".into());
    let relay = spec.start();
    let files = tls_files(&s.ca.ca, None, "localhost");

    let mut bad = Conn::connect(relay.forward, &files).unwrap();
    let peer = bad.local;
    // The PONG as the relay sent it: a refusal, and no digest of the relay's key for a
    // salt the client chose (something to guess the key from offline), as Fluentd does.
    let (pong, awaiting) = bad.ping("test-client", "a wrong key").unwrap();
    assert!(!pong.auth_ok, "PONG says no: {pong:?}");
    assert_eq!(
        pong.shared_key_hexdigest, "",
        "a refused client got a digest of the relay's key: {pong:?}"
    );
    assert_eq!(pong.server_hostname, "relay-under-test", "{pong:?}");
    assert!(
        matches!(
            awaiting.receive_pong(pong),
            Err(sluice_forward::ClientHandshakeError::Refused { .. })
        ),
        "the client library reads it as a refusal"
    );
    bad.expect_closed();
    drop(bad);

    let line = relay.expect_rejected(Some(peer), "auth", "shared key mismatch");
    assert!(
        line.contains("test-client"),
        "names the client's hostname: {line}"
    );
    good_client_still_served(&relay, &files, Some("the right key"));
}

/// TLS and HELO/PING/PONG share one `handshake_timeout`: a client that spends part of it
/// on TLS and the rest (and more) before its PING is refused, not given a second
/// timeout for the PING. The pauses are the slow client's behaviour under test.
#[test]
fn tls_and_the_shared_key_handshake_share_one_timeout() {
    let s = setup();
    let mut spec = relay_spec(s.dir.path(), &s.server);
    spec.config.server.shared_key = Some("the key".into());
    spec.config.server.handshake_timeout = Span::secs(2);
    let relay = spec.start();
    let files = tls_files(&s.ca.ca, None, "localhost");

    let sock = TcpStream::connect_timeout(&relay.forward, Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let mut slow = Conn::handshake(sock, &files).unwrap();
    let peer = slow.local;
    let Some(sluice_forward::ServerFrame::Helo(helo)) = slow.next_frame().unwrap() else {
        panic!("expected HELO");
    };
    // 2.5 s after connecting: past the one budget, within a fresh one for the PING.
    std::thread::sleep(Duration::from_millis(1700));
    let (ping, _) = sluice_forward::ClientHandshake::new(helo).ping("test-client", "the key", None);
    let mut out = bytes::BytesMut::new();
    tokio_util::codec::Encoder::encode(
        &mut sluice_forward::ClientCodec::new(sluice_forward::Limits::default()),
        sluice_forward::ClientFrame::Ping(ping),
        &mut out,
    )
    .unwrap();
    let _ = slow.send(&out); // the relay may have closed already
    slow.expect_closed();
    drop(slow);
    relay.expect_rejected(Some(peer), "auth", "handshake_timeout");
    good_client_still_served(&relay, &files, Some("the key"));
}

/// A relay that requires client certificates signed by the test CA.
fn mutual_tls_relay(s: &Setup) -> Relay {
    let mut spec = relay_spec(s.dir.path(), &s.server);
    let tls = spec.config.server.tls.as_mut().unwrap();
    tls.client_ca = Some(s.ca.ca.clone());
    tls.client_auth = ClientAuth::Required;
    spec.start()
}

#[test]
fn relay_refuses_an_expired_client_certificate() {
    let s = setup();
    let relay = mutual_tls_relay(&s);
    let expired = s.ca.issue("client-expired", &["agent-1"], true);
    let valid = s.ca.issue("client-valid", &["agent-2"], false);

    let (peer, _) = refused(
        relay.forward,
        &tls_files(&s.ca.ca, Some(&expired), "localhost"),
        "expired-",
    );
    relay.expect_rejected(Some(peer), "tls", "the client's certificate is expired");
    good_client_still_served(
        &relay,
        &tls_files(&s.ca.ca, Some(&valid), "localhost"),
        None,
    );
    assert!(delivered(&relay.sink_file("file"), "expired-").is_empty());
}

#[test]
fn relay_refuses_a_client_certificate_from_an_unknown_ca() {
    let s = setup();
    let relay = mutual_tls_relay(&s);
    let stranger_ca = TestCa::new(s.dir.path(), "stranger");
    let stranger = stranger_ca.issue("client-stranger", &["agent-x"], false);
    let valid = s.ca.issue("client-valid", &["agent-2"], false);

    let (peer, _) = refused(
        relay.forward,
        &tls_files(&s.ca.ca, Some(&stranger), "localhost"),
        "stranger-",
    );
    relay.expect_rejected(Some(peer), "tls", "unknown CA");
    good_client_still_served(
        &relay,
        &tls_files(&s.ca.ca, Some(&valid), "localhost"),
        None,
    );
    assert!(delivered(&relay.sink_file("file"), "stranger-").is_empty());
}

#[test]
fn client_that_does_not_trust_the_relay_ca_is_reported() {
    let s = setup();
    let relay = start_relay(s.dir.path(), &s.server);
    let other = TestCa::new(s.dir.path(), "other");

    let (peer, err) = refused(
        relay.forward,
        &tls_files(&other.ca, None, "localhost"),
        "x-",
    );
    let err = err.expect("the client refuses the relay");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    relay.expect_rejected(Some(peer), "tls", "alert UnknownCA");
    good_client_still_served(&relay, &tls_files(&s.ca.ca, None, "localhost"), None);
}

#[test]
fn hostname_mismatch_is_refused_by_the_client_and_reported_by_the_relay() {
    let s = setup();
    let relay = start_relay(s.dir.path(), &s.server);

    let (peer, err) = refused(
        relay.forward,
        &tls_files(&s.ca.ca, None, "relay.example.net"),
        "x-",
    );
    let err = err.expect("the client refuses a certificate for another name");
    assert!(
        err.to_string().contains("NotValidForName") || err.to_string().contains("not valid for"),
        "{err}"
    );
    relay.expect_rejected(Some(peer), "tls", "hostname mismatch");
    good_client_still_served(&relay, &tls_files(&s.ca.ca, None, "localhost"), None);
}

#[test]
fn plaintext_to_the_tls_port_is_named_as_such() {
    let s = setup();
    let relay = start_relay(s.dir.path(), &s.server);

    let mut plain = TcpStream::connect(relay.forward).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let peer = plain.local_addr().unwrap();
    let _ = plain.write_all(&chunk("plain-", 1, 10, "p"));
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest); // the relay closes without answering
    assert!(rest.is_empty(), "no answer to plaintext: {rest:?}");

    let line = relay.expect_rejected(Some(peer), "plaintext", "not TLS");
    assert!(line.contains("a plain Forward frame"), "{line}");
    good_client_still_served(&relay, &tls_files(&s.ca.ca, None, "localhost"), None);
    assert!(delivered(&relay.sink_file("file"), "plain-").is_empty());
}

/// The agent refuses a relay whose certificate expired, says why, and keeps its lines;
/// once the relay's certificate files are replaced (no restart), new connections get the
/// new certificate and every line arrives.
#[test]
fn agent_refuses_an_expired_relay_certificate_until_it_is_replaced() {
    const LINES: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "relay");
    let expired = ca.issue("server", &["localhost", "127.0.0.1"], true);
    let relay = start_relay(dir.path(), &expired);

    let log = dir.path().join("app.log");
    write_numbered_lines(&log, 1, LINES);
    let mut spec = AgentSpec::new(
        dir.path(),
        "agent-expiry",
        &[relay.forward],
        ca.client_tls(),
        &log.display().to_string(),
    );
    spec.config.output.chunk_age = Span::millis(200);
    spec.config.output.retry_max = Span::millis(500);
    let agent = spec.spawn();
    wait_for(
        "the agent to refuse the expired certificate",
        Duration::from_secs(30),
        || {
            agent
                .plain_log()
                .contains("TLS handshake with the relay failed")
        },
    );
    let agent_log = agent.plain_log();
    assert!(
        agent_log.contains("Expired") || agent_log.contains("expired"),
        "{agent_log}"
    );
    relay.expect_rejected(None, "tls", "alert CertificateExpired");
    assert_eq!(relay.received(), 0);

    // Rotate: a valid certificate under the same file names; the relay is not restarted.
    let fresh = ca.issue("server-fresh", &["localhost", "127.0.0.1"], false);
    std::fs::copy(&fresh.key, &expired.key).unwrap();
    std::fs::copy(&fresh.cert, &expired.cert).unwrap();
    wait_delivered_numbered(&relay, LINES);
    assert!(
        relay.plain_log().contains("TLS certificate reloaded"),
        "{}",
        relay.plain_log()
    );
    assert!(agent.counter("sluice_agent_relay_errors_total", "reason=\"tls\"") >= 1.0);
}

/// Waits until the file sink holds every numbered line 1..=count of [`write_numbered_lines`].
fn wait_delivered_numbered(relay: &Relay, count: u64) {
    wait_for(
        &format!("{count} numbered lines in the file sink"),
        Duration::from_secs(60),
        || delivered(&relay.sink_file("file"), "line ").len() as u64 == count,
    );
}

/// With client certificates required and no shared key, a client is the DNS name in its
/// certificate: a chunk claiming another host's source is refused (`bind_sources` is on
/// by default), its own sources are taken.
#[test]
fn a_client_certificate_names_the_sources_it_may_send() {
    let s = setup();
    let relay = mutual_tls_relay(&s);
    let cert = s.ca.issue("client-m", &["agent-m"], false);
    let files = tls_files(&s.ca.ca, Some(&cert), "localhost");

    let mut forger = Conn::connect(relay.forward, &files).unwrap();
    let claim = chunk_from("agent-a:app:1", "forged-", &[u64::MAX], "forged");
    assert!(forger.send_expect_ack(&claim, "forged").is_err());
    relay.expect_rejected(
        Some(forger.local),
        "source_identity",
        "its source ids must begin with \"agent-m:\"",
    );
    let mut own = Conn::connect(relay.forward, &files).unwrap();
    let seqs: Vec<u64> = (0..10).collect();
    own.send_expect_ack(&chunk_from("agent-m:app:1", "m-", &seqs, "m0"), "m0")
        .unwrap();
    own.close();
    wait_delivered(&relay, "m-", 10);
    assert!(delivered(&relay.sink_file("file"), "forged-").is_empty());
}

/// One `sluice.report` event (an agent's report) with `json` as its `report` field.
fn report_frame(json: &str, id: &str) -> Vec<u8> {
    let mut entries = Vec::new();
    sluice_forward::write_entry(
        &mut entries,
        sluice_forward::EventTime::now(),
        &[("report", json.as_bytes())],
    );
    let mut out = bytes::BytesMut::new();
    sluice_forward::encode_compressed_packed_forward(
        sluice_forward::REPORT_TAG,
        &sluice_forward::gzip_entries(&entries),
        1,
        id,
        None,
        &mut out,
    );
    out.to_vec()
}

/// Agent reports a client forges or garbles: each is acknowledged (resending would not
/// mend it), refused with a warning naming the peer and the cause and counted, never
/// spooled; a cell naming a source not the client's own is refused, its own kept.
#[test]
fn bad_agent_reports_are_refused_by_name_and_never_spooled() {
    let s = setup();
    let relay = mutual_tls_relay(&s);
    let cert = s.ca.issue("client-m", &["agent-m"], false);
    let files = tls_files(&s.ca.ca, Some(&cert), "localhost");
    let mut conn = Conn::connect(relay.forward, &files).unwrap();
    conn.send_expect_ack(&report_frame("{not json", "r1"), "r1")
        .unwrap();
    let hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600;
    let report = format!(
        r#"{{"version":1,"agent":"agent-m","cells":[
            {{"tag":"app","hour":{hour},"source":"agent-a:app:1","seqs":[[0,9]]}},
            {{"tag":"app","hour":{hour},"source":"agent-m:app:1","seqs":[[0,4]]}}]}}"#
    );
    conn.send_expect_ack(&report_frame(&report, "r2"), "r2")
        .unwrap();
    // The connection is still good: a data chunk after them is taken.
    let seqs: Vec<u64> = (0..3).collect();
    conn.send_expect_ack(&chunk_from("agent-m:app:1", "m-", &seqs, "m0"), "m0")
        .unwrap();
    let peer = conn.local.to_string();
    relay.wait("both refusals", Duration::from_secs(30), || {
        relay.counter("sluice_relay_agent_reports_refused_total", "") >= 2.0
    });
    let log = relay.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("agent report refused"))
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:#?}");
    assert!(refusals.iter().all(|l| l.contains(&peer)), "{refusals:#?}");
    assert!(refusals[0].contains("field report"), "{refusals:#?}");
    assert!(
        refusals[1].contains("\"agent-a:app:1\", which is not its own"),
        "{refusals:#?}"
    );
    assert_eq!(relay.counter("sluice_relay_agent_reports_total", ""), 1.0);
    // The client's own cell is in the ledger; the forged one is not.
    let ledger = relay.data_dir().join("ledger.json");
    relay.wait("the report in ledger.json", Duration::from_secs(30), || {
        std::fs::read_to_string(&ledger).is_ok_and(|t| t.contains("agent-m:app:1"))
    });
    let text = std::fs::read_to_string(&ledger).unwrap();
    assert!(!text.contains("agent-a:app:1"), "{text}");
    wait_delivered(&relay, "m-", 3);
    let sink = std::fs::read_to_string(relay.sink_file("file")).unwrap_or_default();
    assert!(
        !sink.contains("sluice.report"),
        "a report was spooled: {sink}"
    );
}
