//! Writes gzip NDJSON objects, one per (tag, event-time hour) of a delivery, under keys
//! from the sink's `key_template` ([`super::key`]), and closes hours ([`super::hours`]).
//!
//! - A delivery is a gathering of spooled chunks, cut by the driver when a partition
//!   reaches `max_object_size`, `max_open_partitions` are open, the oldest chunk waited
//!   `max_object_age`, or an hour is due to close. Its events are written into the
//!   stage as they are read ([`super::stage`]: local files, not memory), so a delivery
//!   of many large partitions costs disk, not RAM.
//! - The key holds the relay's incarnation and the spool positions where the gathering
//!   started and ended, so keys of different spools never meet and a delivery repeated
//!   after a crash (the driver repeats it with exactly the same events, see
//!   `Deliver::replays_exactly`) writes the same key with the same content.
//! - Uploads are create-only (`PutMode::Create`): an object is never replaced. A key
//!   that exists with the same content (same gzip trailer: CRC32 and length of the
//!   lines) is this upload done before: success. One with *other* content (a spool whose
//!   unsynced tail was lost in a crash and rewritten) is not touched: the new object goes
//!   beside it as `<...>.<n>.ndjson.gz`, logged.
//! - Objects over `MULTIPART_AT` go up as multipart uploads in `PART_SIZE` parts; an
//!   upload that fails is aborted, so no parts are left behind by a failure (a crash in
//!   the middle of one can leave parts: a bucket lifecycle rule for incomplete multipart
//!   uploads removes them, docs/relay.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use sluice_spool::Position;

use super::hours::{self, HourBook, ObjectEntry};
use super::key::{date_and_hour, KeyTemplate, KeyValues};
use super::lease::{Lease, LeaseError};
use super::stage::{self, Stage, Staged};
use crate::clock::Clock;
use crate::metrics::RelayMetrics;
use crate::sinks::spec::{Deliver, DeliverError, DeliverFuture, Delivered, Gathered};

/// Objects larger than this go up in parts.
pub const MULTIPART_AT: u64 = 16 << 20;
/// The size of each part (S3 wants at least 5 MiB but the last).
pub const PART_SIZE: usize = 8 << 20;

