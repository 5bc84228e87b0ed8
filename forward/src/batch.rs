//! Events as every mode decodes them: a tag, canonical entries and the options.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{malformed, DecodeError};
use crate::limits::MAX_DEPTH;
use crate::msgpack::{self, write_map_len, Head, Reader};
use crate::options::Options;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// The canonical entry header: fixarray(2), fixext8 type 0.
const ENTRY_PREFIX: [u8; 3] = [0x92, 0xd7, 0x00];

/// An event's time with nanosecond precision, as the Forward protocol's EventTime ext
/// carries it (seconds since the Unix epoch, nanoseconds within the second).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventTime {
    pub secs: u32,
    pub nanos: u32,
}

impl EventTime {
    /// Times past the year 2106 (beyond u32 seconds) saturate to `u32::MAX` seconds.
    pub fn from_unix_nanos(n: u64) -> Self {
        EventTime {
            secs: (n / NANOS_PER_SEC).min(u32::MAX as u64) as u32,
            nanos: (n % NANOS_PER_SEC) as u32,
        }
    }

    pub fn as_unix_nanos(&self) -> u64 {
        self.secs as u64 * NANOS_PER_SEC + self.nanos as u64
    }

    /// The wall clock now (the epoch if the clock is set before 1970).
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        EventTime {
            secs: d.as_secs().min(u32::MAX as u64) as u32,
            nanos: d.subsec_nanos(),
        }
    }

    /// Float seconds, as some clients send them; `None` if not representable.
    pub(crate) fn from_float(f: f64) -> Option<Self> {
        if !(0.0..4_294_967_296.0).contains(&f) {
            return None; // also rejects NaN
        }
        let secs = f.trunc();
        let nanos = ((f - secs) * 1e9).round().min(999_999_999.0);
        Some(EventTime {
            secs: secs as u32,
            nanos: nanos as u32,
        })
    }
}

/// The events of one frame, whatever mode carried them.
///
/// `entries` is the concatenation of msgpack entries `[time, record]` in canonical form:
/// the time is always the EventTime ext (`fixext 8`, type 0) and the record is the map
/// exactly as the client sent it.
#[derive(Clone, Debug)]
pub struct EventBatch {
    pub tag: String,
    pub entries: Vec<u8>,
    pub count: usize,
    pub options: Options,
    /// Runs of consecutive entries in the same UTC hour, `(hours since the epoch, count)`,
    /// filled by the decoder as it validates the entries, so that counting events per
    /// hour (the relay's ledger) needs no second pass. Empty when not known.
    pub hours: Vec<(u64, u32)>,
}

/// Equality is about the events; `hours` is derived from them.
impl PartialEq for EventBatch {
    fn eq(&self, other: &Self) -> bool {
        (&self.tag, &self.entries, self.count, &self.options)
            == (&other.tag, &other.entries, other.count, &other.options)
    }
}

impl Eq for EventBatch {}

/// Adds one event at `time` to hour runs (see [`EventBatch::hours`]).
pub fn push_hour(runs: &mut Vec<(u64, u32)>, time: EventTime) {
    let hour = u64::from(time.secs) / 3600;
    match runs.last_mut() {
        Some((h, n)) if *h == hour => *n += 1,
        _ => runs.push((hour, 1)),
    }
}

impl EventBatch {
    /// The entries one by one; a malformed entry yields one error and ends the iteration.
    ///
    /// ```
    /// # use sluice_forward::*;
    /// let mut entries = Vec::new();
    /// write_entry(&mut entries, EventTime { secs: 1, nanos: 2 }, &[("k", b"v")]);
    /// let batch = EventBatch { tag: "t".into(), entries, count: 1, options: Options::default(), hours: Vec::new() };
    /// let times: Vec<_> = batch.iter().map(|e| e.map(|e| e.time)).collect::<Result<_, _>>()?;
    /// assert_eq!(times, [EventTime { secs: 1, nanos: 2 }]);
    /// # Ok::<(), DecodeError>(())
    /// ```
    pub fn iter(&self) -> EntryIter<'_> {
        EntryIter::new(&self.entries)
    }
}

/// One event of an [`EventBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub time: EventTime,
    /// The record: one raw msgpack map.
    pub record: &'a [u8],
}

/// Iterator over the entries of an [`EventBatch`], see [`EventBatch::iter`].
#[derive(Clone, Debug)]
pub struct EntryIter<'a> {
    reader: Reader<'a>,
    index: usize,
    failed: bool,
}

impl<'a> EntryIter<'a> {
    /// Iterates canonical entries stored elsewhere, for example in a spool record.
    pub fn new(entries: &'a [u8]) -> Self {
        EntryIter {
            reader: Reader::new(entries),
            index: 0,
            failed: false,
        }
    }
}

