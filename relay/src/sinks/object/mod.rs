//! `type = "object_store"`: S3, GCS, Azure or a local directory, through `object_store`.
//! gzip NDJSON objects (each line the record and its provenance), partitioned by tag and
//! *event-time* hour, rolled by size and age, with a manifest and `_SUCCESS` marker per
//! hour once it is complete. `writer.rs`: deliveries and why a repeated upload cannot
//! duplicate; `key.rs`: key templates; `stage.rs`: open partitions in local files;
//! `hours.rs`: hour close, manifests, revisions; `lease.rs`: one live relay per id;
//! `published.rs`: the relay's ledger per hour, for `reconcile`.

pub mod hours;
pub mod key;
pub mod lease;
pub mod published;
pub mod readback;
pub mod stage;
mod writer;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};
use sluice_core::units::{ByteSize, Span};

pub use writer::ObjectWriter;

use crate::readback::Found;
use crate::sinks::spec::{Deliver, ReadBackContext, SinkContext, SinkSpec};

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObjectSink {
    /// `file:///path`, `s3://bucket`, `gs://bucket`, `az://container`.
    pub url: String,
    /// Key prefix inside the bucket.
    #[serde(default)]
    pub prefix: String,
    /// Options for object_store, e.g. endpoint, region, allow_http, access_key_id.
    /// Credentials are better taken from the environment (AWS_ACCESS_KEY_ID, ...).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Object keys. Placeholders: `{prefix}` (first folder only), `{tag}`, `{dt}`
    /// (YYYY-MM-DD) and `{hour}` (HH) of the event time, in folders; `{relay}`,
    /// `{incarnation}`, `{first}` and `{last}` (spool positions of the delivery) in the
    /// name, which ends in `.ndjson.gz`. Each part is percent-encoded.
    #[serde(default = "default_key_template")]
    pub key_template: String,
    /// Objects roll per tag and event-time hour: one is written when its partition holds
    /// this much NDJSON (before compression) ...
    #[serde(default = "default_object_size")]
    pub max_object_size: ByteSize,
    /// ... or when the oldest event gathered waited this long, or when
    /// `max_open_partitions` are open, or an hour is due to close. With `server.ack =
    /// "end_to_end"` and `required = true`, objects are also written as soon as an
    /// acknowledgement waits for what is gathered (nothing more to read right then), so
    /// acks never wait for this age.
    #[serde(default = "default_object_age")]
    pub max_object_age: Span,
    /// Partitions (tag, hour) open at once; each costs about 350 KiB of memory (its
    /// compressor) and a file in `<data_dir>/sink-state/<sink>/stage/`.
    #[serde(default = "default_open_partitions")]
    pub max_open_partitions: usize,
    /// An hour closes (its manifests and `_SUCCESS` markers are written) once the
    /// relay's clock is this far past its end and everything spooled by then is
    /// uploaded. Events of the hour arriving later still land in it, in new objects,
    /// and its manifest gets a new revision (`sluice_relay_late_events_total`).
    #[serde(default = "default_lateness")]
    pub allowed_lateness: Span,
    /// How long this relay's lease (`<prefix>/_sluice/relays/<relay.id>.json`, renewed
    /// every third of this) holds its id. A relay that finds its id's lease held by
    /// another live relay refuses to start; one that stopped cleanly frees it at once.
    /// `0s` turns leases off.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Span,
}

fn default_lease_ttl() -> Span {
    Span::secs(60)
}

fn default_object_size() -> ByteSize {
    ByteSize::mib(128)
}
fn default_object_age() -> Span {
    Span::secs(300)
}
fn default_open_partitions() -> usize {
    64
}
fn default_lateness() -> Span {
    Span::secs(300)
}
fn default_key_template() -> String {
    key::DEFAULT_TEMPLATE.to_string()
}

