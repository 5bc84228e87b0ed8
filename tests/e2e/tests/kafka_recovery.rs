//! The Kafka sink's recovery after a crash is bounded by what the lost delivery could
//! have written (issue 14): the relay is killed (-9) again and again while it delivers
//! into a 24-partition topic that already holds a large backlog from another producer
//! (another relay of the cluster, with its own `relay` header). Each life that was
//! killed in the middle of a delivery reads back from the marks it saved before
//! producing, not from the partitions' beginning: the test checks, from each life's own
//! log line, that it read far fewer messages than the backlog holds and finished in
//! under 5 s, and, with the confluent-kafka client, that every line is in the topic
//! exactly once and the backlog is untouched.
//!
//! CI size: a backlog of 1,000,000 messages, 600,000 lines, 10 kills (a life takes one or two 4 MiB gatherings).
//! `SLUICE_KAFKA_BACKLOG=5000000` gives the size.

use std::time::{Duration, Instant};

use sluice_e2e::*;

/// `took=12.3ms` (a `Duration`'s Debug form) in seconds.
fn seconds(text: &str) -> Option<f64> {
    let digits = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(digits);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        u if u.starts_with("ns") => n / 1e9,
        u if u.starts_with("µs") || u.starts_with("us") => n / 1e6,
        u if u.starts_with("ms") => n / 1e3,
        u if u.starts_with('s') => n,
        _ => return None,
    })
}

/// Each read-back after a crash a life logged: (messages read, seconds). (The line of
/// the version before marks is matched too, so the test can be run against it.)
fn read_backs(log: &str) -> Vec<(u64, f64)> {
    log.lines()
        .filter(|l| l.contains("read back") && l.contains("messages="))
        .filter(|l| !l.contains("a retry after a failed attempt"))
        .map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {l}"))
                    .to_string()
            };
            let messages = field("messages=").parse().unwrap();
            let took = seconds(&field("took=")).unwrap_or_else(|| panic!("took in {l}"));
            (messages, took)
        })
        .collect()
}

