//! What reconcile's own reading costs, apart from any broker or store: events per second
//! through `Found::add_line` (each Kafka message: parse the envelope head, place the seq)
//! and `Found::add_ndjson` (object lines, `--deep`, after inflating), on realistic
//! access-log events (12 sources, contiguous seqs, 4 hours). `bench/reconcile.sh`
//! measures the same work end to end against tansu and moto, where the broker is the
//! ceiling.
//!
//!     cargo bench -p sluice-relay --bench readback        # EVENTS=2000000 by default

use std::time::Instant;

use sluice_forward::{write_entry, EventTime, ENTRY_HEADER_LEN};
use sluice_relay::envelope::{write, write_flat, Mark};
use sluice_relay::readback::Found;

const SOURCES: u64 = 12;
const PATHS: [&str; 6] = [
    "/api/v1/items",
    "/api/v1/users/login",
    "/static/app.js",
    "/healthz",
    "/api/v2/orders/search",
    "/img/logo.png",
];

/// One event's record (msgpack) and time: an access-log line with varied fields.
fn event(source: u64, seq: u64, start: u32, per_source: u64) -> (EventTime, Vec<u8>) {
    let x = seq.wrapping_mul(2_654_435_761) ^ source.wrapping_mul(40_503);
    let message = format!(
        "10.{}.{}.{} - - \"GET {}?id={} HTTP/1.1\" {} {} \"-\" \"curl/8.{}\"",
        x % 256,
        (x >> 8) % 256,
        (x >> 16) % 256,
        PATHS[(x % 6) as usize],
        x % 100_003,
        [200, 200, 200, 304, 404, 500][((x >> 5) % 6) as usize],
        (x >> 3) % 50_000,
        x % 9
    );
    let time = EventTime {
        secs: start + (seq * 4 * 3600 / per_source) as u32,
        nanos: (x % 1_000_000_000) as u32,
    };
    let mut entry = Vec::new();
    write_entry(&mut entry, time, &[("message", message.as_bytes())]);
    (time, entry[ENTRY_HEADER_LEN..].to_vec())
}

fn main() {
    let events: u64 = std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let per_source = events / SOURCES;
    let start = 1_795_424_400;
    let (mut envelopes, mut object) = (Vec::new(), Vec::new());
    let mut bytes = 0usize;
    for seq in 0..per_source {
        for s in 0..SOURCES {
            let (time, record) = event(s, seq, start, per_source);
            let source = format!("web-{s}:app:2049:{}:9f3a2c:0", 100 + s);
            let tag = ["app.web", "app.db", "audit"][(s % 3) as usize];
            let mark = Mark {
                seq: Some(seq),
                offset: Some(seq * 120),
            };
            let mut e = Vec::with_capacity(256);
            write(&mut e, time, tag, Some(&source), mark, &record).unwrap();
            bytes += e.len();
            envelopes.push(e);
            write_flat(&mut object, time, tag, Some(&source), mark, &record).unwrap();
            object.push(b'\n');
        }
    }
    let n = envelopes.len() as u64;
    let mut best = [f64::MAX; 2];
    for _ in 0..3 {
        let mut found = Found::default();
        let t = Instant::now();
        for e in &envelopes {
            found.add_line(e);
        }
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        assert_eq!(found.events, n);
        let mut found = Found::default();
        let t = Instant::now();
        found.add_ndjson(&object);
        best[1] = best[1].min(t.elapsed().as_secs_f64());
        assert_eq!(found.events, n);
    }
    println!(
        "{}",
        serde_json::json!({
            "events": n,
            "envelope_bytes_mean": bytes as u64 / n,
            "kafka_envelopes_per_second": (n as f64 / best[0]).round(),
            "object_lines_per_second": (n as f64 / best[1]).round(),
        })
    );
}
