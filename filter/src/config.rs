//! The plugin configuration: the JSON an Istio `WasmPlugin.pluginConfig` becomes.
//!
//! Parsed once in `on_configure` into [`Settings`], checked there, and refused as a
//! whole with the offending field named: a config that parses into something other
//! than what the operator meant could let requests in. Unknown fields are refused
//! for the same reason (a typo in `allowed_groups` must not silently disable it).
//! Environment variables (`keys_env`, `jwks_env`, filled by Istio's `vmConfig.env`
//! from a Secret) are read through a lookup function so the logic stays pure.

use serde::Deserialize;

use crate::credentials::{default_sources, validate_sources, CredentialSource};
use crate::jwt::{Jwks, JwtProvider, JwtVerifier};
use crate::keys::{ApiKeyEntry, ApiKeyStore};
use crate::limits::{Limits, LimitsConfig, Scope};
use crate::remote_jwks::RemoteJwks;
use crate::remote_keys::RemoteKeys;

/// A refused configuration: which field, and why. Never carries secret values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid plugin configuration: {}", self.message)
        } else {
            write!(f, "invalid plugin configuration: field `{}`: {}", self.field, self.message)
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    api_keys: Option<RawApiKeys>,
    #[serde(default)]
    jwt: Option<RawJwt>,
    #[serde(default)]
    authorization: RawAuthorization,
    #[serde(default)]
    identity_headers: RawIdentityHeaders,
    #[serde(default)]
    forward_credentials: bool,
    #[serde(default)]
    limits: Option<LimitsConfig>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    metering: RawMetering,
    #[serde(default)]
    cors_preflight: CorsPreflight,
}

/// How requests are metered, whether or not `usage` reports them (token limits need
/// the same numbers).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetering {
    #[serde(default = "default_true")]
    inject_include_usage: bool,
    #[serde(default = "default_max_tokens")]
    default_max_tokens: u64,
    #[serde(default = "default_prompt_bytes_per_token")]
    prompt_bytes_per_token: u64,
}

impl Default for RawMetering {
    fn default() -> Self {
        Self {
            inject_include_usage: true,
            default_max_tokens: default_max_tokens(),
            prompt_bytes_per_token: default_prompt_bytes_per_token(),
        }
    }
}

fn default_max_tokens() -> u64 {
    1024
}
fn default_prompt_bytes_per_token() -> u64 {
    4
}

/// What happens to a CORS preflight (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`): browsers send it without credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CorsPreflight {
    /// Like any request: no credential, 401.
    #[default]
    Deny,
    /// Passed on without a credential (for Envoy's `cors` filter or the upstream to
    /// answer), identity headers removed, nothing set, no usage event.
    Allow,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKeys {
    #[serde(default)]
    sources: Option<Vec<CredentialSource>>,
    #[serde(default)]
    keys: Vec<ApiKeyEntry>,
    #[serde(default)]
    keys_env: Option<String>,
    #[serde(default)]
    remote: Option<RawRemoteKeys>,
}

/// `api_keys.remote`: managed keys resolved from the tracker (see `remote_keys`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemoteKeys {
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default = "default_resolve_path")]
    path: String,
    #[serde(default = "default_changes_path")]
    changes_path: String,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_key_ttl")]
    ttl_seconds: u64,
    #[serde(default = "default_negative_ttl")]
    negative_ttl_seconds: u64,
    #[serde(default = "default_max_stale")]
    max_stale_seconds: u64,
    #[serde(default = "default_key_slots")]
    max_entries: u64,
    #[serde(default = "default_lookups_in_flight")]
    max_in_flight: usize,
    #[serde(default = "default_lookups_per_second")]
    max_lookups_per_second: u64,
    #[serde(default = "default_changes_interval")]
    changes_interval_seconds: u64,
    #[serde(default)]
    token_env: Option<String>,
}

fn default_resolve_path() -> String {
    "/v1/keys/resolve".into()
}
fn default_changes_path() -> String {
    "/v1/keys/changes".into()
}
fn default_key_ttl() -> u64 {
    60
}
fn default_negative_ttl() -> u64 {
    10
}
fn default_max_stale() -> u64 {
    600
}
fn default_key_slots() -> u64 {
    10_000
}
fn default_lookups_in_flight() -> usize {
    16
}
fn default_lookups_per_second() -> u64 {
    20
}
fn default_changes_interval() -> u64 {
    5
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    #[serde(default)]
    providers: Vec<RawProvider>,
    #[serde(default = "default_cache_entries")]
    cache_entries: usize,
}

fn default_cache_entries() -> usize {
    1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    authorized_parties: Vec<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default)]
    jwks_env: Option<String>,
    #[serde(default)]
    remote_jwks: Option<RawRemoteJwks>,
    #[serde(default = "default_user_claim")]
    user_claim: String,
    #[serde(default = "default_groups_claim")]
    groups_claim: String,
    #[serde(default = "default_skew")]
    clock_skew_seconds: u64,
    #[serde(default)]
    require_exp: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemoteJwks {
    cluster: String,
    authority: String,
    path: String,
    #[serde(default = "default_jwks_refresh")]
    refresh_seconds: u64,
    #[serde(default = "default_jwks_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_jwks_max_age")]
    max_age_seconds: u64,
    #[serde(default = "default_kid_refetch")]
    kid_refetch_min_interval_ms: u64,
    #[serde(default = "default_jwks_wait")]
    wait_ms: u64,
}

