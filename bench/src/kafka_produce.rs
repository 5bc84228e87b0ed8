//! `sluice-kafka-produce`: the ceiling for the Kafka sink's benchmark. librdkafka's own
//! producer, configured as the relay's Kafka sink configures it (idempotent, acks=all,
//! lz4, linger 5 ms, 1 MB batches), produces the messages the relay would write for
//! `sluice-loadgen`'s events: the JSON envelope of a 100-byte access-log line, keyed by
//! its source id, with the five provenance headers and the event time as CreateTime.
//! Messages are built before the clock starts; the run ends when every message is
//! acknowledged. Prints one JSON line: messages, seconds, messages/s, value MB/s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

#[path = "lines.rs"]
mod lines;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Distinct source ids (message keys), like the loadgen's connections.
    #[arg(long, default_value_t = 2)]
    sources: u64,
    #[arg(long, default_value_t = 100)]
    line_bytes: usize,
    #[arg(long, default_value = "lz4")]
    compression: String,
}

struct Counting {
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// User + system CPU seconds of this process (`/proc/self/stat`, clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rnd = rand::rng();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let time = "2026-12-01T12:00:00.123456789Z";
    let sources: Vec<String> = (0..args.sources)
        .map(|s| format!("loadgen:{}:{s}", std::process::id()))
        .collect();
    let mut messages = Vec::with_capacity(args.events as usize);
    let mut value_bytes = 0u64;
    for i in 0..args.events {
        let line = lines::line(i, args.line_bytes, &mut rnd);
        let source = (i % args.sources) as usize;
        let value = format!(
            "{{\"time\":\"{time}\",\"tag\":\"bench.access\",\"source\":\"{}\",\"seq\":{},\"record\":{{\"message\":\"{}\"}}}}",
            sources[source],
            i / args.sources * 101,
            String::from_utf8_lossy(&line).replace('"', "\\\""),
        );
        value_bytes += value.len() as u64;
        messages.push((source, i / args.sources * 101, value));
    }
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let producer: ThreadedProducer<Counting> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &args.compression)
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "30000")
        .create_with_context(Counting {
            acked: acked.clone(),
            failed: failed.clone(),
        })?;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    for (source, seq, value) in &messages {
        let seq = seq.to_string();
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: "tag",
                value: Some("bench.access"),
            })
            .insert(Header {
                key: "source",
                value: Some(sources[*source].as_str()),
            })
            .insert(Header {
                key: "seq",
                value: Some(seq.as_str()),
            })
            .insert(Header {
                key: "relay",
                value: Some("bench"),
            })
            .insert(Header {
                key: "agent",
                value: Some("loadgen"),
            });
        let mut record = BaseRecord::to(&args.topic)
            .payload(value.as_str())
            .key(sources[*source].as_str())
            .timestamp(now_ms)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back)) => {
                    if e.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::QueueFull) {
                        bail!("produce: {e}");
                    }
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let seconds = started.elapsed().as_secs_f64();
    let (ok, bad) = (
        acked.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    if ok != args.events {
        bail!(
            "{ok} of {} messages acknowledged, {bad} failed",
            args.events
        );
    }
    // This process's CPU time while it produced (librdkafka's threads included).
    let cpu_seconds = cpu_seconds() - cpu_before;
    println!(
        "{}",
        serde_json::json!({
            "cpu_seconds": cpu_seconds,
            "messages": ok,
            "seconds": seconds,
            "messages_per_second": ok as f64 / seconds,
            "value_mb_per_second": value_bytes as f64 / seconds / 1e6,
            "value_bytes": value_bytes,
        })
    );
    Ok(())
}
