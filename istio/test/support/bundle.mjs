// Helpers for the bundle tests: kustomize rendering, schema lookup by apiVersion/kind,
// the two patch flavours the bundle relies on (JSON merge patch, as kustomize and
// `kubectl patch --type=merge` apply to custom resources; strategic merge by name for
// containers and env, as Istio and `kubectl patch` apply to Deployments), a tar reader.

import { execFileSync } from "node:child_process";
import { appendFileSync, cpSync, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";

import { WasmPlugin } from "@kubernetes-models/istio/extensions.istio.io/v1alpha1";
import { Gateway } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";
import { AuthorizationPolicy } from "@kubernetes-models/istio/security.istio.io/v1";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { Deployment, StatefulSet } from "kubernetes-models/apps/v1";
import { NetworkPolicy } from "kubernetes-models/networking.k8s.io/v1";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1";
import { ConfigMap, Secret, Service, ServiceAccount } from "kubernetes-models/v1";

export const ISTIO = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const ROOT = resolve(ISTIO, "..");

const MODELS = {
  "extensions.istio.io/v1alpha1/WasmPlugin": WasmPlugin,
  "gateway.networking.k8s.io/v1/Gateway": Gateway,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "security.istio.io/v1/AuthorizationPolicy": AuthorizationPolicy,
  "apps/v1/Deployment": Deployment,
  "apps/v1/StatefulSet": StatefulSet,
  "networking.k8s.io/v1/NetworkPolicy": NetworkPolicy,
  "policy/v1/PodDisruptionBudget": PodDisruptionBudget,
  "v1/ConfigMap": ConfigMap,
  "v1/Secret": Secret,
  "v1/Service": Service,
  "v1/ServiceAccount": ServiceAccount,
};

/** Validates `obj` against the published schema of its kind; throws naming the object. */
export function validate(obj) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const Model = MODELS[key];
  if (!Model) throw new Error(`no schema known for ${key} (${obj.metadata?.name})`);
  try {
    new Model(structuredClone(obj)).validate();
  } catch (e) {
    throw new Error(`${key} ${obj.metadata?.name}: ${e.message}`);
  }
}

export function parseYaml(text, what) {
  const docs = parseAllDocuments(text);
  for (const d of docs) {
    if (d.errors.length) throw new Error(`${what}: ${d.errors[0].message}`);
  }
  return docs.map((d) => d.toJS()).filter((d) => d != null);
}

export function readYaml(path) {
  return parseYaml(readFileSync(path, "utf8"), path);
}

/** kustomize build of a directory: `kustomize` when installed, else `kubectl kustomize`. */
export function kustomize(dir) {
  const tools = [
    ["kustomize", ["version"], ["build", dir]],
    ["kubectl", ["version", "--client"], ["kustomize", dir]],
  ];
  for (const [tool, probe, args] of tools) {
    try {
      execFileSync(tool, probe, { stdio: "ignore" });
    } catch {
      continue;
    }
    return parseYaml(execFileSync(tool, args, { encoding: "utf8" }), `${tool} ${args.join(" ")}`);
  }
  throw new Error("neither kustomize nor kubectl (which embeds kustomize) is installed");
}

/** The kustomizations of the bundle, by the command a user runs. */
export const VARIANTS = {
  "gateway-api (kubectl apply -k istio)": ISTIO,
  "classic-ingress (kubectl apply -k istio/overlays/classic-ingress)": join(ISTIO, "overlays/classic-ingress"),
};

/**
 * The variants with kustomize components enabled, as a user enables them: a copy of the
 * bundle (kustomize refuses to load files outside a kustomization's root, and a
 * kustomization inside istio/ cannot take istio/ as a resource) whose kustomizations
 * list `components`. Returns {variant: objects}.
 */
