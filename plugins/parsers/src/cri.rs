//! `cri`: the container log format of the Kubernetes Container Runtime Interface, which
//! containerd and CRI-O write under `/var/log/pods` (and kubelet links from
//! `/var/log/containers`):
//!
//! ```text
//! 2024-01-02T03:04:05.123456789Z stdout F the message
//! <time>                         <stream> <logtag> <message, the rest of the line as is>
//! ```
//!
//! `logtag` is `F` for a full line and `P` for a partial one: the runtime cuts a line
//! longer than its buffer (16 KiB in containerd) into `P` pieces ended by an `F` piece.
//! Each piece is kept as its own record with its own `logtag`; joining them is not
//! built (the [`Multiline`](crate::Multiline) joiner glues whole lines with `\n` before
//! parsing, prefixes included, and a file interleaves stdout and stderr pieces). A
//! line's pieces come in order in the file, so their offsets (`seq`) order them.
//!
//! The split is done by hand, not with a regex: every line of a Kubernetes node is
//! written in this format, and finding three spaces is all it takes.

use crate::record::{write_fields, Value};

const MALFORMED: &str =
    "not in CRI log format (<RFC 3339 time> <stdout|stderr> <logtag> <message>)";

/// Writes the record of one CRI line, or says why the line is not one.
pub(crate) fn write(line: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    let (time, rest) = split_space(line).ok_or(MALFORMED)?;
    let (stream, rest) = split_space(rest).ok_or(MALFORMED)?;
    // The message may be empty: containerd writes `... stdout F ` for an empty line; a
    // line ending right after the tag is taken the same way.
    let (logtag, message) = split_space(rest).unwrap_or((rest, &[]));
    if !looks_like_rfc3339(time)
        || !(stream == b"stdout" || stream == b"stderr")
        || logtag.is_empty()
        || logtag.contains(&b' ')
    {
        return Err(MALFORMED);
    }
    write_fields(
        out,
        &[
            ("time", Value::Text(time)),
            ("stream", Value::Text(stream)),
            ("logtag", Value::Text(logtag)),
            ("message", Value::Text(message)),
        ],
    );
    Ok(())
}

/// `(before, after)` the first space; `None` without one or with an empty `before`.
fn split_space(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = bytes.iter().position(|&b| b == b' ')?;
    (i > 0).then(|| (&bytes[..i], &bytes[i + 1..]))
}

/// `YYYY-MM-DDT...`: enough to tell a CRI line from another format's. The time itself is
/// read by the event-time step (RFC 3339, nanoseconds kept), which counts a bad one in
/// `time_errors_total` like any parser's unusable time.
fn looks_like_rfc3339(time: &[u8]) -> bool {
    let digits = |r: std::ops::Range<usize>| time[r].iter().all(u8::is_ascii_digit);
    time.len() >= 20
        && digits(0..4)
        && time[4] == b'-'
        && digits(5..7)
        && time[7] == b'-'
        && digits(8..10)
        && matches!(time[10], b'T' | b't')
}

#[cfg(test)]
mod tests {
    use crate::test_util::parse;
    use crate::{Outcome, Parser, ParserKind, Timestamp};
    use serde_json::json;

    fn cri() -> Parser {
        Parser::new(ParserKind::Cri, None)
            .unwrap()
            .with_time(None, None, None)
            .unwrap()
    }

    #[test]
    fn full_and_partial_lines_keep_their_fields() {
        let p = cri();
        let (v, o) = parse(
            &p,
            b"2024-01-02T03:04:05.123456789Z stdout F the message  with  spaces ",
        );
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(
            v,
            json!({"time": "2024-01-02T03:04:05.123456789Z", "stream": "stdout",
                   "logtag": "F", "message": "the message  with  spaces "})
        );
        // A piece of a line longer than the runtime's buffer: its own record, tag P.
        let (v, o) = parse(&p, b"2024-01-02T03:04:05.2Z stderr P {\"half\":");
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(
            v,
            json!({"time": "2024-01-02T03:04:05.2Z", "stream": "stderr",
                   "logtag": "P", "message": "{\"half\":"})
        );
    }

