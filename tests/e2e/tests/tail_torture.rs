//! Tailing torture: the real `sluice-agent` tails files that are written as fast as a
//! writer can, rotated, and the agent stopped or killed (-9) along the way; it ships over
//! TLS (certificates made here) to the real `sluice-relay`, whose `file` sink writes every
//! event's JSON envelope to a local file. The tests count which numbered lines arrived:
//! nothing may be missing, and duplicates are counted and reported.
//!
//! No Kafka or S3 is needed. The binaries are found like every e2e test finds them
//! ([`bin`]): build them first (`cargo build --workspace --bins`; `scripts/test` does).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_e2e::*;

/// The test's directory; kept for a post-mortem when SLUICE_KEEP_TEST_DIRS=1.
/// The torture tests run one at a time: each drives a writer, an agent and a relay at
/// full speed, and on two cores three of them at once starve the agent's file watcher
/// of the CPU it needs to open a file inside its ~10 ms life (test (a) rotates that fast).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn test_dir() -> tempfile::TempDir {
    let keep = std::env::var_os("SLUICE_KEEP_TEST_DIRS").is_some_and(|v| v == "1");
    let dir = tempfile::Builder::new()
        .prefix("tail-torture-")
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        eprintln!("test directory: {}", dir.path().display());
    }
    dir
}

/// Resent duplicates the relay recognised by provenance and dropped.
fn duplicates_trimmed(relay: &Relay) -> u64 {
    relay.counter("sluice_relay_events_duplicate_total", "") as u64
}

/// The agent of these tests, written but not started: each [`Agent::start`] is a life
/// with its own log file (`agent.log`, `agent-1.log`, ...), so a failure shows the run
/// that failed, and returns once the agent is up, so that a stop or a kill always hits a
/// running pipeline.
fn agent(dir: &Path, relay: &Relay, certs: &Certs, glob: &str) -> Agent {
    let mut spec = AgentSpec::new(
        dir,
        "agent-tail",
        &[relay.forward],
        certs.client_tls(),
        glob,
    );
    spec.config.agent.shutdown_timeout = Span::secs(20);
    let output = &mut spec.config.output;
    output.chunk_size = ByteSize::kib(256);
    output.chunk_age = Span::millis(200);
    output.in_flight = 8;
    output.retry_min = Span::millis(50);
    output.retry_max = Span::millis(500);
    spec.write()
}

/// logrotate's `rotate 2` with rename-and-create: app.log.1 → app.log.2 (the old .2 is
/// deleted by the rename), app.log → app.log.1; the writer creates app.log again.
fn rotate_keep_two(log: &Path) {
    let name = |n: u32| PathBuf::from(format!("{}.{n}", log.display()));
    if name(1).exists() {
        std::fs::rename(name(1), name(2)).unwrap();
    }
    if log.exists() {
        std::fs::rename(log, name(1)).unwrap();
    }
}

/// Whether process `pid` holds the file `key` (dev, ino) open.
fn holds_open(pid: i32, key: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        // Follows the link to the open file, deleted or not.
        std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == key)
    })
}

/// Before a rotation deletes the oldest rotated file (the rename of .1 over .2), waits
/// until the agent holds that file open; returns how long that took.
///
/// Why: a file can only be read after its last name is gone if someone opened it
/// before. At full speed here a file lives ~7 ms from creation to deletion, and an
/// open can stall that long in the kernel behind the writer's own renames, so without
/// this wait the test measures the kernel, not the agent (docs/agent.md, "Fast
/// rotation", has the uncoupled figures). With it, every file is still deleted long before the agent has
/// read it, and the agent must open each within 10 s of its creation.
fn wait_until_opened_before_delete(log: &Path, agent: i32) -> Duration {
    use std::os::unix::fs::MetadataExt;
    let oldest = PathBuf::from(format!("{}.2", log.display()));
    let Ok(meta) = std::fs::metadata(&oldest) else {
        return Duration::ZERO;
    };
    let key = (meta.dev(), meta.ino());
    let start = Instant::now();
    while !holds_open(agent, key) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the agent did not open {} (inode {}) within 10 s",
            oldest.display(),
            key.1
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

/// What arrived: every envelope's line number, counted.
struct Arrived {
    total: u64,
    distinct: u64,
    duplicates: u64,
    missing: Vec<u64>,
    foreign: u64,
}

impl std::fmt::Display for Arrived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} envelopes, {} distinct numbers, {} duplicates, {} missing (first: {:?}), {} not ours",
            self.total,
            self.distinct,
            self.duplicates,
            self.missing.len(),
            &self.missing[..self.missing.len().min(10)],
            self.foreign
        )
    }
}

