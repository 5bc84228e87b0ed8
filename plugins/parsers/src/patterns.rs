//! The parsers built on regular expressions: the user's own (`regex`) and syslog
//! (RFC 3164, RFC 5424). All of them work on bytes, so a line with invalid UTF-8 still
//! parses and keeps its bytes.

use regex::bytes::{Captures, Regex};

use crate::config::ParserError;
use crate::record::{write_fields, Value};

/// `regex`: one string field per named group that took part in the match.
#[derive(Debug)]
pub(crate) struct UserRegex {
    re: Regex,
    names: Vec<String>,
}

impl UserRegex {
    pub fn new(pattern: &str) -> Result<UserRegex, ParserError> {
        let re = Regex::new(pattern)?;
        let names: Vec<String> = re.capture_names().flatten().map(str::to_string).collect();
        if names.is_empty() {
            return Err(ParserError::NoNamedGroups);
        }
        Ok(UserRegex { re, names })
    }

    pub fn write(&self, line: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let caps = self
            .re
            .captures(line)
            .ok_or("the line does not match the pattern")?;
        let fields: Vec<(&str, Value<'_>)> = self
            .names
            .iter()
            .filter_map(|n| Some((n.as_str(), Value::Text(caps.name(n)?.as_bytes()))))
            .collect();
        write_fields(out, &fields);
        Ok(())
    }
}

/// RFC 3164: `<pri>Mmm dd hh:mm:ss host ident[pid]: message`. Syslog daemons write files
/// without `<pri>`, so it is optional; so is the `ident[pid]:` tag.
#[derive(Debug)]
pub(crate) struct Syslog3164 {
    re: Regex,
}

impl Syslog3164 {
    pub fn new() -> Syslog3164 {
        let re = Regex::new(
            r"(?s-u)^(?:<(?P<pri>\d{1,3})>)?(?P<time>[A-Z][a-z]{2} [ 0-9]\d \d{2}:\d{2}:\d{2}) (?P<host>\S+) (?:(?P<ident>[^\s:\[]+)(?:\[(?P<pid>[^\]]*)\])?: ?)?(?P<message>.*)$",
        )
        .expect("the RFC 3164 pattern compiles");
        Syslog3164 { re }
    }

    pub fn write(&self, line: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let caps = self
            .re
            .captures(line)
            .ok_or("not an RFC 3164 syslog line")?;
        let mut fields = Vec::with_capacity(8);
        push_pri(&mut fields, &caps)?;
        for name in ["time", "host", "ident", "pid", "message"] {
            push_text(&mut fields, &caps, name);
        }
        write_fields(out, &fields);
        Ok(())
    }
}

/// RFC 5424: `<pri>1 timestamp host app-name procid msgid structured-data [msg]`, where
/// `-` means "no value" (the field is left out). `<pri>` is optional here too.
#[derive(Debug)]
pub(crate) struct Syslog5424 {
    re: Regex,
}

impl Syslog5424 {
    pub fn new() -> Syslog5424 {
        let re = Regex::new(
            r#"(?s-u)^(?:<(?P<pri>\d{1,3})>)?(?P<version>[1-9]\d{0,2}) (?P<time>\S+) (?P<host>\S+) (?P<ident>\S+) (?P<pid>\S+) (?P<msgid>\S+) (?P<sd>-|(?:\[(?:[^\]"\\]|\\.|"(?:[^"\\]|\\.)*")*\])+)(?: (?:\xEF\xBB\xBF)?(?P<message>.*))?$"#,
        )
        .expect("the RFC 5424 pattern compiles");
        Syslog5424 { re }
    }

    pub fn write(&self, line: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let caps = self
            .re
            .captures(line)
            .ok_or("not an RFC 5424 syslog line")?;
        let mut fields = Vec::with_capacity(11);
        push_pri(&mut fields, &caps)?;
        push_int(&mut fields, &caps, "version");
        for name in ["time", "host", "ident", "pid", "msgid"] {
            if let Some(m) = caps.name(name).filter(|m| m.as_bytes() != b"-") {
                fields.push((name, Value::Text(m.as_bytes())));
            }
        }
        if let Some(sd) = caps.name("sd").filter(|m| m.as_bytes() != b"-") {
            fields.push(("structured_data", Value::Text(sd.as_bytes())));
        }
        push_text(&mut fields, &caps, "message");
        write_fields(out, &fields);
        Ok(())
    }
}

fn push_text<'a>(
    fields: &mut Vec<(&'static str, Value<'a>)>,
    caps: &Captures<'a>,
    name: &'static str,
) {
    if let Some(m) = caps.name(name) {
        fields.push((name, Value::Text(m.as_bytes())));
    }
}

