//! Renders the Envoy bootstrap of the local gateway — the one place that does, for every
//! way the stack runs:
//!
//! - **static** ([`EnvoyLayout::istio`] `None`): the Tollgate Wasm filter inline in the
//!   listener (V8 runtime, the plugin config as a `StringValue`, env as `key_values`) in
//!   front of the router. Benchmarks and most end-to-end tests use it.
//! - **Istio-shaped** (`Some(IstioShape)`): the filter as Istio delivers it to a gateway.
//!   The HTTP filter entry is named `extensions.istio.io/wasmplugin/<ns>.<name>` and
//!   holds only a `config_discovery` (ECDS); the `TypedExtensionConfig` comes from a file
//!   (`path_config_source` with a watched directory), so a config change is a file
//!   rename, as an istiod push is an xDS update. The Wasm `PluginConfig` is built as
//!   istiod builds it (pilot/pkg/model/extensions.go): name `<ns>.<name>`, `root_id` =
//!   `pluginName`, empty `vm_id`, V8, the pluginConfig in Go-jsonpb bytes
//!   ([`crate::jsonpb`]), `vmConfig.env` HOST entries as `host_env_keys` (the values come
//!   from Envoy's own environment, as from the istio-proxy container's), and
//!   `failure_policy` from `failStrategy`. Around it, the neighbours a gateway has where
//!   upstream Envoy has them: `jwt_authn` after Tollgate (a RequestAuthentication: a
//!   token is optional, a bad one is refused), optionally llm-d's InferencePool
//!   `ext_proc` (bodies streamed both ways, `FULL_DUPLEX_STREAMED`), `cors`, the router.
//!
//! Besides the gateway listener there are the model cluster, the cluster the filter
//! reports usage to (one endpoint per tracker replica, round robin, with passive
//! outlier detection when there are several, as a Service's endpoints drop a dead
//! pod), and, for differential tests, a second listener with Envoy's own `jwt_authn`
//! instead of Tollgate.
//!
//! A fleet (`tollgate up --gateways N`) renders one bootstrap per gateway replica from
//! the same plugin config, differing only in ports and, Istio-shaped, in the node id
//! (`…-istio-<replica>`); every replica watches the same ECDS file, so one push
//! reaches them all, as istiod pushes to every pod of a gateway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};

/// Cluster name the harness gives the local tracker when the plugin config names none.
pub const LOCAL_USAGE_CLUSTER: &str = "tollgate-usage";
/// Cluster of the harness's ext_proc server (Istio names it after the EPP Service).
pub const EXT_PROC_CLUSTER: &str = "outbound|9002||llm-d-epp.llm-d.svc.cluster.local";
/// What the Istio-shaped gateway calls itself: the bundle's WasmPlugin `tollgate` in
/// namespace `llm-d`, attached to the llm-d Gateway (Deployment `<gateway>-istio`).
pub const ISTIO_NAMESPACE: &str = "llm-d";
pub const ISTIO_PLUGIN: &str = "tollgate";
pub const ISTIO_GATEWAY: &str = "llm-d-inference-gateway";
/// The CORS origin the Istio-shaped gateway's route allows (an HTTPRoute/VirtualService
/// `corsPolicy`).
pub const CORS_ORIGIN: &str = "https://app.example";

/// The Wasm `PluginConfig.failure_policy` (Istio `failStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// FAIL_CLOSE: a VM that failed (trapped) answers 503 until the pod restarts.
    FailClosed,
    /// FAIL_RELOAD (Istio >= 1.27): Envoy recreates a failed VM (with back-off).
    FailReload,
    /// FAIL_OPEN: requests skip a failed filter (never for an auth filter).
    FailOpen,
}

impl FailurePolicy {
    pub fn as_envoy(self) -> &'static str {
        match self {
            FailurePolicy::FailClosed => "FAIL_CLOSED",
            FailurePolicy::FailReload => "FAIL_RELOAD",
            FailurePolicy::FailOpen => "FAIL_OPEN",
        }
    }
}

