//! Writes gzip NDJSON objects of JSON envelopes, partitioned by tag and *event-time* hour:
//!
//! ```text
//! <prefix>/tag=<tag>/dt=<YYYY-MM-DD>/hour=<HH>/<relay>-<segment>-<offset>.ndjson.gz
//! ```
//!
//! The key is derived from the spool position where the gathering started, so a
//! delivery repeated after a crash writes the same keys again: it overwrites (with the
//! same events, or more of them), never duplicates. Late events simply land in their own
//! hour's folder.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sluice_forward::GzipWriter;

use crate::envelope::{civil_from_days, hour_of};
use crate::sinks::spec::{Deliver, DeliverError, DeliverFuture, Delivered, Gathered};

pub struct ObjectWriter {
    pub relay: String,
    pub store: Arc<dyn ObjectStore>,
    /// The full key prefix, without a trailing '/'.
    pub prefix: String,
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// `tag=<tag>/dt=YYYY-MM-DD/hour=HH`, with characters that would break a key replaced.
pub fn partition(tag: &str, hour: u64) -> String {
    let secs = hour as i64 * 3600;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let safe: String = tag
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!(
        "tag={safe}/dt={y:04}-{m:02}-{d:02}/hour={:02}",
        secs.rem_euclid(86_400) / 3600
    )
}

/// Refused credentials or permissions, or a store that cannot do what is asked, will
/// fail again on retry; everything else (timeouts, 5xx, a store that is down) may not.
fn classify(key: &str, e: object_store::Error) -> DeliverError {
    let message = format!("put {key}: {e}");
    match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }
        | object_store::Error::NotSupported { .. }
        | object_store::Error::NotImplemented { .. } => DeliverError::Permanent(message),
        _ => DeliverError::Transient(message),
    }
}

impl Deliver for ObjectWriter {
    fn deliver<'a>(&'a mut self, batch: &'a Gathered) -> DeliverFuture<'a> {
        Box::pin(async move {
            let mut done = Delivered::default();
            let mut groups: BTreeMap<(&str, u64), GzipWriter> = BTreeMap::new();
            let mut line = Vec::with_capacity(4096);
            for chunk in batch.chunks() {
                let chunk = chunk?;
                for event in chunk.events() {
                    let (entry, seq) = event?;
                    line.clear();
                    chunk.write_envelope_line(&mut line, &entry, seq)?;
                    let gz = groups
                        .entry((chunk.tag, hour_of(entry.time)))
                        .or_insert_with(|| GzipWriter::with_capacity(1 << 16));
                    gz.write_all(&line)
                        .map_err(|e| DeliverError::Transient(format!("gzip: {e}")))?;
                    done.delivered(chunk.tag, entry.time);
                }
            }
            let uploads = groups.into_iter().map(|((tag, hour), gz)| {
                let key = format!(
                    "{}{}{}/{}-{:020}-{:012}.ndjson.gz",
                    self.prefix,
                    if self.prefix.is_empty() { "" } else { "/" },
                    partition(tag, hour),
                    self.relay,
                    batch.start.segment,
                    batch.start.offset
                );
                let store = self.store.clone();
                async move {
                    let body = gz
                        .finish()
                        .map_err(|e| DeliverError::Transient(format!("gzip: {e}")))?;
                    let len = body.len() as u64;
                    store
                        .put(&ObjectPath::from(key.as_str()), PutPayload::from(body))
                        .await
                        .map_err(|e| classify(&key, e))?;
                    Ok::<u64, DeliverError>(len)
                }
            });
            for len in futures::future::try_join_all(uploads).await? {
                done.bytes += len;
            }
            Ok(done)
        })
    }

    fn gather_limits(&self) -> (usize, Duration) {
        (self.max_bytes, self.max_age)
    }
}
