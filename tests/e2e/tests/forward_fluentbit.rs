//! The agent sends to a Forward server that answers the handshake like Fluent Bit's
//! in_forward with `shared_key` (issue 11): its HELO always has an auth salt, users or
//! not. The server is `tests/py/fluentbit_forward_server.py`, written from the protocol
//! spec and Fluent Bit's fw_prot.c with msgpack, not with sluice's codec, because neither
//! Fluent Bit nor Fluentd can be installed here (no Debian, PyPI or npm package). It
//! counts every record it receives, in a file next to its status. Needs `scripts/test`
//! (for the venv's Python).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice_e2e::*;

/// The Python server, killed on drop.
struct FluentBitLike {
    child: Child,
    status: PathBuf,
    port: u16,
    log: PathBuf,
}

impl FluentBitLike {
    fn start(dir: &Path, certs: &Certs, key: &str, extra: &[&str]) -> FluentBitLike {
        let svc = Services::from_env();
        let status = dir.join("fluentbit-status.json");
        let log = dir.join("fluentbit.log");
        let child = die_with_test(&mut Command::new(&svc.python))
            .arg(svc.py_dir.join("fluentbit_forward_server.py"))
            .arg("--cert")
            .arg(&certs.cert)
            .arg("--key")
            .arg(&certs.key)
            .args(["--shared-key", key, "--self-hostname", "fluent-bit"])
            .arg("--status")
            .arg(&status)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("server log"))
            .spawn()
            .expect("start fluentbit_forward_server.py");
        let mut server = FluentBitLike {
            child,
            status,
            port: 0,
            log,
        };
        wait_for("the server to listen", Duration::from_secs(20), || {
            server.assert_running();
            server.port = server.status()["port"].as_u64().unwrap_or(0) as u16;
            server.port != 0
        });
        server
    }

    fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn status(&self) -> serde_json::Value {
        std::fs::read_to_string(&self.status)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Every record's message the server received, one per record (duplicates too).
    fn messages(&self) -> Vec<String> {
        let path = format!("{}.messages", self.status.display());
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn handshakes(&self) -> Vec<serde_json::Value> {
        self.status()["handshakes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the server exited ({status}):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for FluentBitLike {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_spec(dir: &Path, certs: &Certs, server: &FluentBitLike, key: &str) -> AgentSpec {
    let log = dir.join("app.log");
    let mut spec = AgentSpec::new(
        dir,
        "agent-fb",
        &[server.addr()],
        certs.client_tls(),
        &log.display().to_string(),
    );
    spec.config.output.shared_key = Some(key.into());
    spec.config.output.chunk_age = Span::millis(100);
    spec.config.output.retry_max = Span::millis(500);
    // A refused agent waits this long for acks that cannot come when it is stopped.
    spec.config.agent.shutdown_timeout = Span::secs(2);
    spec
}

/// The user's setup: shared key on both sides, no users. Every line arrives, and the
/// PING carried an empty user name and password digest.
#[test]
fn agent_sends_every_line_to_a_fluent_bit_like_server_with_a_shared_key() {
    const LINES: u64 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let certs = Certs::generate(dir, "fb");
    let server = FluentBitLike::start(dir, &certs, "fb-key", &[]);
    write_numbered_lines(&dir.join("app.log"), 1, LINES);
    let mut agent = agent_spec(dir, &certs, &server, "fb-key").start();
    agent.wait_acked(LINES, Duration::from_secs(60));

    // Every line, counted at the server by its number (resends may repeat one).
    let got = server.messages();
    let numbers: BTreeSet<u64> = got
        .iter()
        .map(|m| {
            m.strip_prefix("line ")
                .and_then(|rest| rest.get(..8))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a line we wrote: {m:?}"))
        })
        .collect();
    let missing: Vec<u64> = (1..=LINES).filter(|n| !numbers.contains(n)).collect();
    assert!(missing.is_empty(), "lines that never arrived: {missing:?}");
    assert_eq!(numbers.len() as u64, LINES, "only the lines written");
    assert!(got.len() as u64 >= LINES);
    let status = server.status();
    assert!(status["events"].as_u64().unwrap() >= LINES, "{status}");
    assert!(status["acks"].as_u64().unwrap() >= 1, "{status}");
    let handshakes = server.handshakes();
    assert!(!handshakes.is_empty(), "{status}");
    for h in &handshakes {
        assert_eq!(h["result"], "ok", "{h}");
        assert_eq!(h["hostname"], "agent-fb", "{h}");
        assert_eq!(h["username"], "", "{h}");
        assert_eq!(h["password_digest"], "", "{h}");
    }
    let log = agent.plain_log();
    assert!(!log.contains("refused the handshake"), "{log}");
    assert_eq!(
        agent.counter("sluice_agent_relay_errors_total", "reason=\"auth\""),
        0.0
    );
    agent.stop(Duration::from_secs(10));
}

/// Waits until the agent logged `expected` for a refused handshake and counted it as
/// `auth`; checks nothing was delivered.
fn expect_refused(agent: &Agent, server: &FluentBitLike, expected: &str) -> String {
    agent.wait(
        &format!("the agent to log {expected:?}"),
        Duration::from_secs(30),
        || agent.plain_log().contains(expected),
    );
    let line = agent
        .plain_log()
        .lines()
        .find(|l| l.contains(expected))
        .unwrap()
        .to_owned();
    eprintln!("agent said: {line}");
    assert!(
        line.contains("WARN") && line.contains("reason=\"auth\""),
        "{line}"
    );
    agent.wait("relay_errors{auth}", Duration::from_secs(10), || {
        agent.counter("sluice_agent_relay_errors_total", "reason=\"auth\"") >= 1.0
    });
    assert_eq!(agent.acked(), 0);
    assert!(server.messages().is_empty(), "nothing gets past a refusal");
    line
}

/// A wrong key, refused with a PONG as the spec (and Fluentd) do: the agent logs the
/// server's reason.
#[test]
fn a_wrong_shared_key_is_refused_with_the_servers_reason_in_the_agent_log() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let certs = Certs::generate(dir, "fb");
    let server = FluentBitLike::start(dir, &certs, "fb-key", &["--wrong-key", "pong"]);
    write_numbered_lines(&dir.join("app.log"), 1, 10);
    let mut agent = agent_spec(dir, &certs, &server, "not-the-key").start();
    let line = expect_refused(
        &agent,
        &server,
        "the relay refused the handshake; its PONG says: \"shared_key mismatch\"",
    );
    // The salt in HELO and no user: the hint names both possible causes.
    assert!(line.contains("output.username") && line.contains("output.shared_key"));
    assert!(server
        .handshakes()
        .iter()
        .all(|h| h["result"] == "shared_key mismatch"));
    agent.stop(Duration::from_secs(10));
}

/// A wrong key with Fluent Bit 5.x's own answer: the connection closed, no PONG.
#[test]
fn a_wrong_shared_key_closed_without_pong_is_named_in_the_agent_log() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let certs = Certs::generate(dir, "fb");
    let server = FluentBitLike::start(dir, &certs, "fb-key", &["--wrong-key", "close"]);
    write_numbered_lines(&dir.join("app.log"), 1, 10);
    let mut agent = agent_spec(dir, &certs, &server, "not-the-key").start();
    expect_refused(
        &agent,
        &server,
        "the relay closed the connection during authentication, without a PONG",
    );
    agent.stop(Duration::from_secs(10));
}

/// A server that does have users refuses the empty user in its PONG; the agent says so
/// and names the keys to set.
#[test]
fn a_server_with_users_refuses_an_agent_without_one_in_its_pong() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let certs = Certs::generate(dir, "fb");
    let server = FluentBitLike::start(dir, &certs, "fb-key", &["--user", "alice:s3cret"]);
    write_numbered_lines(&dir.join("app.log"), 1, 10);
    let mut agent = agent_spec(dir, &certs, &server, "fb-key").start();
    let line = expect_refused(
        &agent,
        &server,
        "its PONG says: \"username/password mismatch\"",
    );
    assert!(
        line.contains("set output.username and output.password"),
        "{line}"
    );
    agent.stop(Duration::from_secs(10));

    // With alice's password the same server takes every line.
    let mut spec = agent_spec(dir, &certs, &server, "fb-key");
    spec.stem = "agent-alice".into();
    spec.config.output.username = Some("alice".into());
    spec.config.output.password = Some("s3cret".into());
    let mut agent = spec.start();
    agent.wait_acked(10, Duration::from_secs(30));
    assert_eq!(server.messages().len(), 10);
    agent.stop(Duration::from_secs(10));
}
