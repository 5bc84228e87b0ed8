//! The payload of one spool batch: one accepted chunk, after dedup trimming.
//!
//! Layout (all integers little-endian), version 1:
//!
//! ```text
//! u8  version = 1
//! u64 received_at (unix nanos)
//! u16 tag length,    tag bytes (UTF-8)
//! u16 source length, source bytes (0 = the sender gave no provenance)
//! u16 namespace length, namespace bytes    (version 2 only, see below)
//! u32 count of entries
//! u64 * count        seqs (only when source length > 0)
//! u32 entries length, entries (msgpack [EventTime, record] pairs, as the codec normalised them)
//! ```
//!
//! Version 2 adds the dedup namespace: the authenticated client that sent a source id
//! not its own (`server.bind_sources = false`), so that one client's claims cannot
//! touch another's dedup marks, across restarts too.
//!
//! Version 3 (what this relay writes) always has the namespace length (0 = none) and
//! ends with the entries' event-time hours, counted when the codec validated them:
//!
//! ```text
//! u16 runs, (u64 hour since the epoch, u32 entries) * runs   (consecutive entries of one hour)
//! ```
//!
//! so that every sink's count of what it was offered per (tag, hour), and recovery's
//! count of what was received, read the runs instead of parsing every entry again
//! (a full msgpack pass per sink: about a sixth of a discard relay's CPU). `runs = 0`
//! for a chunk whose hours were not counted (then they are parsed, as for versions 1
//! and 2, which this relay still reads; so are runs that do not add up to the count).
//! A relay older than version 3 cannot read these records: drain the spool before a
//! downgrade.
//!
//! Version 4 (what this relay writes) adds, after the hour runs, the byte offset each
//! entry began at in its file (sluice agents send them for events read from files):
//!
//! ```text
//! u32 offsets (0 or count), u64 * offsets
//! ```
//!
//! A relay before version 4 cannot read it either.
//!
//! A fixed binary layout rather than msgpack/serde so that recovery (which reads the
//! source and the last seq of every batch to rebuild the dedup table) and the sinks can
//! borrow everything from the read buffer without allocating.

use sluice_forward::{Entry, EventBatch, EventTime};

pub const VERSION: u8 = 1;
/// The version of records that carry a dedup namespace.
pub const VERSION_NAMESPACED: u8 = 2;
/// The namespace length always, and hour runs.
pub const VERSION_HOURS: u8 = 3;
/// The version this relay writes: version 3 and the entries' byte offsets.
pub const VERSION_OFFSETS: u8 = 4;
/// Bytes of one hour run: u64 hour, u32 entries.
const RUN_BYTES: usize = 12;

/// The dedup namespace of a chunk of `source` from `client` (the name it authenticated
/// as): None when the source is the client's own (`{client}:...`) or the client is
/// anonymous, so the marks of sluice agents are keyed by their source id alone.
pub fn namespace<'a>(client: Option<&'a str>, source: &str) -> Option<&'a str> {
    let client = client?;
    (!owns(client, source)).then_some(client)
}

/// Whether `source` is one of `client`'s own: it begins with `{client}:`, as a sluice
/// agent's source ids begin with its `agent.id` (its PING hostname).
pub fn owns(client: &str, source: &str) -> bool {
    source
        .strip_prefix(client)
        .is_some_and(|rest| rest.starts_with(':'))
}

/// The key dedup keeps a source's mark under.
pub fn dedup_key<'a>(namespace: Option<&str>, source: &'a str) -> std::borrow::Cow<'a, str> {
    match namespace {
        None => source.into(),
        Some(ns) => format!("{ns}\u{0}{source}").into(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("spool record: {0}")]
pub struct RecordError(pub String);

/// One spooled chunk, borrowed from a read buffer.
#[derive(Debug, Clone, Copy)]
pub struct SpooledChunk<'a> {
    pub received_at: u64,
    pub tag: &'a str,
    pub source: Option<&'a str>,
    /// See [`namespace`].
    pub namespace: Option<&'a str>,
    pub count: u32,
    seqs: &'a [u8],
    pub entries: &'a [u8],
    /// Hour runs (`RUN_BYTES` each) that add up to `count`, or empty: parse the entries.
    hours: &'a [u8],
    /// `count` u64 byte offsets, or empty.
    offsets: &'a [u8],
}

