//! `tollgate render`: turns a users file (users, their groups and API keys, the JWT
//! issuer) into the generated half of the Istio bundle — the credentials `Secret` and
//! the WasmPlugin's `pluginConfig` — so nobody copies key digests by hand. Plaintext
//! keys are hashed here and never written out. The result is checked with the filter's
//! own config parser (the code Envoy runs in `on_configure`), with the environment the
//! gateway pod gets from the Secret, before anything is written.
//!
//! `limits` go into the `pluginConfig` as they are written (the filter's `limits`
//! section, README "Limits"; `scope: global` for limits across the gateway's replicas),
//! checked by the same parser.
//!
//! `managed_keys: true` adds `api_keys.remote` (`{}`: every default): keys created at run
//! time with `tollgate key create` are resolved from the tracker the `usage` section
//! names, with the same ingest token (`../shared/design.md` §10).

use crate::stack::INGEST_TOKEN_ENV;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};

/// The WasmPlugin's `metadata.name` in istio/wasmplugin.yaml (the patch targets it).
pub const PLUGIN_NAME: &str = "tollgate";
/// Secret keys, which are also the env var names of the gateway's istio-proxy container
/// and of the Wasm VM (`vmConfig.env` with `valueFrom: HOST`).
pub const KEYS_ENV: &str = "TOLLGATE_API_KEYS";
pub const JWKS_ENV: &str = "TOLLGATE_JWKS";
/// File names `--out-dir` writes, as the bundle's kustomization.yaml lists them.
pub const SECRET_FILE: &str = "secret.yaml";
pub const PATCH_FILE: &str = "wasmplugin-config.yaml";
/// Shortest plaintext key accepted: digests are public in the Secret or the WasmPlugin,
/// so a short key could be found by trying candidates against them.
pub const MIN_KEY_LEN: usize = 20;

#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The users file (YAML): users with their groups and keys, allowed groups, JWT issuer.
    #[arg(long)]
    pub users: PathBuf,
    /// Write secret.yaml and wasmplugin-config.yaml into this directory (istio/base in
    /// your copy of the bundle) instead of printing both documents.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Set the WasmPlugin's `url` (oci://REGISTRY/tollgate-filter:TAG).
    #[arg(long)]
    pub url: Option<String>,
    /// Set the WasmPlugin's `sha256`: the manifest digest `make oci` prints.
    #[arg(long)]
    pub sha256: Option<String>,
}

/// Where the key digests go. `secret`: in the Secret, read through `keys_env` (a key
/// change needs a gateway pod restart). `inline`: in `pluginConfig` (Istio pushes a
/// change live, no restart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStorage {
    #[default]
    Secret,
    Inline,
}

/// The users file. Unknown fields are refused, like the filter's own config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    /// Namespace of the Secret and (by default) of the tracker.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Name of the credentials Secret.
    #[serde(default = "default_secret")]
    pub secret: String,
    #[serde(default)]
    pub key_storage: KeyStorage,
    /// `authorization.allowed_groups`: empty lets any authenticated caller in.
    #[serde(default)]
    pub allowed_groups: Vec<String>,
    #[serde(default)]
    pub tracker: Tracker,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub jwt: Option<Jwt>,
    /// The filter's `limits` section, as it is.
    #[serde(default)]
    pub limits: Option<serde_json::Value>,
    /// Also accept managed keys (`tollgate key create`), resolved from the tracker:
    /// `api_keys.remote` with its defaults (the usage cluster and token).
    #[serde(default)]
    pub managed_keys: bool,
}

fn default_namespace() -> String {
    "llm-d".into()
}
fn default_secret() -> String {
    "tollgate-credentials".into()
}

/// The usage-tracking Service the filter reports to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracker {
    #[serde(default = "default_tracker_service")]
    pub service: String,
    /// Defaults to the file's `namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default = "default_tracker_port")]
    pub port: u16,
}

