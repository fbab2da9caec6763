//! Variant (f) of the benchmarks: the out-of-process architecture (Envoy `ext_authz`
//! over HTTP, as with Authorino or an ext-proc service) doing *the same* API-key check
//! as Tollgate: SHA-256 of the presented key, looked up among the stored digests and
//! confirmed in constant time. 200 with the identity headers, else 401.
//!
//! `authz-service --listen 127.0.0.1:PORT --keys FILE` where FILE is the JSON list of
//! `{"sha256","user","groups"}` entries (Tollgate's `api_keys.keys`).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use clap::Parser;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Parser)]
#[command(about = "ext_authz HTTP service for the benchmarks: the same SHA-256 key check as Tollgate")]
struct Args {
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1:9191")]
    listen: String,
    /// JSON file with the `api_keys.keys` list.
    #[arg(long)]
    keys: std::path::PathBuf,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Identity {
    user: HeaderValue,
    groups: HeaderValue,
}

type Keys = Arc<HashMap<[u8; 32], Identity>>;

fn load_keys(path: &std::path::Path) -> anyhow::Result<HashMap<[u8; 32], Identity>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text).context("keys: a JSON list")?;
    let mut keys = HashMap::new();
    for e in entries {
        let digest_hex = e.get("sha256").and_then(|v| v.as_str()).context("keys[].sha256")?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(digest_hex, &mut digest).context("keys[].sha256: 64 hex characters")?;
        let user = e.get("user").and_then(|v| v.as_str()).context("keys[].user")?;
        let groups: Vec<&str> = e
            .get("groups")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|g| g.as_str()).collect())
            .unwrap_or_default();
        keys.insert(
            digest,
            Identity { user: HeaderValue::from_str(user)?, groups: HeaderValue::from_str(&groups.join(","))? },
        );
    }
    Ok(keys)
}

fn presented_key(req: &Request) -> Option<&[u8]> {
    let h = req.headers();
    if let Some(v) = h.get("authorization") {
        return v.as_bytes().strip_prefix(b"Bearer ");
    }
    h.get("x-api-key").map(HeaderValue::as_bytes)
}

async fn check(State(keys): State<Keys>, req: Request) -> Response {
    let found = presented_key(&req).filter(|k| !k.is_empty()).and_then(|key| {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let (stored, identity) = keys.get_key_value(&digest)?;
        bool::from(stored.ct_eq(&digest)).then_some(identity)
    });
    match found {
        Some(id) => {
            let mut resp = StatusCode::OK.into_response();
            resp.headers_mut().insert("x-tollgate-user", id.user.clone());
            resp.headers_mut().insert("x-tollgate-groups", id.groups.clone());
            resp
        }
        None => (StatusCode::UNAUTHORIZED, [("www-authenticate", "Bearer realm=\"tollgate\"")]).into_response(),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let keys: Keys = Arc::new(load_keys(&args.keys)?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads.max(1)).enable_all().build()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("bind {}", args.listen))?;
        // No Nagle: each check is one small request/response on a kept-alive connection.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = axum::Router::new().fallback(check).with_state(keys);
        axum::serve(listener, app).await?;
        Ok(())
    })
}
