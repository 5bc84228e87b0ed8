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
//! touch another's dedup marks, across restarts too. Records without one are written
//! as version 1, as before.
//!
//! A fixed binary layout rather than msgpack/serde so that recovery (which reads the
//! source and the last seq of every batch to rebuild the dedup table) and the sinks can
//! borrow everything from the read buffer without allocating.

use sluice_forward::{Entry, EventBatch, EventTime};

pub const VERSION: u8 = 1;
/// The version of records that carry a dedup namespace.
pub const VERSION_NAMESPACED: u8 = 2;

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
}

impl<'a> SpooledChunk<'a> {
    pub fn seq(&self, i: usize) -> Option<u64> {
        let b = self.seqs.get(i * 8..i * 8 + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// The key of this chunk's source in the dedup table.
    pub fn dedup_key(&self) -> Option<std::borrow::Cow<'a, str>> {
        Some(dedup_key(self.namespace, self.source?))
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
        seq: Option<u64>,
    ) -> Result<(), sluice_forward::DecodeError> {
        crate::envelope::write(out, entry.time, self.tag, self.source, seq, entry.record)?;
        out.push(b'\n');
        Ok(())
    }

    /// Iterates the entries with their seq (None when the sender gave no provenance).
    pub fn events(
        &self,
    ) -> impl Iterator<Item = Result<(Entry<'a>, Option<u64>), RecordError>> + '_ {
        let mut entries = sluice_forward::EntryIter::new(self.entries);
        let mut i = 0usize;
        std::iter::from_fn(move || {
            let next = entries.next()?;
            let seq = self.seq(i);
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
    out.reserve(34 + tag.len() + source.len() + namespace.len() + count * 8 + entries.len());
    out.push(match namespace.is_empty() {
        true => VERSION,
        false => VERSION_NAMESPACED,
    });
    out.extend_from_slice(&received_at.as_unix_nanos().to_le_bytes());
    out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
    out.extend_from_slice(tag);
    out.extend_from_slice(&(source.len() as u16).to_le_bytes());
    out.extend_from_slice(source);
    if !namespace.is_empty() {
        out.extend_from_slice(&(namespace.len() as u16).to_le_bytes());
        out.extend_from_slice(namespace);
    }
    out.extend_from_slice(&(count as u32).to_le_bytes());
    if let Some(p) = prov.filter(|_| !source.is_empty()) {
        for s in &p.seqs[skip..] {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(entries);
    Ok(())
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
    if version != VERSION && version != VERSION_NAMESPACED {
        return Err(RecordError(format!(
            "unknown record version {version} (this relay reads versions {VERSION} and {VERSION_NAMESPACED})"
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
        VERSION_NAMESPACED => {
            let n = c.u16("namespace length")?;
            Some(
                std::str::from_utf8(c.take(n, "namespace")?)
                    .map_err(|_| RecordError("namespace is not UTF-8".into()))?,
            )
        }
        _ => None,
    };
    let count = c.u32("count")?;
    let seqs = if source.is_some() {
        c.take(count as usize * 8, "seqs")?
    } else {
        &[]
    };
    let n = c.u32("entries length")? as usize;
    let entries = c.take(n, "entries")?;
    Ok(SpooledChunk {
        received_at,
        tag,
        source,
        namespace,
        count,
        seqs,
        entries,
    })
}
