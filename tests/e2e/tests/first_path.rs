//! The first end-to-end path: agent tails a file → Forward v1 over TLS → relay →
//! Kafka (tansu) and S3 (moto) at the same time, checked by independent readers
//! (confluent-kafka, boto3) and by the relay's own ledger and `reconcile`.

use std::path::Path;
use std::time::Duration;

use sluice_e2e::*;

fn relay(
    dir: &Path,
    certs: &Certs,
    svc: &Services,
    topic: &str,
    bucket: &str,
    ack: AckMode,
) -> Relay {
    let mut spec = RelaySpec::new(dir, "relay-test", certs.server_tls());
    spec.config.relay.shutdown_timeout = Span::secs(20);
    spec.config.server.ack = ack;
    spec.config.spool.segment_size = ByteSize::mib(4);
    spec.config.spool.max_size = ByteSize::gib(1);
    spec.config.sinks.push(svc.kafka_sink(topic));
    spec.config.sinks.push(svc.s3_sink(bucket));
    spec.start()
}

fn agent(dir: &Path, relay: &Relay, ca_certs: &Certs, log: &Path) -> Agent {
    let mut spec = AgentSpec::new(
        dir,
        "agent-test",
        &[relay.forward],
        ca_certs.client_tls(),
        &log.display().to_string(),
    );
    spec.config.output.chunk_size = ByteSize::kib(256);
    spec.config.output.chunk_age = Span::millis(200);
    spec.config.output.in_flight = 8;
    spec.config.output.retry_max = Span::secs(1);
    spec.start()
}

#[test]
fn hundred_thousand_lines_reach_kafka_and_s3_exactly_once() {
    const LINES: u64 = 100_000;
    let svc = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let topic = unique_name("first-path");
    let bucket = unique_name("first-path");
    svc.create_topic(&topic, 3);
    svc.create_bucket(&bucket);

    let mut relay = relay(dir.path(), &certs, &svc, &topic, &bucket, AckMode::EndToEnd);

    let log = dir.path().join("app.log");
    write_numbered_lines(&log, 1, LINES);
    let mut agent = agent(dir.path(), &relay, &certs, &log);

    relay.wait(
        "both sinks to deliver every line",
        Duration::from_secs(180),
        || {
            agent.assert_running();
            relay.delivered("kafka") >= LINES && relay.delivered("s3") >= LINES
        },
    );
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(60));

    // Independent readers: not our code.
    let kafka = svc.kafka_summary(&topic, LINES);
    let s3 = svc.s3_summary(&bucket);
    eprintln!("kafka: {kafka}\ns3: {s3}");
    assert_eq!(
        kafka["timestamp_mismatch"], 0,
        "every Kafka record's timestamp is a CreateTime equal to its event time"
    );
    for (name, summary) in [("kafka", &kafka), ("s3", &s3)] {
        assert_eq!(
            summary["distinct_messages"], LINES,
            "{name}: distinct lines"
        );
        assert_eq!(
            summary["messages"], LINES,
            "{name}: no duplicates in a clean run"
        );
        assert_eq!(
            summary["distinct_provenance"], LINES,
            "{name}: distinct (source, seq)"
        );
        assert_eq!(
            summary["bad"].as_u64().unwrap_or(0),
            0,
            "{name}: unreadable envelopes"
        );
    }

    // The relay's own counts agree.
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(relay.data_dir().join("ledger.json")).unwrap())
            .unwrap();
    let total = |v: &serde_json::Value| -> u64 {
        v.as_object()
            .map(|tags| {
                tags.values()
                    .flat_map(|h| h.as_object().unwrap().values())
                    .map(|n| n.as_u64().unwrap())
                    .sum()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        total(&ledger["received"]),
        LINES,
        "ledger received: {ledger}"
    );
    assert_eq!(
        total(&ledger["sinks"]["kafka"]["delivered"]),
        LINES,
        "ledger kafka: {ledger}"
    );
    assert_eq!(
        total(&ledger["sinks"]["s3"]["delivered"]),
        LINES,
        "ledger s3: {ledger}"
    );

    // And `reconcile`, reading Kafka and the bucket itself, says so too.
    let out = std::process::Command::new(bin("sluice-relay"))
        .args(["--config"])
        .arg(&relay.config_path)
        .arg("reconcile")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "reconcile found differences:\n{report}"
    );
    assert!(report.contains("all sinks agree"), "{report}");

    // The checkpoint reached the end of the file only through acknowledgements.
    let checkpoints = agent.checkpoints();
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        checkpoints.contains(&format!("\"offset\":{size}"))
            || checkpoints.contains(&format!("\"offset\": {size}")),
        "checkpoint not at end of file ({size}): {checkpoints}"
    );
}

#[test]
fn agent_refuses_a_relay_it_cannot_verify() {
    let svc = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let relay_certs = Certs::generate(dir.path(), "relay");
    let other_ca = Certs::generate(dir.path(), "other");
    let topic = unique_name("untrusted");
    let bucket = unique_name("untrusted");
    svc.create_bucket(&bucket);
    let relay = relay(
        dir.path(),
        &relay_certs,
        &svc,
        &topic,
        &bucket,
        AckMode::Spool,
    );

    let log = dir.path().join("app.log");
    write_numbered_lines(&log, 1, 100);
    // The agent trusts a different CA than the one that signed the relay's certificate.
    let mut agent = agent(dir.path(), &relay, &other_ca, &log);
    wait_for(
        "the agent to report the certificate problem",
        Duration::from_secs(30),
        || {
            agent
                .log_text()
                .contains("TLS handshake with the relay failed")
        },
    );
    let text = agent.log_text();
    assert!(
        text.contains("UnknownIssuer")
            || text.contains("unknown issuer")
            || text.contains("invalid peer certificate"),
        "{text}"
    );
    wait_for(
        "the relay to count the failed handshake",
        Duration::from_secs(10),
        || relay.rejected("tls") >= 1.0,
    );
    assert_eq!(relay.received(), 0);
    agent.stop(Duration::from_secs(20));
    // Nothing was acknowledged, so nothing was checkpointed past the start.
    let checkpoints = agent.checkpoints();
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        !checkpoints.contains(&format!("\"offset\":{size}")),
        "checkpoint advanced without ack: {checkpoints}"
    );
}