pub struct ObjectWriter {
    pub name: String,
    pub relay: String,
    /// The spool's incarnation ([`crate::incarnation`]).
    pub incarnation: String,
    pub store: Arc<dyn ObjectStore>,
    /// The full key prefix, without a trailing '/'.
    pub prefix: String,
    pub template: KeyTemplate,
    pub max_age: Duration,
    /// `allowed_lateness`, in seconds.
    pub lateness: f64,
    pub clock: Clock,
    pub stage: Stage,
    pub book: HourBook,
    pub metrics: Arc<RelayMetrics>,
    /// The finished partitions of the delivery under way, and its (start, end).
    pub pending: Vec<Staged>,
    pub pending_for: Option<(Position, Position)>,
    /// The clock when the delivery under way was cut (its first attempt).
    pub cut_clock: f64,
    /// The relay's lease in the bucket (`None` with `lease_ttl = "0s"`).
    pub lease: Option<Arc<Lease>>,
    pub lease_task: Option<tokio::task::JoinHandle<()>>,
    /// Cleared when the store cannot do create-only puts (an S3-compatible store without
    /// conditional writes, with `conditional_put = "disabled"`): then keys are unique
    /// but a repeated upload overwrites its own object.
    pub create_only: Arc<AtomicBool>,
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
/// alone and the body goes to the first free `key(n)`. Returns the key written (or found)
/// and whether an object was created.
///
/// The key is looked at before the put, so a store that ignores `If-None-Match` (or has
/// no create-only put at all) still never gets a plain put over an existing object; the
/// create-only put then closes the window between the look and the put where the store
/// can.
async fn put_once(
    store: &dyn ObjectStore,
    key: impl Fn(u32) -> ObjectPath,
    body: Body<'_>,
    create_only: &AtomicBool,
) -> Result<(ObjectPath, bool), DeliverError> {
    let tail = body.tail()?;
    let mut copy = 0;
    let mut raced = 0;
    while copy < 100 {
        let path = key(copy);
        let look = existing(store, &path).await?;
        match look {
            Look::Found(found) if same_content(&found, (body.len(), &tail)) => {
                tracing::info!(key = %path, "object already written with the same content (a delivery repeated after a crash)");
                return Ok((path, false));
            }
            Look::Found(_) => {
                copy += 1;
                continue;
            }
            Look::Absent | Look::Denied => {}
        }
        let mode = if create_only.load(Ordering::Relaxed) {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        let put = match &body {
            Body::Memory(bytes) => store
                .put_opts(&path, PutPayload::from(bytes.clone()), mode.into())
                .await
                .map(|_| ()),
            // Multipart uploads have no create-only mode in object_store: the look
            // above guards the key, a create-only put cannot.
            Body::File(staged) => {
                put_parts(store, &path, staged).await?;
                Ok(())
            }
        };
        match put {
            Ok(()) => {
                if copy > 0 {
                    tracing::error!(key = %path, first = %key(0), "an object with this key existed with other content; it was kept, and this delivery written beside it (reconcile may count these events twice)");
                }
                return Ok((path, true));
            }
            // Keys are this relay's own and repeated deliveries are exact: an existing key
            // that cannot be read (write-only credentials) is this delivery done before.
            Err(object_store::Error::AlreadyExists { .. }) if matches!(look, Look::Denied) => {
                tracing::info!(key = %path, "object already exists (cannot be read with these credentials): taken as this delivery written before a crash");
                return Ok((path, false));
            }
            // Written meanwhile (a request retried after a lost answer): look again.
            Err(object_store::Error::AlreadyExists { .. }) => {
                raced += 1;
                if raced > 3 {
                    return Err(DeliverError::Transient(format!(
                        "put {path}: the store says the key exists but it cannot be found"
                    )));
                }
            }
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

/// What a look at a key found.
enum Look {
    /// Its length and last (up to) 8 bytes.
    Found((u64, bytes::Bytes)),
    Absent,
    /// Credentials that may write but not read (a PutObject-only policy) cannot look:
    /// then the create-only put alone guards the key.
    Denied,
}

async fn existing(store: &dyn ObjectStore, path: &ObjectPath) -> Result<Look, DeliverError> {
    let denied = |path: &ObjectPath| {
        tracing::warn!(key = %path, "cannot read the object store (no read permission): keys are guarded by create-only puts alone");
        Ok(Look::Denied)
    };
    let size = match store.head(path).await {
        Ok(meta) => meta.size,
        Err(object_store::Error::NotFound { .. }) => return Ok(Look::Absent),
        Err(
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. },
        ) => return denied(path),
        Err(e) => return Err(classify(path.as_ref(), e)),
    };
    match store.get_range(path, size.saturating_sub(8)..size).await {
        Ok(tail) => Ok(Look::Found((size, tail))),
        Err(object_store::Error::NotFound { .. }) => Ok(Look::Absent),
        Err(
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. },
        ) => denied(path),
        Err(e) => Err(classify(path.as_ref(), e)),
    }
}

/// Same events, whatever compressor wrote them: the gzip trailers (CRC32 and length of
/// the uncompressed data) agree. A newer relay's gzip may pick other bytes for the same
/// lines; a repeated delivery must still count as done, not be written again.
/// Objects shorter than a trailer (not gzip) are compared whole.
fn same_content((found_len, found_tail): &(u64, bytes::Bytes), (len, tail): (u64, &[u8])) -> bool {
    found_tail[..] == *tail && (*found_len == len || (*found_len >= 8 && len >= 8))
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

/// An object's body: in memory (small) or in its stage file (large, sent in parts).
enum Body<'a> {
    Memory(bytes::Bytes),
    File(&'a Staged),
}

impl Body<'_> {
    fn len(&self) -> u64 {
        match self {
            Body::Memory(b) => b.len() as u64,
            Body::File(s) => s.len,
        }
    }

    /// The last (up to) 8 bytes: a gzip member's trailer.
    fn tail(&self) -> Result<Vec<u8>, DeliverError> {
        match self {
            Body::Memory(b) => Ok(b[b.len().saturating_sub(8)..].to_vec()),
            Body::File(s) => s
                .trailer()
                .map_err(|e| DeliverError::Transient(format!("read {}: {e}", s.path.display()))),
        }
    }
}

/// Uploads `body` in parts; aborts the upload when any part (or the completion) fails.
async fn put_parts(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    staged: &Staged,
) -> Result<(), DeliverError> {
    let mut upload = store
        .put_multipart(path)
        .await
        .map_err(|e| classify(path.as_ref(), e))?;
    let mut sent = 0u64;
    let result: Result<(), DeliverError> = async {
        while sent < staged.len {
            let n = (staged.len - sent).min(PART_SIZE as u64) as usize;
            let part = staged.read_at(sent, n).map_err(|e| {
                DeliverError::Transient(format!("read {}: {e}", staged.path.display()))
            })?;
            upload
                .put_part(PutPayload::from(part))
                .await
                .map_err(|e| classify(path.as_ref(), e))?;
            sent += n as u64;
        }
        upload
            .complete()
            .await
            .map(|_| ())
            .map_err(|e| classify(path.as_ref(), e))
    }
    .await;
    if let Err(e) = &result {
        match upload.abort().await {
            Ok(()) => {
                tracing::warn!(key = %path, error = %e, "multipart upload failed; aborted (no parts left behind)")
            }
            Err(abort) => {
                tracing::error!(key = %path, error = %e, abort_error = %abort, "multipart upload failed and could not be aborted: its parts stay until the bucket's lifecycle rule removes them")
            }
        }
    }
    result
}

impl ObjectWriter {
    fn values<'a>(&'a self, tag: &'a str, hour: u64, batch: (Position, Position)) -> KeyValues<'a> {
        KeyValues {
            prefix: &self.prefix,
            tag,
            hour,
            relay: &self.relay,
            incarnation: &self.incarnation,
            first: batch.0,
            last: batch.1,
        }
    }

    fn label(&self) -> crate::metrics::SinkLabel {
        self.metrics.sink(&self.name)
    }

    /// `<partition>/_manifests/<relay>-<incarnation>.r<rev>.json`
    fn manifest_path(&self, tag: &str, hour: u64, revision: u32) -> ObjectPath {
        let partition = self
            .template
            .partition(&self.values(tag, hour, Default::default()));
        let name = format!("{}-{}.r{revision:06}.json", self.relay, self.incarnation);
        partition
            .parts()
            .chain([PathPart::from("_manifests"), PathPart::from(name)])
            .collect()
    }

    fn success_path(&self, tag: &str, hour: u64) -> ObjectPath {
        let partition = self
            .template
            .partition(&self.values(tag, hour, Default::default()));
        let name = format!("_SUCCESS-{}-{}", self.relay, self.incarnation);
        partition.parts().chain([PathPart::from(name)]).collect()
    }

    /// `<prefix>/_sluice/hours/dt=<date>/hour=<HH>/<relay>-<incarnation>.json`
    fn marker_path(&self, hour: u64) -> ObjectPath {
        let (dt, hh) = date_and_hour(hour);
        ObjectPath::from(self.prefix.as_str())
            .parts()
            .map(|p| PathPart::from(p.as_ref().to_string()))
            .chain(
                [
                    "_sluice".to_string(),
                    "hours".to_string(),
                    format!("dt={dt}"),
                    format!("hour={hh}"),
                    format!("{}-{}.json", self.relay, self.incarnation),
                ]
                .into_iter()
                .map(PathPart::from),
            )
            .collect()
    }

    async fn put_json(
        &self,
        path: &ObjectPath,
        value: &serde_json::Value,
    ) -> Result<(), DeliverError> {
        let body =
            serde_json::to_vec_pretty(value).map_err(|e| DeliverError::Permanent(e.to_string()))?;
        self.store
            .put(path, PutPayload::from(body))
            .await
            .map(|_| ())
            .map_err(|e| classify(path.as_ref(), e))
    }

    /// Writes the decided revision of a tag's hour: its manifest, then its `_SUCCESS`
    /// marker pointing to it.
    async fn announce_revision(&mut self, tag: &str, hour: u64) -> Result<(), DeliverError> {
        let Some(th) = self.book.get(tag, hour).cloned() else {
            return Ok(());
        };
        let revision = th.revision;
        let manifest = hours::manifest_json(&self.relay, &self.incarnation, tag, hour, &th);
        let path = self.manifest_path(tag, hour, revision);
        self.put_json(&path, &manifest).await?;
        let success = serde_json::json!({
            "manifest": path.to_string(),
            "revision": revision,
            "records": th.totals.records,
        });
        self.put_json(&self.success_path(tag, hour), &success)
            .await?;
        let label = crate::envelope::hour_label(hour);
        if revision == 1 {
            let delay = self.clock.now() - (hour + 1) as f64 * 3600.0;
            self.metrics
                .hour_close_delay
                .get_or_create(&self.label())
                .set(delay.max(0.0) as i64);
            tracing::info!(sink = %self.name, tag, hour = %label, records = th.totals.records, objects = th.objects.len(), delay_seconds = delay as i64, manifest = %path, "hour complete: manifest written");
        } else {
            tracing::info!(sink = %self.name, tag, hour = %label, revision, records = th.totals.records, late = th.late, manifest = %path, "late events: the hour's manifest has a new revision");
        }
        self.book.announced(tag, hour, revision);
        Ok(())
    }

    /// Writes every decided revision not yet written, then the hour markers due.
    async fn announce(&mut self) -> Result<(), DeliverError> {
        for (tag, hour) in self.book.unannounced() {
            self.announce_revision(&tag, hour).await?;
        }
        for hour in self.book.markers_due() {
            self.write_marker(hour).await?;
            self.book.marker_written(hour);
        }
        Ok(())
    }

    /// The hour marker: which tags this relay had in `hour`, and their latest manifest.
    async fn write_marker(&self, hour: u64) -> Result<(), DeliverError> {
        let mut tags = serde_json::Map::new();
        for tag in self.book.tags(hour) {
            if let Some(th) = self.book.get(&tag, hour) {
                tags.insert(
                    tag.clone(),
                    serde_json::json!({
                        "records": th.totals.records,
                        "revision": th.revision,
                        "manifest": self.manifest_path(&tag, hour, th.revision).to_string(),
                    }),
                );
            }
        }
        let marker = serde_json::json!({
            "version": 1,
            "relay": self.relay,
            "incarnation": self.incarnation,
            "hour": crate::envelope::hour_label(hour),
            "closed_at": hours::rfc3339_secs(self.clock.now()),
            "tags": tags,
        });
        self.put_json(&self.marker_path(hour), &marker).await
    }

    /// A late event's hour left the book long ago: continue from its latest manifest.
    async fn restore_hour(&mut self, tag: &str, hour: u64) -> Result<(), DeliverError> {
        let dir = self.manifest_path(tag, hour, 0);
        let folder: ObjectPath = dir.parts().take(dir.parts().count() - 1).collect();
        let mine = format!("{}-{}.r", self.relay, self.incarnation);
        let mut latest: Option<ObjectPath> = None;
        let listed = self
            .store
            .list_with_delimiter(Some(&folder))
            .await
            .map_err(|e| classify(folder.as_ref(), e))?;
        for meta in listed.objects {
            let name = meta.location.filename().unwrap_or_default();
            if name.starts_with(&mine) && latest.as_ref().is_none_or(|l| meta.location > *l) {
                latest = Some(meta.location);
            }
        }
        let Some(path) = latest else { return Ok(()) };
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(|e| classify(path.as_ref(), e))?
            .bytes()
            .await
            .map_err(|e| classify(path.as_ref(), e))?;
        let manifest: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            DeliverError::Permanent(format!("manifest {path} is not readable: {e}"))
        })?;
        let th: hours::TagHour = serde_json::from_value(manifest["book"].clone()).map_err(|e| {
            DeliverError::Permanent(format!("manifest {path} is not readable: {e}"))
        })?;
        self.book.restore(tag, hour, th);
        Ok(())
    }

    /// Uploads one finished partition; returns its key and whether it was created.
    async fn upload(
        &self,
        staged: &Staged,
        batch: (Position, Position),
    ) -> Result<(ObjectPath, bool), DeliverError> {
        let values = self.values(&staged.tag, staged.hour, batch);
        let key = |copy| self.template.key(&values, copy);
        let body = if staged.len <= MULTIPART_AT {
            let bytes = staged.read().map_err(|e| {
                DeliverError::Transient(format!("read {}: {e}", staged.path.display()))
            })?;
            Body::Memory(bytes.into())
        } else {
            Body::File(staged)
        };
        put_once(self.store.as_ref(), key, body, &self.create_only).await
    }
}

impl Deliver for ObjectWriter {
    fn absorbs(&self) -> bool {
        true
    }

