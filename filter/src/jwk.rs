//! JWKS parsing and signature checks for every algorithm an identity provider uses:
//! HS256 (`oct`), RS256/384/512 and PS256/384/512 (`RSA`, 2048–4096 bits), ES256 (`EC`
//! P-256), ES384 (`EC` P-384) and EdDSA (`OKP` Ed25519).
//!
//! Why it is shaped this way:
//! - **No algorithm confusion.** A token's `alg` selects the kind of key that may check
//!   it, and a key is only ever used for the algorithms of its own type ([`Jwk::accepts`]):
//!   an HS* token is checked against `oct` secrets only, never against a public key's
//!   bytes; `RSA` keys serve RS*/PS*, `EC` keys the ES* of their curve, `OKP` keys EdDSA;
//!   a key's own `alg`, when present, must equal the token's. `none` names no algorithm.
//! - **Unusable keys are skipped, as Envoy's `jwt_authn` does**: an IdP's JWKS routinely
//!   holds encryption keys, certificate-only entries or curves we do not implement, and
//!   one of them must not take the provider down. Only a set with no usable key at all
//!   is an error (the config names the field); the error says why the last one was
//!   skipped, so an operator can see what is wrong with a single-key set.
//! - **Verify only.** The RustCrypto crates are used for public-key operations alone;
//!   nothing here holds a private key (see the README's security notes on RUSTSEC-2023-0071).
//! - Keys are decoded once (at configuration or when a fetched set is first read on a
//!   worker), so a request pays for the signature check alone, and a verified token is
//!   cached (`jwt::TokenCache`), so it pays for it once per worker.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha384, Sha512};

/// Base64url that accepts trailing padding, as JWKS members are sometimes padded.
pub(crate) const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Smallest and largest RSA modulus accepted (bits).
pub const RSA_MIN_BITS: usize = 2048;
pub const RSA_MAX_BITS: usize = 4096;

/// A JWKS holding more keys than this is cut to its first `MAX_KEYS` (an IdP publishes
/// a handful; the bound keeps a hostile or broken endpoint from filling wasm memory).
pub const MAX_KEYS: usize = 64;

/// The JWS algorithms Tollgate verifies. Names are case-sensitive (RFC 7518).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    HS256,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Alg {
    pub fn from_name(name: &str) -> Option<Alg> {
        Some(match name {
            "HS256" => Alg::HS256,
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "EdDSA" => Alg::EdDSA,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::HS256 => "HS256",
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::EdDSA => "EdDSA",
        }
    }

    /// True for the symmetric algorithms, whose keys are secrets.
    pub fn is_hmac(self) -> bool {
        matches!(self, Alg::HS256)
    }
}

/// The decoded key. Public keys are boxed: an RSA key is large and most sets are small.
#[derive(Clone)]
enum Material {
    Hmac(Vec<u8>),
    Rsa(Box<rsa::RsaPublicKey>),
    P256(Box<p256::ecdsa::VerifyingKey>),
    P384(Box<p384::ecdsa::VerifyingKey>),
    Ed25519(Box<ed25519_dalek::VerifyingKey>),
}

/// One usable key of a JWKS.
#[derive(Clone)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The key's own `alg`, when it names one: then only that algorithm may use it.
    alg: Option<Alg>,
    material: Material,
}

impl Jwk {
    /// An HS256 secret (tests and the `oct` members of a JWKS).
    pub fn hmac(kid: Option<String>, secret: Vec<u8>) -> Self {
        Self { kid, alg: None, material: Material::Hmac(secret) }
    }

    /// The secret of an `oct` key (tests).
    #[cfg(test)]
    pub(crate) fn secret(&self) -> Option<&[u8]> {
        match &self.material {
            Material::Hmac(secret) => Some(secret),
            _ => None,
        }
    }

