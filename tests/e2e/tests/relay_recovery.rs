//! The relay always starts on a damaged spool: a torn tail is cut off, a damaged batch
//! costs only its own events, a segment with a damaged header is set aside, each is
//! counted and logged with the file it concerns, and the relay goes on serving. No Kafka or S3 needed: a file sink is the destination.

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

    // Damage the second segment's header (its segment id): nothing in a file whose
    // header is wrong can be trusted. (Damage elsewhere costs only the batch it is in:
    // `one_damaged_batch_costs_exactly_its_events`.)
    let victim = &segments[1];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[9] ^= 0x5a;
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

/// The v2 batches of a segment file: (offset, header + payload length).
fn batches_of(segment: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 16;
    while at + 32 <= segment.len() {
        assert_eq!(&segment[at..at + 4], b"SLB2", "batch magic at {at}");
        let len = u32::from_le_bytes(segment[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push((at, 32 + len));
        at += 32 + len;
    }
    assert_eq!(at, segment.len(), "segment ends on a batch boundary");
    out
}

/// One flipped byte in the middle of a spool costs exactly the batch it is in: the
/// relay starts, counts and names the damage, delivers every other batch, and
/// `reconcile` reports exactly that batch's events as lost.
#[test]
fn one_damaged_batch_costs_exactly_its_events() {
    const LINES: u64 = 60_000;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.ndjson");
    // The file sink is disabled while the spool fills, so nothing is delivered yet and
    // every segment stays.
    let mut disabled = file_sink("file", &out);
    disabled.common.enabled = false;
    let log = tmp.path().join("app.log");
    write_numbered_lines(&log, 1, LINES);
    let (mut relay, certs) = start_relay(tmp.path(), disabled);
    let mut agent = start_agent(tmp.path(), &relay, &certs, &log);
    relay.wait_received(LINES, Duration::from_secs(120));
    agent.stop(Duration::from_secs(20));
    relay.stop(Duration::from_secs(20));
    let segments = segments(&relay);
    assert!(
        segments.len() >= 3,
        "want several segments, got {segments:?}"
    );

    // The batch in the middle of the middle segment; what it holds, before the damage.
    let victim = &segments[segments.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let batches = batches_of(&bytes);
    let (at, size) = batches[batches.len() / 2];
    let chunk = sluice_relay::record::decode(&bytes[at + 32..at + size]).unwrap();
    let source = chunk
        .source
        .expect("agent chunks carry provenance")
        .to_string();
    let lost: std::collections::BTreeSet<u64> = (0..chunk.count as usize)
        .map(|i| chunk.seq(i).unwrap())
        .collect();
    assert!(!lost.is_empty());
    // A bit flip in the middle of its payload.
    bytes[at + 32 + (size - 32) / 2] ^= 0x08;
    std::fs::write(victim, bytes).unwrap();

    relay.reconfigure(|c| c.sinks[0].common.enabled = true);
    relay.start();
    let expected = LINES - lost.len() as u64;
    relay.wait(
        "the file sink to deliver everything but the damaged batch",
        Duration::from_secs(120),
        || relay.delivered("file") >= expected && relay.caught_up(&["file"]),
    );
    assert_eq!(
        relay.counter("sluice_relay_spool_corrupt_batches_total", ""),
        1.0
    );
    assert_eq!(
        relay.counter("sluice_relay_spool_corrupt_bytes_total", ""),
        size as f64
    );
    assert_eq!(
        relay.counter("sluice_relay_spool_corrupt_segments_total", ""),
        0.0,
        "nothing set aside"
    );
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    let text = relay.log_text();
    let named: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains(&name) && l.contains(&format!("offset={at}")))
        .collect();
    assert!(
        named.iter().any(|l| l.contains("acknowledged to clients")),
        "no error naming {name} at offset {at} as acknowledged:\n{text}"
    );
    assert!(
        named.iter().any(|l| l.contains("sink=file")),
        "the sink did not say it passed over the damage:\n{text}"
    );
    relay.stop(Duration::from_secs(20));

    // Delivered: every event but those of the damaged batch, each once.
    let text = std::fs::read_to_string(&out).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["source"], source.as_str(), "one source");
        assert!(seen.insert(v["seq"].as_u64().unwrap()), "duplicate {line}");
    }
    // (A file source's seqs number its lines 0, 1, 2, ...: every line has its own.)
    assert!(
        seen.is_disjoint(&lost),
        "an event of the damaged batch was delivered"
    );
    assert_eq!(
        seen.len() as u64 + lost.len() as u64,
        LINES,
        "events other than the damaged batch's are missing"
    );

    // And reconcile says exactly that.
    let run = std::process::Command::new(bin("sluice-relay"))
        .args(["--config"])
        .arg(&relay.config_path)
        .arg("reconcile")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        !run.status.success(),
        "reconcile saw no difference:\n{report}"
    );
    let reported: u64 = report
        .lines()
        .flat_map(|l| l.split("; "))
        .filter_map(|p| {
            p.split("file: ")
                .nth(1)?
                .strip_suffix(" lost to spool damage")
        })
        .map(|n| n.trim().parse::<u64>().unwrap())
        .sum();
    assert_eq!(reported, lost.len() as u64, "{report}");
    assert!(
        !report.contains("not offered yet") && !report.contains("missing"),
        "{report}"
    );
    assert!(
        report.contains(&format!("file: 1 spool batches ({size} bytes) lost")),
        "{report}"
    );
    assert!(
        report.contains(&format!("{name} bytes {at}..{}", at + size)),
        "{report}"
    );
}