    fn absorb(&mut self, batch: &Gathered) -> Result<bool, DeliverError> {
        let mut cut = false;
        for chunk in batch.chunks() {
            let added = chunk
                .map_err(DeliverError::from)
                .and_then(|c| self.stage.add(&c));
            match added {
                Ok(full) => cut |= full,
                Err(e) => {
                    // The driver reads the gathering again into an empty stage.
                    self.stage.clear();
                    return Err(e);
                }
            }
        }
        Ok(cut)
    }

    fn due_by(&self) -> Option<Instant> {
        if self.book.has_unannounced() {
            return Some(Instant::now()); // a crash came between a revision and its writes
        }
        let now = self.clock.now();
        // A millisecond past the close, so the cut's clock reads past it too.
        let close = hours::next_close(self.book.last_closed(), now, self.lateness) + 0.001;
        Some(self.clock.instant_at(close))
    }

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
            let range = (batch.start, batch.end);
            if self.pending_for != Some(range) {
                stage::remove(&self.pending);
                self.pending = match self.stage.finish() {
                    Ok(p) => p,
                    Err(e) => {
                        return Err(DeliverError::Reread(format!(
                            "{e}: reading the delivery again from the spool"
                        )));
                    }
                };
                self.pending_for = Some(range);
            }
            // The relay's clock when the driver cut the gathering (before it looked at
            // the spool's end): hours closed by this delivery are those it had passed.
            self.cut_clock = batch
                .cut_at
                .map_or_else(|| self.clock.now(), |at| self.clock.at(at));
            let mut done = Delivered::default();
            let mut created = false;
            let mut pending = std::mem::take(&mut self.pending);
            let mut failed = None;
            for staged in pending.iter_mut().filter(|s| !s.uploaded) {
                match self.upload(staged, range).await {
                    Ok((key, new)) => {
                        created |= new;
                        staged.uploaded = true;
                        staged.key = Some(key.to_string());
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let book_result = match failed {
                Some(e) => Err(e),
                None => self.record(&pending, batch.caught_up).await,
            };
            if let Err(e) = book_result {
                self.pending = pending;
                return Err(e);
            }
            for staged in &pending {
                done.counts
                    .delivered
                    .add(&staged.tag, staged.hour, staged.stats.records);
                done.bytes += staged.len;
            }
            stage::remove(&pending);
            self.pending_for = None;
            if created {
                crash_point();
            }
            Ok(done)
        })
    }