/// How an Istio-shaped gateway gets its filter: the WasmPlugin's identity and where the
/// ECDS file lives. Kept by the stack for live pushes.
#[derive(Debug, Clone)]
pub struct IstioShape {
    pub namespace: String,
    /// WasmPlugin `metadata.name`.
    pub name: String,
    /// WasmPlugin `pluginName`: Envoy's `root_id`.
    pub plugin_name: String,
    pub failure_policy: FailurePolicy,
    /// The watched directory; the resource is [`IstioShape::ecds_file`] in it.
    pub ecds_dir: PathBuf,
    pub wasm: PathBuf,
    /// `vmConfig.env` entries with `valueFrom: HOST`: names only, the values are Envoy's env.
    pub host_env_keys: Vec<String>,
}

impl IstioShape {
    /// The bundle's WasmPlugin (`llm-d/tollgate`, pluginName `tollgate`), FAIL_RELOAD.
    pub fn new(ecds_dir: PathBuf, wasm: PathBuf, host_env_keys: Vec<String>) -> Self {
        Self {
            namespace: ISTIO_NAMESPACE.into(),
            name: ISTIO_PLUGIN.into(),
            plugin_name: ISTIO_PLUGIN.into(),
            failure_policy: FailurePolicy::FailReload,
            ecds_dir,
            wasm,
            host_env_keys,
        }
    }

    /// The ECDS resource name, which is also the HTTP filter's name.
    pub fn resource_name(&self) -> String {
        format!("extensions.istio.io/wasmplugin/{}.{}", self.namespace, self.name)
    }

    /// The Wasm plugin's name (`PluginConfig.name`; Envoy's `wasm.<name>.*` stats).
    pub fn plugin_config_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    pub fn ecds_file(&self) -> PathBuf {
        self.ecds_dir.join("tollgate-ecds.json")
    }

    /// Prefix of Envoy's stats for this resource (`…config_reload`, `…config_fail`,
    /// `…version_text`, `…update_rejected`).
    pub fn stat_prefix(&self) -> String {
        format!("extension_config_discovery.http_filter.{}.", self.resource_name())
    }

    /// The `TypedExtensionConfig` istiod sends (after istio-agent replaced the OCI url by
    /// the local file it pulled and stripped its own `ISTIO_META_*` env entries).
    pub fn typed_extension_config(&self, plugin_config: &Value) -> Value {
        let mut config = json!({
            "name": self.plugin_config_name(),
            "root_id": self.plugin_name,
            "vm_config": {
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": self.wasm.display().to_string()}},
            },
            "failure_policy": self.failure_policy.as_envoy(),
        });
        let bytes = crate::jsonpb::encode(plugin_config);
        // An empty pluginConfig: istiod sends an empty Any, which Envoy reads as 0 bytes.
        if !bytes.is_empty() {
            set(
                &mut config,
                "configuration",
                json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": bytes}),
            );
        }
        if !self.host_env_keys.is_empty() {
            if let Some(vm) = config.get_mut("vm_config") {
                set(vm, "environment_variables", json!({"host_env_keys": self.host_env_keys}));
            }
        }
        json!({
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": self.resource_name(),
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": config}
        })
    }

    /// What the ECDS file holds: a `DiscoveryResponse` with the one resource.
    pub fn discovery_response(&self, plugin_config: &Value, version: u64) -> Value {
        json!({"version_info": version.to_string(), "resources": [self.typed_extension_config(plugin_config)]})
    }

    /// Writes the resource for `version`: a temporary file in the watched directory,
    /// renamed over the old one (atomic; Envoy reloads on the rename).
    pub fn write(&self, plugin_config: &Value, version: u64) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.ecds_dir)?;
        let tmp = self.ecds_dir.join(format!(".tollgate-ecds.{version}.tmp"));
        let text = serde_json::to_vec_pretty(&self.discovery_response(plugin_config, version))?;
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        let target = self.ecds_file();
        std::fs::rename(&tmp, &target).with_context(|| format!("rename onto {}", target.display()))?;
        Ok(())
    }

    /// The HTTP filter entry of the listener: only a `config_discovery`, as istiod
    /// writes it (ADS there, this file here); the listener waits for the first
    /// resource (`initial_fetch_timeout: 0s`), and a failed pull could deliver Istio's
    /// RBAC deny-all under the same name, hence the second type URL.
    fn http_filter(&self) -> Value {
        json!({
            "name": self.resource_name(),
            "config_discovery": {
                "config_source": {
                    "path_config_source": {
                        "path": self.ecds_file().display().to_string(),
                        "watched_directory": {"path": self.ecds_dir.display().to_string()}
                    },
                    "resource_api_version": "V3",
                    "initial_fetch_timeout": "0s"
                },
                "type_urls": [
                    "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
                ]
            }
        })
    }
}

