//! Fixtures shared by the fuzz targets: the Istio HS256 dev guide's key and token,
//! a fixed clock, and a minting helper.
#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The fixed clock every target verifies at.
pub const NOW: u64 = 1_700_000_000;

/// Istio's HS256 guide secret: these 64 ASCII characters, used as raw bytes.
pub const DEV_SECRET: &[u8] = b"f59f73eff3357c3754b9b60671f16ffcec9b1a301498fa18c928bb753d4b385a";
/// Istio's dev token: header {"alg":"HS256","typ":"JWT","kid":"dev-key"}, claims
/// {"iss":"dev","sub":"dev-user"}, signed with `DEV_SECRET`.
pub const DEV_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRldi1rZXkifQ.eyJpc3MiOiJkZXYiLCJzdWIiOiJkZXYtdXNlciJ9.S6AKJ6CRs5nbrhHPshc2KnikNkjLp9isg6xlR4kSecQ";

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// An `oct` JWK for `secret`, with `kid` when given.
pub fn jwk(kid: Option<&str>, secret: &[u8]) -> serde_json::Value {
    let mut k = serde_json::json!({"kty": "oct", "alg": "HS256", "k": b64(secret)});
    if let Some(kid) = kid {
        k["kid"] = kid.into();
    }
    k
}

/// The JWKS string of these keys, as `jwt.providers[].jwks` takes it.
pub fn jwks(keys: &[(Option<&str>, &[u8])]) -> String {
    let keys: Vec<_> = keys.iter().map(|(kid, s)| jwk(*kid, s)).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

pub fn hs256(secret: &[u8], signed: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(signed);
    mac.finalize().into_bytes().to_vec()
}

/// `b64(header).b64(payload).b64(HS256(secret))`, as an issuer signs.
pub fn mint(header: &[u8], payload: &[u8], secret: &[u8]) -> String {
    let signed = format!("{}.{}", b64(header), b64(payload));
    let sig = hs256(secret, signed.as_bytes());
    format!("{signed}.{}", b64(&sig))
}
