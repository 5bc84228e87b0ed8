//! The JSON envelope every sink writes, one per event:
//!
//! ```json
//! {"time":"2026-11-23T05:00:00.123456789Z","tag":"app.log","source":"web-1:app:…","seq":4242,"record":{"message":"…"}}
//! ```
//!
//! `source` and `seq` are the event's provenance (null when the sender gave none), so
//! `SELECT DISTINCT source, seq` removes any duplicate an at-least-once path produced.
//! A sluice agent numbers each source's events 0, 1, 2, ... (a multiline event counts
//! once), so a gap in a source's seqs is a missing event. Events read from a file also
//! carry `offset`, the byte offset in the file where the event began (absent otherwise).
//! The source id of a file is `<agent id>:<input>:<dev>:<inode>:<fingerprint>:<generation>`:
//! a file truncated in place (copytruncate) starts a new generation, numbered from 0.
//!
//! Object storage gets the record itself, flat, with the same four fields after its own
//! (what BigQuery, Snowflake and Athena load as columns), see [`write_flat`]:
//!
//! ```json
//! {"message":"…","_time":"2026-11-23T05:00:00.123456789Z","_tag":"app.log","_source":"web-1:app:…","_seq":4242}
//! ```

use sluice_forward::{record_to_json, EventTime};

/// Where an event is in its source: its seq and, for events read from files, the byte
/// offset it began at. None when the sender did not say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    pub seq: Option<u64>,
    pub offset: Option<u64>,
}

impl Mark {
    pub fn seq(seq: u64) -> Mark {
        Mark {
            seq: Some(seq),
            offset: None,
        }
    }
}

/// Appends one envelope (without a trailing newline) to `out`.
pub fn write(
    out: &mut Vec<u8>,
    time: EventTime,
    tag: &str,
    source: Option<&str>,
    mark: Mark,
    record: &[u8],
) -> Result<(), sluice_forward::DecodeError> {
    out.push(b'{');
    write_provenance(
        out,
        ["time", "tag", "source", "seq", "offset"],
        time,
        tag,
        source,
        mark,
    );
    out.extend_from_slice(b",\"record\":");
    record_to_json(record, out)?;
    out.push(b'}');
    Ok(())
}

/// Appends one object line (without a trailing newline): the record's fields, then
/// `_time`, `_tag`, `_source`, `_seq` and (events read from files) `_offset` (records are
/// maps: the server refuses others). A record field with one of these names stays in the
/// line, before sluice's (JSON readers that keep the last of two equal keys read sluice's).
pub fn write_flat(
    out: &mut Vec<u8>,
    time: EventTime,
    tag: &str,
    source: Option<&str>,
    mark: Mark,
    record: &[u8],
) -> Result<(), sluice_forward::DecodeError> {
    let start = out.len();
    record_to_json(record, out)?;
    if out.get(start) != Some(&b'{') || out.last() != Some(&b'}') {
        return Err(sluice_forward::DecodeError::Malformed {
            what: "record is not a map".into(),
        });
    }
    out.pop();
    if out.len() - start > 1 {
        out.push(b',');
    }
    write_provenance(
        out,
        ["_time", "_tag", "_source", "_seq", "_offset"],
        time,
        tag,
        source,
        mark,
    );
    out.push(b'}');
    Ok(())
}

/// `"<time>":"…","<tag>":…,"<source>":…|null,"<seq>":…|null[,"<offset>":…]` under the
/// given names.
fn write_provenance(
    out: &mut Vec<u8>,
    [time_key, tag_key, source_key, seq_key, offset_key]: [&str; 5],
    time: EventTime,
    tag: &str,
    source: Option<&str>,
    mark: Mark,
) {
    let key = |out: &mut Vec<u8>, k: &str| {
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
    };
    key(out, time_key);
    out.push(b'"');
    write_rfc3339(out, time);
    out.extend_from_slice(b"\",");
    key(out, tag_key);
    write_json_str(out, tag);
    out.push(b',');
    key(out, source_key);
    match source {
        Some(s) => write_json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b',');
    key(out, seq_key);
    match mark.seq {
        Some(s) => out.extend_from_slice(itoa(s, &mut [0u8; 20])),
        None => out.extend_from_slice(b"null"),
    }
    if let Some(offset) = mark.offset {
        out.push(b',');
        key(out, offset_key);
        out.extend_from_slice(itoa(offset, &mut [0u8; 20]));
    }
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json writes straight into the Vec; a &str cannot fail to serialize.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil_from_days`]).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`
pub fn write_rfc3339(out: &mut Vec<u8>, t: EventTime) {
    // By hand, not `write!`: this runs once per event of every object line and envelope.
    let secs = t.secs as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    let mut buf = *b"0000-00-00T00:00:00.000000000Z";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    // EventTime seconds are a u32: years 1970 to 2106, always four digits.
    put(0, 4, y as u64);
    put(5, 2, m as u64);
    put(8, 2, d as u64);
    put(11, 2, (rem / 3600) as u64);
    put(14, 2, (rem / 60 % 60) as u64);
    put(17, 2, (rem % 60) as u64);
    put(20, 9, t.nanos as u64);
    out.extend_from_slice(&buf);
}

/// The time [`write_rfc3339`] wrote (`YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`); `None` for any
/// other text.
pub fn parse_rfc3339(text: &str) -> Option<EventTime> {
    let b = text.as_bytes();
    if b.len() != 30 || text.get(..13).is_none() || b[29] != b'Z' || b[19] != b'.' {
        return None;
    }
    let hour = parse_hour_label(&text[..13])?;
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let t = text.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (min, sec, nanos) = (num(14..16)?, num(17..19)?, num(20..29)?);
    if min > 59 || sec > 59 {
        return None;
    }
    Some(EventTime {
        secs: u32::try_from(hour * 3600 + min * 60 + sec).ok()?,
        nanos: nanos as u32,
    })
}

/// The event-time hour an event belongs to, as hours since the epoch.
pub fn hour_of(t: EventTime) -> u64 {
    t.secs as u64 / 3600
}

/// `YYYY-MM-DDTHH` for an hour number (how the ledger and reports name hours).
pub fn hour_label(hour: u64) -> String {
    let secs = hour as i64 * 3600;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}T{:02}", secs.rem_euclid(86_400) / 3600)
}

