//! API keys, stored only as SHA-256 digests.
//!
//! The configuration never holds a key in plaintext, so a leaked `pluginConfig` (it is
//! readable by anyone who can read the WasmPlugin) does not leak usable keys. Keys are
//! high-entropy random strings, so an unsalted fast hash is enough. The store is
//! checked once at configure time: a digest that is not 64 hex characters, or an
//! identity that could not be carried in a header, refuses the whole configuration.
//!
//! A key that checked out is remembered per worker (`KeyCache`, like the cache of
//! verified JWTs): a repeat caller costs a keyed hash and a constant-time compare
//! instead of a SHA-256, which was half of the key path. Wrong keys are never cached.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::identity::Identity;

/// One configured key: the digest of the key and who it belongs to.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    pub sha256: String,
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Why `keys[index].field` was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfigError {
    pub index: usize,
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for KeyConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "keys[{}].{}: {}", self.index, self.field, self.reason)
    }
}

impl std::error::Error for KeyConfigError {}

/// Digest → identity. Lookups cost one SHA-256 and one hash-map probe.
#[derive(Clone, Default)]
pub struct ApiKeyStore {
    by_digest: HashMap<[u8; 32], Identity>,
}

// Digests are not secrets, but there is no reason to spread them through logs.
impl fmt::Debug for ApiKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyStore").field("keys", &self.by_digest.len()).finish()
    }
}

impl ApiKeyStore {
    /// Checks every entry; the first bad one is reported with its index and field.
    pub fn new(entries: &[ApiKeyEntry]) -> Result<Self, KeyConfigError> {
        let mut by_digest = HashMap::with_capacity(entries.len());
        let mut first_index: HashMap<[u8; 32], usize> = HashMap::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let err = |field: &'static str, reason: String| KeyConfigError { index, field, reason };
            let digest = parse_digest(&entry.sha256).map_err(|r| err("sha256", r.to_string()))?;
            tollgate_rules::check_user(&entry.user).map_err(|r| err("user", r.to_string()))?;
            for (g, group) in entry.groups.iter().enumerate() {
                tollgate_rules::check_group(group).map_err(|r| err("groups", format!("groups[{g}] {r}")))?;
            }
            if let Some(first) = first_index.insert(digest, index) {
                return Err(err("sha256", format!("same digest as keys[{first}]")));
            }
            by_digest.insert(digest, Identity { user: entry.user.clone(), groups: entry.groups.clone() });
        }
        Ok(Self { by_digest })
    }

    /// The identity owning `presented_key`, if any.
    pub fn lookup(&self, presented_key: &str) -> Option<&Identity> {
        let digest: [u8; 32] = Sha256::digest(presented_key.as_bytes()).into();
        self.by_exact_digest(&digest)
    }

    /// As `lookup`, through the worker's cache of keys that checked out before.
    pub fn lookup_cached(&self, presented_key: &str, cache: &mut KeyCache) -> Option<&Identity> {
        let slot = cache.hasher.hash_one(presented_key);
        if let Some((key, digest)) = cache.by_hash.get(&slot) {
            if crate::ct::eq(key.as_bytes(), presented_key.as_bytes()) {
                return self.by_digest.get(digest);
            }
        }
        let digest: [u8; 32] = Sha256::digest(presented_key.as_bytes()).into();
        let identity = self.by_exact_digest(&digest)?;
        // A slot taken by another key (a hash collision) is simply overwritten.
        if cache.by_hash.len() < cache.capacity || cache.by_hash.contains_key(&slot) {
            cache.by_hash.insert(slot, (presented_key.into(), digest));
        }
        Some(identity)
    }

    fn by_exact_digest(&self, digest: &[u8; 32]) -> Option<&Identity> {
        let (stored, identity) = self.by_digest.get_key_value(digest)?;
        // The map already matched; confirm without a data-dependent early exit.
        bool::from(stored.ct_eq(digest)).then_some(identity)
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// Keys that checked out on this worker: keyed hash of the key → (the key, its digest).
/// Bounded by `capacity` (and by the number of configured keys, since only keys that
/// match one are stored); the hash key is random per worker. Rebuilt with the settings.
pub struct KeyCache {
    capacity: usize,
    hasher: RandomState,
    by_hash: HashMap<u64, (Box<str>, [u8; 32])>,
}

impl KeyCache {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, hasher: RandomState::new(), by_hash: HashMap::new() }
    }

    /// The digest of a key: remembered for a key that checked out before, else computed.
    pub fn digest(&self, presented_key: &str) -> [u8; 32] {
        let slot = self.hasher.hash_one(presented_key);
        match self.by_hash.get(&slot) {
            Some((key, digest)) if crate::ct::eq(key.as_bytes(), presented_key.as_bytes()) => *digest,
            _ => Sha256::digest(presented_key.as_bytes()).into(),
        }
    }

    /// Remembers a key that checked out elsewhere (the key service), as `lookup_cached`
    /// does for configured ones.
    pub fn remember(&mut self, presented_key: &str, digest: [u8; 32]) {
        let slot = self.hasher.hash_one(presented_key);
        if self.by_hash.len() < self.capacity || self.by_hash.contains_key(&slot) {
            self.by_hash.insert(slot, (presented_key.into(), digest));
        }
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

// Holds keys: never print them.
impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyCache").field("keys", &self.by_hash.len()).finish()
    }
}