fn default_jwks_refresh() -> u64 {
    300
}
fn default_jwks_timeout() -> u64 {
    2000
}
fn default_jwks_max_age() -> u64 {
    86_400
}
fn default_kid_refetch() -> u64 {
    30_000
}
fn default_jwks_wait() -> u64 {
    3000
}

fn default_user_claim() -> String {
    "sub".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_skew() -> u64 {
    60
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthorization {
    #[serde(default)]
    allowed_groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentityHeaders {
    #[serde(default = "default_user_header")]
    user: String,
    #[serde(default = "default_groups_header")]
    groups: String,
}

impl Default for RawIdentityHeaders {
    fn default() -> Self {
        Self { user: default_user_header(), groups: default_groups_header() }
    }
}

fn default_user_header() -> String {
    "x-tollgate-user".into()
}
fn default_groups_header() -> String {
    "x-tollgate-groups".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsage {
    cluster: String,
    #[serde(default = "default_authority")]
    authority: String,
    #[serde(default = "default_track_path")]
    path: String,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_flush_ms")]
    flush_interval_ms: u64,
    #[serde(default = "default_max_batch")]
    max_batch: usize,
    #[serde(default = "default_max_batch_bytes")]
    max_batch_bytes: usize,
    #[serde(default = "default_max_queue")]
    max_queue: usize,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    #[serde(default = "default_true")]
    inject_include_usage: bool,
    #[serde(default)]
    token_env: Option<String>,
}

fn default_authority() -> String {
    "usage-tracking".into()
}
fn default_track_path() -> String {
    "/track".into()
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_flush_ms() -> u64 {
    500
}
fn default_max_batch() -> usize {
    500
}
/// Half the tracker's default body limit (1 MiB), so a default tracker never answers 413.
fn default_max_batch_bytes() -> usize {
    512 * 1024
}
fn default_max_queue() -> usize {
    10_000
}
fn default_max_attempts() -> u32 {
    30
}
fn default_true() -> bool {
    true
}

/// Names of the headers that carry the caller's identity to the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityHeaders {
    pub user: String,
    pub groups: String,
}

/// Where and how usage events are delivered (design.md §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSettings {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
    pub flush_interval_ms: u64,
    pub max_batch: usize,
    pub max_batch_bytes: usize,
    pub max_queue: usize,
    pub max_attempts: u32,
    pub inject_include_usage: bool,
    /// `Bearer <token>` for the reports' `authorization` header (`token_env`).
    pub authorization: Option<String>,
}

impl UsageSettings {
    /// The headers of a usage report (the token, when configured, as a bearer).
    pub fn report_headers(&self) -> Vec<(&str, &str)> {
        self.headers_for(&self.path)
    }

    /// The headers of a POST to the trackers at `path` (reports, lease syncs).
    pub fn headers_for<'a>(&'a self, path: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut headers = vec![
            (":method", "POST"),
            (":path", path),
            (":authority", self.authority.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(auth) = &self.authorization {
            headers.push(("authorization", auth.as_str()));
        }
        headers
    }
}

/// How requests are metered (the `metering` section), with or without `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metering {
    /// Force `stream_options.include_usage` on streaming chat/completions requests.
    pub inject_include_usage: bool,
    /// Completion tokens reserved and estimated for a request that names no
    /// `max_tokens` (per choice).
    pub default_max_tokens: u64,
    /// Request body bytes per prompt token, for the prompt estimate.
    pub prompt_bytes_per_token: u64,
}

/// The checked configuration the filter runs with.
#[derive(Debug)]
pub struct Settings {
    pub sources: Vec<CredentialSource>,
    pub keys: ApiKeyStore,
    pub jwt: JwtVerifier,
    /// By provider index: the remote JWKS of providers whose keys are fetched.
    pub jwt_remote: Vec<Option<RemoteJwks>>,
    pub jwt_cache_entries: usize,
    pub allowed_groups: Vec<String>,
    pub identity_headers: IdentityHeaders,
    pub forward_credentials: bool,
    pub limits: Option<Limits>,
    pub usage: Option<UsageSettings>,
    pub metering: Metering,
    pub cors_preflight: CorsPreflight,
    /// Managed keys resolved from the key service (`api_keys.remote`).
    pub remote_keys: Option<RemoteKeys>,
}

impl Settings {
    /// Parses and checks the plugin configuration. `env` looks up environment
    /// variables (the VM's, as Istio's `vmConfig.env` sets them).
    pub fn parse(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let trimmed = trim_ascii(bytes);
        let raw: RawConfig = if trimmed.is_empty() {
            RawConfig::default()
        } else if trimmed.first() != Some(&b'{') {
            return Err(ConfigError::new("", "the configuration must be a JSON object"));
        } else {
            let de = &mut serde_json::Deserializer::from_slice(trimmed);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." || path == "?" { String::new() } else { path };
                ConfigError::new(field, serde_message(&e.into_inner().to_string()))
            })?
        };
        build(raw, env)
    }
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// serde_json appends " at line L column C"; the field path is more useful.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message.get(..i).unwrap_or(message).to_string(),
        None => message.to_string(),
    }
}

/// A serde error as it may be logged: without its position and without the value it
/// quotes. serde names the offending value (`invalid type: string "sk-…", expected
/// …`, `unknown variant `…``), and a config's values include secrets put in the wrong
/// place; field names (`unknown field `…``) and what was expected are kept.
fn serde_message(message: &str) -> String {
    redact_values(&strip_position(message))
}

