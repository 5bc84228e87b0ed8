//! The relay under failure, against real tansu and moto: kill -9 in a loop, a sink's
//! service gone for a while, and the spool at its size limit. Every test ends by reading
//! Kafka and the bucket with independent clients and counting distinct lines.
//!
//! Sizes are the where CI time allows; the long variants take an environment
//! variable (SLUICE_CHAOS_EVENTS, SLUICE_OUTAGE_SECS) and are run by hand, see docs/relay.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_e2e::*;

struct Setup {
    dir: tempfile::TempDir,
    certs: Certs,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs::generate(dir.path(), "relay");
        Setup { certs, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The relay: Kafka and/or S3 sinks, spool segments of `segment_size`.
    fn relay(
        &self,
        svc: &Services,
        topic: Option<&str>,
        bucket: Option<&str>,
        segment_size: ByteSize,
    ) -> RelaySpec {
        let mut spec = RelaySpec::new(self.dir.path(), "relay-chaos", self.certs.server_tls());
        spec.config.relay.shutdown_timeout = Span::secs(10);
        spec.config.spool.segment_size = segment_size;
        if let Some(topic) = topic {
            let mut kafka = svc.kafka_sink(topic);
            kafka.common.retry_max = Span::secs(2);
            spec.config.sinks.push(kafka);
        }
        if let Some(bucket) = bucket {
            spec.config.sinks.push(svc.s3_sink(bucket));
        }
        spec
    }

    fn start_agent(&self, relay: &Relay, log: &Path) -> Agent {
        let mut spec = AgentSpec::new(
            self.dir.path(),
            "agent-chaos",
            &[relay.forward],
            self.certs.client_tls(),
            &log.display().to_string(),
        );
        let output = &mut spec.config.output;
        output.chunk_size = ByteSize::kib(256);
        output.chunk_age = Span::millis(200);
        output.in_flight = 8;
        output.retry_max = Span::millis(500);
        spec.spawn()
    }
}

/// Asserts that a summary by an independent reader holds every line exactly once or
/// more, and returns the number of duplicates.
fn check_summary(name: &str, summary: &serde_json::Value, lines: u64) -> u64 {
    eprintln!("{name}: {summary}");
    assert_eq!(
        summary["distinct_messages"],
        lines,
        "{name}: distinct lines (missing = {})",
        lines as i64 - summary["distinct_messages"].as_i64().unwrap_or(0)
    );
    assert_eq!(
        summary["bad"].as_u64().unwrap_or(0),
        0,
        "{name}: unreadable envelopes"
    );
    summary["messages"].as_u64().unwrap() - lines
}

#[test]
fn relay_killed_twenty_times_loses_nothing() {
    let lines = env_u64("SLUICE_CHAOS_EVENTS", 200_000);
    const KILLS: usize = 20;
    let svc = Services::from_env();
    let setup = Setup::new();
    let topic = unique_name("chaos-kill");
    let bucket = unique_name("chaos-kill");
    svc.create_topic(&topic, 3);
    svc.create_bucket(&bucket);
    let mut spec = setup.relay(&svc, Some(&topic), Some(&bucket), ByteSize::mib(1));
    spec.config.spool.fsync = FsyncMode::Always;

    let log = setup.path("app.log");
    let mut relay = spec.start();
    let mut agent = setup.start_agent(&relay, &log);
    // The writer runs alongside the kills: the agent reads while the relay dies.
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            let batch = lines / 100;
            for i in 0..100 {
                write_numbered_lines(&log, 1 + i * batch, batch);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let per_life = (lines / (KILLS as u64 + 5)).max(1_000);
    let started = Instant::now();
    for kill in 1..=KILLS {
        // Let each life take some chunks and deliver some, then kill it mid-flight.
        wait_for(
            &format!("relay life {kill} to receive {per_life} events"),
            Duration::from_secs(120),
            || {
                agent.assert_running();
                relay.assert_running();
                relay.received() >= per_life || agent.acked() >= lines
            },
        );
        relay.kill();
        relay.start();
    }
    writer.join().unwrap();
    eprintln!("{KILLS} kills in {:?}", started.elapsed());

    relay.wait(
        "the agent to have every line acknowledged",
        Duration::from_secs(300),
        || agent.acked() >= lines,
    );
    wait_for("both sinks to catch up", Duration::from_secs(300), || {
        relay.caught_up(&["kafka", "s3"])
    });
    let resent = agent.counter("sluice_agent_chunks_resent_total", "");
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(60));

    let dup_kafka = check_summary("kafka", &svc.kafka_summary(&topic, lines), lines);
    let dup_s3 = check_summary("s3", &svc.s3_summary(&bucket), lines);
    eprintln!(
        "kill -9 x{KILLS}, {lines} lines: chunks resent by the agent {resent}, duplicates downstream: kafka {dup_kafka}, s3 {dup_s3}"
    );
    // What each life's Kafka sink found already delivered by the life before it.
    for (n, log) in relay.logs().iter().enumerate() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("read back") || l.contains("not sent again"))
        {
            eprintln!(
                "life {n}: {}",
                line.split("sluice_relay").nth(1).unwrap_or(line)
            );
        }
    }
    // Object storage: a delivery cut short by a kill is repeated with the same events,
    // so it finds its object already there with the same bytes (create-only puts); no
    // object is written beside another, and no line twice.
    let logs = relay.all_logs_text();
    let repeated = logs
        .matches("object already written with the same content")
        .count();
    eprintln!("s3: {repeated} uploads found already written with the same bytes");
    assert!(
        !logs.contains("written beside it"),
        "an object key was reused with other content"
    );
    assert_eq!(dup_s3, 0, "object storage holds a line twice");
    for (n, log) in relay.logs().iter().enumerate() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            !text.contains("panicked"),
            "relay life {n} panicked:\n{text}"
        );
    }
    // The relay's dedup (resent chunks) and the Kafka sink's read-back after a crash
    // (its own lost deliveries) together make every line arrive exactly once.
    assert_eq!(
        (dup_kafka, dup_s3),
        (0, 0),
        "duplicates downstream (kafka, s3)"
    );
}