export function kustomizeWithComponents(components) {
  const dir = mkdtempSync(join(tmpdir(), "tollgate-bundle-"));
  try {
    cpSync(ISTIO, dir, { recursive: true, filter: (src) => !relative(ISTIO, src).startsWith("test") });
    const out = {};
    for (const [variant, variantDir] of Object.entries(VARIANTS)) {
      const copy = join(dir, relative(ISTIO, variantDir));
      const up = relative(copy, dir) || ".";
      const list = components.map((c) => `  - ${up === "." ? "" : `${up}/`}components/${c}`).join("\n");
      appendFileSync(join(copy, "kustomization.yaml"), `\ncomponents:\n${list}\n`);
      out[variant] = kustomize(copy);
    }
    return out;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** RFC 7386 JSON merge patch. */
export function mergePatch(target, patch) {
  if (patch === null || typeof patch !== "object" || Array.isArray(patch)) return structuredClone(patch);
  const out = target && typeof target === "object" && !Array.isArray(target) ? structuredClone(target) : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}

function mergeByName(base = [], patch = [], merge) {
  const out = structuredClone(base);
  for (const p of patch) {
    const i = out.findIndex((x) => x.name === p.name);
    if (i >= 0) out[i] = merge(out[i], p);
    else out.push(structuredClone(p));
  }
  return out;
}

/** Strategic merge of a Deployment patch: containers and their env merge by name. */
export function strategicMergeDeployment(deployment, patch) {
  const patchedContainers = patch?.spec?.template?.spec?.containers;
  const rest = structuredClone(patch);
  if (patchedContainers) delete rest.spec.template.spec.containers;
  const out = mergePatch(deployment, rest);
  if (patchedContainers) {
    out.spec.template.spec.containers = mergeByName(
      deployment.spec.template.spec.containers,
      patchedContainers,
      (c, p) => {
        const { env, ...other } = p;
        const merged = mergePatch(c, other);
        if (env) merged.env = mergeByName(c.env, env, (_, e) => structuredClone(e));
        return merged;
      },
    );
  }
  return out;
}

/** Entries of a tar archive (ustar/pax/gnu), as Go's archive/tar would list them. */
export function readTar(buf) {
  const entries = [];
  let off = 0;
  let paxPath = null;
  let longName = null;
  let ended = false;
  while (off + 512 <= buf.length) {
    const header = buf.subarray(off, off + 512);
    if (header.every((b) => b === 0)) {
      ended = true;
      break;
    }
    const str = (a, n) => {
      const s = header.subarray(a, a + n);
      const z = s.indexOf(0);
      return s.subarray(0, z < 0 ? n : z).toString("utf8");
    };
    const size = parseInt(str(124, 12).trim() || "0", 8);
    const type = str(156, 1) || "0";
    const sum = [...header].reduce((s, b, i) => s + (i >= 148 && i < 156 ? 32 : b), 0);
    if (sum !== parseInt(str(148, 8).trim(), 8)) throw new Error(`tar: bad header checksum at ${off}`);
    const prefix = str(257, 6).startsWith("ustar") ? str(345, 155) : "";
    let name = prefix ? `${prefix}/${str(0, 100)}` : str(0, 100);
    const data = buf.subarray(off + 512, off + 512 + size);
    if (data.length !== size) throw new Error(`tar: ${name} is truncated`);
    off += 512 + Math.ceil(size / 512) * 512;
    if (type === "x") {
      const m = /\d+ path=([^\n]*)\n/.exec(data.toString("utf8"));
      paxPath = m ? m[1] : null;
      continue;
    }
    if (type === "L") {
      longName = data.toString("utf8").replace(/\0.*$/s, "");
      continue;
    }
    if (type === "g") continue;
    name = paxPath ?? longName ?? name;
    paxPath = longName = null;
    entries.push({ name, type, size, mode: parseInt(str(100, 8).trim(), 8), data: Buffer.from(data) });
  }
  if (!ended) throw new Error("tar: no end-of-archive marker");
  return entries;
}

export const exists = existsSync;
