//! Heartbeats: an idle agent keeps its connection past the relay's idle timeout by
//! sending Forward heartbeats (`nil`); without them the relay closes the connection as
//! idle. No Kafka or S3: the relay's sink is a file.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_e2e::*;

struct Pair {
    relay: Relay,
    agent: Agent,
}

fn start(dir: &Path, heartbeat: Span) -> Pair {
    let certs = Certs::generate(dir, "relay");
    let mut spec = RelaySpec::new(dir, "relay-hb", certs.server_tls());
    spec.config.server.idle_timeout = Span::secs(1);
    spec.config
        .sinks
        .push(file_sink("file", &dir.join("out.ndjson")));
    let relay = spec.start();
    let log = dir.join("app.log");
    write_numbered_lines(&log, 1, 100);
    let mut spec = AgentSpec::new(
        dir,
        "agent-hb",
        &[relay.forward],
        certs.client_tls(),
        &log.display().to_string(),
    );
    spec.tail().tag = "app".into();
    spec.config.output.chunk_age = Span::millis(100);
    spec.config.output.heartbeat_interval = heartbeat;
    let agent = spec.spawn();
    wait_for(
        "the first 100 lines to be acknowledged",
        Duration::from_secs(30),
        || agent.acked() >= 100,
    );
    Pair { relay, agent }
}

fn idle_closes(p: &Pair) -> f64 {
    p.relay.rejected("idle")
}

#[test]
fn heartbeats_keep_an_idle_connection_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path(), Span::millis(250));
    // Idle for four idle timeouts: the connection must survive on heartbeats alone.
    let idle_since = Instant::now();
    wait_for("eight heartbeats", Duration::from_secs(20), || {
        p.agent.counter("sluice_agent_heartbeats_total", "") >= 8.0
    });
    while idle_since.elapsed() < Duration::from_secs(4) {
        assert!(p.relay.is_running() && p.agent.is_running());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        idle_closes(&p),
        0.0,
        "the relay closed a connection that sent heartbeats"
    );
    assert_eq!(
        p.agent.counter("sluice_agent_relay_errors_total", ""),
        0.0,
        "the agent lost its connection while idle"
    );
    p.agent.stop(Duration::from_secs(10));
    p.relay.stop(Duration::from_secs(10));
}

#[test]
fn without_heartbeats_the_relay_closes_an_idle_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path(), Span::secs(0));
    wait_for(
        "the relay to close the idle connection",
        Duration::from_secs(10),
        || idle_closes(&p) >= 1.0,
    );
    assert_eq!(p.agent.counter("sluice_agent_heartbeats_total", ""), 0.0);
    p.agent.stop(Duration::from_secs(10));
    p.relay.stop(Duration::from_secs(10));
}

/// User authentication inside the shared-key handshake (`server.users`): the right
/// password is served, a wrong one is refused with a log line naming the user and a metric.
#[test]
fn users_with_passwords_are_checked_in_the_handshake() {
    for (password, accepted) in [("s3cret", true), ("wrong", false)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let certs = Certs::generate(dir, "relay");
        let mut spec = RelaySpec::new(dir, "relay-users", certs.server_tls());
        spec.config.server.shared_key = Some("k".into());
        spec.config.server.users = [("alice".to_string(), "s3cret".to_string())].into();
        spec.config.sinks.push(discard_sink("discard"));
        let mut relay = spec.start();
        let log = dir.join("app.log");
        write_numbered_lines(&log, 1, 10);
        let mut spec = AgentSpec::new(
            dir,
            "agent-users",
            &[relay.forward],
            certs.client_tls(),
            &log.display().to_string(),
        );
        spec.tail().tag = "app".into();
        spec.config.output.shared_key = Some("k".into());
        spec.config.output.username = Some("alice".into());
        spec.config.output.password = Some(password.into());
        spec.config.output.chunk_age = Span::millis(100);
        let mut agent = spec.spawn();
        if accepted {
            wait_for(
                "alice's lines to be acknowledged",
                Duration::from_secs(30),
                || agent.acked() >= 10,
            );
        } else {
            wait_for(
                "the relay to refuse alice's wrong password",
                Duration::from_secs(30),
                || relay.rejected("auth") >= 1.0,
            );
            let text = relay.log_text();
            assert!(
                text.contains("wrong password for user") && text.contains("alice"),
                "{text}"
            );
            assert_eq!(relay.received(), 0);
            // Its lines are unacknowledged: a graceful stop would wait out shutdown_timeout.
            agent.kill();
        }
        agent.stop(Duration::from_secs(10));
        relay.stop(Duration::from_secs(10));
    }
}