fn redact_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    // `"…"` is a quoted value wherever it appears.
    while let Some(start) = rest.find('"') {
        out.push_str(rest.get(..start).unwrap_or_default());
        let after = rest.get(start + 1..).unwrap_or_default();
        match after.find('"') {
            Some(end) => {
                out.push_str("\"…\"");
                rest = after.get(end + 1..).unwrap_or_default();
            }
            None => {
                out.push_str("\"…");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    // `unknown variant `value`, expected one of …`: the first backquoted item is the value.
    const VARIANT: &str = "unknown variant `";
    if let Some(at) = out.find(VARIANT) {
        let from = at + VARIANT.len();
        if let Some(len) = out.get(from..).and_then(|s| s.find('`')) {
            out.replace_range(from..from + len, "…");
        }
    }
    out
}

fn build(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
    let limits = raw.limits.map(Limits::from_config).transpose().map_err(|(f, m)| ConfigError::new(f, m))?;

    let api_keys = raw.api_keys.unwrap_or_default();
    let sources = match api_keys.sources {
        Some(list) => validate_sources(&list).map_err(|m| ConfigError::new("api_keys", m))?,
        None => default_sources(),
    };
    let remote = api_keys.remote;
    let mut entries = api_keys.keys;
    let inline_count = entries.len();
    if let Some(var) = api_keys.keys_env.as_deref() {
        let value = read_env(env, var, "api_keys.keys_env")?;
        let from_env: Vec<ApiKeyEntry> = serde_json::from_str(&value).map_err(|e| {
            ConfigError::new(
                "api_keys.keys_env",
                format!("environment variable {var} is not a JSON list of keys: {}", serde_message(&e.to_string())),
            )
        })?;
        entries.extend(from_env);
    }
    let keys = ApiKeyStore::new(&entries).map_err(|e| {
        let field = if e.index < inline_count {
            format!("api_keys.keys[{}].{}", e.index, e.field)
        } else {
            format!("api_keys.keys_env[{}].{}", e.index - inline_count, e.field)
        };
        ConfigError::new(field, e.reason)
    })?;

    let mut jwt_remote = Vec::new();
    let (providers, jwt_cache_entries) = match raw.jwt {
        Some(jwt) => {
            let mut providers: Vec<JwtProvider> = Vec::with_capacity(jwt.providers.len());
            for (i, p) in jwt.providers.into_iter().enumerate() {
                let (provider, remote) = build_provider(i, p, env)?;
                jwt_remote.push(remote);
                // Tokens pick their provider by `iss`: a second entry for the same issuer
                // would never be used (its keys, audiences and claims silently ignored).
                if providers.iter().any(|other| other.issuer == provider.issuer) {
                    return Err(ConfigError::new(
                        format!("jwt.providers[{i}].issuer"),
                        "duplicate issuer: each issuer may have one provider (put all its keys in one jwks)",
                    ));
                }
                providers.push(provider);
            }
            (providers, jwt.cache_entries)
        }
        None => (Vec::new(), default_cache_entries()),
    };

    for (i, g) in raw.authorization.allowed_groups.iter().enumerate() {
        if g.is_empty() || g.contains(',') || g.chars().any(char::is_whitespace) {
            return Err(ConfigError::new(
                format!("authorization.allowed_groups[{i}]"),
                "a group name must be non-empty, without commas or whitespace",
            ));
        }
    }

    let identity_headers = IdentityHeaders {
        user: check_header_name("identity_headers.user", &raw.identity_headers.user)?,
        groups: check_header_name("identity_headers.groups", &raw.identity_headers.groups)?,
    };
    if identity_headers.user == identity_headers.groups {
        return Err(ConfigError::new("identity_headers.groups", "must differ from identity_headers.user"));
    }
    for h in [&identity_headers.user, &identity_headers.groups] {
        if sources.iter().any(|s| &s.header == h) {
            return Err(ConfigError::new("identity_headers", format!("`{h}` is also a credential source")));
        }
    }

    let usage = raw.usage.map(|u| check_usage(u, env)).transpose()?;
    let metering = check_metering(raw.metering, usage.as_ref())?;
    let remote_keys = remote.map(|r| check_remote_keys(r, usage.as_ref(), env)).transpose()?;
    if limits.as_ref().is_some_and(|l| l.scope == Scope::Global) && usage.is_none() {
        return Err(ConfigError::new(
            "limits.scope",
            "\"global\" needs the usage section: its cluster reaches the trackers that grant the leases",
        ));
    }

    Ok(Settings {
        sources,
        keys,
        jwt: JwtVerifier::new(providers),
        jwt_remote,
        jwt_cache_entries,
        allowed_groups: raw.authorization.allowed_groups,
        identity_headers,
        forward_credentials: raw.forward_credentials,
        limits,
        usage,
        metering,
        cors_preflight: raw.cors_preflight,
        remote_keys,
    })
}

fn check_remote_keys(
    r: RawRemoteKeys,
    usage: Option<&UsageSettings>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RemoteKeys, ConfigError> {
    let fail = |f: &str, m: &str| Err(ConfigError::new(format!("api_keys.remote.{f}"), m.to_string()));
    let Some(cluster) = r.cluster.or_else(|| usage.map(|u| u.cluster.clone())) else {
        return fail("cluster", "is required without a usage section (whose cluster it defaults to)");
    };
    if cluster.trim().is_empty() {
        return fail("cluster", "must name the Envoy cluster of the key service");
    }
    let authority = r.authority.or_else(|| usage.map(|u| u.authority.clone())).unwrap_or_else(default_authority);
    for (field, path) in [("path", &r.path), ("changes_path", &r.changes_path)] {
        if !path.starts_with('/') {
            return fail(field, "must start with '/'");
        }
    }
    let ranges: [(&str, u64, u64, u64); 7] = [
        ("timeout_ms", r.timeout_ms, 1, 60_000),
        ("ttl_seconds", r.ttl_seconds, 1, 86_400),
        ("negative_ttl_seconds", r.negative_ttl_seconds, 0, 86_400),
        ("max_stale_seconds", r.max_stale_seconds, 0, 604_800),
        ("max_entries", r.max_entries, 1, 1_000_000),
        ("max_lookups_per_second", r.max_lookups_per_second, 1, 100_000),
        ("changes_interval_seconds", r.changes_interval_seconds, 1, 3_600),
    ];
    for (field, value, min, max) in ranges {
        if !(min..=max).contains(&value) {
            return Err(ConfigError::new(
                format!("api_keys.remote.{field}"),
                format!("must be between {min} and {max}"),
            ));
        }
    }
    if !(1..=10_000).contains(&r.max_in_flight) {
        return fail("max_in_flight", "must be between 1 and 10000");
    }
    let authorization = match r.token_env.as_deref() {
        Some(var) => Some(bearer(env, var, "api_keys.remote.token_env")?),
        None => usage.and_then(|u| u.authorization.clone()),
    };
    Ok(RemoteKeys {
        cluster,
        authority,
        path: r.path,
        changes_path: r.changes_path,
        timeout_ms: r.timeout_ms,
        ttl_seconds: r.ttl_seconds,
        negative_ttl_seconds: r.negative_ttl_seconds,
        max_stale_seconds: r.max_stale_seconds,
        max_entries: r.max_entries,
        max_in_flight: r.max_in_flight,
        max_lookups_per_second: r.max_lookups_per_second,
        changes_interval_seconds: r.changes_interval_seconds,
        authorization,
    })
}

/// `Bearer <token>` from the environment variable `var` (field `field` names it).
fn bearer(env: &dyn Fn(&str) -> Option<String>, var: &str, field: &str) -> Result<String, ConfigError> {
    let token = read_env(env, var, field)?;
    let token = token.trim();
    // It goes into a header value: printable ASCII only (never echoed).
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            field,
            format!("environment variable {var} must hold a token of printable ASCII without spaces"),
        ));
    }
    Ok(format!("Bearer {token}"))
}

