//! The first end-to-end path: agent tails a file → Forward v1 over TLS → relay →
//! Kafka (tansu) and S3 (moto) at the same time, checked by independent readers
//! (confluent-kafka, boto3) and by the relay's own ledger and `reconcile`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sluice_e2e::*;

struct Relay {
    proc_: Proc,
    forward: SocketAddr,
    metrics: SocketAddr,
    config: std::path::PathBuf,
    data_dir: std::path::PathBuf,
}

fn relay_config(
    dir: &Path,
    certs: &Certs,
    svc: &Services,
    topic: &str,
    bucket: &str,
    ack: &str,
) -> (String, SocketAddr, SocketAddr) {
    let forward: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let text = format!(
        r#"
[relay]
id = "relay-test"
data_dir = "{data}"
shutdown_timeout = "20s"

[server]
listen = "{forward}"
ack = "{ack}"
tls = {{ cert = "{cert}", key = "{key}" }}

[spool]
segment_size = "4 MiB"
max_size = "1 GiB"

[metrics]
listen = "{metrics}"

[[sink]]
name = "kafka"
type = "kafka"
brokers = "{kafka}"
topic = "{topic}"

[[sink]]
name = "s3"
type = "object_store"
url = "s3://{bucket}"
prefix = "logs"
max_object_age = "1s"
options = {{ endpoint = "{s3}", allow_http = "true", region = "us-east-1" }}
"#,
        data = dir.join("relay-data").display(),
        cert = certs.cert.display(),
        key = certs.key.display(),
        kafka = svc.kafka,
        s3 = svc.s3_endpoint,
    );
    (text, forward, metrics)
}

fn start_relay(dir: &Path, text: String, forward: SocketAddr, metrics: SocketAddr) -> Relay {
    let config = dir.join("relay.toml");
    std::fs::write(&config, text).unwrap();
    let mut proc_ = Proc::start("sluice-relay", &config, &dir.join("relay.log"));
    wait_listening(forward, &mut proc_);
    Relay {
        proc_,
        forward,
        metrics,
        config,
        data_dir: dir.join("relay-data"),
    }
}

fn agent_config(dir: &Path, relay: SocketAddr, ca: &Path, log_glob: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[agent]
id = "agent-test"
data_dir = "{data}"

[[input]]
type = "tail"
name = "app"
tag = "app.log"
include = ["{log_glob}"]

[output]
relays = ["{relay}"]
tls = {{ ca = "{ca}", server_name = "localhost" }}
chunk_size = "256 KiB"
chunk_age = "200ms"
in_flight = 8
retry_max = "1s"

[metrics]
listen = "127.0.0.1:{mport}"
"#,
        data = dir.join("agent-data").display(),
        ca = ca.display(),
        mport = free_port(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
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

    let (text, forward, metrics) =
        relay_config(dir.path(), &certs, &svc, &topic, &bucket, "end_to_end");
    let mut relay = start_relay(dir.path(), text, forward, metrics);

    let log = dir.path().join("app.log");
    write_numbered_lines(&log, 1, LINES);
    let agent_cfg = agent_config(
        dir.path(),
        relay.forward,
        &certs.ca,
        &log.display().to_string(),
    );
    let mut agent = Proc::start("sluice-agent", &agent_cfg, &dir.path().join("agent.log"));

    wait_for(
        "both sinks to deliver every line",
        Duration::from_secs(180),
        || {
            assert!(
                agent.is_running(),
                "agent exited; log:\n{}",
                agent.log_text()
            );
            assert!(
                relay.proc_.is_running(),
                "relay exited; log:\n{}",
                relay.proc_.log_text()
            );
            let k = metric(
                relay.metrics,
                "sluice_relay_sink_events_total",
                "sink=\"kafka\"",
            )
            .unwrap_or(0.0);
            let s = metric(
                relay.metrics,
                "sluice_relay_sink_events_total",
                "sink=\"s3\"",
            )
            .unwrap_or(0.0);
            k >= LINES as f64 && s >= LINES as f64
        },
    );
    agent.stop(Duration::from_secs(30));
    relay.proc_.stop(Duration::from_secs(60));

    // Independent readers: not our code.
    let kafka = svc.kafka_summary(&topic, LINES);
    let s3 = svc.s3_summary(&bucket);
    eprintln!("kafka: {kafka}\ns3: {s3}");
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
        serde_json::from_slice(&std::fs::read(relay.data_dir.join("ledger.json")).unwrap())
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
        .arg(&relay.config)
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
    let checkpoints =
        std::fs::read_to_string(dir.path().join("agent-data/checkpoints.json")).unwrap();
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
    let (text, forward, metrics) =
        relay_config(dir.path(), &relay_certs, &svc, &topic, &bucket, "spool");
    let relay = start_relay(dir.path(), text, forward, metrics);

    let log = dir.path().join("app.log");
    write_numbered_lines(&log, 1, 100);
    // The agent trusts a different CA than the one that signed the relay's certificate.
    let agent_cfg = agent_config(
        dir.path(),
        relay.forward,
        &other_ca.ca,
        &log.display().to_string(),
    );
    let mut agent = Proc::start("sluice-agent", &agent_cfg, &dir.path().join("agent.log"));
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
        || {
            metric(
                relay.metrics,
                "sluice_relay_connections_rejected_total",
                "reason=\"tls\"",
            )
            .unwrap_or(0.0)
                >= 1.0
        },
    );
    assert_eq!(
        metric(relay.metrics, "sluice_relay_events_received_total", "").unwrap_or(0.0),
        0.0
    );
    agent.stop(Duration::from_secs(20));
    // Nothing was acknowledged, so nothing was checkpointed past the start.
    let checkpoints =
        std::fs::read_to_string(dir.path().join("agent-data/checkpoints.json")).unwrap_or_default();
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        !checkpoints.contains(&format!("\"offset\":{size}")),
        "checkpoint advanced without ack: {checkpoints}"
    );
}
