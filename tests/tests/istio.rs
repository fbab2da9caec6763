#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! The Istio bundle (istio/) run by the real Envoy. The WasmPlugin's pluginConfig is
//! base/wasmplugin.yaml merged with the rendered base/wasmplugin-config.yaml (as
//! kustomize merges them), usage.cluster keeps its Istio name (the harness defines that
//! cluster for the local tracker), and the Wasm VM gets its env the way the gateway pod
//! does: Secret → istio-proxy env (gateway-options.yaml) → vmConfig.env (valueFrom: HOST).
//! Also: the checked-in bundle is exactly what `tollgate render` makes of
//! istio/examples/users.yaml, and a freshly rendered users file runs as rendered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use harness::render::{self, Image};
use serde_json::{json, Value};
use tollgate_e2e::*;

fn istio(path: &str) -> PathBuf {
    harness::paths::workspace_root().join("istio").join(path)
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// RFC 7386 merge patch: how kustomize merges a patch into a custom resource.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// The WasmPlugin as applied: wasmplugin*.yaml of the base, merged in order.
fn wasmplugin() -> Value {
    let mut wp = yaml(&istio("base/wasmplugin.yaml"));
    merge_patch(&mut wp, &yaml(&istio("base/wasmplugin-config.yaml")));
    wp
}

/// The Wasm VM's environment as the gateway pod sees it: each `vmConfig.env` entry
/// (valueFrom: HOST) is the istio-proxy container's variable of that name, which
/// gateway-options.yaml takes from a key of the Secret.
fn vm_env_as_on_the_gateway(wp: &Value) -> BTreeMap<String, String> {
    // The bundle's Secrets by name: the credentials and the tracker's tokens.
    let secrets: BTreeMap<String, Value> = ["base/secret.yaml", "base/tracker-secret.yaml"]
        .iter()
        .map(|f| yaml(&istio(f)))
        .map(|s| (s["metadata"]["name"].as_str().unwrap().to_string(), s["stringData"].clone()))
        .collect();
    let options = yaml(&istio("gateway-options.yaml"));
    let deployment: Value = serde_norway::from_str(options["data"]["deployment"].as_str().unwrap()).unwrap();
    let proxy = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "istio-proxy")
        .unwrap()
        .clone();
    let mut env = BTreeMap::new();
    for e in wp["spec"]["vmConfig"]["env"].as_array().unwrap() {
        assert_eq!(e["valueFrom"], "HOST", "{e}");
        let name = e["name"].as_str().unwrap();
        let pod_var = proxy["env"].as_array().unwrap().iter().find(|v| v["name"] == name);
        let r =
            &pod_var.unwrap_or_else(|| panic!("the gateway pod has no env var {name}"))["valueFrom"]["secretKeyRef"];
        let secret = secrets.get(r["name"].as_str().unwrap()).unwrap_or_else(|| panic!("no Secret {}", r["name"]));
        let value = secret[r["key"].as_str().unwrap()].as_str().unwrap();
        env.insert(name.to_string(), value.to_string());
    }
    env
}

fn bearer(v: &str) -> String {
    format!("Bearer {v}")
}

#[test]
fn the_bundles_plugin_config_runs_in_envoy_with_credentials_from_the_secret() {
    let wp = wasmplugin();
    let config = wp["spec"]["pluginConfig"].clone();
    let cluster = config["usage"]["cluster"].as_str().unwrap().to_string();
    assert_eq!(cluster, "outbound|8080||usage-tracking.llm-d.svc.cluster.local");
    let vm_env = vm_env_as_on_the_gateway(&wp);
    assert_eq!(vm_env.keys().collect::<Vec<_>>(), ["TOLLGATE_API_KEYS", "TOLLGATE_INGEST_TOKEN", "TOLLGATE_JWKS"]);

    // The example users file holds the plaintext of the example keys and JWT secret.
    let users = yaml(&istio("examples/users.yaml"));
    let key = |i: usize| users["users"][i]["keys"][0]["key"].as_str().unwrap().to_string();
    let (mittens, alice) = (key(0), key(1));
    let jwt = &users["jwt"];
    let secret = jwt["hs256_secret"].as_str().unwrap().as_bytes();
    let token = |sub: &str, groups: &[&str]| {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let claims = dev::claims(jwt["issuer"].as_str().unwrap(), sub, &groups, Some(600), None);
        dev::mint_jwt(secret, jwt["kid"].as_str(), &claims).unwrap()
    };

    let stack = Stack::start(StackOptions {
        plugin_config: config,
        vm_env,
        local_usage: false,
        // As the gateway runs it: ECDS, jsonpb bytes, host_env_keys, the neighbours.
        istio_shaped: true,
        label: "istio-bundle".into(),
        ..StackOptions::default()
    })
    .unwrap();
    let clusters = client().get(format!("{}/clusters", stack.admin_url)).send().unwrap().text().unwrap();
    assert!(clusters.contains(&format!("{cluster}::")), "Envoy has no cluster {cluster}");

    // API keys from the Secret's TOLLGATE_API_KEYS.
    let resp = chat(&stack, &[("authorization", &bearer(&mittens))], &chat_body(3, 2, false));
    assert_eq!(resp.status(), 200);
    let seen = received_headers(&resp);
    assert_eq!(seen.get("x-tollgate-user").map(String::as_str), Some("mittens"));
    assert_eq!(seen.get("x-tollgate-groups").map(String::as_str), Some("premium"));
    assert!(!seen.contains_key("authorization"), "the key went upstream");
    let resp = chat(&stack, &[("x-api-key", &alice)], &chat_body(3, 2, false));
    assert_eq!(resp.status(), 200);
    assert_eq!(received_headers(&resp).get("x-tollgate-user").map(String::as_str), Some("alice"));

    // An HS256 JWT verified with the Secret's TOLLGATE_JWKS.
    let resp = chat(&stack, &[("authorization", &bearer(&token("jwt-user", &["free"])))], &chat_body(3, 2, false));
    assert_eq!(resp.status(), 200);
    assert_eq!(received_headers(&resp).get("x-tollgate-user").map(String::as_str), Some("jwt-user"));

    // allowed_groups from the users file; no credential; a wrong key.
    let resp = chat(&stack, &[("authorization", &bearer(&token("outsider", &["guests"])))], &chat_body(1, 1, false));
    assert_eq!(resp.status(), 403);
    assert_eq!(chat(&stack, &[], &chat_body(1, 1, false)).status(), 401);
    let wrong = format!("{mittens}x");
    assert_eq!(chat(&stack, &[("authorization", &bearer(&wrong))], &chat_body(1, 1, false)).status(), 401);

    // Usage reaches the tracker through the cluster named as in Istio.
    for user in ["mittens", "alice", "jwt-user"] {
        wait_metric(&stack, "llm_requests_total", &[("user", user)], 1.0);
    }
    wait_metric(&stack, "llm_denied_requests_total", &[], 3.0);
}

