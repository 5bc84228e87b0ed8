//! `type = "object_store"`: S3, GCS, Azure or a local directory, through `object_store`.
//! gzip NDJSON objects of JSON envelopes, partitioned by tag and *event-time* hour (see
//! `writer.rs` for the keys and why a repeated upload cannot duplicate).

pub mod lease;
mod readback;
mod writer;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};
use sluice_core::units::{ByteSize, Span};

pub use writer::{object_key, partition, ObjectWriter};

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
    /// An object is written when this much (uncompressed) is gathered ...
    #[serde(default = "default_object_size")]
    pub max_object_size: ByteSize,
    /// ... or when the oldest gathered event waited this long. With `server.ack =
    /// "end_to_end"` and `required = true`, an object is also written as soon as an
    /// acknowledgement waits for what is gathered (nothing more to read right then), so
    /// acks never wait for this age.
    #[serde(default = "default_object_age")]
    pub max_object_age: Span,
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
    ByteSize::mib(64)
}
fn default_object_age() -> Span {
    Span::secs(10)
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
        Ok(Box::new(ObjectWriter {
            lease,
            lease_task: None,
            relay: ctx.relay.to_string(),
            incarnation: ctx.incarnation.to_string(),
            create_only: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            store,
            prefix,
            max_bytes: self.max_object_size.as_usize(),
            max_age: self.max_object_age.get(),
        }))
    }

    fn read_back<'a>(
        &'a self,
        ctx: &'a ReadBackContext<'a>,
    ) -> BoxFuture<'a, Result<Option<Found>, String>> {
        Box::pin(async move {
            let (store, prefix) = self.open()?;
            readback::read(
                ctx.relay,
                ctx.incarnation,
                store.as_ref(),
                &prefix,
                &self.url,
            )
            .await
            .map(Some)
        })
    }
}

impl ObjectSink {
    /// The store and the full key prefix (the URL's path, then `prefix`).
    fn open(&self) -> Result<(Arc<dyn ObjectStore>, String), String> {
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
fn configure_store(
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
