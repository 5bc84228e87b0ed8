//! Writes gzip NDJSON objects of JSON envelopes, partitioned by tag and *event-time* hour:
//!
//! ```text
//! <prefix>/tag=<tag>/dt=<YYYY-MM-DD>/hour=<HH>/<relay>-<incarnation>-<segment>-<offset>.ndjson.gz
//! ```
//!
//! - The key is derived from the spool position where the gathering started and the
//!   relay's incarnation (a random id made with the spool, [`crate::incarnation`]), so
//!   keys of different spools never meet — a relay restarted with an empty data
//!   directory, or two relays given one id, cannot write a key that exists.
//! - Each key part is percent-encoded by `object_store` (`/` as `%2F`, `%` as `%25`,
//!   ...), so two tags never share a folder (`a/b` and `a_b` stay apart).
//! - Uploads are create-only (`PutMode::Create`): an object is never replaced. A delivery
//!   repeated after a crash gathers exactly the same events again (the driver records
//!   where each gathering ends, see `Deliver::replays_exactly`), so it writes the same
//!   key with the same bytes; the store says the key exists, the relay reads it back,
//!   finds the same content and counts it delivered. A key that exists with *other*
//!   content (a spool whose unsynced tail was lost in a crash and rewritten) is not
//!   touched: the new object goes beside it as `<...>.<n>.ndjson.gz`, logged.
//! - Late events simply land in their own hour's folder.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use sluice_forward::GzipWriter;

use super::lease::{Lease, LeaseError};
use crate::envelope::{civil_from_days, hour_of};
use crate::sinks::spec::{Deliver, DeliverError, DeliverFuture, Delivered, Gathered};

pub struct ObjectWriter {
    pub relay: String,
    /// The spool's incarnation ([`crate::incarnation`]).
    pub incarnation: String,
    pub store: Arc<dyn ObjectStore>,
    /// The full key prefix, without a trailing '/'.
    pub prefix: String,
    pub max_bytes: usize,
    pub max_age: Duration,
    /// The relay's lease in the bucket (`None` with `lease_ttl = "0s"`).
    pub lease: Option<Arc<Lease>>,
    pub lease_task: Option<tokio::task::JoinHandle<()>>,
    /// Cleared when the store cannot do create-only puts (an S3-compatible store without
    /// conditional writes, with `conditional_put = "disabled"`): then keys are unique
    /// but a repeated upload overwrites its own object.
    pub create_only: Arc<AtomicBool>,
}

/// `tag=<tag>/dt=YYYY-MM-DD/hour=HH` as key parts (each percent-encoded when the key is
/// built, see [`object_key`]).
pub fn partition(tag: &str, hour: u64) -> [String; 3] {
    let secs = hour as i64 * 3600;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    [
        format!("tag={tag}"),
        format!("dt={y:04}-{m:02}-{d:02}"),
        format!("hour={:02}", secs.rem_euclid(86_400) / 3600),
    ]
}

/// The key of the object of one (tag, hour) of a gathering that started at
/// (`segment`, `offset`); `copy` > 0 for an object written beside an existing key.
pub fn object_key(
    prefix: &str,
    tag: &str,
    hour: u64,
    relay: &str,
    incarnation: &str,
    (segment, offset): (u64, u64),
    copy: u32,
) -> ObjectPath {
    let name = if copy == 0 {
        format!("{relay}-{incarnation}-{segment:020}-{offset:012}.ndjson.gz")
    } else {
        format!("{relay}-{incarnation}-{segment:020}-{offset:012}.{copy}.ndjson.gz")
    };
    // Path::from encodes the prefix's parts the way keys were always written (and the
    // way readback lists them).
    let prefix = ObjectPath::from(prefix);
    let parts = partition(tag, hour);
    prefix
        .parts()
        .chain(parts.iter().map(|p| PathPart::from(p.as_str())))
        .chain(std::iter::once(PathPart::from(name.as_str())))
        .collect()
}