pub struct EnvoyLayout<'a> {
    /// Which gateway replica of the fleet this is (from 0).
    pub replica: usize,
    pub gateway_port: u16,
    pub admin_port: u16,
    pub model_port: u16,
    /// Where usage reports go: every tracker replica (or the fault proxy in front of
    /// each), the endpoints of one round-robin cluster.
    pub tracker_ports: &'a [u16],
    pub wasm: &'a Path,
    pub plugin_config: &'a Value,
    pub vm_env: &'a BTreeMap<String, String>,
    /// A second listener on this port with Envoy's own `jwt_authn` filter (this
    /// `JwtAuthentication` config) in place of Tollgate, for differential tests.
    pub jwt_authn: Option<(u16, &'a Value)>,
    /// Deliver the filter as Istio does, with its neighbours; `None`: static.
    pub istio: Option<&'a IstioShape>,
    /// The harness's ext_proc server (Istio-shaped only): llm-d's InferencePool filter.
    pub ext_proc_port: Option<u16>,
    /// Extra clusters a plugin config can name (`tollgate up --upstream NAME=HOST:PORT`):
    /// (name, `host:port`), e.g. an identity provider's JWKS server.
    pub upstreams: &'a [(String, String)],
}

/// Sets `key` of a JSON object (no-op on anything else).
pub(crate) fn set(v: &mut Value, key: &str, x: Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert(key.to_string(), x);
    }
}

fn cluster(name: &str, port: u16) -> Value {
    cluster_of(name, &[port])
}

/// A static cluster with one loopback endpoint per port, round robin.
fn cluster_of(name: &str, ports: &[u16]) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|port| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}))
        .collect();
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]}
    })
}

/// A cluster for `--upstream NAME=HOST:PORT`: one endpoint, resolved by DNS unless the
/// host is an IP address.
fn upstream_cluster(name: &str, address: &str) -> Value {
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "80"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().unwrap_or(80);
    let kind = if host.parse::<std::net::IpAddr>().is_ok() { "STATIC" } else { "STRICT_DNS" };
    json!({
        "name": name,
        "type": kind,
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        ]}]}
    })
}

/// The usage cluster: every tracker. With several, a tracker that refuses connections
/// (killed, restarting) is ejected at its first failure for a few seconds, so reports
/// go to the others instead of failing every other time; never all of them (at most
/// half), and a refusing single tracker is left alone (nothing to fail over to, and the
/// fault tests count what reaches it).
fn usage_cluster(name: &str, ports: &[u16]) -> Value {
    let mut c = cluster_of(name, ports);
    if ports.len() > 1 {
        set(
            &mut c,
            "outlier_detection",
            json!({
                "split_external_local_origin_errors": true,
                "consecutive_local_origin_failure": 1,
                "interval": "1s",
                "base_ejection_time": "3s",
                "max_ejection_percent": 50
            }),
        );
    }
    c
}

fn h2_cluster(name: &str, port: u16) -> Value {
    let mut c = cluster(name, port);
    set(
        &mut c,
        "typed_extension_protocol_options",
        json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        }),
    );
    c
}

/// The usage cluster named in the plugin config, if any.
pub fn usage_cluster_name(plugin_config: &Value) -> Option<String> {
    plugin_config.get("usage")?.get("cluster")?.as_str().map(str::to_string)
}

fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

fn listener(name: &str, port: u16, http_filters: Vec<Value>, virtual_host_extra: Option<Value>) -> Value {
    let mut vhost = json!({
        "name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "model", "timeout": "300s"}}]
    });
    if let (Some(extra), Some(v)) = (virtual_host_extra.as_ref().and_then(Value::as_object), vhost.as_object_mut()) {
        for (k, x) in extra {
            v.insert(k.clone(), x.clone());
        }
    }
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "codec_type": "AUTO",
                "route_config": {"name": "local", "virtual_hosts": [vhost]},
                "http_filters": http_filters
            }
        }]}]
    })
}

