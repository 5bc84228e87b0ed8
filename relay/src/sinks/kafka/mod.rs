//! `type = "kafka"`: one message per event (the JSON envelope), keyed by source id, with
//! headers `tag`, `source` and `seq`; idempotent producer, `acks=all` (see `writer.rs`
//! for what guards against duplicates across retries and crashes).

mod config;
mod readback;
mod writer;

use futures::future::BoxFuture;

pub use config::KafkaSink;
pub use writer::KafkaWriter;

use crate::readback::Found;
use crate::sinks::spec::{Deliver, ReadBackContext, SinkContext, SinkSpec};

impl SinkSpec for KafkaSink {
    fn validate(&self, name: &str) -> Result<(), String> {
        if self.topic.is_empty() || self.brokers.is_empty() {
            return Err(format!("sink {name:?}: brokers and topic must be set"));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("kafka topic {} at {}", self.topic, self.brokers)
    }

    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Deliver>, String> {
        Ok(Box::new(KafkaWriter::new(ctx.name, self)?))
    }

    fn read_back<'a>(
        &'a self,
        ctx: &'a ReadBackContext<'a>,
    ) -> BoxFuture<'a, Result<Option<Found>, String>> {
        let (brokers, topic, timeout) =
            (self.brokers.clone(), self.topic.clone(), ctx.kafka_timeout);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || readback::read_kafka(&brokers, &topic, timeout))
                .await
                .map_err(|e| e.to_string())?
                .map(Some)
        })
    }
}