pub use crate::envelope::Mark;

impl<'a> SpooledChunk<'a> {
    pub fn seq(&self, i: usize) -> Option<u64> {
        let b = self.seqs.get(i * 8..i * 8 + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// The byte offset entry `i` began at in its file, if the sender gave offsets.
    pub fn offset(&self, i: usize) -> Option<u64> {
        let b = self.offsets.get(i * 8..i * 8 + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// The seq and offset of entry `i`.
    pub fn mark(&self, i: usize) -> Mark {
        Mark {
            seq: self.seq(i),
            offset: self.offset(i),
        }
    }

    /// The key of this chunk's source in the dedup table.
    pub fn dedup_key(&self) -> Option<std::borrow::Cow<'a, str>> {
        Some(dedup_key(self.namespace, self.source?))
    }

    /// The last entry's dedup mark: its byte offset when the sender gave offsets, else
    /// its seq (see `Provenance::dedup_marks`).
    pub fn last_mark(&self) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let last = self.count as usize - 1;
        self.offset(last).or_else(|| self.seq(last))
    }

    pub fn last_seq(&self) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        self.seq(self.count as usize - 1)
    }

    /// Calls `add(hour, n)` for the events of this chunk per event-time hour (hours since
    /// the epoch); entries that do not decode are left out. Chunks rarely span hours, so
    /// this is one call per run of equal hours, not one per event.
    pub fn count_hours(&self, mut add: impl FnMut(u64, u64)) {
        if !self.hours.is_empty() {
            for run in self.hours.chunks_exact(RUN_BYTES) {
                let hour = u64::from_le_bytes(run[..8].try_into().expect("8 bytes"));
                let n = u32::from_le_bytes(run[8..].try_into().expect("4 bytes"));
                add(hour, u64::from(n));
            }
            return;
        }
        let mut run: Option<(u64, u64)> = None;
        for event in self.events() {
            let Ok((entry, _)) = event else { continue };
            let hour = crate::envelope::hour_of(entry.time);
            match &mut run {
                Some((h, n)) if *h == hour => *n += 1,
                _ => {
                    if let Some((h, n)) = run {
                        add(h, n);
                    }
                    run = Some((hour, 1));
                }
            }
        }
        if let Some((h, n)) = run {
            add(h, n);
        }
    }

    /// Appends the JSON envelope of one of this chunk's events and a newline: one
    /// NDJSON line, as Kafka, object storage and the file sink write it.
    pub fn write_envelope_line(
        &self,
        out: &mut Vec<u8>,
        entry: &Entry<'_>,
        mark: Mark,
    ) -> Result<(), sluice_forward::DecodeError> {
        crate::envelope::write(out, entry.time, self.tag, self.source, mark, entry.record)?;
        out.push(b'\n');
        Ok(())
    }

    /// Iterates the entries with their seq and offset (None when the sender gave none).
    pub fn events(&self) -> impl Iterator<Item = Result<(Entry<'a>, Mark), RecordError>> + '_ {
        let mut entries = sluice_forward::EntryIter::new(self.entries);
        let mut i = 0usize;
        std::iter::from_fn(move || {
            let next = entries.next()?;
            let seq = self.mark(i);
            i += 1;
            Some(
                next.map(|e| (e, seq))
                    .map_err(|e| RecordError(format!("entry {}: {e}", i - 1))),
            )
        })
    }
}

/// Appends the record for `batch`, keeping only its entries from `skip` on (the ones
/// dedup did not trim). `entries_from` is the byte offset of entry `skip` in
/// `batch.entries`. `namespace` is the chunk's dedup namespace ([`namespace`]).
pub fn encode(
    out: &mut Vec<u8>,
    received_at: EventTime,
    batch: &EventBatch,
    namespace: Option<&str>,
    skip: usize,
    entries_from: usize,
) -> Result<(), RecordError> {
    let tag = batch.tag.as_bytes();
    let prov = batch.options.provenance.as_ref();
    let source = prov.map(|p| p.source.as_bytes()).unwrap_or_default();
    let namespace = namespace
        .filter(|_| !source.is_empty())
        .unwrap_or_default()
        .as_bytes();
    if tag.len() > u16::MAX as usize
        || source.len() > u16::MAX as usize
        || namespace.len() > u16::MAX as usize
    {
        return Err(RecordError(
            "tag or source id longer than 65535 bytes".into(),
        ));
    }
    let count = batch.count - skip;
    let entries = &batch.entries[entries_from..];
    let offsets = prov
        .filter(|p| !source.is_empty() && p.offsets.len() == batch.count)
        .map(|p| &p.offsets[skip..])
        .unwrap_or_default();
    out.reserve(
        42 + tag.len()
            + source.len()
            + namespace.len()
            + count * 8
            + offsets.len() * 8
            + entries.len()
            + batch.hours.len() * RUN_BYTES,
    );
    out.push(VERSION_OFFSETS);
    out.extend_from_slice(&received_at.as_unix_nanos().to_le_bytes());
    out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
    out.extend_from_slice(tag);
    out.extend_from_slice(&(source.len() as u16).to_le_bytes());
    out.extend_from_slice(source);
    out.extend_from_slice(&(namespace.len() as u16).to_le_bytes());
    out.extend_from_slice(namespace);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    if let Some(p) = prov.filter(|_| !source.is_empty()) {
        for s in &p.seqs[skip..] {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(entries);
    put_runs(out, &batch.hours, batch.count, skip);
    out.extend_from_slice(&(offsets.len() as u32).to_le_bytes());
    for o in offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    Ok(())
}

/// Appends the hour runs of a batch's entries from `skip` on (the ones dedup left), with
/// their count first; none (`runs = 0`: counted by parsing) when the batch's runs are not
/// known (they do not add up to its count) or more than a u16 counts.
fn put_runs(out: &mut Vec<u8>, hours: &[(u64, u32)], count: usize, skip: usize) {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    if hours.iter().map(|&(_, n)| n as usize).sum::<usize>() != count {
        return;
    }
    let (mut skip, mut runs) = (skip, 0u16);
    for &(hour, n) in hours {
        let n = n as usize;
        if skip >= n {
            skip -= n;
            continue;
        }
        let Some(more) = runs.checked_add(1) else {
            out.truncate(at + 2);
            return;
        };
        out.extend_from_slice(&hour.to_le_bytes());
        out.extend_from_slice(&((n - skip) as u32).to_le_bytes());
        (skip, runs) = (0, more);
    }
    out[at..at + 2].copy_from_slice(&runs.to_le_bytes());
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], RecordError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| RecordError(format!("truncated at {what}")))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<usize, RecordError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap_or_default()) as usize)
    }
    fn u32(&mut self, what: &str) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().unwrap_or_default(),
        ))
    }
}

