//! `server.ack = "end_to_end"` with a slow required sink: acknowledgements wait for the
//! bucket, and an agent whose relay is slow but alive must wait for it instead of failing
//! over (each relay it moved to would spool, and deliver, its own copy of the window).
//!
//! Real components: three relays over TLS, a shared tansu topic and one bucket on a moto
//! of the test's own, frozen with SIGSTOP. `SLUICE_FREEZE_SECS` sets how long the bucket
//! stays frozen (default 90; it must be several ack timeouts).

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_e2e::*;

/// A relay acknowledging end to end, with a Kafka and an S3 sink, both required.
fn relay(
    dir: &Path,
    name: &str,
    certs: &Certs,
    svc: &Services,
    topic: &str,
    bucket: &str,
) -> Relay {
    let mut spec = RelaySpec::new(dir, name, certs.server_tls()).stem(name);
    spec.config.server.ack = AckMode::EndToEnd;
    spec.config.relay.shutdown_timeout = Span::secs(10);
    let mut kafka = svc.kafka_sink(topic);
    kafka.common.retry_max = Span::secs(2);
    let mut s3 = svc.s3_sink(bucket);
    s3.common.retry_max = Span::secs(2);
    spec.config.sinks.push(kafka);
    spec.config.sinks.push(s3);
    assert!(spec.config.sinks.iter().all(|s| s.common.required));
    spec.start()
}

/// Asserts that an independent reader's summary holds every line exactly once; returns
/// the duplicates (total minus distinct provenance) for the message.
fn duplicates(name: &str, summary: &serde_json::Value, lines: u64) -> u64 {
    eprintln!("{name}: {summary}");
    assert_eq!(
        summary["bad"].as_u64(),
        Some(0),
        "{name}: unreadable envelopes"
    );
    let distinct = summary["distinct_provenance"].as_u64().unwrap();
    assert_eq!(
        distinct,
        lines,
        "{name}: distinct (source, seq) (missing = {})",
        lines as i64 - distinct as i64
    );
    assert_eq!(summary["distinct_messages"].as_u64(), Some(lines), "{name}");
    summary["messages"].as_u64().unwrap() - distinct
}

fn agent_spec(dir: &Path, id: &str, relays: &[&Relay], certs: &Certs, log: &Path) -> AgentSpec {
    let mut spec = AgentSpec::new(
        dir,
        id,
        &relays.iter().map(|r| r.forward).collect::<Vec<_>>(),
        certs.client_tls(),
        &log.display().to_string(),
    );
    let output = &mut spec.config.output;
    output.chunk_size = ByteSize::kib(64);
    output.chunk_age = Span::millis(200);
    output.in_flight = 8;
    output.connect_timeout = Span::secs(2);
    output.retry_max = Span::secs(1);
    spec
}