/// Events a life found already in Kafka and did not send again.
fn skipped(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("were not sent again"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("skipped="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

#[test]
fn recovery_after_kill_reads_back_from_the_marks_not_the_whole_topic() {
    let backlog = env_u64("SLUICE_KAFKA_BACKLOG", 1_000_000);
    let lines = env_u64("SLUICE_KAFKA_RECOVERY_LINES", 600_000);
    const KILLS: usize = 10;
    let svc = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let topic = unique_name("kafka-recovery");
    svc.create_topic(&topic, 24);
    let filled = svc.py(
        "kafka_fill.py",
        &[
            "--brokers",
            &svc.kafka,
            "--topic",
            &topic,
            "--count",
            &backlog.to_string(),
        ],
    );
    eprintln!("backlog from another producer: {filled}");

    let mut spec = RelaySpec::new(dir.path(), "relay-recovery", certs.server_tls());
    spec.config.relay.shutdown_timeout = Span::secs(10);
    spec.config.spool.segment_size = ByteSize::mib(1);
    let mut kafka = svc.kafka_sink(&topic);
    kafka.common.retry_max = Span::secs(2);
    spec.config.sinks.push(kafka);
    let mut relay = spec.start();

    let log = dir.path().join("app.log");
    let mut agent_spec = AgentSpec::new(
        dir.path(),
        "agent-recovery",
        &[relay.forward],
        certs.client_tls(),
        &log.display().to_string(),
    );
    agent_spec.config.output.chunk_size = ByteSize::kib(256);
    agent_spec.config.output.chunk_age = Span::millis(200);
    agent_spec.config.output.retry_max = Span::millis(500);
    let mut agent = agent_spec.spawn();
    // Written faster than the sink delivers, so that a kill usually finds it delivering.
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            let batch = lines / 20;
            for i in 0..20 {
                write_numbered_lines(&log, 1 + i * batch, batch);
            }
        })
    };

    // One delivery done in this life, then the kill lands in the next one.
    let per_life = 1_000;
    // Every line in the spool and the sink past it: nothing left to kill it during.
    let all_delivered =
        |relay: &Relay, agent: &Agent| agent.acked() >= lines && relay.caught_up(&["kafka"]);
    for kill in 1..=KILLS {
        // Each life delivers some, then dies while it delivers more.
        wait_for(
            &format!("relay life {kill} to deliver {per_life} events"),
            Duration::from_secs(120),
            || {
                agent.assert_running();
                relay.assert_running();
                // (The agent has every line acknowledged long before: acks follow the
                // spool, not Kafka.)
                relay.delivered("kafka") >= per_life || all_delivered(&relay, &agent)
            },
        );
        if all_delivered(&relay, &agent) {
            eprintln!("the sink caught up before kill {kill}");
            break;
        }
        // Kill it while a delivery is in flight: the sink's state log ends with the
        // intent it saved before producing (30 s at most, then kill anyway).
        let until = Instant::now() + Duration::from_secs(30);
        while !relay.sink_delivering("kafka") && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The intent is saved before anything is produced: kill at points spread over
        // the delivery (0 to 63 ms into it), so that some lives die with part of it in
        // Kafka. (Where the kill lands is the test's input, not a synchronisation.)
        std::thread::sleep(Duration::from_millis((kill as u64 * 37) % 64));
        relay.kill();
        relay.start();
    }
    writer.join().unwrap();
    relay.wait(
        "the agent to have every line acknowledged",
        Duration::from_secs(300),
        || agent.acked() >= lines,
    );
    wait_for(
        "the Kafka sink to catch up",
        Duration::from_secs(300),
        || relay.caught_up(&["kafka"]),
    );
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(60));

    let started = Instant::now();
    let summary = svc.kafka_summary(&topic, backlog + lines);
    eprintln!("read the topic back in {:?}: {summary}", started.elapsed());
    let mut recoveries = 0;
    let mut not_resent = 0;
    // The bound on each recovery's time is checked in the issue-sized run
    // (SLUICE_KAFKA_BACKLOG set), where it is the figure asked for; in CI the decision is
    // the count read back, and the times are printed.
    let check_time = std::env::var_os("SLUICE_KAFKA_BACKLOG").is_some();
    for (n, path) in relay.logs().iter().enumerate() {
        let text = plain_log(path);
        assert!(
            !text.contains("panicked"),
            "relay life {n} panicked:\n{text}"
        );
        not_resent += skipped(&text);
        for (messages, took) in read_backs(&text) {
            recoveries += 1;
            eprintln!("life {n}: read back {messages} messages in {took:.3} s");
            assert!(
                messages < lines.max(backlog / 10),
                "life {n} read back {messages} messages: more than it could have written since its marks (the backlog is {backlog})"
            );
            if check_time {
                assert!(took < 5.0, "life {n}: recovery took {took} s");
            }
        }
    }
    eprintln!("{recoveries} read-backs in {KILLS} kills; {not_resent} events found in Kafka were not sent again");
    // How many events a read-back saves from being sent twice depends on where each kill
    // lands in its delivery (none when all land before a message reached the broker, as
    // one CI run on a busy machine found): printed, not asserted. That nothing is sent
    // twice is asserted below, from the topic itself.
    assert!(
        recoveries >= KILLS / 2,
        "only {recoveries} of {KILLS} lives were killed in the middle of a delivery"
    );
    assert_eq!(summary["bad"], 0, "{summary}");
    assert_eq!(
        summary["distinct_messages"],
        backlog + lines,
        "every line and the backlog, once: {summary}"
    );
    assert_eq!(summary["duplicates"], 0, "{summary}");
    assert_eq!(summary["header_mismatch"], 0, "{summary}");
    assert_eq!(summary["timestamp_mismatch"], 0, "{summary}");
}

#[test]
fn durations_in_the_log_read_as_seconds() {
    assert_eq!(seconds("12.5ms"), Some(0.0125));
    assert_eq!(seconds("1.25s"), Some(1.25));
    assert_eq!(seconds("800µs"), Some(0.0008));
    assert_eq!(seconds("x"), None);
}