/// The hour number of a `YYYY-MM-DDTHH` label; `None` when it is not one.
pub fn parse_hour_label(label: &str) -> Option<u64> {
    let b = label.as_bytes();
    if b.len() != 13 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| label.get(r)?.parse::<u32>().ok();
    let (y, m, d, h) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 {
        return None;
    }
    let days = days_from_civil(y as i64, m, d);
    u64::try_from(days * 24 + h as i64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_labels_round_trip() {
        for hour in [0, 1, 498_729, 500_000, 1_000_000] {
            assert_eq!(
                parse_hour_label(&hour_label(hour)),
                Some(hour),
                "{}",
                hour_label(hour)
            );
        }
        assert_eq!(hour_label(498_729), "2026-11-23T09");
        assert_eq!(parse_hour_label("2026-13-01T00"), None);
        assert_eq!(parse_hour_label("498729"), None);
    }

    #[test]
    fn rfc3339_is_read_back() {
        for (secs, nanos) in [(0, 0), (1_795_424_400, 1), (4_294_967_295, 999_999_999)] {
            let t = EventTime { secs, nanos };
            let mut out = Vec::new();
            write_rfc3339(&mut out, t);
            assert_eq!(parse_rfc3339(std::str::from_utf8(&out).unwrap()), Some(t));
        }
        for bad in [
            "2026-11-23T09:00:00Z",
            "2026-11-23T09:00:60.000000000Z",
            "2026-11-23 09:00:00.000000000Z",
            "2026-11-23T09:00:00.00000000+Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339() {
        let mut out = Vec::new();
        write_rfc3339(
            &mut out,
            EventTime {
                secs: 1_795_000_000,
                nanos: 5,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-18T11:06:40.000000005Z"
        );
        assert_eq!(hour_label(1_795_000_000 / 3600), "2026-11-18T11");
        let mut out = Vec::new();
        write_rfc3339(&mut out, EventTime { secs: 0, nanos: 0 });
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1970-01-01T00:00:00.000000000Z"
        );
    }

    #[test]
    fn object_lines_are_the_record_and_its_provenance() {
        let t = EventTime {
            secs: 1_795_000_000,
            nanos: 5,
        };
        let line = |record: &[u8], source| {
            let mut out = Vec::new();
            write_flat(&mut out, t, "a\"b", source, Mark::seq(7), record).unwrap();
            String::from_utf8(out).unwrap()
        };
        let mut map = Vec::new();
        sluice_forward::write_entry(&mut map, t, &[("msg", b"hi".as_slice())]);
        let record = &map[sluice_forward::ENTRY_HEADER_LEN..];
        assert_eq!(
            line(record, Some("s1")),
            r#"{"msg":"hi","_time":"2026-11-18T11:06:40.000000005Z","_tag":"a\"b","_source":"s1","_seq":7}"#
        );
        let mut envelope = Vec::new();
        write(
            &mut envelope,
            t,
            "a\"b",
            Some("s1"),
            Mark::default(),
            record,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(envelope).unwrap(),
            r#"{"time":"2026-11-18T11:06:40.000000005Z","tag":"a\"b","source":"s1","seq":null,"record":{"msg":"hi"}}"#
        );
        let (mut envelope, mut flat) = (Vec::new(), Vec::new());
        let mark = Mark {
            seq: Some(3),
            offset: Some(4096),
        };
        write(&mut envelope, t, "t", Some("s1"), mark, record).unwrap();
        write_flat(&mut flat, t, "t", Some("s1"), mark, record).unwrap();
        assert!(String::from_utf8(envelope)
            .unwrap()
            .ends_with(r#""seq":3,"offset":4096,"record":{"msg":"hi"}}"#));
        assert!(String::from_utf8(flat)
            .unwrap()
            .ends_with(r#""_seq":3,"_offset":4096}"#));
        assert_eq!(
            line(&[0x80], None),
            r#"{"_time":"2026-11-18T11:06:40.000000005Z","_tag":"a\"b","_source":null,"_seq":7}"#
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }
}