pub fn decode(buf: &[u8]) -> Result<SpooledChunk<'_>, RecordError> {
    let mut c = Cursor { buf, at: 0 };
    let version = c.take(1, "version")?[0];
    if !(VERSION..=VERSION_OFFSETS).contains(&version) {
        return Err(RecordError(format!(
            "unknown record version {version} (this relay reads versions {VERSION} to {VERSION_OFFSETS})"
        )));
    }
    let received_at = c.u64("received_at")?;
    let n = c.u16("tag length")?;
    let tag = std::str::from_utf8(c.take(n, "tag")?)
        .map_err(|_| RecordError("tag is not UTF-8".into()))?;
    let n = c.u16("source length")?;
    let source = c.take(n, "source")?;
    let source = if source.is_empty() {
        None
    } else {
        Some(std::str::from_utf8(source).map_err(|_| RecordError("source is not UTF-8".into()))?)
    };
    let namespace = match version {
        VERSION => None,
        _ => {
            let n = c.u16("namespace length")?;
            let ns = std::str::from_utf8(c.take(n, "namespace")?)
                .map_err(|_| RecordError("namespace is not UTF-8".into()))?;
            // Version 2 wrote a namespace only when there was one; 3 on write 0 for none.
            (version == VERSION_NAMESPACED || !ns.is_empty()).then_some(ns)
        }
    };
    let count = c.u32("count")?;
    let seqs = if source.is_some() {
        c.take(count as usize * 8, "seqs")?
    } else {
        &[]
    };
    let n = c.u32("entries length")? as usize;
    let entries = c.take(n, "entries")?;
    let mut hours: &[u8] = &[];
    if version >= VERSION_HOURS {
        let runs = c.u16("hour runs")?;
        hours = c.take(runs * RUN_BYTES, "hour runs")?;
        let total: u64 = hours
            .chunks_exact(RUN_BYTES)
            .map(|r| u64::from(u32::from_le_bytes(r[8..].try_into().expect("4 bytes"))))
            .sum();
        if total != u64::from(count) {
            // Only a count kept beside the entries (the payload checksum guards the
            // bytes): if it does not add up, count by parsing, as for older records,
            // rather than refuse the chunk.
            hours = &[];
        }
    }
    let mut offsets: &[u8] = &[];
    if version >= VERSION_OFFSETS {
        let n = c.u32("offsets")? as usize;
        if n != 0 && (n != count as usize || source.is_none()) {
            return Err(RecordError(format!("{n} offsets for {count} entries")));
        }
        offsets = c.take(n * 8, "offsets")?;
    }
    Ok(SpooledChunk {
        received_at,
        tag,
        source,
        namespace,
        count,
        seqs,
        entries,
        hours,
        offsets,
    })
}

