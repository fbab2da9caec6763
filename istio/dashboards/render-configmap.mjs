// Writes tollgate-dashboard-configmap.yaml from tollgate.json (the source of truth):
//   node istio/dashboards/render-configmap.mjs
// The ConfigMap carries the label Grafana's dashboard sidecar looks for by default
// (`grafana_dashboard: "1"`); istio/test/dashboard.test.mjs checks the two agree.

import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

export function renderConfigMap(json) {
  JSON.parse(json); // refuse to embed something that is not JSON
  const body = json
    .replace(/\n$/, "")
    .split("\n")
    .map((l) => `    ${l}`)
    .join("\n");
  return `# Generated from tollgate.json by \`node istio/dashboards/render-configmap.mjs\`: edit the JSON, then run it.
# Grafana's dashboard sidecar (kube-prometheus-stack, the Grafana Helm chart) loads every
# ConfigMap labelled grafana_dashboard: "1" in the namespaces it watches.
apiVersion: v1
kind: ConfigMap
metadata:
  name: tollgate-dashboard
  labels:
    grafana_dashboard: "1"
    app.kubernetes.io/name: tollgate-dashboard
    app.kubernetes.io/part-of: tollgate
data:
  tollgate.json: |
${body}
`;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const json = readFileSync(join(here, "tollgate.json"), "utf8");
  writeFileSync(join(here, "tollgate-dashboard-configmap.yaml"), renderConfigMap(json));
}
