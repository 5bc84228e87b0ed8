//! Reads back every object this relay wrote under the sink's prefix (other relays of a
//! cluster write to the same bucket under their own ids), for `reconcile`.

use std::io::Read;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

use super::key::KeyTemplate;
use crate::readback::Found;

/// Whether an object key was written by `relay` in `incarnation`: a key of the sink's
/// template, or one of the layout before templates.
fn written_by(
    template: &KeyTemplate,
    prefix: &str,
    key: &str,
    relay: &str,
    incarnation: Option<&str>,
) -> bool {
    match template.writer_of(prefix, key) {
        Some((id, inc)) => id == relay && incarnation.is_none_or(|mine| mine == inc),
        None => written_by_before_templates(key, relay, incarnation),
    }
}

/// Keys before templates: `.../tag=<tag>/dt=../hour=../<relay>-<incarnation>-<segment>-<offset>[.<copy>].ndjson.gz`.
/// Keys from before incarnations (`<relay>-<segment>-<offset>`) belong to every
/// incarnation of the relay (the spool that wrote them was upgraded, not replaced).
fn written_by_before_templates(key: &str, relay: &str, incarnation: Option<&str>) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    let Some(stem) = name.strip_suffix(".ndjson.gz") else {
        return false;
    };
    // An object written beside an existing key: `.<copy>` before the suffix.
    let stem = match stem.rsplit_once('.') {
        Some((s, copy)) if !copy.is_empty() && copy.bytes().all(|b| b.is_ascii_digit()) => s,
        _ => stem,
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = stem.rsplitn(3, '-');
    let (Some(offset), Some(segment), Some(rest)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    if !digits(offset) || !digits(segment) {
        return false;
    }
    match rest.rsplit_once('-') {
        Some((id, inc)) if crate::incarnation::is_incarnation(inc) => {
            id == relay && incarnation.is_none_or(|mine| mine == inc)
        }
        _ => rest == relay,
    }
}

/// `full` is the key prefix the sink writes under; `url` only names the store in errors.
pub async fn read(
    relay: &str,
    incarnation: Option<&str>,
    store: &dyn ObjectStore,
    full: &str,
    url: &str,
    template: &KeyTemplate,
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
        if !written_by(template, full, meta.location.as_ref(), relay, incarnation) {
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
    use super::*;

    #[test]
    fn keys_of_other_relays_and_incarnations_are_not_read() {
        let template = KeyTemplate::parse(super::super::key::DEFAULT_TEMPLATE).unwrap();
        let inc = "i0123456789abcdef";
        let key = "p/a/dt=2026-11-23/hour=09/relay-1-i0123456789abcdef-0000000003.000000000040-0000000003.000000000099.ndjson.gz";
        assert!(written_by(&template, "p", key, "relay-1", Some(inc)));
        assert!(written_by(&template, "p", key, "relay-1", None));
        assert!(!written_by(
            &template,
            "p",
            key,
            "relay-1",
            Some("i0000000000000000")
        ));
        assert!(!written_by(&template, "p", key, "relay", Some(inc)));
        assert!(!written_by(
            &template,
            "p",
            "p/a/dt=2026-11-23/hour=09/_manifests/relay-1-i0123456789abcdef.r000001.json",
            "relay-1",
            None
        ));
        let key = format!(
            "p/tag=a/dt=2026-11-23/hour=09/relay-1-{inc}-00000000000000000003-000000000042.ndjson.gz"
        );
        assert!(super::written_by_before_templates(
            &key,
            "relay-1",
            Some(inc)
        ));
        assert!(super::written_by_before_templates(&key, "relay-1", None));
        assert!(!super::written_by_before_templates(
            &key,
            "relay-1",
            Some("i0000000000000000")
        ));
        assert!(!super::written_by_before_templates(
            &key,
            "relay",
            Some(inc)
        ));
        let copy = key.replace(".ndjson.gz", ".2.ndjson.gz");
        assert!(super::written_by_before_templates(
            &copy,
            "relay-1",
            Some(inc)
        ));
        // Written before incarnations: this relay's, whatever its incarnation now.
        let old =
            "p/tag=a/dt=2026-11-23/hour=09/relay-1-00000000000000000003-000000000042.ndjson.gz";
        assert!(super::written_by_before_templates(
            old,
            "relay-1",
            Some(inc)
        ));
        assert!(!super::written_by_before_templates(old, "relay", Some(inc)));
        assert!(!super::written_by_before_templates(
            "p/x.json", "relay-1", None
        ));
    }
}