/// A decimal group as an int; `-` or anything unparsable is left out.
fn push_int<'a>(
    fields: &mut Vec<(&'static str, Value<'a>)>,
    caps: &Captures<'a>,
    name: &'static str,
) {
    let n = caps
        .name(name)
        .and_then(|m| std::str::from_utf8(m.as_bytes()).ok())
        .and_then(|s| s.parse::<i64>().ok());
    if let Some(n) = n {
        fields.push((name, Value::Int(n)));
    }
}

const FACILITIES: [&str; 24] = [
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
];
const SEVERITIES: [&str; 8] = [
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
];

/// `pri` and, decoded from it, `facility` and `severity` by name.
fn push_pri<'a>(
    fields: &mut Vec<(&'static str, Value<'a>)>,
    caps: &Captures<'a>,
) -> Result<(), String> {
    let Some(m) = caps.name("pri") else {
        return Ok(());
    };
    let pri: usize = std::str::from_utf8(m.as_bytes())
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&p| p < FACILITIES.len() * 8)
        .ok_or("priority out of range (0..=191)")?;
    fields.push(("pri", Value::Int(pri as i64)));
    fields.push(("facility", Value::Static(FACILITIES[pri / 8])));
    fields.push(("severity", Value::Static(SEVERITIES[pri % 8])));
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::test_util::parse;
    use crate::{Outcome, Parser, ParserKind};
    use serde_json::json;

    #[test]
    fn regex_named_groups_become_fields_and_optional_ones_are_left_out() {
        let p = Parser::new(
            ParserKind::Regex,
            Some(r"^(?P<level>[A-Z]+) (?P<msg>.*?)(?: user=(?P<user>\w+))?$"),
        )
        .unwrap();
        let (v, o) = parse(&p, b"WARN disk almost full user=bob");
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(
            v,
            json!({"level": "WARN", "msg": "disk almost full", "user": "bob"})
        );
        let (v, _) = parse(&p, b"INFO started");
        assert_eq!(v, json!({"level": "INFO", "msg": "started"}));
        let (v, o) = parse(&p, b"lowercase does not match");
        assert_eq!(o, Outcome::Failed);
        assert_eq!(
            v,
            json!({"message": "lowercase does not match", "parse_error": "the line does not match the pattern"})
        );
    }

    #[test]
    fn nginx_combined_common_and_odd_requests() {
        let p = Parser::new(ParserKind::Nginx, None).unwrap();
        let (v, o) = parse(
            &p,
            br#"203.0.113.7 - alice [23/Nov/2026:05:00:00 +0000] "GET /api/v1/items?id=42 HTTP/1.1" 200 512 "https://example.com/" "Mozilla/5.0 (X11; Linux x86_64)""#,
        );
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(
            v,
            json!({"remote": "203.0.113.7", "user": "alice", "time": "23/Nov/2026:05:00:00 +0000",
                   "method": "GET", "path": "/api/v1/items?id=42", "protocol": "HTTP/1.1",
                   "code": 200, "size": 512, "referer": "https://example.com/",
                   "agent": "Mozilla/5.0 (X11; Linux x86_64)"})
        );
        // common format, no user, no body size
        let (v, o) = parse(
            &p,
            br#"::1 - - [23/Nov/2026:05:00:00 +0000] "HEAD / HTTP/1.0" 304 -"#,
        );
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(
            v,
            json!({"remote": "::1", "time": "23/Nov/2026:05:00:00 +0000", "method": "HEAD",
                   "path": "/", "protocol": "HTTP/1.0", "code": 304})
        );
        // a TLS probe on the plain port: the request is kept whole
        let (v, o) = parse(
            &p,
            br#"198.51.100.1 - - [23/Nov/2026:05:00:00 +0000] "\x16\x03\x01" 400 157 "-" "-""#,
        );
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(v["request"], r"\x16\x03\x01");
        assert_eq!(v["referer"], "-");
        let (v, o) = parse(&p, b"GET / HTTP/1.1");
        assert_eq!(o, Outcome::Failed);
        assert_eq!(v["parse_error"], "not in combined/common log format");
    }

    #[test]
    fn apache_combined_with_escaped_quotes() {
        let p = Parser::new(ParserKind::Apache, None).unwrap();
        let (v, o) = parse(
            &p,
            br#"192.0.2.1 - - [10/Oct/2000:13:55:36 -0700] "GET /a\"b HTTP/1.0" 200 2326 "http://x/\"q\"" "curl/8""#,
        );
        assert_eq!(o, Outcome::Parsed, "{v}");
        assert_eq!(v["path"], r#"/a\"b"#);
        assert_eq!(v["referer"], r#"http://x/\"q\""#);
        assert_eq!(v["size"], 2326);
    }

    #[test]
    fn syslog_3164_with_and_without_pri_and_tag() {
        let p = Parser::new(ParserKind::SyslogRfc3164, None).unwrap();
        let (v, o) = parse(
            &p,
            b"<34>Oct 11 22:14:15 mymachine su[230]: 'su root' failed for lonvick on /dev/pts/8",
        );
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(
            v,
            json!({"pri": 34, "facility": "auth", "severity": "crit", "time": "Oct 11 22:14:15",
                   "host": "mymachine", "ident": "su", "pid": "230",
                   "message": "'su root' failed for lonvick on /dev/pts/8"})
        );
        let (v, o) = parse(&p, b"Nov  3 04:05:06 web-1 CRON: job done");
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(
            v,
            json!({"time": "Nov  3 04:05:06", "host": "web-1", "ident": "CRON", "message": "job done"})
        );
        let (_, o) = parse(&p, b"<999>Oct 11 22:14:15 h x: y");
        assert_eq!(o, Outcome::Failed);
        let (v, o) = parse(&p, b"2026-11-23 not syslog");
        assert_eq!(o, Outcome::Failed);
        assert_eq!(v["message"], "2026-11-23 not syslog");
    }

    #[test]
    fn syslog_5424_with_structured_data_nil_values_and_bom() {
        let p = Parser::new(ParserKind::SyslogRfc5424, None).unwrap();
        let (v, o) = parse(
            &p,
            b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"App\\\"lic]ation\"][x@1 a=\"b\"] \xEF\xBB\xBFAn application event",
        );
        assert_eq!(o, Outcome::Parsed, "{v}");
        assert_eq!(
            v,
            json!({"pri": 165, "facility": "local4", "severity": "notice", "version": 1,
                   "time": "2003-10-11T22:14:15.003Z", "host": "mymachine.example.com",
                   "ident": "evntslog", "msgid": "ID47",
                   "structured_data": "[exampleSDID@32473 iut=\"3\" eventSource=\"App\\\"lic]ation\"][x@1 a=\"b\"]",
                   "message": "An application event"})
        );
        let (v, o) = parse(&p, b"<13>1 - - - - - -");
        assert_eq!(o, Outcome::Parsed, "{v}");
        assert_eq!(
            v,
            json!({"pri": 13, "facility": "user", "severity": "notice", "version": 1})
        );
        let (v, o) = parse(&p, b"<34>Oct 11 22:14:15 mymachine su: old format");
        assert_eq!(o, Outcome::Failed);
        assert_eq!(v["parse_error"], "not an RFC 5424 syslog line");
    }

    #[test]
    fn invalid_utf8_inside_fields_is_kept_as_bytes() {
        let p = Parser::new(ParserKind::SyslogRfc3164, None).unwrap();
        let (v, o) = parse(&p, b"Oct 11 22:14:15 host app: caf\xe9");
        assert_eq!(o, Outcome::Parsed);
        assert!(v["message"].as_str().unwrap().starts_with("bin:"), "{v}");
    }
}
