//! Credentials for development and tests: fresh API keys with their config entry,
//! HS256 JWTs and the JWKS that verifies them (the format Istio's
//! RequestAuthentication takes, so a dev setup moves to a cluster unchanged), and
//! [`Signer`]: RS*/PS*/ES256/ES384/EdDSA keys that sign tokens the way an identity
//! provider does, stored as private JWKs, with the public JWKS an IdP would publish.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::Sha256;

/// A fresh 256-bit API key, printable: `tg-` and 43 base64url characters.
pub fn new_api_key() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("tg-{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// A fresh random HMAC secret (32 bytes, printable).
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The `api_keys.keys` entry for a key: only its SHA-256 digest is stored.
pub fn key_entry(key: &str, user: &str, groups: &[String]) -> Value {
    json!({"sha256": tollgate_filter::keys::sha256_hex(key), "user": user, "groups": groups})
}

/// The JWKS JSON for one HS256 key. `secret` is used as raw bytes.
pub fn jwks(secret: &[u8], kid: Option<&str>) -> String {
    let mut key = json!({"kty": "oct", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(secret)});
    if let (Some(kid), Some(obj)) = (kid, key.as_object_mut()) {
        obj.insert("kid".into(), json!(kid));
    }
    json!({"keys": [key]}).to_string()
}

/// Lowercase hex SHA-256 of `data` (what the mock reports as `x-mock-received-body-sha256`).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(Sha256::digest(data))
}

/// Signs `claims` as an HS256 JWT with `secret` (raw bytes) and an optional `kid`.
pub fn mint_jwt(secret: &[u8], kid: Option<&str>, claims: &Value) -> anyhow::Result<String> {
    let mut header = json!({"alg": "HS256", "typ": "JWT"});
    if let (Some(kid), Some(obj)) = (kid, header.as_object_mut()) {
        obj.insert("kid".into(), json!(kid));
    }
    sign_raw(secret, &header.to_string(), &claims.to_string())
}

/// Signs arbitrary header and payload JSON text (tests use it to build bad tokens).
pub fn sign_raw(secret: &[u8], header_json: &str, payload_json: &str) -> anyhow::Result<String> {
    let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header_json), URL_SAFE_NO_PAD.encode(payload_json));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|e| anyhow::anyhow!("bad secret: {e}"))?;
    mac.update(signing_input.as_bytes());
    let sig = mac.finalize().into_bytes();
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// The algorithms [`Signer`] signs with (every one the filter verifies but HS256).
pub const SIGNING_ALGS: &[&str] = &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

enum SigningKey {
    Rsa(Box<rsa::RsaPrivateKey>),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
}

