//! nginx/Apache `combined`: `remote ident user [time] "request" code size "referer"
//! "agent"`; `common` is the same without referer and agent. Quoted fields may hold `\"`.
//!
//! Hand-written: one pass over the line's bytes, no allocation. It accepts exactly what
//! the regular expression below accepts and yields the same fields (a test holds the two
//! against each other on generated and mutated lines); the regex with ten captures cost
//! about as much as all the rest of the agent's path per line.
//!
//! ```text
//! ^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]*)\] "(?P<request>(?:[^"\\]|\\.)*)"
//!  (?P<code>\d{3}) (?P<size>\d+|-)(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?
//! ```
//!
//! Not anchored at the end: whatever follows the last field is ignored, as with the regex.

use crate::record::{is_utf8, Room};

/// The key the time field is written under (the parsers' default `time_key`).
pub(crate) const TIME_KEY: &str = "time";

/// The parser has no state; the struct keeps `Parser`'s shape.
#[derive(Debug, Default)]
pub(crate) struct Combined;

const NOT_COMBINED: &str = "not in combined/common log format";

/// The record's keys, each as the MessagePack fixstr it is written as (a test holds them
/// to their names).
mod key {
    pub const REMOTE: &[u8] = b"\xa6remote";
    pub const USER: &[u8] = b"\xa4user";
    pub const TIME: &[u8] = b"\xa4time";
    pub const METHOD: &[u8] = b"\xa6method";
    pub const PATH: &[u8] = b"\xa4path";
    pub const PROTOCOL: &[u8] = b"\xa8protocol";
    pub const REQUEST: &[u8] = b"\xa7request";
    pub const CODE: &[u8] = b"\xa4code";
    pub const SIZE: &[u8] = b"\xa4size";
    pub const REFERER: &[u8] = b"\xa7referer";
    pub const AGENT: &[u8] = b"\xa5agent";
}

impl Combined {
    pub fn new() -> Combined {
        Combined
    }

    /// Writes the record and returns the text of its `time` field (a slice of `line`), so
    /// the event time need not be looked up in the record again.
    ///
    /// Written into room grown once by `line.len() + ROOM` (see `record::Room`): the map
    /// header (at most 10 fields, a fixmap) first and its count set at the end, each key
    /// a constant, each value one header and one copy.
    pub fn write<'a>(&self, line: &'a [u8], out: &mut Vec<u8>) -> Result<&'a [u8], &'static str> {
        let f = Fields::parse(line).ok_or(NOT_COMBINED)?;
        // One UTF-8 check for the whole line: the fields are cut at ASCII bytes, so each
        // is valid if the line is (checked per field, it cost a tenth of the parse).
        let utf8 = is_utf8(line);
        Room::write(out, line.len() + ROOM, |r| {
            let head = r.at();
            r.bytes(&[0x80]);
            // code, and size when there is one, are written below without `text!`, which
            // counts the others.
            let mut n = 1 + u8::from(f.size.is_some());
            // A macro, not a closure: each key stays a constant, copied without a call.
            macro_rules! text {
                ($key:expr, $field:expr) => {{
                    let field = $field;
                    r.bytes($key);
                    r.put_bytes(!(utf8 || is_utf8(field)), field);
                    n += 1;
                }};
            }
            text!(key::REMOTE, f.remote);
            if f.user != b"-" {
                text!(key::USER, f.user);
            }
            text!(key::TIME, f.time);
            // "GET /path HTTP/1.1"; a malformed request (a TLS probe, "-") is kept whole.
            match split_request(f.request) {
                Some((method, path, protocol)) => {
                    text!(key::METHOD, method);
                    text!(key::PATH, path);
                    if let Some(protocol) = protocol {
                        text!(key::PROTOCOL, protocol);
                    }
                }
                None => text!(key::REQUEST, f.request),
            }
            r.bytes(key::CODE);
            r.put_int(f.code);
            if let Some(size) = f.size {
                r.bytes(key::SIZE);
                r.put_int(size);
            }
            if let Some((referer, agent)) = f.tail {
                text!(key::REFERER, referer);
                text!(key::AGENT, agent);
            }
            r.set(head, 0x80 | n);
        });
        Ok(f.time)
    }
}

/// What a record can add to its line's bytes: the map header, every key, a header of at
/// most 5 bytes for each of the at most 8 text fields (their bytes are the line's) and
/// two integers of at most 9.
const ROOM: usize = 1 + KEYS + 8 * 5 + 2 * 9;
const KEYS: usize = {
    use key::*;
    let all = [
        REMOTE, USER, TIME, METHOD, PATH, PROTOCOL, REQUEST, CODE, SIZE, REFERER, AGENT,
    ];
    let (mut sum, mut i) = (0, 0);
    while i < all.len() {
        sum += all[i].len();
        i += 1;
    }
    sum
};

