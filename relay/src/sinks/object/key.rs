//! Object keys from a template (`key_template`):
//!
//! ```text
//! {prefix}/{tag}/dt={dt}/hour={hour}/{relay}-{incarnation}-{first}-{last}.ndjson.gz
//! ```
//!
//! - `{prefix}`: the sink's prefix (its own path parts, or nothing);
//! - `{tag}`, `{dt}` (`YYYY-MM-DD`), `{hour}` (`HH`): the partition, by *event* time;
//! - `{relay}`, `{incarnation}`: who wrote it ([`crate::incarnation`]);
//! - `{first}`, `{last}`: the spool positions where the delivery's gathering started
//!   and ended (`<segment>.<offset>`, zero-padded), so a delivery repeated after a crash
//!   writes the same key and no two deliveries share one.
//!
//! Every path part is percent-encoded by `object_store` after the values are put in
//! (`/` in a tag becomes `%2F`, `%` becomes `%25`), so two tags never share a folder.
//! The folder of a key (everything before its last `/`) is the partition: the hour's
//! manifests and `_SUCCESS` markers go there.

use object_store::path::{Path as ObjectPath, PathPart};
use sluice_spool::Position;

use crate::envelope::civil_from_days;

pub const DEFAULT_TEMPLATE: &str =
    "{prefix}/{tag}/dt={dt}/hour={hour}/{relay}-{incarnation}-{first}-{last}.ndjson.gz";

const SUFFIX: &str = ".ndjson.gz";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Tag,
    Dt,
    Hour,
    Relay,
    Incarnation,
    First,
    Last,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(Field),
}

/// A parsed `key_template`.
#[derive(Clone, Debug)]
pub struct KeyTemplate {
    /// Whether the key starts with `{prefix}` (a part of its own).
    prefixed: bool,
    /// The parts after `{prefix}`; the last is the object's name.
    parts: Vec<Vec<Piece>>,
}

/// What one object's key is made of.
pub struct KeyValues<'a> {
    pub prefix: &'a str,
    pub tag: &'a str,
    pub hour: u64,
    pub relay: &'a str,
    pub incarnation: &'a str,
    pub first: Position,
    pub last: Position,
}

fn position(p: Position) -> String {
    format!("{:010}.{:012}", p.segment, p.offset)
}

/// `YYYY-MM-DD` and `HH` of an hour number.
pub fn date_and_hour(hour: u64) -> (String, String) {
    let secs = hour as i64 * 3600;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}", secs.rem_euclid(86_400) / 3600),
    )
}

