//! The Kafka sink keeps to the topic's own `max.message.bytes` (issue 14): read at start
//! with DescribeConfigs, it bounds the producer's batches (so small events are never
//! refused in a batch too large for the topic) and the largest event produced. tansu
//! reports the topic config but does not enforce it, so the test sees the relay's own
//! decisions: events over the topic's limit (1.5x it) go to the dead-letter location (a
//! bucket on the S3 server here, read with boto3: one object per event with its reason
//! and provenance), are counted (`sink_dropped{reason="too_large"}`, `dead_letters`) and
//! logged; every other event is delivered once (read back with confluent-kafka) and the
//! stream never stalls.

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
    let bucket = unique_name("dead-letters");
    svc.create_bucket(&bucket);
    let mut spec = RelaySpec::insecure(tmp.path(), "relay-limits");
    let mut kafka = svc.kafka_sink(&topic);
    let k = kafka.kafka();
    k.dead_letter_url = format!("s3://{bucket}/dlq");
    k.dead_letter_options = [
        ("endpoint", svc.s3_endpoint.as_str()),
        ("allow_http", "true"),
        ("region", "us-east-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    spec.config.sinks.push(kafka);
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
    send(SMALL / 2 + 1, BIG, 393_216); // 1.5x the topic's 256 KiB, under max_message
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
    assert_eq!(
        relay.counter("sluice_relay_dead_letters_total", "reason=\"too_large\"") as u64,
        BIG
    );
    let letters = svc.py(
        "s3_objects.py",
        &[
            "--endpoint",
            &svc.s3_endpoint,
            "--bucket",
            &bucket,
            "--prefix",
            "dlq/dead-letters/kafka/limits/",
        ],
    );
    let letters = letters["objects"].as_array().unwrap();
    assert_eq!(
        letters.len() as u64,
        BIG,
        "one dead letter per refused event"
    );
    let mut numbers = Vec::new();
    for l in letters {
        let v = &l["json"];
        assert_eq!(v["reason"], "too_large", "{}", l["key"]);
        assert_eq!(v["topic"], topic.as_str());
        assert!(
            v["detail"].as_str().unwrap().contains("262144")
                || v["detail"].as_str().unwrap().contains("max_message"),
            "{}",
            v["detail"]
        );
        let event = &v["event"];
        assert_eq!(event["tag"], "limits");
        let message = event["record"]["message"].as_str().unwrap();
        assert!(message.len() > 393_216, "the whole record is kept");
        numbers.push(message[5..13].parse::<u64>().unwrap());
    }
    numbers.sort();
    assert_eq!(
        numbers,
        (SMALL / 2 + 1..=SMALL / 2 + BIG).collect::<Vec<_>>()
    );
}