/// One sink's service goes away (SIGSTOP) for `SLUICE_OUTAGE_SECS` while lines keep
/// coming: the other sink keeps receiving, the spool holds the backlog, and after the
/// service returns both have every line.
fn outage(which: &str) {
    let outage = Duration::from_secs(env_u64("SLUICE_OUTAGE_SECS", 15));
    const LINES: u64 = 60_000;
    let shared = Services::from_env();
    let setup = Setup::new();
    let private = match which {
        "kafka" => PrivateService::tansu(&shared, &setup.path("tansu.log")),
        _ => PrivateService::moto(&shared, &setup.path("moto.log")),
    };
    let svc = match which {
        "kafka" => shared.with(Some(&private.addr), None),
        _ => shared.with(None, Some(&private.addr)),
    };
    let topic = unique_name("outage");
    let bucket = unique_name("outage");
    svc.create_topic(&topic, 2);
    svc.create_bucket(&bucket);
    let spec = setup.relay(&svc, Some(&topic), Some(&bucket), ByteSize::mib(1));
    let (down, up) = if which == "kafka" {
        ("kafka", "s3")
    } else {
        ("s3", "kafka")
    };

    let log = setup.path("app.log");
    write_numbered_lines(&log, 1, LINES / 3);
    let mut relay = spec.start();
    let mut agent = setup.start_agent(&relay, &log);
    wait_for(
        "the first third in both sinks",
        Duration::from_secs(120),
        || relay.delivered(down) >= LINES / 3 && relay.delivered(up) >= LINES / 3,
    );

    private.pause();
    let paused_at = Instant::now();
    write_numbered_lines(&log, LINES / 3 + 1, LINES - LINES / 3);
    wait_for(
        &format!("{up} to take every line while {down} is down"),
        outage,
        || relay.delivered(up) >= LINES,
    );
    wait_for(
        "the agent to have every line acknowledged by the spool",
        outage,
        || agent.acked() >= LINES,
    );
    let lag = relay.lag(down).unwrap_or(0.0);
    assert!(lag > 0.0, "{down} is down, yet its lag is 0");
    let delivered_down = relay.delivered(down);
    assert!(
        delivered_down < LINES,
        "{down} delivered everything while paused?"
    );
    eprintln!("{down} down: {up} has all {LINES} lines after {:?}; {down} lag {lag} bytes, {delivered_down} delivered", paused_at.elapsed());
    // Hold the outage for its whole length.
    while paused_at.elapsed() < outage {
        assert!(relay.is_running() && agent.is_running());
        std::thread::sleep(Duration::from_millis(200));
    }
    private.resume();
    let resumed_at = Instant::now();
    wait_for(
        &format!("{down} to drain its backlog"),
        Duration::from_secs(300),
        || relay.delivered(down) >= LINES && relay.caught_up(&["kafka", "s3"]),
    );
    eprintln!(
        "{down} drained in {:?} after it came back",
        resumed_at.elapsed()
    );
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(60));
    assert_eq!(
        relay.counter("sluice_relay_sink_dropped_total", ""),
        0.0,
        "nothing may be dropped"
    );
    check_summary("kafka", &svc.kafka_summary(&topic, LINES), LINES);
    check_summary("s3", &svc.s3_summary(&bucket), LINES);
}