impl<'a> Iterator for EntryIter<'a> {
    type Item = Result<Entry<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.reader.is_at_end() {
            return None;
        }
        let parsed = parse_entry(&mut self.reader, self.index);
        self.index += 1;
        self.failed = parsed.is_err();
        Some(parsed.map(|p| Entry {
            time: p.time,
            record: p.record,
        }))
    }
}

/// Writes the array header and time of one canonical entry; the record map comes next.
///
/// ```
/// # use sluice_forward::*;
/// let mut out = Vec::new();
/// write_entry_header(&mut out, EventTime { secs: 1, nanos: 0 });
/// rmp::encode::write_map_len(&mut out, 0).unwrap();
/// assert_eq!(out, [0x92, 0xd7, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x80]);
/// ```
pub fn write_entry_header(out: &mut Vec<u8>, time: EventTime) {
    out.extend_from_slice(&ENTRY_PREFIX);
    out.extend_from_slice(&time.secs.to_be_bytes());
    out.extend_from_slice(&time.nanos.to_be_bytes());
}

/// Bytes [`write_entry_header`] writes; the record follows them.
pub const ENTRY_HEADER_LEN: usize = ENTRY_PREFIX.len() + 8;

/// Changes the time of an entry in place (the header is fixed-size, so nothing moves):
/// `entry` starts with the bytes [`write_entry_header`] wrote.
pub fn set_entry_time(entry: &mut [u8], time: EventTime) {
    debug_assert_eq!(entry[..ENTRY_PREFIX.len()], ENTRY_PREFIX);
    let at = ENTRY_PREFIX.len();
    entry[at..at + 4].copy_from_slice(&time.secs.to_be_bytes());
    entry[at + 4..at + 8].copy_from_slice(&time.nanos.to_be_bytes());
}

/// Writes one canonical entry whose record maps string keys to values. A value that is
/// valid UTF-8 is written as msgpack str, any other as bin, so no byte is lost.
pub fn write_entry(out: &mut Vec<u8>, time: EventTime, fields: &[(&str, &[u8])]) {
    write_entry_header(out, time);
    write_map_len(out, fields.len());
    for (key, value) in fields {
        msgpack::write_str(out, key);
        match std::str::from_utf8(value) {
            Ok(s) => msgpack::write_str(out, s),
            Err(_) => msgpack::write_bin(out, value),
        }
    }
}

pub(crate) struct ParsedEntry<'a> {
    pub(crate) time: EventTime,
    pub(crate) record: &'a [u8],
    /// Already `[fixext8 time, record]` with a fixarray header.
    pub(crate) canonical: bool,
}

/// Reads one entry `[time, record]` at the reader's position. `index` is for messages.
pub(crate) fn parse_entry<'a>(
    r: &mut Reader<'a>,
    index: usize,
) -> Result<ParsedEntry<'a>, DecodeError> {
    let start = r.pos();
    let head = r
        .head()
        .map_err(|_| malformed(format!("entry {index}: truncated")))?;
    match head {
        Head::Array(2) => {}
        Head::Array(n) => {
            return Err(malformed(format!(
                "entry {index}: array of {n} elements, expected [time, record]"
            )))
        }
        other => {
            return Err(malformed(format!(
                "entry {index}: a {} where an array [time, record] was expected",
                other.kind()
            )))
        }
    }
    let fixarray = r.pos() - start == 1;
    let (time, time_canonical) =
        read_time(r, true).map_err(|why| malformed(format!("entry {index}: time {why}")))?;
    let record = read_record(r).map_err(|e| match e {
        DecodeError::Malformed { what } => malformed(format!("entry {index}: record {what}")),
        other => other,
    })?;
    Ok(ParsedEntry {
        time,
        record,
        canonical: fixarray && time_canonical,
    })
}

