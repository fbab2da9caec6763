#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Differential test: the same corpus of tokens goes through Envoy's own C++
//! `jwt_authn` (a second listener of the same Envoy) and through Tollgate, and both
//! must reach the same verdict. The intended differences are listed in the README
//! ("JWT: differences from Envoy jwt_authn") and asserted here as such.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use tollgate_e2e::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Both allow, or both deny (given).
    Same(bool),
    /// Intended difference: jwt_authn allows, Tollgate denies.
    TollgateStricter,
}

struct Case {
    name: String,
    token: String,
    expect: Expect,
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

fn corpus(secret: &[u8], other: &[u8]) -> Vec<Case> {
    let t = now();
    let hdr = json!({"alg": "HS256", "typ": "JWT", "kid": "dev-key"}).to_string();
    let sign = |h: &str, p: &Value| dev::sign_raw(secret, h, &p.to_string()).unwrap();
    let mut cases = Vec::new();
    let mut add = |name: String, token: String, expect: Expect| cases.push(Case { name, token, expect });

    for i in 0..15 {
        let aud = if i % 2 == 0 { json!("api") } else { json!(["other", "api"]) };
        let p = json!({"iss": "dev", "sub": format!("user{i}"), "aud": aud, "groups": ["g"], "exp": t + 600 + i});
        add(format!("valid {i}"), sign(&hdr, &p), Expect::Same(true));
    }
    for i in 0..5 {
        let p = json!({"iss": "dev", "sub": format!("noexp{i}"), "aud": "api"});
        add(format!("valid without exp {i}"), sign(&hdr, &p), Expect::Same(true));
    }
    for (i, d) in [3600, 600, 121, 100_000, 86_400].iter().enumerate() {
        let p = json!({"iss": "dev", "sub": "u", "aud": "api", "exp": t - d});
        add(format!("expired {i}"), sign(&hdr, &p), Expect::Same(false));
    }
    for (i, d) in [0, 10, 30].iter().enumerate() {
        let p = json!({"iss": "dev", "sub": "u", "aud": "api", "exp": t - d});
        add(format!("expired within skew {i}"), sign(&hdr, &p), Expect::Same(true));
    }
    for (i, d) in [3600, 600, 121].iter().enumerate() {
        let p = json!({"iss": "dev", "sub": "u", "aud": "api", "nbf": t + d, "exp": t + 7200});
        add(format!("not yet valid {i}"), sign(&hdr, &p), Expect::Same(false));
    }
    for (i, d) in [0, 30].iter().enumerate() {
        let p = json!({"iss": "dev", "sub": "u", "aud": "api", "nbf": t + d});
        add(format!("nbf within skew {i}"), sign(&hdr, &p), Expect::Same(true));
    }
    let good = json!({"iss": "dev", "sub": "u", "aud": "api", "exp": t + 600});
    for i in 0..8 {
        let p = json!({"iss": "dev", "sub": format!("w{i}"), "aud": "api", "exp": t + 600});
        add(format!("wrong key {i}"), dev::sign_raw(other, &hdr, &p.to_string()).unwrap(), Expect::Same(false));
    }
    for kid in ["other-key", "DEV-KEY", "dev-key "] {
        let h = json!({"alg": "HS256", "typ": "JWT", "kid": kid}).to_string();
        add(format!("wrong kid {kid:?}"), sign(&h, &good), Expect::Same(false));
    }
    for (i, h) in
        [json!({"alg": "HS256", "typ": "JWT"}), json!({"alg": "HS256"}), json!({"alg": "HS256", "typ": "JOSE"})]
            .iter()
            .enumerate()
    {
        add(format!("no kid, right key {i}"), sign(&h.to_string(), &good), Expect::Same(true));
    }
    for alg in ["none", "None", "NONE"] {
        let h = b64(&json!({"alg": alg, "typ": "JWT"}).to_string());
        let p = b64(&good.to_string());
        add(format!("alg {alg}, no signature"), format!("{h}.{p}."), Expect::Same(false));
        let signed = sign(&json!({"alg": alg, "kid": "dev-key"}).to_string(), &good);
        add(format!("alg {alg}, HMAC signature"), signed, Expect::Same(false));
    }
    for alg in ["RS256", "HS512", "HS384", "ES256", "hs256", "PS256"] {
        let h = json!({"alg": alg, "typ": "JWT", "kid": "dev-key"}).to_string();
        add(format!("alg {alg} header, HS256 signature"), sign(&h, &good), Expect::Same(false));
    }
    for i in 0..5 {
        let token = sign(&hdr, &json!({"iss": "dev", "sub": format!("t{i}"), "aud": "api", "exp": t + 600}));
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[1] = b64(&json!({"iss": "dev", "sub": "admin", "aud": "api", "exp": t + 600 + i}).to_string());
        add(format!("tampered payload {i}"), parts.join("."), Expect::Same(false));
    }
    for i in 0..3 {
        let token = sign(&hdr, &json!({"iss": "dev", "sub": format!("s{i}"), "aud": "api"}));
        let (rest, sig) = token.rsplit_once('.').unwrap();
        let mut sig: Vec<char> = sig.chars().collect();
        sig[i * 5] = if sig[i * 5] == 'A' { 'B' } else { 'A' };
        add(
            format!("tampered signature {i}"),
            format!("{rest}.{}", sig.into_iter().collect::<String>()),
            Expect::Same(false),
        );
    }
    let token = sign(&hdr, &good);
    let parts: Vec<&str> = token.split('.').collect();
    add("bad base64 header".into(), format!("{}*.{}.{}", parts[0], parts[1], parts[2]), Expect::Same(false));
    add("bad base64 payload".into(), format!("{}.{}!.{}", parts[0], parts[1], parts[2]), Expect::Same(false));
    add("bad base64 signature".into(), format!("{}.{}.{}$", parts[0], parts[1], parts[2]), Expect::Same(false));
    add("signature truncated".into(), format!("{}.{}.{}", parts[0], parts[1], &parts[2][..20]), Expect::Same(false));
    add("empty signature".into(), format!("{}.{}.", parts[0], parts[1]), Expect::Same(false));
    add("empty payload".into(), format!("{}..{}", parts[0], parts[2]), Expect::Same(false));
    add("empty header".into(), format!(".{}.{}", parts[1], parts[2]), Expect::Same(false));
    add("all empty".into(), "..".into(), Expect::Same(false));
    add("two segments".into(), format!("{}.{}", parts[0], parts[1]), Expect::Same(false));
    add("four segments".into(), format!("{token}.{}", parts[2]), Expect::Same(false));
    add("not a jwt".into(), "hello-world".into(), Expect::Same(false));
    add("random".into(), "sk-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(), Expect::Same(false));
    add("header not json".into(), dev::sign_raw(secret, "not json", &good.to_string()).unwrap(), Expect::Same(false));
    add("payload not json".into(), dev::sign_raw(secret, &hdr, "not json").unwrap(), Expect::Same(false));
    add("payload an array".into(), dev::sign_raw(secret, &hdr, "[1,2]").unwrap(), Expect::Same(false));
    for (i, iss) in [json!("other"), json!("Dev"), json!("dev "), json!(7)].iter().enumerate() {
        let p = json!({"iss": iss, "sub": "u", "aud": "api", "exp": t + 600});
        add(format!("wrong iss {i}"), sign(&hdr, &p), Expect::Same(false));
    }
    add("no iss".into(), sign(&hdr, &json!({"sub": "u", "aud": "api", "exp": t + 600})), Expect::Same(false));
    for (i, aud) in [json!("other"), json!(["a", "b"]), json!("API"), json!([])].iter().enumerate() {
        let p = json!({"iss": "dev", "sub": "u", "aud": aud, "exp": t + 600});
        add(format!("wrong aud {i}"), sign(&hdr, &p), Expect::Same(false));
    }
    add("no aud".into(), sign(&hdr, &json!({"iss": "dev", "sub": "u", "exp": t + 600})), Expect::Same(false));
    for (i, exp) in [json!("9999999999"), json!(null), json!(true), json!({"a": 1})].iter().enumerate() {
        let p = json!({"iss": "dev", "sub": "u", "aud": "api", "exp": exp});
        add(format!("exp of the wrong type {i}"), sign(&hdr, &p), Expect::Same(false));
    }
    for i in 0..3 {
        let p = json!({"iss": "dev", "aud": "api", "exp": t + 600, "n": i});
        add(format!("no sub {i}"), sign(&hdr, &p), Expect::TollgateStricter);
    }
    for i in 0..2 {
        let p = json!({"iss": "dev", "sub": "u", "aud": "api", "exp": t + 600, "pad": "x".repeat(9000 + i)});
        add(format!("over 8 KiB {i}"), sign(&hdr, &p), Expect::TollgateStricter);
    }
    for (i, groups) in [json!(["a", "b"]), json!("a b,c"), json!([])].iter().enumerate() {
        let p = json!({"iss": "dev", "sub": "u", "aud": "api", "exp": t + 600, "groups": groups});
        add(format!("groups shape {i}"), sign(&hdr, &p), Expect::Same(true));
    }
    add(
        "empty kid, right key".into(),
        sign(&json!({"alg": "HS256", "kid": ""}).to_string(), &good),
        Expect::Same(true),
    );
    let with_pad = format!("{}=", sign(&hdr, &good));
    add("padded signature".into(), with_pad, Expect::TollgateStricter);
    cases
}

fn allowed(url: &str, token: &str) -> bool {
    let resp =
        client().get(format!("{url}/v1/models")).header("authorization", format!("Bearer {token}")).send().unwrap();
    let status = resp.status().as_u16();
    assert!([200, 401, 403].contains(&status), "unexpected status {status}");
    status == 200
}

#[test]
fn tollgate_and_envoy_jwt_authn_agree() {
    let secret = dev::new_secret();
    let other = dev::new_secret();
    let jwks = dev::jwks(secret.as_bytes(), Some("dev-key"));
    let jwt_authn = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"dev": {
            "issuer": "dev", "audiences": ["api"], "local_jwks": {"inline_string": jwks},
            "forward": false, "clock_skew_seconds": 60
        }},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "dev"}}]
    });
    let stack = Stack::start(StackOptions {
        plugin_config: json!({"jwt": {"providers": [{"issuer": "dev", "audiences": ["api"], "jwks": jwks}]}}),
        jwt_authn: Some(jwt_authn),
        label: "jwt-differential".into(),
        ..StackOptions::default()
    })
    .unwrap();
    agree(&stack, &corpus(secret.as_bytes(), other.as_bytes()));
}