/// A private key of an identity provider, for tests and `tollgate jwt --key`.
pub struct Signer {
    pub alg: String,
    pub kid: Option<String>,
    key: SigningKey,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn b64_member(jwk: &Value, name: &str) -> anyhow::Result<Vec<u8>> {
    let text = jwk.get(name).and_then(Value::as_str).ok_or_else(|| anyhow::anyhow!("private JWK: `{name}` missing"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| anyhow::anyhow!("private JWK: `{name}` not base64url"))
}

impl Signer {
    /// A fresh key for `alg` (RSA: 2048 bits).
    pub fn generate(alg: &str, kid: Option<&str>) -> anyhow::Result<Signer> {
        Self::generate_rsa_bits(alg, kid, 2048)
    }

    /// As [`Signer::generate`], with the RSA modulus size (tests use small ones to
    /// check they are refused).
    pub fn generate_rsa_bits(alg: &str, kid: Option<&str>, bits: usize) -> anyhow::Result<Signer> {
        let mut rng = rand::rngs::OsRng;
        let key = match alg {
            "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512" => {
                SigningKey::Rsa(Box::new(rsa::RsaPrivateKey::new(&mut rng, bits)?))
            }
            "ES256" => SigningKey::P256(p256::ecdsa::SigningKey::random(&mut rng)),
            "ES384" => SigningKey::P384(p384::ecdsa::SigningKey::random(&mut rng)),
            "EdDSA" => {
                let mut seed = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut seed);
                SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed))
            }
            other => anyhow::bail!("unknown algorithm `{other}` (one of {})", SIGNING_ALGS.join(", ")),
        };
        Ok(Signer { alg: alg.to_string(), kid: kid.map(str::to_string), key })
    }

    /// Reads a private JWK as [`Signer::private_jwk`] writes it (`alg` must be set).
    pub fn from_private_jwk(json: &str) -> anyhow::Result<Signer> {
        use rsa::BigUint;
        let jwk: Value = serde_json::from_str(json).map_err(|e| anyhow::anyhow!("private JWK: {e}"))?;
        let alg =
            jwk.get("alg").and_then(Value::as_str).ok_or_else(|| anyhow::anyhow!("private JWK: `alg` missing"))?;
        let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_string);
        let big = |name| b64_member(&jwk, name).map(|b| BigUint::from_bytes_be(&b));
        let key = match (jwk.get("kty").and_then(Value::as_str), alg) {
            (Some("RSA"), _) => SigningKey::Rsa(Box::new(rsa::RsaPrivateKey::from_components(
                big("n")?,
                big("e")?,
                big("d")?,
                vec![big("p")?, big("q")?],
            )?)),
            (Some("EC"), "ES256") => SigningKey::P256(p256::ecdsa::SigningKey::from_slice(&b64_member(&jwk, "d")?)?),
            (Some("EC"), "ES384") => SigningKey::P384(p384::ecdsa::SigningKey::from_slice(&b64_member(&jwk, "d")?)?),
            (Some("OKP"), "EdDSA") => {
                let d: [u8; 32] =
                    b64_member(&jwk, "d")?.try_into().map_err(|_| anyhow::anyhow!("private JWK: `d` not 32 bytes"))?;
                SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&d))
            }
            (kty, alg) => anyhow::bail!("private JWK: kty {kty:?} with alg {alg} is not supported"),
        };
        Ok(Signer { alg: alg.to_string(), kid, key })
    }

    /// The public JWK (what a `jwks_uri` serves): `kty`, `kid`, `alg`, `use: sig` and
    /// the public members.
    pub fn public_jwk(&self) -> Value {
        use rsa::traits::PublicKeyParts;
        let mut jwk = match &self.key {
            SigningKey::Rsa(k) => json!({"kty": "RSA", "n": b64(&k.n().to_bytes_be()), "e": b64(&k.e().to_bytes_be())}),
            SigningKey::P256(k) => {
                let point = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256", "x": b64(point.x().map_or(&[][..], |x| x.as_slice())),
                       "y": b64(point.y().map_or(&[][..], |y| y.as_slice()))})
            }
            SigningKey::P384(k) => {
                let point = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-384", "x": b64(point.x().map_or(&[][..], |x| x.as_slice())),
                       "y": b64(point.y().map_or(&[][..], |y| y.as_slice()))})
            }
            SigningKey::Ed25519(k) => json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.verifying_key().as_bytes())}),
        };
        if let Some(obj) = jwk.as_object_mut() {
            obj.insert("alg".into(), json!(self.alg));
            obj.insert("use".into(), json!("sig"));
            if let Some(kid) = &self.kid {
                obj.insert("kid".into(), json!(kid));
            }
        }
        jwk
    }

    /// The public JWK plus the private members (`d`, and `p`, `q` for RSA): keep it secret.
    pub fn private_jwk(&self) -> Value {
        use rsa::traits::PrivateKeyParts;
        let mut jwk = self.public_jwk();
        let private = match &self.key {
            SigningKey::Rsa(k) => {
                let primes = k.primes();
                json!({"d": b64(&k.d().to_bytes_be()),
                       "p": b64(&primes.first().map(|p| p.to_bytes_be()).unwrap_or_default()),
                       "q": b64(&primes.get(1).map(|q| q.to_bytes_be()).unwrap_or_default())})
            }
            SigningKey::P256(k) => json!({"d": b64(&k.to_bytes())}),
            SigningKey::P384(k) => json!({"d": b64(&k.to_bytes())}),
            SigningKey::Ed25519(k) => json!({"d": b64(k.as_bytes())}),
        };
        if let (Some(obj), Some(private)) = (jwk.as_object_mut(), private.as_object()) {
            obj.extend(private.clone());
        }
        jwk
    }

    /// A JWKS of these keys' public halves.
    pub fn jwks(signers: &[&Signer]) -> String {
        json!({"keys": signers.iter().map(|s| s.public_jwk()).collect::<Vec<_>>()}).to_string()
    }

    /// Signs `claims` with the header `{"alg", "typ": "JWT", "kid"}`.
    pub fn mint(&self, claims: &Value) -> anyhow::Result<String> {
        let mut header = json!({"alg": self.alg, "typ": "JWT"});
        if let (Some(kid), Some(obj)) = (&self.kid, header.as_object_mut()) {
            obj.insert("kid".into(), json!(kid));
        }
        self.sign_raw(&header.to_string(), &claims.to_string())
    }

    /// Signs arbitrary header and payload JSON text with this key by `self.alg`
    /// (whatever the header says: tests use it to build confused tokens).
    pub fn sign_raw(&self, header_json: &str, payload_json: &str) -> anyhow::Result<String> {
        let input = format!("{}.{}", b64(header_json.as_bytes()), b64(payload_json.as_bytes()));
        let sig = self.signature(input.as_bytes())?;
        Ok(format!("{input}.{}", b64(&sig)))
    }

    fn signature(&self, input: &[u8]) -> anyhow::Result<Vec<u8>> {
        use sha2::{Digest, Sha384, Sha512};
        let mut rng = rand::rngs::OsRng;
        Ok(match (&self.key, self.alg.as_str()) {
            (SigningKey::Rsa(k), "RS256") => k.sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(input))?,
            (SigningKey::Rsa(k), "RS384") => k.sign(rsa::Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(input))?,
            (SigningKey::Rsa(k), "RS512") => k.sign(rsa::Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(input))?,
            (SigningKey::Rsa(k), "PS256") => {
                k.sign_with_rng(&mut rng, rsa::Pss::new::<Sha256>(), &Sha256::digest(input))?
            }
            (SigningKey::Rsa(k), "PS384") => {
                k.sign_with_rng(&mut rng, rsa::Pss::new::<Sha384>(), &Sha384::digest(input))?
            }
            (SigningKey::Rsa(k), "PS512") => {
                k.sign_with_rng(&mut rng, rsa::Pss::new::<Sha512>(), &Sha512::digest(input))?
            }
            (SigningKey::P256(k), _) => {
                let sig: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(k, input);
                sig.to_bytes().to_vec()
            }
            (SigningKey::P384(k), _) => {
                let sig: p384::ecdsa::Signature = p384::ecdsa::signature::Signer::sign(k, input);
                sig.to_bytes().to_vec()
            }
            (SigningKey::Ed25519(k), _) => ed25519_dalek::Signer::sign(k, input).to_bytes().to_vec(),
            (_, alg) => anyhow::bail!("an RSA key cannot sign {alg}"),
        })
    }
}

