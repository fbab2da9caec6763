// `make oci` (scripts/oci.sh): the image is what Istio's WasmPlugin fetcher accepts — an
// OCI manifest whose last (only) layer is application/vnd.oci.image.layer.v1.tar+gzip
// holding plugin.wasm — every blob matches its digest, the printed digest is the
// manifest's (the WasmPlugin `sha256`), plugin.wasm is byte-identical to the built
// filter, the build is reproducible, and the tarball holds the same layout. When
// Debian's docker-registry is installed, the image is also pushed to a registry on
// loopback with skopeo and pulled back over the registry API, as Istio pulls it.

import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { after, before, describe, it } from "node:test";
import { gunzipSync } from "node:zlib";

import { ROOT, exists, readTar } from "./support/bundle.mjs";

const WASM = join(ROOT, "target/wasm32-wasip1/release/tollgate_filter.wasm");
const OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json";

const sha256 = (buf) => createHash("sha256").update(buf).digest("hex");
const version = /\[workspace\.package\][^[]*?\nversion\s*=\s*"([^"]+)"/.exec(
  readFileSync(join(ROOT, "Cargo.toml"), "utf8"),
)[1];

function buildImage(out) {
  const stdout = execFileSync("bash", [join(ROOT, "scripts/oci.sh")], {
    cwd: ROOT,
    encoding: "utf8",
    env: { ...process.env, TOLLGATE_OCI_OUT: out },
  });
  const m = /^sha256: ([0-9a-f]{64})$/m.exec(stdout);
  assert.ok(m, `no "sha256: <hex>" line in:\n${stdout}`);
  return m[1];
}

/** What Istio does with a manifest: the last layer must be OCI tar+gzip with plugin.wasm. */
function wasmFromImage(manifest, blob) {
  assert.notEqual(manifest.mediaType, DOCKER_MANIFEST);
  const layer = manifest.layers.at(-1);
  assert.equal(layer.mediaType, OCI_LAYER);
  const entries = readTar(gunzipSync(blob(layer.digest)));
  const wasm = entries.find((e) => basename(e.name) === "plugin.wasm");
  assert.ok(wasm, `no plugin.wasm in the layer: ${entries.map((e) => e.name)}`);
  assert.equal(wasm.type, "0", "plugin.wasm is not a regular file");
  return wasm.data;
}