impl KeyTemplate {
    /// Parses and checks a template: the folder must hold `{tag}`, `{dt}` and `{hour}`
    /// (a folder is an hour's partition), the name `{relay}`, `{incarnation}`, `{first}`
    /// and `{last}` (so keys are unique) and end in `.ndjson.gz`.
    pub fn parse(template: &str) -> Result<KeyTemplate, String> {
        let mut parts: Vec<&str> = template.split('/').collect();
        let prefixed = parts.first() == Some(&"{prefix}");
        if prefixed {
            parts.remove(0);
        }
        if template.matches("{prefix}").count() > usize::from(prefixed) {
            return Err(format!(
                "key_template {template:?}: {{prefix}} can only be the first folder"
            ));
        }
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!("key_template {template:?}: expected folders and a name separated by single '/', e.g. {DEFAULT_TEMPLATE:?}"));
        }
        let mut parsed = Vec::new();
        for part in &parts {
            parsed.push(pieces(part).map_err(|e| format!("key_template {template:?}: {e}"))?);
        }
        let has = |parts: &[Vec<Piece>], f: Field| {
            parts
                .iter()
                .flatten()
                .filter(|p| **p == Piece::Field(f))
                .count()
        };
        let (folders, name) = parsed.split_at(parsed.len() - 1);
        for (field, label) in [
            (Field::Tag, "{tag}"),
            (Field::Dt, "{dt}"),
            (Field::Hour, "{hour}"),
        ] {
            if has(folders, field) != 1 || has(name, field) != 0 {
                return Err(format!("key_template {template:?}: {label} must appear once, in a folder (each hour of each tag is a folder: its manifests go there)"));
            }
        }
        for (field, label) in [
            (Field::Relay, "{relay}"),
            (Field::Incarnation, "{incarnation}"),
            (Field::First, "{first}"),
            (Field::Last, "{last}"),
        ] {
            if has(name, field) != 1 || has(folders, field) != 0 {
                return Err(format!("key_template {template:?}: {label} must appear once, in the object's name (it keeps keys unique across relays, restarts and deliveries)"));
            }
        }
        match name[0].last() {
            Some(Piece::Text(t)) if t.ends_with(SUFFIX) => {}
            _ => {
                return Err(format!(
                    "key_template {template:?}: the name must end in {SUFFIX:?}"
                ))
            }
        }
        Ok(KeyTemplate {
            prefixed,
            parts: parsed,
        })
    }

    fn render(&self, v: &KeyValues<'_>, part: &[Piece]) -> String {
        let (dt, hh) = date_and_hour(v.hour);
        let mut out = String::new();
        for piece in part {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(Field::Tag) => out.push_str(v.tag),
                Piece::Field(Field::Dt) => out.push_str(&dt),
                Piece::Field(Field::Hour) => out.push_str(&hh),
                Piece::Field(Field::Relay) => out.push_str(v.relay),
                Piece::Field(Field::Incarnation) => out.push_str(v.incarnation),
                Piece::Field(Field::First) => out.push_str(&position(v.first)),
                Piece::Field(Field::Last) => out.push_str(&position(v.last)),
            }
        }
        out
    }

    fn prefix_parts(&self, prefix: &str) -> Vec<PathPart<'static>> {
        if self.prefixed {
            ObjectPath::from(prefix)
                .parts()
                .map(|p| PathPart::from(p.as_ref().to_string()))
                .collect()
        } else {
            Vec::new()
        }
    }

    /// The folder of an hour of a tag: where its objects, manifests and markers go.
    pub fn partition(&self, v: &KeyValues<'_>) -> ObjectPath {
        let folders = &self.parts[..self.parts.len() - 1];
        self.prefix_parts(v.prefix)
            .into_iter()
            .chain(folders.iter().map(|p| PathPart::from(self.render(v, p))))
            .collect()
    }

    /// The key of an object; `copy` > 0 for one written beside an existing key with
    /// other content (`<name>.<copy>.ndjson.gz`).
    pub fn key(&self, v: &KeyValues<'_>, copy: u32) -> ObjectPath {
        let mut name = self.render(v, &self.parts[self.parts.len() - 1]);
        if copy > 0 {
            name.truncate(name.len() - SUFFIX.len());
            name.push_str(&format!(".{copy}{SUFFIX}"));
        }
        self.partition(v)
            .parts()
            .chain([PathPart::from(name)])
            .collect()
    }

    /// The relay id and incarnation of a key this template made under `prefix`; `None`
    /// for any other key (manifests, markers, leases, other files).
    pub fn writer_of(&self, prefix: &str, key: &str) -> Option<(String, String)> {
        let mut parts: Vec<&str> = key.split('/').collect();
        let skip = self.prefix_parts(prefix).len();
        let expected: Vec<String> = self
            .prefix_parts(prefix)
            .iter()
            .map(|p| p.as_ref().to_string())
            .collect();
        if parts.len() != skip + self.parts.len() || parts[..skip] != expected[..] {
            return None;
        }
        parts.drain(..skip);
        let mut found = (None, None);
        for (i, (part, pieces)) in parts.iter().zip(&self.parts).enumerate() {
            let mut caught = Vec::new();
            let last = i == self.parts.len() - 1;
            let fits = matches(part, pieces, &mut caught)
                || (last
                    && strip_copy(part).is_some_and(|name| {
                        caught.clear();
                        matches(&name, pieces, &mut caught)
                    }));
            if !fits {
                return None;
            }
            for (field, value) in caught {
                match field {
                    Field::Relay => found.0 = Some(value),
                    Field::Incarnation => found.1 = Some(value),
                    _ => {}
                }
            }
        }
        let relay = percent_decode(&found.0?);
        Some((relay, found.1?))
    }
}

