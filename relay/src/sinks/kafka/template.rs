//! Topic and key templates: text with `{tag}`, `{source}` and `{record.<field>}`
//! placeholders (`{record.kubernetes.namespace}` reads a nested field).

use sluice_forward::{record_path_value, FieldValue};

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Tag,
    Source,
    Field(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Why a template could not be rendered for an event.
#[derive(Debug, PartialEq)]
pub enum Missing {
    /// The record has no such field, or it is not a string or a number.
    Field(String),
    /// `{source}` of an event without provenance.
    Source,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Field(path) => write!(f, "the record has no string or number field {path}"),
            Missing::Source => write!(f, "the event has no source id"),
        }
    }
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!("{text:?}: a '}}' without its '{{'"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("{text:?}: a '{{' without its '}}'"));
            };
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "tag" => Part::Tag,
                "source" => Part::Source,
                _ => match name.strip_prefix("record.") {
                    Some(path) if !path.is_empty() && path.split('.').all(|s| !s.is_empty()) => {
                        Part::Field(path.split('.').map(str::to_string).collect())
                    }
                    _ => {
                        return Err(format!(
                        "{text:?}: unknown placeholder {{{name}}}; use {{tag}}, {{source}} or {{record.<field>}} (nested: {{record.a.b}})"
                    ))
                    }
                },
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The text, when the template has no placeholder.
    pub fn constant(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Text(t)] => Some(t),
            _ => None,
        }
    }

    /// Renders into `out` (cleared first).
    pub fn render(
        &self,
        out: &mut String,
        tag: &str,
        source: Option<&str>,
        record: &[u8],
    ) -> Result<(), Missing> {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Tag => out.push_str(tag),
                Part::Source => out.push_str(source.ok_or(Missing::Source)?),
                Part::Field(path) => {
                    let keys: smallvec_path::Path = path.iter().map(String::as_str).collect();
                    let missing = || Missing::Field(path.join("."));
                    match record_path_value(record, &keys).map_err(|_| missing())? {
                        Some((FieldValue::Bytes(b), _)) => {
                            out.push_str(std::str::from_utf8(b).map_err(|_| missing())?)
                        }
                        Some((FieldValue::Int(i), _)) => {
                            out.push_str(itoa::Buffer::new().format(i))
                        }
                        Some((FieldValue::Float(f), _)) => out.push_str(&f.to_string()),
                        Some((FieldValue::Other, _)) | None => return Err(missing()),
                    }
                }
            }
        }
        Ok(())
    }
}

impl Template {
    /// [`Template::render`] for a record given as JSON (an object line's, for `replay
    /// --into kafka`): the same text for the same event.
    pub fn render_json(
        &self,
        out: &mut String,
        tag: &str,
        source: Option<&str>,
        record: &serde_json::Value,
    ) -> Result<(), Missing> {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Tag => out.push_str(tag),
                Part::Source => out.push_str(source.ok_or(Missing::Source)?),
                Part::Field(path) => {
                    let missing = || Missing::Field(path.join("."));
                    let value = path.iter().try_fold(record, |v, k| v.get(k.as_str()));
                    match value.ok_or_else(missing)? {
                        serde_json::Value::String(s) => out.push_str(s),
                        // As `render` reads msgpack: an integer that fits an i64, else
                        // a float (an unsigned integer beyond i64 too).
                        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                            (Some(i), _) => out.push_str(itoa::Buffer::new().format(i)),
                            (None, Some(f)) => out.push_str(&f.to_string()),
                            (None, None) => return Err(missing()),
                        },
                        _ => return Err(missing()),
                    }
                }
            }
        }
        Ok(())
    }
}

/// Field paths are short: a few names on the stack, no allocation per event.
mod smallvec_path {
    pub struct Path<'a> {
        names: [&'a str; 8],
        len: usize,
        more: Vec<&'a str>,
    }