/// method, path and protocol (when there is one).
type Request<'a> = (&'a [u8], &'a [u8], Option<&'a [u8]>);

/// `method path [protocol]`: the request split at its spaces, as `splitn(4, ' ')` would
/// (two or three parts, the method not empty); `None` keeps the request whole.
fn split_request(request: &[u8]) -> Option<Request<'_>> {
    let sp = memchr::memchr(b' ', request)?;
    let method = &request[..sp];
    if method.is_empty() {
        return None;
    }
    let rest = &request[sp + 1..];
    let Some(sp) = memchr::memchr(b' ', rest) else {
        return Some((method, rest, None));
    };
    let protocol = &rest[sp + 1..];
    if memchr::memchr(b' ', protocol).is_some() {
        return None;
    }
    Some((method, &rest[..sp], Some(protocol)))
}

/// The captures of one line.
struct Fields<'a> {
    remote: &'a [u8],
    user: &'a [u8],
    time: &'a [u8],
    request: &'a [u8],
    code: i64,
    /// `None` for `-`, or digits that do not fit an i64 (left out, like the regex's
    /// parser did).
    size: Option<i64>,
    /// referer and agent, when both are there.
    tail: Option<(&'a [u8], &'a [u8])>,
}

/// The regex's `\s` without Unicode: `[\t\n\v\f\r ]`.
fn is_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// How many bytes `b` starts with that are not `\s`. Out of line: inlined, the loop
/// kept ten induction variables for the code after it (17 instructions a byte).
#[inline(never)]
fn run_len(b: &[u8]) -> usize {
    let mut len = 0;
    while len < b.len() && !is_space(b[len]) {
        len += 1;
    }
    len
}

/// A cursor over the line.
struct Scan<'a> {
    line: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn byte(&mut self, b: u8) -> Option<()> {
        (self.line.get(self.at) == Some(&b)).then(|| self.at += 1)
    }

    /// `\S+ ` — the run, without the space after it.
    fn word_then_space(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        let len = run_len(&self.line[start..]);
        if len == 0 {
            return None;
        }
        self.at += len;
        self.byte(b' ')?;
        Some(&self.line[start..start + len])
    }

    /// `"(?:[^"\\]|\\.)*"` — the text between the quotes, escapes kept as they are.
    fn quoted(&mut self) -> Option<&'a [u8]> {
        self.byte(b'"')?;
        let start = self.at;
        loop {
            self.at += memchr::memchr2(b'"', b'\\', &self.line[self.at..])?;
            match self.line[self.at] {
                b'"' => break,
                // `.` is any byte but a newline.
                b'\\' if self.line.get(self.at + 1).is_some_and(|&b| b != b'\n') => self.at += 2,
                b'\\' => return None,
                _ => self.at += 1,
            }
        }
        let text = &self.line[start..self.at];
        self.at += 1;
        Some(text)
    }

    /// `\d{3}` then a space.
    fn code(&mut self) -> Option<i64> {
        let digits = self.line.get(self.at..self.at + 3)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.at += 3;
        self.byte(b' ')?;
        Some(digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    }

    /// `\d+|-`: `Some(None)` for `-` and for digits past i64.
    fn size(&mut self) -> Option<Option<i64>> {
        let start = self.at;
        let mut n: Option<i64> = Some(0);
        while let Some(&d) = self.line.get(self.at).filter(|d| d.is_ascii_digit()) {
            n = n
                .and_then(|n| n.checked_mul(10))
                .and_then(|n| n.checked_add(i64::from(d - b'0')));
            self.at += 1;
        }
        if self.at == start {
            return self.byte(b'-').map(|()| None);
        }
        Some(n)
    }
}

impl<'a> Fields<'a> {
    fn parse(line: &'a [u8]) -> Option<Fields<'a>> {
        let mut s = Scan { line, at: 0 };
        let remote = s.word_then_space()?;
        s.word_then_space()?;
        let user = s.word_then_space()?;
        s.byte(b'[')?;
        let time_len = memchr::memchr(b']', &line[s.at..])?;
        let time = &line[s.at..s.at + time_len];
        s.at += time_len + 1;
        s.byte(b' ')?;
        let request = s.quoted()?;
        s.byte(b' ')?;
        let code = s.code()?;
        let size = s.size()?;
        // The optional ` "referer" "agent"`: all of it, or nothing.
        let tail = (|| {
            s.byte(b' ')?;
            let referer = s.quoted()?;
            s.byte(b' ')?;
            Some((referer, s.quoted()?))
        })();
        Some(Fields {
            remote,
            user,
            time,
            request,
            code,
            size,
            tail,
        })
    }
}

#[cfg(test)]
mod tests {
    use regex::bytes::Regex;