#[test]
fn kafka_outage_bucket_keeps_receiving_then_kafka_catches_up() {
    outage("kafka");
}

#[test]
fn s3_outage_kafka_keeps_receiving_then_bucket_catches_up() {
    outage("s3");
}

/// The start of the tests where Kafka is down while data comes in: a private tansu,
/// frozen, a topic on it, a relay whose only sink is that topic, and an agent tailing
/// `lines` lines already written.
struct FrozenKafka {
    private: PrivateService,
    svc: Services,
    topic: String,
    relay: Relay,
    agent: Agent,
    lines: u64,
}

impl FrozenKafka {
    fn start(setup: &Setup, name: &str, spool: SpoolSection, lines: u64) -> FrozenKafka {
        let shared = Services::from_env();
        let private = PrivateService::tansu(&shared, &setup.path("tansu.log"));
        let svc = shared.with(Some(&private.addr), None);
        let topic = unique_name(name);
        svc.create_topic(&topic, 2);
        let mut spec = setup.relay(&svc, Some(&topic), None, spool.segment_size);
        spec.config.spool = spool;
        // Stopping with Kafka frozen waits this long for the sinks, then gives up.
        spec.config.relay.shutdown_timeout = Span::secs(3);
        private.pause();
        let log = setup.path("app.log");
        write_numbered_lines(&log, 1, lines);
        let relay = spec.start();
        let agent = setup.start_agent(&relay, &log);
        FrozenKafka {
            private,
            svc,
            topic,
            relay,
            agent,
            lines,
        }
    }

    /// Thaws Kafka and waits until every line is acknowledged and delivered.
    fn thaw(&mut self) {
        self.private.resume();
        self.relay.wait(
            "everything to arrive once Kafka drains the spool",
            Duration::from_secs(300),
            || self.agent.acked() >= self.lines && self.relay.caught_up(&["kafka"]),
        );
    }

    /// Stops both and checks the topic with the independent reader; returns duplicates.
    fn finish(mut self) -> u64 {
        self.agent.stop(Duration::from_secs(30));
        self.relay.stop(Duration::from_secs(60));
        check_summary(
            "kafka",
            &self.svc.kafka_summary(&self.topic, self.lines),
            self.lines,
        )
    }
}