    /// The JWKS `kty` of this key.
    pub fn kty(&self) -> &'static str {
        match self.material {
            Material::Hmac(_) => "oct",
            Material::Rsa(_) => "RSA",
            Material::P256(_) | Material::P384(_) => "EC",
            Material::Ed25519(_) => "OKP",
        }
    }

    /// Whether a token signed with `alg` may be checked with this key: the key type and
    /// curve must be the algorithm's, and the key's own `alg` (if any) must equal it.
    pub fn accepts(&self, alg: Alg) -> bool {
        if self.alg.is_some_and(|own| own != alg) {
            return false;
        }
        matches!(
            (&self.material, alg),
            (Material::Hmac(_), Alg::HS256)
                | (Material::Rsa(_), Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512)
                | (Material::P256(_), Alg::ES256)
                | (Material::P384(_), Alg::ES384)
                | (Material::Ed25519(_), Alg::EdDSA)
        )
    }

    /// Checks `signature` over `signed` (the JWS signing input) with `alg`. False when the
    /// key does not serve `alg`, whatever the signature. HMACs compare in constant time.
    pub fn verify(&self, alg: Alg, signed: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier;
        if !self.accepts(alg) {
            return false;
        }
        match &self.material {
            Material::Hmac(secret) => match Hmac::<Sha256>::new_from_slice(secret) {
                Ok(mut mac) => {
                    mac.update(signed);
                    mac.verify_slice(signature).is_ok()
                }
                Err(_) => false,
            },
            Material::Rsa(key) => {
                let result = match alg {
                    Alg::RS256 => key.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(signed), signature),
                    Alg::RS384 => key.verify(rsa::Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(signed), signature),
                    Alg::RS512 => key.verify(rsa::Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(signed), signature),
                    // RFC 7518 3.5: MGF1 with the same hash, salt as long as the hash.
                    Alg::PS256 => key.verify(rsa::Pss::new::<Sha256>(), &Sha256::digest(signed), signature),
                    Alg::PS384 => key.verify(rsa::Pss::new::<Sha384>(), &Sha384::digest(signed), signature),
                    Alg::PS512 => key.verify(rsa::Pss::new::<Sha512>(), &Sha512::digest(signed), signature),
                    _ => return false,
                };
                result.is_ok()
            }
            // JWS ECDSA signatures are r || s, fixed width (RFC 7518 3.4), not DER.
            Material::P256(key) => p256::ecdsa::Signature::from_slice(signature)
                .map(|sig| key.verify(signed, &sig).is_ok())
                .unwrap_or(false),
            Material::P384(key) => p384::ecdsa::Signature::from_slice(signature)
                .map(|sig| key.verify(signed, &sig).is_ok())
                .unwrap_or(false),
            Material::Ed25519(key) => ed25519_dalek::Signature::from_slice(signature)
                .map(|sig| key.verify(signed, &sig).is_ok())
                .unwrap_or(false),
        }
    }
}

impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Jwk");
        d.field("kid", &self.kid).field("kty", &self.kty()).field("alg", &self.alg.map(Alg::name));
        match &self.material {
            Material::Hmac(secret) => d.field("secret_bytes", &secret.len()),
            Material::Rsa(key) => {
                use rsa::traits::PublicKeyParts;
                d.field("bits", &key.n().bits())
            }
            Material::P256(_) => d.field("crv", &"P-256"),
            Material::P384(_) => d.field("crv", &"P-384"),
            Material::Ed25519(_) => d.field("crv", &"Ed25519"),
        };
        d.finish()
    }
}

/// Which keys a JWKS may contribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Written in the configuration (`jwks`, `jwks_env`): `oct` secrets allowed.
    Inline,
    /// Fetched from a `jwks_uri` (`remote_jwks`): public keys only, `oct` entries are
    /// skipped (a secret published over the network is no secret).
    Remote,
}

/// The usable keys of a JWKS.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// Parses a JWKS written in the configuration (see [`Jwks::parse_from`]).
    pub fn parse(json: &str) -> Result<Jwks, String> {
        Jwks::parse_from(json, Source::Inline)
    }

    /// Parses `{"keys":[...]}` and keeps the keys the filter can use; entries it cannot
    /// use are skipped (see the module docs). An `oct` key naming an algorithm other
    /// than HS256 is refused outright in a configured set: it is a secret the operator
    /// wrote for us, so a mistake there should be loud.
    pub fn parse_from(json: &str, source: Source) -> Result<Jwks, String> {
        // Parsed as untyped JSON: typed serde errors quote values, which could be a secret.
        let doc: Value = serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
        let list = doc
            .as_object()
            .and_then(|o| o.get("keys"))
            .and_then(Value::as_array)
            .ok_or("must be an object with a \"keys\" array")?;
        let mut keys = Vec::new();
        let mut last_skip = None;
        for (i, jwk) in list.iter().enumerate().take(MAX_KEYS) {
            let jwk = jwk.as_object().ok_or_else(|| format!("keys[{i}]: must be an object"))?;
            match parse_key(jwk, source) {
                Ok(key) => keys.push(key),
                Err(Skip::Fatal(why)) => return Err(format!("keys[{i}].{why}")),
                Err(Skip::Unusable(why)) => last_skip = Some(format!("keys[{i}].{why}")),
            }
        }
        if keys.is_empty() {
            let mut msg = match source {
                Source::Inline => "no usable key (need kty oct/HS256, RSA, EC P-256/P-384 or OKP Ed25519)".to_string(),
                Source::Remote => "no usable key (need kty RSA, EC P-256/P-384 or OKP Ed25519)".to_string(),
            };
            if let Some(why) = last_skip {
                msg.push_str(": ");
                msg.push_str(&why);
            }
            return Err(msg);
        }
        Ok(Jwks { keys })
    }
}

