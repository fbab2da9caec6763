//! The variants under test, their credentials and filter configs, and the Envoy
//! bootstrap that puts every variant on its own listener of one Envoy.
//!
//! Every listener has the same two routes, so one process serves both upstreams:
//! `/v1/…` goes to the mock OpenAI-compatible model server (a real upstream hop),
//! anything else is answered by Envoy itself with a `direct_response` (the fastest
//! possible "upstream": what is left is the cost of the listener and its filters).

use std::path::Path;

use serde_json::{json, Value};

/// One benchmarked configuration of the gateway.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// (a) No auth filter: the limit.
    NoFilter,
    /// (b) Envoy's C++ `jwt_authn`, the same JWKS as Tollgate (HS256 `oct`, or the
    /// public key of `--jwt-alg`), no token cache: it verifies every request's signature.
    JwtAuthn,
    /// (b') Envoy's `jwt_authn` with `jwt_cache_config`.
    JwtAuthnCached,
    /// (c) Tollgate, the request carries a JWT (verified once per worker, then from the
    /// filter's per-worker cache of verified tokens, `jwt.cache_entries` 1024).
    TollgateJwt,
    /// (c') As (c) with `jwt.cache_entries: 0` (no credential cache): the filter verifies
    /// every request's signature, like (b) without `jwt_cache_config` (issue 17).
    TollgateJwtUncached,
    /// (d) Tollgate, the request carries an API key.
    TollgateKey,
    /// (e) Tollgate with limits and metering (usage to the local tracker), API key.
    TollgateMetered,
    /// (f) Envoy `ext_authz` (HTTP) to an auth service on loopback: the same key check.
    ExtAuthz,
    /// (g) A Lua filter doing the same key check (SHA-256 in LuaJIT).
    Lua,
    /// (h) An empty Rust Proxy-Wasm filter (every callback returns Continue): the fixed
    /// cost of any Wasm filter in V8, apart from Tollgate's own work.
    WasmNoop,
    /// (h') The empty filter plus exactly the host calls an auth filter must make per
    /// request (read the headers, remove the credential, set user and groups): the
    /// floor of the Wasm ABI for Tollgate's job, with none of Tollgate's own work.
    WasmHostCalls,
    /// (h'') As (h') with the three header edits made by one call that replaces the
    /// whole header map: is one bigger host call cheaper than three small ones?
    WasmHostCallsBulk,
    /// (c2) As (c) with another build of the filter (`--alt-wasm`): A/B of two builds.
    TollgateJwtAlt,
    /// (d2) As (d) with the `--alt-wasm` build.
    TollgateKeyAlt,
    /// (e2) As (e) with the `--alt-wasm` build.
    TollgateMeteredAlt,
    /// (i) Tollgate, API key, with a `requests_per_minute` limit far beyond the load
    /// (never reached) counted per Envoy (`"scope": "local"`, the shared-data bucket),
    /// and `usage` to the local tracker: the baseline of (j).
    TollgateLimitsLocal,
    /// (j) As (i) with `"scope": "global"`: each worker admits from a lease the tracker
    /// grants over `POST /v1/limits/sync` (issue 15).
    TollgateLimitsGlobal,
    /// (k) As (d), but the key the load sends is a managed key (issue 16): not in the
    /// static list, created through the tracker's keys API before the passes and
    /// resolved by the filter with `api_keys.remote` (one callout, then the worker's
    /// memo until `ttl_seconds`).
    TollgateKeyManaged,
    /// (f') The peer of (e), the architecture Tollgate replaces in full: (f)'s
    /// `ext_authz` plus Envoy's `ext_proc` (gRPC; request and response headers sent,
    /// response body `STREAMED`) to `meter-extproc`, which counts usage with the
    /// filter's own parser and reports the filter's events to the tracker in batches.
    ExtAuthzExtProc,
    /// (m) The floor of metering: (h') plus exactly the host calls metering must make —
    /// read the response headers, each response body chunk into the VM, the clock for
    /// the event at `on_log`, and one batched `dispatch_http_call` of the events to the
    /// tracker per flush (`on_tick`, 500 ms) — and nothing else.
    WasmMeterFloor,
    /// (m') The floor of (e) as a whole: (m) plus what limits must do — a shared-data
    /// read and compare-and-swap write to admit at the request headers and again to
    /// settle at `on_log` — and the request body of a POST read into the VM (the
    /// reservation reads `max_tokens`; forced `include_usage` may rewrite it).
    WasmFloorFull,
    /// (eu) (e) without `limits`: API key and `usage` only (what limits add to (e)).
    TollgateUsageOnly,
    /// (en) (e) with `metering.inject_include_usage: false` (what forcing usage adds).
    TollgateMeteredNoInject,
}