/// `<name>.<n>.ndjson.gz` → `<name>.ndjson.gz`, if the name has a copy number.
fn strip_copy(name: &str) -> Option<String> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (s, n) = stem.rsplit_once('.')?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| format!("{s}{SUFFIX}"))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) if b[i] == b'%' => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn pieces(part: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut rest = part;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            out.push(Piece::Text(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {part:?}"))?;
        let name = &rest[open + 1..open + close];
        let field = match name {
            "tag" => Field::Tag,
            "dt" => Field::Dt,
            "hour" => Field::Hour,
            "relay" => Field::Relay,
            "incarnation" => Field::Incarnation,
            "first" => Field::First,
            "last" => Field::Last,
            "prefix" => return Err("{prefix} can only be the first folder".into()),
            other => return Err(format!("unknown placeholder {{{other}}}; known: {{prefix}}, {{tag}}, {{dt}}, {{hour}}, {{relay}}, {{incarnation}}, {{first}}, {{last}}")),
        };
        if matches!(out.last(), Some(Piece::Field(_))) {
            return Err(format!(
                "{{{name}}} follows another placeholder directly in {part:?}; put text between them"
            ));
        }
        out.push(Piece::Field(field));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest.to_string()));
    }
    Ok(out)
}

/// Whether `value` can be what `field` renders (as encoded in a key part).
fn fits(field: Field, value: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match field {
        Field::Tag | Field::Relay => !value.is_empty(),
        Field::Dt => {
            value.len() == 10
                && value.bytes().enumerate().all(|(i, b)| {
                    if i == 4 || i == 7 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                })
        }
        Field::Hour => value.len() == 2 && digits(value),
        Field::Incarnation => crate::incarnation::is_incarnation(value),
        Field::First | Field::Last => value
            .split_once('.')
            .is_some_and(|(s, o)| digits(s) && digits(o)),
    }
}

