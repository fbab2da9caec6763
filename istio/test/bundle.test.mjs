// The Istio bundle as a cluster would receive it: every object kustomize renders for each
// variant validates against its published schema (Istio, Gateway API, Prometheus
// Operator, Kubernetes), and the objects agree with each other — the Secret's keys are
// what the gateway's env vars read, those are what vmConfig.env copies, those are what
// the pluginConfig names, and usage.cluster is Istio's name for the tracker's Service.

import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { describe, it } from "node:test";

import {
  ISTIO,
  ROOT,
  VARIANTS,
  kustomize,
  mergePatch,
  parseYaml,
  readYaml,
  strategicMergeDeployment,
  validate,
} from "./support/bundle.mjs";

const one = (objs, kind, name) => {
  const found = objs.filter((o) => o.kind === kind && (!name || o.metadata.name === name));
  assert.equal(found.length, 1, `expected one ${kind} ${name ?? ""}, found ${found.length}`);
  return found[0];
};

/** Top-level spec fields a WasmPlugin may have, from the published model's declaration. */
function wasmPluginSpecFields() {
  const dts = readFileSync(
    join(ISTIO, "test/node_modules/@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin.d.ts"),
    "utf8",
  );
  const start = dts.indexOf('    "spec"');
  const end = dts.indexOf("\n    };", start);
  const fields = [...dts.slice(start, end).matchAll(/^ {8}"([A-Za-z0-9]+)"\??:/gm)].map((m) => m[1]);
  assert.ok(fields.includes("url") && fields.includes("targetRefs"), "could not read WasmPlugin fields");
  return new Set(fields);
}

/** The env vars the gateway's istio-proxy container gets, for a variant. */
function gatewayEnvPatch(variant, objs) {
  if (variant.startsWith("gateway-api")) {
    const cm = one(objs, "ConfigMap", "tollgate-gateway-options");
    return parseYaml(cm.data.deployment, "gateway-options deployment")[0];
  }
  return readYaml(join(ISTIO, "gateway-patches/classic-ingress.yaml"))[0];
}