/// Three fixed 2048-bit RSA keys for tests, made by `tollgate jwt-key` (finding primes
/// takes seconds in a debug build). Test keys only: they are public in this repository.
const TEST_RSA_KEYS: &str = include_str!("test_rsa_keys.json");

/// The `i`-th (0..3) fixed RSA test key, signing with `alg` (RS* or PS*) under `kid`.
pub fn test_rsa_signer(i: usize, alg: &str, kid: Option<&str>) -> anyhow::Result<Signer> {
    let keys: Value = serde_json::from_str(TEST_RSA_KEYS)?;
    let jwk = keys.get("keys").and_then(|k| k.get(i)).ok_or_else(|| anyhow::anyhow!("no test RSA key {i}"))?;
    let mut signer = Signer::from_private_jwk(&jwk.to_string())?;
    signer.alg = alg.to_string();
    signer.kid = kid.map(str::to_string);
    Ok(signer)
}

/// A signer for `alg`: fixed RSA key `i % 3` for RS*/PS*, a fresh key otherwise.
pub fn test_signer(i: usize, alg: &str, kid: Option<&str>) -> anyhow::Result<Signer> {
    if alg.starts_with("RS") || alg.starts_with("PS") {
        test_rsa_signer(i % 3, alg, kid)
    } else {
        Signer::generate(alg, kid)
    }
}

/// Claims for a token: `iss`, `sub`, `groups`, `iat`, `exp` = now + ttl, optional `aud`.
pub fn claims(iss: &str, sub: &str, groups: &[String], ttl_secs: Option<u64>, aud: Option<&str>) -> Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut c = json!({"iss": iss, "sub": sub, "groups": groups, "iat": now});
    if let Some(obj) = c.as_object_mut() {
        if let Some(ttl) = ttl_secs {
            obj.insert("exp".into(), json!(now + ttl));
        }
        if let Some(aud) = aud {
            obj.insert("aud".into(), json!(aud));
        }
    }
    c
}

/// Parses a TTL such as `90s`, `15m`, `1h`, `7d` or plain seconds.
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (s.get(..i).unwrap_or(""), c),
        _ => (s, 's'),
    };
    let n: u64 = num.parse().map_err(|_| anyhow::anyhow!("bad ttl `{s}`: use e.g. 90s, 15m, 1h, 7d"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => anyhow::bail!("bad ttl unit in `{s}`: use s, m, h or d"),
    };
    n.checked_mul(mult).ok_or_else(|| anyhow::anyhow!("ttl `{s}` too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parsing() {
        for (s, want) in [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604_800)] {
            assert_eq!(parse_ttl(s).unwrap(), want, "{s}");
        }
        for s in ["", "h", "1y", "-1h", "1.5h"] {
            assert!(parse_ttl(s).is_err(), "{s}");
        }
    }

    #[test]
    fn signers_make_tokens_the_filter_verifies() {
        use tollgate_filter::jwt::{Jwks, JwtProvider, JwtVerifier};
        for (i, alg) in SIGNING_ALGS.iter().enumerate() {
            let signer = test_signer(i, alg, Some("k1")).unwrap();
            // Round trip through the private JWK.
            let again = Signer::from_private_jwk(&signer.private_jwk().to_string()).unwrap();
            assert_eq!(again.public_jwk(), signer.public_jwk(), "{alg}");
            let verifier = JwtVerifier::new(vec![JwtProvider {
                issuer: "idp".into(),
                audiences: vec![],
                authorized_parties: vec![],
                keys: Jwks::parse(&Signer::jwks(&[&signer])).unwrap(),
                user_claim: "sub".into(),
                groups_claim: "groups".into(),
                clock_skew_seconds: 60,
                require_exp: false,
            }]);
            let token = again.mint(&claims("idp", "alice", &["g".into()], Some(60), None)).unwrap();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            let got = verifier.verify(&token, now).unwrap_or_else(|e| panic!("{alg}: {e}"));
            assert_eq!(got.identity.user, "alice", "{alg}");
            assert!(!signer.public_jwk().to_string().contains("\"d\""), "{alg}: public JWK has d");
        }
    }

    #[test]
    fn keys_are_fresh_and_long() {
        let (a, b) = (new_api_key(), new_api_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 46);
    }
}
