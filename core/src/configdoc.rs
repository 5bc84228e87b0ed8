//! Config reference tables and `--check-config` settings, generated from the config
//! structs themselves, so that a key, its default and its meaning are declared once.
//!
//! Every config struct derives `schemars::JsonSchema`: its doc comments become
//! descriptions, its serde defaults become defaults, enum variants list their values with
//! their own doc comments. [`markdown`] turns a list of sections into the tables in
//! docs/*.md (a test in each binary crate fails when the docs differ); [`settings`] prints
//! what a loaded config says for every key, with secrets (fields marked
//! `#[schemars(extend("x-secret" = true))]`) redacted.
//!
//! ```
//! #[derive(serde::Serialize, schemars::JsonSchema)]
//! struct Section {
//!     /// Address to listen on.
//!     #[serde(default = "listen")]
//!     listen: String,
//! }
//! fn listen() -> String { "127.0.0.1:24224".into() }
//!
//! let schema = schemars::schema_for!(Section);
//! let md = sluice_core::configdoc::markdown(&[("[server]".into(), schema.clone())]);
//! assert!(md.contains("| `listen` | `127.0.0.1:24224` | Address to listen on. |"));
//! let value = serde_json::json!({"listen": "0.0.0.0:1"});
//! let lines = sluice_core::configdoc::settings("server", &schema, &value);
//! assert_eq!(lines, vec!["server.listen = \"0.0.0.0:1\"".to_string()]);
//! ```

use schemars::Schema;
use serde_json::{Map, Value};

/// Markdown for `sections` (a title such as `` [server] `` and the schema of the struct
/// behind it): one table per section, plus one per nested struct (`[server.tls]`).
pub fn markdown(sections: &[(String, Schema)]) -> String {
    let mut out = String::new();
    for (title, schema) in sections {
        section(&mut out, title, schema.as_value(), schema.as_value());
    }
    out
}

fn section(out: &mut String, title: &str, root: &Value, node: &Value) {
    let Some(props) = node.get("properties").and_then(Value::as_object) else {
        return;
    };
    let required: Vec<&str> = node
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out.push_str(&format!(
        "#### `{title}`\n\n| key | default | meaning |\n|---|---|---|\n"
    ));
    let mut nested = Vec::new();
    for (key, prop) in props {
        let target = resolve(root, prop);
        let default = if required.contains(&key.as_str()) {
            "required".to_string()
        } else {
            prop.get("default").map(show_default).unwrap_or_default()
        };
        // A field's own doc comment; a type's description (say, what a size looks like)
        // only stands in for an undocumented field of an enum or struct type.
        let mut meaning = description(prop)
            .or_else(|| (target != prop).then(|| description(target)).flatten())
            .unwrap_or_default();
        if let Some(values) = enum_values(target) {
            meaning.push_str(&values);
        }
        if target.get("properties").is_some() {
            meaning.push_str(&format!(" (see `{}.{key}`)", title_path(title)));
            nested.push((key.clone(), target));
        }
        out.push_str(&format!(
            "| `{key}` | {} | {} |\n",
            cell(&default),
            cell(meaning.trim())
        ));
    }
    out.push('\n');
    for (key, target) in nested {
        let path = title_path(title);
        section(out, &format!("[{path}.{key}]"), root, target);
    }
}

/// `[server]` -> `server`, `[[sink]] type = "kafka"` -> `sink`.
fn title_path(title: &str) -> &str {
    let t = title.trim_start_matches('[');
    t.split([']', ' ']).next().unwrap_or(t)
}

/// The schema a property refers to: its `$ref`, or the non-null arm of an `Option`.
fn resolve<'a>(root: &'a Value, prop: &'a Value) -> &'a Value {
    if let Some(r) = prop.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        if let Some(def) = root.get("$defs").and_then(|d| d.get(name)) {
            return resolve(root, def);
        }
    }
    if let Some(arms) = prop.get("anyOf").and_then(Value::as_array) {
        if let Some(arm) = arms
            .iter()
            .find(|a| a.get("type").and_then(Value::as_str) != Some("null"))
        {
            return resolve(root, arm);
        }
    }
    prop
}

fn description(v: &Value) -> Option<String> {
    v.get("description")
        .and_then(Value::as_str)
        .map(|d| d.replace('\n', " "))
}