#[cfg(test)]
mod tests {
    use sluice_forward::{push_hour, write_entry, Options, Provenance};

    use super::*;

    /// A batch of `times` (secs), from source "h:app" with seqs 100, 101, ... and offsets
    /// 1000, 1050, ..., its hour
    /// runs counted as the codec counts them.
    fn batch(times: &[u32]) -> EventBatch {
        let (mut entries, mut hours) = (Vec::new(), Vec::new());
        for &secs in times {
            let time = EventTime { secs, nanos: 0 };
            write_entry(&mut entries, time, &[("message", b"x")]);
            push_hour(&mut hours, time);
        }
        let options = Options {
            provenance: Some(Provenance {
                source: "h:app".into(),
                seqs: (100..100 + times.len() as u64).collect(),
                offsets: (0..times.len() as u64).map(|i| 1000 + 50 * i).collect(),
            }),
            ..Options::default()
        };
        EventBatch {
            tag: "app".into(),
            entries,
            count: times.len(),
            options,
            hours,
        }
    }

    fn counted(chunk: &SpooledChunk<'_>) -> Vec<(u64, u64)> {
        let mut got = Vec::new();
        chunk.count_hours(|h, n| got.push((h, n)));
        got
    }

    /// The hours by parsing every entry, as for records before version 3.
    fn parsed(chunk: &SpooledChunk<'_>) -> Vec<(u64, u64)> {
        let parsing = SpooledChunk {
            hours: &[],
            ..*chunk
        };
        counted(&parsing)
    }

    /// Where entry `skip` starts in `batch.entries`.
    fn offset_of(batch: &EventBatch, skip: usize) -> usize {
        let mut at = 0;
        for e in batch.iter().take(skip) {
            let record = e.unwrap().record;
            at = record.as_ptr() as usize - batch.entries.as_ptr() as usize + record.len();
        }
        at
    }

    #[test]
    fn hour_runs_are_kept_for_the_entries_dedup_left() {
        let h = 3600 * 494_000;
        let b = batch(&[h + 3590, h + 3599, h + 3600, h + 3601, h + 10, h + 7300]);
        for skip in 0..=b.count {
            for ns in [None, Some("relay-b")] {
                let mut buf = Vec::new();
                encode(
                    &mut buf,
                    EventTime::now(),
                    &b,
                    ns,
                    skip,
                    offset_of(&b, skip),
                )
                .unwrap();
                assert_eq!(buf[0], VERSION_OFFSETS);
                let chunk = decode(&buf).unwrap();
                assert_eq!(chunk.count as usize, b.count - skip);
                assert_eq!(chunk.namespace, ns);
                assert_eq!(chunk.seq(0), (skip < b.count).then_some(100 + skip as u64));
                let first = (skip < b.count).then_some(1000 + 50 * skip as u64);
                assert_eq!(chunk.offset(0), first);
                let marks: Vec<Mark> = chunk.events().map(|e| e.unwrap().1).collect();
                assert_eq!(marks.len(), b.count - skip);
                assert!(marks.iter().all(|m| m.seq.is_some() && m.offset.is_some()));
                assert!(!chunk.hours.is_empty() || skip == b.count, "skip {skip}");
                assert_eq!(counted(&chunk), parsed(&chunk), "skip {skip}");
            }
        }
        // Without runs (a batch whose hours were not counted) the entries are parsed.
        let mut unknown = batch(&[h, h + 3600]);
        unknown.hours.clear();
        let mut buf = Vec::new();
        encode(&mut buf, EventTime::now(), &unknown, None, 0, 0).unwrap();
        let chunk = decode(&buf).unwrap();
        assert!(chunk.hours.is_empty());
        assert_eq!(
            counted(&chunk),
            vec![(h as u64 / 3600, 1), (h as u64 / 3600 + 1, 1)]
        );
    }

