//! The event time from a field of the parsed record (`time_key` / `time_format`).
//!
//! Without it an event's time is when the agent read the line, which is wrong for every
//! line read late (after a restart, an outage, a backlog) and puts it into the wrong
//! hourly object and the wrong reconciliation hour. The field is found in the record the
//! parser has just written (its top-level map, MessagePack), so every parser gets the same
//! behaviour and the parsers themselves stay unchanged.

use chrono::format::{Item as FormatItem, Parsed, StrftimeItems};
use sluice_forward::{record_value, FieldValue};

use crate::config::ParserError;

/// How the time field is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimeFormat {
    /// A number is seconds since the epoch (fractions allowed), a string is RFC 3339.
    Auto,
    /// `2024-05-01T12:00:00.123Z`, `2024-05-01T14:00:00+02:00`.
    Rfc3339,
    /// Seconds since the epoch, as a number or a decimal string; fractions allowed.
    Epoch,
    /// Milliseconds since the epoch, as a number or a decimal string.
    EpochMillis,
    /// A strftime pattern (chrono's syntax). Without `%Y`, the year is the read time's
    /// (the previous one if that would put the event more than a day in the future);
    /// without `%z`, the time is UTC.
    Strftime(String),
}

impl TimeFormat {
    pub fn parse(text: &str) -> Result<TimeFormat, ParserError> {
        Ok(match text {
            "auto" => TimeFormat::Auto,
            "rfc3339" => TimeFormat::Rfc3339,
            "epoch" => TimeFormat::Epoch,
            "epoch_ms" => TimeFormat::EpochMillis,
            pattern if pattern.contains('%') => {
                let items = StrftimeItems::new(pattern).parse().map_err(|_| {
                    ParserError::BadTimeFormat(pattern.to_string(), "not a valid strftime pattern")
                })?;
                if items.is_empty() {
                    return Err(ParserError::BadTimeFormat(pattern.to_string(), "empty pattern"));
                }
                TimeFormat::Strftime(pattern.to_string())
            }
            other => {
                return Err(ParserError::BadTimeFormat(
                    other.to_string(),
                    "use auto, rfc3339, epoch, epoch_ms or a strftime pattern such as %Y-%m-%dT%H:%M:%S%z",
                ))
            }
        })
    }
}

/// The zone of times written without one (`time_zone`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimeZone {
    #[default]
    Utc,
    /// The agent host's zone, daylight saving included (TZ, else /etc/localtime).
    Local,
    /// A fixed offset east of UTC, in seconds.
    Fixed(i32),
}

impl TimeZone {
    /// `UTC`, `local`, or an offset such as `+02:00`, `-0530`.
    pub fn parse(text: &str) -> Result<TimeZone, ParserError> {
        let bad = || ParserError::BadTimeZone(text.to_string());
        match text {
            "UTC" | "utc" | "Z" => return Ok(TimeZone::Utc),
            "local" => return Ok(TimeZone::Local),
            _ => {}
        }
        let (sign, rest) = match text.as_bytes().first() {
            Some(b'+') => (1, &text[1..]),
            Some(b'-') => (-1, &text[1..]),
            _ => return Err(bad()),
        };
        let digits: String = rest.chars().filter(|&c| c != ':').collect();
        if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let (h, m): (i32, i32) = (
            digits[..2].parse().map_err(|_| bad())?,
            digits[2..].parse().map_err(|_| bad())?,
        );
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(TimeZone::Fixed(sign * (h * 3600 + m * 60)))
    }

    /// Seconds since the epoch of the wall-clock time `t` written in zone `written` (the
    /// text's own offset) or, without one, in this zone.
    fn timestamp(self, t: chrono::NaiveDateTime, written: Option<i32>) -> Option<i64> {
        let wall = t.and_utc().timestamp();
        Some(match (written, self) {
            (Some(offset), _) | (None, TimeZone::Fixed(offset)) => wall - offset as i64,
            (None, TimeZone::Utc) => wall,
            (None, TimeZone::Local) => {
                use chrono::TimeZone as _;
                // In the hour a clock is set back, the first of the two readings.
                chrono::Local
                    .from_local_datetime(&t)
                    .earliest()?
                    .timestamp()
            }
        })
    }
}

