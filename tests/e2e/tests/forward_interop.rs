//! Interop: the official Fluentd client library, `fluent-logger` for Python (tests/py
//! fluent_send.py), sends to the relay, and the events arrive in Kafka (tansu) and S3
//! (moto), checked by readers that are not ours (confluent-kafka, boto3).
//!
//! fluent-logger 0.11 has no TLS, no shared key and no acknowledgements, so the relay
//! listens with `insecure = true`. Its Message mode (`[tag, EventTime, record]`) is sent
//! as fluent-logger writes it; the helper's `--ack` mode then sends Forward-mode chunks
//! with `chunk` ids and waits for every `{"ack": ...}`, as Fluentd's out_forward does with
//! `require_ack_response`.

use std::time::Duration;

use sluice_e2e::*;

#[test]
fn fluent_logger_events_reach_kafka_and_s3() {
    const PER_MODE: u64 = 5_000;
    let svc = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let topic = unique_name("interop");
    let bucket = unique_name("interop");
    svc.create_topic(&topic, 2);
    svc.create_bucket(&bucket);

    let mut spec = RelaySpec::insecure(dir.path(), "relay-interop");
    spec.config.server.ack = AckMode::EndToEnd;
    spec.config.sinks.push(svc.kafka_sink(&topic));
    spec.config.sinks.push(svc.s3_sink(&bucket));
    let mut relay = spec.start();

    let port = relay.forward.port().to_string();
    let started = std::time::Instant::now();
    let plain = svc.py(
        "fluent_send.py",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--tag",
            "interop.logger",
            "--count",
            &PER_MODE.to_string(),
            "--prefix",
            "fluent-logger ",
        ],
    );
    assert_eq!(plain["sent"], PER_MODE, "{plain}");
    let acked = svc.py(
        "fluent_send.py",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--tag",
            "interop.acked",
            "--count",
            &PER_MODE.to_string(),
            "--prefix",
            "forward-ack ",
            "--ack",
            "--batch",
            "500",
        ],
    );
    assert_eq!(acked["sent"], PER_MODE, "{acked}");
    eprintln!("sent {} events in {:?}", 2 * PER_MODE, started.elapsed());

    let total = 2 * PER_MODE;
    relay.wait(
        "both sinks to deliver every event",
        Duration::from_secs(120),
        || relay.delivered("kafka") >= total && relay.delivered("s3") >= total,
    );
    eprintln!("delivered after {:?}", started.elapsed());
    relay.stop(Duration::from_secs(60));
    eprintln!("relay stopped after {:?}", started.elapsed());

    let kafka = svc.kafka_summary(&topic, total);
    let s3 = svc.s3_summary(&bucket);
    eprintln!(
        "kafka: {kafka}\ns3: {s3}\nread back after {:?}",
        started.elapsed()
    );
    assert_eq!(
        kafka["timestamp_mismatch"], 0,
        "Kafka timestamps are the clients' event times (CreateTime): {kafka}"
    );
    for (name, summary) in [("kafka", &kafka), ("s3", &s3)] {
        assert_eq!(summary["messages"], total, "{name}: every event once");
        assert_eq!(summary["distinct_messages"], total, "{name}: distinct");
        assert_eq!(summary["bad"].as_u64().unwrap_or(0), 0, "{name}: envelopes");
        let per_tag = |tag: &str| -> u64 {
            summary["per_tag_hour"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| k.starts_with(&format!("{tag}|")))
                        .map(|(_, v)| v.as_u64().unwrap_or(0))
                        .sum()
                })
                .unwrap_or(0)
        };
        assert_eq!(per_tag("interop.logger"), PER_MODE, "{name}: {summary}");
        assert_eq!(per_tag("interop.acked"), PER_MODE, "{name}: {summary}");
    }
    // Nobody was turned away.
    let log = relay.plain_log();
    assert!(!log.contains("WARN sluice_relay::server"), "{log}");
}