impl Kind {
    pub const ALL: [Kind; 23] = [
        Kind::NoFilter,
        Kind::JwtAuthn,
        Kind::JwtAuthnCached,
        Kind::TollgateJwt,
        Kind::TollgateJwtUncached,
        Kind::TollgateKey,
        Kind::TollgateMetered,
        Kind::ExtAuthz,
        Kind::Lua,
        Kind::WasmNoop,
        Kind::WasmHostCalls,
        Kind::WasmHostCallsBulk,
        Kind::TollgateJwtAlt,
        Kind::TollgateKeyAlt,
        Kind::TollgateMeteredAlt,
        Kind::TollgateLimitsLocal,
        Kind::TollgateLimitsGlobal,
        Kind::TollgateKeyManaged,
        Kind::ExtAuthzExtProc,
        Kind::WasmMeterFloor,
        Kind::WasmFloorFull,
        Kind::TollgateUsageOnly,
        Kind::TollgateMeteredNoInject,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Kind::NoFilter => "a",
            Kind::JwtAuthn => "b",
            Kind::JwtAuthnCached => "b'",
            Kind::TollgateJwt => "c",
            Kind::TollgateJwtUncached => "c'",
            Kind::TollgateKey => "d",
            Kind::TollgateMetered => "e",
            Kind::ExtAuthz => "f",
            Kind::Lua => "g",
            Kind::WasmNoop => "h",
            Kind::WasmHostCalls => "h'",
            Kind::WasmHostCallsBulk => "h''",
            Kind::TollgateJwtAlt => "c2",
            Kind::TollgateKeyAlt => "d2",
            Kind::TollgateMeteredAlt => "e2",
            Kind::TollgateLimitsLocal => "i",
            Kind::TollgateLimitsGlobal => "j",
            Kind::TollgateKeyManaged => "k",
            Kind::ExtAuthzExtProc => "f'",
            Kind::WasmMeterFloor => "m",
            Kind::WasmFloorFull => "m'",
            Kind::TollgateUsageOnly => "eu",
            Kind::TollgateMeteredNoInject => "en",
        }
    }

    /// Short name used on the command line (`--variants`).
    pub fn slug(self) -> &'static str {
        match self {
            Kind::NoFilter => "none",
            Kind::JwtAuthn => "jwt_authn",
            Kind::JwtAuthnCached => "jwt_authn_cache",
            Kind::TollgateJwt => "tollgate_jwt",
            Kind::TollgateJwtUncached => "tollgate_jwt_uncached",
            Kind::TollgateKey => "tollgate_key",
            Kind::TollgateMetered => "tollgate_metered",
            Kind::ExtAuthz => "ext_authz",
            Kind::Lua => "lua",
            Kind::WasmNoop => "wasm_noop",
            Kind::WasmHostCalls => "wasm_host_calls",
            Kind::WasmHostCallsBulk => "wasm_host_calls_bulk",
            Kind::TollgateJwtAlt => "tollgate_jwt_alt",
            Kind::TollgateKeyAlt => "tollgate_key_alt",
            Kind::TollgateMeteredAlt => "tollgate_metered_alt",
            Kind::TollgateLimitsLocal => "tollgate_limits_local",
            Kind::TollgateLimitsGlobal => "tollgate_limits_global",
            Kind::TollgateKeyManaged => "tollgate_key_managed",
            Kind::ExtAuthzExtProc => "ext_authz_ext_proc",
            Kind::WasmMeterFloor => "wasm_meter_floor",
            Kind::WasmFloorFull => "wasm_floor_full",
            Kind::TollgateUsageOnly => "tollgate_usage_only",
            Kind::TollgateMeteredNoInject => "tollgate_metered_no_inject",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::NoFilter => "no filter",
            Kind::JwtAuthn => "Envoy jwt_authn (JWT)",
            Kind::JwtAuthnCached => "Envoy jwt_authn + jwt_cache_config (JWT)",
            Kind::TollgateJwt => "Tollgate (JWT)",
            Kind::TollgateJwtUncached => "Tollgate (JWT), no credential cache",
            Kind::TollgateKey => "Tollgate (API key)",
            Kind::TollgateMetered => "Tollgate + limits + metering (API key)",
            Kind::ExtAuthz => "ext_authz HTTP → Rust service (API key)",
            Kind::Lua => "Lua filter (API key)",
            Kind::WasmNoop => "empty Rust Wasm filter (no auth)",
            Kind::WasmHostCalls => "empty Wasm filter + an auth filter's 4 host calls",
            Kind::WasmHostCallsBulk => "as (h'), edits in one whole-map call (2 host calls)",
            Kind::TollgateJwtAlt => "Tollgate (JWT), --alt-wasm build",
            Kind::TollgateKeyAlt => "Tollgate (API key), --alt-wasm build",
            Kind::TollgateMeteredAlt => "Tollgate + limits + metering (API key), --alt-wasm build",
            Kind::TollgateLimitsLocal => "Tollgate + limit never reached, scope local (API key)",
            Kind::TollgateLimitsGlobal => "Tollgate + limit never reached, scope global (API key)",
            Kind::TollgateKeyManaged => "Tollgate (managed API key, resolved once, then cached)",
            Kind::ExtAuthzExtProc => "ext_authz + ext_proc metering → Rust services (API key)",
            Kind::WasmMeterFloor => "empty Wasm filter + auth and metering host calls (floor)",
            Kind::WasmFloorFull => "as (m) + limits' shared-data calls and request body (floor of e)",
            Kind::TollgateUsageOnly => "Tollgate + metering, no limits (API key)",
            Kind::TollgateMeteredNoInject => "Tollgate + limits + metering, include_usage not forced (API key)",
        }
    }

    pub fn from_slug(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.slug() == s || k.id() == s)
    }

    /// Whether the request carries the JWT (else the API key).
    pub fn sends_jwt(self) -> bool {
        matches!(
            self,
            Kind::JwtAuthn
                | Kind::JwtAuthnCached
                | Kind::TollgateJwt
                | Kind::TollgateJwtUncached
                | Kind::TollgateJwtAlt
        )
    }

    pub fn is_jwt_authn(self) -> bool {
        matches!(self, Kind::JwtAuthn | Kind::JwtAuthnCached)
    }

    /// Whether the variant runs the `--alt-wasm` build.
    pub fn needs_alt_wasm(self) -> bool {
        matches!(self, Kind::TollgateJwtAlt | Kind::TollgateKeyAlt | Kind::TollgateMeteredAlt)
    }

    /// Whether the listener refuses a wrong credential.
    pub fn authenticates(self) -> bool {
        !matches!(self, Kind::NoFilter | Kind::WasmNoop | Kind::WasmHostCalls | Kind::WasmHostCallsBulk)
            && !self.is_floor()
    }

    /// Whether the variant runs the empty filter of `bench/noop-filter`.
    pub fn needs_noop_wasm(self) -> bool {
        matches!(self, Kind::WasmNoop | Kind::WasmHostCalls | Kind::WasmHostCallsBulk) || self.is_floor()
    }

    /// Diagnostic variants, run only when named in `--variants` (not in the default set).
    pub fn diagnostic(self) -> bool {
        matches!(self, Kind::TollgateUsageOnly | Kind::TollgateMeteredNoInject)
    }

    /// The metering floors (m), (m').
    pub fn is_floor(self) -> bool {
        matches!(self, Kind::WasmMeterFloor | Kind::WasmFloorFull)
    }

    /// Whether the variant meters (its usage events go to the tracker).
    pub fn meters(self) -> bool {
        matches!(
            self,
            Kind::TollgateMetered
                | Kind::TollgateMeteredAlt
                | Kind::TollgateLimitsLocal
                | Kind::TollgateLimitsGlobal
                | Kind::ExtAuthzExtProc
                | Kind::TollgateUsageOnly
                | Kind::TollgateMeteredNoInject
        ) || self.is_floor()
    }
}

