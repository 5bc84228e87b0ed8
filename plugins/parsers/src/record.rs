//! Writing the record map every parser produces: MessagePack fields, text as str when
//! it is UTF-8 and as bin otherwise.

/// Containers (maps, arrays) nest at most this deep in a record, the record map being
/// level 1. Deeper JSON is delivered raw with a parse error.
pub const MAX_NESTING: usize = 32;

/// A field value of the regex-based parsers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    /// str if valid UTF-8, else bin.
    Text(&'a [u8]),
    /// Text already known to be UTF-8.
    Str(&'a str),
    Int(i64),
    Static(&'static str),
}

pub(crate) fn write_map_len(out: &mut Vec<u8>, n: usize) {
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(out, n as u32);
}

pub(crate) fn write_text(out: &mut Vec<u8>, bytes: &[u8]) {
    let _ = match std::str::from_utf8(bytes) {
        Ok(s) => rmp::encode::write_str(out, s),
        Err(_) => rmp::encode::write_bin(out, bytes),
    };
}

pub(crate) fn write_field(out: &mut Vec<u8>, key: &str, value: &Value<'_>) {
    let _ = rmp::encode::write_str(out, key);
    match *value {
        Value::Text(b) => write_text(out, b),
        Value::Int(i) => {
            let _ = rmp::encode::write_sint(out, i);
        }
        Value::Str(s) => {
            let _ = rmp::encode::write_str(out, s);
        }
        Value::Static(s) => {
            let _ = rmp::encode::write_str(out, s);
        }
    }
}

pub(crate) fn write_fields(out: &mut Vec<u8>, fields: &[(&str, Value<'_>)]) {
    write_map_len(out, fields.len());
    for (key, value) in fields {
        write_field(out, key, value);
    }
}