for (const [variant, dir] of Object.entries(VARIANTS)) {
  describe(variant, () => {
    const objs = kustomize(dir);

    it("renders only objects that validate against their published schemas", () => {
      assert.ok(objs.length >= 6, `only ${objs.length} objects`);
      for (const o of objs) validate(o);
      const kinds = objs.map((o) => o.kind).sort();
      for (const k of ["Deployment", "Secret", "Service", "ServiceMonitor", "WasmPlugin"]) {
        assert.ok(kinds.includes(k), `no ${k} in ${kinds}`);
      }
      const ns = new Set(objs.map((o) => o.metadata.namespace));
      assert.equal(ns.size, 1, `objects spread over namespaces ${[...ns]}`);
    });

    it("has a WasmPlugin as documented", () => {
      const wp = one(objs, "WasmPlugin", "tollgate");
      const allowed = wasmPluginSpecFields();
      for (const k of Object.keys(wp.spec)) assert.ok(allowed.has(k), `spec.${k} is not a WasmPlugin field`);
      assert.equal(wp.spec.phase, "AUTHN");
      assert.equal(wp.spec.failStrategy, "FAIL_CLOSE");
      assert.match(wp.spec.url, /^oci:\/\/[^/]+\/.+:.+$/);
      assert.match(wp.spec.sha256, /^[0-9a-f]{64}$/);
      if (variant.startsWith("gateway-api")) {
        assert.deepEqual(wp.spec.targetRefs, [
          { group: "gateway.networking.k8s.io", kind: "Gateway", name: "llm-d-inference-gateway" },
        ]);
        assert.equal(wp.spec.selector, undefined);
      } else {
        assert.equal(wp.spec.targetRefs, undefined, "targetRefs and selector together");
        assert.deepEqual(wp.spec.selector, { matchLabels: { istio: "ingressgateway" } });
      }
      const pc = wp.spec.pluginConfig;
      assert.equal(pc.limits, undefined, "tollgate render does not write limits");
      for (const e of wp.spec.vmConfig.env) assert.equal(e.valueFrom, "HOST", e.name);
    });

    it("names the tracker's Service port in usage.cluster", () => {
      const wp = one(objs, "WasmPlugin", "tollgate");
      const svc = one(objs, "Service", "usage-tracking");
      const port = svc.spec.ports.find((p) => p.name === "http");
      assert.ok(port, "the tracker Service has no port named http");
      assert.equal(
        wp.spec.pluginConfig.usage.cluster,
        `outbound|${port.port}||${svc.metadata.name}.${svc.metadata.namespace}.svc.cluster.local`,
      );
    });

    it("carries the credentials from the Secret to the filter", () => {
      const wp = one(objs, "WasmPlugin", "tollgate");
      const pc = wp.spec.pluginConfig;
      const vmEnv = wp.spec.vmConfig.env.map((e) => e.name).sort();
      const named = [pc.api_keys?.keys_env, ...(pc.jwt?.providers ?? []).map((p) => p.jwks_env)].filter(Boolean);
      assert.deepEqual([...named].sort(), vmEnv, "vmConfig.env and the pluginConfig's *_env differ");

      const patch = gatewayEnvPatch(variant, objs);
      const proxy = patch.spec.template.spec.containers.find((c) => c.name === "istio-proxy");
      const secret = one(objs, "Secret");
      for (const name of vmEnv) {
        const e = proxy.env.find((x) => x.name === name);
        assert.ok(e, `the gateway's istio-proxy gets no env var ${name}`);
        const ref = e.valueFrom.secretKeyRef;
        assert.equal(ref.name, secret.metadata.name);
        assert.ok(ref.key in secret.stringData, `Secret has no key ${ref.key}`);
      }
      const keys = JSON.parse(secret.stringData.TOLLGATE_API_KEYS);
      assert.ok(keys.length > 0);
      for (const k of keys) {
        assert.match(k.sha256, /^[0-9a-f]{64}$/);
        assert.equal(typeof k.user, "string");
        assert.ok(Array.isArray(k.groups));
      }
      const jwks = JSON.parse(secret.stringData.TOLLGATE_JWKS);
      assert.equal(jwks.keys[0].kty, "oct");
      assert.equal(jwks.keys[0].alg, "HS256");
    });

    it("runs the tracker locked down and probed", () => {
      const dep = one(objs, "Deployment", "usage-tracking");
      const pod = dep.spec.template.spec;
      const [c] = pod.containers;
      assert.equal(pod.securityContext.runAsNonRoot, true);
      assert.ok(pod.securityContext.runAsUser > 0);
      assert.equal(c.securityContext.readOnlyRootFilesystem, true);
      assert.equal(c.securityContext.allowPrivilegeEscalation, false);
      assert.deepEqual(c.securityContext.capabilities.drop, ["ALL"]);
      for (const k of ["cpu", "memory"]) assert.ok(c.resources.requests[k], `no ${k} request`);
      assert.ok(c.resources.limits.memory, "no memory limit");
      for (const probe of [c.livenessProbe, c.readinessProbe]) {
        assert.deepEqual(probe.httpGet, { path: "/healthz", port: "http" });
      }
      const http = c.ports.find((p) => p.name === "http");
      assert.ok(http);
      const listen = c.env.find((e) => e.name === "TRACKER_LISTEN").value;
      assert.equal(listen, `0.0.0.0:${http.containerPort}`);
      const svc = one(objs, "Service", "usage-tracking");
      assert.equal(svc.spec.ports[0].targetPort, "http");
      for (const [k, v] of Object.entries(svc.spec.selector)) assert.equal(dep.spec.template.metadata.labels[k], v);
      const sm = one(objs, "ServiceMonitor");
      for (const [k, v] of Object.entries(sm.spec.selector.matchLabels)) assert.equal(svc.metadata.labels[k], v);
      assert.deepEqual(
        sm.spec.endpoints.map((e) => [e.port, e.path, e.interval]),
        [["http", "/metrics", "15s"]],
      );
    });

    it("keeps the pluginConfig the e2e test runs in Envoy", () => {
      // tests/tests/istio.rs merges base/wasmplugin.yaml with base/wasmplugin-config.yaml
      // the same way; the gateway-api variant must be exactly that.
      const [base] = readYaml(join(ISTIO, "base/wasmplugin.yaml"));
      const [patch] = readYaml(join(ISTIO, "base/wasmplugin-config.yaml"));
      const merged = mergePatch(base, patch);
      const wp = one(objs, "WasmPlugin", "tollgate");
      if (variant.startsWith("gateway-api")) assert.deepEqual(wp.spec, merged.spec);
      else assert.deepEqual(wp.spec.vmConfig, merged.spec.vmConfig);
    });
  });
}

