#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! Remote JWKS with key rotation, end to end: a small JWKS server (an identity
//! provider's `jwks_uri`) reached through an Envoy cluster (`StackOptions::upstreams`,
//! `tollgate up --upstream`), and a Keycloak-shaped provider (RS256, `kid`, `aud`,
//! groups) with `remote_jwks`. Rotating the key makes new tokens work at once (the
//! unknown-kid refetch), old tokens keep working while their key is published, a spray
//! of forged kids makes at most the rate-limited number of fetches, and a JWKS server
//! that goes down leaves the last good set in use. (A key withdrawn from the set keeps
//! working until the next refresh, `refresh_seconds`, as with Envoy's `jwt_authn`.)

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_e2e::*;

/// Serves `GET /certs` from `jwks` (None: answers 503), counting the requests.
struct JwksServer {
    port: u16,
    jwks: Arc<Mutex<Option<String>>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    fn start(initial: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let jwks = Arc::new(Mutex::new(Some(initial)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (j, f) = (jwks.clone(), fetches.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (j, f) = (j.clone(), f.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut conn = conn;
                    loop {
                        // One request: its head up to the blank line (GETs have no body).
                        let mut line = String::new();
                        let mut first = true;
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" && !first {
                                break;
                            }
                            first = false;
                        }
                        f.fetch_add(1, Ordering::SeqCst);
                        let body = j.lock().unwrap().clone();
                        let reply = match body {
                            Some(b) => format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                                b.len()
                            ),
                            None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".to_string(),
                        };
                        if conn.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        JwksServer { port, jwks, fetches }
    }

    fn publish(&self, jwks: Option<String>) {
        *self.jwks.lock().unwrap() = jwks;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

const ISSUER: &str = "https://keycloak.example/realms/llm";
const MIN_INTERVAL_MS: u64 = 2000;

fn token(signer: &dev::Signer, sub: &str) -> String {
    token_for(signer, sub, "chat-ui")
}

/// A token issued to the Keycloak client `azp`.
fn token_for(signer: &dev::Signer, sub: &str, azp: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // Keycloak's access-token shape: aud, azp, groups, scope.
    signer
        .mint(&json!({"iss": ISSUER, "sub": sub, "aud": "llm-gateway", "azp": azp, "groups": ["premium"],
                      "scope": "openid profile", "iat": now, "exp": now + 600}))
        .unwrap()
}

fn status(stack: &Stack, token: &str) -> u16 {
    client()
        .get(format!("{}/v1/models", stack.gateway_url))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn rotation_refetch_rate_limit_and_outage() {
    let key_a = dev::test_rsa_signer(0, "RS256", Some("kc-a")).unwrap();
    let key_b = dev::test_rsa_signer(1, "RS256", Some("kc-b")).unwrap();
    let server = JwksServer::start(dev::Signer::jwks(&[&key_a]));
    let config = json!({"jwt": {"providers": [{
        "issuer": ISSUER,
        "audiences": ["llm-gateway"],
        "authorized_parties": ["chat-ui"],
        "groups_claim": "groups",
        "remote_jwks": {"cluster": "keycloak", "authority": "keycloak.example", "path": "/certs",
                        "refresh_seconds": 300, "timeout_ms": 1000, "max_age_seconds": 3600,
                        "kid_refetch_min_interval_ms": MIN_INTERVAL_MS, "wait_ms": 3000}
    }]}});
    let stack = Stack::start(StackOptions {
        plugin_config: config,
        upstreams: vec![("keycloak".into(), format!("127.0.0.1:{}", server.port))],
        label: "jwt-rotation".into(),
        ..StackOptions::default()
    })
    .unwrap();

    // The first requests (one per worker, at most) may wait for the first fetch.
    for i in 0..4 {
        assert_eq!(status(&stack, &token(&key_a, &format!("a{i}"))), 200, "key A, request {i}");
    }
    assert_eq!(status(&stack, &token_for(&key_a, "eve", "other-client")), 401, "issued to another client (azp)");
    let first = server.fetches();
    assert!((1..=2).contains(&first), "{first} fetches at start (one, or one per worker racing on the empty slot)");

    // Rotation: B is published beside A. A token of B works at once (its unknown kid
    // makes one refetch), and A's tokens still work.
    server.publish(Some(dev::Signer::jwks(&[&key_a, &key_b])));
    std::thread::sleep(Duration::from_millis(MIN_INTERVAL_MS + 100));
    let before = server.fetches();
    assert_eq!(status(&stack, &token(&key_b, "b0")), 200, "the new key at once");
    assert_eq!(server.fetches(), before + 1, "one refetch for the new kid");
    for i in 0..6 {
        assert_eq!(status(&stack, &token(&key_b, &format!("b{}", i + 1))), 200, "key B, request {i}");
        assert_eq!(status(&stack, &token(&key_a, &format!("a{}", i + 10))), 200, "key A still published, {i}");
    }
    assert_eq!(server.fetches(), before + 1, "no more fetches: the set is shared by the workers");

    // A spray of forged kids (signed by B, kids nobody published): refused, and at most
    // one fetch per interval for the whole gateway.
    std::thread::sleep(Duration::from_millis(MIN_INTERVAL_MS + 100));
    let before = server.fetches();
    let started = Instant::now();
    for i in 0..40 {
        let forged = dev::test_rsa_signer(1, "RS256", Some(&format!("forged-{i}"))).unwrap();
        assert_eq!(status(&stack, &token(&forged, "mallory")), 401, "forged kid {i}");
    }
    let elapsed = started.elapsed().as_millis() as u64;
    let allowed = (elapsed / MIN_INTERVAL_MS + 1) as usize;
    let made = server.fetches() - before;
    assert!(made >= 1 && made <= allowed, "{made} fetches for 40 forged kids in {elapsed} ms (at most {allowed})");

    // The JWKS server goes down: the last good set stays in use; an unknown kid is
    // still refused (401, not 503), and its refetch failing changes nothing.
    server.publish(None);
    std::thread::sleep(Duration::from_millis(MIN_INTERVAL_MS + 100));
    let forged = dev::test_rsa_signer(1, "RS256", Some("forged-down")).unwrap();
    assert_eq!(status(&stack, &token(&forged, "mallory")), 401, "unknown kid while the IdP is down");
    for i in 0..4 {
        assert_eq!(status(&stack, &token(&key_b, &format!("b-down{i}"))), 200, "last good set, {i}");
    }
}