/// Reads the relay's file sink output and counts the numbered lines 1..=expect.
fn count_arrived(out: &Path, expect: u64) -> Arrived {
    let text = std::fs::read(out).unwrap_or_default();
    let mut seen = vec![0u32; expect as usize + 1];
    let (mut total, mut foreign) = (0, 0);
    const KEY: &[u8] = b"\"message\":\"line ";
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        total += 1;
        let number = line
            .windows(KEY.len())
            .position(|w| w == KEY)
            .and_then(|at| line.get(at + KEY.len()..at + KEY.len() + 8))
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| digits.parse::<u64>().ok())
            .filter(|&n| (1..=expect).contains(&n));
        match number {
            Some(n) => seen[n as usize] += 1,
            None => foreign += 1,
        }
    }
    let distinct = seen[1..].iter().filter(|&&c| c > 0).count() as u64;
    let duplicates = seen[1..].iter().map(|&c| c.saturating_sub(1) as u64).sum();
    let missing = (1..=expect).filter(|&n| seen[n as usize] == 0).collect();
    Arrived {
        total,
        distinct,
        duplicates,
        missing,
        foreign,
    }
}

/// Checks the provenance of every event in the file sink: per source, the seqs are
/// exactly 0, 1, 2, ... (no gap, none twice) and the byte offsets grow with them, from 0
/// for a file read from its start. Returns the number of sources.
fn assert_seqs_contiguous(out: &Path) -> usize {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let mut by_source: std::collections::BTreeMap<String, Vec<(u64, u64)>> = Default::default();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let source = v["source"].as_str().expect("a source").to_string();
        let seq = v["seq"].as_u64().expect("a seq");
        let offset = v["offset"]
            .as_u64()
            .expect("an offset (events read from files)");
        by_source.entry(source).or_default().push((seq, offset));
    }
    for (source, mut events) in by_source.clone() {
        events.sort_unstable();
        for (i, pair) in events.iter().enumerate() {
            assert_eq!(
                pair.0, i as u64,
                "source {source}: seq {} where {i} was due (seqs must be 0, 1, 2, ...)",
                pair.0
            );
        }
        assert_eq!(
            events[0].1, 0,
            "source {source}: the first event is at offset 0"
        );
        assert!(
            events.windows(2).all(|w| w[0].1 < w[1].1),
            "source {source}: offsets do not grow with seqs"
        );
    }
    by_source.len()
}

fn wait_delivered(relay: &Relay, agent: &Agent, expect: u64, timeout: Duration) {
    let mut last = (Instant::now(), 0);
    wait_for(
        &format!("the relay's file sink to have {expect} events"),
        timeout,
        || {
            agent.assert_running();
            relay.assert_running();
            let n = relay.delivered("file");
            if n != last.1 {
                last = (Instant::now(), n);
            }
            // Lost lines never arrive: fail early instead of waiting out the timeout.
            if last.0.elapsed() >= Duration::from_secs(20) {
                let m = |name: &str| agent.metric(name, "").unwrap_or(-1.0);
                panic!(
                    "no progress for 20 s at {n} of {expect} delivered; agent: {} lines read, \
                     {} events acked, {} files open, {} deleted bytes held; agent log:\n{}",
                    m("sluice_agent_lines_read_total"),
                    m("sluice_agent_events_acked_total"),
                    m("sluice_agent_files_open"),
                    m("sluice_agent_deleted_bytes_held"),
                    agent.log_text()
                );
            }
            n >= expect
        },
    );
}

