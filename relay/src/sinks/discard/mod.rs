//! `type = "discard"`: counts every event and forgets it; the sink for benchmarks of the
//! relay itself.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::readback::Found;
use crate::sinks::spec::{
    Deliver, DeliverFuture, Delivered, Gathered, ReadBackContext, SinkContext, SinkSpec,
};

/// A discard sink has no keys of its own.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscardSink {}

impl SinkSpec for DiscardSink {
    fn describe(&self) -> String {
        "discard".into()
    }

    fn build(&self, _ctx: &SinkContext<'_>) -> Result<Box<dyn Deliver>, String> {
        Ok(Box::new(Discarder))
    }

    fn read_back<'a>(
        &'a self,
        _ctx: &'a ReadBackContext<'a>,
    ) -> BoxFuture<'a, Result<Option<Found>, String>> {
        Box::pin(async { Ok(None) })
    }
}

pub struct Discarder;

impl Deliver for Discarder {
    fn deliver<'a>(&'a mut self, batch: &'a Gathered) -> DeliverFuture<'a> {
        Box::pin(async move {
            // The driver counted what it offered; all of it is "delivered" nowhere, and
            // nothing needs decoding again, unless a record could not be decoded at all.
            if batch.undecodable > 0 {
                if let Some(bad) = batch.chunks().find_map(Result::err) {
                    return Err(bad.into());
                }
            }
            let mut done = Delivered::default();
            done.counts.delivered = batch.offered.clone();
            done.bytes = batch.entry_bytes;
            Ok(done)
        })
    }

    fn gather_limits(&self) -> (usize, Duration) {
        (8 << 20, Duration::ZERO)
    }
}
