//! Reads back every object this relay wrote under the sink's prefix (other relays of a
//! cluster write to the same bucket under their own ids), for `reconcile`.

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
        add_gzip_object(store, &meta.location, &mut found, &mut text).await?;
    }
    Ok(found)
}

/// Adds the lines of a gzip NDJSON object (every member) to `found`, inflated as it
/// streams in ([`inflate_lines`]).
async fn add_gzip_object(
    store: &dyn ObjectStore,
    location: &object_store::path::Path,
    found: &mut Found,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    inflate_lines(store, location, buf, &mut |text| found.add_ndjson(text)).await
}

/// Hands `each` the lines of a gzip NDJSON object (every member), each line without its
/// newline, inflated as it streams in as [`add_gzip_object`] does.
pub async fn each_line(
    store: &dyn ObjectStore,
    location: &object_store::path::Path,
    buf: &mut Vec<u8>,
    each: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<(), String> {
    inflate_lines(store, location, buf, &mut |text| {
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            each(line);
        }
    })
    .await
}

/// Inflates a gzip NDJSON object as it streams in, handing `each` runs of whole lines:
/// memory is a piece of the download and `buf` (the inflated text of a piece and a line
/// cut by it), not the object, compressed or not.
async fn inflate_lines(
    store: &dyn ObjectStore,
    location: &object_store::path::Path,
    buf: &mut Vec<u8>,
    each: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<(), String> {
    use std::io::Write;
    // Compressed bytes inflated at a time: even a gzip bomb's piece inflates to a bounded
    // size (deflate expands at most about 1,000 times), realistic logs to some 100 KiB.
    const PIECE: usize = 16 * 1024;
    let mut stream = store
        .get(location)
        .await
        .map_err(|e| format!("get {location}: {e}"))?
        .into_stream();
    buf.clear();
    let mut inflate = flate2::write::MultiGzDecoder::new(std::mem::take(buf));
    let bad = |e: std::io::Error| format!("{location} is not valid gzip: {e}");
    // The complete lines now; a line cut by the piece waits for the next one.
    let mut lines = |text: &mut Vec<u8>| {
        if let Some(end) = text.iter().rposition(|&b| b == b'\n') {
            each(&text[..=end]);
            text.drain(..=end);
        }
    };
    while let Some(bytes) = stream
        .try_next()
        .await
        .map_err(|e| format!("read {location}: {e}"))?
    {
        for piece in bytes.chunks(PIECE) {
            inflate.write_all(piece).map_err(bad)?;
            lines(inflate.get_mut());
        }
    }
    inflate.try_finish().map_err(bad)?;
    let mut rest = inflate.finish().map_err(bad)?;
    lines(&mut rest);
    each(&rest);
    rest.clear();
    *buf = rest;
    Ok(())
}

/// An object a manifest lists that is not in the store any more.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MissingObject {
    pub key: String,
    pub relay: String,
    pub tag: String,
    pub hour: u64,
    pub records: u64,
    /// Its seqs per source, as its manifest lists them.
    pub sources: std::collections::BTreeMap<String, sluice_core::ranges::SeqRanges>,
}

/// What reading a window of object storage found besides the events.
#[derive(Debug, Default)]
pub struct ObjectRead {
    /// Relays (`relay.id`) with an hour marker, per hour: they announced the hour.
    pub announced: std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>,
    /// Events that arrived after their hour closed, per (tag, hour), from the manifests.
    pub late: crate::ledger::Counts,
    pub manifests: u64,
    pub objects_read: u64,
    pub missing: Vec<MissingObject>,
    /// The relays' published ledgers ([`super::published`]), per (tag, hour), summed
    /// over the relays; empty when no relay published one.
    pub ledgers: std::collections::BTreeMap<(String, u64), LedgerCell>,
    pub ledgers_read: u64,
    /// Per hour, the relays (`relay.id`) that published a ledger of it.
    pub ledger_relays: std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>,
}

