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
  kustomizeWithComponents,
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
      for (const k of [
        "StatefulSet",
        "Secret",
        "Service",
        "ServiceMonitor",
        "WasmPlugin",
        "AuthorizationPolicy",
        "NetworkPolicy",
        "PodDisruptionBudget",
      ]) {
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
      const named = [
        pc.api_keys?.keys_env,
        ...(pc.jwt?.providers ?? []).map((p) => p.jwks_env),
        pc.usage?.token_env,
      ].filter(Boolean);
      assert.deepEqual([...named].sort(), vmEnv, "vmConfig.env and the pluginConfig's *_env differ");
      // Only the gateways may report usage (issue 13): on by default.
      assert.equal(pc.usage.token_env, "TOLLGATE_INGEST_TOKEN");

      const patch = gatewayEnvPatch(variant, objs);
      const proxy = patch.spec.template.spec.containers.find((c) => c.name === "istio-proxy");
      const secret = one(objs, "Secret", "tollgate-credentials");
      for (const name of vmEnv) {
        const e = proxy.env.find((x) => x.name === name);
        assert.ok(e, `the gateway's istio-proxy gets no env var ${name}`);
        const ref = e.valueFrom.secretKeyRef;
        assert.ok(!ref.optional, `${name} is optional: a missing Secret would refuse the config`);
        const from = one(objs, "Secret", ref.name);
        assert.ok(ref.key in from.stringData, `Secret ${ref.name} has no key ${ref.key}`);
        if (name !== pc.usage.token_env) assert.equal(ref.name, secret.metadata.name);
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
      const dep = one(objs, "StatefulSet", "usage-tracking");
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

    it("runs the tracker with a durable ledger and its tokens from a Secret", () => {
      const sts = one(objs, "StatefulSet", "usage-tracking");
      const pod = sts.spec.template.spec;
      const [c] = pod.containers;
      const env = Object.fromEntries(c.env.map((e) => [e.name, e]));
      // SQLite on the StatefulSet's volume: one replica (one writer), the volume mounted
      // where TRACKER_DATA_DIR points, writable by the tracker's group.
      assert.equal(sts.spec.replicas, 1, "SQLite has one writer");
      const [claim] = sts.spec.volumeClaimTemplates;
      const mount = c.volumeMounts.find((m) => m.name === claim.metadata.name);
      assert.ok(mount, "the ledger volume is not mounted");
      assert.equal(env.TRACKER_DATA_DIR.value, mount.mountPath);
      assert.ok(/^\d+Gi$/.test(claim.spec.resources.requests.storage));
      assert.equal(pod.securityContext.fsGroup, pod.securityContext.runAsGroup);
      assert.deepEqual(env.TRACKER_REPLICA_ID.valueFrom, { fieldRef: { fieldPath: "metadata.name" } });
      for (const m of c.volumeMounts) {
        const known = [...(pod.volumes ?? []).map((v) => v.name), ...sts.spec.volumeClaimTemplates.map((t) => t.metadata.name)];
        assert.ok(known.includes(m.name), `volumeMount ${m.name} has no volume`);
      }
      const tokens = one(objs, "Secret", "usage-tracking-tokens");
      const ref = env.TRACKER_API_TOKEN.valueFrom.secretKeyRef;
      assert.equal(ref.name, tokens.metadata.name);
      assert.ok(ref.key in tokens.stringData);
      assert.ok("TRACKER_INGEST_TOKEN" in tokens.stringData);
      // The keys API's admin secret (tollgate key create/list/revoke), from the same Secret.
      const admin = env.TRACKER_ADMIN_TOKEN.valueFrom.secretKeyRef;
      assert.deepEqual(admin, { name: tokens.metadata.name, key: "TRACKER_ADMIN_TOKEN" });
      assert.ok(admin.key in tokens.stringData);
      const secrets = ["TRACKER_API_TOKEN", "TRACKER_INGEST_TOKEN", "TRACKER_ADMIN_TOKEN"].map((k) => tokens.stringData[k]);
      assert.equal(new Set(secrets).size, 3, "the three secrets differ");
      assert.equal(sts.spec.serviceName, one(objs, "Service", "usage-tracking").metadata.name);
    });

    it("lets only the gateway report usage, and bounds disruption", () => {
      const sts = one(objs, "StatefulSet", "usage-tracking");
      const podLabels = sts.spec.template.metadata.labels;
      const matches = (selector) => Object.entries(selector).every(([k, v]) => podLabels[k] === v);
      const wp = one(objs, "WasmPlugin", "tollgate");
      // The gateway's pods and identity: Istio runs a Gateway API gateway as <name>-istio
      // (pods labelled gateway.networking.k8s.io/gateway-name), the classic one as
      // istio-ingressgateway-service-account in istio-system.
      const gateway = variant.startsWith("gateway-api")
        ? {
            principal: `cluster.local/ns/${wp.metadata.namespace}/sa/${wp.spec.targetRefs[0].name}-istio`,
            pods: { "gateway.networking.k8s.io/gateway-name": wp.spec.targetRefs[0].name },
          }
        : {
            principal: "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
            pods: wp.spec.selector.matchLabels,
          };
      // The policy is enforced by the tracker's sidecar: it must have one.
      assert.equal(podLabels["sidecar.istio.io/inject"], "true");
      const ap = one(objs, "AuthorizationPolicy", "usage-tracking");
      assert.ok(matches(ap.spec.selector.matchLabels));
      assert.equal(ap.spec.action, "ALLOW");
      // The gateway-only rule holds exactly the gateway's endpoints: usage reports, the
      // leases of global limits, and managed keys (resolve by digest, the revocations).
      const track = ap.spec.rules.filter((r) => r.to.some((t) => t.operation.paths.includes("/track")));
      assert.equal(track.length, 1, "one rule for /track");
      assert.deepEqual(track[0].from, [{ source: { principals: [gateway.principal] } }]);
      assert.deepEqual(track[0].to, [
        { operation: { methods: ["POST"], paths: ["/track", "/v1/limits/sync", "/v1/keys/resolve"] } },
        { operation: { methods: ["GET"], paths: ["/v1/keys/changes"] } },
      ]);
      assert.equal(track[0].when, undefined);
      // Istio's path match: exact, or one `*` as a prefix or suffix wildcard.
      const pathMatches = (pattern, path) =>
        pattern === "*" ||
        pattern === path ||
        (pattern.endsWith("*") && path.startsWith(pattern.slice(0, -1))) ||
        (pattern.startsWith("*") && path.endsWith(pattern.slice(1)));
      const opens = (op, method, path) =>
        (op.methods ?? [method]).includes(method) &&
        (op.paths ?? ["*"]).some((p) => pathMatches(p, path)) &&
        !(op.notPaths ?? []).some((p) => pathMatches(p, path)) &&
        !(op.notMethods ?? []).includes(method);
      const gatewayOnly = ["/track", "/v1/limits/sync", "/v1/limits/x", "/v1/keys/resolve", "/v1/keys/changes"];
      const others = ap.spec.rules.filter((x) => x !== track[0]);
      for (const r of others) {
        assert.equal(r.from, undefined, "the other rules are for anyone in the mesh");
        for (const t of r.to) {
          for (const method of ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]) {
            for (const path of gatewayOnly) {
              assert.ok(!opens(t.operation, method, path), `${method} ${path} opened to anyone: ${JSON.stringify(t)}`);
            }
          }
          // Writes only on the keys API (guarded by TRACKER_ADMIN_TOKEN); reads otherwise.
          const writes = t.operation.methods.filter((m) => m !== "GET");
          if (writes.length > 0) {
            for (const p of t.operation.paths) assert.ok(["/v1/keys", "/v1/keys/*"].includes(p), `${writes} ${p}`);
          }
        }
      }
      // The keys API (POST, GET /v1/keys; DELETE /v1/keys/{id}) from anyone in the mesh.
      const anyone = (method, path) => others.some((r) => r.to.some((t) => opens(t.operation, method, path)));
      for (const [method, path] of [
        ["POST", "/v1/keys"],
        ["GET", "/v1/keys"],
        ["DELETE", "/v1/keys/key_3f2a9c01d4e5b6a7"],
        ["GET", "/v1/usage"],
        ["GET", "/v1/usage/recent"],
        ["GET", "/metrics"],
        ["GET", "/healthz"],
      ]) {
        assert.ok(anyone(method, path), `${method} ${path} is not open to the mesh`);
      }
      for (const [method, path] of [
        ["DELETE", "/v1/keys"],
        ["POST", "/v1/keys/key_1"],
        ["GET", "/v1/keys/key_1"],
        ["POST", "/v1/usage"],
      ]) {
        assert.ok(!anyone(method, path), `${method} ${path} is open to the mesh`);
      }
      const np = one(objs, "NetworkPolicy", "usage-tracking");
      assert.ok(matches(np.spec.podSelector.matchLabels));
      assert.deepEqual(np.spec.policyTypes, ["Ingress"]);
      const [rule] = np.spec.ingress;
      assert.deepEqual(rule.from[0], { podSelector: { matchLabels: gateway.pods } });
      assert.deepEqual(rule.ports, [{ port: "http", protocol: "TCP" }]);
      const pdb = one(objs, "PodDisruptionBudget", "usage-tracking");
      assert.ok(matches(pdb.spec.selector.matchLabels));
      // One SQLite replica: a drain may take it down (the gateways queue meanwhile); a
      // minAvailable of 1 would block every drain.
      assert.equal(pdb.spec.maxUnavailable, 1);
      assert.equal(pdb.spec.minAvailable, undefined);
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
    assert.deepEqual(env, [
      "POD_NAMESPACE",
      "ISTIO_META_SERVICE_ACCOUNT",
      "TOLLGATE_API_KEYS",
      "TOLLGATE_JWKS",
      "TOLLGATE_INGEST_TOKEN",
    ]);
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

describe("components (enabled in the kustomization a user applies)", () => {
  const rendered = kustomizeWithComponents(["postgresql"]);
  for (const [variant, objs] of Object.entries(rendered)) {
    it(`${variant}: every object still validates`, () => {
      for (const o of objs) validate(o);
    });

    it(`${variant}: the ingest token still reaches the tracker and the filter from one Secret key`, () => {
      const wp = one(objs, "WasmPlugin", "tollgate");
      const name = wp.spec.pluginConfig.usage.token_env;
      assert.equal(name, "TOLLGATE_INGEST_TOKEN");
      const vmEnv = wp.spec.vmConfig.env.map((e) => e.name);
      assert.ok(vmEnv.includes(name) && vmEnv.includes("TOLLGATE_API_KEYS"), `vmConfig.env ${vmEnv}`);
      assert.equal(wp.spec.vmConfig.env.find((e) => e.name === name).valueFrom, "HOST");
      const proxy = gatewayEnvPatch(variant, objs).spec.template.spec.containers.find((c) => c.name === "istio-proxy");
      const gatewayRef = proxy.env.find((e) => e.name === name).valueFrom.secretKeyRef;
      const tracker = one(objs, "StatefulSet", "usage-tracking").spec.template.spec.containers[0];
      const trackerRef = tracker.env.find((e) => e.name === "TRACKER_INGEST_TOKEN").valueFrom.secretKeyRef;
      assert.deepEqual({ name: gatewayRef.name, key: gatewayRef.key }, trackerRef);
      assert.ok(trackerRef.key in one(objs, "Secret", trackerRef.name).stringData);
    });

    it(`${variant}: postgresql runs replicas on the database from a Secret`, () => {
      const sts = one(objs, "StatefulSet", "usage-tracking");
      const [c] = sts.spec.template.spec.containers;
      const env = Object.fromEntries(c.env.map((e) => [e.name, e]));
      assert.ok(sts.spec.replicas >= 2);
      assert.equal(sts.spec.volumeClaimTemplates, undefined);
      assert.equal(env.TRACKER_DATA_DIR, undefined, "--data-dir and --database-url together");
      const ref = env.TRACKER_DATABASE_URL.valueFrom.secretKeyRef;
      assert.match(one(objs, "Secret", ref.name).stringData[ref.key], /^postgres:\/\//);
      const volumes = (sts.spec.template.spec.volumes ?? []).map((v) => v.name);
      for (const m of c.volumeMounts ?? []) assert.ok(volumes.includes(m.name), `volumeMount ${m.name} has no volume`);
      const pdb = one(objs, "PodDisruptionBudget", "usage-tracking");
      assert.deepEqual([pdb.spec.minAvailable, pdb.spec.maxUnavailable], [1, undefined]);
    });
  }
});

describe("istio/README.md", () => {
  const readme = readFileSync(join(ISTIO, "README.md"), "utf8");

  it("states the Istio version each feature needs, and nothing older anywhere in the bundle", () => {
    const start = readme.indexOf("## Istio versions");
    assert.ok(start >= 0, "no '## Istio versions' section");
    const section = readme.slice(start, readme.indexOf("\n## ", start + 1));
    const rows = Object.fromEntries(
      [...section.matchAll(/^\| `([^`]+)`[^|]* \| (1\.\d+) \|/gm)].map((m) => [m[1], m[2]]),
    );
    assert.deepEqual(
      { targetRefs: rows.targetRefs, parametersRef: rows["infrastructure.parametersRef"], reload: rows.FAIL_RELOAD },
      { targetRefs: "1.22", parametersRef: "1.26", reload: "1.27" },
      `version rows: ${JSON.stringify(rows)}`,
    );
    // No file of the bundle may promise an older Istio for these.
    const files = [join(ISTIO, "README.md"), join(ROOT, "README.md")];
    const walk = (dir) =>
      readdirSync(dir).flatMap((f) => {
        const p = join(dir, f);
        if (f === "node_modules" || f === "test") return [];
        return statSync(p).isDirectory() ? walk(p) : /\.ya?ml$/.test(f) ? [p] : [];
      });
    for (const f of [...files, ...walk(ISTIO)]) {
      const text = readFileSync(f, "utf8");
      for (const m of text.matchAll(/(parametersRef|ConfigMap route|FAIL_RELOAD|targetRefs)[^\n]{0,80}?(1\.2\d)/g)) {
        const want = { parametersRef: "1.26", "ConfigMap route": "1.26", FAIL_RELOAD: "1.27", targetRefs: "1.22" }[m[1]];
        assert.equal(m[2], want, `${relative(ROOT, f)}: "${m[0]}"`);
      }
    }
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
      "base/tracker-secret.yaml",
      "base/usage-tracking-policy.yaml",
      "base/servicemonitor.yaml",
      "components/postgresql/kustomization.yaml",
      "components/postgresql/database-secret.yaml",
      "overlays/classic-ingress/kustomization.yaml",
      "gateway-patches/gateway-api.yaml",
      "gateway-patches/classic-ingress.yaml",
      "examples/users.yaml",
      "dashboards/tollgate-dashboard-configmap.yaml",
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
