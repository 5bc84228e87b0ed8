//! `json`: one JSON object per line, converted to MessagePack as it is.

use serde_json::Value;

use crate::record::{write_map_len, MAX_NESTING};

/// Writes the object's record, or explains why the line is not one. Nothing is written
/// on error.
pub(crate) fn write(line: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    let Value::Object(map) = &value else {
        return Err(format!(
            "JSON {} where an object was expected",
            kind_of(&value)
        ));
    };
    if depth(&value) > MAX_NESTING {
        return Err(format!("JSON nested deeper than {MAX_NESTING} levels"));
    }
    write_map_len(out, map.len());
    for (k, v) in map {
        let _ = rmp::encode::write_str(out, k);
        write_value(v, out);
    }
    Ok(())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Container levels (a scalar is 0). serde_json itself refuses more than 128, so the
/// recursion here is bounded.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn write_value(v: &Value, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = match v {
        Value::Null => rmp::encode::write_nil(out).map_err(|_| ()),
        Value::Bool(b) => rmp::encode::write_bool(out, *b).map_err(|_| ()),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                rmp::encode::write_uint(out, u).map(|_| ()).map_err(|_| ())
            } else if let Some(i) = n.as_i64() {
                rmp::encode::write_sint(out, i).map(|_| ()).map_err(|_| ())
            } else {
                rmp::encode::write_f64(out, n.as_f64().unwrap_or(f64::NAN)).map_err(|_| ())
            }
        }
        Value::String(s) => rmp::encode::write_str(out, s).map_err(|_| ()),
        Value::Array(a) => {
            let _ = rmp::encode::write_array_len(out, a.len() as u32);
            for item in a {
                write_value(item, out);
            }
            Ok(())
        }
        Value::Object(m) => {
            write_map_len(out, m.len());
            for (k, item) in m {
                let _ = rmp::encode::write_str(out, k);
                write_value(item, out);
            }
            Ok(())
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::test_util::parse;
    use crate::{Outcome, Parser, ParserKind};
    use serde_json::json;

    fn p() -> Parser {
        Parser::new(ParserKind::Json, None).unwrap()
    }

    #[test]
    fn objects_keep_their_types_and_nesting() {
        let (v, o) = parse(
            &p(),
            br#"{"level":"info","n":-3,"big":18446744073709551615,"f":1.5,"ok":true,"none":null,"tags":["a",{"b":[1]}],"msg":"caf\u00e9"}"#,
        );
        assert_eq!(o, Outcome::Parsed);
        assert_eq!(
            v,
            json!({"level":"info","n":-3,"big":18446744073709551615u64,"f":1.5,"ok":true,"none":null,"tags":["a",{"b":[1]}],"msg":"café"})
        );
    }

    #[test]
    fn non_objects_and_garbage_are_delivered_raw_with_the_reason() {
        for (line, why) in [
            (&b"[1,2]"[..], "JSON array where an object was expected"),
            (b"\"just a string\"", "JSON string where"),
            (b"{\"cut\": ", "invalid JSON"),
            (b"plain text", "invalid JSON"),
            (b"", "invalid JSON"),
        ] {
            let (v, o) = parse(&p(), line);
            assert_eq!(o, Outcome::Failed, "{v}");
            assert_eq!(v["message"], String::from_utf8_lossy(line).as_ref());
            let err = v["parse_error"].as_str().unwrap();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn too_deep_is_raw_not_a_rejected_chunk() {
        let line = format!("{{\"a\":{}1{}}}", "[".repeat(40), "]".repeat(40));
        let (v, o) = parse(&p(), line.as_bytes());
        assert_eq!(o, Outcome::Failed);
        assert!(v["parse_error"].as_str().unwrap().contains("deeper"));
        let ok = format!("{{\"a\":{}1{}}}", "[".repeat(20), "]".repeat(20));
        assert_eq!(parse(&p(), ok.as_bytes()).1, Outcome::Parsed);
    }
}
