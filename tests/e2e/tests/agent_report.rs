//! The agents column of `sluice-relay reconcile`: a sluice agent reports, per tag, hour
//! and file, the seqs the relay acknowledged; the relay publishes its ledger (received
//! seqs, sink counts, the agents' reports) beside its hour markers; reconcile reads it
//! back from the bucket. Against real tansu and moto, over TLS: the agent is killed -9
//! five times while lines are written, and afterwards what the agent reported and what
//! the relay received agree, seq for seq, and both destinations hold every line once.

use std::time::{Duration, Instant};

use sluice_core::units::{ByteSize, Span};
use sluice_e2e::*;

fn reconcile(relay: &Relay, from: &str, to: &str) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(bin("sluice-relay"))
        .arg("--config")
        .arg(&relay.config_path)
        .args(["reconcile", "--from", from, "--to", to, "--format", "json"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "reconcile printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn sum(rows: &serde_json::Value, f: impl Fn(&serde_json::Value) -> Option<u64>) -> u64 {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| f(r).unwrap_or(0))
        .sum()
}

#[test]
fn agent_killed_five_times_reports_exactly_what_the_relay_received() {
    const LINES: u64 = 200_000;
    const KILLS: u64 = 5;
    const PER_ROUND: u64 = LINES / (KILLS + 1);
    let t0 = Instant::now();
    let svc = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let topic = unique_name("report");
    let bucket = unique_name("report");
    svc.create_topic(&topic, 2);
    svc.create_bucket(&bucket);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut spec = RelaySpec::new(dir.path(), "relay-report", certs.server_tls());
    spec.config.sinks.push(svc.kafka_sink(&topic));
    spec.config.sinks.push(svc.s3_sink(&bucket));
    // The relay's clock two hours ahead: the hours of the lines (read now) close at the
    // first delivery, so reconcile does not wait for them to end.
    spec.env
        .push(("SLUICE_TEST_CLOCK".into(), format!("{}:1", now + 7200)));
    let mut relay = spec.start();

    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let log = logs.join("app.log");
    let mut spec = AgentSpec::new(
        dir.path(),
        "agent-report",
        &[relay.forward],
        certs.client_tls(),
        &log.display().to_string(),
    );
    let output = &mut spec.config.output;
    output.chunk_size = ByteSize::kib(128);
    output.chunk_age = Span::millis(200);
    output.retry_min = Span::millis(50);
    output.retry_max = Span::millis(500);
    output.report_interval = Span::millis(500);
    let mut agent = spec.write();

    let mut first = 1;
    for round in 0..=KILLS {
        agent.start();
        write_numbered_lines(&log, first, PER_ROUND);
        first += PER_ROUND;
        if round == KILLS {
            break;
        }
        // Killed while it reads and sends: once the relay took something new, and (every
        // other round) once a checkpoint with a report was saved too.
        let before = relay.delivered("kafka");
        agent.wait(
            &format!("progress before kill {}", round + 1),
            Duration::from_secs(60),
            || {
                let saved = round % 2 == 0
                    || agent.counter("sluice_agent_checkpoint_saves_total", "") >= 1.0;
                relay.delivered("kafka") > before && saved
            },
        );
        agent.kill();
    }
    let lines = first - 1;
    relay.wait_delivered("kafka", lines, Duration::from_secs(120));
    relay.wait_delivered("s3", lines, Duration::from_secs(120));

    let from = sluice_relay::envelope::hour_label(now / 3600);
    let to = sluice_relay::envelope::hour_label(now / 3600 + 3);
    // The agent reports every 500 ms and the relay publishes its ledger every 5 s: wait
    // for both to carry the last acknowledgements.
    let mut last = (0, serde_json::Value::Null);
    wait_for(
        "reconcile to show every line reported, received and in both destinations",
        Duration::from_secs(120),
        || {
            agent.assert_running();
            last = reconcile(&relay, &from, &to);
            let rows = &last.1["rows"];
            last.0 == 0
                && sum(rows, |r| r["agents"].as_u64()) == lines
                && sum(rows, |r| r["received"].as_u64()) == lines
        },
    );
    let (code, report) = last;
    eprintln!(
        "{lines} lines, {KILLS} kills, reconcile OK after {:?}: {}",
        t0.elapsed(),
        report["rows"]
    );
    assert_eq!(code, 0);
    let rows = report["rows"].as_array().unwrap();
    for row in rows {
        assert_eq!(row["agents"], row["received"], "{row:#}");
        assert_eq!(row["expected"], row["received"], "{row:#}");
        assert!(
            row["not_received"].as_array().unwrap().is_empty(),
            "{row:#}"
        );
        assert_eq!(row["kafka"]["events"], row["received"], "{row:#}");
        assert_eq!(row["objects"]["events"], row["received"], "{row:#}");
        // One source (the file), its sink figures complete.
        let sinks = row["sinks"].as_object().unwrap();
        for s in ["kafka", "s3"] {
            assert_eq!(sinks[s]["delivered"], row["received"], "{s}: {row:#}");
            assert_eq!(sinks[s]["dropped"], 0, "{s}: {row:#}");
        }
    }
    // The agent's report names the one file by source id, seqs 0..lines-1 over the hours.
    let mut seqs = sluice_core::ranges::SeqRanges::default();
    let ledgers = report["ledgers_read"].as_u64().unwrap();
    assert!(ledgers >= 1, "{report:#}");
    // Every seq the agent reported, from the relay's published ledger, read with boto3.
    let hours = svc.s3_hours(&bucket);
    for docs in hours["ledgers"].as_object().unwrap().values() {
        for doc in docs.as_object().unwrap().values() {
            for t in doc["tags"].as_object().unwrap().values() {
                for ranges in t["agents"].as_object().unwrap().values() {
                    let r: sluice_core::ranges::SeqRanges =
                        serde_json::from_value(ranges.clone()).unwrap();
                    seqs.union(&r);
                }
            }
        }
    }
    assert_eq!(
        seqs,
        sluice_core::ranges::SeqRanges::from_ranges([[0, lines - 1]]),
        "the agent reported seqs 0..{} of its one file",
        lines - 1
    );
    // The agent's own copy, saved with its checkpoints (what a restart sends again):
    // after a clean stop it holds every acknowledged seq too.
    agent.stop(Duration::from_secs(30));
    let checkpoints: serde_json::Value =
        serde_json::from_str(&agent.checkpoints()).expect("checkpoints.json is JSON");
    let mut saved = sluice_core::ranges::SeqRanges::default();
    for cell in checkpoints["sent"]
        .as_array()
        .expect("a report in the checkpoints")
    {
        let r: sluice_core::ranges::SeqRanges =
            serde_json::from_value(cell["seqs"].clone()).unwrap();
        saved.union(&r);
    }
    assert_eq!(saved, seqs, "the report saved with the checkpoints");
    relay.stop(Duration::from_secs(30));
}