/// Why an entry was not taken.
enum Skip {
    /// The whole set is refused.
    Fatal(String),
    /// This entry is skipped (`member: reason`).
    Unusable(String),
}

fn unusable(s: impl Into<String>) -> Skip {
    Skip::Unusable(s.into())
}

fn parse_key(jwk: &Map<String, Value>, source: Source) -> Result<Jwk, Skip> {
    let kty = match jwk.get("kty") {
        Some(Value::String(k)) => k.as_str(),
        _ => return Err(Skip::Fatal("kty: missing".into())),
    };
    let kid = match jwk.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(Skip::Fatal("kid: must be a string".into())),
    };
    if kty == "oct" {
        if source == Source::Remote {
            return Err(unusable("kty: oct keys are not taken from a remote JWKS"));
        }
        match jwk.get("alg") {
            None => {}
            Some(Value::String(a)) if a == "HS256" => {}
            Some(_) => return Err(Skip::Fatal("alg: only HS256 is supported for oct keys".into())),
        }
        let k = jwk.get("k").and_then(Value::as_str).ok_or_else(|| Skip::Fatal("k: missing".into()))?;
        let secret = URL_SAFE_LENIENT.decode(k).map_err(|_| Skip::Fatal("k: not valid base64url".into()))?;
        if secret.is_empty() {
            return Err(Skip::Fatal("k: empty secret".into()));
        }
        return Ok(Jwk::hmac(kid, secret));
    }
    if let Some(u) = jwk.get("use") {
        if u.as_str() != Some("sig") {
            return Err(unusable("use: not a signing key"));
        }
    }
    let alg = match jwk.get("alg") {
        None => None,
        Some(Value::String(a)) => Some(Alg::from_name(a).ok_or_else(|| unusable("alg: not supported"))?),
        Some(_) => return Err(unusable("alg: must be a string")),
    };
    let material = match kty {
        "RSA" => rsa_key(jwk)?,
        "EC" => ec_key(jwk)?,
        "OKP" => okp_key(jwk)?,
        _ => return Err(unusable("kty: not supported")),
    };
    let key = Jwk { kid, alg: None, material };
    // A key whose own alg its type cannot serve (an RSA key marked ES256) is unusable.
    if let Some(alg) = alg {
        if !key.accepts(alg) {
            return Err(unusable("alg: does not match the key type"));
        }
    }
    Ok(Jwk { alg, ..key })
}

fn member(jwk: &Map<String, Value>, name: &'static str) -> Result<Vec<u8>, Skip> {
    let text = jwk.get(name).and_then(Value::as_str).ok_or_else(|| unusable(format!("{name}: missing")))?;
    URL_SAFE_LENIENT.decode(text).map_err(|_| unusable(format!("{name}: not valid base64url")))
}

fn rsa_key(jwk: &Map<String, Value>) -> Result<Material, Skip> {
    let n = member(jwk, "n")?;
    let e = member(jwk, "e")?;
    let n = rsa::BigUint::from_bytes_be(&n);
    let bits = n.bits();
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(unusable(format!("n: RSA modulus of {bits} bits (need {RSA_MIN_BITS} to {RSA_MAX_BITS})")));
    }
    let key = rsa::RsaPublicKey::new_with_max_size(n, rsa::BigUint::from_bytes_be(&e), RSA_MAX_BITS)
        .map_err(|_| unusable("e: not a valid RSA public exponent"))?;
    Ok(Material::Rsa(Box::new(key)))
}