/// The bucket frozen for many ack timeouts while the agent has a window of chunks
/// waiting: the agent stays on its relay (which still answers), nothing is spooled twice,
/// and once the bucket is back every line is in Kafka and in S3 exactly once.
#[test]
fn a_frozen_bucket_in_end_to_end_mode_duplicates_nothing_across_relays() {
    const LINES: u64 = 30_000;
    let ack_timeout = Duration::from_secs(5);
    let freeze = Duration::from_secs(env_u64("SLUICE_FREEZE_SECS", 90));
    assert!(
        freeze >= 3 * ack_timeout,
        "SLUICE_FREEZE_SECS must be at least three ack timeouts ({:?})",
        3 * ack_timeout
    );
    let shared = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = Certs::generate(dir, "relay");
    let moto = PrivateService::moto(&shared, &dir.join("moto.log"));
    let svc = shared.with(None, Some(&moto.addr));
    let topic = unique_name("e2e-slow");
    let bucket = unique_name("e2e-slow");
    svc.create_topic(&topic, 3);
    svc.create_bucket(&bucket);
    let mut relays: Vec<Relay> = ["relay-a", "relay-b", "relay-c"]
        .iter()
        .map(|name| relay(dir, name, &certs, &svc, &topic, &bucket))
        .collect();

    let log = dir.join("app.log");
    let first = LINES / 3;
    write_numbered_lines(&log, 1, first);
    let mut spec = agent_spec(
        dir,
        "agent-e2e-slow",
        &relays.iter().collect::<Vec<_>>(),
        &certs,
        &log,
    );
    spec.config.output.ack_timeout = Span::secs(ack_timeout.as_secs());
    let mut agent = spec.spawn();
    agent.wait_acked(first, Duration::from_secs(120));
    let active = relays
        .iter()
        .position(|r| r.received() > 0)
        .expect("a relay received the first lines");

    moto.pause();
    let frozen_at = Instant::now();
    write_numbered_lines(&log, first + 1, LINES - first);
    agent.wait(
        "the agent to fill its window with chunks the bucket holds up",
        Duration::from_secs(60),
        || agent.counter("sluice_agent_in_flight", "") >= 1.0,
    );
    while frozen_at.elapsed() < freeze {
        for r in &relays {
            r.assert_running();
        }
        agent.assert_running();
        std::thread::sleep(Duration::from_millis(200));
    }
    let received_frozen: Vec<u64> = relays.iter().map(Relay::received).collect();
    let acked_frozen = agent.acked();
    moto.resume();
    let thawed_at = Instant::now();
    eprintln!(
        "bucket frozen {freeze:?}: agent acked {acked_frozen} of {LINES}; events received per relay {received_frozen:?} (active {})",
        relays[active].forward
    );

    agent.wait(
        "every line acknowledged and every sink caught up",
        Duration::from_secs(300),
        || agent.acked() >= LINES && relays.iter().all(|r| r.caught_up(&["kafka", "s3"])),
    );
    eprintln!("caught up {:?} after the thaw", thawed_at.elapsed());
    let ack_timeouts = agent.counter("sluice_agent_relay_errors_total", "reason=\"ack_timeout\"");
    let waits = agent.counter("sluice_agent_ack_waits_total", "");
    let resent = agent.counter("sluice_agent_chunks_resent_total", "");
    let received: Vec<u64> = relays.iter().map(Relay::received).collect();
    agent.stop(Duration::from_secs(30));
    for r in &mut relays {
        r.stop(Duration::from_secs(60));
    }

    let dup_kafka = duplicates("kafka", &svc.kafka_summary(&topic, LINES), LINES);
    let dup_s3 = duplicates("s3", &svc.s3_summary(&bucket), LINES);
    eprintln!(
        "{LINES} lines, bucket frozen {freeze:?} with ack_timeout {ack_timeout:?}: duplicates kafka {dup_kafka}, s3 {dup_s3}; \
         events received per relay {received:?}; agent: ack_timeout failures {ack_timeouts}, ack waits {waits}, chunks resent {resent}"
    );
    assert_eq!(
        (dup_kafka, dup_s3),
        (0, 0),
        "duplicates downstream (kafka, s3): the agent multiplied its window across relays"
    );
    assert_eq!(
        received.iter().filter(|&&n| n > 0).count(),
        1,
        "more than one relay received events: {received:?}"
    );
    assert_eq!(
        ack_timeouts, 0.0,
        "the agent gave up on a relay that answered"
    );
    assert!(waits >= 1.0, "no ack wait counted during the freeze");
    assert!(
        agent_log_mentions_wait(&agent),
        "no warning about the wait in the agent's log"
    );
}

fn agent_log_mentions_wait(agent: &Agent) -> bool {
    agent
        .plain_log()
        .lines()
        .any(|l| l.contains("WARN") && l.contains("the relay answers probes"))
}

/// With `max_object_age` at ten minutes, a lone chunk is still acknowledged in seconds:
/// in `end_to_end` mode the object sink writes an object when an acknowledgement waits
/// for it, not only at its size or age.
#[test]
fn a_lone_chunk_is_acknowledged_long_before_max_object_age() {
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = Certs::generate(dir, "relay");
    let bucket = unique_name("e2e-demand");
    svc.create_bucket(&bucket);
    let mut spec = RelaySpec::new(dir, "relay-demand", certs.server_tls());
    spec.config.server.ack = AckMode::EndToEnd;
    spec.config.relay.shutdown_timeout = Span::secs(10);
    let mut s3 = svc.s3_sink(&bucket);
    s3.object_store().max_object_age = Span::secs(600);
    spec.config.sinks.push(s3);
    let mut relay = spec.start();

    let log = dir.join("app.log");
    let mut agent = agent_spec(dir, "agent-demand", &[&relay], &certs, &log).spawn();
    for round in 0..2u64 {
        write_numbered_lines(&log, 1 + round * 10, 10);
        let written = Instant::now();
        agent.wait_acked(10 * (round + 1), Duration::from_secs(20));
        let took = written.elapsed();
        eprintln!("round {round}: 10 lines acknowledged {took:?} after they were written");
        assert!(
            took < Duration::from_secs(10),
            "acknowledged only after {took:?}"
        );
    }
    assert_eq!(agent.counter("sluice_agent_relay_errors_total", ""), 0.0);
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(30));
    let summary = svc.s3_summary(&bucket);
    assert_eq!(duplicates("s3", &summary, 20), 0);
    assert!(
        summary["objects"].as_u64() >= Some(2),
        "each round's acknowledgement needs an object of its own"
    );
}
