//! JWT verification.
//!
//! 1. The input, as a token string, goes to `JwtVerifier::verify` (fixed providers,
//!    fixed clock) and `looks_like_jwt`: never a panic, and a token that verifies has
//!    the JWT shape and a clean identity.
//! 2. The same input, read as a token description (header fields, signing key, claims),
//!    is minted and signed, and `verify` must give exactly what a small model of the
//!    rules says: a correctly signed, valid token DOES verify, to the right identity,
//!    and every other one is refused with the right error.
#![no_main]

mod common;

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use tollgate_filter::identity::Identity;
use tollgate_filter::jwt::{looks_like_jwt, Jwks, JwtError, JwtProvider, JwtVerifier, MAX_TOKEN_BYTES};

use common::{b64, hs256, jwks, DEV_SECRET, DEV_TOKEN, NOW};

const K2: &[u8] = b"fuzz-second-key-0123456789abcdef";
const K3: &[u8] = b"fuzz-kidless-key-for-aud-issuer!";
const DEV_SKEW: u64 = 60;
const AUD_SKEW: u64 = 0;
const AUDIENCES: [&str; 2] = ["llm", "chat"];

/// "dev": Istio's dev key plus a second kid, `sub`/`groups`, skew 60, exp optional.
/// "aud-issuer": one kid-less key, audiences, `email`/`scope`, skew 0, exp required.
fn verifier() -> &'static JwtVerifier {
    static V: OnceLock<JwtVerifier> = OnceLock::new();
    V.get_or_init(|| {
        let dev = JwtProvider {
            issuer: "dev".into(),
            audiences: vec![],
            keys: Jwks::parse(&jwks(&[(Some("dev-key"), DEV_SECRET), (Some("k2"), K2)])).unwrap(),
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            clock_skew_seconds: DEV_SKEW,
            require_exp: false,
        };
        let aud = JwtProvider {
            issuer: "aud-issuer".into(),
            audiences: AUDIENCES.iter().map(|s| s.to_string()).collect(),
            keys: Jwks::parse(&jwks(&[(None, K3)])).unwrap(),
            user_claim: "email".into(),
            groups_claim: "scope".into(),
            clock_skew_seconds: AUD_SKEW,
            require_exp: true,
        };
        let v = JwtVerifier::new(vec![dev, aud]);
        // The fixture itself: Istio's dev token verifies.
        assert_eq!(v.verify(DEV_TOKEN, NOW).unwrap().identity, Identity { user: "dev-user".into(), groups: vec![] });
        v
    })
}

fn check_identity(id: &Identity) {
    assert!(!id.user.is_empty());
    assert!(!id.user.contains(',') && !id.user.chars().any(char::is_control), "{:?}", id.user);
    for g in &id.groups {
        assert!(!g.is_empty() && !g.contains(',') && !g.chars().any(|c| c.is_whitespace() || c.is_control()), "{g:?}");
    }
}

// ---- the token description -------------------------------------------------------

#[derive(Arbitrary, Debug)]
enum Alg {
    Hs256,
    Named(String),
    Number(i32),
    Missing,
}

#[derive(Arbitrary, Debug)]
enum Kid {
    Missing,
    DevKey,
    K2,
    Named(String),
    Number(i32),
}

