//! Constant-time equality for secrets (API keys, tokens) held in the per-worker caches.
//!
//! `subtle`'s slice comparison puts an optimisation barrier on every byte, which made
//! comparing a cached JWT cost more than hashing it. This compares eight bytes at a
//! time, OR-accumulating the differences with no data-dependent branch, and only the
//! final test goes through `subtle`. Lengths are not secret.

use subtle::ConstantTimeEq;

pub fn eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |c: &[u8]| <[u8; 8]>::try_from(c).map_or(0, u64::from_ne_bytes);
    let (wa, wb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut diff = wa.remainder().iter().zip(wb.remainder()).fold(0u64, |d, (x, y)| d | u64::from(x ^ y));
    for (x, y) in wa.zip(wb) {
        diff |= word(x) ^ word(y);
    }
    bool::from(diff.ct_eq(&0))
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn equality() {
        let long = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJqYXkifQ.c2lnbmF0dXJl";
        let last_changed = format!("{}m", &long[..long.len() - 1]);
        let cases: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("a", "a", true),
            ("a", "b", false),
            ("a", "", false),
            ("12345678", "12345678", true),
            ("12345678", "12345679", false),
            ("123456789", "023456789", false), // first word differs
            ("123456789", "123456780", false), // remainder differs
            (long, long, true),
            (long, &last_changed, false),
        ];
        for (a, b, want) in cases {
            assert_eq!(super::eq(a.as_bytes(), b.as_bytes()), *want, "{a:?} vs {b:?}");
            assert_eq!(super::eq(b.as_bytes(), a.as_bytes()), *want, "{b:?} vs {a:?}");
        }
    }
}
