//! A SIGTERM that arrives while a binary is still starting (replaying its spool,
//! scanning its files) stops it cleanly once startup is done: exit status 0 and its
//! state saved, instead of death by signal where it stood.
//!
//! The signal is sent the moment the process has a SIGTERM handler (its `SigCgt` mask in
//! /proc), which the binaries now install before anything else. The same runs check that
//! a log written to a file carries no colour escape codes.

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
fn stop_as_soon_as_possible(proc_: &mut Proc, started: &str, last_words: &str) {
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
    let mut relay = RelaySpec::with_file_sink(dir.path(), certs.server_tls()).spawn();
    stop_as_soon_as_possible(
        relay.process_mut(),
        "forward server listening",
        "stopped cleanly",
    );
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
    let mut spec = AgentSpec::new(
        dir.path(),
        "agent-signals",
        &[loopback()],
        certs.client_tls(),
        &format!("{}/*.log", logs.display()),
    );
    spec.config.agent.shutdown_timeout = Span::secs(2);
    let mut agent = spec.spawn();
    stop_as_soon_as_possible(
        agent.process_mut(),
        "agent started",
        "stopped; checkpoints saved",
    );
}