#[test]
fn the_bundle_is_what_render_makes_of_the_example_users_file() {
    let path = istio("examples/users.yaml");
    let file = render::parse_users(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let r = render::render(&file, &istio("examples"), &|_| None, &Image::default()).unwrap();
    let hint = "istio/base is stale: run `tollgate render --users istio/examples/users.yaml --out-dir istio/base`";
    assert_eq!(yaml(&istio("base/secret.yaml")), r.secret, "{hint}");
    assert_eq!(yaml(&istio("base/wasmplugin-config.yaml")), r.patch, "{hint}");
    // And the files as written are the YAML render writes (comments included).
    assert_eq!(std::fs::read_to_string(istio("base/secret.yaml")).unwrap(), render::secret_yaml(&r).unwrap(), "{hint}");
    assert_eq!(
        std::fs::read_to_string(istio("base/wasmplugin-config.yaml")).unwrap(),
        render::patch_yaml(&r).unwrap(),
        "{hint}"
    );
}

#[test]
fn a_rendered_users_file_with_inline_keys_runs_in_envoy() {
    let (premium_key, free_key) = (dev::new_api_key(), dev::new_api_key());
    let users = "key_storage: inline\nnamespace: gateways\nallowed_groups: [premium]\n\
                 tracker: {namespace: observability}\n\
                 users:\n  - {user: carol, groups: [premium, team-a], keys: [{key_env: CAROL_KEY}]}\n\
                 \x20 - {user: dave, groups: [free], keys: [{key_env: DAVE_KEY}]}\n";
    let env = |name: &str| match name {
        "CAROL_KEY" => Some(premium_key.clone()),
        "DAVE_KEY" => Some(free_key.clone()),
        _ => None,
    };
    let r = render::render(&render::parse_users(users).unwrap(), Path::new("."), &env, &Image::default()).unwrap();
    assert_eq!(r.warnings.len(), 1, "dave is outside allowed_groups: {:?}", r.warnings);
    let config = r.plugin_config().clone();
    assert_eq!(config["usage"]["cluster"], "outbound|8080||usage-tracking.observability.svc.cluster.local");
    // Inline keys need no env; only the tracker's ingest token comes from the VM env.
    assert_eq!(
        r.patch["spec"]["vmConfig"]["env"],
        json!([{"name": "TOLLGATE_INGEST_TOKEN", "valueFrom": "HOST"}]),
        "inline keys need no env"
    );
    let rendered = format!("{}{}", render::secret_yaml(&r).unwrap(), render::patch_yaml(&r).unwrap());
    assert!(!rendered.contains(&premium_key) && !rendered.contains(&free_key), "a plaintext key was written");

    let stack = Stack::start(StackOptions {
        plugin_config: config,
        local_usage: false,
        istio_shaped: true,
        label: "istio-render-inline".into(),
        ..StackOptions::default()
    })
    .unwrap();
    let resp = chat(&stack, &[("authorization", &bearer(&premium_key))], &chat_body(2, 2, false));
    assert_eq!(resp.status(), 200);
    assert_eq!(received_headers(&resp).get("x-tollgate-groups").map(String::as_str), Some("premium,team-a"));
    assert_eq!(chat(&stack, &[("authorization", &bearer(&free_key))], &chat_body(1, 1, false)).status(), 403);
    wait_metric(&stack, "llm_requests_total", &[("user", "carol")], 1.0);
}
