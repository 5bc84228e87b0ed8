//! Object storage sink (S3, GCS, Azure, local directory via `object_store`): gzip NDJSON
//! objects of JSON envelopes, partitioned by tag and *event-time* hour:
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

use super::{Deliver, Delivered, Gathered};
use crate::config::ObjectSink as ObjectConfig;
use crate::envelope::{self, civil_from_days, hour_of};

pub struct ObjectSink {
    relay: String,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    max_bytes: usize,
    max_age: Duration,
}

/// Opens the store named by `url`. `s3://` also reads the usual `AWS_*` environment
/// variables; keys in `options` win.
pub fn open_store(
    url: &str,
    options: &BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, String), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    match parsed.scheme() {
        "file" => {
            let dir = parsed
                .to_file_path()
                .map_err(|_| format!("url {url:?} is not a usable local path"))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| format!("local store {}: {e}", dir.display()))?;
            Ok((Arc::new(store), String::new()))
        }
        "s3" | "s3a" => {
            let mut builder = object_store::aws::AmazonS3Builder::from_env().with_url(url);
            for (k, v) in options {
                let key: object_store::aws::AmazonS3ConfigKey = k
                    .parse()
                    .map_err(|e| format!("option {k:?} is not an S3 option: {e}"))?;
                builder = builder.with_config(key, v);
            }
            let store = builder
                .build()
                .map_err(|e| format!("S3 store {url}: {e}"))?;
            Ok((Arc::new(store), parsed.path().trim_matches('/').to_string()))
        }
        _ => {
            let (store, path) = object_store::parse_url_opts(&parsed, options)
                .map_err(|e| format!("object store {url}: {e}"))?;
            Ok((Arc::from(store), path.to_string()))
        }
    }
}

impl ObjectSink {
    pub fn new(relay: &str, cfg: &ObjectConfig) -> Result<ObjectSink, String> {
        let (store, url_prefix) = open_store(&cfg.url, &cfg.options)?;
        let prefix = [url_prefix.as_str(), cfg.prefix.trim_matches('/')]
            .iter()
            .filter(|p| !p.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("/");
        Ok(ObjectSink {
            relay: relay.to_string(),
            store,
            prefix,
            max_bytes: cfg.max_object_size.as_usize(),
            max_age: cfg.max_object_age.get(),
        })
    }
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

impl Deliver for ObjectSink {
    fn deliver<'a>(
        &'a mut self,
        batch: &'a Gathered,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Delivered, String>> + Send + 'a>>
    {
        Box::pin(async move {
            let mut done = Delivered::default();
            let mut groups: BTreeMap<(&str, u64), GzipWriter> = BTreeMap::new();
            let mut line = Vec::with_capacity(4096);
            for chunk in batch.chunks() {
                let chunk = chunk.map_err(|e| e.to_string())?;
                for event in chunk.events() {
                    let (entry, seq) = event.map_err(|e| e.to_string())?;
                    line.clear();
                    envelope::write(
                        &mut line,
                        entry.time,
                        chunk.tag,
                        chunk.source,
                        seq,
                        entry.record,
                    )
                    .map_err(|e| e.to_string())?;
                    line.push(b'\n');
                    let gz = groups
                        .entry((chunk.tag, hour_of(entry.time)))
                        .or_insert_with(|| GzipWriter::with_capacity(1 << 16));
                    gz.write_all(&line).map_err(|e| e.to_string())?;
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
                    let body = gz.finish().map_err(|e| e.to_string())?;
                    let len = body.len() as u64;
                    store
                        .put(&ObjectPath::from(key.as_str()), PutPayload::from(body))
                        .await
                        .map_err(|e| format!("put {key}: {e}"))?;
                    Ok::<u64, String>(len)
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
