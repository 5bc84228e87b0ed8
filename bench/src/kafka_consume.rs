//! `sluice-kafka-consume`: reads a topic from its beginning to the end of every partition
//! with librdkafka's consumer and does nothing with the messages: the ceiling that
//! `sluice-relay reconcile`'s Kafka read is measured against (bench/reconcile.sh).
//! Prints `{"messages": n, "bytes": n, "seconds": s}`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", format!("sluice-bench-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // librdkafka's defaults, as reconcile's consumer (relay/src/sinks/kafka/readback.rs).
        .create()
        .context("consumer")?;
    let started = Instant::now();
    let metadata = consumer.fetch_metadata(Some(&args.topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(&args.topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut remaining: BTreeSet<i32> = partitions.into_iter().collect();
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut last = Instant::now();
    while !remaining.is_empty() {
        if last.elapsed() > Duration::from_secs(30) {
            bail!("nothing for 30 s; partitions {remaining:?} not at their end");
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Err(e)) => bail!("consume: {e}"),
            Some(Ok(m)) => {
                messages += 1;
                bytes += m.payload_len() as u64;
                last = Instant::now();
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"messages": messages, "bytes": bytes, "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}