/// What every relay's published ledger says of one (tag, hour).
#[derive(Debug, Default)]
pub struct LedgerCell {
    pub received: u64,
    /// Per sink, events an earlier incarnation of a relay had offered and not delivered
    /// or dropped: its spool is gone (the relay's data directory was lost), so they are
    /// lost, not still on their way.
    pub lost: std::collections::BTreeMap<String, u64>,
    pub sinks: std::collections::BTreeMap<String, super::published::SinkFigures>,
    pub received_seqs: std::collections::BTreeMap<String, sluice_core::ranges::SeqRanges>,
    pub agents: std::collections::BTreeMap<String, sluice_core::ranges::SeqRanges>,
}

async fn get_json(store: &dyn ObjectStore, path: &str) -> Result<serde_json::Value, String> {
    let location = object_store::path::Path::from(path);
    let bytes = store
        .get(&location)
        .await
        .map_err(|e| format!("get {path}: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("read {path}: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{path} is not JSON: {e}"))
}

async fn list(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<object_store::ObjectMeta>, String> {
    let p = object_store::path::Path::from(prefix);
    store
        .list(if prefix.is_empty() { None } else { Some(&p) })
        .try_collect()
        .await
        .map_err(|e| format!("listing {prefix}: {e}"))
}

/// The hour of a key made by a template with `dt=YYYY-MM-DD/hour=HH` folders, if it has them.
fn hour_of_key(key: &str) -> Option<u64> {
    let parts: Vec<&str> = key.split('/').collect();
    parts.windows(2).find_map(|w| {
        let dt = w[0].strip_prefix("dt=")?;
        let hh = w[1].strip_prefix("hour=")?;
        crate::envelope::parse_hour_label(&format!("{dt}T{hh}"))
    })
}

/// `a/b`, or `b` when `a` is empty.
fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}/{b}")
    }
}

/// A manifest an hour marker names: (hour, tag, relay, key).
type Named = (u64, String, String, String);

/// The hour markers of `from..to` under `full`: which relays announced each hour (into
/// `announced`), and the manifests they name.
async fn markers(
    store: &dyn ObjectStore,
    full: &str,
    from: u64,
    to: u64,
    announced: &mut std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>,
) -> Result<Vec<Named>, String> {
    let mut manifests = Vec::new();
    for hour in from..to {
        let (dt, hh) = super::key::date_and_hour(hour);
        let folder = join(full, &format!("_sluice/hours/dt={dt}/hour={hh}"));
        for meta in list(store, &folder).await? {
            let marker = get_json(store, meta.location.as_ref()).await?;
            let relay = marker["relay"].as_str().unwrap_or("?").to_string();
            announced.entry(hour).or_default().insert(relay.clone());
            if let Some(tags) = marker["tags"].as_object() {
                for (tag, t) in tags {
                    if let Some(m) = t["manifest"].as_str() {
                        manifests.push((hour, tag.clone(), relay.clone(), m.to_string()));
                    }
                }
            }
        }
    }
    Ok(manifests)
}

/// The keys in a partition folder (one listing), and the manifests `sluice-relay
/// replay` wrote there for its own objects (`_manifests/replay-<digest>.json`).
async fn list_partition(
    store: &dyn ObjectStore,
    partition: &str,
) -> Result<(std::collections::HashSet<String>, Vec<serde_json::Value>), String> {
    let keys: std::collections::HashSet<String> = list(store, partition)
        .await?
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    let mut replays = Vec::new();
    for k in &keys {
        let name = k.rsplit('/').next().unwrap_or_default();
        if k.contains("/_manifests/") && name.starts_with("replay-") && name.ends_with(".json") {
            replays.push(get_json(store, k).await?);
        }
    }
    Ok((keys, replays))
}

/// The seqs wanted: per (tag, hour), per source.
pub type Wanted = std::collections::BTreeMap<
    (String, u64),
    std::collections::BTreeMap<String, sluice_core::ranges::SeqRanges>,
>;