#[derive(Arbitrary, Debug)]
enum Signer {
    Dev,
    K2,
    K3,
    Other(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Iss {
    Dev,
    Aud,
    Named(String),
    Number(i32),
    Missing,
}

/// `exp` / `nbf`, relative to `NOW`.
#[derive(Arbitrary, Debug)]
enum Time {
    Missing,
    At(i32),
    /// Half a second after `NOW + offset`.
    Half(i32),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Aud {
    Missing,
    Llm,
    Text(String),
    List(Vec<String>),
    /// The list with a number inserted at this index (mod len+1).
    ListWithNumber(Vec<String>, u8),
    Number(i32),
}

#[derive(Arbitrary, Debug)]
enum Claim {
    Missing,
    Text(String),
    Number(i32),
}

#[derive(Arbitrary, Debug)]
enum Groups {
    Missing,
    Null,
    Text(String),
    List(Vec<String>),
    ListWithNumber(Vec<String>, u8),
    Number(i32),
}

#[derive(Arbitrary, Debug)]
struct Spec {
    alg: Alg,
    kid: Kid,
    typ: bool,
    crit: bool,
    signer: Signer,
    tamper: bool,
    iss: Iss,
    exp: Time,
    nbf: Time,
    aud: Aud,
    sub: Claim,
    email: Claim,
    groups: Groups,
    scope: Groups,
}

fn time_value(t: &Time) -> Option<Value> {
    match t {
        Time::Missing => None,
        Time::At(off) => Some(json!(NOW as i64 + i64::from(*off))),
        Time::Half(off) => Some(json!((NOW as i64 + i64::from(*off)) as f64 + 0.5)),
        Time::Text(s) => Some(json!(s)),
    }
}

fn with_number(list: &[String], at: u8) -> Value {
    let mut v: Vec<Value> = list.iter().map(|s| json!(s)).collect();
    v.insert(usize::from(at) % (v.len() + 1), json!(7));
    Value::Array(v)
}

fn text_value(t: &Claim) -> Option<Value> {
    match t {
        Claim::Missing => None,
        Claim::Text(s) => Some(json!(s)),
        Claim::Number(n) => Some(json!(n)),
    }
}

fn groups_value(g: &Groups) -> Option<Value> {
    match g {
        Groups::Missing => None,
        Groups::Null => Some(Value::Null),
        Groups::Text(s) => Some(json!(s)),
        Groups::List(l) => Some(json!(l)),
        Groups::ListWithNumber(l, at) => Some(with_number(l, *at)),
        Groups::Number(n) => Some(json!(n)),
    }
}

fn mint(spec: &Spec) -> String {
    let mut header = Map::new();
    match &spec.alg {
        Alg::Hs256 => drop(header.insert("alg".into(), json!("HS256"))),
        Alg::Named(s) => drop(header.insert("alg".into(), json!(s))),
        Alg::Number(n) => drop(header.insert("alg".into(), json!(n))),
        Alg::Missing => {}
    }
    if spec.typ {
        header.insert("typ".into(), json!("JWT"));
    }
    match &spec.kid {
        Kid::Missing => {}
        Kid::DevKey => drop(header.insert("kid".into(), json!("dev-key"))),
        Kid::K2 => drop(header.insert("kid".into(), json!("k2"))),
        Kid::Named(s) => drop(header.insert("kid".into(), json!(s))),
        Kid::Number(n) => drop(header.insert("kid".into(), json!(n))),
    }
    if spec.crit {
        header.insert("crit".into(), json!(["exp"]));
    }

    let mut claims = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            claims.insert(k.into(), v);
        }
    };
    put(
        "iss",
        match &spec.iss {
            Iss::Dev => Some(json!("dev")),
            Iss::Aud => Some(json!("aud-issuer")),
            Iss::Named(s) => Some(json!(s)),
            Iss::Number(n) => Some(json!(n)),
            Iss::Missing => None,
        },
    );
    put("exp", time_value(&spec.exp));
    put("nbf", time_value(&spec.nbf));
    put(
        "aud",
        match &spec.aud {
            Aud::Missing => None,
            Aud::Llm => Some(json!("llm")),
            Aud::Text(s) => Some(json!(s)),
            Aud::List(l) => Some(json!(l)),
            Aud::ListWithNumber(l, at) => Some(with_number(l, *at)),
            Aud::Number(n) => Some(json!(n)),
        },
    );
    put("sub", text_value(&spec.sub));
    put("email", text_value(&spec.email));
    put("groups", groups_value(&spec.groups));
    put("scope", groups_value(&spec.scope));

    let signed = format!(
        "{}.{}",
        b64(Value::Object(header).to_string().as_bytes()),
        b64(Value::Object(claims).to_string().as_bytes())
    );
    let secret: &[u8] = match &spec.signer {
        Signer::Dev => DEV_SECRET,
        Signer::K2 => K2,
        Signer::K3 => K3,
        Signer::Other(s) => s,
    };
    let mut sig = b64(&hs256(secret, signed.as_bytes()));
    if spec.tamper {
        // The first character carries the top 6 bits of the first MAC byte, so any
        // other base64url character there is a valid encoding of a different MAC.
        let first = if sig.starts_with('A') { "B" } else { "A" };
        sig.replace_range(..1, first);
    }
    format!("{signed}.{sig}")
}

// ---- the model --------------------------------------------------------------------

struct Expected {
    identity: Identity,
    issuer: &'static str,
    expires_at: Option<u64>,
}

/// Seconds doubled, so the half-second times stay exact integers.
fn twice(t: &Time) -> Option<i128> {
    match t {
        Time::At(off) => Some(2 * (NOW as i128 + i128::from(*off))),
        Time::Half(off) => Some(2 * (NOW as i128 + i128::from(*off)) + 1),
        Time::Missing | Time::Text(_) => None,
    }
}

fn groups_model(g: &Groups) -> Result<Vec<String>, JwtError> {
    const BAD: JwtError = JwtError::BadClaim("groups");
    let names: Vec<&str> = match g {
        Groups::Missing | Groups::Null => vec![],
        Groups::Text(s) => s.split([' ', ',']).collect(),
        Groups::List(l) => l.iter().map(String::as_str).collect(),
        Groups::ListWithNumber(..) | Groups::Number(_) => return Err(BAD),
    };
    let names: Vec<&str> = names.into_iter().filter(|n| !n.is_empty()).collect();
    if names.iter().any(|n| n.contains(',') || n.chars().any(|c| c.is_whitespace() || c.is_control())) {
        return Err(BAD);
    }
    Ok(names.into_iter().map(str::to_string).collect())
}

fn model(spec: &Spec, token: &str) -> Result<Expected, JwtError> {
    use JwtError::*;
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TooLarge);
    }
    match &spec.alg {
        Alg::Hs256 => {}
        Alg::Named(s) if s == "HS256" => {}
        _ => return Err(UnsupportedAlg),
    }
    if spec.crit {
        return Err(Malformed);
    }
    let kid: Option<&str> = match &spec.kid {
        Kid::Missing => None,
        Kid::DevKey => Some("dev-key"),
        Kid::K2 => Some("k2"),
        Kid::Named(s) if s.is_empty() => None,
        Kid::Named(s) => Some(s),
        Kid::Number(_) => return Err(Malformed),
    };
    let iss = match &spec.iss {
        Iss::Dev => "dev",
        Iss::Aud => "aud-issuer",
        Iss::Named(s) => s.as_str(),
        Iss::Number(_) | Iss::Missing => return Err(UnknownIssuer),
    };
    let aud_provider = match iss {
        "dev" => false,
        "aud-issuer" => true,
        _ => return Err(UnknownIssuer),
    };
    let keys: &[(Option<&str>, &[u8])] =
        if aud_provider { &[(None, K3)] } else { &[(Some("dev-key"), DEV_SECRET), (Some("k2"), K2)] };
    let candidates: Vec<&[u8]> = keys
        .iter()
        .filter(|(have, _)| match (kid, have) {
            (Some(want), Some(have)) => want == *have,
            _ => true,
        })
        .map(|(_, s)| *s)
        .collect();
    if candidates.is_empty() {
        return Err(UnknownKid);
    }
    let secret: &[u8] = match &spec.signer {
        Signer::Dev => DEV_SECRET,
        Signer::K2 => K2,
        Signer::K3 => K3,
        Signer::Other(s) => s,
    };
    if spec.tamper || !candidates.contains(&secret) {
        return Err(BadSignature);
    }

    if let Time::Text(_) = spec.exp {
        return Err(BadClaim("exp"));
    }
    if let Time::Text(_) = spec.nbf {
        return Err(BadClaim("nbf"));
    }
    let skew2 = 2 * i128::from(if aud_provider { AUD_SKEW } else { DEV_SKEW });
    let now2 = 2 * NOW as i128;
    let expires_at = match twice(&spec.exp) {
        None if aud_provider => return Err(MissingExp),
        None => None,
        Some(exp2) => {
            let deadline2 = exp2 + skew2;
            if now2 >= deadline2 {
                return Err(Expired);
            }
            Some(u64::try_from((deadline2 + 1) / 2).unwrap()) // ceil
        }
    };
    if let Some(nbf2) = twice(&spec.nbf) {
        if nbf2 > now2 + skew2 {
            return Err(NotYetValid);
        }
    }
    if aud_provider {
        let ok = |a: &str| AUDIENCES.contains(&a);
        let good = match &spec.aud {
            Aud::Missing => false,
            Aud::Llm => true,
            Aud::Text(s) => ok(s),
            Aud::List(l) => l.iter().any(|a| ok(a)),
            Aud::ListWithNumber(..) | Aud::Number(_) => return Err(BadClaim("aud")),
        };
        if !good {
            return Err(WrongAudience);
        }
    }
    let user = match if aud_provider { &spec.email } else { &spec.sub } {
        Claim::Text(u) if !u.is_empty() => u.clone(),
        _ => return Err(MissingUser),
    };
    if user.contains(',') || user.chars().any(char::is_control) {
        return Err(BadClaim("user"));
    }
    let groups = groups_model(if aud_provider { &spec.scope } else { &spec.groups })?;
    Ok(Expected {
        identity: Identity { user, groups },
        issuer: if aud_provider { "aud-issuer" } else { "dev" },
        expires_at,
    })
}