/// 1,000,000 numbered lines written flat out, with rename rotation every 10,000 lines
/// keeping 2 rotated files, and a glob that matches the live and the rotated names: every
/// number arrives exactly once. Rotated files are deleted within milliseconds, long
/// before the agent has read them; it must have opened them in time and read them to
/// their end through the open handle.
#[test]
fn million_lines_with_fast_rotation_arrive_exactly_once() {
    let _serial = serial();
    const LINES: u64 = 1_000_000;
    const PER_FILE: u64 = 10_000;
    let t0 = Instant::now();
    let dir = test_dir();
    let certs = Certs::generate(dir.path(), "relay");
    let mut relay = RelaySpec::with_file_sink(dir.path(), certs.server_tls()).start();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let log = logs.join("app.log");
    let mut agent = agent(dir.path(), &relay, &certs, &format!("{}*", log.display()));
    agent.start();

    let write_start = Instant::now();
    let (mut first, mut waited, mut max_wait) = (1, Duration::ZERO, Duration::ZERO);
    while first <= LINES {
        write_numbered_lines(&log, first, PER_FILE);
        first += PER_FILE;
        let wait = wait_until_opened_before_delete(&log, agent.pid());
        (waited, max_wait) = (waited + wait, max_wait.max(wait));
        rotate_keep_two(&log);
    }
    let wrote = write_start.elapsed();
    eprintln!(
        "wrote {LINES} lines in {wrote:?} ({:.0} lines/s), {} rotations; waited {waited:?} \
         in all (at most {max_wait:?}) for the agent to open a file before deleting it",
        LINES as f64 / wrote.as_secs_f64(),
        LINES / PER_FILE
    );

    wait_delivered(&relay, &agent, LINES, Duration::from_secs(150));
    // Up to 100 files were open at once (most of them deleted): memory stays bounded.
    eprintln!(
        "agent peak RSS {} MiB (debug build)",
        peak_rss_kib(agent.pid()) / 1024
    );
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(30));
    let arrived = count_arrived(&relay.sink_file("file"), LINES);
    eprintln!(
        "arrived: {arrived}; relay trimmed {} resent duplicates; took {:?}",
        duplicates_trimmed(&relay),
        t0.elapsed()
    );
    assert!(arrived.missing.is_empty(), "lines lost: {arrived}");
    assert_eq!(arrived.distinct, LINES, "{arrived}");
    assert_eq!(arrived.duplicates, 0, "{arrived}");
    assert_eq!(arrived.total, LINES, "{arrived}");
}

/// Stop the agent, write 5,000 lines, rotate twice, write 5,000 more, start it: all
/// 10,000 arrive (and nothing from before the stop is sent again). The file the agent
/// was reading is found by identity under its twice-rotated name and continued from its
/// checkpoint; the file created while the agent was down is read from its start.
#[test]
fn lines_written_and_rotated_twice_while_stopped_all_arrive() {
    let _serial = serial();
    const BEFORE: u64 = 1_000;
    let t0 = Instant::now();
    let dir = test_dir();
    let certs = Certs::generate(dir.path(), "relay");
    let mut relay = RelaySpec::with_file_sink(dir.path(), certs.server_tls()).start();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let log = logs.join("app.log");
    let mut agent = agent(dir.path(), &relay, &certs, &format!("{}*", log.display()));
    write_numbered_lines(&log, 1, BEFORE);
    agent.start();
    wait_delivered(&relay, &agent, BEFORE, Duration::from_secs(60));
    agent.stop(Duration::from_secs(30));

    write_numbered_lines(&log, BEFORE + 1, 5_000);
    rotate_keep_two(&log);
    // The second rotation moves the just-created, still empty app.log too: a rotated file
    // with no bytes, then the agent's file becomes app.log.2.
    std::fs::File::create(&log).unwrap();
    rotate_keep_two(&log);
    write_numbered_lines(&log, BEFORE + 5_001, 5_000);

    let total = BEFORE + 10_000;
    agent.start();
    wait_delivered(&relay, &agent, total, Duration::from_secs(60));
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(30));
    let arrived = count_arrived(&relay.sink_file("file"), total);
    eprintln!(
        "arrived: {arrived}; relay trimmed {} resent duplicates; took {:?}",
        duplicates_trimmed(&relay),
        t0.elapsed()
    );
    assert!(arrived.missing.is_empty(), "lines lost: {arrived}");
    assert_eq!(arrived.duplicates, 0, "{arrived}");
    assert_eq!(arrived.total, total, "{arrived}");
}

