//! Heartbeats: an idle agent keeps its connection past the relay's idle timeout by
//! sending Forward heartbeats (`nil`); without them the relay closes the connection as
//! idle. No Kafka or S3: the relay's sink is a file.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_e2e::*;

struct Pair {
    relay: Proc,
    agent: Proc,
    relay_metrics: SocketAddr,
    agent_metrics: SocketAddr,
}

fn start(dir: &Path, heartbeat: &str) -> Pair {
    let certs = Certs::generate(dir, "relay");
    let forward: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let relay_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let relay_toml = dir.join("relay.toml");
    std::fs::write(
        &relay_toml,
        format!(
            "[relay]\nid = \"relay-hb\"\ndata_dir = \"{}\"\n\n[server]\nlisten = \"{forward}\"\nidle_timeout = \"1s\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[metrics]\nlisten = \"{relay_metrics}\"\n\n[[sink]]\nname = \"file\"\ntype = \"file\"\npath = \"{}\"\n",
            dir.join("relay-data").display(),
            certs.cert.display(),
            certs.key.display(),
            dir.join("out.ndjson").display(),
        ),
    )
    .unwrap();
    let mut relay = Proc::start("sluice-relay", &relay_toml, &dir.join("relay.log"));
    wait_listening(forward, &mut relay);
    let log = dir.join("app.log");
    write_numbered_lines(&log, 1, 100);
    let agent_toml = dir.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "[agent]\nid = \"agent-hb\"\ndata_dir = \"{}\"\n\n[[input]]\ntype = \"tail\"\nname = \"app\"\ntag = \"app\"\ninclude = [\"{}\"]\n\n[output]\nrelays = [\"{forward}\"]\ntls = {{ ca = \"{}\", server_name = \"localhost\" }}\nchunk_age = \"100ms\"\nheartbeat_interval = \"{heartbeat}\"\n\n[metrics]\nlisten = \"{agent_metrics}\"\n",
            dir.join("agent-data").display(),
            log.display(),
            certs.ca.display(),
        ),
    )
    .unwrap();
    let agent = Proc::start("sluice-agent", &agent_toml, &dir.join("agent.log"));
    wait_for(
        "the first 100 lines to be acknowledged",
        Duration::from_secs(30),
        || metric(agent_metrics, "sluice_agent_events_acked_total", "").unwrap_or(0.0) >= 100.0,
    );
    Pair {
        relay,
        agent,
        relay_metrics,
        agent_metrics,
    }
}

fn idle_closes(p: &Pair) -> f64 {
    metric(
        p.relay_metrics,
        "sluice_relay_connections_rejected_total",
        "reason=\"idle\"",
    )
    .unwrap_or(0.0)
}

#[test]
fn heartbeats_keep_an_idle_connection_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path(), "250ms");
    // Idle for four idle timeouts: the connection must survive on heartbeats alone.
    let idle_since = Instant::now();
    wait_for("eight heartbeats", Duration::from_secs(20), || {
        metric(p.agent_metrics, "sluice_agent_heartbeats_total", "").unwrap_or(0.0) >= 8.0
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
        metric(p.agent_metrics, "sluice_agent_relay_errors_total", "").unwrap_or(0.0),
        0.0,
        "the agent lost its connection while idle"
    );
    p.agent.stop(Duration::from_secs(10));
    p.relay.stop(Duration::from_secs(10));
}

#[test]
fn without_heartbeats_the_relay_closes_an_idle_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path(), "0s");
    wait_for(
        "the relay to close the idle connection",
        Duration::from_secs(10),
        || idle_closes(&p) >= 1.0,
    );
    assert_eq!(
        metric(p.agent_metrics, "sluice_agent_heartbeats_total", "").unwrap_or(0.0),
        0.0
    );
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
        let forward: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let relay_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let agent_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let relay_toml = dir.join("relay.toml");
        std::fs::write(
            &relay_toml,
            format!(
                "[relay]\nid = \"relay-users\"\ndata_dir = \"{}\"\n\n[server]\nlisten = \"{forward}\"\nshared_key = \"k\"\nusers = {{ alice = \"s3cret\" }}\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[metrics]\nlisten = \"{relay_metrics}\"\n\n[[sink]]\nname = \"discard\"\ntype = \"discard\"\n",
                dir.join("relay-data").display(),
                certs.cert.display(),
                certs.key.display(),
            ),
        )
        .unwrap();
        let mut relay = Proc::start("sluice-relay", &relay_toml, &dir.join("relay.log"));
        wait_listening(forward, &mut relay);
        let log = dir.join("app.log");
        write_numbered_lines(&log, 1, 10);
        let agent_toml = dir.join("agent.toml");
        std::fs::write(
            &agent_toml,
            format!(
                "[agent]\nid = \"agent-users\"\ndata_dir = \"{}\"\n\n[[input]]\ntype = \"tail\"\nname = \"app\"\ntag = \"app\"\ninclude = [\"{}\"]\n\n[output]\nrelays = [\"{forward}\"]\ntls = {{ ca = \"{}\", server_name = \"localhost\" }}\nshared_key = \"k\"\nusername = \"alice\"\npassword = \"{password}\"\nchunk_age = \"100ms\"\n\n[metrics]\nlisten = \"{agent_metrics}\"\n",
                dir.join("agent-data").display(),
                log.display(),
                certs.ca.display(),
            ),
        )
        .unwrap();
        let mut agent = Proc::start("sluice-agent", &agent_toml, &dir.join("agent.log"));
        if accepted {
            wait_for(
                "alice's lines to be acknowledged",
                Duration::from_secs(30),
                || {
                    metric(agent_metrics, "sluice_agent_events_acked_total", "").unwrap_or(0.0)
                        >= 10.0
                },
            );
        } else {
            wait_for(
                "the relay to refuse alice's wrong password",
                Duration::from_secs(30),
                || {
                    metric(
                        relay_metrics,
                        "sluice_relay_connections_rejected_total",
                        "reason=\"auth\"",
                    )
                    .unwrap_or(0.0)
                        >= 1.0
                },
            );
            let text = relay.log_text();
            assert!(
                text.contains("wrong password for user") && text.contains("alice"),
                "{text}"
            );
            assert_eq!(
                metric(relay_metrics, "sluice_relay_events_received_total", "").unwrap_or(0.0),
                0.0
            );
            // Its lines are unacknowledged: a graceful stop would wait out shutdown_timeout.
            agent.kill();
        }
        agent.stop(Duration::from_secs(10));
        relay.stop(Duration::from_secs(10));
    }
}