/// The spool fills up while the only sink is down: the relay stops acknowledging, the
/// agent keeps the rest in its file, the relay's memory stays bounded, and everything
/// arrives once the sink is back.
#[test]
fn full_spool_pauses_the_agent_and_bounds_memory() {
    const LINES: u64 = 200_000;
    const RSS_BOUND_MIB: u64 = 200;
    let setup = Setup::new();
    let mut k = FrozenKafka::start(
        &setup,
        "spool-full",
        SpoolSection {
            segment_size: ByteSize::mib(1),
            max_size: ByteSize::mib(4),
            ..SpoolSection::default()
        },
        LINES,
    );
    k.relay.wait(
        "the spool to reach its limit",
        Duration::from_secs(120),
        || k.relay.counter("sluice_relay_spool_full", "") == 1.0,
    );
    // While full, the writer takes no chunk, so none is acknowledged after it. Decided
    // from the relay's own counters, not from the agent's view (acks of the last group
    // before the spool filled may still be on their way to it): chunks_received was last
    // raised before spool_full was set, so it is read after seeing spool_full = 1 and
    // must not move; every ack sent is for one of those chunks.
    let received = k.relay.counter("sluice_relay_chunks_received_total", "");
    assert!(
        received > 0.0,
        "no chunks_received counter: the check below would be empty"
    );
    let acked = k.agent.acked();
    let mut peak_kib = 0;
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(5) {
        peak_kib = peak_kib.max(rss_kib(k.relay.pid()));
        assert_eq!(
            k.relay.counter("sluice_relay_spool_full", ""),
            1.0,
            "the spool stopped being full with Kafka frozen"
        );
        let now = k.relay.counter("sluice_relay_chunks_received_total", "");
        assert_eq!(
            now, received,
            "chunks taken while the spool was full: {received} -> {now}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A full spool is backpressure, not a dead relay: the relay says it is alive while
    // the agent's probes wait behind chunks it cannot take, so the agent stays.
    assert_eq!(
        k.agent
            .counter("sluice_agent_relay_errors_total", "reason=\"unanswered\""),
        0.0,
        "the agent took a relay with a full spool for dead"
    );
    let acks = k.relay.counter("sluice_relay_acks_sent_total", "");
    assert!(
        acks <= received,
        "{acks} acks sent for {received} chunks taken before the spool was full"
    );
    assert!(
        acked < LINES,
        "the agent got everything acknowledged with a full spool"
    );
    assert_eq!(k.relay.counter("sluice_relay_spool_full", ""), 1.0);
    let spool_bytes = k.relay.counter("sluice_relay_spool_bytes", "");
    assert!(
        spool_bytes <= 4.0 * 1024.0 * 1024.0 + 1_048_576.0,
        "spool over its limit: {spool_bytes}"
    );
    eprintln!("full spool: {spool_bytes} bytes, relay RSS peak {peak_kib} KiB, agent acked {acked} of {LINES}");
    assert!(
        peak_kib < RSS_BOUND_MIB * 1024,
        "relay RSS {peak_kib} KiB over {RSS_BOUND_MIB} MiB"
    );
    assert!(k.agent.is_running());
    // /ready says the relay cannot take data while its spool refuses writes.
    let ready = http_get(k.relay.metrics, "/ready").unwrap_or_default();
    assert!(
        ready.contains(" 503 ") && ready.contains("spool refuses writes"),
        "/ready while the spool is full:\n{ready}"
    );

    // SIGTERM with the spool full and the sink dead: the relay stops within
    // shutdown_timeout plus 6 s (5 s it gives connections, 1 s for blocking stragglers;
    // docs/relay.md), exit 0, state saved; started again, it delivers everything once
    // Kafka is back. The test allows 2 s more for the signal and the exit to be seen on
    // a loaded machine: the stop itself waits on timers, not on CPU.
    let bound = k.relay.config.relay.shutdown_timeout.get() + Duration::from_secs(6 + 2);
    let stopping = Instant::now();
    // Waits past the bound (then kills it), so that a slow stop is measured, not cut off.
    k.relay.stop(bound * 3);
    let took = stopping.elapsed();
    eprintln!("stopped with a full spool in {took:?} (bound {bound:?})");
    assert!(
        took <= bound,
        "SIGTERM with a full spool and a dead sink took {took:?}, over shutdown_timeout + 6 s (+ 2 s slack) = {bound:?}; the relay's shutdown:\n{}",
        shutdown_lines(&k.relay.plain_log())
    );
    k.relay.start();
    k.thaw();
    k.relay.wait(
        "the spool to report it is no longer full",
        Duration::from_secs(10),
        || k.relay.counter("sluice_relay_spool_full", "") == 0.0,
    );
    k.relay
        .wait("/ready to say ready again", Duration::from_secs(10), || {
            http_get(k.relay.metrics, "/ready").is_some_and(|r| r.contains(" 200 "))
        });
    k.finish();
}

/// The relay's log from the moment it got the signal.
fn shutdown_lines(log: &str) -> String {
    let from = log
        .find("shutting down")
        .map_or(0, |at| log[..at].rfind('\n').map_or(0, |nl| nl + 1));
    log[from..].to_string()
}

/// A small tmpfs for the relay's data_dir, unmounted on drop. Needs root (CI runs as
/// root); elsewhere the test says so and does not run.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: PathBuf, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { path })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// The disk under the spool fills up before the spool's own limit: appends fail with
/// ENOSPC, are cut off again, counted and logged with the file; nothing is acknowledged
/// that is not on disk; once the sink drains and segments are collected, the relay takes
/// data again and every line arrives exactly once.
#[test]
fn full_disk_under_the_spool_loses_nothing() {
    const LINES: u64 = 200_000;
    let setup = Setup::new();
    let Some(_disk) = SmallDisk::mount(setup.path("relay-data"), "4m") else {
        eprintln!("SKIPPED full_disk_under_the_spool_loses_nothing: mounting a tmpfs needs root");
        return;
    };
    let mut k = FrozenKafka::start(
        &setup,
        "disk-full",
        SpoolSection {
            segment_size: ByteSize::kib(512),
            max_size: ByteSize::gib(1),
            ..SpoolSection::default()
        },
        LINES,
    );
    k.relay.wait(
        "the disk to fill and appends to fail",
        Duration::from_secs(120),
        || k.relay.counter("sluice_relay_spool_errors_total", "") >= 1.0,
    );
    let text = k.relay.log_text();
    assert!(
        text.contains("No space left on device"),
        "the log does not name the cause:\n{text}"
    );
    assert!(
        text.contains(".seg"),
        "the log does not name the segment file:\n{text}"
    );
    let acked = k.agent.acked();
    assert!(acked < LINES, "everything acknowledged on a full disk?");
    eprintln!("disk full after {acked} acknowledged lines");

    k.thaw();
    let dups = k.finish();
    assert_eq!(dups, 0, "duplicates in Kafka");
}
