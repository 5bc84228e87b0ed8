//! The Kafka broker killed (-9) and restarted in the middle of a stream (issue 14): a
//! tansu of the test's own that keeps its log in a bucket on the S3 server (tansu's
//! dynostore engine), so a restart is a real one with the topic's data intact. Lines keep
//! coming through an agent the whole time; the sink's deliveries fail while the broker
//! is down (message timeouts), their retries read back what landed, and at the end the
//! confluent-kafka client finds every line, once.
//!
//! CI size: 60,000 lines, the broker down for 8 s (the sink's delivery timeout is 5 s). `SLUICE_BROKER_RESTART_LINES` for more.

use std::time::Duration;

use sluice_e2e::*;

#[test]
fn a_broker_restarted_mid_stream_loses_and_duplicates_nothing() {
    let lines = env_u64("SLUICE_BROKER_RESTART_LINES", 60_000);
    let shared = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let bucket = unique_name("tansu-store");
    shared.create_bucket(&bucket);
    let mut broker = PrivateService::tansu_on_s3(&shared, &bucket, &dir.path().join("tansu.log"));
    let svc = shared.with(Some(&broker.addr), None);
    let topic = unique_name("restart");
    svc.create_topic(&topic, 3);

    let mut spec = RelaySpec::new(dir.path(), "relay-restart", certs.server_tls());
    let mut kafka = svc.kafka_sink(&topic);
    kafka.common.retry_max = Span::secs(2);
    kafka.kafka().delivery_timeout = Span::secs(5);
    spec.config.sinks.push(kafka);
    let relay = spec.start();

    let log = dir.path().join("app.log");
    let mut agent_spec = AgentSpec::new(
        dir.path(),
        "agent-restart",
        &[relay.forward],
        certs.client_tls(),
        &log.display().to_string(),
    );
    agent_spec.config.output.chunk_age = Span::millis(200);
    let agent = agent_spec.spawn();
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            let batch = lines / 60;
            for i in 0..60 {
                write_numbered_lines(&log, 1 + i * batch, batch);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    relay.wait_delivered("kafka", lines / 4, Duration::from_secs(120));
    // Down longer than the delivery timeout: messages in flight time out, the attempt
    // fails, and its retry reads back what landed before the kill.
    // Killed while a delivery is in flight (the sink's state log ends with its intent).
    relay.wait("a delivery in flight", Duration::from_secs(60), || {
        relay.sink_delivering("kafka")
    });
    let before = relay.delivered("kafka");
    broker.kill_and_restart(&svc, Duration::from_secs(8));
    writer.join().unwrap();
    relay.wait(
        "the agent to have every line acknowledged",
        Duration::from_secs(180),
        || agent.acked() >= lines,
    );
    relay.wait(
        "the Kafka sink to catch up",
        Duration::from_secs(180),
        || relay.caught_up(&["kafka"]),
    );
    let retries = relay.counter("sluice_relay_sink_retries_total", "sink=\"kafka\"");
    let read_back = relay.counter("sluice_relay_kafka_readback_messages_total", "");
    let summary = svc.kafka_summary(&topic, lines);
    eprintln!(
        "broker restarted: {retries} failed attempts, {read_back} messages read back; {summary}"
    );
    assert!(
        before < lines,
        "the broker was killed after everything was delivered"
    );
    assert!(
        retries >= 1.0,
        "the restart did not fail a delivery: the test proved nothing"
    );
    assert!(
        relay
            .log_text()
            .contains("why=\"a retry after a failed attempt\""),
        "the failed attempt's retry did not read back what landed"
    );
    assert_eq!(summary["distinct_messages"], lines, "{summary}");
    assert_eq!(summary["bad"], 0, "{summary}");
    assert_eq!(summary["duplicates"], 0, "{summary}");
    assert_eq!(summary["header_mismatch"], 0, "{summary}");
}
