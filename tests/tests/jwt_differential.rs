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
    let native = stack.jwt_authn_url.clone().unwrap();
    let cases = corpus(secret.as_bytes(), other.as_bytes());
    assert!(cases.len() >= 100, "corpus has {} tokens", cases.len());
    let mut mismatches = Vec::new();
    for case in &cases {
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