/// Matches `text` against `pieces`, recording what each field took.
fn matches(text: &str, pieces: &[Piece], caught: &mut Vec<(Field, String)>) -> bool {
    match pieces.split_first() {
        None => text.is_empty(),
        Some((Piece::Text(t), rest)) => text
            .strip_prefix(t.as_str())
            .is_some_and(|r| matches(r, rest, caught)),
        Some((Piece::Field(f), rest)) => {
            // Fields are followed by text (checked at parse), so try each cut.
            for cut in (1..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let (value, after) = text.split_at(cut);
                if fits(*f, value) {
                    let mark = caught.len();
                    caught.push((*f, value.to_string()));
                    if matches(after, rest, caught) {
                        return true;
                    }
                    caught.truncate(mark);
                }
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(tag: &'a str, relay: &'a str) -> KeyValues<'a> {
        KeyValues {
            prefix: "logs/raw",
            tag,
            hour: 491_000,
            relay,
            incarnation: "i0123456789abcdef",
            first: Position {
                segment: 3,
                offset: 40,
            },
            last: Position {
                segment: 4,
                offset: 1234,
            },
        }
    }

    #[test]
    fn the_default_key() {
        let t = KeyTemplate::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(
            t.key(&values("app.web", "relay-1"), 0).to_string(),
            "logs/raw/app.web/dt=2026-01-05/hour=08/relay-1-i0123456789abcdef-0000000003.000000000040-0000000004.000000001234.ndjson.gz"
        );
        assert_eq!(
            t.key(&values("app.web", "relay-1"), 2).to_string(),
            "logs/raw/app.web/dt=2026-01-05/hour=08/relay-1-i0123456789abcdef-0000000003.000000000040-0000000004.000000001234.2.ndjson.gz"
        );
        assert_eq!(
            t.partition(&values("a/b", "r")).to_string(),
            "logs/raw/a%2Fb/dt=2026-01-05/hour=08"
        );
    }

    #[test]
    fn tags_never_share_a_folder() {
        let t = KeyTemplate::parse(DEFAULT_TEMPLATE).unwrap();
        let tags = ["a/b", "a_b", "a%2Fb", "a\\b", "a b", "..", ".", "_sluice"];
        let keys: std::collections::BTreeSet<String> = tags
            .iter()
            .map(|tag| t.key(&values(tag, "r"), 0).to_string())
            .collect();
        assert_eq!(keys.len(), tags.len(), "{keys:?}");
        for k in &keys {
            assert_eq!(
                k.matches('/').count(),
                5,
                "a tag made a folder of its own: {k}"
            );
        }
    }

    #[test]
    fn a_key_names_its_writer() {
        let t = KeyTemplate::parse(DEFAULT_TEMPLATE).unwrap();
        for relay in ["relay-1", "r", "a-b-c", "x/y"] {
            for copy in [0, 3] {
                let key = t.key(&values("t-1", relay), copy).to_string();
                assert_eq!(
                    t.writer_of("logs/raw", &key),
                    Some((relay.to_string(), "i0123456789abcdef".to_string())),
                    "{key}"
                );
            }
        }
        let key = t.key(&values("t", "r"), 0).to_string();
        assert_eq!(t.writer_of("other", &key), None);
        assert_eq!(
            t.writer_of(
                "logs/raw",
                "logs/raw/t/dt=2026-01-05/hour=08/_manifests/r-i0123456789abcdef.r000001.json"
            ),
            None
        );
        assert_eq!(
            t.writer_of("logs/raw", "logs/raw/t/dt=2026-01-05/hour=08/_SUCCESS-r"),
            None
        );
    }

    #[test]
    fn templates_are_checked() {
        let ok = "{prefix}/{tag}/{dt}/{hour}/{relay}.{incarnation}.{first}.{last}.ndjson.gz";
        KeyTemplate::parse(ok).unwrap();
        let no_prefix = KeyTemplate::parse(
            "{tag}/dt={dt}-{hour}/{relay}-{incarnation}-{first}-{last}.ndjson.gz",
        )
        .unwrap();
        assert_eq!(
            no_prefix.key(&values("t", "r"), 0).to_string(),
            "t/dt=2026-01-05-08/r-i0123456789abcdef-0000000003.000000000040-0000000004.000000001234.ndjson.gz"
        );
        for (bad, says) in [
            (
                "{prefix}/{tag}/{dt}/{relay}-{incarnation}-{first}-{last}.ndjson.gz",
                "{hour}",
            ),
            (
                "{prefix}/{tag}/{dt}/{hour}/{relay}-{first}-{last}.ndjson.gz",
                "{incarnation}",
            ),
            (
                "{prefix}/{tag}/{dt}/{hour}/{relay}-{incarnation}-{first}.ndjson.gz",
                "{last}",
            ),
            (
                "{prefix}/{tag}/{dt}/{hour}/{relay}-{incarnation}-{first}-{last}.json",
                ".ndjson.gz",
            ),
            (
                "{prefix}/{tag}/{dt}/{hour}/{relay}-{incarnation}-{first}-{last}-{day}.ndjson.gz",
                "unknown placeholder {day}",
            ),
            (
                "{tag}/{prefix}/{dt}/{hour}/{relay}-{incarnation}-{first}-{last}.ndjson.gz",
                "first folder",
            ),
            (
                "{prefix}/{tag}/{dt}/{hour}/{relay}{incarnation}-{first}-{last}.ndjson.gz",
                "put text between",
            ),
            (
                "{prefix}//{tag}/{dt}/{hour}/{relay}-{incarnation}-{first}-{last}.ndjson.gz",
                "single '/'",
            ),
        ] {
            let e = KeyTemplate::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