describe("make oci", () => {
  let out;
  let digest;
  const layoutDir = () => join(out, "tollgate-filter");
  const blobPath = (d) => join(layoutDir(), "blobs", ...d.split(":"));
  const json = (p) => JSON.parse(readFileSync(p, "utf8"));

  before(() => {
    assert.ok(exists(WASM), `${WASM} is missing: run make wasm`);
    out = mkdtempSync(join(tmpdir(), "tollgate-oci-"));
    digest = buildImage(out);
  });
  after(() => rmSync(out, { recursive: true, force: true }));

  it("writes an OCI image layout whose index names the printed digest", () => {
    assert.deepEqual(json(join(layoutDir(), "oci-layout")), { imageLayoutVersion: "1.0.0" });
    const index = json(join(layoutDir(), "index.json"));
    assert.equal(index.schemaVersion, 2);
    assert.equal(index.manifests.length, 1);
    const [desc] = index.manifests;
    assert.equal(desc.mediaType, OCI_MANIFEST);
    assert.equal(desc.annotations["org.opencontainers.image.ref.name"], version);
    assert.equal(desc.digest, `sha256:${digest}`);
    const raw = readFileSync(blobPath(desc.digest));
    assert.equal(sha256(raw), digest, "the printed digest is not the manifest's");
    assert.equal(raw.length, desc.size);
    assert.equal(readFileSync(join(out, "tollgate-filter.sha256"), "utf8").trim(), digest);
  });

  it("has the manifest, config and single layer Istio expects, each matching its digest", () => {
    const manifest = json(blobPath(`sha256:${digest}`));
    assert.equal(manifest.schemaVersion, 2);
    assert.equal(manifest.config.mediaType, OCI_CONFIG);
    assert.equal(manifest.layers.length, 1);
    assert.equal(manifest.layers[0].mediaType, OCI_LAYER);
    for (const d of [manifest.config, ...manifest.layers]) {
      const b = readFileSync(blobPath(d.digest));
      assert.equal(`sha256:${sha256(b)}`, d.digest);
      assert.equal(b.length, d.size);
    }
    const blobs = readdirSync(join(layoutDir(), "blobs/sha256")).sort();
    assert.deepEqual(blobs, [digest, ...[manifest.config, ...manifest.layers].map((d) => d.digest.slice(7))].sort());
    const config = json(blobPath(manifest.config.digest));
    const layer = gunzipSync(readFileSync(blobPath(manifest.layers[0].digest)));
    assert.deepEqual(config.rootfs, { type: "layers", diff_ids: [`sha256:${sha256(layer)}`] });
  });

  it("holds plugin.wasm byte-identical to the built filter", () => {
    const manifest = json(blobPath(`sha256:${digest}`));
    const wasm = wasmFromImage(manifest, (d) => readFileSync(blobPath(d)));
    assert.deepEqual(wasm.subarray(0, 4), Buffer.from([0, 0x61, 0x73, 0x6d]), "not a wasm module");
    assert.ok(wasm.equals(readFileSync(WASM)), "plugin.wasm differs from the built filter");
  });

  it("is reproducible: the same filter gives the same digest", () => {
    const again = mkdtempSync(join(tmpdir(), "tollgate-oci-"));
    try {
      assert.equal(buildImage(again), digest);
    } finally {
      rmSync(again, { recursive: true, force: true });
    }
  });

  it("writes a tarball holding the same layout", () => {
    const entries = readTar(readFileSync(join(out, "tollgate-filter.oci.tar")));
    const files = entries.filter((e) => e.type === "0");
    assert.deepEqual(files.map((e) => e.name).sort(), [
      "blobs/sha256/" + digest,
      ...readdirSync(join(layoutDir(), "blobs/sha256"))
        .filter((b) => b !== digest)
        .map((b) => "blobs/sha256/" + b),
      "index.json",
      "oci-layout",
    ].sort());
    for (const f of files) assert.ok(f.data.equals(readFileSync(join(layoutDir(), f.name))), f.name);
  });

  const registry = spawnableRegistry();
  it("pushes with skopeo and pulls back over the registry API with the same digest", { skip: registry ? false : "docker-registry is not installed (make setup installs it)" }, async () => {
    const port = await freePort();
    const dir = mkdtempSync(join(tmpdir(), "tollgate-registry-"));
    writeFileSync(
      join(dir, "config.yml"),
      `version: 0.1\nlog: {level: error}\nstorage: {filesystem: {rootdirectory: ${dir}/data}}\nhttp: {addr: 127.0.0.1:${port}}\n`,
    );
    const proc = spawn(registry, ["serve", join(dir, "config.yml")], { stdio: "ignore" });
    const base = `http://127.0.0.1:${port}/v2`;
    try {
      await waitFor(async () => (await fetch(`${base}/`)).ok);
      const ref = `127.0.0.1:${port}/tollgate/tollgate-filter:${version}`;
      execFileSync("skopeo", ["copy", "--quiet", "--dest-tls-verify=false", `oci:${layoutDir()}:${version}`, `docker://${ref}`]);
      const resp = await fetch(`${base}/tollgate/tollgate-filter/manifests/${version}`, {
        headers: { Accept: [OCI_MANIFEST, DOCKER_MANIFEST].join(", ") },
      });
      assert.equal(resp.status, 200);
      assert.equal(resp.headers.get("docker-content-digest"), `sha256:${digest}`);
      const raw = Buffer.from(await resp.arrayBuffer());
      assert.equal(sha256(raw), digest, "the registry serves other manifest bytes");
      const manifest = JSON.parse(raw);
      const blobs = new Map();
      for (const l of manifest.layers) {
        const r = await fetch(`${base}/tollgate/tollgate-filter/blobs/${l.digest}`);
        blobs.set(l.digest, Buffer.from(await r.arrayBuffer()));
      }
      const wasm = wasmFromImage(manifest, (d) => blobs.get(d));
      assert.ok(wasm.equals(readFileSync(WASM)));
    } finally {
      proc.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

function spawnableRegistry() {
  for (const p of ["/usr/bin/docker-registry"]) if (exists(p)) return p;
  return null;
}

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
    s.on("error", rej);
  });
}

async function waitFor(ready, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await ready()) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error("the registry did not start");
    await new Promise((r) => setTimeout(r, 100));
  }
}