/// Credentials shared by every variant: a list of API keys (stored as SHA-256
/// digests, as Tollgate, the auth service and the Lua filter all hold them), the
/// key the load generators send, and a JWT with its JWKS (HS256 with an `oct` key by
/// default; RS256/ES256/EdDSA… with the public key, `--jwt-alg`).
pub struct Creds {
    /// `api_keys.keys` entries: `{"sha256","user","groups"}`.
    pub key_entries: Vec<Value>,
    pub api_key: String,
    pub jwt: String,
    /// The JWKS both Envoy's `jwt_authn` and Tollgate get (public keys only).
    pub jwks: String,
    /// The JWT's `alg`.
    pub jwt_alg: String,
    /// The JWT's `exp` (Unix seconds).
    pub jwt_exp: u64,
    /// (k): a managed key (in none of the static lists), created in the tracker by
    /// `bench-run` once the tracker runs.
    pub managed_key: Option<String>,
}

pub const GROUP: &str = "bench";

/// The bench JWT's lifetime: a day.
pub const JWT_TTL_SECS: u64 = 86_400;

impl Creds {
    /// `n_keys` keys (at least one); the load uses the one in the middle; an HS256 JWT.
    pub fn new(n_keys: usize) -> anyhow::Result<Creds> {
        Creds::with_jwt_alg(n_keys, "HS256")
    }

