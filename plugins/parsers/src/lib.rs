//! Line parsers for the sluice agent: each turns one log line into the record map of a
//! Forward event, written straight into the chunk as MessagePack.
//!
//! | [`ParserKind`] | record |
//! |---|---|
//! | `none` | `{"message": <line>}` |
//! | `json` | the line's top-level JSON object, as is |
//! | `regex` | one field per named capture group of the configured pattern |
//! | `nginx`, `apache` | combined (or common) log format: `remote`, `user`, `time`, `method`, `path`, `protocol`, `code`, `size`, `referer`, `agent` |
//! | `syslog_rfc3164` | `pri`, `facility`, `severity`, `time`, `host`, `ident`, `pid`, `message` |
//! | `syslog_rfc5424` | as 3164, plus `version`, `msgid`, `structured_data` |
//! | `cri` | Kubernetes container logs: `time`, `stream`, `logtag` (`F` or `P`), `message` |
//!
//! [`Multiline`] joins the lines of one event (a stack trace) before parsing.
//!
//! # Guarantee: a line is never dropped
//!
//! [`Parser::write_record`] always writes a record. A line that does not parse is written
//! raw, as `{"message": <line>, "parse_error": <why>}`, and the call returns
//! [`Outcome::Failed`] so the caller can count it. Bytes that are not valid UTF-8 are
//! written as MessagePack `bin`, unchanged, wherever they appear. Records never nest
//! deeper than [`MAX_NESTING`], so a relay's decoder (which refuses deeper records) never
//! rejects a chunk because of one odd line.
//!
//! # Example
//!
//! ```
//! use sluice_parsers::{Outcome, Parser, ParserKind};
//! let parser = Parser::new(ParserKind::Json, None)?;
//! let mut record = Vec::new();
//! assert_eq!(parser.write_record(br#"{"level":"info","n":3}"#, &mut record), Outcome::Parsed);
//! record.clear();
//! assert_eq!(parser.write_record(b"not json", &mut record), Outcome::Failed);
//! # Ok::<(), sluice_parsers::ParserError>(())
//! ```

mod combined;
mod config;
mod cri;
mod json;
mod multiline;
mod patterns;
mod record;
mod time;

use combined::Combined;
pub use config::{ParserError, ParserKind};
pub use multiline::{Event, Multiline, Pending};
use patterns::{Syslog3164, Syslog5424, UserRegex};
pub use record::MAX_NESTING;
use record::{write_field, write_map_len, Value};
pub use time::{TimeError, TimeField, TimeFormat, TimeZone, Timestamp};

/// What [`Parser::write_record`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The record holds the parsed fields.
    Parsed,
    /// The line did not parse; the record holds it raw, with a `parse_error` field.
    Failed,
}

/// A configured parser. Cheap to share by reference; parsing allocates little.
#[derive(Debug)]
pub struct Parser {
    kind: ParserKind,
    imp: Imp,
    /// Where the event time comes from; `None`: the read time.
    time: Option<TimeField>,
    /// `time` was configured (not a parser default): a record without the field counts.
    time_explicit: bool,
}

#[derive(Debug)]
enum Imp {
    None,
    Json,
    Regex(UserRegex),
    Combined(Combined),
    Syslog3164(Syslog3164),
    Syslog5424(Syslog5424),
    Cri,
}

impl Parser {
    /// Builds the parser of `kind`; `pattern` is the regex of [`ParserKind::Regex`] (and
    /// an error with any other kind, so a forgotten `parser = "regex"` is noticed).
    pub fn new(kind: ParserKind, pattern: Option<&str>) -> Result<Parser, ParserError> {
        let imp = match (kind, pattern) {
            (ParserKind::Regex, None) => return Err(ParserError::MissingPattern),
            (ParserKind::Regex, Some(p)) => Imp::Regex(UserRegex::new(p)?),
            (other, Some(_)) => return Err(ParserError::UnusedPattern(other)),
            (ParserKind::None, None) => Imp::None,
            (ParserKind::Json, None) => Imp::Json,
            (ParserKind::Nginx | ParserKind::Apache, None) => Imp::Combined(Combined::new()),
            (ParserKind::SyslogRfc3164, None) => Imp::Syslog3164(Syslog3164::new()),
            (ParserKind::SyslogRfc5424, None) => Imp::Syslog5424(Syslog5424::new()),
            (ParserKind::Cri, None) => Imp::Cri,
        };
        Ok(Parser {
            kind,
            imp,
            time: None,
            time_explicit: false,
        })
    }

    pub fn kind(&self) -> ParserKind {
        self.kind
    }