fuzz_target!(|data: &[u8]| {
    let v = verifier();

    // 1. The bytes as a token.
    let token = String::from_utf8_lossy(data);
    let shape = looks_like_jwt(&token);
    if let Ok(t) = v.verify(&token, NOW) {
        assert!(shape, "a token that verifies must have the JWT shape: {token:?}");
        check_identity(&t.identity);
    }

    // 2. The bytes as a token description, minted, signed and checked against the model.
    let Ok(spec) = Spec::arbitrary(&mut Unstructured::new(data)) else { return };
    let token = mint(&spec);
    let got = v.verify(&token, NOW);
    assert_eq!(looks_like_jwt(&token), !matches!(spec.alg, Alg::Missing), "{spec:?}");
    match (model(&spec, &token), got) {
        (Ok(want), Ok(got)) => {
            assert_eq!(got.identity, want.identity, "{spec:?}");
            assert_eq!(got.issuer, want.issuer, "{spec:?}");
            assert_eq!(got.expires_at, want.expires_at, "{spec:?}");
            check_identity(&got.identity);
        }
        (Err(want), got) => assert_eq!(got.map(|t| t.identity), Err(want), "{spec:?}\n{token}"),
        (Ok(want), Err(e)) => {
            panic!("a correctly signed valid token was refused ({e:?}), want {:?}\n{spec:?}\n{token}", want.identity)
        }
    }
});