/// For an enum of plain values: ` One of: `a` (what a means), `b`.`
fn enum_values(v: &Value) -> Option<String> {
    let arms = v.get("oneOf").and_then(Value::as_array)?;
    let mut parts = Vec::new();
    for arm in arms {
        let value = arm
            .get("const")
            .or_else(|| arm.get("enum").and_then(|e| e.get(0)))?
            .as_str()?;
        parts.push(match description(arm) {
            Some(d) => format!("`{value}`: {}", d.trim_end_matches('.')),
            None => format!("`{value}`"),
        });
    }
    Some(format!(" One of: {}.", parts.join("; ")))
}

fn show_default(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) if s.is_empty() => "`\"\"`".into(),
        Value::String(s) => format!("`{s}`"),
        Value::Array(a) if a.is_empty() => "`[]`".into(),
        Value::Object(o) if o.is_empty() => "`{}`".into(),
        Value::Object(o) if o.values().all(Value::is_null) => "all unset".into(),
        other => format!("`{other}`"),
    }
}

/// A config section as JSON, for [`settings`]. Config structs serialize to plain maps.
pub fn json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// `path.key = value` for every key the schema declares, from the loaded config's
/// `value` (the section serialized with serde_json), nested structs flattened, secrets
/// shown as `"<redacted>"`.
pub fn settings(path: &str, schema: &Schema, value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    settings_of(&mut out, path, schema.as_value(), schema.as_value(), value);
    out
}

fn settings_of(out: &mut Vec<String>, path: &str, root: &Value, node: &Value, value: &Value) {
    let Some(props) = node.get("properties").and_then(Value::as_object) else {
        return;
    };
    let empty = Map::new();
    let values = value.as_object().unwrap_or(&empty);
    for (key, prop) in props {
        let v = values.get(key).unwrap_or(&Value::Null);
        let target = resolve(root, prop);
        let secret = prop.get("x-secret").and_then(Value::as_bool) == Some(true);
        if target.get("properties").is_some() && v.is_object() {
            settings_of(out, &format!("{path}.{key}"), root, target, v);
            continue;
        }
        let shown = if secret && !v.is_null() {
            redact(v)
        } else {
            v.to_string()
        };
        out.push(format!("{path}.{key} = {shown}"));
    }
}

/// A secret's shape without its content: a map keeps its keys (client names, user names).
fn redact(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let keys: Map<String, Value> = o
                .keys()
                .map(|k| (k.clone(), Value::String("<redacted>".into())))
                .collect();
            Value::Object(keys).to_string()
        }
        _ => "\"<redacted>\"".into(),
    }
}

/// Replaces the text between `<!-- generated: NAME -->` and `<!-- end: NAME -->` in `doc`
/// with `generated`; `None` when the markers are missing.
pub fn splice(doc: &str, name: &str, generated: &str) -> Option<String> {
    let begin = format!("<!-- generated: {name} -->\n");
    let end = format!("<!-- end: {name} -->");
    let a = doc.find(&begin)? + begin.len();
    let b = a + doc[a..].find(&end)?;
    Some(format!("{}{}{}", &doc[..a], generated, &doc[b..]))
}

/// The check behind the generated-docs tests: `doc_path` must contain `generated`
/// between its markers. With `SLUICE_BLESS=1` the file is rewritten instead.
pub fn check_docs(doc_path: &std::path::Path, name: &str, generated: &str) -> Result<(), String> {
    let doc = std::fs::read_to_string(doc_path)
        .map_err(|e| format!("cannot read {}: {e}", doc_path.display()))?;
    let want = splice(&doc, name, generated).ok_or_else(|| {
        format!(
            "{} has no markers <!-- generated: {name} --> ... <!-- end: {name} -->",
            doc_path.display()
        )
    })?;
    if want == doc {
        return Ok(());
    }
    if std::env::var("SLUICE_BLESS").as_deref() == Ok("1") {
        std::fs::write(doc_path, want)
            .map_err(|e| format!("cannot write {}: {e}", doc_path.display()))?;
        return Ok(());
    }
    Err(format!(
        "{} is out of date with the config structs: regenerate it with `SLUICE_BLESS=1 cargo test --workspace config_docs` and commit the result",
        doc_path.display()
    ))
}

/// The crate's folder as cargo gives it to the running test (`CARGO_MANIFEST_DIR` at run
/// time), else `built_in` (the path at compile time). A test binary can be reused by a
/// build of the same sources at another path (a shared target directory), and must then
/// read the files of the checkout it runs for.
pub fn manifest_dir(built_in: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(built_in))
}
