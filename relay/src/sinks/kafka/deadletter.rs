//! Events Kafka cannot take (larger than the topic's max.message.bytes) are kept in a
//! dead-letter location, an object store: one JSON object per event with the reason,
//! the destination it missed and the whole envelope (time, tag, source, seq, record).
//!
//! Keys are deterministic, so a delivery repeated after a crash writes the same object
//! again rather than a second one:
//! `<prefix>/dead-letters/<sink>/<tag>/dt=YYYY-MM-DD/hour=HH/<relay>-<source>-<seq>.json`
//! (`<relay>-<client>-<source>-<seq>.json` when the sender authenticated as `<client>`;
//! an event without provenance: `<relay>-at-<spool position>-<index>.json`). Each part
//! is percent-encoded.
//!
//! A dead letter that cannot be written fails the delivery, which is retried: the event
//! stays in the spool rather than being lost. With the default local directory this
//! only happens when the relay's own disk fails.

use std::sync::Arc;

use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sluice_forward::EventTime;
use sluice_spool::Position;

use crate::envelope;

pub struct DeadLetters {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    sink: String,
    relay: String,
    /// Where they go, as the log says it.
    pub location: String,
}

/// One event Kafka refused, and why.
pub struct Letter<'a> {
    /// `too_large`.
    pub reason: &'static str,
    pub detail: &'a str,
    pub topic: &'a str,
    pub time: EventTime,
    pub tag: &'a str,
    /// The authenticated client that sent it, if any (part of the key: two clients may
    /// send the same source id).
    pub namespace: Option<&'a str>,
    pub source: Option<&'a str>,
    pub mark: crate::record::Mark,
    pub record: &'a [u8],
    /// The gathering's start and the event's index in it (the key of an event without
    /// provenance).
    pub at: (Position, usize),
}

impl DeadLetters {
    /// `url` empty: the local directory `<data_dir>/dead-letters/`.
    pub fn new(
        url: &str,
        options: &std::collections::BTreeMap<String, String>,
        data_dir: &std::path::Path,
        sink: &str,
        relay: &str,
    ) -> Result<DeadLetters, String> {
        let url = if url.is_empty() {
            // The data directory is the store: letters land in `<data_dir>/dead-letters/`.
            let dir = data_dir
                .canonicalize()
                .map_err(|e| format!("{}: {e}", data_dir.display()))?;
            url::Url::from_directory_path(&dir)
                .map_err(|_| format!("{} is not an absolute path", dir.display()))?
                .to_string()
        } else {
            url.to_string()
        };
        let (store, prefix) = crate::sinks::object::configure_store(&url, options, true)
            .map_err(|e| format!("dead_letter_url: {e}"))?;
        Ok(DeadLetters {
            store,
            prefix,
            sink: sink.to_string(),
            relay: relay.to_string(),
            location: format!("{}/dead-letters/{sink}/", url.trim_end_matches('/')),
        })
    }

    /// Checks only: builds the store as the relay would, without a request.
    pub fn check(
        url: &str,
        options: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), String> {
        if url.is_empty() {
            return Ok(());
        }
        crate::sinks::object::configure_store(url, options, false)
            .map(|_| ())
            .map_err(|e| format!("dead_letter_url: {e}"))
    }

    pub fn key(&self, letter: &Letter<'_>) -> Path {
        let (dt, hour) = crate::sinks::object::key::date_and_hour(envelope::hour_of(letter.time));
        let name = match (letter.namespace, letter.source, letter.mark.seq) {
            (None, Some(source), Some(seq)) => format!("{}-{source}-{seq}.json", self.relay),
            (Some(client), Some(source), Some(seq)) => {
                format!("{}-{client}-{source}-{seq}.json", self.relay)
            }
            _ => format!(
                "{}-at-{}.{}-{}.json",
                self.relay, letter.at.0.segment, letter.at.0.offset, letter.at.1
            ),
        };
        let prefix = self.prefix.split('/').filter(|p| !p.is_empty());
        let parts = prefix
            .map(PathPart::from)
            .chain([
                PathPart::from("dead-letters"),
                PathPart::from(self.sink.as_str()),
                PathPart::from(letter.tag),
                PathPart::from(format!("dt={dt}")),
                PathPart::from(format!("hour={hour}")),
                PathPart::from(name),
            ])
            .collect::<Vec<_>>();
        Path::from_iter(parts)
    }

    /// Writes the letter; returns its key.
    pub async fn keep(&self, letter: &Letter<'_>) -> Result<Path, String> {
        let mut body = Vec::with_capacity(letter.record.len() + 512);
        body.extend_from_slice(b"{\"reason\":");
        serde_json::to_writer(&mut body, letter.reason).map_err(|e| e.to_string())?;
        body.extend_from_slice(b",\"detail\":");
        serde_json::to_writer(&mut body, letter.detail).map_err(|e| e.to_string())?;
        body.extend_from_slice(b",\"sink\":");
        serde_json::to_writer(&mut body, &self.sink).map_err(|e| e.to_string())?;
        body.extend_from_slice(b",\"topic\":");
        serde_json::to_writer(&mut body, letter.topic).map_err(|e| e.to_string())?;
        body.extend_from_slice(b",\"relay\":");
        serde_json::to_writer(&mut body, &self.relay).map_err(|e| e.to_string())?;
        body.extend_from_slice(b",\"event\":");
        envelope::write(
            &mut body,
            letter.time,
            letter.tag,
            letter.source,
            letter.mark,
            letter.record,
        )
        .map_err(|e| e.to_string())?;
        body.extend_from_slice(b"}\n");
        let key = self.key(letter);
        self.store
            .put(&key, PutPayload::from(body))
            .await
            .map_err(|e| format!("writing the dead letter {key}: {e}"))?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_letter_is_kept_with_its_reason_and_provenance_under_a_stable_key() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetters::new("", &Default::default(), dir.path(), "kafka", "relay-1").unwrap();
        let mut record = Vec::new();
        sluice_forward::write_entry(&mut record, EventTime::from_unix_nanos(0), &[("m", b"x")]);
        // write_entry writes [time, record]: the record is after the array and time heads.
        let record = &record[record.len() - 5..];
        let letter = Letter {
            reason: "too_large",
            detail: "3000000 bytes, the limit is 1048576",
            topic: "logs",
            time: EventTime::from_unix_nanos(1_764_000_000_000_000_000),
            tag: "a/b",
            namespace: None,
            source: Some("web-1:app"),
            mark: crate::record::Mark::seq(42),
            record,
            at: (Position::default(), 0),
        };
        let key = dl.keep(&letter).await.unwrap();
        assert_eq!(dl.keep(&letter).await.unwrap(), key, "the same key again");
        let text = key.to_string();
        assert!(text.starts_with("dead-letters/kafka/a%2Fb/dt="), "{text}");
        assert!(
            text.ends_with("/relay-1-web-1:app-42.json") || text.contains("relay-1-web-1"),
            "{text}"
        );
        let files: Vec<_> = walk(dir.path());
        assert_eq!(files.len(), 1, "{files:?}");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
        assert_eq!(v["reason"], "too_large");
        assert_eq!(v["event"]["seq"], 42);
        assert_eq!(v["event"]["source"], "web-1:app");
        assert_eq!(v["event"]["record"]["m"], "x");
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