describe("the gateway patches (applied to the gateway the user already has)", () => {
  it("points a Gateway API gateway at the options ConfigMap, and the result validates", () => {
    const [gw] = readYaml(join(ISTIO, "test/fixtures/llm-d-gateway.yaml"));
    const [patch] = readYaml(join(ISTIO, "gateway-patches/gateway-api.yaml"));
    const patched = mergePatch(gw, patch);
    validate(patched);
    const cm = one(kustomize(ISTIO), "ConfigMap", "tollgate-gateway-options");
    assert.deepEqual(patched.spec.infrastructure.parametersRef, { group: "", kind: "ConfigMap", name: cm.metadata.name });
    assert.equal(cm.metadata.namespace, gw.metadata.namespace, "parametersRef is namespace-local");
  });

  it("gives Istio's generated gateway Deployment the env vars, and the result validates", () => {
    const [dep] = readYaml(join(ISTIO, "test/fixtures/gateway-deployment.yaml"));
    const cm = one(kustomize(ISTIO), "ConfigMap", "tollgate-gateway-options");
    const patched = strategicMergeDeployment(dep, parseYaml(cm.data.deployment, "deployment")[0]);
    validate(patched);
    const env = patched.spec.template.spec.containers[0].env.map((e) => e.name);
    assert.deepEqual(env, ["POD_NAMESPACE", "ISTIO_META_SERVICE_ACCOUNT", "TOLLGATE_API_KEYS", "TOLLGATE_JWKS"]);
  });

  it("gives a classic ingress gateway the env vars, and the result validates", () => {
    const [dep] = readYaml(join(ISTIO, "test/fixtures/classic-ingressgateway.yaml"));
    const [patch] = readYaml(join(ISTIO, "gateway-patches/classic-ingress.yaml"));
    const patched = strategicMergeDeployment(dep, patch);
    validate(patched);
    const labels = patched.spec.template.metadata.labels;
    const wp = one(kustomize(VARIANTS[Object.keys(VARIANTS)[1]]), "WasmPlugin");
    for (const [k, v] of Object.entries(wp.spec.selector.matchLabels)) assert.equal(labels[k], v, "selector misses");
    assert.equal(patched.metadata.namespace, wp.metadata.namespace);
  });
});

describe("the bundle's files", () => {
  const yamlFiles = (dir) =>
    readdirSync(dir).flatMap((f) => {
      const p = join(dir, f);
      if (f === "node_modules") return [];
      if (statSync(p).isDirectory()) return yamlFiles(p);
      return /\.ya?ml$/.test(f) ? [p] : [];
    });

  it("all parse, and each is used by a kustomization, a documented patch or a test", () => {
    const known = new Set([
      "kustomization.yaml",
      "gateway-options.yaml",
      "base/kustomization.yaml",
      "base/wasmplugin.yaml",
      "base/wasmplugin-config.yaml",
      "base/secret.yaml",
      "base/usage-tracking.yaml",
      "base/servicemonitor.yaml",
      "overlays/classic-ingress/kustomization.yaml",
      "gateway-patches/gateway-api.yaml",
      "gateway-patches/classic-ingress.yaml",
      "examples/users.yaml",
      "test/fixtures/llm-d-gateway.yaml",
      "test/fixtures/gateway-deployment.yaml",
      "test/fixtures/classic-ingressgateway.yaml",
    ]);
    for (const f of yamlFiles(ISTIO)) {
      readYaml(f);
      assert.ok(known.has(relative(ISTIO, f)), `${relative(ROOT, f)} is not covered by these tests`);
    }
  });

  it("the tracker's Containerfile copies every workspace member", () => {
    const cargo = readFileSync(join(ROOT, "Cargo.toml"), "utf8");
    const members = JSON.parse(/members\s*=\s*(\[[^\]]*\])/.exec(cargo)[1]);
    const containerfile = readFileSync(join(ROOT, "tracker/Containerfile"), "utf8");
    const copied = [...containerfile.matchAll(/^COPY\s+(?:--\S+\s+)*(\S+)\s+\S+\s*$/gm)].map((m) => m[1]);
    for (const m of members) assert.ok(copied.includes(m), `tracker/Containerfile does not COPY ${m}`);
    assert.match(containerfile, /^USER 65532/m);
  });
});