impl SinkSpec for ObjectSink {
    fn validate(&self, name: &str) -> Result<(), String> {
        url::Url::parse(&self.url).map_err(|e| {
            format!("sink {name:?}: url {:?} is not a URL ({e}); use file:///dir, s3://bucket, gs://bucket or az://container", self.url)
        })?;
        // Build the store as the relay would (no request is made), so a missing
        // backend, an unknown option or a missing account shows here, not at start.
        configure_store(&self.url, &self.options, false)
            .map_err(|e| format!("sink {name:?}: {e}"))?;
        key::KeyTemplate::parse(&self.key_template).map_err(|e| format!("sink {name:?}: {e}"))?;
        if !self.key_template.starts_with("{prefix}/") && !self.prefix.trim_matches('/').is_empty()
        {
            return Err(format!(
                "sink {name:?}: prefix {:?} is set but key_template does not start with {{prefix}}/: objects would land outside the prefix that leases, markers and reconcile use",
                self.prefix
            ));
        }
        if self.max_open_partitions == 0 {
            return Err(format!(
                "sink {name:?}: max_open_partitions must be at least 1"
            ));
        }
        if self.max_object_size.as_u64() < 1 << 20 {
            return Err(format!(
                "sink {name:?}: max_object_size {} is below 1 MiB; objects that small make the many-small-files problem this sink rolls to avoid",
                self.max_object_size
            ));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("object store {}", self.url)
    }

    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Deliver>, String> {
        let (store, prefix) = self.open()?;
        let ttl = self.lease_ttl.get();
        let lease = (!ttl.is_zero()).then(|| {
            Arc::new(lease::Lease::new(
                store.clone(),
                &prefix,
                ctx.relay,
                ctx.incarnation,
                ttl,
            ))
        });
        let dir = crate::sinks::state::state_dir(ctx.data_dir, ctx.name);
        Ok(Box::new(ObjectWriter {
            name: ctx.name.to_string(),
            lease,
            lease_task: None,
            relay: ctx.relay.to_string(),
            incarnation: ctx.incarnation.to_string(),
            create_only: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            store,
            prefix,
            template: key::KeyTemplate::parse(&self.key_template)?,
            max_age: self.max_object_age.get(),
            lateness: self.allowed_lateness.get().as_secs_f64(),
            clock: ctx.clock,
            stage: stage::Stage::open(
                dir.join("stage"),
                self.max_open_partitions,
                self.max_object_size.as_u64(),
            )?,
            book: hours::HourBook::open(dir.join("hours"))?,
            metrics: ctx.metrics.clone(),
            pending: Vec::new(),
            pending_for: None,
            cut_clock: 0.0,
        }))
    }

    fn read_back<'a>(
        &'a self,
        ctx: &'a ReadBackContext<'a>,
    ) -> BoxFuture<'a, Result<Option<Found>, String>> {
        Box::pin(async move {
            let (store, prefix) = self.open()?;
            let template = key::KeyTemplate::parse(&self.key_template)?;
            readback::read(
                ctx.relay,
                ctx.incarnation,
                store.as_ref(),
                &prefix,
                &self.url,
                &template,
            )
            .await
            .map(Some)
        })
    }
}