/// The inline filter of the static bootstrap.
fn static_wasm_filter(l: &EnvoyLayout<'_>) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "tollgate",
                "root_id": "tollgate",
                "failure_policy": "FAIL_CLOSED",
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": l.plugin_config.to_string()
                },
                "vm_config": {
                    "vm_id": "",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": l.wasm.display().to_string()}},
                    "environment_variables": {"key_values": l.vm_env}
                }
            }
        }
    })
}

/// The JWKS of a provider of the plugin config: inline, or from the VM env it names.
fn provider_jwks(p: &Value, vm_env: &BTreeMap<String, String>) -> Option<String> {
    if let Some(j) = p.get("jwks").and_then(Value::as_str) {
        return Some(j.to_string());
    }
    let name = p.get("jwks_env").and_then(Value::as_str)?;
    vm_env.get(name).cloned()
}

/// `jwt_authn` as istiod renders a RequestAuthentication for the same issuers the
/// plugin config trusts (pilot/pkg/security/authn: one provider per jwtRule,
/// `requires_any` [provider, `allow_missing`] — no token passes, a bad token is 401 —
/// `bypass_cors_preflight`, the verified payload in metadata, the token not forwarded).
/// Without a JWT provider in the config, one issuer nobody uses stands in.
pub fn request_authentication(plugin_config: &Value, vm_env: &BTreeMap<String, String>) -> Value {
    let mut providers = serde_json::Map::new();
    let configured = plugin_config.pointer("/jwt/providers").and_then(Value::as_array).cloned().unwrap_or_default();
    for (i, p) in configured.iter().enumerate() {
        let (Some(issuer), Some(jwks)) = (p.get("issuer").and_then(Value::as_str), provider_jwks(p, vm_env)) else {
            continue;
        };
        let mut provider = json!({
            "issuer": issuer,
            "local_jwks": {"inline_string": jwks},
            "forward": false,
            "payload_in_metadata": issuer
        });
        if let Some(aud) = p.get("audiences").and_then(Value::as_array).filter(|a| !a.is_empty()) {
            set(&mut provider, "audiences", Value::Array(aud.clone()));
        }
        providers.insert(format!("origins-{i}"), provider);
    }
    if providers.is_empty() {
        let jwks = crate::dev::jwks(crate::dev::new_secret().as_bytes(), Some("neighbour"));
        providers.insert(
            "origins-0".into(),
            json!({"issuer": "https://neighbour.example", "local_jwks": {"inline_string": jwks}, "forward": false}),
        );
    }
    let mut requirements: Vec<Value> = providers.keys().map(|name| json!({"provider_name": name})).collect();
    requirements.push(json!({"allow_missing": {}}));
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": providers,
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": requirements}}}],
        "bypass_cors_preflight": true
    })
}

/// llm-d's InferencePool ext_proc as istiod configures it (pilot/pkg/networking/core/
/// route: headers and trailers sent, both bodies `FULL_DUPLEX_STREAMED`, fail closed).
/// One difference: `authority` is set, because Envoy's default `:authority` is the
/// cluster name, whose `|` the harness's HTTP/2 server (the `h2` crate) refuses as a
/// protocol error, while the Go gRPC server of the real endpoint picker takes it.
fn ext_proc_filter() -> Value {
    json!({
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER, "authority": "llm-d-epp.llm-d.svc.cluster.local"},
                "timeout": "10s"
            },
            "failure_mode_allow": false,
            "message_timeout": "1000s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "FULL_DUPLEX_STREAMED",
                "request_trailer_mode": "SEND",
                "response_header_mode": "SEND",
                "response_body_mode": "FULL_DUPLEX_STREAMED",
                "response_trailer_mode": "SEND"
            }
        }
    })
}

fn cors_filter() -> Value {
    json!({"name": "envoy.filters.http.cors", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}})
}