/// Reads a time (int, float or EventTime ext). Fluent Bit's event format 2 puts
/// `[time, metadata]` where the time goes; with `allow_metadata` the metadata is dropped.
/// Returns the time and whether it was a `fixext 8` EventTime. Errors are reasons only.
#[inline]
pub(crate) fn read_time(
    r: &mut Reader<'_>,
    allow_metadata: bool,
) -> Result<(EventTime, bool), String> {
    // The canonical form, once per event: read it without the general header parse.
    if let Some(b) = r.fixext8(0) {
        let secs = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let nanos = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if nanos as u64 >= NANOS_PER_SEC {
            return Err(format!("has {nanos} nanoseconds"));
        }
        return Ok((EventTime { secs, nanos }, true));
    }
    let start = r.pos();
    let head = r.head().map_err(|_| "is truncated".to_string())?;
    let bad = |kind: &str| format!("is not int/float/EventTime (found {kind})");
    match head {
        Head::Uint(s) => u32::try_from(s)
            .map(|secs| (EventTime { secs, nanos: 0 }, false))
            .map_err(|_| format!("{s} is out of range")),
        Head::Int(s) => u32::try_from(s)
            .map(|secs| (EventTime { secs, nanos: 0 }, false))
            .map_err(|_| format!("{s} is out of range")),
        Head::F32(f) => EventTime::from_float(f as f64)
            .map(|t| (t, false))
            .ok_or_else(|| format!("{f} is out of range")),
        Head::F64(f) => EventTime::from_float(f)
            .map(|t| (t, false))
            .ok_or_else(|| format!("{f} is out of range")),
        Head::Ext { ty: 0, len: 8 } => {
            let fixext = r.pos() - start == 2;
            let b = r.take(8).map_err(|_| "is truncated".to_string())?;
            let secs = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let nanos = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            if nanos as u64 >= NANOS_PER_SEC {
                return Err(format!("has {nanos} nanoseconds"));
            }
            Ok((EventTime { secs, nanos }, fixext))
        }
        Head::Ext { ty, len } => Err(format!(
            "is an ext of type {ty} and {len} bytes, not an EventTime"
        )),
        Head::Array(2) if allow_metadata => {
            let (time, _) = read_time(r, false)?;
            r.value(MAX_DEPTH)
                .map_err(|_| "metadata is malformed".to_string())?;
            Ok((time, false))
        }
        other => Err(bad(other.kind())),
    }
}

/// Reads a record, which must be a map, and returns its raw bytes.
#[inline]
pub(crate) fn read_record<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], DecodeError> {
    match msgpack::parse_head(r.rest())? {
        Some((Head::Map(_), _)) => {}
        Some((other, _)) => {
            return Err(malformed(format!("is not a map (found {})", other.kind())))
        }
        None => return Err(malformed("is truncated")),
    }
    match msgpack::scan(r.rest(), MAX_DEPTH)? {
        msgpack::Scan::Complete(n) => r.take(n),
        msgpack::Scan::Incomplete { .. } => Err(malformed("is truncated")),
    }
}

/// Validates concatenated entries and brings them to canonical form.
///
/// Returns `None` for the buffer when `src` already is canonical (the caller keeps it as
/// it is), and the number of entries. A rewrite may be up to four times larger than
/// `src` (`[0, {}]` is 3 bytes, 12 canonical), so it is capped at `limit` bytes, and its
/// buffer never grows past that.
pub(crate) fn normalise_entries(
    src: &[u8],
    limit: usize,
    hours: &mut Vec<(u64, u32)>,
) -> Result<(Option<Vec<u8>>, usize), DecodeError> {
    let mut r = Reader::new(src);
    let mut rewritten: Option<Vec<u8>> = None;
    let mut count = 0;
    while !r.is_at_end() {
        let start = r.pos();
        let entry = parse_entry(&mut r, count)?;
        push_hour(hours, entry.time);
        match (&mut rewritten, entry.canonical) {
            (None, true) => {}
            (Some(out), true) => push_within(out, &src[start..r.pos()], limit)?,
            (out, false) => {
                let out = out.get_or_insert_with(|| {
                    Vec::with_capacity((src.len() + src.len() / 4 + 16).min(limit))
                });
                if out.is_empty() {
                    push_within(out, &src[..start], limit)?;
                }
                let mut header = [0u8; 11];
                header[..3].copy_from_slice(&ENTRY_PREFIX);
                header[3..7].copy_from_slice(&entry.time.secs.to_be_bytes());
                header[7..].copy_from_slice(&entry.time.nanos.to_be_bytes());
                push_within(out, &header, limit)?;
                push_within(out, entry.record, limit)?;
            }
        }
        count += 1;
    }
    Ok((rewritten, count))
}