/// Sends every case to the filter's listener and to `jwt_authn`'s on the same Envoy and
/// requires the verdicts each case expects.
fn agree(stack: &Stack, cases: &[Case]) {
    let native = stack.jwt_authn_url.clone().unwrap();
    assert!(cases.len() >= 100, "corpus has {} tokens", cases.len());
    let mut mismatches = Vec::new();
    for case in cases {
        let ours = allowed(&stack.gateway_url, &case.token);
        let theirs = allowed(&native, &case.token);
        let ok = match case.expect {
            Expect::Same(v) => ours == v && theirs == v,
            Expect::TollgateStricter => !ours && theirs,
        };
        if !ok {
            mismatches.push(format!("{}: tollgate={ours} jwt_authn={theirs} expected {:?}", case.name, case.expect));
        }
    }
    assert!(mismatches.is_empty(), "{} of {} cases differ:\n{}", mismatches.len(), cases.len(), mismatches.join("\n"));
}

/// The public-key corpus: every algorithm the filter verifies (RS*/PS*, ES256, ES384,
/// EdDSA), valid, tampered, signed by a key not published, expired, algorithm
/// confusion (HS256 signed with a public key's bytes, a key's `alg` or type not the
/// token's), and rotation (two keys published; a kid reused by a new key; a removed key).
fn public_key_corpus(keys: &PublicKeys) -> Vec<Case> {
    let t = now();
    let good = |sub: &str| json!({"iss": "idp", "sub": sub, "aud": "api", "groups": ["g"], "exp": t + 600});
    let mut cases = Vec::new();
    let mut add = |name: String, token: String, expect: Expect| cases.push(Case { name, token, expect });
    let header = |alg: &str, kid: Option<&str>| {
        let mut h = json!({"alg": alg, "typ": "JWT"});
        if let Some(kid) = kid {
            h["kid"] = json!(kid);
        }
        h.to_string()
    };

    for (alg, signer) in &keys.by_alg {
        let kid = signer.kid.clone();
        let p = good(&format!("u-{alg}"));
        let token = signer.mint(&p).unwrap();
        add(format!("{alg} valid"), token.clone(), Expect::Same(true));
        let no_kid = signer.sign_raw(&header(alg, None), &p.to_string()).unwrap();
        add(format!("{alg} valid without kid"), no_kid, Expect::Same(true));
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let sig = parts[2].clone();
        parts[1] = b64(&good("admin").to_string());
        add(format!("{alg} tampered payload"), parts.join("."), Expect::Same(false));
        let mut chars: Vec<char> = sig.chars().collect();
        chars[7] = if chars[7] == 'A' { 'B' } else { 'A' };
        let (rest, _) = token.rsplit_once('.').unwrap();
        add(
            format!("{alg} tampered signature"),
            format!("{rest}.{}", chars.iter().collect::<String>()),
            Expect::Same(false),
        );
        add(format!("{alg} signature truncated"), format!("{rest}.{}", &sig[..sig.len() - 8]), Expect::Same(false));
        let expired = json!({"iss": "idp", "sub": "u", "aud": "api", "exp": t - 3600});
        add(format!("{alg} expired"), signer.mint(&expired).unwrap(), Expect::Same(false));
        let wrong_aud = json!({"iss": "idp", "sub": "u", "aud": "other", "exp": t + 600});
        add(format!("{alg} wrong aud"), signer.mint(&wrong_aud).unwrap(), Expect::Same(false));
        // The same algorithm and kid, signed by a key that is not published.
        let stranger = if alg.starts_with("RS") || alg.starts_with("PS") {
            dev::test_rsa_signer(2, alg, kid.as_deref()).unwrap()
        } else {
            dev::Signer::generate(alg, kid.as_deref()).unwrap()
        };
        add(format!("{alg} wrong key"), stranger.mint(&p).unwrap(), Expect::Same(false));
        // HS256 signed with what anyone can read: the public key's members and its JWK.
        let public = signer.public_jwk();
        let member = if public["kty"] == "RSA" { "n" } else { "x" };
        let raw = URL_SAFE_NO_PAD.decode(public[member].as_str().unwrap()).unwrap();
        for (what, secret) in [(member, raw), ("JWK text", public.to_string().into_bytes())] {
            for kid in [kid.as_deref(), None] {
                let token = dev::sign_raw(&secret, &header("HS256", kid), &p.to_string()).unwrap();
                add(format!("{alg} key as HS256 secret ({what}, kid {kid:?})"), token, Expect::Same(false));
            }
        }
    }

    // A key's own alg binds it: key rsa-a is published for RS256 only.
    let rsa_a_as_ps = dev::test_rsa_signer(0, "PS256", Some("rsa-a")).unwrap();
    add("PS256 by an RS256-only key".into(), rsa_a_as_ps.mint(&good("c1")).unwrap(), Expect::Same(false));
    // A key's type binds it: a P-256 signature under an ES384 or EdDSA header, by the
    // kid of a key of that kind or of its own.
    let es256 = &keys.by_alg.iter().find(|(a, _)| *a == "ES256").unwrap().1;
    for (alg, kid) in [("ES384", "ec-384"), ("ES384", "ec-256"), ("EdDSA", "ed"), ("RS256", "rsa-a")] {
        let token = es256.sign_raw(&header(alg, Some(kid)), &good("c2").to_string()).unwrap();
        add(format!("ES256 signature under alg {alg}, kid {kid}"), token, Expect::Same(false));
    }
    let ed = &keys.by_alg.iter().find(|(a, _)| *a == "EdDSA").unwrap().1;
    let token = ed.sign_raw(&header("EdDSA", Some("ec-256")), &good("c3").to_string()).unwrap();
    add("EdDSA by the kid of the P-256 key".into(), token, Expect::Same(false));
    for alg in ["none", "ES512", "HS512", "Ed25519"] {
        let token = es256.sign_raw(&header(alg, Some("ec-256")), &good("c4").to_string()).unwrap();
        add(format!("alg {alg}"), token, Expect::Same(false));
    }

    // Rotation: both published keys verify; a kid reused by a new key and a removed
    // kid do not.
    add("rotation: the new key".into(), keys.rotated_new.mint(&good("r1")).unwrap(), Expect::Same(true));
    add(
        "rotation: the old key, still published".into(),
        keys.rotated_old.mint(&good("r2")).unwrap(),
        Expect::Same(true),
    );
    let reused = dev::Signer::generate("ES256", keys.rotated_old.kid.as_deref()).unwrap();
    add("rotation: a kid reused by another key".into(), reused.mint(&good("r3")).unwrap(), Expect::Same(false));
    let removed = dev::test_rsa_signer(2, "RS256", Some("rsa-removed")).unwrap();
    add("rotation: a removed kid".into(), removed.mint(&good("r4")).unwrap(), Expect::Same(false));
    cases
}