impl ObjectSink {
    /// The store and the full key prefix (the URL's path, then `prefix`).
    pub(crate) fn open(&self) -> Result<(Arc<dyn ObjectStore>, String), String> {
        let (store, url_prefix) = open_store(&self.url, &self.options)?;
        let prefix = [url_prefix.as_str(), self.prefix.trim_matches('/')]
            .iter()
            .filter(|p| !p.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("/");
        Ok((store, prefix))
    }
}

/// Opens the store named by `url`. `s3://` also reads the usual `AWS_*` environment
/// variables; keys in `options` win.
pub fn open_store(
    url: &str,
    options: &BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, String), String> {
    configure_store(url, options, true)
}

/// Builds the store for `url` (no request is made); `create` makes a local directory
/// that does not exist yet (the check leaves the disk alone).
pub(crate) fn configure_store(
    url: &str,
    options: &BTreeMap<String, String>,
    create: bool,
) -> Result<(Arc<dyn ObjectStore>, String), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    match parsed.scheme() {
        "file" => {
            let dir = parsed
                .to_file_path()
                .map_err(|_| format!("url {url:?} is not a usable local path"))?;
            if !create {
                if let Some(missing) = dir.ancestors().find(|d| d.exists()).filter(|d| !d.is_dir())
                {
                    return Err(format!(
                        "url {url:?}: {} is not a directory",
                        missing.display()
                    ));
                }
                return Ok((
                    Arc::new(object_store::memory::InMemory::new()),
                    String::new(),
                ));
            }
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            // fsync: an object counted delivered must survive a power loss, since a
            // repeated delivery finds it and does not write it again.
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| format!("local store {}: {e}", dir.display()))?
                .with_fsync(true);
            Ok((Arc::new(store), String::new()))
        }
        "s3" | "s3a" => {
            // Create-only puts (If-None-Match), which S3 and most S3-compatible stores
            // honour; `conditional_put = "disabled"` in options turns them off.
            let mut builder = object_store::aws::AmazonS3Builder::from_env().with_url(url);
            if std::env::var_os("AWS_CONDITIONAL_PUT").is_none() {
                builder = builder
                    .with_config(object_store::aws::AmazonS3ConfigKey::ConditionalPut, "etag");
            }
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
    /// Reads the window of `found` from what every relay wrote under this sink's
    /// prefix, for `reconcile --from --to` ([`readback::read_window`]).
    pub async fn read_window(
        &self,
        deep: bool,
        found: &mut Found,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<readback::ObjectRead, String> {
        let (store, prefix) = self.open()?;
        readback::read_window(store.as_ref(), &prefix, deep, found, progress).await
    }

    /// Writes replayed lines of one (tag, hour) as `replay-<digest>.ndjson.gz` in its
    /// partition folder, and its manifest `_manifests/replay-<digest>.json` (how
    /// `reconcile` finds it); the digest is of `sources`, so the same replay writes the
    /// same keys. Returns the object's key.
    pub async fn put_replay(
        &self,
        tag: &str,
        hour: u64,
        lines: &[u8],
        sources: &BTreeMap<String, sluice_core::ranges::SeqRanges>,
    ) -> Result<String, String> {
        use object_store::{path::PathPart, ObjectStoreExt, PutPayload};
        let (store, prefix) = self.open()?;
        let template = key::KeyTemplate::parse(&self.key_template)?;
        let partition = template.partition(&key::KeyValues {
            prefix: &prefix,
            tag,
            hour,
            relay: "replay",
            incarnation: "",
            first: Default::default(),
            last: Default::default(),
        });
        let described = serde_json::to_vec(sources).map_err(|e| e.to_string())?;
        // FNV-1a: the same seqs give the same name on every machine and run.
        let digest = described.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        let name = format!("replay-{digest:016x}");
        let object: object_store::path::Path = partition
            .parts()
            .chain([PathPart::from(format!("{name}.ndjson.gz"))])
            .collect();
        let manifest: object_store::path::Path = partition
            .parts()
            .chain([
                PathPart::from("_manifests"),
                PathPart::from(format!("{name}.json")),
            ])
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, lines).map_err(|e| e.to_string())?;
        let body = gz.finish().map_err(|e| e.to_string())?;
        let records: u64 = sources
            .values()
            .map(sluice_core::ranges::SeqRanges::len)
            .sum();
        let bytes = body.len();
        store
            .put(&object, PutPayload::from(body))
            .await
            .map_err(|e| format!("put {object}: {e}"))?;
        let doc = serde_json::json!({
            "version": 1,
            "relay": "replay",
            "tag": tag,
            "hour": crate::envelope::hour_label(hour),
            "records": records,
            "objects": [{"key": object.to_string(), "records": records, "bytes": bytes, "sources": sources}],
        });
        store
            .put(&manifest, PutPayload::from(doc.to_string().into_bytes()))
            .await
            .map_err(|e| format!("put {manifest}: {e}"))?;
        Ok(object.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, options: &[(&str, &str)]) -> Result<(), String> {
        let sink: ObjectSink = serde_json::from_value(serde_json::json!({
            "url": url,
            "options": options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }))
        .unwrap();
        sink.validate("archive")
    }

    /// `--check-config` builds the store the way the relay would, without a request: GCS
    /// and Azure are built in, and their mistakes show in the check, naming the sink.
    #[test]
    fn the_check_builds_every_backend() {
        let dir = tempfile::tempdir().unwrap();
        let local = format!("file://{}/not/yet", dir.path().display());
        check(&local, &[]).unwrap();
        assert!(
            !dir.path().join("not").exists(),
            "the check leaves the disk alone"
        );
        check("s3://bucket/logs", &[("region", "eu-west-1")]).unwrap();
        let e = check("s3://bucket", &[("colour", "blue")]).unwrap_err();
        assert!(e.contains("archive") && e.contains("colour"), "{e}");
        check(
            "gs://bucket",
            &[(
                "service_account_key",
                r#"{"private_key": "", "client_email": "x@y"}"#,
            )],
        )
        .map_err(|e| assert!(!e.contains("not enabled"), "{e}"))
        .ok();
        check(
            "az://container",
            &[("account_name", "acct"), ("access_key", "a2V5")],
        )
        .unwrap();
        let e = check("az://container", &[]).unwrap_err();
        assert!(e.contains("archive"), "{e}");
        assert!(!e.contains("not enabled"), "azure is built in: {e}");
    }
}
