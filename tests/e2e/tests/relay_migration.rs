//! A phased migration from object storage to Kafka, one config change at a time, each
//! applied by restarting the relay (SIGTERM, new config, start) while the agent keeps
//! tailing: add Kafka from "now", pause S3, resume S3 (it catches up from the spool),
//! remove Kafka. The independent readers then show exactly which lines each side holds.

use std::time::Duration;

use sluice_e2e::*;

const N: u64 = 5_000;

/// The S3 sink of every phase: no prefix, objects after half a second.
fn s3_sink(svc: &Services, bucket: &str, enabled: bool) -> SinkConfig {
    let mut s3 = svc.s3_sink(bucket);
    s3.common.enabled = enabled;
    s3.object_store().prefix = String::new();
    s3.object_store().max_object_age = Span::millis(500);
    s3
}

/// Kafka, added during the migration: from now on, not from the oldest spooled data.
fn kafka_sink(svc: &Services, topic: &str) -> SinkConfig {
    let mut kafka = svc.kafka_sink(topic);
    kafka.common.start_from = StartFrom::Now;
    kafka
}

/// A phase: SIGTERM, the new sinks, start.
fn next_phase(relay: &mut Relay, sinks: Vec<SinkConfig>) {
    relay.stop(Duration::from_secs(30));
    relay.reconfigure(|c| c.sinks = sinks);
    relay.start();
}

#[test]
fn migrate_from_object_storage_to_kafka_in_phases() {
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let topic = unique_name("migration");
    let bucket = unique_name("migration");
    svc.create_topic(&topic, 2);
    svc.create_bucket(&bucket);
    let certs = Certs::generate(&dir, "relay");
    let log = dir.join("app.log");
    let delivered = Duration::from_secs(120);

    // Phase 1: object storage only.
    let mut spec = RelaySpec::new(&dir, "relay-migration", certs.server_tls());
    spec.config.spool.segment_size = ByteSize::kib(256);
    spec.config.sinks.push(s3_sink(&svc, &bucket, true));
    let mut relay = spec.start();
    let mut spec = AgentSpec::new(
        &dir,
        "agent-migration",
        &[relay.forward],
        certs.client_tls(),
        &log.display().to_string(),
    );
    spec.config.output.chunk_age = Span::millis(100);
    spec.config.output.retry_max = Span::millis(300);
    let mut agent = spec.spawn();
    write_numbered_lines(&log, 1, N);
    relay.wait_delivered("s3", N, delivered);

    // Phase 2: Kafka added, starting from "now": it gets new lines only.
    next_phase(
        &mut relay,
        vec![s3_sink(&svc, &bucket, true), kafka_sink(&svc, &topic)],
    );
    write_numbered_lines(&log, N + 1, N);
    relay.wait_delivered("kafka", N, delivered);
    relay.wait_delivered("s3", N, delivered);

    // Phase 3: S3 disabled: Kafka alone; the spool keeps S3's share, its lag shows it.
    next_phase(
        &mut relay,
        vec![s3_sink(&svc, &bucket, false), kafka_sink(&svc, &topic)],
    );
    write_numbered_lines(&log, 2 * N + 1, N);
    relay.wait_delivered("kafka", N, delivered);
    wait_for(
        "the disabled sink's lag to show the held lines",
        Duration::from_secs(10),
        || relay.lag("s3").unwrap_or(0.0) > 0.0,
    );
    assert_eq!(relay.delivered("s3"), 0, "a disabled sink delivered");

    // Phase 4: S3 enabled again (it catches up from its cursor), Kafka removed.
    next_phase(&mut relay, vec![s3_sink(&svc, &bucket, true)]);
    write_numbered_lines(&log, 3 * N + 1, N);
    relay.wait_delivered("s3", 2 * N, delivered);
    assert!(relay.lag("kafka").is_none(), "a removed sink still reports");
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(30));

    let kafka = svc.kafka_summary(&topic, 2 * N);
    let s3 = svc.s3_summary(&bucket);
    eprintln!("kafka: {kafka}\ns3: {s3}");
    assert_eq!(s3["distinct_messages"], 4 * N, "the bucket has every line");
    assert_eq!(s3["messages"], 4 * N, "and each once");
    assert_eq!(
        kafka["distinct_messages"],
        2 * N,
        "Kafka has phases 2 and 3"
    );
    assert_eq!(kafka["messages"], 2 * N);
    assert_eq!(
        kafka["number_min"],
        N + 1,
        "Kafka started from now, not from the oldest data"
    );
    assert_eq!(
        kafka["number_max"],
        3 * N,
        "Kafka got nothing after it was removed"
    );
    assert!(
        dir.join("relay-data/sink-state/.removed/kafka").exists(),
        "removed sink's state set aside"
    );
}
