//! The relay always starts on a damaged spool: a torn tail is cut off, a corrupt segment
//! is set aside, each is counted and logged with the file it concerns, and the relay goes
//! on serving. No Kafka or S3 needed: a file sink is the destination.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_e2e::*;

/// A relay with small spool segments and one `file` sink, and the certificates its
/// agents trust.
fn start_relay(dir: &Path, file_sink: SinkConfig) -> (Relay, Certs) {
    let certs = Certs::generate(dir, "relay");
    let mut spec = RelaySpec::new(dir, "relay-recovery", certs.server_tls());
    spec.config.spool.segment_size = ByteSize::kib(64);
    spec.config.sinks.push(file_sink);
    (spec.start(), certs)
}

fn segments(relay: &Relay) -> Vec<PathBuf> {
    let mut segs: Vec<_> = std::fs::read_dir(relay.spool_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs
}

fn start_agent(dir: &Path, relay: &Relay, certs: &Certs, log: &Path) -> Agent {
    let mut spec = AgentSpec::new(
        dir,
        "agent-recovery",
        &[relay.forward],
        certs.client_tls(),
        &log.display().to_string(),
    );
    spec.config.output.chunk_size = ByteSize::kib(16);
    spec.config.output.chunk_age = Span::millis(100);
    spec.config.output.retry_max = Span::millis(300);
    spec.spawn()
}

fn distinct_lines(path: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut all = 0;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("file sink writes JSON lines");
        all += 1;
        seen.insert(v["record"]["message"].as_str().unwrap().to_string());
    }
    (seen.len(), all)
}

#[test]
fn a_torn_spool_tail_is_cut_off_and_the_relay_serves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.ndjson");
    let log = tmp.path().join("app.log");
    write_numbered_lines(&log, 1, 2_000);
    let (mut relay, certs) = start_relay(tmp.path(), file_sink("file", &out));
    let mut agent = start_agent(tmp.path(), &relay, &certs, &log);
    wait_for(
        "2000 lines in the file sink",
        Duration::from_secs(60),
        || relay.delivered("file") >= 2_000,
    );
    agent.stop(Duration::from_secs(20));
    relay.kill();

    // A write that never finished: half a batch header and garbage at the end.
    let active = segments(&relay).pop().expect("a segment");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&active)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0x53, 0x4c, 0x00, 0x17, 0xff, 0x00, 0x42]).unwrap();
    drop(f);

    relay.start();
    assert!(
        relay.counter("sluice_relay_spool_torn_bytes_total", "") >= 7.0,
        "torn bytes not counted"
    );
    let text = relay.log_text();
    assert!(
        text.contains("spool recovered after an unclean stop"),
        "{text}"
    );
    // It serves on: more lines arrive, none twice.
    write_numbered_lines(&log, 2_001, 1_000);
    let mut agent = start_agent(tmp.path(), &relay, &certs, &log);
    wait_for(
        "3000 lines in the file sink",
        Duration::from_secs(60),
        || distinct_lines(&out).0 >= 3_000,
    );
    agent.stop(Duration::from_secs(20));
    relay.stop(Duration::from_secs(20));
    assert_eq!(distinct_lines(&out), (3_000, 3_000));
}

#[test]
fn a_corrupt_segment_is_set_aside_counted_and_the_relay_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.ndjson");
    // The file sink is disabled, so every segment stays in the spool.
    let mut disabled = file_sink("file", &out);
    disabled.common.enabled = false;
    let log = tmp.path().join("app.log");
    write_numbered_lines(&log, 1, 60_000);
    let (mut relay, certs) = start_relay(tmp.path(), disabled);
    let mut agent = start_agent(tmp.path(), &relay, &certs, &log);
    relay.wait_received(60_000, Duration::from_secs(60));
    agent.stop(Duration::from_secs(20));
    relay.stop(Duration::from_secs(20));
    let segments = segments(&relay);
    assert!(
        segments.len() >= 3,
        "want several segments, got {segments:?}"
    );

    // Flip one byte in the middle of the second segment (a bad sector, a bit flip).
    let victim = &segments[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(victim, bytes).unwrap();

    relay.start();
    assert_eq!(
        relay.counter("sluice_relay_spool_corrupt_segments_total", ""),
        1.0
    );
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    let text = relay.log_text();
    assert!(
        text.contains(&name),
        "the log does not name {name}:\n{text}"
    );
    assert!(
        std::fs::read_dir(relay.spool_dir()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".corrupt")),
        "the damaged segment was not kept aside for inspection"
    );
    // And it serves: a new client's lines are accepted and acknowledged.
    write_numbered_lines(&log, 60_001, 500);
    let mut agent = start_agent(tmp.path(), &relay, &certs, &log);
    wait_for(
        "the new lines to be spooled",
        Duration::from_secs(60),
        || relay.received() >= 500,
    );
    agent.stop(Duration::from_secs(20));
    relay.stop(Duration::from_secs(20));
}