    /// As [`Creds::new`], the JWT signed with `alg`: `HS256` (a fresh `oct` secret) or
    /// one of [`harness::dev::SIGNING_ALGS`] (RS*/PS*: the harness's fixed 2048-bit test
    /// key 0; ES256/ES384/EdDSA: a fresh key), its JWKS the public key (`kid`
    /// `bench-key`).
    pub fn with_jwt_alg(n_keys: usize, alg: &str) -> anyhow::Result<Creds> {
        let n = n_keys.max(1);
        let mut key_entries = Vec::with_capacity(n);
        let mut api_key = String::new();
        for i in 0..n {
            let key = harness::dev::new_api_key();
            key_entries.push(harness::dev::key_entry(&key, &format!("user{i}"), &[GROUP.to_string()]));
            if i == n / 2 {
                api_key = key;
            }
        }
        // A day of validity: enough for any run (every measured run of a JWT variant
        // fails loudly on a non-2xx answer), and jwt_authn's cache honours exp.
        let claims = harness::dev::claims("dev", "jwt-user", &[GROUP.to_string()], Some(JWT_TTL_SECS), None);
        let jwt_exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let (jwt, jwks) = if alg == "HS256" {
            let secret = harness::dev::new_secret();
            let jwks = harness::dev::jwks(secret.as_bytes(), Some("dev-key"));
            (harness::dev::mint_jwt(secret.as_bytes(), Some("dev-key"), &claims)?, jwks)
        } else if harness::dev::SIGNING_ALGS.contains(&alg) {
            let signer = harness::dev::test_signer(0, alg, Some("bench-key"))?;
            (signer.mint(&claims)?, harness::dev::Signer::jwks(&[&signer]))
        } else {
            anyhow::bail!("--jwt-alg {alg}: one of HS256, {}", harness::dev::SIGNING_ALGS.join(", "));
        };
        Ok(Creds { key_entries, api_key, jwt, jwks, jwt_alg: alg.to_string(), jwt_exp, managed_key: None })
    }

    /// The `authorization` header value this variant's requests carry.
    pub fn authorization(&self, kind: Kind) -> String {
        if kind.sends_jwt() {
            format!("Bearer {}", self.jwt)
        } else if kind == Kind::TollgateKeyManaged {
            // No managed key yet: a key nobody knows, so the sanity check fails loudly.
            format!("Bearer {}", self.managed_key.as_deref().unwrap_or("tg-managed-key-not-created"))
        } else {
            format!("Bearer {}", self.api_key)
        }
    }

    /// The JWT with its signature's first character changed: well formed, right `kid`
    /// and `alg`, a signature that does not verify (the sanity check wants 401).
    pub fn tampered_jwt(&self) -> String {
        let (input, sig) = self.jwt.rsplit_once('.').unwrap_or((self.jwt.as_str(), ""));
        let mut sig: Vec<char> = sig.chars().collect();
        if let Some(c) = sig.first_mut() {
            *c = if *c == 'A' { 'B' } else { 'A' };
        }
        format!("{input}.{}", sig.into_iter().collect::<String>())
    }

    /// `(sha256 hex, user, groups csv)` for the auth service and the Lua filter.
    pub fn digest_table(&self) -> Vec<(String, String, String)> {
        self.key_entries
            .iter()
            .filter_map(|e| {
                let digest = e.get("sha256")?.as_str()?.to_string();
                let user = e.get("user")?.as_str()?.to_string();
                let groups =
                    e.get("groups")?.as_array()?.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",");
                Some((digest, user, groups))
            })
            .collect()
    }
}

/// Cluster names in the bootstrap.
pub const MOCK_CLUSTER: &str = "model";
pub const TRACKER_CLUSTER: &str = "usage-tracking";
pub const AUTHZ_CLUSTER: &str = "authz";
/// (f'): the metering `ext_proc` service (gRPC, HTTP/2).
pub const EXTPROC_CLUSTER: &str = "meter-extproc";

/// Tollgate's plugin config for a variant: API keys and the JWT provider for
/// (c)/(d); plus generous limits (nothing is denied, but every request goes through
/// the shared-data token bucket and is charged its tokens) and usage reports to the
/// local tracker for (e).
pub fn tollgate_config(creds: &Creds, metered: bool) -> Value {
    let mut config = json!({
        "api_keys": {"keys": creds.key_entries},
        "jwt": {"providers": [{"issuer": "dev", "jwks": creds.jwks}]}
    });
    if metered {
        if let Some(obj) = config.as_object_mut() {
            obj.insert(
                "limits".into(),
                json!({"groups": {GROUP: {
                    "requests_per_second": 100_000_000u64,
                    "burst": 100_000_000u64,
                    "tokens_per_minute": 1_000_000_000_000u64
                }}}),
            );
            obj.insert("usage".into(), usage_section());
        }
    }
    config
}