fn check_metering(m: RawMetering, usage: Option<&UsageSettings>) -> Result<Metering, ConfigError> {
    if !(1..=1_000_000_000).contains(&m.default_max_tokens) {
        return Err(ConfigError::new("metering.default_max_tokens", "must be between 1 and 1000000000"));
    }
    if !(1..=1_000).contains(&m.prompt_bytes_per_token) {
        return Err(ConfigError::new("metering.prompt_bytes_per_token", "must be between 1 and 1000"));
    }
    Ok(Metering {
        // `usage.inject_include_usage` is the older place of the same switch; either off turns it off.
        inject_include_usage: m.inject_include_usage && usage.is_none_or(|u| u.inject_include_usage),
        default_max_tokens: m.default_max_tokens,
        prompt_bytes_per_token: m.prompt_bytes_per_token,
    })
}

fn read_env(env: &dyn Fn(&str) -> Option<String>, var: &str, field: &str) -> Result<String, ConfigError> {
    if var.is_empty() {
        return Err(ConfigError::new(field, "must name an environment variable"));
    }
    match env(var) {
        Some(v) if !v.trim().is_empty() => Ok(v),
        Some(_) => Err(ConfigError::new(field, format!("environment variable {var} is empty"))),
        None => Err(ConfigError::new(field, format!("environment variable {var} is not set"))),
    }
}