    #[test]
    fn empty_messages_and_odd_bytes_are_kept() {
        let p = cri();
        for line in [
            &b"2024-01-02T03:04:05.000000001Z stdout F "[..],
            b"2024-01-02T03:04:05.000000001Z stdout F",
        ] {
            let (v, o) = parse(&p, line);
            assert_eq!(o, Outcome::Parsed, "{line:?}");
            assert_eq!(v["message"], "", "{line:?}");
            assert_eq!(v["logtag"], "F");
        }
        let (v, o) = parse(&p, b"2024-01-02T03:04:05Z stdout F caf\xe9");
        assert_eq!(o, Outcome::Parsed);
        assert!(v["message"].as_str().unwrap().starts_with("bin:"), "{v}");
    }

    #[test]
    fn the_event_time_is_the_lines_own_with_nanoseconds() {
        let p = cri();
        let mut record = Vec::new();
        p.write_record(b"2024-01-02T03:04:05.123456789Z stdout F hi", &mut record);
        assert_eq!(
            p.record_time(&record, 0),
            Some(Ok(Timestamp {
                secs: 1_704_164_645,
                nanos: 123_456_789
            }))
        );
        // CRI-O writes the node's offset.
        record.clear();
        p.write_record(b"2024-01-02T05:04:05.5+02:00 stdout F hi", &mut record);
        assert_eq!(
            p.record_time(&record, 0),
            Some(Ok(Timestamp {
                secs: 1_704_164_645,
                nanos: 500_000_000
            }))
        );
        // time_key = "" keeps the read time, as for every parser.
        let p = Parser::new(ParserKind::Cri, None)
            .unwrap()
            .with_time(Some(""), None, None)
            .unwrap();
        assert_eq!(p.record_time(&record, 0), None);
    }

    #[test]
    fn malformed_lines_are_kept_raw_and_reported() {
        let p = cri();
        for line in [
            &b""[..],
            b"plain text from somewhere else",
            b"2024-01-02T03:04:05Z",
            b"2024-01-02T03:04:05Z stdout",
            b"2024-01-02T03:04:05Z stdin F wrong stream",
            b"2024-01-02T03:04:05Z stdout  F two spaces before the tag",
            b" 2024-01-02T03:04:05Z stdout F leading space",
            b"02/Jan/2024:03:04:05 stdout F not RFC 3339",
            b"2024-01-02 03:04:05Z stdout F a space inside the time",
            b"{\"log\":\"docker json-file\\n\",\"stream\":\"stdout\",\"time\":\"2024-01-02T03:04:05Z\"}",
        ] {
            let (v, o) = parse(&p, line);
            assert_eq!(o, Outcome::Failed, "{:?} parsed as {v}", String::from_utf8_lossy(line));
            assert_eq!(v["message"], String::from_utf8_lossy(line).as_ref());
            assert!(
                v["parse_error"].as_str().unwrap().contains("CRI log format"),
                "{v}"
            );
            // A raw line has no time field: it keeps the read time, not counted twice.
            let mut record = Vec::new();
            p.write_record(line, &mut record);
            assert_eq!(p.record_time(&record, 0), None);
        }
    }

    #[test]
    fn a_time_that_only_looks_right_is_a_time_error_not_a_parse_error() {
        let p = cri();
        let line = b"2024-01-02T99:04:05.1Z stdout F hi";
        let (_, o) = parse(&p, line);
        assert_eq!(o, Outcome::Parsed);
        let mut record = Vec::new();
        p.write_record(line, &mut record);
        assert_eq!(
            p.record_time(&record, 0),
            Some(Err(crate::TimeError::Unparsable))
        );
    }
}