/// (c'): (c)'s config with `jwt.cache_entries: 0`: no per-worker cache of verified
/// tokens (nor of API keys), so every request's signature is verified.
pub fn uncached_config(creds: &Creds) -> Value {
    let mut config = tollgate_config(creds, false);
    if let Some(jwt) = config.get_mut("jwt").and_then(Value::as_object_mut) {
        jwt.insert("cache_entries".into(), json!(0));
    }
    config
}

/// The `usage` section of the metered variants: reports to the local tracker, whose
/// cluster also carries the lease syncs of global limits.
fn usage_section() -> Value {
    json!({"cluster": TRACKER_CLUSTER, "authority": "usage-tracking", "path": "/track",
           "flush_interval_ms": 500, "timeout_ms": 1000})
}

/// A request limit no run comes near, whatever its window (10¹² a minute is about
/// 1.7e10 requests a second).
pub const NEVER_REACHED: u64 = 1_000_000_000_000;

/// (i)/(j): API keys and the JWT provider as (c)/(d), a `requests_per_minute` limit
/// for the group that no run reaches, `"scope"` local or global, and `usage` to the
/// local tracker in both (global scope needs the section: its cluster reaches the
/// tracker that grants the leases; local has it too, so the two differ in scope only).
pub fn limits_config(creds: &Creds, global: bool) -> Value {
    json!({
        "api_keys": {"keys": creds.key_entries},
        "jwt": {"providers": [{"issuer": "dev", "jwks": creds.jwks}]},
        "limits": {
            "scope": if global { "global" } else { "local" },
            "groups": {GROUP: {"requests_per_minute": NEVER_REACHED}}
        },
        "usage": usage_section()
    })
}

/// The lease-wait measurement's listeners: `keys` (each its own user of group
/// `lease`), every user limited to `requests_per_day` far beyond the run, scope local
/// or global, `usage` to the local tracker.
pub fn lease_wait_config(keys: &[Value], global: bool) -> Value {
    json!({
        "api_keys": {"keys": keys},
        "limits": {
            "scope": if global { "global" } else { "local" },
            "groups": {"lease": {"requests_per_day": NEVER_REACHED}}
        },
        "usage": usage_section()
    })
}

/// `api_keys.remote` to the local tracker (its keys API, `POST /v1/keys/resolve`), the
/// filter's defaults otherwise (`ttl_seconds` 60, `max_lookups_per_second` 20, …) except
/// `more`, merged in.
pub fn remote_section(more: Value) -> Value {
    let mut remote = json!({"cluster": TRACKER_CLUSTER, "authority": "usage-tracking"});
    if let (Some(obj), Value::Object(more)) = (remote.as_object_mut(), more) {
        obj.extend(more);
    }
    remote
}

/// (k): (d)'s config (the 100 static keys, the JWT provider; no limits, no usage) plus
/// `api_keys.remote` to the local tracker with the filter's defaults.
pub fn managed_config(creds: &Creds) -> Value {
    let mut config = tollgate_config(creds, false);
    if let Some(api_keys) = config.get_mut("api_keys").and_then(Value::as_object_mut) {
        api_keys.insert("remote".into(), remote_section(json!({})));
    }
    config
}

/// The key-wait measurement's listeners: managed (no static key; `api_keys.remote`
/// with `max_lookups_per_second` raised so the fresh keys, a few per millisecond, are
/// not refused by the per-worker bound) or static (`keys` in the list).
pub fn key_wait_config(keys: &[Value], managed: bool) -> Value {
    if managed {
        json!({"api_keys": {"keys": [], "remote": remote_section(json!({"max_lookups_per_second": 1000}))}})
    } else {
        json!({"api_keys": {"keys": keys}})
    }
}

fn jwt_authn_filter(creds: &Creds, cached: bool) -> Value {
    let mut provider = json!({
        "issuer": "dev",
        "local_jwks": {"inline_string": creds.jwks},
        "forward": false,
        "clock_skew_seconds": 60
    });
    if cached {
        if let Some(obj) = provider.as_object_mut() {
            obj.insert("jwt_cache_config".into(), json!({"jwt_cache_size": 1000}));
        }
    }
    json!({"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"dev": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "dev"}}]
    }})
}

fn wasm_filter(wasm: &Path, config: &Value) -> Value {
    wasm_filter_named(wasm, config, "tollgate")
}

fn wasm_filter_named(wasm: &Path, config: &Value, name: &str) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": name,
                "failure_policy": "FAIL_CLOSED",
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": config.to_string()
                },
                "vm_config": {
                    "vm_id": "",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm.display().to_string()}}
                }
            }
        }
    })
}