/// Seconds and nanoseconds since the epoch, as Forward's EventTime carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp {
    pub secs: u32,
    pub nanos: u32,
}

/// Why a record's time field could not be used; the event keeps its read time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeError {
    /// The record has no such top-level field.
    Missing,
    /// The value does not match the format.
    Unparsable,
    /// Before 1970 or after 2106: not representable as an EventTime.
    OutOfRange,
}

impl TimeError {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeError::Missing => "no such field",
            TimeError::Unparsable => "value does not match time_format",
            TimeError::OutOfRange => "time before 1970 or after 2106",
        }
    }
}

/// The configured time field of one input.
#[derive(Debug)]
pub struct TimeField {
    key: String,
    format: TimeFormat,
    zone: TimeZone,
    /// A strftime pattern, parsed once rather than per line.
    items: Vec<FormatItem<'static>>,
    /// The pattern is nginx's and Apache's `%d/%b/%Y:%H:%M:%S %z`: read by hand first.
    clf: bool,
    /// The last value and its result: consecutive lines mostly carry the same second,
    /// and parsing a date is the expensive part.
    /// The answer is kept whole: a cached failure reports its own cause again.
    last: std::cell::RefCell<(Vec<u8>, Result<Timestamp, TimeError>)>,
}

impl TimeField {
    pub fn new(key: &str, format: TimeFormat, zone: TimeZone) -> TimeField {
        let items = match &format {
            // Validated by TimeFormat::parse; an invalid pattern parses nothing.
            TimeFormat::Strftime(p) => StrftimeItems::new(p).parse_to_owned().unwrap_or_default(),
            _ => Vec::new(),
        };
        TimeField {
            key: key.to_string(),
            clf: matches!(&format, TimeFormat::Strftime(p) if p == CLF_PATTERN),
            format,
            zone,
            items,
            last: std::cell::RefCell::new((Vec::new(), Err(TimeError::Missing))),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn format(&self) -> &TimeFormat {
        &self.format
    }

    pub fn zone(&self) -> TimeZone {
        self.zone
    }

    /// The time in `record` (one MessagePack map); `read_secs` gives the year to formats
    /// that have none.
    pub fn extract(&self, record: &[u8], read_secs: u32) -> Result<Timestamp, TimeError> {
        let value = match record_value(record, &self.key) {
            Ok(Some((value, _))) => value,
            Ok(None) | Err(_) => return Err(TimeError::Missing),
        };
        match value {
            FieldValue::Bytes(text) => self.from_text(text, read_secs),
            FieldValue::Int(n) => self.number_time(Num::Int(n)),
            FieldValue::Float(f) => self.number_time(Num::Float(f)),
            FieldValue::Other => Err(TimeError::Missing),
        }
    }

    /// The time a text field holds (what [`extract`](Self::extract) finds in a string
    /// field), the last text's answer reused when the next is the same.
    pub fn from_text(&self, text: &[u8], read_secs: u32) -> Result<Timestamp, TimeError> {
        let mut last = self.last.borrow_mut();
        if !last.0.is_empty() && last.0 == text {
            return last.1;
        }
        // nginx's exact shape is read from the bytes: it is ASCII, and has nothing to
        // trim, so the UTF-8 check and the trim of parse_text would change nothing.
        let result = match self.clf.then(|| clf_time(text)).flatten() {
            Some(secs) => from_parts(secs, 0),
            None => self.parse_text(text, read_secs),
        };
        last.0.clear();
        last.0.extend_from_slice(text);
        last.1 = result;
        result
    }

    fn number_time(&self, n: Num) -> Result<Timestamp, TimeError> {
        let per_sec: i64 = match self.format {
            TimeFormat::Auto | TimeFormat::Epoch => 1,
            TimeFormat::EpochMillis => 1000,
            TimeFormat::Rfc3339 | TimeFormat::Strftime(_) => return Err(TimeError::Unparsable),
        };
        match n {
            // Integers exactly: 1700000000123 ms is .123 s, not .122999907.
            Num::Int(i) => from_parts(
                i.div_euclid(per_sec),
                (i.rem_euclid(per_sec) * (1_000_000_000 / per_sec)) as u32,
            ),
            Num::Float(f) => from_f64(f / per_sec as f64),
        }
    }

    fn parse_text(&self, text: &[u8], read_secs: u32) -> Result<Timestamp, TimeError> {
        let text = std::str::from_utf8(text).map_err(|_| TimeError::Unparsable)?;
        let text = text.trim();
        let number = || {
            text.parse::<i64>()
                .map(Num::Int)
                .or_else(|_| text.parse::<f64>().map(Num::Float))
        };
        match &self.format {
            TimeFormat::Auto => match number() {
                Ok(n) => self.number_time(n),
                Err(_) => rfc3339(text),
            },
            TimeFormat::Rfc3339 => rfc3339(text),
            TimeFormat::Epoch | TimeFormat::EpochMillis => {
                self.number_time(number().map_err(|_| TimeError::Unparsable)?)
            }
            TimeFormat::Strftime(_) => match self.clf.then(|| clf_time(text.as_bytes())) {
                Some(Some(secs)) => from_parts(secs, 0),
                _ => strftime(text, &self.items, self.zone, read_secs),
            },
        }
    }
}

/// The time format of the common and combined log formats.
pub(crate) const CLF_PATTERN: &str = "%d/%b/%Y:%H:%M:%S %z";

/// `23/Nov/2026:05:00:00 +0000` read without chrono: seconds since the epoch, or `None`
/// for anything but that exact shape with valid fields, which then goes to chrono's
/// parse of [`CLF_PATTERN`] (a test holds the two to the same answers). Parsing a date
/// with chrono costs about ten times as much, and log lines with a new second each are
/// common on a busy server.
fn clf_time(t: &[u8]) -> Option<i64> {
    if t.len() != 26 || t[2] != b'/' || t[6] != b'/' || t[11] != b':' || t[14] != b':' {
        return None;
    }
    if t[17] != b':' || t[20] != b' ' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        t[range].iter().try_fold(0i64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    let month = match &t[3..6] {
        b"Jan" => 1,
        b"Feb" => 2,
        b"Mar" => 3,
        b"Apr" => 4,
        b"May" => 5,
        b"Jun" => 6,
        b"Jul" => 7,
        b"Aug" => 8,
        b"Sep" => 9,
        b"Oct" => 10,
        b"Nov" => 11,
        b"Dec" => 12,
        _ => return None,
    };
    let (day, year) = (num(0..2)?, num(7..11)?);
    let (hour, minute, second) = (num(12..14)?, num(15..17)?, num(18..20)?);
    let sign = match t[21] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (oh, om) = (num(22..24)?, num(24..26)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return None; // chrono decides (leap seconds among them)
    }
    if oh > 23 || om > 59 {
        return None;
    }
    // Days since 1970-01-01 of the proleptic Gregorian date (Howard Hinnant's
    // days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let wall = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(wall - sign * (oh * 3600 + om * 60))
}

#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

fn rfc3339(text: &str) -> Result<Timestamp, TimeError> {
    let t = chrono::DateTime::parse_from_rfc3339(text).map_err(|_| TimeError::Unparsable)?;
    from_parts(t.timestamp(), t.timestamp_subsec_nanos())
}

fn strftime(
    text: &str,
    items: &[FormatItem<'static>],
    zone: TimeZone,
    read_secs: u32,
) -> Result<Timestamp, TimeError> {
    if items.is_empty() {
        return Err(TimeError::Unparsable);
    }
    let mut parsed = Parsed::new();
    chrono::format::parse(&mut parsed, text, items.iter()).map_err(|_| TimeError::Unparsable)?;
    let written = parsed.offset;
    let wall = |p: &Parsed| p.to_naive_datetime_with_offset(written.unwrap_or(0)).ok();
    if parsed.year.is_some() || parsed.year_div_100.is_some() || parsed.isoyear.is_some() {
        let t = wall(&parsed).ok_or(TimeError::Unparsable)?;
        let secs = zone.timestamp(t, written).ok_or(TimeError::Unparsable)?;
        return from_parts(secs, t.and_utc().timestamp_subsec_nanos());
    }
    // No year (syslog RFC 3164): the read time's, or the year before when that would
    // put the event more than a day ahead of the read time (read in January, written
    // in December).
    let read =
        chrono::DateTime::from_timestamp(read_secs as i64, 0).ok_or(TimeError::OutOfRange)?;
    let year = chrono::Datelike::year(&read);
    for y in [year, year - 1] {
        let mut p = parsed.clone();
        p.set_year(y as i64).map_err(|_| TimeError::Unparsable)?;
        let Some(t) = wall(&p) else {
            continue; // 29 February in a year without one
        };
        let Some(secs) = zone.timestamp(t, written) else {
            continue; // a local time skipped by a clock change
        };
        if secs <= read_secs as i64 + 86_400 {
            return from_parts(secs, t.and_utc().timestamp_subsec_nanos());
        }
    }
    Err(TimeError::Unparsable)
}

fn from_f64(secs: f64) -> Result<Timestamp, TimeError> {
    if !secs.is_finite() {
        return Err(TimeError::Unparsable);
    }
    let whole = secs.floor();
    let nanos = ((secs - whole) * 1e9).round().min(999_999_999.0) as u32;
    if !(0.0..=u32::MAX as f64).contains(&whole) {
        return Err(TimeError::OutOfRange);
    }
    Ok(Timestamp {
        secs: whole as u32,
        nanos,
    })
}

fn from_parts(secs: i64, nanos: u32) -> Result<Timestamp, TimeError> {
    let secs = u32::try_from(secs).map_err(|_| TimeError::OutOfRange)?;
    Ok(Timestamp {
        secs,
        nanos: nanos.min(999_999_999),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Parser, ParserKind};

    fn record(parser: ParserKind, line: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Parser::new(parser, None)
            .unwrap()
            .write_record(line, &mut out);
        out
    }

    fn at(text: &str) -> u32 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp() as u32
    }

    #[test]
    fn json_fields_in_every_format() {
        let now = at("2026-11-23T12:00:00Z");
        let cases: &[(&str, &str, Result<Timestamp, TimeError>)] = &[
            (
                r#"{"ts":"2026-11-23T10:15:30.25+01:00","x":[1,{"a":2}]}"#,
                "auto",
                Ok(Timestamp {
                    secs: at("2026-11-23T09:15:30Z"),
                    nanos: 250_000_000,
                }),
            ),
            (
                r#"{"x":{"ts":"nested, not top level"},"ts":1700000000.5}"#,
                "auto",
                Ok(Timestamp {
                    secs: 1_700_000_000,
                    nanos: 500_000_000,
                }),
            ),
            (
                r#"{"ts":1700000000123}"#,
                "epoch_ms",
                Ok(Timestamp {
                    secs: 1_700_000_000,
                    nanos: 123_000_000,
                }),
            ),
            (
                r#"{"ts":"1700000000"}"#,
                "epoch",
                Ok(Timestamp {
                    secs: 1_700_000_000,
                    nanos: 0,
                }),
            ),
            (
                r#"{"ts":"2026-11-23 10:15:30"}"#,
                "%Y-%m-%d %H:%M:%S",
                Ok(Timestamp {
                    secs: at("2026-11-23T10:15:30Z"),
                    nanos: 0,
                }),
            ),
            (r#"{"ts":"yesterday"}"#, "auto", Err(TimeError::Unparsable)),
            (r#"{"ts":-5}"#, "epoch", Err(TimeError::OutOfRange)),
            (r#"{"other":1}"#, "auto", Err(TimeError::Missing)),
            (r#"{"ts":null}"#, "auto", Err(TimeError::Missing)),
        ];
        for (line, format, want) in cases {
            let field = TimeField::new("ts", TimeFormat::parse(format).unwrap(), TimeZone::Utc);
            let got = field.extract(&record(ParserKind::Json, line.as_bytes()), now);
            assert_eq!(&got, want, "{line} with {format}");
        }
    }

    #[test]
    fn nginx_and_syslog_times() {
        let now = at("2026-01-02T00:30:00Z");
        let nginx = record(
            ParserKind::Nginx,
            br#"10.0.0.1 - - [01/Jan/2026:23:59:59 -0200] "GET / HTTP/1.1" 200 5 "-" "curl""#,
        );
        let f = TimeField::new(
            "time",
            TimeFormat::parse("%d/%b/%Y:%H:%M:%S %z").unwrap(),
            TimeZone::Utc,
        );
        assert_eq!(
            f.extract(&nginx, now).unwrap().secs,
            at("2026-01-02T01:59:59Z")
        );
        // Read on 2 January, written on 31 December: last year, not next December.
        let syslog = record(
            ParserKind::SyslogRfc3164,
            b"<13>Dec 31 23:00:00 host app[1]: bye",
        );
        let f = TimeField::new(
            "time",
            TimeFormat::parse("%b %e %H:%M:%S").unwrap(),
            TimeZone::Utc,
        );
        assert_eq!(
            f.extract(&syslog, now).unwrap().secs,
            at("2025-12-31T23:00:00Z")
        );
        let syslog = record(
            ParserKind::SyslogRfc3164,
            b"<13>Jan  2 00:10:00 host app[1]: hi",
        );
        assert_eq!(
            f.extract(&syslog, now).unwrap().secs,
            at("2026-01-02T00:10:00Z")
        );
    }

    #[test]
    fn zone_less_times_in_the_configured_zone() {
        let now = at("2026-07-02T00:00:00Z");
        let line = record(
            ParserKind::SyslogRfc3164,
            b"<13>Jul  1 12:00:00 host app: hi",
        );
        let format = || TimeFormat::parse("%b %e %H:%M:%S").unwrap();
        for (zone, want) in [
            ("UTC", "2026-07-01T12:00:00Z"),
            ("+02:00", "2026-07-01T10:00:00Z"),
            ("-0530", "2026-07-01T17:30:00Z"),
        ] {
            let f = TimeField::new("time", format(), TimeZone::parse(zone).unwrap());
            assert_eq!(f.extract(&line, now).unwrap().secs, at(want), "{zone}");
        }
        // A time written with its own offset ignores time_zone.
        let nginx = record(
            ParserKind::Nginx,
            br#"10.0.0.1 - - [01/Jul/2026:12:00:00 +0000] "GET / HTTP/1.1" 200 5 "-" "curl""#,
        );
        let f = TimeField::new(
            "time",
            TimeFormat::parse("%d/%b/%Y:%H:%M:%S %z").unwrap(),
            TimeZone::Fixed(7200),
        );
        assert_eq!(
            f.extract(&nginx, now).unwrap().secs,
            at("2026-07-01T12:00:00Z")
        );
        // local: whatever this host's zone is, the same as chrono's own conversion.
        let f = TimeField::new("time", format(), TimeZone::Local);
        let naive = chrono::NaiveDate::from_ymd_opt(2026, 7, 1)
            .unwrap()
            .and_hms_opt(12, 0, 0)
            .unwrap();
        use chrono::TimeZone as _;
        let want = chrono::Local
            .from_local_datetime(&naive)
            .earliest()
            .unwrap()
            .timestamp();
        assert_eq!(f.extract(&line, now).unwrap().secs as i64, want);
        for bad in ["CET", "+2", "+25:00", "02:00", "+02:0x"] {
            let e = TimeZone::parse(bad).unwrap_err().to_string();
            assert!(e.contains("UTC, local or an offset"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_cache_returns_the_same_answer_as_a_parse() {
        let f = TimeField::new("ts", TimeFormat::Rfc3339, TimeZone::Utc);
        let now = at("2026-11-23T12:00:00Z");
        let good = record(ParserKind::Json, br#"{"ts":"2026-11-23T10:00:00Z"}"#);
        let bad = record(ParserKind::Json, br#"{"ts":"2026-13-23T10:00:00Z"}"#);
        for _ in 0..2 {
            assert_eq!(
                f.extract(&good, now).unwrap().secs,
                at("2026-11-23T10:00:00Z")
            );
            assert_eq!(f.extract(&bad, now), Err(TimeError::Unparsable));
        }
    }

    #[test]
    fn the_clf_fast_path_agrees_with_chrono() {
        let format = TimeFormat::parse(CLF_PATTERN).unwrap();
        let items = StrftimeItems::new(CLF_PATTERN).parse_to_owned().unwrap();
        let chrono = |text: &str| strftime(text, &items, TimeZone::Utc, 1_795_000_000);
        let field = TimeField::new("time", format, TimeZone::Utc);
        assert!(field.clf);
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut fast = 0;
        for _ in 0..50_000 {
            // Mostly valid, some out of range on purpose (day 31 of a short month,
            // hour 24, second 60, offset 24:00), some years out of EventTime's range.
            let text = format!(
                "{:02}/{}/{:04}:{:02}:{:02}:{:02} {}{:02}{:02}",
                1 + next(31),
                months[next(12) as usize],
                1960 + next(160),
                next(25),
                next(60),
                next(61),
                if next(2) == 0 { '+' } else { '-' },
                next(25),
                [0, 30, 45, 60][next(4) as usize],
            );
            let got = field.parse_text(text.as_bytes(), 1_795_000_000);
            assert_eq!(got, chrono(&text), "{text}");
            fast += clf_time(text.as_bytes()).is_some() as u32;
        }
        assert!(fast > 30_000, "the fast path took only {fast} of 50,000");
        for odd in [
            "1/Nov/2026:05:00:00 +0000",
            "01/nov/2026:05:00:00 +0000",
            "01/Nov/2026:05:00:00 +00:00",
            "29/Feb/2024:05:00:00 +0000",
            "29/Feb/2100:05:00:00 +0000",
            "29/Feb/2000:23:59:59 -0130",
            "01/Nov/2026:05:00:00Z+0000",
        ] {
            assert_eq!(
                field.parse_text(odd.as_bytes(), 1_795_000_000),
                chrono(odd),
                "{odd}"
            );
        }
    }

    #[test]
    fn bad_formats_are_explained() {
        let e = TimeFormat::parse("iso").unwrap_err().to_string();
        assert!(e.contains("use auto, rfc3339"), "{e}");
        let e = TimeFormat::parse("%Q").unwrap_err().to_string();
        assert!(e.contains("not a valid strftime"), "{e}");
    }

    #[test]
    fn truncated_or_hostile_records_do_not_panic() {
        let full = record(
            ParserKind::Json,
            br#"{"a":[1,2,{"b":"c"}],"ts":1700000000}"#,
        );
        let f = TimeField::new("ts", TimeFormat::Auto, TimeZone::Utc);
        for end in 0..full.len() {
            let _ = f.extract(&full[..end], 0);
        }
        // A map claiming 2^32-1 entries, an array claiming as many.
        assert!(f.extract(&[0xdf, 0xff, 0xff, 0xff, 0xff], 0).is_err());
        assert!(f
            .extract(&[0x81, 0xa1, b'x', 0xdd, 0xff, 0xff, 0xff, 0xff], 0)
            .is_err());
    }
}