    #[test]
    fn records_of_versions_1_and_2_still_read() {
        let b = batch(&[7200, 7201, 10_800]);
        // Laid out as the relay wrote them before version 3.
        for (version, ns) in [(VERSION, None), (VERSION_NAMESPACED, Some("c"))] {
            let mut buf = vec![version];
            buf.extend_from_slice(&5u64.to_le_bytes());
            buf.extend_from_slice(&3u16.to_le_bytes());
            buf.extend_from_slice(b"app");
            buf.extend_from_slice(&5u16.to_le_bytes());
            buf.extend_from_slice(b"h:app");
            if let Some(ns) = ns {
                buf.extend_from_slice(&(ns.len() as u16).to_le_bytes());
                buf.extend_from_slice(ns.as_bytes());
            }
            buf.extend_from_slice(&3u32.to_le_bytes());
            for s in 100u64..103 {
                buf.extend_from_slice(&s.to_le_bytes());
            }
            buf.extend_from_slice(&(b.entries.len() as u32).to_le_bytes());
            buf.extend_from_slice(&b.entries);
            let chunk = decode(&buf).unwrap();
            assert_eq!(
                (chunk.tag, chunk.source, chunk.namespace),
                ("app", Some("h:app"), ns)
            );
            assert_eq!((chunk.count, chunk.last_seq()), (3, Some(102)));
            assert_eq!(counted(&chunk), vec![(2, 2), (3, 1)]);
        }
    }

    #[test]
    fn records_of_version_3_read_without_offsets_and_bad_offsets_are_refused() {
        let b = batch(&[7200, 7201, 10_800]);
        let mut buf = Vec::new();
        encode(&mut buf, EventTime::now(), &b, None, 0, 0).unwrap();
        // Version 3 is version 4 without the offsets at the end.
        let mut v3 = buf[..buf.len() - 4 - 3 * 8].to_vec();
        v3[0] = VERSION_HOURS;
        let chunk = decode(&v3).unwrap();
        assert_eq!(
            (chunk.count, chunk.last_seq(), chunk.offset(0)),
            (3, Some(102), None)
        );
        assert_eq!(counted(&chunk), vec![(2, 2), (3, 1)]);
        // A sender without offsets: none kept.
        let mut plain = b.clone();
        if let Some(p) = plain.options.provenance.as_mut() {
            p.offsets.clear();
        }
        let mut buf2 = Vec::new();
        encode(&mut buf2, EventTime::now(), &plain, None, 0, 0).unwrap();
        assert_eq!(decode(&buf2).unwrap().offset(0), None);
        // Offsets that are not one per entry are refused, not misread.
        let at = buf.len() - 4 - 3 * 8;
        buf[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
        let err = decode(&buf[..buf.len() - 8]).unwrap_err();
        assert!(err.to_string().contains("2 offsets for 3 entries"), "{err}");
    }

    #[test]
    fn hour_runs_that_do_not_add_up_are_not_used() {
        let b = batch(&[7200, 7201]);
        let mut buf = Vec::new();
        encode(&mut buf, EventTime::now(), &b, None, 0, 0).unwrap();
        let at = buf.len() - 4 - 2 * 8 - 4; // the last run's count, before the offsets
        buf[at] = 3;
        let chunk = decode(&buf).unwrap();
        assert!(chunk.hours.is_empty());
        assert_eq!(counted(&chunk), vec![(2, 2)]);
    }
}
