// The Grafana dashboard (istio/dashboards/tollgate.json) and its ConfigMap: the JSON
// parses, the ConfigMap is exactly what render-configmap.mjs makes of it (so the two
// cannot drift) and validates as a Kubernetes ConfigMap with the sidecar's label, every
// panel has a unique id, the `${datasource}` variable and a PromQL target, every metric
// a query names is one the tracker registers, and the `$user` / `$model` variables
// filter every metric that has those labels. Whether each query parses and returns the
// expected series in a real Prometheus after real traffic: tests/tests/dashboard.rs.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";

import { renderConfigMap } from "../dashboards/render-configmap.mjs";
import { ISTIO, ROOT, readYaml, validate } from "./support/bundle.mjs";

const JSON_PATH = join(ISTIO, "dashboards/tollgate.json");
const CM_PATH = join(ISTIO, "dashboards/tollgate-dashboard-configmap.yaml");
const text = readFileSync(JSON_PATH, "utf8");
const dash = JSON.parse(text);

/** Every panel, rows' nested panels included. */
const allPanels = (panels) => panels.flatMap((p) => [p, ...allPanels(p.panels ?? [])]);
const queryPanels = () => allPanels(dash.panels).filter((p) => p.type !== "row");

/** Counter names the tracker registers (`registry.register("name"` + the `_total` the encoder adds). */
function trackerCounters() {
  const src = readFileSync(join(ROOT, "tracker/src/metrics.rs"), "utf8");
  const names = [...src.matchAll(/register\(\s*"([a-z_]+)"/g)].map((m) => `${m[1]}_total`);
  assert.ok(names.includes("llm_tokens_total") && names.length >= 10, `read ${names}`);
  return new Set(names);
}

// Labels of the tracker's metrics that the dashboard variables filter on.
const USER_METRICS = [
  "llm_requests_total",
  "llm_tokens_total",
  "llm_estimated_tokens_total",
  "llm_incomplete_requests_total",
  "llm_upstream_errors_total",
];
const MODEL_METRICS = ["llm_tokens_total", "llm_estimated_tokens_total"];

describe("Grafana dashboard", () => {
  it("is a dashboard JSON with uid tollgate, a schema version and the three variables", () => {
    assert.equal(dash.uid, "tollgate");
    assert.equal(typeof dash.title, "string");
    assert.ok(Number.isInteger(dash.schemaVersion) && dash.schemaVersion >= 36, `${dash.schemaVersion}`);
    const vars = Object.fromEntries(dash.templating.list.map((v) => [v.name, v]));
    assert.equal(vars.datasource.type, "datasource");
    assert.equal(vars.datasource.query, "prometheus");
    for (const [name, metric] of [
      ["user", "llm_requests_total"],
      ["model", "llm_tokens_total"],
    ]) {
      const v = vars[name];
      assert.ok(v, `no variable ${name}`);
      assert.equal(v.type, "query");
      assert.equal(v.datasource.uid, "${datasource}");
      assert.ok(v.multi && v.includeAll, `${name}: multi and All`);
      assert.equal(v.allValue, ".*");
      assert.match(v.definition, new RegExp(`^label_values\\(${metric}\\b.*, ${name}\\)$`));
      assert.equal(v.query.query, v.definition);
    }
  });

  it("every panel has a unique id; every query panel the ${datasource} variable and PromQL targets", () => {
    const panels = allPanels(dash.panels);
    const ids = panels.map((p) => p.id);
    assert.ok(ids.every(Number.isInteger), `ids ${ids}`);
    assert.equal(new Set(ids).size, ids.length, `duplicate panel ids in ${ids}`);
    assert.ok(queryPanels().length >= 20, `only ${queryPanels().length} panels`);
    for (const p of queryPanels()) {
      assert.deepEqual(p.datasource, { type: "prometheus", uid: "${datasource}" }, p.title);
      assert.ok(p.title && p.gridPos, `panel ${p.id}`);
      assert.ok(Array.isArray(p.targets) && p.targets.length >= 1, `${p.title}: no targets`);
      const refs = p.targets.map((t) => t.refId);
      assert.equal(new Set(refs).size, refs.length, `${p.title}: duplicate refIds`);
      for (const t of p.targets) {
        assert.ok(typeof t.expr === "string" && t.expr.trim().length > 0, `${p.title} ${t.refId}: no expr`);
        assert.deepEqual(t.datasource, { type: "prometheus", uid: "${datasource}" }, `${p.title} ${t.refId}`);
      }
    }
  });

  it("panels fit the 24-column grid without overlapping", () => {
    const boxes = allPanels(dash.panels).map((p) => ({ t: p.title, ...p.gridPos }));
    for (const b of boxes) assert.ok(b.x >= 0 && b.w > 0 && b.x + b.w <= 24 && b.h > 0, `${b.t}: ${JSON.stringify(b)}`);
    for (const [i, a] of boxes.entries()) {
      for (const b of boxes.slice(i + 1)) {
        const overlap = a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
        assert.ok(!overlap, `"${a.t}" overlaps "${b.t}"`);
      }
    }
  });

  it("queries only metrics the tracker exports, filtered by $user and $model where they have those labels", () => {
    const known = trackerCounters();
    const used = new Set();
    for (const p of queryPanels()) {
      for (const t of p.targets) {
        for (const m of t.expr.matchAll(/\b((?:llm|tracker)_[a-z_]+)(\{[^}]*\})?/g)) {
          const [, name, selector = ""] = m;
          used.add(name);
          assert.ok(known.has(name), `${p.title}: ${name} is not a tracker metric`);
          if (USER_METRICS.includes(name)) assert.match(selector, /user=~"\$user"/, `${p.title}: ${m[0]}`);
          if (MODEL_METRICS.includes(name)) assert.match(selector, /model=~"\$model"/, `${p.title}: ${m[0]}`);
        }
      }
    }
    for (const name of [...USER_METRICS, "llm_denied_requests_total", "tracker_events_received_total",
      "tracker_events_duplicate_total", "tracker_requests_rejected_total", "tracker_ledger_errors_total"]) {
      assert.ok(used.has(name), `no panel shows ${name}`);
    }
  });
});

describe("Grafana dashboard ConfigMap", () => {
  const [cm, ...rest] = readYaml(CM_PATH);

  it("is one ConfigMap that validates and carries the sidecar's label", () => {
    assert.equal(rest.length, 0);
    validate(cm);
    assert.equal(cm.kind, "ConfigMap");
    assert.equal(cm.metadata.labels.grafana_dashboard, "1");
  });

  it("embeds exactly istio/dashboards/tollgate.json (regenerate: node istio/dashboards/render-configmap.mjs)", () => {
    assert.equal(cm.data["tollgate.json"], text);
    assert.deepEqual(JSON.parse(cm.data["tollgate.json"]), dash);
    assert.equal(readFileSync(CM_PATH, "utf8"), renderConfigMap(text));
  });
});
