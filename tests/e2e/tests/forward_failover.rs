//! Failover: one agent, three relays over TLS; the relay the agent is using is killed
//! (SIGKILL) in the middle of the run. Every line arrives (counted as distinct line
//! numbers across the three relays' file sinks, the killed relay's spool included once it
//! is back), and the agent is sending to another relay within seconds.
//!
//! No Kafka or S3 needed: each relay writes to a `file` sink in a temp dir.
//! `SLUICE_FAILOVER_LINES` changes the size (default 200,000).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_e2e::*;

struct Relay {
    proc_: Proc,
    config: PathBuf,
    log: PathBuf,
    forward: SocketAddr,
    metrics: SocketAddr,
    sink: PathBuf,
}

impl Relay {
    fn start(dir: &Path, name: &str, server: &Issued) -> Relay {
        let forward: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let sink = dir.join(format!("{name}-sink.ndjson"));
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[relay]
id = "{name}"
data_dir = "{data}"

[server]
listen = "{forward}"
tls = {{ cert = "{cert}", key = "{key}" }}

[metrics]
listen = "{metrics}"

[[sink]]
name = "file"
type = "file"
path = "{sink}"
"#,
                data = dir.join(format!("{name}-data")).display(),
                cert = server.cert.display(),
                key = server.key.display(),
                sink = sink.display(),
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut proc_ = Proc::start("sluice-relay", &config, &log);
        wait_listening(forward, &mut proc_);
        Relay {
            proc_,
            config,
            log,
            forward,
            metrics,
            sink,
        }
    }

    /// Starts the relay again on its data dir, after a kill.
    fn restart(&mut self) {
        let log = self.log.with_extension("restarted.log");
        self.proc_ = Proc::start("sluice-relay", &self.config, &log);
        wait_listening(self.forward, &mut self.proc_);
    }

    fn received(&self) -> f64 {
        metric(self.metrics, "sluice_relay_events_received_total", "").unwrap_or(0.0)
    }
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
        .map(|name| Relay::start(dir.path(), name, &server))
        .collect();

    let log = dir.path().join("app.log");
    write_numbered_lines(&log, 1, quarter);
    let relay_list = relays
        .iter()
        .map(|r| format!("\"{}\"", r.forward))
        .collect::<Vec<_>>()
        .join(", ");
    let agent_cfg = dir.path().join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            r#"
[agent]
id = "agent-failover"
data_dir = "{data}"

[[input]]
type = "tail"
name = "app"
tag = "app.log"
include = ["{log}"]

[output]
relays = [{relay_list}]
tls = {{ ca = "{ca}", server_name = "localhost" }}
chunk_size = "128 KiB"
chunk_age = "200ms"
in_flight = 8
ack_timeout = "5s"
connect_timeout = "2s"
retry_max = "1s"

[metrics]
listen = "127.0.0.1:{mport}"
"#,
            data = dir.path().join("agent-data").display(),
            log = log.display(),
            ca = ca.ca.display(),
            mport = free_port(),
        ),
    )
    .unwrap();
    let mut agent = Proc::start("sluice-agent", &agent_cfg, &dir.path().join("agent.log"));

    // Find the relay the agent chose, let it take part of the run, then kill it.
    let mut active = None;
    wait_for(
        "the agent to deliver to one relay",
        Duration::from_secs(60),
        || {
            assert!(agent.is_running(), "agent exited:\n{}", agent.log_text());
            active = relays.iter().position(|r| r.received() > 0.0);
            active.is_some()
        },
    );
    let active = active.unwrap();
    write_numbered_lines(&log, quarter + 1, quarter);
    wait_for(
        "the active relay to receive a third of the lines",
        Duration::from_secs(120),
        || relays[active].received() >= (lines / 3) as f64,
    );
    let before: Vec<f64> = relays.iter().map(Relay::received).collect();
    relays[active].proc_.kill();
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
    relays[active].restart();

    let started = Instant::now();
    let mut union = HashSet::new();
    wait_for(
        "every line in the union of the sinks",
        Duration::from_secs(300),
        || {
            assert!(agent.is_running(), "agent exited:\n{}", agent.log_text());
            union.clear();
            for r in &relays {
                union.extend(numbers_in(&r.sink).0);
            }
            union.len() as u64 == lines
        },
    );
    assert!(union.iter().all(|n| (1..=lines).contains(n)));
    let per_relay: Vec<u64> = relays.iter().map(|r| numbers_in(&r.sink).1).collect();
    eprintln!(
        "all {lines} lines arrived ({:?} after the kill + {:?}); events per relay sink {per_relay:?}, {} duplicates from resends",
        failover,
        started.elapsed(),
        per_relay.iter().sum::<u64>() - lines
    );
    let agent_log = plain_log(&agent.log);
    assert!(
        agent_log.contains("failing over to the next relay"),
        "{agent_log}"
    );
    agent.stop(Duration::from_secs(30));
    for r in &mut relays {
        r.proc_.stop(Duration::from_secs(30));
    }
}