    impl<'a> FromIterator<&'a str> for Path<'a> {
        fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
            let mut p = Path {
                names: [""; 8],
                len: 0,
                more: Vec::new(),
            };
            for name in iter {
                if p.len < 8 && p.more.is_empty() {
                    p.names[p.len] = name;
                    p.len += 1;
                } else {
                    if p.more.is_empty() {
                        p.more.extend_from_slice(&p.names[..p.len]);
                    }
                    p.more.push(name);
                }
            }
            p
        }
    }

    impl<'a> std::ops::Deref for Path<'a> {
        type Target = [&'a str];
        fn deref(&self) -> &[&'a str] {
            if self.more.is_empty() {
                &self.names[..self.len]
            } else {
                &self.more
            }
        }
    }
}

/// Whether Kafka accepts `name` as a topic: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn legal_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmp::encode::{write_map_len, write_str};

    fn record() -> Vec<u8> {
        let mut rec = Vec::new();
        write_map_len(&mut rec, 3).unwrap();
        for (k, v) in [("service", "billing"), ("k8s", "")] {
            write_str(&mut rec, k).unwrap();
            if v.is_empty() {
                write_map_len(&mut rec, 1).unwrap();
                write_str(&mut rec, "ns").unwrap();
                write_str(&mut rec, "prod").unwrap();
            } else {
                write_str(&mut rec, v).unwrap();
            }
        }
        write_str(&mut rec, "shard").unwrap();
        rec.push(0x07);
        rec
    }

    #[test]
    fn renders_tag_source_and_fields() {
        let t =
            Template::parse("logs.{tag}.{record.service}-{record.k8s.ns}.{record.shard}").unwrap();
        let mut out = String::new();
        t.render(&mut out, "app", Some("h:1"), &record()).unwrap();
        assert_eq!(out, "logs.app.billing-prod.7");
        assert!(t.constant().is_none());
        let k = Template::parse("{source}").unwrap();
        k.render(&mut out, "app", Some("h:1"), &record()).unwrap();
        assert_eq!(out, "h:1");
        assert_eq!(
            k.render(&mut out, "app", None, &record()),
            Err(Missing::Source)
        );
        assert_eq!(Template::parse("logs").unwrap().constant(), Some("logs"));
    }

    /// A replay from objects keys each event as the sink did: the JSON record renders
    /// the text the msgpack one did.
    #[test]
    fn json_records_render_what_msgpack_ones_do() {
        let mut json = Vec::new();
        sluice_forward::record_to_json(&record(), &mut json).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        for text in [
            "logs.{tag}.{record.service}-{record.k8s.ns}.{record.shard}",
            "{source}",
            "{record.team}",
            "{record.k8s}",
        ] {
            let t = Template::parse(text).unwrap();
            let (mut a, mut b) = (String::new(), String::new());
            let want = t.render(&mut a, "app", Some("h:1"), &record());
            let got = t.render_json(&mut b, "app", Some("h:1"), &json);
            assert_eq!(want, got, "{text}");
            assert_eq!(a, b, "{text}");
        }
    }

    #[test]
    fn a_missing_field_is_named() {
        let t = Template::parse("logs.{record.team}").unwrap();
        let e = t
            .render(&mut String::new(), "app", None, &record())
            .unwrap_err();
        assert_eq!(e, Missing::Field("team".into()));
        let t = Template::parse("logs.{record.k8s}").unwrap();
        assert!(
            t.render(&mut String::new(), "app", None, &record())
                .is_err(),
            "a map is not text"
        );
    }

    #[test]
    fn mistakes_are_explained() {
        for (bad, says) in [
            ("logs.{tga}", "unknown placeholder {tga}"),
            ("logs.{record.}", "unknown placeholder"),
            ("logs.{tag", "without its '}'"),
            ("logs.}", "without its '{'"),
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn topic_names_kafka_accepts() {
        assert!(legal_topic("logs.app_1-x"));
        for bad in ["", ".", "..", "logs/app", "logs app", &"x".repeat(250)] {
            assert!(!legal_topic(bad), "{bad:?}");
        }
    }
}
