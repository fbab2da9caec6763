//! The bytes Istio hands the filter as its configuration: a WasmPlugin's `pluginConfig`
//! is a `google.protobuf.Struct`, and istiod serialises it with the legacy Go `jsonpb`
//! marshaler (`protomarshal.ToJSON`, github.com/golang/protobuf v1.5 `jsonpb`, no
//! indent) into the `StringValue` of the Wasm `PluginConfig.configuration`
//! (pilot/pkg/model/extensions.go, `buildPluginConfig`). That marshaler writes:
//!
//! - objects with their keys sorted (byte order), no whitespace;
//! - every number as a `float64` through Go's `encoding/json`: integers without a
//!   fraction (`60`, not `60.0`), integers beyond 2^53 rounded to the nearest double,
//!   exponent form only below 1e-6 or from 1e21 on (`1e+21`, `1e-7`);
//! - strings through `encoding/json` with HTML escaping: `<` `>` `&` as `\u003c`
//!   `\u003e` `\u0026`, U+2028/U+2029 as `\u2028`/`\u2029`, control characters as
//!   `\n` `\r` `\t` `\b` `\f` or `\u00XX` (lowercase hex);
//! - and an empty (or absent) `pluginConfig` as no configuration at all: 0 bytes.
//!
//! [`encode`] reproduces that from a JSON value, so the local Istio-shaped gateway hands
//! the filter exactly the bytes a cluster would.

use std::fmt::Write as _;

use serde_json::Value;

/// `pluginConfig` as istiod serialises it; `""` for an empty object or `null`.
pub fn encode(config: &Value) -> String {
    match config {
        Value::Null => String::new(),
        Value::Object(m) if m.is_empty() => String::new(),
        other => {
            let mut out = String::new();
            write_value(&mut out, other);
            out
        }
    }
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Go sorts the Struct's map keys as strings: byte order.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, k);
                out.push(':');
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

/// Go `encoding/json` for a float64 (`floatEncoder`, 64 bits): the shortest decimal that
/// reads back as the same double; `'f'` form unless |f| < 1e-6 or |f| >= 1e21, where it
/// is `'e'` form with a sign and at least one exponent digit (`1e+21`, `1.5e-7`).
/// (jsonpb writes NaN and ±Inf as strings; JSON text cannot hold them anyway.)
fn write_number(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("\"NaN\"");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "\"Infinity\"" } else { "\"-Infinity\"" });
        return;
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        // Rust's `{:e}` is the shortest round-trip mantissa with a bare exponent
        // (`1e21`, `1.5e-7`); Go writes a `+` for positive exponents.
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((mantissa, exp)) if !exp.starts_with('-') => {
                let _ = write!(out, "{mantissa}e+{exp}");
            }
            _ => out.push_str(&s),
        }
    } else {
        // Rust's `Display` for f64 is the shortest round-trip digits, never an exponent.
        let _ = write!(out, "{f}");
    }
}

/// Go `encoding/json` string encoding with `escapeHTML` (what `json.Marshal` does).
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{0}'..='\u{1f}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            other => out.push(other),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_config_is_zero_bytes() {
        assert_eq!(encode(&json!({})), "");
        assert_eq!(encode(&Value::Null), "");
    }

    #[test]
    fn keys_sorted_no_whitespace() {
        let v = json!({"usage": {"path": "/track", "cluster": "c"}, "api_keys": {"keys": []}, "B": 1, "a": true});
        assert_eq!(encode(&v), r#"{"B":1,"a":true,"api_keys":{"keys":[]},"usage":{"cluster":"c","path":"/track"}}"#);
    }

    #[test]
    fn numbers_as_go_float64() {
        let cases: &[(Value, &str)] = &[
            (json!(60), "60"),
            (json!(0), "0"),
            (json!(-3), "-3"),
            (json!(60.0), "60"),
            (json!(0.5), "0.5"),
            (json!(1000000), "1000000"),
            (json!(1e20), "100000000000000000000"),
            (json!(1e21), "1e+21"),
            (json!(1.5e22), "1.5e+22"),
            (json!(0.000001), "0.000001"),
            (json!(0.0000001), "1e-7"),
            (json!(1.5e-7), "1.5e-7"),
            (json!(1.25e-10), "1.25e-10"),
            // Beyond 2^53 an integer becomes the nearest double, as in a Struct.
            (json!(9007199254740993u64), "9007199254740992"),
            (json!(u64::MAX), "18446744073709552000"),
            (json!(0.1), "0.1"),
        ];
        for (v, want) in cases {
            assert_eq!(encode(&json!([v])), format!("[{want}]"), "{v}");
        }
    }

    #[test]
    fn strings_escaped_as_go_does() {
        let v = json!(["a<b>&c", "q\"\\", "\n\r\t\u{8}\u{c}\u{1}\u{1f}", "\u{2028}\u{2029}", "é✓😀", "/"]);
        assert_eq!(
            encode(&v),
            r#"["a\u003cb\u003e\u0026c","q\"\\","\n\r\t\b\f\u0001\u001f","\u2028\u2029","é✓😀","/"]"#
        );
        // Keys too.
        assert_eq!(encode(&json!({"<k>": null})), r#"{"\u003ck\u003e":null}"#);
    }

    #[test]
    fn round_trips_to_the_same_json() {
        let v = json!({"jwt": {"providers": [{"issuer": "dev", "jwks": "{\"keys\":[]}", "clock_skew_seconds": 60}]},
                       "limits": {"groups": {"free": {"requests_per_minute": 5, "burst": 5}}}});
        let back: Value = serde_json::from_str(&encode(&v)).unwrap();
        assert_eq!(back, v);
    }
}