fn build_provider(
    i: usize,
    p: RawProvider,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(JwtProvider, Option<RemoteJwks>), ConfigError> {
    let at = |f: &str| format!("jwt.providers[{i}].{f}");
    if p.issuer.is_empty() {
        return Err(ConfigError::new(at("issuer"), "must not be empty"));
    }
    let (keys, remote) = match (&p.jwks, &p.jwks_env, p.remote_jwks) {
        (None, None, Some(r)) => (Jwks::default(), Some(check_remote_jwks(r, &at("remote_jwks"))?)),
        (Some(_), Some(_), _) => return Err(ConfigError::new(at("jwks"), "set either jwks or jwks_env, not both")),
        (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {
            return Err(ConfigError::new(at("remote_jwks"), "set either remote_jwks or jwks/jwks_env, not both"))
        }
        (None, None, None) => {
            return Err(ConfigError::new(at("jwks"), "one of jwks, jwks_env or remote_jwks is required"))
        }
        (Some(inline), None, None) => (Jwks::parse(inline).map_err(|m| ConfigError::new(at("jwks"), m))?, None),
        (None, Some(var), None) => {
            let json = read_env(env, var, &at("jwks_env"))?;
            (Jwks::parse(&json).map_err(|m| ConfigError::new(at("jwks_env"), m))?, None)
        }
    };
    if p.user_claim.is_empty() {
        return Err(ConfigError::new(at("user_claim"), "must not be empty"));
    }
    if p.groups_claim.is_empty() {
        return Err(ConfigError::new(at("groups_claim"), "must not be empty"));
    }
    if p.clock_skew_seconds > 3600 {
        return Err(ConfigError::new(at("clock_skew_seconds"), "must be at most 3600"));
    }
    let provider = JwtProvider {
        issuer: p.issuer,
        audiences: p.audiences,
        authorized_parties: p.authorized_parties,
        keys,
        user_claim: p.user_claim,
        groups_claim: p.groups_claim,
        clock_skew_seconds: p.clock_skew_seconds,
        require_exp: p.require_exp,
    };
    Ok((provider, remote))
}

fn check_remote_jwks(r: RawRemoteJwks, at: &str) -> Result<RemoteJwks, ConfigError> {
    let field = |f: &str| format!("{at}.{f}");
    if r.cluster.is_empty() {
        return Err(ConfigError::new(field("cluster"), "must not be empty"));
    }
    if r.authority.is_empty() {
        return Err(ConfigError::new(field("authority"), "must not be empty"));
    }
    if !r.path.starts_with('/') {
        return Err(ConfigError::new(field("path"), "must start with /"));
    }
    let ranges: [(&str, u64, u64, u64); 5] = [
        ("refresh_seconds", r.refresh_seconds, 1, 86_400),
        ("timeout_ms", r.timeout_ms, 1, 60_000),
        ("max_age_seconds", r.max_age_seconds, 1, 30 * 86_400),
        ("kid_refetch_min_interval_ms", r.kid_refetch_min_interval_ms, 0, 86_400_000),
        ("wait_ms", r.wait_ms, 0, 60_000),
    ];
    for (name, value, min, max) in ranges {
        if !(min..=max).contains(&value) {
            return Err(ConfigError::new(field(name), format!("must be {min} to {max}")));
        }
    }
    if r.max_age_seconds < r.refresh_seconds {
        return Err(ConfigError::new(field("max_age_seconds"), "must be at least refresh_seconds"));
    }
    Ok(RemoteJwks {
        cluster: r.cluster,
        authority: r.authority,
        path: r.path,
        refresh_seconds: r.refresh_seconds,
        timeout_ms: r.timeout_ms,
        max_age_seconds: r.max_age_seconds,
        kid_refetch_min_interval_ms: r.kid_refetch_min_interval_ms,
        wait_ms: r.wait_ms,
    })
}

/// Header names are sent lowercase by Envoy; refuse anything that is not a plain token.
fn check_header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let lower = name.to_ascii_lowercase();
    let valid =
        !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        return Err(ConfigError::new(field, "must be a valid HTTP header name"));
    }
    const RESERVED: [&str; 6] =
        ["host", "authorization", "content-length", "content-type", "transfer-encoding", "connection"];
    if RESERVED.contains(&lower.as_str()) {
        return Err(ConfigError::new(field, format!("`{lower}` is reserved")));
    }
    Ok(lower)
}

fn check_usage(u: RawUsage, env: &dyn Fn(&str) -> Option<String>) -> Result<UsageSettings, ConfigError> {
    let fail = |f: &str, m: &str| Err(ConfigError::new(format!("usage.{f}"), m.to_string()));
    if u.cluster.trim().is_empty() {
        return fail("cluster", "must name the Envoy cluster of the usage-tracking service");
    }
    if u.authority.trim().is_empty() {
        return fail("authority", "must not be empty");
    }
    if !u.path.starts_with('/') {
        return fail("path", "must start with '/'");
    }
    if !(1..=60_000).contains(&u.timeout_ms) {
        return fail("timeout_ms", "must be between 1 and 60000");
    }
    if !(10..=60_000).contains(&u.flush_interval_ms) {
        return fail("flush_interval_ms", "must be between 10 and 60000");
    }
    if !(1..=10_000).contains(&u.max_batch) {
        return fail("max_batch", "must be between 1 and 10000");
    }
    if !(4096..=(16 << 20)).contains(&u.max_batch_bytes) {
        return fail("max_batch_bytes", "must be between 4096 and 16777216");
    }
    if !(1..=1_000_000).contains(&u.max_queue) {
        return fail("max_queue", "must be between 1 and 1000000");
    }
    if u.max_queue < u.max_batch {
        return fail("max_queue", "must be at least max_batch");
    }
    if !(1..=1000).contains(&u.max_attempts) {
        return fail("max_attempts", "must be between 1 and 1000");
    }
    let authorization = u.token_env.as_deref().map(|var| bearer(env, var, "usage.token_env")).transpose()?;
    Ok(UsageSettings {
        cluster: u.cluster,
        authority: u.authority,
        path: u.path,
        timeout_ms: u.timeout_ms,
        flush_interval_ms: u.flush_interval_ms,
        max_batch: u.max_batch,
        max_batch_bytes: u.max_batch_bytes,
        max_queue: u.max_queue,
        max_attempts: u.max_attempts,
        inject_include_usage: u.inject_include_usage,
        authorization,
    })
}

