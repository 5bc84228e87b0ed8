//! Cost of turning one line into the record the agent sends: `write_record_timed`, as
//! the agent's chunk writer calls it, on 1,000 different nginx
//! combined lines (different times too, so the time cache misses) cycled N times. Meant
//! for instruction counts, which repeat on a noisy machine:
//!
//! ```text
//! cargo build --release -p sluice-parsers --example parse_line
//! valgrind --tool=callgrind target/release/examples/parse_line nginx 200000
//! valgrind --tool=callgrind target/release/examples/parse_line nginx 0      # setup only
//! ```
//!
//! The first argument is the parser (`none`, `nginx`, `nginx_read_time`); it prints ns per
//! line and the record bytes per line (what the agent then compresses). A third argument
//! names a file whose first 100,000 lines are cycled instead (e.g. `bench/tail.sh`'s
//! `target/bench-tail/lines-100-512-ordered.log`: its times in order, as the agent bench
//! reads them).
use sluice_parsers::{Parser, ParserKind};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "nginx".into());
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let parser = match mode.as_str() {
        "none" => Parser::new(ParserKind::None, None),
        "nginx" => Parser::new(ParserKind::Nginx, None).and_then(|p| p.with_time(None, None, None)),
        "nginx_read_time" => Parser::new(ParserKind::Nginx, None),
        other => panic!("unknown mode {other:?}: none, nginx or nginx_read_time"),
    }
    .expect("the parser builds");
    let lines: Vec<String> = match args.next() {
        Some(path) => {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            std::io::BufRead::lines(std::io::BufReader::new(file))
                .take(100_000)
                .map(|l| l.expect("the file reads"))
                .collect()
        }
        None => generated(),
    };
    let mut out = Vec::with_capacity(1 << 20);
    let (mut sum, mut bytes, start) = (0u64, 0usize, std::time::Instant::now());
    for k in 0..n {
        if out.len() > (1 << 20) - 4096 {
            bytes += out.len();
            out.clear();
        }
        let line = lines[k % lines.len()].as_bytes();
        if let (_, Some(Ok(t))) = parser.write_record_timed(line, &mut out, 1_795_000_000) {
            sum += u64::from(t.secs);
        }
    }
    bytes += out.len();
    let per = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
    println!(
        "{mode}: {:.1} ns per line, {:.1} record bytes per line (line {:.1}), checksum {sum}",
        per(start.elapsed().as_nanos() as f64),
        per(bytes as f64),
        lines.iter().map(|l| l.len()).sum::<usize>() as f64 / lines.len() as f64,
    );
}

/// 1,000 combined lines with referer and agent, each at a different time.
fn generated() -> Vec<String> {
    let methods = ["GET", "GET", "POST", "PUT", "HEAD"];
    (0..1000u32)
        .map(|i| {
            format!(
                r#"10.{}.{}.{} - - [{:02}/Nov/2026:{:02}:{:02}:{:02} +0000] "{} /api/v1/items/{}?q={:x}&page={} HTTP/1.1" {} {} "https://www.example.com/" "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0""#,
                i % 7,
                i % 256,
                i % 200,
                1 + i % 28,
                i % 24,
                i % 60,
                (i * 7) % 60,
                methods[i as usize % methods.len()],
                i * 37,
                i * 2_654_435_761u32,
                i % 9,
                [200, 200, 304, 404, 500][i as usize % 5],
                i * 13
            )
        })
        .collect()
}