fn default_tracker_service() -> String {
    "usage-tracking".into()
}
fn default_tracker_port() -> u16 {
    8080
}

impl Default for Tracker {
    fn default() -> Self {
        Self { service: default_tracker_service(), namespace: None, port: default_tracker_port() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
}

/// One API key: exactly one of the plaintext key, an env var of `tollgate render` that
/// holds it, or its digest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub key_env: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
}

/// The JWT issuer: exactly one of `jwks`, `jwks_file`, `hs256_secret`, `hs256_secret_env`
/// (the keys in the Secret) or `remote_jwks` (fetched from the IdP's `jwks_uri`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// `azp` values allowed (empty: not checked).
    #[serde(default)]
    pub authorized_parties: Vec<String>,
    /// The filter's `remote_jwks`, written as given (the filter checks it at load).
    #[serde(default)]
    pub remote_jwks: Option<Value>,
    #[serde(default)]
    pub jwks: Option<String>,
    /// Relative to the users file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Used as raw bytes, like `tollgate jwt --secret`.
    #[serde(default)]
    pub hs256_secret: Option<String>,
    #[serde(default)]
    pub hs256_secret_env: Option<String>,
    /// `kid` of the HS256 key (with `hs256_secret*`).
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub user_claim: Option<String>,
    #[serde(default)]
    pub groups_claim: Option<String>,
    #[serde(default)]
    pub require_exp: Option<bool>,
    #[serde(default)]
    pub clock_skew_seconds: Option<u64>,
}

/// What `render` produces.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The credentials Secret (`stringData`).
    pub secret: Value,
    /// A WasmPlugin patch: `pluginConfig`, `vmConfig.env` and, when given, `url`/`sha256`.
    pub patch: Value,
    /// The env the gateway's Wasm VM sees (Secret key = env var name).
    pub vm_env: BTreeMap<String, String>,
    /// Warnings for the operator (e.g. a user who would always get 403).
    pub warnings: Vec<String>,
}

impl Rendered {
    pub fn plugin_config(&self) -> &Value {
        self.patch.pointer("/spec/pluginConfig").unwrap_or(&Value::Null)
    }
}

/// Image settings for the patch.
#[derive(Debug, Clone, Default)]
pub struct Image {
    pub url: Option<String>,
    pub sha256: Option<String>,
}

pub fn parse_users(text: &str) -> anyhow::Result<UsersFile> {
    serde_norway::from_str(text).map_err(|e| anyhow::anyhow!("users file: {e}"))
}

/// Istio's name for the outbound cluster of a Service port.
pub fn istio_cluster(service: &str, namespace: &str, port: u16) -> String {
    format!("outbound|{port}||{service}.{namespace}.svc.cluster.local")
}

fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains(',') || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{what} `{name}`: must be non-empty, without commas, whitespace or control characters");
    }
    Ok(())
}

fn check_dns_label(what: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("{what} `{name}` is not a valid Kubernetes name (lowercase letters, digits, '-')");
    }
    Ok(())
}

fn key_digest(at: &str, spec: &KeySpec, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    let plaintext = |key: &str, source: &str| -> anyhow::Result<String> {
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("{at}: the key {source} contains whitespace; a header value cannot carry it");
        }
        if key.chars().count() < MIN_KEY_LEN {
            bail!(
                "{at}: the key {source} is shorter than {MIN_KEY_LEN} characters; its digest would be guessable \
                 (make one with `tollgate key new`)"
            );
        }
        Ok(tollgate_filter::keys::sha256_hex(key))
    };
    match (&spec.key, &spec.key_env, &spec.sha256) {
        (Some(k), None, None) => plaintext(k, "in `key`"),
        (None, Some(var), None) => match env(var) {
            Some(k) => plaintext(&k, &format!("in ${var}")),
            None => bail!("{at}.key_env: environment variable {var} is not set"),
        },
        (None, None, Some(d)) => {
            let d = d.to_ascii_lowercase();
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("{at}.sha256: must be 64 hex characters (the SHA-256 of the key)");
            }
            Ok(d)
        }
        _ => bail!("{at}: set exactly one of key, key_env, sha256"),
    }
}