    use super::*;
    use crate::record::{write_fields, Value};

    #[test]
    fn each_key_is_its_name_as_a_fixstr() {
        for (bytes, name) in [
            (key::REMOTE, "remote"),
            (key::USER, "user"),
            (key::TIME, TIME_KEY),
            (key::METHOD, "method"),
            (key::PATH, "path"),
            (key::PROTOCOL, "protocol"),
            (key::REQUEST, "request"),
            (key::CODE, "code"),
            (key::SIZE, "size"),
            (key::REFERER, "referer"),
            (key::AGENT, "agent"),
        ] {
            let mut want = Vec::new();
            rmp::encode::write_str(&mut want, name).unwrap();
            assert_eq!(bytes, &want[..], "{name}");
        }
    }

    /// The regex the parser replaced, with the old field rules: the oracle.
    fn by_regex(re: &Regex, line: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(caps) = re.captures(line) else {
            return false;
        };
        let text = |name| caps.name(name).map(|m| Value::Text(m.as_bytes()));
        let int = |name| {
            caps.name(name)
                .and_then(|m| std::str::from_utf8(m.as_bytes()).ok())
                .and_then(|s| s.parse::<i64>().ok())
                .map(Value::Int)
        };
        let mut fields: Vec<(&str, Value<'_>)> = Vec::new();
        fields.push(("remote", text("remote").unwrap()));
        if let Some(user) = caps.name("user").filter(|u| u.as_bytes() != b"-") {
            fields.push(("user", Value::Text(user.as_bytes())));
        }
        fields.push(("time", text("time").unwrap()));
        let request = caps.name("request").map_or(&b""[..], |m| m.as_bytes());
        let parts: Vec<&[u8]> = request.split(|&b| b == b' ').collect();
        match parts.as_slice() {
            [method, path, protocol] if !method.is_empty() => {
                fields.push(("method", Value::Text(method)));
                fields.push(("path", Value::Text(path)));
                fields.push(("protocol", Value::Text(protocol)));
            }
            [method, path] if !method.is_empty() => {
                fields.push(("method", Value::Text(method)));
                fields.push(("path", Value::Text(path)));
            }
            _ => fields.push(("request", Value::Text(request))),
        }
        for (name, value) in [
            ("code", int("code")),
            ("size", int("size")),
            ("referer", text("referer")),
            ("agent", text("agent")),
        ] {
            if let Some(v) = value {
                fields.push((name, v));
            }
        }
        write_fields(out, &fields);
        true
    }

    fn oracle() -> Regex {
        Regex::new(
            r#"(?-u)^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]*)\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<code>\d{3}) (?P<size>\d+|-)(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?"#,
        )
        .unwrap()
    }

    fn agree(re: &Regex, line: &[u8]) {
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let matched = by_regex(re, line, &mut want);
        let parsed = Combined.write(line, &mut got).is_ok();
        assert_eq!(
            parsed,
            matched,
            "accepts differently: {:?}",
            String::from_utf8_lossy(line)
        );
        assert_eq!(
            got,
            want,
            "fields differ: {:?}",
            String::from_utf8_lossy(line)
        );
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, from: &[&'a [u8]]) -> &'a [u8] {
            from[self.below(from.len())]
        }
    }

    #[test]
    fn agrees_with_the_regex_on_known_lines() {
        let re = oracle();
        for line in [
            &br#"203.0.113.7 - alice [23/Nov/2026:05:00:00 +0000] "GET /a?id=42 HTTP/1.1" 200 512 "https://e.com/" "Mozilla/5.0 (X11)""#[..],
            br#"::1 - - [23/Nov/2026:05:00:00 +0000] "HEAD / HTTP/1.0" 304 -"#,
            br#"1.2.3.4 - - [t] "\x16\x03\x01" 400 157 "-" "-""#,
            br#"1.2.3.4 - - [t] "GET /a\"b HTTP/1.0" 200 2326 "http://x/\"q\"" "curl/8""#,
            br#"1.2.3.4 - - [t] "GET / HTTP/1.1" 200 99999999999999999999 "r" "a""#,
            br#"1.2.3.4 - - [t] "GET / HTTP/1.1" 200 12 "r" "a" trailing junk"#,
            br#"1.2.3.4 - - [t] "GET / HTTP/1.1" 200 12 "r""#,
            br#"1.2.3.4 - - [t] "GET / HTTP/1.1" 200 12x"#,
            br#"1.2.3.4 - - [t] "GET / HTTP/1.1" 2000 12"#,
            br#"1.2.3.4 - - [t] "GET / HTTP/1.1" 20 12"#,
            br#"1.2.3.4 - - [t] "GET  HTTP/1.1" 200 1"#,
            br#"1.2.3.4 - - [t] " GET / HTTP/1.1" 200 1"#,
            br#"1.2.3.4 - - [t] "a b c d" 200 1"#,
            br#"1.2.3.4 - - [t] "" 200 1"#,
            br#"1.2.3.4 - - [] "x y" 200 -"#,
            br#"1.2.3.4 - - [a]b] "x y" 200 -"#,
            br#"1.2.3.4 - - [t] "x \" 200 1"#,
            b"1.2.3.4 - - [t] \"x \\\n\" 200 1",
            b"1.2.3.4\t- - [t] \"x\" 200 1",
            b"1.2.3.4  - - [t] \"x\" 200 1",
            b"1.2.3.4 - - [t]  \"x\" 200 1",
            b"caf\xe9 - - [t] \"GET /\xff HTTP/1.1\" 200 1 \"\xfe\" \"a\"",
            b"GET / HTTP/1.1",
            b"",
            b" ",
        ] {
            agree(&re, line);
        }
        // Fields past a fixstr, a str8 and a str16 (the record's room counts the largest
        // headers), in UTF-8 and not.
        for (path, agent) in [(40, 300), (300, 70_000), (255, 65_536)] {
            for extra in [&b""[..], b"\xe9", b"\xc3\xa9"] {
                let mut line = b"1.2.3.4 - bob [t] \"GET /".to_vec();
                line.extend(std::iter::repeat_n(b'p', path));
                line.extend_from_slice(b" HTTP/1.1\" 200 1 \"");
                line.extend_from_slice(extra);
                line.extend(std::iter::repeat_n(b'r', agent));
                line.extend_from_slice(b"\" \"");
                line.extend(std::iter::repeat_n(b'a', agent));
                line.push(b'"');
                agree(&re, &line);
            }
        }
    }

    #[test]
    fn agrees_with_the_regex_on_generated_and_mutated_lines() {
        let re = oracle();
        let mut rng = Rng(0x5eed_cafe_f00d_d00d);
        let remotes: &[&[u8]] = &[b"10.0.0.1", b"::1", b"-", b"host-a", b"", b"a\tb"];
        let users: &[&[u8]] = &[b"-", b"alice", b"", b"svc batch"];
        let times: &[&[u8]] = &[b"23/Nov/2026:05:00:00 +0000", b"", b"x]y", b"a b"];
        let requests: &[&[u8]] = &[
            b"GET / HTTP/1.1",
            b"POST /api/v1/items?x=1&y=\\\"2\\\" HTTP/2.0",
            b"GET /",
            b"-",
            b"",
            b"\\x16\\x03",
            b"a b c d",
            b" x y",
            b"x\\",
            b"x\\\\",
        ];
        let codes: &[&[u8]] = &[b"200", b"404", b"20", b"2000", b"2x0"];
        let sizes: &[&[u8]] = &[
            b"0",
            b"512",
            b"-",
            b"",
            b"12x",
            b"99999999999999999999",
            b"-1",
        ];
        let quoted: &[&[u8]] = &[b"-", b"https://e.com/", b"a \\\" b", b"", b"x\\"];
        let alphabet = b" \t\"\\[]-0123456789aZ\n\xff";
        for _ in 0..20_000 {
            let mut line = Vec::new();
            line.extend_from_slice(rng.pick(remotes));
            line.extend_from_slice(b" - ");
            line.extend_from_slice(rng.pick(users));
            line.extend_from_slice(b" [");
            line.extend_from_slice(rng.pick(times));
            line.extend_from_slice(b"] \"");
            line.extend_from_slice(rng.pick(requests));
            line.extend_from_slice(b"\" ");
            line.extend_from_slice(rng.pick(codes));
            line.push(b' ');
            line.extend_from_slice(rng.pick(sizes));
            match rng.below(3) {
                0 => {}
                1 => {
                    line.extend_from_slice(b" \"");
                    line.extend_from_slice(rng.pick(quoted));
                    line.extend_from_slice(b"\" \"");
                    line.extend_from_slice(rng.pick(quoted));
                    line.push(b'"');
                }
                _ => {
                    line.extend_from_slice(b" \"");
                    line.extend_from_slice(rng.pick(quoted));
                    line.push(b'"');
                }
            }
            // Up to three mutations: replace, insert or delete one byte.
            for _ in 0..rng.below(4) {
                let at = rng.below(line.len() + 1);
                let b = alphabet[rng.below(alphabet.len())];
                match rng.below(3) {
                    0 if at < line.len() => line[at] = b,
                    1 => line.insert(at, b),
                    _ if at < line.len() => {
                        line.remove(at);
                    }
                    _ => {}
                }
            }
            agree(&re, &line);
        }
    }
}