/// The signers of the public-key corpus and the JWKS both verifiers get.
struct PublicKeys {
    by_alg: Vec<(&'static str, dev::Signer)>,
    rotated_old: dev::Signer,
    rotated_new: dev::Signer,
    jwks: String,
}

fn public_keys() -> PublicKeys {
    let mut by_alg = Vec::new();
    let mut published = Vec::new();
    for alg in dev::SIGNING_ALGS {
        let signer = match *alg {
            "RS256" => dev::test_rsa_signer(0, alg, Some("rsa-a")).unwrap(),
            // One RSA key without `alg` serves the other RS*/PS* algorithms.
            a if a.starts_with("RS") || a.starts_with("PS") => dev::test_rsa_signer(1, alg, Some("rsa-any")).unwrap(),
            "ES256" => dev::Signer::generate(alg, Some("ec-256")).unwrap(),
            "ES384" => dev::Signer::generate(alg, Some("ec-384")).unwrap(),
            _ => dev::Signer::generate(alg, Some("ed")).unwrap(),
        };
        let mut jwk = signer.public_jwk();
        if signer.kid.as_deref() == Some("rsa-any") {
            jwk.as_object_mut().unwrap().remove("alg");
        }
        if !published.contains(&jwk) {
            published.push(jwk);
        }
        by_alg.push((*alg, signer));
    }
    let rotated_old = dev::Signer::generate("ES256", Some("rot-old")).unwrap();
    let rotated_new = dev::Signer::generate("ES256", Some("rot-new")).unwrap();
    published.push(rotated_old.public_jwk());
    published.push(rotated_new.public_jwk());
    // Entries Tollgate skips (an encryption key, a P-521 key) sit in the same set.
    let mut enc = dev::test_rsa_signer(2, "RS256", Some("enc")).unwrap().public_jwk();
    enc["use"] = json!("enc");
    enc.as_object_mut().unwrap().remove("alg");
    published.push(enc);
    published.push(json!({"kty": "EC", "crv": "P-521", "kid": "p521",
        "x": "AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk",
        "y": "ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDly79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2"}));
    let jwks = json!({ "keys": published }).to_string();
    PublicKeys { by_alg, rotated_old, rotated_new, jwks }
}

#[test]
fn public_key_algorithms_agree_with_jwt_authn() {
    let keys = public_keys();
    let jwt_authn = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"idp": {
            "issuer": "idp", "audiences": ["api"], "local_jwks": {"inline_string": keys.jwks},
            "forward": false, "clock_skew_seconds": 60
        }},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}]
    });
    let stack = Stack::start(StackOptions {
        plugin_config: json!({"jwt": {"providers": [{"issuer": "idp", "audiences": ["api"], "jwks": keys.jwks}]}}),
        jwt_authn: Some(jwt_authn),
        label: "jwt-differential-public".into(),
        ..StackOptions::default()
    })
    .unwrap();
    agree(&stack, &public_key_corpus(&keys));
}