    fn gather_limits(&self) -> (usize, Duration) {
        (usize::MAX, self.max_age)
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
            self.stage.clear();
            stage::remove(&self.pending);
            if let Some(task) = self.lease_task.take() {
                task.abort();
            }
            if let Some(lease) = &self.lease {
                let _ = tokio::time::timeout(Duration::from_secs(5), lease.release()).await;
            }
        })
    }
}

impl ObjectWriter {
    /// Records a delivery's objects in the hour book, closes the hours that are due and
    /// revises those late events changed; the decisions are saved before their
    /// manifests are written, and the book before the delivery counts as done (before
    /// its cursor).
    async fn record(&mut self, pending: &[Staged], caught_up: bool) -> Result<(), DeliverError> {
        let mut late = 0;
        for s in pending {
            let key = s.key.clone().unwrap_or_default();
            let known = self
                .book
                .has(&s.tag, s.hour)
                .map_err(DeliverError::Transient)?;
            if self.book.is_closed(s.hour) && !known {
                self.restore_hour(&s.tag, s.hour).await?;
            }
            let entry = ObjectEntry {
                records: s.stats.records,
                bytes: s.len,
                min_time: s.stats.min_time,
                max_time: s.stats.max_time,
                sources: s
                    .stats
                    .sources
                    .iter()
                    .map(|(source, span)| (source.clone(), span.ranges.clone()))
                    .collect(),
            };
            let n = self.book.add_object(&s.tag, s.hour, &key, entry, &s.stats);
            if n > 0 {
                tracing::warn!(sink = %self.name, tag = %s.tag, hour = %crate::envelope::hour_label(s.hour), events = n, key = %key, "late events: their hour was already closed; written to a new object, the manifest is revised");
            }
            late += n;
        }
        if late > 0 {
            self.metrics
                .late_events
                .get_or_create(&self.label())
                .inc_by(late);
        }
        let now = self.clock.now();
        if caught_up {
            for hour in self.book.closable(self.cut_clock, self.lateness) {
                for tag in self.book.tags(hour) {
                    let due = self
                        .book
                        .get(&tag, hour)
                        .is_some_and(|th| th.revision == 0 || th.changed);
                    if due {
                        self.book.next_revision(&tag, hour, now);
                    }
                }
                self.book.set_closed(hour);
                self.metrics.hours_closed.get_or_create(&self.label()).inc();
            }
        }
        for (tag, hour) in self.book.revisions_due() {
            self.book.next_revision(&tag, hour, now);
        }
        self.book.save().map_err(DeliverError::Transient)?;
        self.announce().await?;
        self.book.save().map_err(DeliverError::Transient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::memory::InMemory;
    use std::io::Write;

    fn k(copy: u32) -> ObjectPath {
        let t = KeyTemplate::parse(super::super::key::DEFAULT_TEMPLATE).unwrap();
        t.key(
            &KeyValues {
                prefix: "",
                tag: "t",
                hour: 1,
                relay: "r",
                incarnation: "i0000000000000001",
                first: Position::default(),
                last: Position::default(),
            },
            copy,
        )
    }

    fn mem(b: &[u8]) -> Body<'static> {
        Body::Memory(bytes::Bytes::copy_from_slice(b))
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
        put_once(&store, k, mem(b"first"), &create_only)
            .await
            .unwrap();
        put_once(&store, k, mem(b"first"), &create_only)
            .await
            .unwrap();
        assert_eq!(objects(&store).await.len(), 1);
        let (key, created) = put_once(&store, k, mem(b"second"), &create_only)
            .await
            .unwrap();
        assert_eq!((key, created), (k(1), true));
        put_once(&store, k, mem(b"second"), &create_only)
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
        assert!(
            put_once(&store, k, mem(&fast), &create_only)
                .await
                .unwrap()
                .1
        );
        assert!(
            !put_once(&store, k, mem(&small), &create_only)
                .await
                .unwrap()
                .1
        );
        assert_eq!(objects(&store).await.len(), 1);
    }

    /// An object over `MULTIPART_AT` goes up in parts from its stage file, and a
    /// repeated upload of it finds it done by its trailer.
    #[tokio::test]
    async fn a_large_object_goes_up_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut n = 0u64;
        while e.get_ref().len() < (MULTIPART_AT as usize) + PART_SIZE {
            for _ in 0..1000 {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                writeln!(
                    e,
                    "{{\"n\":{n},\"message\":\"GET /api/{} 200 {}\"}}",
                    n % 977,
                    n >> 7
                )
                .unwrap();
            }
        }
        let body = e.finish().unwrap();
        std::fs::write(&path, &body).unwrap();
        let staged = Staged {
            tag: "t".into(),
            hour: 1,
            path,
            len: body.len() as u64,
            stats: Default::default(),
            uploaded: false,
            key: None,
        };
        let store = InMemory::new();
        let create_only = AtomicBool::new(true);
        let (key, created) = put_once(&store, k, Body::File(&staged), &create_only)
            .await
            .unwrap();
        assert!(created);
        let got = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(got.len(), body.len());
        assert!(got[..] == body[..]);
        let (_, again) = put_once(&store, k, Body::File(&staged), &create_only)
            .await
            .unwrap();
        assert!(!again, "found done by its trailer");
        assert_eq!(objects(&store).await.len(), 1);
    }