/// Test failpoint for the crash window between an upload and the cursor save:
/// `SLUICE_TEST_CRASH_AFTER_UPLOAD=n` aborts the process (like kill -9: nothing is saved)
/// after the n-th delivery of this process that created an object. Unset, it costs one
/// load of a cached value per delivery.
fn crash_point() {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static CREATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let limit = LIMIT.get_or_init(|| {
        std::env::var("SLUICE_TEST_CRASH_AFTER_UPLOAD")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(n) = *limit {
        if CREATED.fetch_add(1, Ordering::Relaxed) + 1 >= n {
            eprintln!("SLUICE_TEST_CRASH_AFTER_UPLOAD: aborting after an upload, before the cursor is saved");
            std::process::abort();
        }
    }
}

/// Writes `body` under `key(0)` without replacing anything: an existing object with the
/// same content is this upload done before (success); one with other content is left
/// alone and the body goes to the first free `key(n)`. Returns whether an object was
/// created.
///
/// The key is looked at before the put, so a store that ignores `If-None-Match` (or has
/// no create-only put at all) still never gets a plain put over an existing object; the
/// create-only put then closes the window between the look and the put where the store
/// can.
async fn put_once(
    store: &dyn ObjectStore,
    key: impl Fn(u32) -> ObjectPath,
    body: Vec<u8>,
    create_only: &AtomicBool,
) -> Result<bool, DeliverError> {
    let body = bytes::Bytes::from(body);
    let mut copy = 0;
    while copy < 100 {
        let path = key(copy);
        match existing(store, &path).await? {
            Some(found) if same_content(&found, &body) => {
                tracing::info!(key = %path, "object already written with the same content (a delivery repeated after a crash)");
                return Ok(false);
            }
            Some(_) => {
                copy += 1;
                continue;
            }
            None => {}
        }
        let mode = if create_only.load(Ordering::Relaxed) {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        match store
            .put_opts(&path, PutPayload::from(body.clone()), mode.into())
            .await
        {
            Ok(_) => {
                if copy > 0 {
                    tracing::error!(key = %path, first = %key(0), "an object with this key existed with other content; it was kept, and this delivery written beside it (reconcile may count these events twice)");
                }
                return Ok(true);
            }
            // Written meanwhile (a request retried after a lost answer): look again.
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(
                object_store::Error::NotImplemented { .. }
                | object_store::Error::NotSupported { .. },
            ) if create_only.load(Ordering::Relaxed) => {
                tracing::warn!(key = %path, "the object store cannot do create-only puts; each key is looked at before a plain put instead (keys stay unique per relay incarnation)");
                create_only.store(false, Ordering::Relaxed);
            }
            Err(e) => return Err(classify(path.as_ref(), e)),
        }
    }
    Err(DeliverError::Permanent(format!(
        "100 objects beside {} exist with other content; refusing to go on",
        key(0)
    )))
}

/// The object at `path`, if there is one. Credentials that may write but not read (a
/// PutObject-only policy) cannot look: then the create-only put alone guards the key.
async fn existing(
    store: &dyn ObjectStore,
    path: &ObjectPath,
) -> Result<Option<bytes::Bytes>, DeliverError> {
    let got = match store.get(path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. },
        ) => {
            tracing::warn!(key = %path, "cannot read the object store (no read permission): keys are guarded by create-only puts alone");
            return Ok(None);
        }
        Err(e) => return Err(classify(path.as_ref(), e)),
    };
    got.bytes()
        .await
        .map(Some)
        .map_err(|e| classify(path.as_ref(), e))
}

/// Same events, whatever compressor wrote them: the gzip trailers (CRC32 and length of
/// the uncompressed data) agree. A newer relay's gzip may pick other bytes for the same
/// lines; a repeated delivery must still count as done, not be written again.
fn same_content(found: &[u8], body: &[u8]) -> bool {
    found == body
        || (found.len() >= 8
            && body.len() >= 8
            && found[found.len() - 8..] == body[body.len() - 8..])
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
            if let Some(lease) = &self.lease {
                lease.check().await.map_err(|e| match e {
                    LeaseError::Held(m) => DeliverError::Permanent(m),
                    LeaseError::Unreachable(m) | LeaseError::Forbidden(m) => {
                        DeliverError::Transient(m)
                    }
                })?;
            }
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
                let store = self.store.clone();
                let create_only = self.create_only.clone();
                let (prefix, relay, incarnation) = (&self.prefix, &self.relay, &self.incarnation);
                let start = (batch.start.segment, batch.start.offset);
                let key =
                    move |copy| object_key(prefix, tag, hour, relay, incarnation, start, copy);
                async move {
                    let body = gz
                        .finish()
                        .map_err(|e| DeliverError::Transient(format!("gzip: {e}")))?;
                    let len = body.len() as u64;
                    let created = put_once(store.as_ref(), key, body, &create_only).await?;
                    Ok::<(u64, bool), DeliverError>((len, created))
                }
            });
            let mut created = false;
            for (len, new) in futures::future::try_join_all(uploads).await? {
                done.bytes += len;
                created |= new;
            }
            if created {
                crash_point();
            }
            Ok(done)
        })
    }

    fn gather_limits(&self) -> (usize, Duration) {
        (self.max_bytes, self.max_age)
    }

    fn replays_exactly(&self) -> bool {
        true
    }

    fn start(&mut self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let Some(lease) = self.lease.clone() else {
                return Ok(());
            };
            let first = tokio::time::timeout(Duration::from_secs(10), lease.acquire()).await;
            match first {
                Ok(Ok(())) => {}
                Ok(Err(LeaseError::Held(m))) => return Err(m),
                Ok(Err(LeaseError::Unreachable(m) | LeaseError::Forbidden(m))) => {
                    tracing::warn!(error = %m, "the object store cannot be reached at start; the relay lease is taken before the first upload")
                }
                Err(_) => {
                    tracing::warn!(lease = %lease.path(), "the object store did not answer within 10 s at start; the relay lease is taken before the first upload")
                }
            }
            let renewing = lease.clone();
            self.lease_task = Some(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(renewing.renew_every()).await;
                    match renewing.renew().await {
                        Ok(()) => {}
                        Err(LeaseError::Held(_)) => return, // logged by renew; uploads stop
                        Err(LeaseError::Unreachable(m) | LeaseError::Forbidden(m)) => {
                            tracing::warn!(error = %m, "cannot renew the relay lease; retrying")
                        }
                    }
                }
            }));
            Ok(())
        })
    }

    fn finish(&mut self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(task) = self.lease_task.take() {
                task.abort();
            }
            if let Some(lease) = &self.lease {
                let _ = tokio::time::timeout(Duration::from_secs(5), lease.release()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::memory::InMemory;

    fn key(tag: &str) -> String {
        object_key("logs", tag, 491_000, "r1", "i0123456789abcdef", (3, 40), 0).to_string()
    }

    #[test]
    fn tags_never_share_a_folder() {
        let tags = ["a/b", "a_b", "a%2Fb", "a\\b", "a b", "..", "."];
        let keys: std::collections::BTreeSet<String> = tags.iter().map(|t| key(t)).collect();
        assert_eq!(keys.len(), tags.len(), "{keys:?}");
        for k in &keys {
            assert_eq!(
                k.matches('/').count(),
                4,
                "a tag made a folder of its own: {k}"
            );
        }
        assert_eq!(
            key("app.web"),
            "logs/tag=app.web/dt=2026-01-05/hour=08/r1-i0123456789abcdef-00000000000000000003-000000000040.ndjson.gz"
        );
    }

    async fn objects(store: &InMemory) -> Vec<(String, bytes::Bytes)> {
        let metas: Vec<_> = store.list(None).try_collect().await.unwrap();
        let mut out = Vec::new();
        for m in metas {
            let b = store.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.push((m.location.to_string(), b));
        }
        out.sort();
        out
    }

    /// A repeated upload of the same bytes is success and writes nothing; other bytes
    /// under an existing key never replace it.
    #[tokio::test]
    async fn an_object_is_never_replaced() {
        let store = InMemory::new();
        let create_only = AtomicBool::new(true);
        let k = |copy| object_key("", "t", 1, "r", "i0000000000000001", (0, 0), copy);
        put_once(&store, k, b"first".to_vec(), &create_only)
            .await
            .unwrap();
        put_once(&store, k, b"first".to_vec(), &create_only)
            .await
            .unwrap();
        assert_eq!(objects(&store).await.len(), 1);
        put_once(&store, k, b"second".to_vec(), &create_only)
            .await
            .unwrap();
        put_once(&store, k, b"second".to_vec(), &create_only)
            .await
            .unwrap();
        let all = objects(&store).await;
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0].0, k(1).to_string());
        assert_eq!(&all[0].1[..], b"second");
        assert_eq!(all[1].0, k(0).to_string());
        assert_eq!(&all[1].1[..], b"first");
    }

    /// A delivery repeated by a newer relay whose gzip picks other bytes for the same
    /// lines still finds its object done, rather than writing the lines again.
    #[tokio::test]
    async fn the_same_lines_gzipped_otherwise_are_the_same_object() {
        let gz = |level| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
            for i in 0..2000 {
                writeln!(e, "{{\"n\":{i},\"message\":\"GET /api/{i} 200\"}}").unwrap();
            }
            e.finish().unwrap()
        };
        let (fast, small) = (gz(1), gz(9));
        assert_ne!(fast, small);
        let store = InMemory::new();
        let create_only = AtomicBool::new(true);
        let k = |copy| object_key("", "t", 1, "r", "i0000000000000001", (0, 0), copy);
        assert!(put_once(&store, k, fast, &create_only).await.unwrap());
        assert!(!put_once(&store, k, small, &create_only).await.unwrap());
        assert_eq!(objects(&store).await.len(), 1);
    }
}
