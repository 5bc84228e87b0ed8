//! The relay always starts on a damaged spool: a torn tail is cut off, a corrupt segment
//! is set aside, each is counted and logged with the file it concerns, and the relay goes
//! on serving. No Kafka or S3 needed: a file sink is the destination.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_e2e::*;

struct Relay {
    dir: PathBuf,
    certs: Certs,
    forward: SocketAddr,
    metrics: SocketAddr,
    config: PathBuf,
}

impl Relay {
    fn new(dir: &Path, sinks: &str) -> Relay {
        let certs = Certs::generate(dir, "relay");
        let forward: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.join("relay.toml");
        let text = format!(
            "[relay]\nid = \"relay-recovery\"\ndata_dir = \"{}\"\n\n[server]\nlisten = \"{forward}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[spool]\nsegment_size = \"64 KiB\"\n\n[metrics]\nlisten = \"{metrics}\"\n\n{sinks}",
            dir.join("relay-data").display(),
            certs.cert.display(),
            certs.key.display(),
        );
        std::fs::write(&config, text).unwrap();
        Relay {
            dir: dir.to_owned(),
            certs,
            forward,
            metrics,
            config,
        }
    }

    fn start(&self, life: usize) -> Proc {
        let mut p = Proc::start(
            "sluice-relay",
            &self.config,
            &self.dir.join(format!("relay-{life}.log")),
        );
        wait_listening(self.forward, &mut p);
        p
    }

    fn spool_dir(&self) -> PathBuf {
        self.dir.join("relay-data/spool")
    }

    fn segments(&self) -> Vec<PathBuf> {
        let mut segs: Vec<_> = std::fs::read_dir(self.spool_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segs.sort();
        segs
    }

    fn agent(&self, log: &Path) -> Proc {
        let text = format!(
            "[agent]\nid = \"agent-recovery\"\ndata_dir = \"{}\"\n\n[[input]]\ntype = \"tail\"\nname = \"app\"\ntag = \"app.log\"\ninclude = [\"{}\"]\n\n[output]\nrelays = [\"{}\"]\ntls = {{ ca = \"{}\", server_name = \"localhost\" }}\nchunk_size = \"16 KiB\"\nchunk_age = \"100ms\"\nretry_max = \"300ms\"\n\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
            self.dir.join("agent-data").display(),
            log.display(),
            self.forward,
            self.certs.ca.display(),
            // Never the default port: tests run in parallel.
            free_port(),
        );
        let path = self.dir.join("agent.toml");
        std::fs::write(&path, text).unwrap();
        Proc::start("sluice-agent", &path, &self.dir.join("agent.log"))
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        metric(self.metrics, name, labels).unwrap_or(0.0)
    }
}

fn distinct_lines(path: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut all = 0;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("file sink writes JSON lines");
        all += 1;
        seen.insert(v["record"]["message"].as_str().unwrap().to_string());
    }
    (seen.len(), all)
}

#[test]
fn a_torn_spool_tail_is_cut_off_and_the_relay_serves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.ndjson");
    let relay = Relay::new(
        tmp.path(),
        &format!(
            "[[sink]]\nname = \"file\"\ntype = \"file\"\npath = \"{}\"\n",
            out.display()
        ),
    );
    let log = tmp.path().join("app.log");
    write_numbered_lines(&log, 1, 2_000);
    let mut r = relay.start(0);
    let mut agent = relay.agent(&log);
    wait_for(
        "2000 lines in the file sink",
        Duration::from_secs(60),
        || relay.metric("sluice_relay_sink_events_total", "sink=\"file\"") >= 2_000.0,
    );
    agent.stop(Duration::from_secs(20));
    r.kill();

    // A write that never finished: half a batch header and garbage at the end.
    let active = relay.segments().pop().expect("a segment");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&active)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0x53, 0x4c, 0x00, 0x17, 0xff, 0x00, 0x42]).unwrap();
    drop(f);

    let mut r = relay.start(1);
    assert!(
        relay.metric("sluice_relay_spool_torn_bytes_total", "") >= 7.0,
        "torn bytes not counted"
    );
    let text = r.log_text();
    assert!(
        text.contains("spool recovered after an unclean stop"),
        "{text}"
    );
    // It serves on: more lines arrive, none twice.
    write_numbered_lines(&log, 2_001, 1_000);
    let mut agent = relay.agent(&log);
    wait_for(
        "3000 lines in the file sink",
        Duration::from_secs(60),
        || distinct_lines(&out).0 >= 3_000,
    );
    agent.stop(Duration::from_secs(20));
    r.stop(Duration::from_secs(20));
    assert_eq!(distinct_lines(&out), (3_000, 3_000));
}

#[test]
fn a_corrupt_segment_is_set_aside_counted_and_the_relay_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.ndjson");
    // The file sink is disabled, so every segment stays in the spool.
    let relay = Relay::new(
        tmp.path(),
        &format!(
            "[[sink]]\nname = \"file\"\ntype = \"file\"\nenabled = false\npath = \"{}\"\n",
            out.display()
        ),
    );
    let log = tmp.path().join("app.log");
    write_numbered_lines(&log, 1, 60_000);
    let mut r = relay.start(0);
    let mut agent = relay.agent(&log);
    wait_for("60000 events spooled", Duration::from_secs(60), || {
        assert!(r.is_running(), "relay exited:\n{}", r.log_text());
        relay.metric("sluice_relay_events_received_total", "") >= 60_000.0
    });
    agent.stop(Duration::from_secs(20));
    r.stop(Duration::from_secs(20));
    let segments = relay.segments();
    assert!(
        segments.len() >= 3,
        "want several segments, got {segments:?}"
    );

    // Flip one byte in the middle of the second segment (a bad sector, a bit flip).
    let victim = &segments[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(victim, bytes).unwrap();

    let mut r = relay.start(1);
    assert_eq!(
        relay.metric("sluice_relay_spool_corrupt_segments_total", ""),
        1.0
    );
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    let text = r.log_text();
    assert!(
        text.contains(&name),
        "the log does not name {name}:\n{text}"
    );
    assert!(
        std::fs::read_dir(relay.spool_dir()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".corrupt")),
        "the damaged segment was not kept aside for inspection"
    );
    // And it serves: a new client's lines are accepted and acknowledged.
    write_numbered_lines(&log, 60_001, 500);
    let mut agent = relay.agent(&log);
    wait_for(
        "the new lines to be spooled",
        Duration::from_secs(60),
        || relay.metric("sluice_relay_events_received_total", "") >= 500.0,
    );
    agent.stop(Duration::from_secs(20));
    r.stop(Duration::from_secs(20));
}