#[cfg(test)]
mod tests {
    // Under wasm-bindgen-test the same tests run compiled to wasm32 (see `make test-wasm`).
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const DIGEST: &str = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"; // sha256("password")
    const JWKS: &str =
        r#"{"keys":[{"kty":"oct","kid":"dev-key","alg":"HS256","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}]}"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(json: &str) -> Result<Settings, ConfigError> {
        Settings::parse(json.as_bytes(), &no_env)
    }

    #[test]
    fn empty_config_has_defaults_and_denies_everything() {
        for json in ["", "  ", "{}"] {
            let s = parse(json).unwrap();
            assert!(s.keys.is_empty());
            assert!(s.jwt.is_empty());
            assert_eq!(s.sources, default_sources());
            assert_eq!(s.identity_headers.user, "x-tollgate-user");
            assert_eq!(s.identity_headers.groups, "x-tollgate-groups");
            assert!(!s.forward_credentials);
            assert!(s.usage.is_none());
        }
    }

    #[test]
    fn full_config_parses() {
        let json = format!(
            r#"{{"api_keys":{{"keys":[{{"sha256":"{DIGEST}","user":"mittens","groups":["premium"]}}]}},
               "jwt":{{"providers":[{{"issuer":"dev","jwks":{jwks}}}]}},
               "authorization":{{"allowed_groups":["free","premium"]}},
               "identity_headers":{{"user":"X-User","groups":"x-groups"}},
               "forward_credentials":true,
               "usage":{{"cluster":"tracker"}}}}"#,
            jwks = serde_json::to_string(JWKS).unwrap()
        );
        let s = parse(&json).unwrap();
        assert_eq!(s.keys.len(), 1);
        assert!(!s.jwt.is_empty());
        assert_eq!(s.allowed_groups, vec!["free", "premium"]);
        assert_eq!(s.identity_headers.user, "x-user");
        assert!(s.forward_credentials);
        let u = s.usage.unwrap();
        assert_eq!((u.authority.as_str(), u.path.as_str(), u.timeout_ms), ("usage-tracking", "/track", 1000));
        assert_eq!((u.flush_interval_ms, u.max_batch, u.max_queue), (500, 500, 10_000));
        assert!(u.inject_include_usage);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"api_key":{}}"#, "api_key"),
            (r#"{"api_keys":{"keyz":[]}}"#, "api_keys.keyz"),
            (r#"{"api_keys":{"keys":[{"sha256":"abc","user":"u"}]}}"#, "api_keys.keys[0].sha256"),
            (r#"{"api_keys":{"keys":[{"sha256":1,"user":"u"}]}}"#, "api_keys.keys[0].sha256"),
            (r#"{"api_keys":{"keys_env":"NOPE"}}"#, "api_keys.keys_env"),
            (r#"{"api_keys":{"remote":{}}}"#, "api_keys.remote.cluster"),
            (r#"{"api_keys":{"remote":{"cluster":"c","ttl_seconds":0}}}"#, "api_keys.remote.ttl_seconds"),
            (r#"{"api_keys":{"remote":{"cluster":"c","path":"resolve"}}}"#, "api_keys.remote.path"),
            (r#"{"api_keys":{"remote":{"cluster":"c","max_in_flight":0}}}"#, "api_keys.remote.max_in_flight"),
            (r#"{"api_keys":{"remote":{"cluster":"c","token_env":"NOPE"}}}"#, "api_keys.remote.token_env"),
            (r#"{"api_keys":{"remote":{"cluster":"c","ttl":5}}}"#, "api_keys.remote.ttl"),
            (r#"{"jwt":{"providers":[{"issuer":"dev"}]}}"#, "jwt.providers[0].jwks"),
            (r#"{"jwt":{"providers":[{"issuer":"dev","jwks":"{}"}]}}"#, "jwt.providers[0].jwks"),
            (r#"{"jwt":{"providers":[{"issuer":"","jwks":"{}"}]}}"#, "jwt.providers[0].issuer"),
            (r#"{"jwt":{"providers":[{"issuer":"d","jwks_env":"NOPE"}]}}"#, "jwt.providers[0].jwks_env"),
            (
                r#"{"jwt":{"providers":[{"issuer":"d","remote_jwks":{"cluster":"c","authority":"a"}}]}}"#,
                "jwt.providers[0].remote_jwks",
            ),
            (
                r#"{"jwt":{"providers":[{"issuer":"d","remote_jwks":{"cluster":"","authority":"a","path":"/k"}}]}}"#,
                "jwt.providers[0].remote_jwks.cluster",
            ),
            (
                r#"{"jwt":{"providers":[{"issuer":"d","remote_jwks":{"cluster":"c","authority":"a","path":"k"}}]}}"#,
                "jwt.providers[0].remote_jwks.path",
            ),
            (
                r#"{"jwt":{"providers":[{"issuer":"d","remote_jwks":{"cluster":"c","authority":"a","path":"/k","refresh_seconds":0}}]}}"#,
                "jwt.providers[0].remote_jwks.refresh_seconds",
            ),
            (
                r#"{"jwt":{"providers":[{"issuer":"d","remote_jwks":{"cluster":"c","authority":"a","path":"/k","max_age_seconds":10}}]}}"#,
                "jwt.providers[0].remote_jwks.max_age_seconds",
            ),
            (
                r#"{"jwt":{"providers":[{"issuer":"d","remote_jwks":{"cluster":"c","authority":"a","path":"/k","ttl":1}}]}}"#,
                "jwt.providers[0].remote_jwks.ttl",
            ),
            (
                r#"{"jwt":{"providers":[{"issuer":"d","jwks":"{}","remote_jwks":{"cluster":"c","authority":"a","path":"/k"}}]}}"#,
                "jwt.providers[0].remote_jwks",
            ),
            (r#"{"authorization":{"allowed_groups":["a b"]}}"#, "authorization.allowed_groups[0]"),
            (r#"{"authorization":{"allowed_groups":"a"}}"#, "authorization.allowed_groups"),
            (r#"{"identity_headers":{"user":"bad header"}}"#, "identity_headers.user"),
            (r#"{"identity_headers":{"user":"authorization"}}"#, "identity_headers.user"),
            (r#"{"identity_headers":{"user":"x-a","groups":"x-a"}}"#, "identity_headers.groups"),
            (r#"{"identity_headers":{"user":"x-api-key"}}"#, "identity_headers"),
            (r#"{"forward_credentials":"yes"}"#, "forward_credentials"),
            (r#"{"limits":{"users":{"u":{"requests_per_minute":0}}}}"#, "limits.users.u.requests_per_minute"),
            (r#"{"limits":{"groups":{"g":{"requests_per_fortnight":1}}}}"#, "limits.groups.g.requests_per_fortnight"),
            (r#"{"limits":{"scope":"planet"}}"#, "limits.scope"),
            (r#"{"limits":{"scope":"global"}}"#, "limits.scope"),
            (r#"{"limits":{"sync_interval_ms":500}}"#, "limits.sync_interval_ms"),
            (r#"{"limits":{"scope":"global","sync_interval_ms":5}}"#, "limits.sync_interval_ms"),
            (r#"{"limits":{"scope":"global","acquire_timeout_ms":0}}"#, "limits.acquire_timeout_ms"),
            (
                r#"{"limits":{"scope":"global","users":{"u":{"requests_per_minute":5,"burst":9}}}}"#,
                "limits.users.u.burst",
            ),
            (r#"{"usage":{}}"#, "usage"),
            (r#"{"usage":{"cluster":""}}"#, "usage.cluster"),
            (r#"{"usage":{"cluster":"c","path":"track"}}"#, "usage.path"),
            (r#"{"usage":{"cluster":"c","timeout_ms":0}}"#, "usage.timeout_ms"),
            (r#"{"usage":{"cluster":"c","max_batch":0}}"#, "usage.max_batch"),
            (r#"{"usage":{"cluster":"c","max_batch_bytes":100}}"#, "usage.max_batch_bytes"),
            (r#"{"usage":{"cluster":"c","max_batch":100,"max_queue":10}}"#, "usage.max_queue"),
            (r#"{"usage":{"cluster":"c","flush_interval_ms":-1}}"#, "usage.flush_interval_ms"),
            (r#"{"usage":{"cluster":"c","bogus":1}}"#, "usage.bogus"),
            ("[]", ""),
            ("{", ""),
        ];
        for (json, field) in cases {
            let err = parse(json).err().unwrap_or_else(|| panic!("accepted {json}"));
            assert_eq!(&err.field, field, "{json}: {err}");
            assert!(err.to_string().starts_with("invalid plugin configuration"), "{err}");
        }
    }

    #[test]
    fn unknown_field_error_names_it() {
        let err = parse(r#"{"authorization":{"allowed_group":["a"]}}"#).err().unwrap();
        assert_eq!(err.field, "authorization.allowed_group");
        assert!(err.message.contains("unknown field"), "{err}");
    }

    #[test]
    fn keys_and_jwks_from_env() {
        let env = |name: &str| match name {
            "KEYS" => Some(format!(r#"[{{"sha256":"{DIGEST}","user":"env-user"}}]"#)),
            "JWKS" => Some(JWKS.to_string()),
            "BADKEYS" => Some(r#"[{"sha256":"zz","user":"x"}]"#.to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let s = Settings::parse(
            br#"{"api_keys":{"keys_env":"KEYS"},"jwt":{"providers":[{"issuer":"dev","jwks_env":"JWKS"}]}}"#,
            &env,
        )
        .unwrap();
        assert_eq!(s.keys.lookup("password").map(|i| i.user.as_str()), Some("env-user"));
        assert!(!s.jwt.is_empty());

        let err = Settings::parse(br#"{"api_keys":{"keys_env":"BADKEYS"}}"#, &env).err().unwrap();
        assert_eq!(err.field, "api_keys.keys_env[0].sha256");
        let err = Settings::parse(br#"{"api_keys":{"keys_env":"EMPTY"}}"#, &env).err().unwrap();
        assert_eq!(err.field, "api_keys.keys_env");
    }

    #[test]
    fn metering_usage_token_and_preflight_settings() {
        let env = |name: &str| match name {
            "TOKEN" => Some(" s3cret-token\n".to_string()),
            "SPACE" => Some("a b".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let s = parse("{}").unwrap();
        assert_eq!(
            s.metering,
            Metering { inject_include_usage: true, default_max_tokens: 1024, prompt_bytes_per_token: 4 }
        );
        assert_eq!(s.cors_preflight, CorsPreflight::Deny);
        let s = Settings::parse(
            br#"{"usage":{"cluster":"c","token_env":"TOKEN","inject_include_usage":false},
                 "metering":{"default_max_tokens":7,"prompt_bytes_per_token":3},"cors_preflight":"allow"}"#,
            &env,
        )
        .unwrap();
        let u = s.usage.as_ref().unwrap();
        assert_eq!(u.authorization.as_deref(), Some("Bearer s3cret-token"));
        assert!(u.report_headers().contains(&("authorization", "Bearer s3cret-token")));
        assert_eq!(
            s.metering,
            Metering { inject_include_usage: false, default_max_tokens: 7, prompt_bytes_per_token: 3 }
        );
        assert_eq!(s.cors_preflight, CorsPreflight::Allow);
        assert!(!parse(r#"{"usage":{"cluster":"c"}}"#)
            .unwrap()
            .usage
            .unwrap()
            .report_headers()
            .iter()
            .any(|h| h.0 == "authorization"));
        // (config, field named in the error)
        let bad = [
            (r#"{"usage":{"cluster":"c","token_env":"NOPE"}}"#, "usage.token_env"),
            (r#"{"usage":{"cluster":"c","token_env":"EMPTY"}}"#, "usage.token_env"),
            (r#"{"usage":{"cluster":"c","token_env":""}}"#, "usage.token_env"),
            (r#"{"usage":{"cluster":"c","token_env":"SPACE"}}"#, "usage.token_env"),
            (r#"{"metering":{"default_max_tokens":0}}"#, "metering.default_max_tokens"),
            (r#"{"metering":{"prompt_bytes_per_token":0}}"#, "metering.prompt_bytes_per_token"),
            (r#"{"metering":{"bogus":1}}"#, "metering.bogus"),
            (r#"{"cors_preflight":"yes"}"#, "cors_preflight"),
            (r#"{"limits":{"on_contention":"never"}}"#, "limits.on_contention"),
        ];
        for (json, field) in bad {
            let err = Settings::parse(json.as_bytes(), &env).err().unwrap_or_else(|| panic!("accepted {json}"));
            assert_eq!(err.field, field, "{json}: {err}");
            assert!(!err.to_string().contains("s3cret") && !err.to_string().contains("a b"), "{err}");
        }
    }

    #[test]
    fn duplicate_issuers_are_refused() {
        let jwks = serde_json::to_string(JWKS).unwrap();
        let json = format!(
            r#"{{"jwt":{{"providers":[{{"issuer":"dev","jwks":{jwks}}},{{"issuer":"other","jwks":{jwks}}},{{"issuer":"dev","jwks":{jwks}}}]}}}}"#
        );
        let err = parse(&json).err().unwrap();
        assert_eq!(err.field, "jwt.providers[2].issuer");
        assert!(err.message.contains("duplicate issuer"), "{err}");
    }

    /// serde quotes the offending value; a secret pasted into the wrong field must not
    /// reach the log (every case is a secret in a place that refuses it).
    #[test]
    fn serde_errors_never_echo_values() {
        let secret = "sk-live-SECRETVALUE";
        let env = |name: &str| (name == "KEYS").then(|| format!(r#"[{{"sha256":["{secret}"],"user":"u"}}]"#));
        let cases = [
            format!(r#"{{"forward_credentials":"{secret}"}}"#),
            format!(r#"{{"api_keys":{{"keys":"{secret}"}}}}"#),
            format!(r#"{{"api_keys":{{"sources":[{{"header":1,"prefix":"{secret}"}}]}}}}"#),
            format!(r#"{{"limits":{{"users":{{"u":{{"requests_per_minute":"{secret}"}}}}}}}}"#),
            format!(r#"{{"limits":{{"on_contention":"{secret}"}}}}"#),
            format!(r#"{{"cors_preflight":"{secret}"}}"#),
            format!(r#"{{"usage":{{"cluster":"c","timeout_ms":"{secret}"}}}}"#),
            format!(r#"{{"jwt":{{"providers":[{{"issuer":"d","jwks":{{"k":"{secret}"}}}}]}}}}"#),
            r#"{"api_keys":{"keys_env":"KEYS"}}"#.to_string(),
        ];
        for json in &cases {
            let err = Settings::parse(json.as_bytes(), &env).err().unwrap_or_else(|| panic!("accepted {json}"));
            assert!(!err.to_string().contains("SECRETVALUE"), "{json}: {err}");
            assert!(!err.field.is_empty() || json.starts_with('['), "{json}: {err}");
        }
        // What serde says besides the value stays.
        assert_eq!(
            redact_values(r#"invalid type: string "sk-abc", expected a boolean"#),
            r#"invalid type: string "…", expected a boolean"#
        );
        assert_eq!(
            redact_values("unknown variant `sk-abc`, expected `deny` or `allow`"),
            "unknown variant `…`, expected `deny` or `allow`"
        );
        assert_eq!(redact_values("unknown field `bogus`, expected `a`"), "unknown field `bogus`, expected `a`");
    }

    #[test]
    fn errors_never_echo_secrets() {
        let secret_jwks = r#"{"keys":[{"kty":"oct","k":"!!not-base64-SECRETVALUE"}]}"#;
        let json = format!(
            r#"{{"jwt":{{"providers":[{{"issuer":"d","jwks":{}}}]}}}}"#,
            serde_json::to_string(secret_jwks).unwrap()
        );
        let err = parse(&json).err().unwrap();
        assert!(!err.to_string().contains("SECRETVALUE"), "{err}");
    }

    #[test]
    fn remote_jwks_defaults() {
        let s = Settings::parse(
            br#"{"jwt":{"providers":[{"issuer":"https://kc/realms/llm","remote_jwks":{"cluster":"outbound|443||kc","authority":"kc","path":"/certs"}}]}}"#,
            &|_| None,
        )
        .unwrap();
        let r = s.jwt_remote[0].as_ref().unwrap();
        assert_eq!(
            (r.refresh_seconds, r.timeout_ms, r.max_age_seconds, r.kid_refetch_min_interval_ms, r.wait_ms),
            (300, 2000, 86_400, 30_000, 3000)
        );
        assert!(!s.jwt.is_empty());
    }
}