/// kill -9 the agent 20 times while 500,000 lines are written (rename rotation every
/// 100,000 lines, rotated files kept): nothing is missing. Lines read but not yet
/// acknowledged at a kill are read again after the restart and resent with the same seqs
/// (numbering resumes from the checkpoint); the relay drops them by provenance (source id
/// + seq), so none reaches the sink twice, and each file's seqs are 0, 1, 2, ... .
#[test]
fn kill_dash_nine_twenty_times_loses_nothing() {
    let _serial = serial();
    const LINES: u64 = 500_000;
    const KILLS: u64 = 20;
    const PER_ROUND: u64 = LINES / KILLS;
    const PER_FILE: u64 = 100_000;
    let t0 = Instant::now();
    let dir = test_dir();
    let certs = Certs::generate(dir.path(), "relay");
    let mut relay = RelaySpec::with_file_sink(dir.path(), certs.server_tls()).start();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let log = logs.join("app.log");
    let mut agent = agent(dir.path(), &relay, &certs, &format!("{}*", log.display()));

    let mut first = 1;
    let mut rotated = 0;
    for round in 0..KILLS {
        agent.start();
        // Write this round's lines while the agent starts and reads.
        write_numbered_lines(&log, first, PER_ROUND);
        first += PER_ROUND;
        if (first - 1) % PER_FILE == 0 && first <= LINES {
            rotated += 1;
            std::fs::rename(&log, logs.join(format!("app.log.{rotated}"))).unwrap();
        }
        // Kill once the relay has taken something new from this run, i.e. in the middle
        // of reading and sending; every other round only after the agent also saved a
        // checkpoint, so that restarts resume from many different positions.
        let before = relay.delivered("file");
        agent.wait(
            &format!("progress before kill {}", round + 1),
            Duration::from_secs(60),
            || {
                let saved = round % 2 == 0
                    || agent.counter("sluice_agent_checkpoint_saves_total", "") >= 1.0;
                relay.delivered("file") > before && saved
            },
        );
        agent.kill();
    }
    agent.start();
    wait_delivered(&relay, &agent, LINES, Duration::from_secs(120));
    agent.stop(Duration::from_secs(30));
    let trimmed = duplicates_trimmed(&relay);
    relay.stop(Duration::from_secs(30));
    let arrived = count_arrived(&relay.sink_file("file"), LINES);
    eprintln!(
        "after {KILLS} kills: {arrived}; relay trimmed {trimmed} resent duplicates; took {:?}",
        t0.elapsed()
    );
    assert!(arrived.missing.is_empty(), "lines lost: {arrived}");
    assert_eq!(arrived.distinct, LINES, "{arrived}");
    assert_eq!(
        arrived.duplicates, 0,
        "duplicates reached the sink: {arrived}"
    );
    // The seqs resumed from the checkpoints after every kill: contiguous per file.
    let files = assert_seqs_contiguous(&relay.sink_file("file"));
    assert_eq!(files as u64, LINES / PER_FILE, "one source per file");
}
