//! Cost of taking the event time from a parsed nginx record: `Parser::record_time` on
//! 1,000 records with different times (so the cache of the last time string never hits),
//! cycled N times. Meant for instruction counts, which are repeatable on a noisy machine:
//!
//! ```text
//! cargo build --release -p sluice-parsers --example time_field
//! valgrind --tool=callgrind target/release/examples/time_field 200000
//! ```
use sluice_parsers::{Parser, ParserKind};

fn main() {
    let parser = Parser::new(ParserKind::Nginx, None)
        .and_then(|p| p.with_time(None, None, None))
        .expect("the nginx parser builds");
    let records: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| {
            let line = format!(
                r#"10.0.{}.{} - - [{:02}/Nov/2026:{:02}:{:02}:{:02} +0000] "GET /api/v1/items/{i}?q=x HTTP/1.1" 200 {} "-" "curl/8.5.0""#,
                i % 256,
                i % 200,
                1 + i % 28,
                i % 24,
                i % 60,
                (i * 7) % 60,
                i * 13
            );
            let mut out = Vec::new();
            parser.write_record(line.as_bytes(), &mut out);
            out
        })
        .collect();
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let (mut sum, start) = (0u64, std::time::Instant::now());
    for k in 0..n {
        if let Some(Ok(t)) = parser.record_time(&records[k % records.len()], 1_795_000_000) {
            sum += t.secs as u64;
        }
    }
    println!(
        "{:.1} ns per record (checksum {sum})",
        start.elapsed().as_nanos() as f64 / n as f64
    );
}
