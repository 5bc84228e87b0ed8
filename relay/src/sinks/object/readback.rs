//! Reads back every object this relay wrote under the sink's prefix (other relays of a
//! cluster write to the same bucket under their own ids), for `reconcile`.

use std::io::Read;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::readback::Found;

/// Whether an object key was written by `relay` (`.../<relay>-<segment>-<offset>.ndjson.gz`).
fn written_by(key: &str, relay: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    let Some(stem) = name.strip_suffix(".ndjson.gz") else {
        return false;
    };
    let mut parts = stem.rsplitn(3, '-');
    let (Some(offset), Some(segment), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    id == relay
        && !offset.is_empty()
        && offset.bytes().all(|b| b.is_ascii_digit())
        && segment.bytes().all(|b| b.is_ascii_digit())
}

/// `full` is the key prefix the sink writes under; `url` only names the store in errors.
pub async fn read(
    relay: &str,
    store: &dyn ObjectStore,
    full: &str,
    url: &str,
) -> Result<Found, String> {
    let list_prefix = object_store::path::Path::from(full);
    let objects: Vec<_> = store
        .list(if full.is_empty() {
            None
        } else {
            Some(&list_prefix)
        })
        .try_collect()
        .await
        .map_err(|e| format!("listing {url}: {e}"))?;
    let mut found = Found::default();
    let mut text = Vec::new();
    for meta in objects {
        if !written_by(meta.location.as_ref(), relay) {
            continue;
        }
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(|e| format!("get {}: {e}", meta.location))?
            .bytes()
            .await
            .map_err(|e| format!("read {}: {e}", meta.location))?;
        text.clear();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut text)
            .map_err(|e| format!("{} is not valid gzip: {e}", meta.location))?;
        found.add_ndjson(&text);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_of_other_relays_are_not_read() {
        let key =
            "p/tag=a/dt=2026-11-23/hour=09/relay-1-00000000000000000003-000000000042.ndjson.gz";
        assert!(super::written_by(key, "relay-1"));
        assert!(!super::written_by(key, "relay"));
        assert!(!super::written_by("p/x.json", "relay-1"));
    }
}
