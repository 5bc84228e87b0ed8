//! Writing the record map every parser produces: MessagePack fields, text as str when
//! it is UTF-8 and as bin otherwise.
//!
//! The encoders here write what `rmp::encode` writes (the smallest form, a test holds
//! them to it) but reserve once and push the header and the bytes into the `Vec`
//! directly: through rmp's `io::Write` path a short string cost two bounds-checked
//! writes and its `Result`s, a tenth of the nginx parser's time (bench/RESULTS.md,
//! issue 16).

/// Containers (maps, arrays) nest at most this deep in a record, the record map being
/// level 1. Deeper JSON is delivered raw with a parse error.
pub const MAX_NESTING: usize = 32;

/// A field value of the regex-based parsers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    /// str if valid UTF-8, else bin.
    Text(&'a [u8]),
    Int(i64),
    Static(&'static str),
}

/// A string or bin header (`fix`: the fixstr marker base, or `None` for bin) and the bytes.
#[inline]
fn put_bytes(out: &mut Vec<u8>, fix: Option<u8>, marker8: u8, bytes: &[u8]) {
    let n = bytes.len();
    out.reserve(n + 5);
    match (fix, n) {
        (Some(base), 0..=31) => out.push(base | n as u8),
        (_, 0..=255) => out.extend_from_slice(&[marker8, n as u8]),
        (_, 256..=65_535) => {
            out.push(marker8 + 1);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(marker8 + 2);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(bytes);
}

/// A MessagePack str of `s`, which the caller knows is UTF-8.
#[inline]
pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_bytes(out, Some(0xa0), 0xd9, s);
}

/// A MessagePack bin.
#[inline]
pub(crate) fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    put_bytes(out, None, 0xc4, b);
}

/// An integer in the smallest form, as `rmp::encode::write_sint` writes it.
#[inline]
pub(crate) fn put_int(out: &mut Vec<u8>, i: i64) {
    match i {
        0..=127 => out.push(i as u8),
        128..=255 => out.extend_from_slice(&[0xcc, i as u8]),
        256..=65_535 => {
            out.push(0xcd);
            out.extend_from_slice(&(i as u16).to_be_bytes());
        }
        65_536..=4_294_967_295 => {
            out.push(0xce);
            out.extend_from_slice(&(i as u32).to_be_bytes());
        }
        4_294_967_296.. => {
            out.push(0xcf);
            out.extend_from_slice(&(i as u64).to_be_bytes());
        }
        -32..=-1 => out.push(i as u8),
        -128..=-33 => out.extend_from_slice(&[0xd0, i as u8]),
        -32_768..=-129 => {
            out.push(0xd1);
            out.extend_from_slice(&(i as i16).to_be_bytes());
        }
        -2_147_483_648..=-32_769 => {
            out.push(0xd2);
            out.extend_from_slice(&(i as i32).to_be_bytes());
        }
        _ => {
            out.push(0xd3);
            out.extend_from_slice(&i.to_be_bytes());
        }
    }
}

pub(crate) fn write_map_len(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=15 => out.push(0x80 | n as u8),
        16..=65_535 => {
            out.push(0xde);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdf);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

pub(crate) fn write_text(out: &mut Vec<u8>, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(_) => put_str(out, bytes),
        Err(_) => put_bin(out, bytes),
    }
}

pub(crate) fn write_field(out: &mut Vec<u8>, key: &str, value: &Value<'_>) {
    put_str(out, key.as_bytes());
    match *value {
        Value::Text(b) => write_text(out, b),
        Value::Int(i) => put_int(out, i),
        Value::Static(s) => put_str(out, s.as_bytes()),
    }
}

pub(crate) fn write_fields(out: &mut Vec<u8>, fields: &[(&str, Value<'_>)]) {
    write_map_len(out, fields.len());
    for (key, value) in fields {
        write_field(out, key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoders_write_what_rmp_writes() {
        let mut ints: Vec<i64> = vec![i64::MIN, i64::MAX, 0];
        for edge in [
            32i64,
            33,
            128,
            129,
            256,
            32_768,
            32_769,
            65_536,
            2_147_483_648,
            4_294_967_296,
        ] {
            for d in -2..=2 {
                ints.extend([edge + d, -(edge + d)]);
            }
        }
        for i in ints {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_int(&mut ours, i);
            rmp::encode::write_sint(&mut theirs, i).unwrap();
            assert_eq!(ours, theirs, "{i}");
        }
        for n in [0usize, 1, 15, 16, 31, 32, 255, 256, 65_535, 65_536, 70_000] {
            let text = "x".repeat(n);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_str(&mut ours, text.as_bytes());
            rmp::encode::write_str(&mut theirs, &text).unwrap();
            assert_eq!(ours, theirs, "str of {n}");
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_bin(&mut ours, text.as_bytes());
            rmp::encode::write_bin(&mut theirs, text.as_bytes()).unwrap();
            assert_eq!(ours, theirs, "bin of {n}");
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            write_map_len(&mut ours, n);
            rmp::encode::write_map_len(&mut theirs, n as u32).unwrap();
            assert_eq!(ours, theirs, "map of {n}");
        }
    }
}
