//! The Kafka sink keeps to the topic's own `max.message.bytes` (issue 14): read at start
//! with DescribeConfigs, it bounds the producer's batches (so small events are never
//! refused in a batch too large for the topic) and the largest event produced. tansu
//! reports the topic config but does not enforce it, so the test sees the relay's own
//! decisions: events over the topic's limit are counted as dropped (`too_large`) and
//! logged, every other event is delivered once (read back with confluent-kafka).

use std::time::Duration;

use sluice_e2e::*;

#[test]
fn the_topics_max_message_bytes_bounds_what_is_produced() {
    const SMALL: u64 = 2_000;
    const BIG: u64 = 3;
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let topic = unique_name("limits");
    svc.create_topic_with(&topic, 2, &[("max.message.bytes", "262144")]);
    let mut spec = RelaySpec::insecure(tmp.path(), "relay-limits");
    spec.config.sinks.push(svc.kafka_sink(&topic));
    let relay = spec.start();
    let send = |first: u64, count: u64, pad: u64| {
        let sent = svc.py(
            "fluent_send.py",
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &relay.forward.port().to_string(),
                "--tag",
                "limits",
                "--count",
                &count.to_string(),
                "--first",
                &first.to_string(),
                "--pad",
                &pad.to_string(),
                "--ack",
                "--batch",
                "250",
            ],
        );
        assert_eq!(sent["sent"], count, "{sent}");
    };
    send(1, SMALL / 2, 480); // ~500-byte events
    send(SMALL / 2 + 1, BIG, 300_000); // over the topic's 256 KiB, under max_message
    send(SMALL / 2 + BIG + 1, SMALL / 2, 480);
    let dropped =
        || relay.counter("sluice_relay_sink_dropped_total", "reason=\"too_large\"") as u64;
    relay.wait(
        "every event delivered or refused",
        Duration::from_secs(120),
        || relay.delivered("kafka") + dropped() >= SMALL + BIG,
    );
    assert_eq!(dropped(), BIG, "the events over the topic's limit");
    assert_eq!(relay.delivered("kafka"), SMALL);
    let log = relay.log_text();
    assert!(
        log.contains("max_message_bytes=262144") || log.contains("max_message_bytes: 262144"),
        "the relay says it keeps to the topic's limit: {log}"
    );
    let kafka = svc.kafka_summary(&topic, SMALL);
    assert_eq!(kafka["messages"], SMALL, "{kafka}");
    assert_eq!(kafka["duplicates"], 0, "{kafka}");
    assert_eq!(kafka["bad"], 0, "{kafka}");
}
