//! Raw msgpack records to JSON and field look-ups, without an intermediate tree.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use crate::error::{malformed, DecodeError};
use crate::limits::MAX_DEPTH;
use crate::msgpack::{parse_head, read_key, Head, Reader};

/// Appends the JSON object for one raw msgpack record (a map) to `out`.
///
/// str and bin values that are valid UTF-8 become JSON strings; other bytes become
/// `{"$binary": "<standard base64>"}` and ext values `{"$ext": type, "$binary": ..}`,
/// so nothing is lost. Non-finite floats become `null`; keys that are not strings are
/// written as the string of their JSON. On error `out` is left as it was.
///
/// ```
/// # use sluice_forward::*;
/// let mut entries = Vec::new();
/// write_entry(&mut entries, EventTime::default(), &[("msg", "héllo".as_bytes()), ("raw", b"\xff")]);
/// let batch = EventBatch { tag: "t".into(), entries, count: 1, options: Options::default(), hours: Vec::new() };
/// let mut json = Vec::new();
/// record_to_json(batch.iter().next().unwrap()?.record, &mut json)?;
/// assert_eq!(json, r#"{"msg":"héllo","raw":{"$binary":"/w=="}}"#.as_bytes());
/// # Ok::<(), DecodeError>(())
/// ```
pub fn record_to_json(record: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let start = out.len();
    let result = transcode_record(record, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn transcode_record(record: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    match parse_head(record)? {
        Some((Head::Map(_), _)) => {}
        Some((other, _)) => {
            return Err(malformed(format!(
                "record is a {}, not a map",
                other.kind()
            )))
        }
        None => return Err(malformed("record is truncated")),
    }
    let mut r = Reader::new(record);
    write_value(&mut r, out, 1)?;
    if !r.is_at_end() {
        return Err(malformed(format!(
            "{} trailing bytes after the record",
            r.rest().len()
        )));
    }
    Ok(())
}

/// Writes the value at the reader; `depth` is the nesting level a container here has.
fn write_value(r: &mut Reader<'_>, out: &mut Vec<u8>, depth: usize) -> Result<(), DecodeError> {
    let head = r.head()?;
    match head {
        Head::Nil => out.extend_from_slice(b"null"),
        Head::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        Head::Uint(v) => push_u64(out, v),
        Head::Int(v) => {
            if v < 0 {
                out.push(b'-');
            }
            push_u64(out, v.unsigned_abs());
        }
        Head::F32(f) if f.is_finite() => push_float(out, &f),
        Head::F64(f) if f.is_finite() => push_float(out, &f),
        Head::F32(_) | Head::F64(_) => out.extend_from_slice(b"null"),
        Head::Str(n) | Head::Bin(n) => {
            let bytes = r.take(n)?;
            match std::str::from_utf8(bytes) {
                Ok(s) => push_json_str(out, s),
                Err(_) => {
                    out.extend_from_slice(b"{\"$binary\":\"");
                    out.extend_from_slice(BASE64.encode(bytes).as_bytes());
                    out.extend_from_slice(b"\"}");
                }
            }
        }
        Head::Ext { ty, len } => {
            let bytes = r.take(len)?;
            out.extend_from_slice(b"{\"$ext\":");
            if ty < 0 {
                out.push(b'-');
            }
            push_u64(out, ty.unsigned_abs() as u64);
            out.extend_from_slice(b",\"$binary\":\"");
            out.extend_from_slice(BASE64.encode(bytes).as_bytes());
            out.extend_from_slice(b"\"}");
        }
        Head::Array(n) => {
            check_depth(depth)?;
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                write_value(r, out, depth + 1)?;
            }
            out.push(b']');
        }
        Head::Map(n) => {
            check_depth(depth)?;
            out.push(b'{');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                write_key(r, out, depth + 1)?;
                out.push(b':');
                write_value(r, out, depth + 1)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn check_depth(depth: usize) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::NestingTooDeep { limit: MAX_DEPTH });
    }
    Ok(())
}

fn write_key(r: &mut Reader<'_>, out: &mut Vec<u8>, depth: usize) -> Result<(), DecodeError> {
    if let Some((Head::Str(n) | Head::Bin(n), hl)) = parse_head(r.rest())? {
        if let Some(Ok(key)) = r.rest().get(hl..hl + n).map(std::str::from_utf8) {
            push_json_str(out, key);
            r.take(hl + n)?;
            return Ok(());
        }
    }
    // JSON keys are strings: write the key's JSON and quote it.
    let mut key = Vec::new();
    write_value(r, &mut key, depth)?;
    push_json_str(out, &String::from_utf8_lossy(&key));
    Ok(())
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn push_float<F: serde::Serialize>(out: &mut Vec<u8>, f: &F) {
    // serde_json prints the shortest representation that reads back to the same float.
    if serde_json::to_writer(&mut *out, f).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// Whether any of the 8 bytes of `w` needs escaping in a JSON string (a control
/// character, `"` or `\\`). Exact for the word as a whole (the per-byte flags of the
/// has-less-than trick can be wrong, their union cannot); bytes of 0x80 and above (UTF-8)
/// never count.
#[inline]
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let q = w ^ (ONES * b'"' as u64);
    let quote = q.wrapping_sub(ONES) & !q & HIGH;
    let b = w ^ (ONES * b'\\' as u64);
    let backslash = b.wrapping_sub(ONES) & !b & HIGH;
    (control | quote | backslash) != 0
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut plain_from = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Eight bytes at a time past text that needs no escape (most log text).
        if let Some(word) = bytes.get(i..i + 8) {
            let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            if !word_needs_escape(w) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[plain_from..i]);
        plain_from = i + 1;
        i += 1;
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0x0f) as usize]);
        } else {
            out.extend_from_slice(escape);
        }
    }
    out.extend_from_slice(&bytes[plain_from..]);
    out.push(b'"');
}