/// The route's CORS policy (an HTTPRoute/VirtualService `corsPolicy`).
fn cors_policy() -> Value {
    json!({"typed_per_filter_config": {"envoy.filters.http.cors": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": CORS_ORIGIN}],
        "allow_methods": "GET,POST,OPTIONS",
        "allow_headers": "authorization,content-type,x-api-key,apikey",
        "max_age": "600"
    }}})
}

pub fn bootstrap(l: &EnvoyLayout<'_>) -> Value {
    let usage_name = usage_cluster_name(l.plugin_config).unwrap_or_else(|| LOCAL_USAGE_CLUSTER.to_string());
    let mut clusters = vec![cluster("model", l.model_port), usage_cluster(&usage_name, l.tracker_ports)];
    clusters.extend(l.upstreams.iter().map(|(name, address)| upstream_cluster(name, address)));
    let gateway = match l.istio {
        None => listener("gateway", l.gateway_port, vec![static_wasm_filter(l), router()], None),
        Some(shape) => {
            let mut filters = vec![
                shape.http_filter(),
                json!({"name": "envoy.filters.http.jwt_authn",
                       "typed_config": request_authentication(l.plugin_config, l.vm_env)}),
            ];
            if let Some(port) = l.ext_proc_port {
                filters.push(ext_proc_filter());
                clusters.push(h2_cluster(EXT_PROC_CLUSTER, port));
            }
            filters.push(cors_filter());
            filters.push(router());
            listener("gateway", l.gateway_port, filters, Some(cors_policy()))
        }
    };
    let mut listeners = vec![gateway];
    if let Some((port, config)) = l.jwt_authn {
        let filter = json!({"name": "envoy.filters.http.jwt_authn", "typed_config": config});
        listeners.push(listener("jwt_authn", port, vec![filter, router()], None));
    }
    let mut boot = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": l.admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters}
    });
    if l.istio.is_some() {
        // A file-based xDS source needs a node; named as Istio names a gateway pod's proxy.
        set(
            &mut boot,
            "node",
            json!({
                "id": format!(
                    "router~127.0.0.1~{ISTIO_GATEWAY}-istio-{}.{ISTIO_NAMESPACE}~{ISTIO_NAMESPACE}.svc.cluster.local",
                    l.replica
                ),
                "cluster": format!("{ISTIO_GATEWAY}-istio.{ISTIO_NAMESPACE}")
            }),
        );
    }
    boot
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> IstioShape {
        IstioShape::new("/run/ecds".into(), "/w/plugin.wasm".into(), vec!["TOLLGATE_API_KEYS".into()])
    }

    #[test]
    fn the_resource_is_what_istiod_sends() {
        let s = shape();
        let r = s
            .typed_extension_config(&json!({"usage": {"cluster": "c"}, "api_keys": {"keys_env": "TOLLGATE_API_KEYS"}}));
        assert_eq!(r["name"], "extensions.istio.io/wasmplugin/llm-d.tollgate");
        let c = &r["typed_config"]["config"];
        assert_eq!(c["name"], "llm-d.tollgate");
        assert_eq!(c["root_id"], "tollgate");
        assert_eq!(c["failure_policy"], "FAIL_RELOAD");
        assert!(c["vm_config"].get("vm_id").is_none(), "istiod leaves vm_id empty");
        assert_eq!(c["vm_config"]["environment_variables"], json!({"host_env_keys": ["TOLLGATE_API_KEYS"]}));
        assert_eq!(
            c["configuration"]["value"],
            r#"{"api_keys":{"keys_env":"TOLLGATE_API_KEYS"},"usage":{"cluster":"c"}}"#
        );
        // An empty pluginConfig: no configuration at all.
        assert!(s.typed_extension_config(&json!({}))["typed_config"]["config"].get("configuration").is_none());
    }

    /// A static gateway on ports 1–4 with this plugin config and VM environment.
    fn layout<'a>(config: &'a Value, env: &'a BTreeMap<String, String>) -> EnvoyLayout<'a> {
        EnvoyLayout {
            replica: 0,
            gateway_port: 1,
            admin_port: 2,
            model_port: 3,
            tracker_ports: &[4],
            wasm: Path::new("/w/plugin.wasm"),
            plugin_config: config,
            vm_env: env,
            jwt_authn: None,
            istio: None,
            ext_proc_port: None,
            upstreams: &[],
        }
    }

    #[test]
    fn one_bootstrap_for_every_mode() {
        let env = BTreeMap::from([("TOLLGATE_JWKS".to_string(), "{\"keys\":[]}".to_string())]);
        let config = json!({"jwt": {"providers": [{"issuer": "dev", "jwks_env": "TOLLGATE_JWKS"}]}});
        let s = shape();
        let mut l = layout(&config, &env);
        let names = |b: &Value| -> Vec<String> {
            b.pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters")
                .and_then(Value::as_array)
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap().to_string())
                .collect()
        };
        let b = bootstrap(&l);
        assert_eq!(names(&b), ["envoy.filters.http.wasm", "envoy.filters.http.router"]);
        assert!(b.get("node").is_none());
        let usage = &b["static_resources"]["clusters"][1];
        assert_eq!(usage["name"], LOCAL_USAGE_CLUSTER);
        assert!(usage.get("outlier_detection").is_none(), "one tracker: nothing to fail over to");

        l.istio = Some(&s);
        l.ext_proc_port = Some(5);
        let b = bootstrap(&l);
        assert_eq!(
            names(&b),
            [
                "extensions.istio.io/wasmplugin/llm-d.tollgate",
                "envoy.filters.http.jwt_authn",
                "envoy.filters.http.ext_proc",
                "envoy.filters.http.cors",
                "envoy.filters.http.router"
            ]
        );
        let jwt = b
            .pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters/1/typed_config")
            .unwrap();
        assert_eq!(jwt["providers"]["origins-0"]["issuer"], "dev");
        assert_eq!(jwt["providers"]["origins-0"]["local_jwks"]["inline_string"], "{\"keys\":[]}");
        assert!(b["node"]["id"].as_str().unwrap().starts_with("router~127.0.0.1~llm-d-inference-gateway-istio-0."));
        let clusters: Vec<&str> =
            b["static_resources"]["clusters"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(clusters, ["model", LOCAL_USAGE_CLUSTER, EXT_PROC_CLUSTER]);
    }

    #[test]
    fn a_fleet_replica_knows_every_tracker() {
        let env = BTreeMap::new();
        let config = json!({"usage": {"cluster": "usage"}});
        let s = shape();
        let l = EnvoyLayout {
            replica: 2,
            gateway_port: 8280,
            admin_port: 10101,
            model_port: 8000,
            tracker_ports: &[8081, 8181, 8281],
            wasm: Path::new("/w/plugin.wasm"),
            plugin_config: &config,
            vm_env: &env,
            jwt_authn: None,
            istio: Some(&s),
            ext_proc_port: None,
            upstreams: &[],
        };
        let b = bootstrap(&l);
        let usage = &b["static_resources"]["clusters"][1];
        assert_eq!(usage["name"], "usage");
        assert_eq!(usage["lb_policy"], "ROUND_ROBIN");
        let ports: Vec<u64> = usage["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["endpoint"]["address"]["socket_address"]["port_value"].as_u64().unwrap())
            .collect();
        assert_eq!(ports, [8081, 8181, 8281]);
        assert_eq!(usage["outlier_detection"]["consecutive_local_origin_failure"], 1);
        assert_eq!(b["admin"]["address"]["socket_address"]["port_value"], 10101);
        assert_eq!(b["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"], 8280);
        assert!(b["node"]["id"].as_str().unwrap().contains("-istio-2."), "{}", b["node"]);
    }

    #[test]
    fn upstreams_become_clusters() {
        let upstreams =
            [("idp".to_string(), "127.0.0.1:8443".to_string()), ("kc".to_string(), "keycloak.local:80".to_string())];
        let (env, config) = (BTreeMap::new(), json!({}));
        let l = EnvoyLayout { upstreams: &upstreams, ..layout(&config, &env) };
        let b = bootstrap(&l);
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        let idp = clusters.iter().find(|c| c["name"] == "idp").unwrap();
        assert_eq!(idp["type"], "STATIC");
        assert_eq!(
            idp.pointer("/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address/port_value")
                .unwrap(),
            8443
        );
        let kc = clusters.iter().find(|c| c["name"] == "kc").unwrap();
        assert_eq!(kc["type"], "STRICT_DNS");
    }
}
