//! A SIGTERM that arrives while a binary is still starting (replaying its spool,
//! scanning its files) stops it cleanly once startup is done: exit status 0 and its
//! state saved, instead of death by signal where it stood.
//!
//! The signal is sent the moment the process has a SIGTERM handler (its `SigCgt` mask in
//! /proc), which the binaries now install before anything else. The same runs check that
//! a log written to a file carries no colour escape codes.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_e2e::*;

/// Whether process `pid` catches SIGTERM (signal 15: bit 14 of `SigCgt`).
fn catches_sigterm(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << 14) != 0)
}

/// Sends SIGTERM as soon as `proc_` catches it; it must exit 0 with `last_words` logged.
fn stop_as_soon_as_possible(mut proc_: Proc, started: &str, last_words: &str) {
    let t0 = Instant::now();
    while !catches_sigterm(proc_.pid()) {
        assert!(proc_.is_running(), "exited early:\n{}", proc_.log_text());
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} never installed a SIGTERM handler",
            proc_.name
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let during_startup = !proc_.log_text().contains(started);
    proc_.stop(Duration::from_secs(30)); // asserts exit status 0
    let log = proc_.log_text();
    assert!(log.contains(last_words), "{log}");
    // stderr is a file here, as under systemd: plain text, no colour escape codes.
    assert!(!log.contains('\x1b'), "ANSI escapes in a log file:\n{log}");
    eprintln!(
        "{}: SIGTERM {} startup had finished; clean exit",
        proc_.name,
        if during_startup { "before" } else { "after" }
    );
}

#[test]
fn relay_stops_cleanly_on_an_early_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let (config, ..) = FileRelay::write_config(dir.path(), &certs);
    let relay = Proc::start("sluice-relay", &config, &dir.path().join("relay.log"));
    stop_as_soon_as_possible(relay, "forward server listening", "stopped cleanly");
}

#[test]
fn agent_stops_cleanly_on_an_early_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    // Many files make the startup scan take a while; nobody listens at the relay port.
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    for i in 0..2000 {
        std::fs::write(logs.join(format!("app-{i}.log")), "a line\n").unwrap();
    }
    let config = agent_config(dir.path(), &logs, &certs.ca);
    let agent = Proc::start("sluice-agent", &config, &dir.path().join("agent.log"));
    stop_as_soon_as_possible(agent, "agent started", "stopped; checkpoints saved");
}

fn agent_config(dir: &Path, logs: &Path, ca: &Path) -> std::path::PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
id = "agent-signals"
data_dir = "{data}"
shutdown_timeout = "2s"

[[input]]
type = "tail"
name = "app"
tag = "app.log"
include = ["{logs}/*.log"]

[output]
relays = ["127.0.0.1:{port}"]
tls = {{ ca = "{ca}", server_name = "localhost" }}

[metrics]
listen = "127.0.0.1:{metrics}"
"#,
            data = dir.join("agent-data").display(),
            logs = logs.display(),
            port = free_port(),
            ca = ca.display(),
            metrics = free_port(),
        ),
    )
    .unwrap();
    config
}