fn ext_authz_filter() -> Value {
    json!({"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": false,
        "http_service": {
            "server_uri": {"uri": "http://127.0.0.1", "cluster": AUTHZ_CLUSTER, "timeout": "1s"},
            "path_prefix": "/check",
            "authorization_request": {"allowed_headers": {"patterns": [
                {"exact": "authorization"}, {"exact": "x-api-key"}
            ]}},
            "authorization_response": {"allowed_upstream_headers": {"patterns": [
                {"exact": "x-tollgate-user"}, {"exact": "x-tollgate-groups"}
            ]}}
        }
    }})
}

/// (f'): `ext_proc` as the seed's meter-extproc and Envoy AI Gateway use it to count
/// tokens: the request headers (the identity `ext_authz` set, method, host, path) and
/// the response headers sent, the response body `STREAMED` (each chunk to the service
/// as it arrives, passed on when the service acknowledges it), no request body, no
/// trailers; failure closed, as the auth half.
fn ext_proc_filter() -> Value {
    json!({"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": "1s"},
        "failure_mode_allow": false,
        "message_timeout": "1s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP"
        }
    }})
}

/// The noop filter's config for the floors: the tracker's cluster and the report path
/// (as the metered variants' `usage`), `meter`, and for (m') `limits`.
fn floor_config(full: bool) -> Value {
    json!({"host_calls": true, "meter": true, "limits": full,
           "cluster": TRACKER_CLUSTER, "authority": "usage-tracking", "path": "/track"})
}

fn lua_filter(creds: &Creds) -> Value {
    json!({"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": crate::lua::source(&creds.digest_table())}
    }})
}

fn auth_filters(kind: Kind, creds: &Creds, l: &Layout<'_>) -> Vec<Value> {
    let wasm = l.wasm;
    match kind {
        Kind::NoFilter => vec![],
        Kind::JwtAuthn => vec![jwt_authn_filter(creds, false)],
        Kind::JwtAuthnCached => vec![jwt_authn_filter(creds, true)],
        Kind::TollgateJwt | Kind::TollgateKey => vec![wasm_filter(wasm, &tollgate_config(creds, false))],
        Kind::TollgateJwtUncached => vec![wasm_filter_named(wasm, &uncached_config(creds), "tollgate-uncached")],
        Kind::TollgateMetered => vec![wasm_filter(wasm, &tollgate_config(creds, true))],
        Kind::ExtAuthz => vec![ext_authz_filter()],
        Kind::Lua => vec![lua_filter(creds)],
        Kind::WasmNoop => l.noop_wasm.map(|w| wasm_filter_named(w, &json!({}), "noop")).into_iter().collect(),
        Kind::WasmHostCalls => {
            l.noop_wasm.map(|w| wasm_filter_named(w, &json!({"host_calls": true}), "host-calls")).into_iter().collect()
        }
        Kind::WasmHostCallsBulk => l
            .noop_wasm
            .map(|w| wasm_filter_named(w, &json!({"host_calls": "bulk"}), "host-calls-bulk"))
            .into_iter()
            .collect(),
        Kind::TollgateJwtAlt | Kind::TollgateKeyAlt => l
            .alt_wasm
            .map(|w| wasm_filter_named(w, &tollgate_config(creds, false), "tollgate-alt"))
            .into_iter()
            .collect(),
        Kind::TollgateMeteredAlt => l
            .alt_wasm
            .map(|w| wasm_filter_named(w, &tollgate_config(creds, true), "tollgate-alt-metered"))
            .into_iter()
            .collect(),
        Kind::TollgateLimitsLocal => vec![wasm_filter_named(wasm, &limits_config(creds, false), "tollgate-local")],
        Kind::TollgateLimitsGlobal => vec![wasm_filter_named(wasm, &limits_config(creds, true), "tollgate-global")],
        Kind::TollgateKeyManaged => vec![wasm_filter_named(wasm, &managed_config(creds), "tollgate-managed")],
        Kind::ExtAuthzExtProc => vec![ext_authz_filter(), ext_proc_filter()],
        Kind::TollgateUsageOnly => {
            let mut config = tollgate_config(creds, false);
            if let Some(obj) = config.as_object_mut() {
                obj.insert("usage".into(), usage_section());
            }
            vec![wasm_filter_named(wasm, &config, "tollgate-usage-only")]
        }
        Kind::TollgateMeteredNoInject => {
            let mut config = tollgate_config(creds, true);
            if let Some(obj) = config.as_object_mut() {
                obj.insert("metering".into(), json!({"inject_include_usage": false}));
            }
            vec![wasm_filter_named(wasm, &config, "tollgate-no-inject")]
        }
        Kind::WasmMeterFloor => {
            l.noop_wasm.map(|w| wasm_filter_named(w, &floor_config(false), "meter-floor")).into_iter().collect()
        }
        Kind::WasmFloorFull => {
            l.noop_wasm.map(|w| wasm_filter_named(w, &floor_config(true), "floor-full")).into_iter().collect()
        }
    }
}