fn jwks_value(jwt: &Jwt, base_dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    let hs256 = |secret: &str| -> anyhow::Result<String> {
        if secret.len() < 32 {
            bail!("jwt: the HS256 secret must be at least 32 bytes");
        }
        Ok(crate::dev::jwks(secret.as_bytes(), jwt.kid.as_deref()))
    };
    let text = match (&jwt.jwks, &jwt.jwks_file, &jwt.hs256_secret, &jwt.hs256_secret_env) {
        _ if jwt.remote_jwks.is_some() => {
            if jwt.jwks.is_some()
                || jwt.jwks_file.is_some()
                || jwt.hs256_secret.is_some()
                || jwt.hs256_secret_env.is_some()
            {
                bail!("jwt.remote_jwks: set either remote_jwks or jwks / jwks_file / hs256_secret*, not both");
            }
            return Ok(r#"{"keys":[]}"#.to_string());
        }
        (Some(j), None, None, None) => j.clone(),
        (None, Some(f), None, None) => {
            let path = base_dir.join(f);
            std::fs::read_to_string(&path).with_context(|| format!("jwt.jwks_file: read {}", path.display()))?
        }
        (None, None, Some(s), None) => hs256(s)?,
        (None, None, None, Some(var)) => match env(var) {
            Some(s) => hs256(&s)?,
            None => bail!("jwt.hs256_secret_env: environment variable {var} is not set"),
        },
        _ => bail!("jwt: set exactly one of jwks, jwks_file, hs256_secret, hs256_secret_env, remote_jwks"),
    };
    if jwt.kid.is_some() && (jwt.jwks.is_some() || jwt.jwks_file.is_some()) {
        bail!("jwt.kid: only with hs256_secret / hs256_secret_env (a JWKS names its own kids)");
    }
    let value: Value = serde_json::from_str(&text).context("jwt: the JWKS is not JSON")?;
    Ok(value.to_string())
}

/// Renders the Secret and the WasmPlugin patch. `base_dir` resolves `jwt.jwks_file`;
/// `env` is the environment of `tollgate render` (for `key_env`, `hs256_secret_env`).
pub fn render(
    file: &UsersFile,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    image: &Image,
) -> anyhow::Result<Rendered> {
    check_dns_label("namespace", &file.namespace)?;
    check_dns_label("secret", &file.secret)?;
    check_dns_label("tracker.service", &file.tracker.service)?;
    if file.tracker.port == 0 {
        bail!("tracker.port: must be a port number");
    }
    let tracker_ns = file.tracker.namespace.as_deref().unwrap_or(&file.namespace);
    check_dns_label("tracker.namespace", tracker_ns)?;
    for g in &file.allowed_groups {
        check_name("allowed_groups: group", g)?;
    }
    if file.users.is_empty() && file.jwt.is_none() && !file.managed_keys {
        bail!("no users, no jwt and no managed_keys: nothing could authenticate, every request would get 401");
    }

    let mut warnings = Vec::new();
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    for (i, u) in file.users.iter().enumerate() {
        let at = format!("users[{i}]");
        check_name(&format!("{at}.user"), &u.user)?;
        for g in &u.groups {
            check_name(&format!("{at}.groups: group"), g)?;
        }
        if u.keys.is_empty() {
            bail!("{at} ({}): no keys", u.user);
        }
        if !file.allowed_groups.is_empty() && !u.groups.iter().any(|g| file.allowed_groups.contains(g)) {
            warnings.push(format!(
                "user {} is in none of allowed_groups {:?}: every request will get 403",
                u.user, file.allowed_groups
            ));
        }
        for (j, k) in u.keys.iter().enumerate() {
            let digest = key_digest(&format!("{at}.keys[{j}]"), k, env)?;
            if !seen.insert(digest.clone()) {
                bail!("{at}.keys[{j}] ({}): the same key is listed twice", u.user);
            }
            entries.push(json!({"sha256": digest, "user": u.user, "groups": u.groups}));
        }
    }

    let jwks = file.jwt.as_ref().map(|j| jwks_value(j, base_dir, env)).transpose()?;
    // One entry per line: readable, and a key change is a one-line diff.
    let keys_text = if entries.is_empty() {
        "[]".to_string()
    } else {
        let lines: Vec<String> = entries.iter().map(Value::to_string).collect();
        format!("[\n{}\n]", lines.join(",\n"))
    };
    let mut vm_env = BTreeMap::new();
    vm_env.insert(KEYS_ENV.to_string(), keys_text);
    vm_env.insert(JWKS_ENV.to_string(), jwks.unwrap_or_else(|| r#"{"keys":[]}"#.to_string()));

    let mut config = serde_json::Map::new();
    let mut env_names = Vec::new();
    let mut api_keys = serde_json::Map::new();
    if !entries.is_empty() {
        match file.key_storage {
            KeyStorage::Secret => {
                env_names.push(KEYS_ENV);
                api_keys.insert("keys_env".into(), json!(KEYS_ENV));
            }
            KeyStorage::Inline => {
                api_keys.insert("keys".into(), json!(entries));
            }
        }
    }
    if file.managed_keys {
        // The cluster and the token default to the usage section's (below).
        api_keys.insert("remote".into(), json!({}));
    }
    if !api_keys.is_empty() {
        config.insert("api_keys".into(), Value::Object(api_keys));
    }
    if let Some(jwt) = &file.jwt {
        let mut p = json!({"issuer": jwt.issuer, "audiences": jwt.audiences});
        if let Some(obj) = p.as_object_mut() {
            match &jwt.remote_jwks {
                Some(remote) => {
                    obj.insert("remote_jwks".into(), remote.clone());
                }
                None => {
                    env_names.push(JWKS_ENV);
                    obj.insert("jwks_env".into(), json!(JWKS_ENV));
                }
            }
            if !jwt.authorized_parties.is_empty() {
                obj.insert("authorized_parties".into(), json!(jwt.authorized_parties));
            }
            if let Some(c) = &jwt.user_claim {
                obj.insert("user_claim".into(), json!(c));
            }
            if let Some(c) = &jwt.groups_claim {
                obj.insert("groups_claim".into(), json!(c));
            }
            if let Some(r) = jwt.require_exp {
                obj.insert("require_exp".into(), json!(r));
            }
            if let Some(s) = jwt.clock_skew_seconds {
                obj.insert("clock_skew_seconds".into(), json!(s));
            }
        }
        config.insert("jwt".into(), json!({"providers": [p]}));
    }
    if !file.allowed_groups.is_empty() {
        config.insert("authorization".into(), json!({"allowed_groups": file.allowed_groups}));
    }
    if let Some(limits) = &file.limits {
        config.insert("limits".into(), limits.clone());
    }
    // Only the gateways may report usage: the tracker's ingest token, which the gateway
    // pod gets from the tracker's Secret (`usage-tracking-tokens`, not rendered here).
    config.insert(
        "usage".into(),
        json!({"cluster": istio_cluster(&file.tracker.service, tracker_ns, file.tracker.port),
               "token_env": INGEST_TOKEN_ENV}),
    );
    env_names.push(INGEST_TOKEN_ENV);
    let config = Value::Object(config);

    // The same check Envoy's `on_configure` runs, with the env the gateway pod gets.
    let lookup = |name: &str| match name {
        INGEST_TOKEN_ENV => Some("set-from-the-tracker-secret".to_string()),
        _ if env_names.contains(&name) => vm_env.get(name).cloned(),
        _ => None,
    };
    tollgate_filter::config::Settings::parse(config.to_string().as_bytes(), &lookup)
        .map_err(|e| anyhow::anyhow!("the filter would refuse the rendered config: {e}"))?;

    let mut spec = serde_json::Map::new();
    if let Some(url) = &image.url {
        if !["oci://", "https://", "http://", "file://"].iter().any(|s| url.starts_with(s)) {
            bail!("--url: must start with oci://, https://, http:// or file://");
        }
        spec.insert("url".into(), json!(url));
    }
    if let Some(d) = &image.sha256 {
        let d = d.trim().trim_start_matches("sha256:").to_ascii_lowercase();
        if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("--sha256: must be the 64 hex characters of the manifest digest");
        }
        spec.insert("sha256".into(), json!(d));
    }
    spec.insert("pluginConfig".into(), config);
    let env_list: Vec<Value> = env_names.iter().map(|n| json!({"name": n, "valueFrom": "HOST"})).collect();
    spec.insert("vmConfig".into(), json!({"env": env_list}));
    let patch = json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": PLUGIN_NAME},
        "spec": spec,
    });
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": file.secret, "namespace": file.namespace,
                     "labels": {"app.kubernetes.io/part-of": "tollgate"}},
        "type": "Opaque",
        "stringData": vm_env,
    });
    Ok(Rendered { secret, patch, vm_env, warnings })
}

