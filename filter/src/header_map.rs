//! A header map as the host hands it over in one buffer (the proxy-wasm ABI's map
//! serialization), read in place.
//!
//! The SDK's reader copies every name and value into its own allocation (and panics on a
//! name that is not UTF-8); on the request path that was most of the filter's
//! allocations. Here each header borrows from the buffer and only a value that is not
//! UTF-8 is copied (lossily).
//!
//! Layout: `u32` count N, then N pairs of `u32` (name length, value length), then each
//! name and value followed by a NUL byte; integers little-endian.

use std::borrow::Cow;

/// (name, value) pairs, in the host's order.
pub type HeaderPairs<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// Parses a serialized map. None when the buffer is malformed (a host bug, not input
/// a client controls); an empty buffer is an empty map.
pub fn parse(buf: &[u8]) -> Option<HeaderPairs<'_>> {
    if buf.is_empty() {
        return Some(Vec::new());
    }
    let count = read_u32(buf, 0)?;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    let mut pairs = Vec::with_capacity(count.min(buf.len() / 10));
    for i in 0..count {
        let name_len = read_u32(buf, 4 + i * 8)?;
        let value_len = read_u32(buf, 8 + i * 8)?;
        let name = buf.get(data..data.checked_add(name_len)?)?;
        data = data.checked_add(name_len)?.checked_add(1)?;
        let value = buf.get(data..data.checked_add(value_len)?)?;
        data = data.checked_add(value_len)?.checked_add(1)?;
        pairs.push((text(name), text(value)));
    }
    Some(pairs)
}

/// Borrowed when UTF-8 (checked with `from_utf8`, faster than the lossy path's chunks).
fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

fn read_u32(buf: &[u8], at: usize) -> Option<usize> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(<[u8; 4]>::try_from(bytes).ok()?) as usize)
}

/// The first value of `name` (lowercase, as Envoy stores names), if present.
pub fn find<'h>(headers: &'h [(Cow<'_, str>, Cow<'_, str>)], name: &str) -> Option<&'h str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_ref())
}

/// The first value of `name`, or "" when absent.
pub fn get<'h>(headers: &'h [(Cow<'_, str>, Cow<'_, str>)], name: &str) -> &'h str {
    find(headers, name).unwrap_or("")
}

/// Whether the request carries `name` at all.
pub fn contains(headers: &[(Cow<'_, str>, Cow<'_, str>)], name: &str) -> bool {
    headers.iter().any(|(k, _)| k == name)
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    /// The host's serialization, written independently of `parse`.
    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend((k.len() as u32).to_le_bytes());
            out.extend((v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend(*k);
            out.push(0);
            out.extend(*v);
            out.push(0);
        }
        out
    }

    #[test]
    fn parses_what_the_host_serializes() {
        let cases: &[(&[(&[u8], &[u8])], &[(&str, &str)])] = &[
            (&[], &[]),
            (&[(b":path", b"/v1/models")], &[(":path", "/v1/models")]),
            (
                &[
                    (b":method", b"POST"),
                    (b"authorization", b"Bearer k"),
                    (b"x-empty", b""),
                    (b"x-dup", b"1"),
                    (b"x-dup", b"2"),
                ],
                &[(":method", "POST"), ("authorization", "Bearer k"), ("x-empty", ""), ("x-dup", "1"), ("x-dup", "2")],
            ),
            // Not UTF-8: copied lossily, never a panic.
            (&[(b"x-bin", b"a\xffb"), (b"x-\xfe", b"v")], &[("x-bin", "a\u{fffd}b"), ("x-\u{fffd}", "v")]),
        ];
        for (i, (pairs, want)) in cases.iter().enumerate() {
            let buf = serialize(pairs);
            let got = parse(&buf).unwrap();
            let got: Vec<(&str, &str)> = got.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
            assert_eq!(&got, want, "case {i}");
        }
        assert_eq!(parse(&[]).unwrap().len(), 0);
    }

    #[test]
    fn valid_utf8_is_borrowed() {
        let buf = serialize(&[(b"authorization", b"Bearer k")]);
        let pairs = parse(&buf).unwrap();
        assert!(matches!(pairs.first(), Some((Cow::Borrowed(_), Cow::Borrowed(_)))));
    }

    #[test]
    fn malformed_buffers_are_refused() {
        let good = serialize(&[(b"a", b"bc"), (b"d", b"e")]);
        let mut huge_count = good.clone();
        huge_count.splice(0..4, u32::MAX.to_le_bytes());
        let mut long_value = good.clone();
        long_value.splice(8..12, 1000u32.to_le_bytes());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("count only partly there", vec![1, 0]),
            ("count larger than the buffer", huge_count),
            ("value runs past the end", long_value),
            ("truncated", good[..good.len() - 2].to_vec()),
        ];
        for (name, buf) in cases {
            assert_eq!(parse(&buf), None, "{name}");
        }
    }

    #[test]
    fn lookups() {
        let buf = serialize(&[(b":path", b"/a"), (b"x-dup", b"1"), (b"x-dup", b"2")]);
        let pairs = parse(&buf).unwrap();
        assert_eq!(get(&pairs, ":path"), "/a");
        assert_eq!(get(&pairs, "x-dup"), "1");
        assert_eq!(get(&pairs, "missing"), "");
        assert_eq!((find(&pairs, ":path"), find(&pairs, "missing")), (Some("/a"), None));
        assert!(contains(&pairs, "x-dup") && !contains(&pairs, "X-DUP"));
    }
}