fn listener(kind: Kind, port: u16, l: &Layout<'_>) -> Value {
    named_listener(kind.slug(), port, auth_filters(kind, l.creds, l))
}

fn named_listener(name: &str, port: u16, mut filters: Vec<Value>) -> Value {
    filters.push(json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}));
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "codec_type": "AUTO",
                "route_config": {"name": "local", "virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/v1/"}, "route": {"cluster": MOCK_CLUSTER, "timeout": "300s"}},
                        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
                    ]
                }]},
                "http_filters": filters
            }
        }]}]
    })
}

fn cluster(name: &str, port: u16, http2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        ]}]}
    });
    if http2 {
        if let Some(obj) = c.as_object_mut() {
            obj.insert(
                "typed_extension_protocol_options".into(),
                json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }}),
            );
        }
    }
    c
}

/// Where the parts of one benchmark Envoy are.
pub struct Layout<'a> {
    pub admin_port: u16,
    pub mock_port: u16,
    pub tracker_port: u16,
    pub authz_port: u16,
    /// (f')'s `meter-extproc`.
    pub extproc_port: u16,
    pub wasm: &'a Path,
    /// The empty filter of variant (h), when built.
    pub noop_wasm: Option<&'a Path>,
    /// Another build of the filter for (c2)/(d2), from `--alt-wasm`.
    pub alt_wasm: Option<&'a Path>,
    pub creds: &'a Creds,
    /// One listener per variant.
    pub listeners: &'a [(Kind, u16)],
    /// More listeners running Tollgate: (name, port, plugin config).
    pub extra: &'a [(String, u16, Value)],
}

