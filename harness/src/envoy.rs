//! Renders the Envoy bootstrap of the local gateway: one listener with the Tollgate
//! Wasm filter (V8 runtime, the plugin config as a `StringValue`, exactly as Istio
//! hands `pluginConfig` over) in front of the router, the model cluster, and the
//! cluster the filter sends usage reports to.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

/// Cluster name the harness gives the local tracker when the plugin config names none.
pub const LOCAL_USAGE_CLUSTER: &str = "tollgate-usage";

pub struct EnvoyLayout<'a> {
    pub gateway_port: u16,
    pub admin_port: u16,
    pub model_port: u16,
    pub tracker_port: u16,
    pub wasm: &'a Path,
    pub plugin_config: &'a Value,
    pub vm_env: &'a BTreeMap<String, String>,
    /// A second listener on this port with Envoy's own `jwt_authn` filter (this
    /// `JwtAuthentication` config) in place of Tollgate, for differential tests.
    pub jwt_authn: Option<(u16, &'a Value)>,
}

fn cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        ]}]}
    })
}

/// The usage cluster named in the plugin config, if any.
pub fn usage_cluster_name(plugin_config: &Value) -> Option<String> {
    plugin_config.get("usage")?.get("cluster")?.as_str().map(str::to_string)
}

fn listener(name: &str, port: u16, auth_filter: Value) -> Value {
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
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "model", "timeout": "300s"}}]
                }]},
                "http_filters": [
                    auth_filter,
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                ]
            }
        }]}]
    })
}

pub fn bootstrap(l: &EnvoyLayout<'_>) -> Value {
    let usage_cluster = usage_cluster_name(l.plugin_config).unwrap_or_else(|| LOCAL_USAGE_CLUSTER.to_string());
    let wasm_filter = json!({
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
    });
    let mut listeners = vec![listener("gateway", l.gateway_port, wasm_filter)];
    if let Some((port, config)) = l.jwt_authn {
        let filter = json!({"name": "envoy.filters.http.jwt_authn", "typed_config": config});
        listeners.push(listener("jwt_authn", port, filter));
    }
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": l.admin_port}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [cluster("model", l.model_port), cluster(&usage_cluster, l.tracker_port)]
        }
    })
}