    /// Takes the event time from the record field `key` read as `format` (see
    /// [`TimeFormat::parse`]). Unset, the parsers with a time field use it (nginx, apache:
    /// `%d/%b/%Y:%H:%M:%S %z`; syslog 5424 and cri: RFC 3339; syslog 3164: `%b %e %H:%M:%S`, UTC,
    /// the year from the read time) and the others keep the read time; `key = ""` keeps
    /// the read time everywhere. `format` defaults to `auto` (a number is epoch seconds,
    /// a string RFC 3339), or to the parser's own format when `key` is its time field.
    /// `zone` (see [`TimeZone::parse`]; default UTC) applies to times written without one.
    pub fn with_time(
        mut self,
        key: Option<&str>,
        format: Option<&str>,
        zone: Option<&str>,
    ) -> Result<Parser, ParserError> {
        let zone = zone.map(TimeZone::parse).transpose()?.unwrap_or_default();
        let default = match self.kind {
            ParserKind::Nginx | ParserKind::Apache => Some(("time", time::CLF_PATTERN)),
            ParserKind::SyslogRfc5424 | ParserKind::Cri => Some(("time", "rfc3339")),
            ParserKind::SyslogRfc3164 => Some(("time", "%b %e %H:%M:%S")),
            ParserKind::None | ParserKind::Json | ParserKind::Regex => None,
        };
        let format = format.map(TimeFormat::parse).transpose()?;
        let (key, format, explicit) = match (key, default) {
            (Some(""), _) => {
                self.time = None;
                return Ok(self);
            }
            (Some(k), Some((dk, df))) if k == dk => {
                (k, format.unwrap_or(TimeFormat::parse(df)?), true)
            }
            (Some(k), _) => (k, format.unwrap_or(TimeFormat::Auto), true),
            (None, Some((dk, df))) => (dk, format.unwrap_or(TimeFormat::parse(df)?), false),
            (None, None) if format.is_some() => {
                return Err(ParserError::TimeFormatWithoutKey(self.kind))
            }
            (None, None) => return Ok(self),
        };
        self.time = Some(TimeField::new(key, format, zone));
        self.time_explicit = explicit;
        Ok(self)
    }

    /// The configured time field, if the event time comes from the record.
    pub fn time_field(&self) -> Option<&TimeField> {
        self.time.as_ref()
    }

    /// The event time of `record` (as [`write_record`](Self::write_record) wrote it):
    /// `None` when the read time applies (no time field configured, or none in this
    /// record and that is normal for the parser), `Some(Err)` when the record should
    /// have had a usable time and did not; count it and keep the read time.
    pub fn record_time(
        &self,
        record: &[u8],
        read_secs: u32,
    ) -> Option<Result<Timestamp, TimeError>> {
        let field = self.time.as_ref()?;
        match field.extract(record, read_secs) {
            Err(TimeError::Missing) if !self.time_explicit => None,
            other => Some(other),
        }
    }

    /// [`write_record`](Self::write_record) and then [`record_time`](Self::record_time)
    /// of what it wrote (`None` for a line that did not parse), in one. The nginx and
    /// apache parsers hand over the time text they cut from the line instead of it being
    /// found in the record again: that lookup was a fifth of what parsing cost
    /// (bench/RESULTS.md, issue 16).
    pub fn write_record_timed(
        &self,
        line: &[u8],
        out: &mut Vec<u8>,
        read_secs: u32,
    ) -> (Outcome, Option<Result<Timestamp, TimeError>>) {
        if let (Imp::Combined(p), Some(field)) = (&self.imp, &self.time) {
            if field.key() == combined::TIME_KEY {
                let start = out.len();
                match p.write(line, out) {
                    Ok(text) => return (Outcome::Parsed, Some(field.from_text(text, read_secs))),
                    Err(_) => out.truncate(start), // written again below, raw
                }
            }
        }
        let start = out.len();
        match self.write_record(line, out) {
            Outcome::Failed => (Outcome::Failed, None),
            Outcome::Parsed => (Outcome::Parsed, self.record_time(&out[start..], read_secs)),
        }
    }

