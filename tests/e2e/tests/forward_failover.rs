//! Failover: one agent, three relays over TLS; the relay the agent is using is killed
//! (SIGKILL) in the middle of the run. Every line arrives (counted as distinct line
//! numbers across the three relays' file sinks, the killed relay's spool included once it
//! is back), and the agent is sending to another relay within seconds.
//!
//! No Kafka or S3 needed: each relay writes to a `file` sink in a temp dir.
//! `SLUICE_FAILOVER_LINES` changes the size (default 200,000).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_e2e::*;

/// Relay `name` (its id and its file names) with one `file` sink.
fn start_relay(dir: &Path, name: &str, server: &Issued) -> Relay {
    let mut spec = RelaySpec::new(dir, name, server.server_tls()).stem(name);
    spec.config
        .sinks
        .push(file_sink("file", &dir.join(format!("{name}-sink.ndjson"))));
    spec.start()
}

/// Line numbers (`line 00000042 ...`) in a file sink, and how many events it holds.
fn numbers_in(sink: &Path) -> (HashSet<u64>, u64) {
    let text = std::fs::read_to_string(sink).unwrap_or_default();
    let mut numbers = HashSet::new();
    let mut events = 0;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue; // a line cut by the kill
        };
        events += 1;
        if let Some(n) = v["record"]["message"]
            .as_str()
            .and_then(|m| m.get(5..13))
            .and_then(|n| n.parse().ok())
        {
            numbers.insert(n);
        }
    }
    (numbers, events)
}

#[test]
fn killing_the_active_relay_moves_the_agent_and_loses_nothing() {
    let lines: u64 = std::env::var("SLUICE_FAILOVER_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let quarter = lines / 4;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "relays");
    let server = ca.issue("relay", &["localhost", "127.0.0.1"], false);
    let mut relays: Vec<Relay> = ["relay-a", "relay-b", "relay-c"]
        .iter()
        .map(|name| start_relay(dir.path(), name, &server))
        .collect();

    let log = dir.path().join("app.log");
    write_numbered_lines(&log, 1, quarter);
    let mut spec = AgentSpec::new(
        dir.path(),
        "agent-failover",
        &relays.iter().map(|r| r.forward).collect::<Vec<_>>(),
        ca.client_tls(),
        &log.display().to_string(),
    );
    let output = &mut spec.config.output;
    output.chunk_size = ByteSize::kib(128);
    output.chunk_age = Span::millis(200);
    output.in_flight = 8;
    output.ack_timeout = Span::secs(5);
    output.connect_timeout = Span::secs(2);
    output.retry_max = Span::secs(1);
    let mut agent = spec.spawn();

    // Find the relay the agent chose, let it take part of the run, then kill it.
    let mut active = None;
    wait_for(
        "the agent to deliver to one relay",
        Duration::from_secs(60),
        || {
            agent.assert_running();
            active = relays.iter().position(|r| r.received() > 0);
            active.is_some()
        },
    );
    let active = active.unwrap();
    write_numbered_lines(&log, quarter + 1, quarter);
    wait_for(
        "the active relay to receive a third of the lines",
        Duration::from_secs(120),
        || relays[active].received() >= lines / 3,
    );
    let before: Vec<u64> = relays.iter().map(Relay::received).collect();
    relays[active].kill();
    let killed_at = Instant::now();
    // More lines after the kill: the killed relay may already have had everything
    // written so far, and then only new lines can show where the agent went.
    write_numbered_lines(&log, 2 * quarter + 1, quarter);
    eprintln!(
        "killed {} after it received {} events",
        relays[active].forward, before[active]
    );

    let mut moved_to = None;
    wait_for(
        "another relay to receive events",
        Duration::from_secs(30),
        || {
            moved_to = (0..relays.len())
                .filter(|&i| i != active)
                .find(|&i| relays[i].received() > before[i]);
            moved_to.is_some()
        },
    );
    let failover = killed_at.elapsed();
    eprintln!(
        "the agent moved to {} within {failover:?}",
        relays[moved_to.unwrap()].forward
    );
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );

    write_numbered_lines(&log, 3 * quarter + 1, lines - 3 * quarter);
    // What the killed relay acknowledged is in its spool: bring it back to deliver it.
    relays[active].start();

    let started = Instant::now();
    let mut union = HashSet::new();
    wait_for(
        "every line in the union of the sinks",
        Duration::from_secs(300),
        || {
            agent.assert_running();
            union.clear();
            for r in &relays {
                union.extend(numbers_in(&r.sink_file("file")).0);
            }
            union.len() as u64 == lines
        },
    );
    assert!(union.iter().all(|n| (1..=lines).contains(n)));
    let per_relay: Vec<u64> = relays
        .iter()
        .map(|r| numbers_in(&r.sink_file("file")).1)
        .collect();
    eprintln!(
        "all {lines} lines arrived ({:?} after the kill + {:?}); events per relay sink {per_relay:?}, {} duplicates from resends",
        failover,
        started.elapsed(),
        per_relay.iter().sum::<u64>() - lines
    );
    let agent_log = agent.plain_log();
    assert!(
        agent_log.contains("relay unusable: its sources go to the other relays"),
        "{agent_log}"
    );
    agent.stop(Duration::from_secs(30));
    for r in &mut relays {
        r.stop(Duration::from_secs(30));
    }
}