    /// A store whose multipart uploads fail at the second part, counting aborts.
    #[derive(Debug)]
    struct FailingParts {
        inner: InMemory,
        aborted: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl std::fmt::Display for FailingParts {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "FailingParts")
        }
    }

    #[derive(Debug)]
    struct FailingUpload {
        inner: Box<dyn object_store::MultipartUpload>,
        parts: usize,
        aborted: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[async_trait::async_trait]
    impl object_store::MultipartUpload for FailingUpload {
        fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
            self.parts += 1;
            if self.parts == 2 {
                return Box::pin(async {
                    Err(object_store::Error::Generic {
                        store: "test",
                        source: "connection reset".into(),
                    })
                });
            }
            self.inner.put_part(data)
        }
        async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
            self.inner.complete().await
        }
        async fn abort(&mut self) -> object_store::Result<()> {
            self.aborted.fetch_add(1, Ordering::SeqCst);
            self.inner.abort().await
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for FailingParts {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            let inner = self.inner.put_multipart_opts(location, opts).await?;
            Ok(Box::new(FailingUpload {
                inner,
                parts: 0,
                aborted: self.aborted.clone(),
            }))
        }
        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectPath>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A multipart upload that fails is aborted, leaves no object, and is a transient
    /// error (the delivery is retried).
    #[tokio::test]
    async fn a_failed_multipart_upload_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.gz");
        let len = MULTIPART_AT as usize + PART_SIZE + 10;
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let staged = Staged {
            tag: "t".into(),
            hour: 1,
            path,
            len: len as u64,
            stats: Default::default(),
            uploaded: false,
            key: None,
        };
        let store = FailingParts {
            inner: InMemory::new(),
            aborted: Default::default(),
        };
        let create_only = AtomicBool::new(true);
        let e = put_once(&store, k, Body::File(&staged), &create_only)
            .await
            .unwrap_err();
        assert!(!e.is_permanent(), "{e}");
        assert!(e.to_string().contains("connection reset"), "{e}");
        assert_eq!(store.aborted.load(Ordering::SeqCst), 1);
        assert!(objects(&store.inner).await.is_empty());
    }
}