    /// Appends the record map for `line` (without its newline) to `out`. Always writes
    /// exactly one map; see the crate documentation.
    pub fn write_record(&self, line: &[u8], out: &mut Vec<u8>) -> Outcome {
        let result = match &self.imp {
            Imp::None => {
                write_map_len(out, 1);
                write_field(out, "message", &Value::Text(line));
                return Outcome::Parsed;
            }
            Imp::Json => json::write(line, out),
            Imp::Regex(p) => p.write(line, out),
            Imp::Combined(p) => p.write(line, out).map(|_| ()).map_err(String::from),
            Imp::Syslog3164(p) => p.write(line, out),
            Imp::Syslog5424(p) => p.write(line, out),
            Imp::Cri => cri::write(line, out).map_err(String::from),
        };
        match result {
            Ok(()) => Outcome::Parsed,
            Err(why) => {
                write_map_len(out, 2);
                write_field(out, "message", &Value::Text(line));
                write_field(out, "parse_error", &Value::Text(why.as_bytes()));
                Outcome::Failed
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// Parses `line` and returns the record as JSON, plus the outcome.
    pub fn parse(parser: &Parser, line: &[u8]) -> (serde_json::Value, Outcome) {
        let mut out = Vec::new();
        let outcome = parser.write_record(line, &mut out);
        let mut cursor = &out[..];
        let value = rmpv::decode::read_value(&mut cursor).expect("one msgpack value");
        assert!(cursor.is_empty(), "exactly one value written");
        (to_json(&value), outcome)
    }

    fn to_json(v: &rmpv::Value) -> serde_json::Value {
        use rmpv::Value as V;
        match v {
            V::Nil => serde_json::Value::Null,
            V::Boolean(b) => (*b).into(),
            V::Integer(i) => match (i.as_i64(), i.as_u64()) {
                (Some(n), _) => n.into(),
                (None, Some(n)) => n.into(),
                _ => serde_json::Value::Null,
            },
            V::F32(f) => (*f as f64).into(),
            V::F64(f) => (*f).into(),
            V::String(s) => s.as_str().unwrap_or("<invalid utf-8>").into(),
            V::Binary(b) => format!("bin:{b:?}").into(),
            V::Array(a) => a.iter().map(to_json).collect(),
            V::Map(m) => m
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or("?").to_string(), to_json(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
            V::Ext(..) => serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::parse;
    use super::*;

    #[test]
    fn none_keeps_the_line_and_invalid_utf8_as_bin() {
        let p = Parser::new(ParserKind::None, None).unwrap();
        let (v, o) = parse(&p, b"hello world");
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(v, serde_json::json!({"message": "hello world"}));
        let (v, _) = parse(&p, b"bad \xff byte");
        assert!(v["message"].as_str().unwrap().starts_with("bin:"), "{v}");
    }

    #[test]
    fn configuration_mistakes_are_explained() {
        let e = Parser::new(ParserKind::Regex, None).unwrap_err();
        assert!(e.to_string().contains("needs a pattern"), "{e}");
        let e = Parser::new(ParserKind::Json, Some("(?P<a>.)")).unwrap_err();
        assert!(e.to_string().contains("only used with parser"), "{e}");
        let e = Parser::new(ParserKind::Regex, Some("(unclosed")).unwrap_err();
        assert!(e.to_string().contains("invalid regex"), "{e}");
        let e = Parser::new(ParserKind::Regex, Some("(a)(b)")).unwrap_err();
        assert!(e.to_string().contains("no named capture group"), "{e}");
    }

    #[test]
    fn the_time_handed_over_is_the_time_looked_up_in_the_record() {
        let base: &[u8] = b"10.1.2.3 - bob [23/Nov/2026:05:06:07 +0100] \"GET /a?b=1 HTTP/1.1\" 200 512 \"-\" \"curl/8\"";
        // Every byte of the line replaced by each of a few bytes: times that parse, do
        // not parse, are not UTF-8, lines that are not combined at all.
        let mut lines = vec![base.to_vec(), b"not an access log".to_vec()];
        for at in 0..base.len() {
            for b in [b' ', b'[', b']', b'x', b'9', 0xff] {
                let mut l = base.to_vec();
                l[at] = b;
                lines.push(l);
            }
        }
        let parsers = [
            Parser::new(ParserKind::Nginx, None)
                .unwrap()
                .with_time(None, None, None),
            Parser::new(ParserKind::Apache, None).unwrap().with_time(
                Some("time"),
                None,
                Some("+02:00"),
            ),
            // Another key: looked up in the record, as before.
            Parser::new(ParserKind::Nginx, None).unwrap().with_time(
                Some("code"),
                Some("epoch"),
                None,
            ),
            Parser::new(ParserKind::Json, None)
                .unwrap()
                .with_time(Some("t"), None, None),
        ];
        for p in parsers.map(Result::unwrap) {
            for line in &lines {
                let (mut a, mut b) = (vec![0xaa], vec![0xaa]);
                let outcome = p.write_record(line, &mut a);
                let time = match outcome {
                    Outcome::Parsed => p.record_time(&a[1..], 1_795_000_000),
                    Outcome::Failed => None,
                };
                let (outcome_b, time_b) = p.write_record_timed(line, &mut b, 1_795_000_000);
                let line = String::from_utf8_lossy(line);
                assert_eq!(a, b, "{line}");
                assert_eq!((outcome, time), (outcome_b, time_b), "{line}");
            }
        }
    }

    #[test]
    fn kinds_have_their_config_names() {
        #[derive(serde::Deserialize)]
        struct C {
            parser: ParserKind,
        }
        for (text, kind) in [
            ("none", ParserKind::None),
            ("json", ParserKind::Json),
            ("regex", ParserKind::Regex),
            ("nginx", ParserKind::Nginx),
            ("apache", ParserKind::Apache),
            ("syslog_rfc3164", ParserKind::SyslogRfc3164),
            ("syslog_rfc5424", ParserKind::SyslogRfc5424),
            ("cri", ParserKind::Cri),
        ] {
            let c: C = serde_json::from_str(&format!("{{\"parser\":\"{text}\"}}")).unwrap();
            assert_eq!(c.parser, kind);
        }
    }
}