/// Appends to a buffer that may hold at most `limit` bytes: fails instead of passing the
/// limit, and grows by doubling but never to a capacity beyond the limit.
fn push_within(out: &mut Vec<u8>, bytes: &[u8], limit: usize) -> Result<(), DecodeError> {
    let need = out.len() + bytes.len();
    if need > limit {
        return Err(DecodeError::DecompressedTooLarge { limit });
    }
    if need > out.capacity() {
        let target = (out.capacity() * 2).max(need).min(limit);
        out.reserve_exact(target - out.len());
    }
    out.extend_from_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_time_conversions() {
        let t = EventTime::from_unix_nanos(1_700_000_000_123_456_789);
        assert_eq!(
            t,
            EventTime {
                secs: 1_700_000_000,
                nanos: 123_456_789
            }
        );
        assert_eq!(t.as_unix_nanos(), 1_700_000_000_123_456_789);
        assert_eq!(EventTime::from_unix_nanos(u64::MAX).secs, u32::MAX);
        assert!(EventTime::now().secs > 1_600_000_000);
        assert_eq!(
            EventTime::from_float(1.5),
            Some(EventTime {
                secs: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(EventTime::from_float(f64::NAN), None);
        assert_eq!(EventTime::from_float(-1.0), None);
        assert_eq!(EventTime::from_float(5e9), None);
    }

    #[test]
    fn canonical_entries_are_kept_as_they_are() {
        let mut src = Vec::new();
        write_entry(&mut src, EventTime { secs: 1, nanos: 2 }, &[("a", b"b")]);
        write_entry(&mut src, EventTime { secs: 3, nanos: 4 }, &[("c", b"\xff")]);
        let mut hours = Vec::new();
        let (rewritten, count) = normalise_entries(&src, usize::MAX, &mut hours).unwrap();
        assert!(rewritten.is_none());
        assert_eq!(count, 2);
    }

    #[test]
    fn other_time_forms_are_rewritten() {
        let record = [0x81, 0xa1, b'k', 0x01];
        let mut src = Vec::new();
        write_entry_header(&mut src, EventTime { secs: 9, nanos: 9 });
        src.extend_from_slice(&record);
        let canonical_prefix = src.len();
        // [1700000000 (uint32), record]
        src.extend_from_slice(&[0x92, 0xce, 0x65, 0x53, 0xf1, 0x00]);
        src.extend_from_slice(&record);
        // [1.25 (float64), record]
        src.push(0x92);
        src.push(0xcb);
        src.extend_from_slice(&1.25f64.to_be_bytes());
        src.extend_from_slice(&record);
        // [ext8 EventTime, record]
        src.extend_from_slice(&[0x92, 0xc7, 8, 0, 0, 0, 0, 7, 0, 0, 0, 8]);
        src.extend_from_slice(&record);
        // Fluent Bit v2: [[EventTime, {metadata}], record]
        src.extend_from_slice(&[
            0x92, 0x92, 0xd7, 0, 0, 0, 0, 5, 0, 0, 0, 6, 0x81, 0xa1, b'm', 0xc0,
        ]);
        src.extend_from_slice(&record);
        // array16 header of length 2
        src.extend_from_slice(&[0xdc, 0, 2, 0x03]);
        src.extend_from_slice(&record);

        let mut hours = Vec::new();
        let (rewritten, count) = normalise_entries(&src, usize::MAX, &mut hours).unwrap();
        let out = rewritten.expect("rewritten");
        assert_eq!(count, 6);
        assert_eq!(out[..canonical_prefix], src[..canonical_prefix]);
        let batch = EventBatch {
            tag: "t".into(),
            entries: out,
            count,
            options: Options::default(),
            hours,
        };
        let times: Vec<EventTime> = batch.iter().map(|e| e.unwrap().time).collect();
        let t = |secs, nanos| EventTime { secs, nanos };
        assert_eq!(
            times,
            [
                t(9, 9),
                t(1_700_000_000, 0),
                t(1, 250_000_000),
                t(7, 8),
                t(5, 6),
                t(3, 0)
            ]
        );
        assert!(batch.iter().all(|e| e.unwrap().record == record));
        assert!(
            normalise_entries(&batch.entries, usize::MAX, &mut Vec::new())
                .unwrap()
                .0
                .is_none()
        );
    }

    #[test]
    fn bad_entries_name_the_entry_and_field() {
        let mut src = Vec::new();
        write_entry(&mut src, EventTime::default(), &[]);
        src.extend_from_slice(&[0x92, 0xa1, b'x', 0x80]);
        let err = normalise_entries(&src, usize::MAX, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("entry 1: time is not int/float/EventTime (found str)"),
            "{err}"
        );

        let err = normalise_entries(&[0x92, 0x01, 0x90], usize::MAX, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("entry 0: record is not a map (found array)"),
            "{err}"
        );
        let err = normalise_entries(&[0x92, 0x01, 0x81, 0x01], usize::MAX, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry 0: record is truncated"), "{err}");
        let err = normalise_entries(&[0x92, 0xff, 0x80], usize::MAX, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry 0: time -1 is out of range"), "{err}");
        let err = normalise_entries(&[0x93, 0x01, 0x80, 0x80], usize::MAX, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry 0: array of 3 elements"), "{err}");
    }
}
