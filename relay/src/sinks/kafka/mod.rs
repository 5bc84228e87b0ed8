//! `type = "kafka"`: one message per event (the JSON envelope or the raw line), to the
//! topic of a template, keyed by source id, with provenance headers; idempotent
//! producer, `acks=all`. `writer.rs`: deliveries, order and why retries and crashes do
//! not duplicate; `recovery.rs`: marks and read-backs; `template.rs`: topic and key
//! templates; `deadletter.rs`: events Kafka cannot take; `replay.rs`: producing what
//! `replay --into kafka` reads back from object storage.

mod config;
mod deadletter;
pub mod readback;
mod recovery;
pub mod replay;
mod template;
mod writer;

use futures::future::BoxFuture;

pub use config::{KafkaSink, KafkaValue};
pub use writer::KafkaWriter;

use crate::readback::Found;
use crate::sinks::spec::{Deliver, ReadBackContext, SinkContext, SinkSpec};

impl SinkSpec for KafkaSink {
    fn validate(&self, name: &str) -> Result<(), String> {
        self.check(name)?;
        deadletter::DeadLetters::check(&self.dead_letter_url, &self.dead_letter_options)
            .map_err(|e| format!("sink {name:?}: {e}"))
    }

    fn describe(&self) -> String {
        format!("kafka topic {} at {}", self.topic, self.brokers)
    }

    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Deliver>, String> {
        Ok(Box::new(KafkaWriter::new(
            ctx.name,
            ctx.relay,
            ctx.data_dir,
            ctx.metrics.clone(),
            self,
        )?))
    }

    fn read_back<'a>(
        &'a self,
        ctx: &'a ReadBackContext<'a>,
    ) -> BoxFuture<'a, Result<Option<Found>, String>> {
        let (brokers, properties, topic, timeout) = (
            self.brokers.clone(),
            self.properties.clone(),
            self.topic.clone(),
            ctx.kafka_timeout,
        );
        Box::pin(async move {
            if !template::Template::parse(&topic).is_ok_and(|t| t.constant().is_some()) {
                return Err(format!(
                    "topic {topic:?} is a template: reconcile reads one topic per sink for now"
                ));
            }
            tokio::task::spawn_blocking(move || {
                readback::read_kafka(&brokers, &properties, &topic, timeout)
            })
            .await
            .map_err(|e| e.to_string())?
            .map(Some)
        })
    }
}

impl KafkaSink {
    /// Reads the window of `found` from this sink's topic, for `reconcile --from --to`
    /// ([`readback::read_kafka_from`]): from the first message at or after the window's
    /// start in each partition, to the partition's end.
    pub fn read_window(
        &self,
        timeout: std::time::Duration,
        found: &mut Found,
        progress: &mut dyn FnMut(u64),
    ) -> Result<readback::KafkaRead, String> {
        if !template::Template::parse(&self.topic).is_ok_and(|t| t.constant().is_some()) {
            return Err(format!(
                "topic {:?} is a template: reconcile reads one topic per sink for now",
                self.topic
            ));
        }
        let from_ms = found.window.map(|(from, _)| (from * 3600 * 1000) as i64);
        readback::read_kafka_from(
            &self.brokers,
            &self.properties,
            &self.topic,
            timeout,
            from_ms,
            found,
            progress,
        )
    }
}