pub fn bootstrap(l: &Layout<'_>) -> Value {
    let listeners: Vec<Value> = l
        .listeners
        .iter()
        .map(|&(k, port)| listener(k, port, l))
        .chain(l.extra.iter().map(|(name, port, config)| {
            named_listener(name, *port, vec![wasm_filter_named(l.wasm, config, &format!("tollgate-{name}"))])
        }))
        .collect();
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": l.admin_port}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                cluster(MOCK_CLUSTER, l.mock_port, false),
                cluster(TRACKER_CLUSTER, l.tracker_port, false),
                cluster(AUTHZ_CLUSTER, l.authz_port, false),
                cluster(EXTPROC_CLUSTER, l.extproc_port, true)
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_variant_resolves_a_key_outside_the_static_list() {
        let mut creds = Creds::new(3).unwrap();
        assert_eq!(creds.authorization(Kind::TollgateKeyManaged), "Bearer tg-managed-key-not-created");
        creds.managed_key = Some("tgk_managed".into());
        assert_eq!(creds.authorization(Kind::TollgateKeyManaged), "Bearer tgk_managed");
        assert_eq!(Kind::from_slug("tollgate_key_managed"), Some(Kind::TollgateKeyManaged));
        assert_eq!(Kind::from_slug("k"), Some(Kind::TollgateKeyManaged));
        // (d)'s config plus api_keys.remote to the tracker's cluster.
        let config = managed_config(&creds);
        let mut without = config.clone();
        without["api_keys"].as_object_mut().unwrap().remove("remote");
        assert_eq!(without, tollgate_config(&creds, false));
        assert_eq!(config["api_keys"]["remote"]["cluster"], TRACKER_CLUSTER);
        let wait = key_wait_config(&[], true);
        assert_eq!(wait["api_keys"]["remote"]["max_lookups_per_second"], 1000);
        assert_eq!(wait["api_keys"]["keys"], json!([]));
    }

    #[test]
    fn jwt_algorithms_give_both_filters_the_same_public_jwks() {
        use tollgate_filter::auth::{decide, CredentialCache, Verdict};
        use tollgate_filter::config::Settings;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        for (alg, kty) in [("HS256", "oct"), ("RS256", "RSA"), ("ES256", "EC"), ("EdDSA", "OKP")] {
            let creds = Creds::with_jwt_alg(2, alg).unwrap();
            assert_eq!(creds.jwt_alg, alg);
            assert!(creds.jwt_exp >= now + JWT_TTL_SECS - 60, "{alg}: the token outlives any run");
            let jwks: Value = serde_json::from_str(&creds.jwks).unwrap();
            assert_eq!(jwks["keys"][0]["kty"], kty, "{alg}");
            if alg != "HS256" {
                assert!(jwks["keys"][0].get("d").is_none(), "{alg}: public key only");
            }
            // (b) and (b') get exactly the JWKS the filter gets.
            let jwt_authn = jwt_authn_filter(&creds, false);
            assert_eq!(
                jwt_authn["typed_config"]["providers"]["dev"]["local_jwks"]["inline_string"],
                tollgate_config(&creds, false)["jwt"]["providers"][0]["jwks"]
            );
            // (c') is (c) with the cache off, nothing else.
            let uncached = uncached_config(&creds);
            assert_eq!(uncached["jwt"]["cache_entries"], 0);
            let mut back = uncached.clone();
            back["jwt"].as_object_mut().unwrap().remove("cache_entries");
            assert_eq!(back, tollgate_config(&creds, false));
            // The filter's own logic allows the token and refuses the tampered one.
            let settings = Settings::parse(uncached.to_string().as_bytes(), &|_| None).unwrap();
            let mut cache = CredentialCache::new(0, 300);
            let verdict = |token: &str, cache: &mut CredentialCache| {
                let headers = vec![("authorization".to_string(), format!("Bearer {token}"))];
                matches!(decide(&settings, cache, &headers, || now), Verdict::Allow { .. })
            };
            assert!(verdict(&creds.jwt, &mut cache), "{alg}: the bench token is refused");
            assert!(!verdict(&creds.tampered_jwt(), &mut cache), "{alg}: the tampered token is allowed");
            assert_ne!(creds.tampered_jwt(), creds.jwt);
            assert!(Kind::TollgateJwtUncached.sends_jwt());
        }
        assert!(Creds::with_jwt_alg(1, "none").is_err());
        assert_eq!(Kind::from_slug("c'"), Some(Kind::TollgateJwtUncached));
        assert_eq!(Kind::from_slug("tollgate_jwt_uncached"), Some(Kind::TollgateJwtUncached));
    }

    #[test]
    fn the_peer_and_the_floors_are_wired() {
        let creds = Creds::new(2).unwrap();
        let wasm = Path::new("/x/tollgate.wasm");
        let noop = Path::new("/x/noop.wasm");
        let listeners = [(Kind::ExtAuthzExtProc, 1001), (Kind::WasmMeterFloor, 1002), (Kind::WasmFloorFull, 1003)];
        let b = bootstrap(&Layout {
            admin_port: 1,
            mock_port: 2,
            tracker_port: 3,
            authz_port: 4,
            extproc_port: 5,
            wasm,
            noop_wasm: Some(noop),
            alt_wasm: None,
            creds: &creds,
            listeners: &listeners,
            extra: &[],
        });
        let filters = |i: usize| {
            b["static_resources"]["listeners"][i]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        // (f'): ext_authz, then ext_proc, then the router; its cluster speaks HTTP/2.
        assert_eq!(
            filters(0),
            ["envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc", "envoy.filters.http.router"]
        );
        let ext_proc = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"][1]["typed_config"];
        assert_eq!(ext_proc["processing_mode"]["response_body_mode"], "STREAMED");
        assert_eq!(ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"], EXTPROC_CLUSTER);
        let cluster = b["static_resources"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == EXTPROC_CLUSTER)
            .unwrap();
        assert!(cluster["typed_extension_protocol_options"].is_object());
        // (m), (m'): the noop filter with the metering (and limits) floor switched on.
        for (i, limits) in [(1, false), (2, true)] {
            assert_eq!(filters(i), ["envoy.filters.http.wasm", "envoy.filters.http.router"]);
            let wasm_config = &b["static_resources"]["listeners"][i]["filter_chains"][0]["filters"][0]["typed_config"]
                ["http_filters"][0]["typed_config"]["config"];
            assert_eq!(wasm_config["vm_config"]["code"]["local"]["filename"], "/x/noop.wasm");
            let config: Value = serde_json::from_str(wasm_config["configuration"]["value"].as_str().unwrap()).unwrap();
            assert_eq!(config["meter"], true);
            assert_eq!(config["limits"], limits);
            assert_eq!(config["cluster"], TRACKER_CLUSTER);
        }
        assert!(Kind::WasmFloorFull.needs_noop_wasm() && !Kind::WasmFloorFull.authenticates());
        assert!(Kind::ExtAuthzExtProc.authenticates() && Kind::ExtAuthzExtProc.meters());
        assert_eq!(Kind::from_slug("f'"), Some(Kind::ExtAuthzExtProc));
        assert_eq!(Kind::from_slug("m'"), Some(Kind::WasmFloorFull));
    }
}