/// Lowercase hex SHA-256 of a key: the value to put in `keys[].sha256`.
pub fn sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn parse_digest(value: &str) -> Result<[u8; 32], &'static str> {
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be 64 hex characters (the SHA-256 of the key, not the key)");
    }
    let mut digest = [0u8; 32];
    // hex accepts either case, which normalises upper-case configs.
    hex::decode_to_slice(value, &mut digest).map_err(|_| "must be 64 hex characters")?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    // Under wasm-bindgen-test the same tests run compiled to wasm32 (see `make test-wasm`).
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn entry(sha256: &str, user: &str, groups: &[&str]) -> ApiKeyEntry {
        let groups = groups.iter().map(|g| g.to_string()).collect();
        ApiKeyEntry { sha256: sha256.into(), user: user.into(), groups }
    }

    #[test]
    fn sha256_hex_is_lowercase_digest() {
        // SHA-256("abc"), FIPS 180-2 example.
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex("abc"), want);
    }

    /// (user, groups)
    type Owner<'a> = (&'a str, &'a [&'a str]);

    #[test]
    fn cached_lookup_agrees_and_caches_only_good_keys() {
        let store = ApiKeyStore::new(&[
            entry(&sha256_hex("sk-mittens"), "mittens", &["premium"]),
            entry(&sha256_hex("sk-boots"), "boots", &[]),
        ])
        .unwrap();
        // (presented key, owner, cache size after)
        let cases: &[(&str, Option<&str>, usize)] = &[
            ("sk-mittens", Some("mittens"), 1),
            ("sk-mittens", Some("mittens"), 1), // served from the cache
            ("sk-nobody", None, 1),             // wrong keys are not remembered
            ("sk-mittens ", None, 1),
            ("sk-boots", Some("boots"), 2),
            ("sk-boots", Some("boots"), 2),
            ("", None, 2),
        ];
        let mut cache = KeyCache::new(8);
        for (i, (key, owner, size)) in cases.iter().enumerate() {
            let got = store.lookup_cached(key, &mut cache).map(|id| id.user.as_str());
            assert_eq!(got, *owner, "case {i}");
            assert_eq!(got, store.lookup(key).map(|id| id.user.as_str()), "case {i}: same as uncached");
            assert_eq!(cache.len(), *size, "case {i}");
        }
        // Full or disabled: lookups still answer, nothing more is stored.
        for capacity in [0, 1] {
            let mut cache = KeyCache::new(capacity);
            for key in ["sk-mittens", "sk-boots", "sk-boots"] {
                assert!(store.lookup_cached(key, &mut cache).is_some(), "{key}");
            }
            assert_eq!(cache.len(), capacity);
        }
        assert_eq!(format!("{:?}", KeyCache::new(1)), "KeyCache { keys: 0 }");
    }

    #[test]
    fn lookup_finds_the_owner_only() {
        let store = ApiKeyStore::new(&[
            entry(&sha256_hex("sk-mittens"), "mittens", &["premium"]),
            entry(&sha256_hex("sk-boots").to_uppercase(), "boots", &[]),
        ])
        .unwrap();
        assert_eq!((store.len(), store.is_empty()), (2, false));
        let mittens = sha256_hex("sk-mittens");
        #[rustfmt::skip]
        let cases: &[(&str, Option<Owner>)] = &[
            ("sk-mittens", Some(("mittens", &["premium"]))),
            ("sk-boots", Some(("boots", &[]))), // configured in upper case
            ("sk-mittens ", None),
            ("SK-MITTENS", None),
            ("", None),
            (&mittens, None), // the digest itself is not a key
        ];
        for (key, want) in cases {
            let got = store.lookup(key).map(|i| (i.user.as_str(), i.groups.clone()));
            let want = want.map(|(user, groups)| (user, groups.iter().map(|g| g.to_string()).collect()));
            assert_eq!(got, want, "key {key:?}");
        }
    }

    #[test]
    fn empty_store() {
        let store = ApiKeyStore::new(&[]).unwrap();
        assert!(store.is_empty());
        assert_eq!(store.lookup("anything"), None);
    }

    #[test]
    fn invalid_entries_name_index_and_field() {
        let d = sha256_hex("k");
        let other = sha256_hex("other");
        #[rustfmt::skip]
        let cases: Vec<(Vec<ApiKeyEntry>, &str)> = vec![
            (vec![entry("abc", "u", &[])], "keys[0].sha256: must be 64 hex"),
            (vec![entry("", "u", &[])], "keys[0].sha256: must be 64 hex"),
            (vec![entry(&format!("{d}0"), "u", &[])], "keys[0].sha256: must be 64 hex"),
            (vec![entry(&"g".repeat(64), "u", &[])], "keys[0].sha256: must be 64 hex"),
            (vec![entry(&format!("{}+", &d[..63]), "u", &[])], "keys[0].sha256: must be 64 hex"),
            (vec![entry(&other, "u", &[]), entry("sk-live-123", "u", &[])], "keys[1].sha256: must be 64 hex"),
            (vec![entry(&d, "u", &[]), entry(&d.to_uppercase(), "v", &[])], "keys[1].sha256: same digest as keys[0]"),
            (vec![entry(&d, "", &[])], "keys[0].user: must not be empty"),
            (vec![entry(&d, "a\r\nx-evil: 1", &[])], "keys[0].user: must not contain control"),
            (vec![entry(&d, "a,b", &[])], "keys[0].user: must not contain commas"),
            (vec![entry(&d, "u", &[""])], "keys[0].groups: groups[0] must not be empty"),
            (vec![entry(&other, "u", &[]), entry(&d, "u", &["ok", "a,b"])], "keys[1].groups: groups[1] must not contain"),
            (vec![entry(&d, "u", &["a b"])], "keys[0].groups: groups[0] must not contain"),
            (vec![entry(&d, "u", &["a\tb"])], "keys[0].groups: groups[0] must not contain"),
        ];
        for (entries, want) in cases {
            let err = ApiKeyStore::new(&entries).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with(want), "got {text:?}, want prefix {want:?}");
            assert!(!text.contains("sk-live-123"), "{text}");
        }
    }

    #[test]
    fn entry_json_is_strict() {
        let ok: ApiKeyEntry = serde_json::from_str(r#"{"sha256":"x","user":"u"}"#).unwrap();
        assert!(ok.groups.is_empty());
        #[rustfmt::skip]
        let bad = [
            r#"{"sha256":"x","user":"u","key":"sk"}"#,
            r#"{"user":"u"}"#,
            r#"{"sha256":"x"}"#,
        ];
        for json in bad {
            assert!(serde_json::from_str::<ApiKeyEntry>(json).is_err(), "{json}");
        }
    }

    #[test]
    fn debug_hides_digests() {
        let d = sha256_hex("k");
        let store = ApiKeyStore::new(&[entry(&d, "u", &[])]).unwrap();
        let shown = format!("{store:?}");
        assert_eq!(shown, "ApiKeyStore { keys: 1 }");
    }
}
