//! Agents spread over a relay cluster (issue 15), against real relays over TLS, a real
//! Kafka-API broker (tansu) and confluent-kafka as the independent reader:
//!
//! - six agents with three files each over three relays: each relay gets a third of the
//!   events (20-47 % asked); then, while the agents keep writing, one relay is killed
//!   (kill -9) and restarted, another drained (SIGTERM) and restarted: every line is in
//!   Kafka exactly once;
//! - a relay behind a proxy that stops forwarding without closing anything (a hung relay,
//!   a half-open partition): the agent notices within five seconds at default settings,
//!   moves to the standby, and when the proxy heals, what reaches the first relay twice is
//!   at most what the agent moved (`sluice_agent_events_moved_total`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_agent::config::{RelayEntry, RelaySpec as AgentRelay};
use sluice_e2e::*;

/// Appends `count` lines numbered from `first` to `path`: ~110 bytes each, text that
/// compresses like access logs.
fn append(path: &Path, label: &str, first: u64, count: u64) {
    let mut out = String::with_capacity(count as usize * 120);
    for n in first..first + count {
        out.push_str(&format!(
            "{label} {n:08} GET /api/v2/orders/{} HTTP/1.1 200 {} \"curl/8.{}\" upstream=10.0.{}.{}\n",
            n * 7919 % 100_000,
            n * 31 % 9000,
            n % 13,
            n % 7,
            n % 251
        ));
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(out.as_bytes()).unwrap();
}

fn start_relay(dir: &Path, name: &str, server: &Issued, svc: &Services, topic: &str) -> Relay {
    let mut spec = RelaySpec::new(dir, name, server.server_tls()).stem(name);
    spec.config.sinks.push(svc.kafka_sink(topic));
    spec.start()
}

fn agent_spec(dir: &Path, id: &str, relays: Vec<RelayEntry>, ca: &TestCa, glob: &str) -> AgentSpec {
    let mut spec = AgentSpec::new(dir, id, &[], ca.client_tls(), glob);
    spec.stem = id.into();
    spec.config.agent.data_dir = dir.join(format!("{id}-data"));
    let output = &mut spec.config.output;
    output.relays = relays;
    output.chunk_size = ByteSize::kib(64);
    output.chunk_age = Span::millis(200);
    output.retry_max = Span::secs(1);
    spec
}

fn addresses(relays: &[Relay]) -> Vec<RelayEntry> {
    relays
        .iter()
        .map(|r| RelayEntry::Address(r.forward.to_string()))
        .collect()
}

#[test]
fn six_agents_spread_over_three_relays_and_lose_nothing_through_a_kill_and_a_drain() {
    const AGENTS: usize = 6;
    const FILES: usize = 3;
    const FIRST: u64 = 2_000; // lines per file before the kill and the drain
    const ROUNDS: u64 = 120;
    const PER_ROUND: u64 = 100; // lines per file per round
    let svc = Services::from_env();
    let topic = unique_name("balance");
    svc.create_topic(&topic, 3);
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "relays");
    let server = ca.issue("relay", &["localhost", "127.0.0.1"], false);
    let mut relays: Vec<Relay> = ["relay-a", "relay-b", "relay-c"]
        .iter()
        .map(|name| start_relay(dir.path(), name, &server, &svc, &topic))
        .collect();

    let files: Vec<(PathBuf, String)> = (0..AGENTS)
        .flat_map(|a| (0..FILES).map(move |f| (a, f)))
        .map(|(a, f)| {
            let sub = dir.path().join(format!("agent{a}"));
            std::fs::create_dir_all(&sub).unwrap();
            (sub.join(format!("f{f}.log")), format!("a{a}/f{f}"))
        })
        .collect();
    for (path, label) in &files {
        append(path, label, 0, FIRST);
    }
    let mut agents: Vec<Agent> = (0..AGENTS)
        .map(|a| {
            let glob = format!("{}/agent{a}/*.log", dir.path().display());
            agent_spec(
                dir.path(),
                &format!("agent-{a}"),
                addresses(&relays),
                &ca,
                &glob,
            )
            .start()
        })
        .collect();

    let first_total = FIRST * files.len() as u64;
    wait_for(
        "the first lines at the relays",
        Duration::from_secs(180),
        || {
            agents.iter().for_each(|a| a.assert_running());
            relays.iter().map(Relay::received).sum::<u64>() >= first_total
        },
    );
    let received: Vec<u64> = relays.iter().map(Relay::received).collect();
    let shares: Vec<f64> = received
        .iter()
        .map(|r| *r as f64 / first_total as f64)
        .collect();
    eprintln!("events per relay {received:?}, shares {shares:.3?}");
    assert_eq!(received.iter().sum::<u64>(), first_total, "more than sent");
    for share in &shares {
        assert!(
            (0.20..=0.47).contains(share),
            "a relay got {share:.3} of the events: {received:?}"
        );
    }

    // Keep writing while one relay is killed and restarted and another drained.
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = std::thread::spawn({
        let (files, rounds) = (files.clone(), rounds.clone());
        move || {
            for round in 0..ROUNDS {
                for (path, label) in &files {
                    append(path, label, FIRST + round * PER_ROUND, PER_ROUND);
                }
                rounds.store(round + 1, Ordering::SeqCst);
                // Pacing the load (about 36,000 lines/s), not synchronisation.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    let reached = |n: u64| {
        wait_for("the writer", Duration::from_secs(120), || {
            rounds.load(Ordering::SeqCst) >= n
        })
    };
    reached(ROUNDS / 4);
    relays[0].kill();
    relays[0].start();
    eprintln!("killed and restarted {}", relays[0].forward);
    reached(ROUNDS / 2);
    relays[1].stop(Duration::from_secs(60));
    eprintln!("drained {}", relays[1].forward);
    reached(3 * ROUNDS / 4);
    relays[1].start();
    writer.join().unwrap();

    let total = first_total + ROUNDS * PER_ROUND * files.len() as u64;
    let summary = svc.kafka_summary(&topic, total);
    let counter =
        |name: &str, labels: &str| -> f64 { agents.iter().map(|a| a.counter(name, labels)).sum() };
    eprintln!(
        "kafka: {summary}; agents: moved {} chunks ({} events), draining notices {}, refused connections {}",
        counter("sluice_agent_chunks_moved_total", ""),
        counter("sluice_agent_events_moved_total", ""),
        counter("sluice_agent_relay_errors_total", "reason=\"draining\""),
        counter("sluice_agent_relay_errors_total", "reason=\"connect\""),
    );
    assert_eq!(summary["timed_out"], false, "{summary}");
    assert_eq!(
        summary["distinct_messages"], total,
        "lines missing: {summary}"
    );
    assert_eq!(summary["duplicates"], 0, "duplicates: {summary}");
    assert!(
        counter("sluice_agent_relay_errors_total", "reason=\"draining\"") >= 1.0,
        "no agent heard the drain"
    );
    for a in &mut agents {
        a.stop(Duration::from_secs(30));
    }
}

/// A TCP proxy that can stop forwarding without closing anything: both directions stop
/// reading, so bytes pile up in the kernel's buffers and TCP still acknowledges them.
struct Proxy {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || pump(from, to, &f));
                }
            }
        });
        Proxy { addr, frozen }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn a_relay_behind_a_frozen_proxy_is_left_within_five_seconds() {
    const LINES: u64 = 100_000;
    const PER_TICK: u64 = 100; // every 10 ms: 10,000 lines/s
    let svc = Services::from_env();
    let topic = unique_name("frozen");
    svc.create_topic(&topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "relays");
    let server = ca.issue("relay", &["localhost", "127.0.0.1"], false);
    let relays: Vec<Relay> = ["relay-a", "relay-b"]
        .iter()
        .map(|name| start_relay(dir.path(), name, &server, &svc, &topic))
        .collect();
    let proxy = Proxy::start(relays[0].forward);
    let log = dir.path().join("app.log");
    append(&log, "app", 0, PER_TICK);
    // Default output settings but for the relays: the proxied relay first, the other a
    // standby, so every line goes through the proxy until it freezes.
    let mut spec = AgentSpec::new(
        dir.path(),
        "agent-frozen",
        &[],
        ca.client_tls(),
        &log.display().to_string(),
    );
    spec.config.output.relays = vec![
        RelayEntry::Address(proxy.addr.to_string()),
        RelayEntry::Relay(AgentRelay {
            address: relays[1].forward.to_string(),
            weight: 1,
            standby: true,
        }),
    ];
    let agent = spec.start();
    let written = Arc::new(AtomicU64::new(PER_TICK));
    let writer = std::thread::spawn({
        let (log, written) = (log.clone(), written.clone());
        move || {
            let mut n = PER_TICK;
            while n < LINES {
                append(&log, "app", n, PER_TICK);
                n += PER_TICK;
                written.store(n, Ordering::SeqCst);
                // Pacing the load, not synchronisation.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    wait_for(
        "a quarter of the lines at the proxied relay",
        Duration::from_secs(60),
        || relays[0].received() >= LINES / 4,
    );
    assert_eq!(
        relays[1].received(),
        0,
        "the standby took lines while the first relay was up"
    );
    proxy.frozen.store(true, Ordering::SeqCst);
    let frozen_at = Instant::now();
    wait_for("the agent to notice", Duration::from_secs(30), || {
        agent.counter("sluice_agent_relay_errors_total", "reason=\"unanswered\"") >= 1.0
    });
    let noticed = frozen_at.elapsed();
    wait_for(
        "the standby to receive lines",
        Duration::from_secs(30),
        || relays[1].received() > 0,
    );
    let moved = frozen_at.elapsed();
    eprintln!("noticed the frozen proxy after {noticed:?}, the standby had lines after {moved:?}");
    // Heal once the writer is done: the first relay then gets what the proxy held.
    writer.join().unwrap();
    proxy.frozen.store(false, Ordering::SeqCst);
    let summary = svc.kafka_summary(&topic, LINES);
    let events_moved = agent.counter("sluice_agent_events_moved_total", "");
    eprintln!(
        "kafka: {summary}; agent moved {events_moved} events ({} chunks)",
        agent.counter("sluice_agent_chunks_moved_total", "")
    );
    assert_eq!(
        summary["distinct_messages"], LINES,
        "lines missing: {summary}"
    );
    let duplicates = summary["duplicates"].as_u64().unwrap();
    assert!(
        duplicates as f64 <= events_moved,
        "{duplicates} duplicates, more than the {events_moved} events the agent moved"
    );
    // Default probe_interval 1 s + probe_timeout 3 s; the issue asks for 5 s. A little
    // room for a loaded machine's timers and this test's polling.
    assert!(
        noticed < Duration::from_secs(6),
        "noticed after {noticed:?}"
    );
}