/// Reads field `key` of a raw record as bytes (its value must be str or bin).
///
/// `Ok(None)` if the record has no such field; an error if the value is of another type.
pub fn record_field<'a>(record: &'a [u8], key: &str) -> Result<Option<&'a [u8]>, DecodeError> {
    match record_value(record, key)? {
        None => Ok(None),
        Some((FieldValue::Bytes(b), _)) => Ok(Some(b)),
        Some((_, kind)) => Err(malformed(format!(
            "field {key:?} is a {kind}, not a string"
        ))),
    }
}

/// A scalar field value, as [`record_value`] finds it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldValue<'a> {
    /// A str or bin value.
    Bytes(&'a [u8]),
    Int(i64),
    /// A float, or an unsigned integer beyond `i64`.
    Float(f64),
    /// Nil, bool, a container or ext: not read.
    Other,
}

/// Reads field `key` of a raw record, with the msgpack kind of its value in words.
///
/// `Ok(None)` if the record has no such field.
pub fn record_value<'a>(
    record: &'a [u8],
    key: &str,
) -> Result<Option<(FieldValue<'a>, &'static str)>, DecodeError> {
    record_path_value(record, &[key])
}

/// Reads the field at `path` of a raw record: `["kubernetes", "namespace"]` is field
/// `namespace` of the map in field `kubernetes`. `Ok(None)` if a field on the way is
/// missing or not a map.
pub fn record_path_value<'a>(
    record: &'a [u8],
    path: &[&str],
) -> Result<Option<(FieldValue<'a>, &'static str)>, DecodeError> {
    let mut r = Reader::new(record);
    let mut n = match r.head()? {
        Head::Map(n) => n,
        other => {
            return Err(malformed(format!(
                "record is a {}, not a map",
                other.kind()
            )))
        }
    };
    let Some((last, on_the_way)) = path.split_last() else {
        return Ok(None);
    };
    for key in on_the_way {
        let mut inner = None;
        for _ in 0..n {
            if read_key(&mut r)? == Some(key.as_bytes()) {
                match r.head()? {
                    Head::Map(m) => inner = Some(m),
                    _ => return Ok(None),
                }
                break;
            }
            r.value(MAX_DEPTH)?;
        }
        match inner {
            Some(m) => n = m,
            None => return Ok(None),
        }
    }
    for _ in 0..n {
        if read_key(&mut r)? == Some(last.as_bytes()) {
            let head = r.head()?;
            let value = match head {
                Head::Str(n) | Head::Bin(n) => FieldValue::Bytes(r.take(n)?),
                Head::Int(i) => FieldValue::Int(i),
                Head::Uint(u) => {
                    i64::try_from(u).map_or(FieldValue::Float(u as f64), FieldValue::Int)
                }
                Head::F32(f) => FieldValue::Float(f as f64),
                Head::F64(f) => FieldValue::Float(f),
                _ => FieldValue::Other,
            };
            return Ok(Some((value, head.kind())));
        }
        r.value(MAX_DEPTH)?;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msgpack::{write_array_len, write_bin, write_map_len, write_str};

    proptest::proptest! {
        /// Strings come out as serde_json reads them back, whatever bytes they hold and
        /// wherever the escapes fall against the 8-byte steps.
        #[test]
        fn strings_round_trip(s in "(\\PC|[\\x00-\\x1f\"\\\\]){0,40}") {
            let mut out = Vec::new();
            push_json_str(&mut out, &s);
            let back: String = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert_eq!(back, s);
        }
    }

    #[test]
    fn the_word_check_finds_every_escape() {
        for b in 0u8..=255 {
            for at in 0..8 {
                let mut w = *b"abcdefgh";
                w[at] = b;
                let needs = b < 0x20 || b == b'"' || b == b'\\';
                assert_eq!(
                    word_needs_escape(u64::from_le_bytes(w)),
                    needs,
                    "byte {b:#x} at {at}"
                );
            }
        }
    }

    fn json(record: &[u8]) -> String {
        let mut out = Vec::new();
        record_to_json(record, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        // Whatever we write must be JSON a standard parser accepts.
        serde_json::from_str::<serde_json::Value>(&text).unwrap();
        text
    }

    #[test]
    fn unicode_and_escapes() {
        let mut rec = Vec::new();
        write_map_len(&mut rec, 2);
        write_str(&mut rec, "msg");
        write_str(&mut rec, "grüße 日本 🎉 \"q\" \\ \n\t\u{1}");
        write_str(&mut rec, "ключ");
        write_bin(&mut rec, "bin but utf8".as_bytes());
        assert_eq!(
            json(&rec),
            r#"{"msg":"grüße 日本 🎉 \"q\" \\ \n\t\u0001","ключ":"bin but utf8"}"#
        );
    }

    #[test]
    fn invalid_utf8_is_kept_as_base64() {
        let mut rec = Vec::new();
        write_map_len(&mut rec, 2);
        write_str(&mut rec, "a");
        write_bin(&mut rec, b"\xff\xfe\x00ok");
        // A str with invalid UTF-8 (Fluentd passes such bytes through).
        write_str(&mut rec, "b");
        rec.extend_from_slice(&[0xa2, 0xc3, 0x28]);
        assert_eq!(
            json(&rec),
            r#"{"a":{"$binary":"//4Ab2s="},"b":{"$binary":"wyg="}}"#
        );
    }

    #[test]
    fn nested_numbers_and_odd_keys() {
        let mut rec = vec![0x87]; // map of 7
        write_str(&mut rec, "nested");
        write_map_len(&mut rec, 1);
        write_str(&mut rec, "list");
        write_array_len(&mut rec, 4);
        rec.extend_from_slice(&[0x01, 0xc0, 0xc3, 0x90]);
        write_str(&mut rec, "ints");
        write_array_len(&mut rec, 4);
        rec.extend_from_slice(&[0xff, 0xcf]);
        rec.extend_from_slice(&u64::MAX.to_be_bytes());
        rec.push(0xd3);
        rec.extend_from_slice(&i64::MIN.to_be_bytes());
        rec.push(0x00);
        write_str(&mut rec, "floats");
        write_array_len(&mut rec, 5);
        rec.push(0xcb);
        rec.extend_from_slice(&1.5f64.to_be_bytes());
        rec.push(0xca);
        rec.extend_from_slice(&0.1f32.to_be_bytes());
        rec.push(0xcb);
        rec.extend_from_slice(&f64::NAN.to_be_bytes());
        rec.push(0xcb);
        rec.extend_from_slice(&f64::INFINITY.to_be_bytes());
        rec.push(0xcb);
        rec.extend_from_slice(&1e300f64.to_be_bytes());
        rec.push(0x07); // int key
        rec.push(0xc2);
        rec.push(0xc0); // nil key
        write_str(&mut rec, "x");
        write_str(&mut rec, "ext");
        rec.extend_from_slice(&[0xd4, 0xff, 0xab]);
        rec.extend_from_slice(&[0x92, 0x01, 0x02]); // array key
        rec.push(0x80);
        assert_eq!(
            json(&rec),
            concat!(
                r#"{"nested":{"list":[1,null,true,[]]},"ints":[-1,18446744073709551615,-9223372036854775808,0],"#,
                r#""floats":[1.5,0.1,null,null,1e+300],"7":false,"null":"x","ext":{"$ext":-1,"$binary":"qw=="},"#,
                r#""[1,2]":{}}"#
            )
        );
    }

    #[test]
    fn errors_leave_out_untouched() {
        let mut out = b"prefix".to_vec();
        assert!(record_to_json(&[0x91, 0x01], &mut out).is_err());
        assert!(record_to_json(&[0x82, 0xa1, b'a', 0x01], &mut out).is_err());
        assert!(record_to_json(&[0x80, 0x00], &mut out).is_err());
        let mut deep = vec![0x81, 0xa1, b'k'];
        for _ in 0..100 {
            deep.extend_from_slice(&[0x81, 0xa1, b'k']);
        }
        deep.push(0xc0);
        assert!(matches!(
            record_to_json(&deep, &mut out),
            Err(DecodeError::NestingTooDeep { .. })
        ));
        assert_eq!(out, b"prefix");
    }

    #[test]
    fn fields_are_found_by_key() {
        let mut rec = Vec::new();
        write_map_len(&mut rec, 4);
        rec.push(0x01); // int key, skipped
        write_map_len(&mut rec, 1);
        write_str(&mut rec, "message");
        write_str(&mut rec, "nested, not this one");
        write_str(&mut rec, "message");
        write_str(&mut rec, "hello");
        write_str(&mut rec, "raw");
        write_bin(&mut rec, b"\xff");
        write_str(&mut rec, "n");
        rec.push(0x05);
        assert_eq!(record_field(&rec, "message").unwrap(), Some(&b"hello"[..]));
        assert_eq!(record_field(&rec, "raw").unwrap(), Some(&b"\xff"[..]));
        assert_eq!(record_field(&rec, "missing").unwrap(), None);
        assert!(record_field(&rec, "n").is_err());
        assert!(record_field(&[0x90], "n").is_err());
    }

    #[test]
    fn nested_fields_are_found_by_path() {
        // {"k8s": {"ns": "prod", "n": 3}, "ns": "top", "flat": 1}
        let mut rec = Vec::new();
        write_map_len(&mut rec, 3);
        write_str(&mut rec, "k8s");
        write_map_len(&mut rec, 2);
        write_str(&mut rec, "ns");
        write_str(&mut rec, "prod");
        write_str(&mut rec, "n");
        rec.push(0x03);
        write_str(&mut rec, "ns");
        write_str(&mut rec, "top");
        write_str(&mut rec, "flat");
        rec.push(0x01);
        let at = |path: &[&str]| record_path_value(&rec, path).unwrap().map(|(v, _)| v);
        assert_eq!(at(&["k8s", "ns"]), Some(FieldValue::Bytes(b"prod")));
        assert_eq!(at(&["k8s", "n"]), Some(FieldValue::Int(3)));
        assert_eq!(at(&["ns"]), Some(FieldValue::Bytes(b"top")));
        assert_eq!(at(&["k8s", "missing"]), None);
        assert_eq!(at(&["flat", "x"]), None, "not a map on the way");
        assert_eq!(at(&["missing", "ns"]), None);
        assert_eq!(at(&[]), None);
    }
}