fn ec_key(jwk: &Map<String, Value>) -> Result<Material, Skip> {
    let crv = jwk.get("crv").and_then(Value::as_str).ok_or_else(|| unusable("crv: missing"))?;
    let (x, y) = (member(jwk, "x")?, member(jwk, "y")?);
    let bad = || unusable("x: not a point on the curve");
    // The uncompressed SEC1 point, 0x04 ‖ x ‖ y, each coordinate of the curve's size.
    let point = |size: usize| {
        if x.len() == size && y.len() == size {
            Ok([&[0x04u8][..], &x, &y].concat())
        } else {
            Err(bad())
        }
    };
    match crv {
        "P-256" => p256::ecdsa::VerifyingKey::from_sec1_bytes(&point(32)?)
            .map(|key| Material::P256(Box::new(key)))
            .map_err(|_| bad()),
        "P-384" => p384::ecdsa::VerifyingKey::from_sec1_bytes(&point(48)?)
            .map(|key| Material::P384(Box::new(key)))
            .map_err(|_| bad()),
        _ => Err(unusable("crv: not supported (P-256 and P-384 are)")),
    }
}

fn okp_key(jwk: &Map<String, Value>) -> Result<Material, Skip> {
    match jwk.get("crv").and_then(Value::as_str) {
        Some("Ed25519") => {}
        Some(_) => return Err(unusable("crv: not supported (Ed25519 is)")),
        None => return Err(unusable("crv: missing")),
    }
    let x: [u8; 32] = member(jwk, "x")?.try_into().map_err(|_| unusable("x: not 32 bytes"))?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&x).map_err(|_| unusable("x: not an Ed25519 public key"))?;
    Ok(Material::Ed25519(Box::new(key)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    // RFC 7515 appendix A.2 (RS256), A.3 (ES256), A.4 (ES512); RFC 8037 A.2/A.4/A.5 (Ed25519).
    pub(crate) const A2_N: &str = "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ";
    pub(crate) const A2_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw";
    pub(crate) const A3_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    pub(crate) const A3_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
    pub(crate) const A3_TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";
    pub(crate) const A4_JWK: &str = r#"{"kty":"EC","crv":"P-521","x":"AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk","y":"ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDly79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2"}"#;
    pub(crate) const A4_TOKEN: &str = "eyJhbGciOiJFUzUxMiJ9.UGF5bG9hZA.AdwMgeerwtHoh-l192l60hp9wAHZFVJbLfD_UxMi70cwnZOYaRI1bKPWROc-mZZqwqT2SI-KGDKB34XO0aw_7XdtAG8GaSwFKdCAPZgoXD2YBJZCPEX3xKpRwcdOO8KpEHwJjyqOgzDO7iKvU8vcnwNrmxYbSW9ERBXukOXolLzeO_Jn";
    pub(crate) const ED_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    pub(crate) const ED_TOKEN: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";

    pub(crate) fn a2_jwk() -> String {
        format!(r#"{{"kty":"RSA","n":"{A2_N}","e":"AQAB"}}"#)
    }
    pub(crate) fn a3_jwk() -> String {
        format!(r#"{{"kty":"EC","crv":"P-256","x":"{A3_X}","y":"{A3_Y}"}}"#)
    }
    pub(crate) fn ed_jwk() -> String {
        format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{ED_X}"}}"#)
    }

    fn one(jwk: &str) -> Jwk {
        let mut set = Jwks::parse(&format!(r#"{{"keys":[{jwk}]}}"#)).unwrap_or_else(|e| panic!("{jwk}: {e}"));
        set.keys.remove(0)
    }

    /// (signing input, signature) of a compact token.
    fn split(token: &str) -> (&str, Vec<u8>) {
        let (signed, sig) = token.rsplit_once('.').unwrap();
        (signed, URL_SAFE_NO_PAD.decode(sig).unwrap())
    }

    #[test]
    fn rfc_vectors() {
        #[rustfmt::skip]
        let cases: &[(&str, String, Alg, &str)] = &[
            ("RFC 7515 A.2 RS256", a2_jwk(), Alg::RS256, A2_TOKEN),
            ("RFC 7515 A.3 ES256", a3_jwk(), Alg::ES256, A3_TOKEN),
            ("RFC 8037 A.4/A.5 Ed25519", ed_jwk(), Alg::EdDSA, ED_TOKEN),
        ];
        for (name, jwk, alg, token) in cases {
            let key = one(jwk);
            let (signed, sig) = split(token);
            assert!(key.verify(*alg, signed.as_bytes(), &sig), "{name}");
            // One changed bit of the input or the signature fails.
            let mut tampered = signed.as_bytes().to_vec();
            if let Some(b) = tampered.last_mut() {
                *b ^= 1;
            }
            assert!(!key.verify(*alg, &tampered, &sig), "{name}: tampered input");
            let mut bad_sig = sig.clone();
            if let Some(b) = bad_sig.get_mut(10) {
                *b ^= 0x40;
            }
            assert!(!key.verify(*alg, signed.as_bytes(), &bad_sig), "{name}: tampered signature");
            assert!(!key.verify(*alg, signed.as_bytes(), &sig[..sig.len() - 1]), "{name}: short signature");
            assert!(!key.verify(*alg, signed.as_bytes(), &[]), "{name}: empty signature");
        }
        // A.4 (ES512, P-521) is not supported: the key is skipped, the algorithm unknown.
        let err = Jwks::parse(&format!(r#"{{"keys":[{A4_JWK}]}}"#)).unwrap_err();
        assert!(err.contains("keys[0].crv: not supported"), "{err}");
        assert_eq!(Alg::from_name("ES512"), None);
        assert!(A4_TOKEN.starts_with("eyJhbGciOiJFUzUxMiJ9."));
    }

    /// Native cost of one uncached signature check (run with `--release --ignored`).
    #[test]
    #[ignore]
    fn measure_verify() {
        for (name, jwk, alg, token) in [
            ("RS256", a2_jwk(), Alg::RS256, A2_TOKEN),
            ("ES256", a3_jwk(), Alg::ES256, A3_TOKEN),
            ("EdDSA", ed_jwk(), Alg::EdDSA, ED_TOKEN),
        ] {
            let key = one(&jwk);
            let (signed, sig) = split(token);
            let rounds = 200;
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                assert!(key.verify(alg, signed.as_bytes(), &sig));
            }
            println!("{name}: {:?} per verify", start.elapsed() / rounds);
        }
    }

    #[test]
    fn keys_serve_only_their_algorithms() {
        let hs = Jwk::hmac(None, b"secret".to_vec());
        let rsa = one(&a2_jwk());
        let p256 = one(&a3_jwk());
        let ed = one(&ed_jwk());
        let rs256_only = one(&format!(r#"{{"kty":"RSA","alg":"RS256","n":"{A2_N}","e":"AQAB"}}"#));
        let ps384_only = one(&format!(r#"{{"kty":"RSA","alg":"PS384","n":"{A2_N}","e":"AQAB"}}"#));
        use Alg::*;
        let all = [HS256, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA];
        #[rustfmt::skip]
        let cases: &[(&str, &Jwk, &[Alg])] = &[
            ("oct", &hs, &[HS256]),
            ("RSA", &rsa, &[RS256, RS384, RS512, PS256, PS384, PS512]),
            ("EC P-256", &p256, &[ES256]),
            ("OKP Ed25519", &ed, &[EdDSA]),
            ("RSA alg RS256", &rs256_only, &[RS256]),
            ("RSA alg PS384", &ps384_only, &[PS384]),
        ];
        for (name, key, serves) in cases {
            for alg in all {
                assert_eq!(key.accepts(alg), serves.contains(&alg), "{name} {}", alg.name());
            }
        }
        // The A.2 signature is RS256: under any other algorithm of the same key it fails,
        // and an HS256 check never uses the public key.
        let (signed, sig) = split(A2_TOKEN);
        for alg in all {
            assert_eq!(rsa.verify(alg, signed.as_bytes(), &sig), alg == RS256, "{}", alg.name());
        }
        assert!(!rs256_only.verify(PS256, signed.as_bytes(), &sig));
        for name in ["none", "None", "HS384", "HS512", "ES512", "rs256", "EDDSA", "Ed25519", ""] {
            assert_eq!(Alg::from_name(name), None, "{name}");
        }
        for alg in all {
            assert_eq!(Alg::from_name(alg.name()), Some(alg));
            assert_eq!(alg.is_hmac(), alg == HS256);
        }
    }

    #[test]
    fn unusable_entries_are_skipped() {
        let n_1024 = URL_SAFE_NO_PAD.encode([0xc5u8; 128]);
        let n_8192 = URL_SAFE_NO_PAD.encode([0xc5u8; 1024]);
        let x_ed = ED_X;
        #[rustfmt::skip]
        let skipped: &[(&str, String, &str)] = &[
            ("unknown kty", r#"{"kty":"XYZ"}"#.into(), "kty: not supported"),
            ("x5c only", r#"{"kty":"RSA","x5c":["MIIB"]}"#.into(), "n: missing"),
            ("use enc", format!(r#"{{"kty":"RSA","use":"enc","n":"{A2_N}","e":"AQAB"}}"#), "use: not a signing key"),
            ("RSA 1024", format!(r#"{{"kty":"RSA","n":"{n_1024}","e":"AQAB"}}"#), "n: RSA modulus of 1024 bits"),
            ("RSA 8192", format!(r#"{{"kty":"RSA","n":"{n_8192}","e":"AQAB"}}"#), "n: RSA modulus of 8192 bits"),
            ("RSA e=1", format!(r#"{{"kty":"RSA","n":"{A2_N}","e":"AQ"}}"#), "e: not a valid"),
            ("RSA bad n", r#"{"kty":"RSA","n":"!!","e":"AQAB"}"#.into(), "n: not valid base64url"),
            ("RSA alg ES256", format!(r#"{{"kty":"RSA","alg":"ES256","n":"{A2_N}","e":"AQAB"}}"#), "alg: does not match"),
            ("RSA alg RSA-OAEP", format!(r#"{{"kty":"RSA","alg":"RSA-OAEP","n":"{A2_N}","e":"AQAB"}}"#), "alg: not supported"),
            ("P-521", A4_JWK.into(), "crv: not supported"),
            ("secp256k1", format!(r#"{{"kty":"EC","crv":"secp256k1","x":"{A3_X}","y":"{A3_Y}"}}"#), "crv: not supported"),
            ("EC no crv", format!(r#"{{"kty":"EC","x":"{A3_X}","y":"{A3_Y}"}}"#), "crv: missing"),
            ("EC off curve", format!(r#"{{"kty":"EC","crv":"P-256","x":"{A3_X}","y":"{A3_X}"}}"#), "x: not a point"),
            ("EC P-384 with P-256 sizes", format!(r#"{{"kty":"EC","crv":"P-384","x":"{A3_X}","y":"{A3_Y}"}}"#), "x: not a point"),
            ("EC alg ES384 on P-256", format!(r#"{{"kty":"EC","crv":"P-256","alg":"ES384","x":"{A3_X}","y":"{A3_Y}"}}"#), "alg: does not match"),
            ("X25519", format!(r#"{{"kty":"OKP","crv":"X25519","x":"{x_ed}"}}"#), "crv: not supported"),
            ("Ed448", r#"{"kty":"OKP","crv":"Ed448","x":"AA"}"#.into(), "crv: not supported"),
            ("Ed25519 short", r#"{"kty":"OKP","crv":"Ed25519","x":"AAAA"}"#.into(), "x: not 32 bytes"),
        ];
        for (name, jwk, why) in skipped {
            // Alone: no usable key, and the message says why.
            let err = Jwks::parse(&format!(r#"{{"keys":[{jwk}]}}"#)).unwrap_err();
            assert!(err.starts_with("no usable key"), "{name}: {err}");
            assert!(err.contains(&format!("keys[0].{why}")), "{name}: {err}");
            // Beside a good key: skipped, the good key kept.
            let set =
                Jwks::parse(&format!(r#"{{"keys":[{jwk},{}]}}"#, ed_jwk())).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(set.keys.len(), 1, "{name}");
            assert_eq!(set.keys[0].kty(), "OKP", "{name}");
        }

        // Remote sets take public keys only.
        let mixed = format!(r#"{{"keys":[{{"kty":"oct","k":"c2VjcmV0"}},{}]}}"#, a2_jwk());
        assert_eq!(Jwks::parse(&mixed).unwrap().keys.len(), 2);
        let remote = Jwks::parse_from(&mixed, Source::Remote).unwrap();
        assert_eq!(remote.keys.iter().map(Jwk::kty).collect::<Vec<_>>(), ["RSA"]);
        let err = Jwks::parse_from(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, Source::Remote).unwrap_err();
        assert!(err.contains("oct keys are not taken"), "{err}");
        assert!(!err.contains("c2Vj"), "{err}");

        // At most MAX_KEYS entries are read.
        let many = vec![ed_jwk(); MAX_KEYS + 10].join(",");
        assert_eq!(Jwks::parse(&format!(r#"{{"keys":[{many}]}}"#)).unwrap().keys.len(), MAX_KEYS);

        // Debug shows the kind of key, never key material.
        let shown = format!("{:?}", Jwks::parse(&mixed).unwrap());
        assert!(shown.contains("\"RSA\"") && shown.contains("2048"), "{shown}");
        assert!(!shown.contains("secret") || shown.contains("secret_bytes"), "{shown}");
    }
}