/// The keys of the objects that hold any of `wanted`, by the manifests of the hours'
/// markers and those `sluice-relay replay` wrote beside them (each object listed with
/// its seqs per source), in key order. An object listed but gone is passed over.
pub async fn objects_holding(
    store: &dyn ObjectStore,
    full: &str,
    wanted: &Wanted,
) -> Result<Vec<String>, String> {
    let hours: std::collections::BTreeSet<u64> = wanted.keys().map(|(_, h)| *h).collect();
    let mut keys = std::collections::BTreeSet::new();
    // Per partition folder, the keys in it (one listing each).
    let mut listed: std::collections::HashMap<String, std::collections::HashSet<String>> =
        Default::default();
    for hour in hours {
        let mut announced = Default::default();
        for (hour, tag, _, path) in markers(store, full, hour, hour + 1, &mut announced).await? {
            let Some(want) = wanted.get(&(tag, hour)) else {
                continue;
            };
            let mut docs = vec![get_json(store, &path).await?];
            // `<partition>/_manifests/<name>.json`: the objects are in `<partition>`, and
            // replayed objects have their manifests beside the relays'.
            let partition = path.rsplitn(3, '/').nth(2).unwrap_or_default().to_string();
            if !listed.contains_key(&partition) {
                let (present, replays) = list_partition(store, &partition).await?;
                docs.extend(replays);
                listed.insert(partition.clone(), present);
            }
            let present = &listed[&partition];
            for o in docs
                .iter()
                .flat_map(|m| m["objects"].as_array().into_iter().flatten())
            {
                let sources: std::collections::BTreeMap<String, sluice_core::ranges::SeqRanges> =
                    serde_json::from_value(o["sources"].clone()).unwrap_or_default();
                let holds = sources.iter().any(|(source, seqs)| {
                    want.get(source)
                        .is_some_and(|w| w.minus(seqs).len() < w.len())
                });
                match o["key"].as_str() {
                    Some(key) if holds && present.contains(key) => {
                        keys.insert(key.to_string());
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(keys.into_iter().collect())
}

/// Reads what every relay of a cluster wrote under the sink's prefix `full` for the hours
/// of `found`'s window, into `found`.
///
/// By manifests (`deep = false`): the hour markers of every relay, the manifests they
/// name (each object with its seqs per source), and one listing per partition folder to
/// see that every object listed is still there: an object gone is reported in
/// [`ObjectRead::missing`] with its seqs, and not counted. With `deep`, every object of
/// the window is read and its lines counted instead.
pub async fn read_window(
    store: &dyn ObjectStore,
    full: &str,
    deep: bool,
    found: &mut Found,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ObjectRead, String> {
    let (from, to) = found.window.ok_or("a window is needed")?;
    let mut read = ObjectRead::default();
    let manifests = markers(store, full, from, to, &mut read.announced).await?;
    // Each relay's incarnation now, from its lease (`super::lease`): a ledger of another
    // incarnation is of a spool that is gone (the relay's data directory was lost).
    let mut now: std::collections::HashMap<String, String> = Default::default();
    for meta in list(store, &join(full, "_sluice/relays")).await? {
        let path = meta.location.as_ref();
        if let Ok(l) =
            serde_json::from_value::<super::lease::LeaseDoc>(get_json(store, path).await?)
        {
            now.insert(l.relay, l.incarnation);
        }
    }
    for hour in from..to {
        for meta in list(store, &super::published::folder(full, hour)).await? {
            let path = meta.location.as_ref();
            let doc: super::published::HourLedger =
                serde_json::from_value(get_json(store, path).await?)
                    .map_err(|e| format!("{path} is not a sluice ledger: {e}"))?;
            if doc.version != 1 {
                return Err(format!(
                    "{path}: ledger version {} (this reconcile reads version 1: upgrade it)",
                    doc.version
                ));
            }
            read.ledger_relays
                .entry(hour)
                .or_default()
                .insert(doc.relay.clone());
            read.ledgers_read += 1;
            for (tag, t) in doc.tags {
                if !found.wanted(&tag, hour) {
                    continue;
                }
                let c = read.ledgers.entry((tag, hour)).or_default();
                c.received += t.received;
                let gone = now.get(&doc.relay).is_some_and(|i| *i != doc.incarnation);
                for (sink, f) in t.sinks {
                    if gone {
                        *c.lost.entry(sink.clone()).or_default() +=
                            f.offered.saturating_sub(f.delivered + f.dropped);
                    }
                    let s = c.sinks.entry(sink).or_default();
                    s.offered += f.offered;
                    s.delivered += f.delivered;
                    s.dropped += f.dropped;
                }
                for (source, seqs) in t.received_seqs {
                    c.received_seqs.entry(source).or_default().union(&seqs);
                }
                for (source, seqs) in t.agents {
                    c.agents.entry(source).or_default().union(&seqs);
                }
            }
        }
    }
    if deep {
        let objects: Vec<_> = list(store, full)
            .await?
            .into_iter()
            .filter(|m| m.location.as_ref().ends_with(".ndjson.gz"))
            .filter(|m| hour_of_key(m.location.as_ref()).is_none_or(|h| (from..to).contains(&h)))
            .collect();
        let total = objects.len() as u64;
        let mut text = Vec::new();
        for meta in objects {
            add_gzip_object(store, &meta.location, found, &mut text).await?;
            read.objects_read += 1;
            progress(read.objects_read, total);
        }
        for (hour, tag, _, path) in &manifests {
            if found.wanted(tag, *hour) {
                let m = get_json(store, path).await?;
                read.manifests += 1;
                read.late
                    .add(tag, *hour, m["late_records"].as_u64().unwrap_or(0));
            }
        }
        return Ok(read);
    }
    let mut listed: std::collections::HashMap<String, std::collections::HashSet<String>> =
        Default::default();
    let total = manifests.len() as u64;
    for (i, (hour, tag, relay, path)) in manifests.iter().enumerate() {
        progress(i as u64 + 1, total);
        if !found.wanted(tag, *hour) {
            continue;
        }
        let m = get_json(store, path).await?;
        read.manifests += 1;
        read.late
            .add(tag, *hour, m["late_records"].as_u64().unwrap_or(0));
        // `<partition>/_manifests/<name>.json`: the objects are in `<partition>`.
        let partition = path.rsplitn(3, '/').nth(2).unwrap_or_default().to_string();
        let mut docs = vec![(relay.clone(), m)];
        if !listed.contains_key(&partition) {
            let (keys, replays) = list_partition(store, &partition).await?;
            read.manifests += replays.len() as u64;
            docs.extend(replays.into_iter().map(|m| ("replay".to_string(), m)));
            listed.insert(partition.clone(), keys);
        }
        let present = &listed[&partition];
        for (relay, m) in &docs {
            for o in m["objects"].as_array().into_iter().flatten() {
                let key = o["key"].as_str().unwrap_or_default().to_string();
                let records = o["records"].as_u64().unwrap_or(0);
                let sources: std::collections::BTreeMap<String, sluice_core::ranges::SeqRanges> =
                    serde_json::from_value(o["sources"].clone()).unwrap_or_default();
                if !present.contains(&key) {
                    read.missing.push(MissingObject {
                        key,
                        relay: relay.clone(),
                        tag: tag.clone(),
                        hour: *hour,
                        records,
                        sources,
                    });
                    continue;
                }
                let mut attributed = 0;
                for (source, ranges) in &sources {
                    found.add_ranges(tag, *hour, source, ranges);
                    attributed += ranges.len();
                }
                // Records without provenance (Fluentd clients), or a manifest from before
                // objects listed their seqs: counted, not placed.
                for _ in attributed..records {
                    found.add_event(tag, *hour, None, None);
                }
            }
        }
    }
    // An object gone whose events are all in the bucket again (replayed) is no loss.
    // One without seqs (an older manifest, events without provenance) stays reported.
    read.missing.retain(|m| {
        let listed: u64 = m
            .sources
            .values()
            .map(sluice_core::ranges::SeqRanges::len)
            .sum();
        listed < m.records
            || m.sources.iter().any(|(source, seqs)| {
                let have = found
                    .seqs
                    .get(&m.tag)
                    .and_then(|h| h.get(&m.hour))
                    .and_then(|s| s.get(source))
                    .map(|s| s.found.clone())
                    .unwrap_or_default();
                !seqs.minus(&have).is_empty()
            })
    });
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger of an incarnation the relay no longer runs (its lease names another):
    /// what it had offered and not delivered is lost with its spool, not on its way;
    /// without a lease it is taken as still on its way.
    #[tokio::test]
    async fn a_replaced_incarnations_undelivered_events_are_lost() {
        use super::super::published::{folder, HourLedger, SinkFigures, TagFigures};
        let store = object_store::memory::InMemory::new();
        let hour = crate::envelope::parse_hour_label("2026-11-23T09").unwrap();
        let put = |key: String, v: serde_json::Value| {
            let store = &store;
            async move {
                store
                    .put(
                        &object_store::path::Path::from(key.as_str()),
                        object_store::PutPayload::from(v.to_string().into_bytes()),
                    )
                    .await
                    .unwrap();
            }
        };
        let mut tags = std::collections::BTreeMap::new();
        let mut t = TagFigures {
            received: 10,
            ..TagFigures::default()
        };
        t.sinks.insert(
            "kafka".into(),
            SinkFigures {
                offered: 10,
                delivered: 4,
                dropped: 0,
            },
        );
        tags.insert("app".to_string(), t);
        let doc = HourLedger {
            version: 1,
            relay: "r".into(),
            incarnation: "i1".into(),
            hour: "2026-11-23T09".into(),
            tags,
        };
        put(
            format!("{}/r-i1.json", folder("p", hour)),
            serde_json::to_value(&doc).unwrap(),
        )
        .await;
        let read = |store: &object_store::memory::InMemory| {
            let mut found = Found {
                window: Some((hour, hour + 1)),
                ..Found::default()
            };
            let store = store.clone();
            async move {
                read_window(&store, "p", false, &mut found, &mut |_, _| {})
                    .await
                    .unwrap()
            }
        };
        let cell = |r: &ObjectRead| r.ledgers[&("app".to_string(), hour)].lost.clone();
        assert!(
            cell(&read(&store).await).is_empty(),
            "no lease of the relay"
        );
        let lease = |incarnation: &str| {
            serde_json::to_value(super::super::lease::LeaseDoc {
                relay: "r".into(),
                incarnation: incarnation.into(),
                host: "h".into(),
                pid: 1,
                started_at: 0,
                renewed_at: 0,
                ttl_secs: 60,
                stopped: false,
            })
            .unwrap()
        };
        put("p/_sluice/relays/r.json".into(), lease("i1")).await;
        assert!(
            cell(&read(&store).await).is_empty(),
            "the incarnation it runs"
        );
        put("p/_sluice/relays/r.json".into(), lease("i2")).await;
        assert_eq!(cell(&read(&store).await)["kafka"], 6);
    }

    /// Every line of every gzip member, whole, however the download and the pieces cut
    /// them; the last line may lack its newline.
    #[tokio::test]
    async fn lines_of_a_streamed_multi_member_object_come_whole() {
        use std::io::Write;
        let store = object_store::memory::InMemory::new();
        let lines: Vec<String> = (0..20_000)
            .map(|i| format!("{{\"message\":\"line {i} {}\"}}", "x".repeat(i % 97)))
            .collect();
        let mut body = Vec::new();
        for (m, member) in lines.chunks(7_000).enumerate() {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let mut text = member.join("\n");
            if m < 2 {
                text.push('\n');
            }
            gz.write_all(text.as_bytes()).unwrap();
            body.extend(gz.finish().unwrap());
        }
        let location = object_store::path::Path::from("p/a.ndjson.gz");
        store
            .put(&location, object_store::PutPayload::from(body))
            .await
            .unwrap();
        let mut got = Vec::new();
        each_line(&store, &location, &mut Vec::new(), &mut |l| {
            got.push(String::from_utf8(l.to_vec()).unwrap())
        })
        .await
        .unwrap();
        assert_eq!(got, lines);
    }

    #[test]
    fn hours_are_read_off_keys_with_dt_and_hour_folders() {
        let key = "p/a/dt=2026-11-23/hour=09/relay-1-x.ndjson.gz";
        assert_eq!(
            hour_of_key(key),
            crate::envelope::parse_hour_label("2026-11-23T09")
        );
        assert_eq!(hour_of_key("p/a/relay-1-x.ndjson.gz"), None);
    }

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