const SECRET_HEADER: &str = "\
# Generated by `tollgate render --users …`: edit the users file and render again.
# The gateway's istio-proxy container gets these keys as env vars (istio/gateway-options.yaml,
# istio/gateway-patches/classic-ingress.yaml); the WasmPlugin copies them into the filter's
# VM (vmConfig.env, valueFrom: HOST). Only key digests are stored. A change here reaches
# the filter after the gateway pods restart.
";

const PATCH_HEADER: &str = "\
# Generated by `tollgate render --users …`: edit the users file and render again.
# Merged into wasmplugin.yaml by istio/base/kustomization.yaml. Istio pushes a change of
# pluginConfig to the running gateways (no restart).
";

/// The Secret as a YAML document, with its header comment.
pub fn secret_yaml(r: &Rendered) -> anyhow::Result<String> {
    Ok(format!("{SECRET_HEADER}{}", serde_norway::to_string(&r.secret)?))
}

/// The WasmPlugin patch as a YAML document, with its header comment.
pub fn patch_yaml(r: &Rendered) -> anyhow::Result<String> {
    Ok(format!("{PATCH_HEADER}{}", serde_norway::to_string(&r.patch)?))
}

/// `tollgate render`.
pub fn run(args: &RenderArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.users).with_context(|| format!("read {}", args.users.display()))?;
    let file = parse_users(&text).with_context(|| args.users.display().to_string())?;
    let base_dir = args.users.parent().unwrap_or_else(|| Path::new("."));
    let image = Image { url: args.url.clone(), sha256: args.sha256.clone() };
    let r = render(&file, base_dir, &|name| std::env::var(name).ok(), &image)
        .with_context(|| args.users.display().to_string())?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let (secret, patch) = (secret_yaml(&r)?, patch_yaml(&r)?);
    match &args.out_dir {
        Some(dir) => {
            for (name, body) in [(SECRET_FILE, &secret), (PATCH_FILE, &patch)] {
                let path = dir.join(name);
                std::fs::write(&path, body).with_context(|| format!("write {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            let users = file.users.len();
            let keys: usize = file.users.iter().map(|u| u.keys.len()).sum();
            eprintln!(
                "{users} users, {keys} keys ({}), jwt: {}, managed keys: {}",
                match file.key_storage {
                    KeyStorage::Secret => "in the Secret: restart the gateway pods after a change",
                    KeyStorage::Inline => "inline in pluginConfig: pushed live by Istio",
                },
                file.jwt.as_ref().map_or("none", |j| j.issuer.as_str()),
                if file.managed_keys { "resolved from the tracker" } else { "off" },
            );
        }
        None => print!("{secret}---\n{patch}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "tg-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &str = "tg-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn go(yaml: &str) -> anyhow::Result<Rendered> {
        render(&parse_users(yaml)?, Path::new("."), &no_env, &Image::default())
    }

    fn err(yaml: &str) -> String {
        format!("{:#}", go(yaml).expect_err("should be refused"))
    }

    #[test]
    fn secret_mode_puts_digests_in_the_secret_only() {
        let r = go(&format!(
            "users:\n- user: mittens\n  groups: [premium]\n  keys: [{{key: {KEY_A}}}]\n\
             jwt: {{issuer: dev, hs256_secret: {SECRET}, kid: dev-key}}\n"
        ))
        .unwrap();
        let digest = tollgate_filter::keys::sha256_hex(KEY_A);
        let keys: Value = serde_json::from_str(&r.vm_env[KEYS_ENV]).unwrap();
        assert_eq!(keys, json!([{"sha256": digest, "user": "mittens", "groups": ["premium"]}]));
        assert_eq!(r.plugin_config()["api_keys"], json!({"keys_env": KEYS_ENV}));
        assert_eq!(r.plugin_config()["jwt"]["providers"][0]["jwks_env"], JWKS_ENV);
        assert_eq!(r.plugin_config()["usage"]["cluster"], "outbound|8080||usage-tracking.llm-d.svc.cluster.local");
        assert_eq!(r.patch["spec"]["vmConfig"]["env"][0], json!({"name": KEYS_ENV, "valueFrom": "HOST"}));
        assert_eq!(r.secret["stringData"][JWKS_ENV], crate::dev::jwks(SECRET.as_bytes(), Some("dev-key")));
        let all = format!("{}{}", secret_yaml(&r).unwrap(), patch_yaml(&r).unwrap());
        assert!(!all.contains(KEY_A) && !all.contains(SECRET), "a plaintext secret was written");
        assert!(all.contains(&digest));
    }

    #[test]
    fn inline_mode_puts_digests_in_the_plugin_config() {
        let r = go(&format!(
            "key_storage: inline\nallowed_groups: [premium]\nnamespace: gw\n\
             tracker: {{service: tracker, namespace: obs, port: 9000}}\n\
             users:\n- {{user: a, groups: [premium], keys: [{{key: {KEY_A}}}, {{sha256: {}}}]}}\n",
            tollgate_filter::keys::sha256_hex(KEY_B).to_uppercase()
        ))
        .unwrap();
        let keys = &r.plugin_config()["api_keys"]["keys"];
        assert_eq!(keys.as_array().unwrap().len(), 2);
        assert_eq!(keys[1]["sha256"], tollgate_filter::keys::sha256_hex(KEY_B));
        // Inline keys need no env; the ingest token always comes from the tracker's Secret.
        assert_eq!(r.patch["spec"]["vmConfig"]["env"], json!([{"name": INGEST_TOKEN_ENV, "valueFrom": "HOST"}]));
        assert_eq!(r.plugin_config()["usage"]["token_env"], INGEST_TOKEN_ENV);
        assert_eq!(r.plugin_config()["authorization"]["allowed_groups"], json!(["premium"]));
        assert_eq!(r.plugin_config()["usage"]["cluster"], "outbound|9000||tracker.obs.svc.cluster.local");
        assert_eq!(r.secret["metadata"]["namespace"], "gw");
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn keys_from_the_environment_and_image_settings() {
        let env = |n: &str| (n == "K").then(|| KEY_B.to_string());
        let file = parse_users("users: [{user: a, keys: [{key_env: K}]}]").unwrap();
        let image = Image {
            url: Some("oci://reg/tollgate-filter:1".into()),
            sha256: Some(format!("sha256:{}", "AB".repeat(32))),
        };
        let r = render(&file, Path::new("."), &env, &image).unwrap();
        assert!(r.vm_env[KEYS_ENV].contains(&tollgate_filter::keys::sha256_hex(KEY_B)));
        assert_eq!(r.patch["spec"]["url"], "oci://reg/tollgate-filter:1");
        assert_eq!(r.patch["spec"]["sha256"], "ab".repeat(32));
        let e = render(&file, Path::new("."), &no_env, &Image::default()).err().unwrap();
        assert!(format!("{e:#}").contains("K is not set"), "{e:#}");
    }

    /// `limits` reach the pluginConfig as written (global ones need the `usage` section
    /// render always writes).
    #[test]
    fn limits_are_rendered_as_written() {
        let r = go(&format!(
            "users: [{{user: a, groups: [free], keys: [{{key: {KEY_A}}}]}}]\n\
             limits: {{scope: global, groups: {{free: {{requests_per_hour: 100, tokens_per_day: 200000}}}}}}\n"
        ))
        .unwrap();
        let limits = &r.plugin_config()["limits"];
        assert_eq!(limits["scope"], "global");
        assert_eq!(limits["groups"]["free"], json!({"requests_per_hour": 100, "tokens_per_day": 200000}));
    }

    #[test]
    fn managed_keys_add_api_keys_remote_with_the_usage_defaults() {
        let users = format!("users: [{{user: a, groups: [free], keys: [{{key: {KEY_A}}}]}}]\n");
        let off = go(&users).unwrap();
        assert_eq!(off.plugin_config()["api_keys"], json!({"keys_env": KEYS_ENV}), "off by default");
        let on = go(&format!("{users}managed_keys: true\n")).unwrap();
        assert_eq!(on.plugin_config()["api_keys"], json!({"keys_env": KEYS_ENV, "remote": {}}));
        // Cluster and token: the usage section's (the filter's defaults), nothing new in the env.
        assert_eq!(on.plugin_config()["usage"], off.plugin_config()["usage"]);
        assert_eq!(on.patch["spec"]["vmConfig"], off.patch["spec"]["vmConfig"]);
        assert_eq!(on.secret, off.secret);
        let inline = go(&format!("{users}key_storage: inline\nmanaged_keys: true\n")).unwrap();
        assert_eq!(inline.plugin_config()["api_keys"]["remote"], json!({}));
        assert_eq!(inline.plugin_config()["api_keys"]["keys"].as_array().unwrap().len(), 1);
        assert!(go(&format!("{users}managed_keys: false\n")).unwrap().plugin_config()["api_keys"]
            .get("remote")
            .is_none());
        // Managed keys alone can authenticate: no users, no jwt.
        let alone = go("managed_keys: true\n").unwrap();
        assert_eq!(alone.plugin_config()["api_keys"], json!({"remote": {}}));
        assert_eq!(alone.patch["spec"]["vmConfig"]["env"], json!([{"name": INGEST_TOKEN_ENV, "valueFrom": "HOST"}]));
        assert!(err("managed_keys: yes please\n").contains("managed_keys"));
    }

    #[test]
    fn refusals_name_the_field() {
        let one = |extra: &str| format!("users: [{{user: a, keys: [{{key: {KEY_A}}}]}}]\n{extra}");
        for (yaml, want) in [
            (one("limits: {groups: {free: {requests_per_minute: 0}}}"), "limits.groups.free.requests_per_minute"),
            (one("limits: {scope: global, users: {a: {requests_per_minute: 5, burst: 9}}}"), "limits.users.a.burst"),
            (one("bogus: 1"), "unknown field `bogus`"),
            (one("key_storage: env"), "unknown variant"),
            ("users: []".to_string(), "nothing could authenticate"),
            ("users: [{user: a, keys: [{key: short}]}]".to_string(), "shorter than 20"),
            (format!("users: [{{user: a, keys: [{{key: '{KEY_A} x'}}]}}]"), "whitespace"),
            ("users: [{user: a, keys: [{sha256: abc}]}]".to_string(), "users[0].keys[0].sha256"),
            (format!("users: [{{user: a, keys: [{{key: {KEY_A}, sha256: {}}}]}}]", "a".repeat(64)), "exactly one"),
            ("users: [{user: a, keys: []}]".to_string(), "no keys"),
            (format!("users: [{{user: 'a,b', keys: [{{key: {KEY_A}}}]}}]"), "users[0].user"),
            (format!("users: [{{user: a, groups: ['x y'], keys: [{{key: {KEY_A}}}]}}]"), "users[0].groups"),
            (
                format!("users: [{{user: a, keys: [{{key: {KEY_A}}}]}}, {{user: b, keys: [{{key: {KEY_A}}}]}}]"),
                "listed twice",
            ),
            (one("namespace: Not_Valid"), "namespace"),
            (one("jwt: {issuer: dev}"), "exactly one of jwks"),
            (one("jwt: {issuer: dev, hs256_secret: short}"), "at least 32 bytes"),
            (one("jwt: {issuer: dev, jwks: 'nope'}"), "not JSON"),
            (one(r#"jwt: {issuer: dev, jwks: '{"keys":[{"kty":"oct","alg":"HS384","k":"YWJj"}]}'}"#), "refuse"),
            (one("jwt: {issuer: '', hs256_secret: 0123456789abcdef0123456789abcdef}"), "issuer"),
        ] {
            let e = err(&yaml);
            assert!(e.contains(want), "{yaml}\n  -> {e}\n  (wanted `{want}`)");
        }
    }

    #[test]
    fn warns_about_users_outside_allowed_groups() {
        let r =
            go(&format!("allowed_groups: [premium]\nusers: [{{user: a, groups: [free], keys: [{{key: {KEY_A}}}]}}]"))
                .unwrap();
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains("403"));
    }

    #[test]
    fn an_identity_provider_with_remote_jwks() {
        let yaml = "jwt: {issuer: 'https://kc/realms/llm', audiences: [llm-gateway], authorized_parties: [web],\n  \
                    remote_jwks: {cluster: 'outbound|443||kc', authority: kc, path: /realms/llm/protocol/openid-connect/certs}}";
        let r = go(yaml).unwrap();
        let provider = &r.plugin_config()["jwt"]["providers"][0];
        assert_eq!(provider["remote_jwks"]["authority"], "kc");
        assert_eq!(provider["authorized_parties"], json!(["web"]));
        assert!(provider.get("jwks_env").is_none(), "{provider}");
        let e = err("jwt: {issuer: dev, hs256_secret: 0123456789abcdef0123456789abcdef, remote_jwks: {cluster: c, authority: a}}");
        assert!(e.contains("not both"), "{e}");
        assert!(err("jwt: {issuer: dev, remote_jwks: {cluster: c}}").contains("authority"), "the filter checks it");
    }

    #[test]
    fn jwks_from_a_file_next_to_the_users_file() {
        let dir = std::env::temp_dir().join(format!("tollgate-render-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks = crate::dev::jwks(SECRET.as_bytes(), Some("k1"));
        std::fs::write(dir.join("jwks.json"), format!("{jwks}\n")).unwrap();
        let file = parse_users("jwt: {issuer: dev, jwks_file: jwks.json}").unwrap();
        let r = render(&file, &dir, &no_env, &Image::default()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(r.vm_env[JWKS_ENV], jwks);
        assert!(r.plugin_config().get("api_keys").is_none(), "no users, no api_keys section");
    }

    #[test]
    fn yaml_round_trips() {
        let r = go(&format!("users: [{{user: a, keys: [{{key: {KEY_A}}}, {{key: {KEY_B}}}]}}]")).unwrap();
        let back: Value = serde_norway::from_str(&secret_yaml(&r).unwrap()).unwrap();
        assert_eq!(back, r.secret);
        let back: Value = serde_norway::from_str(&patch_yaml(&r).unwrap()).unwrap();
        assert_eq!(back, r.patch);
    }
}
