#!/usr/bin/env bash
# `make oci`: packages the built filter as the OCI image an Istio WasmPlugin pulls
# (`url: oci://…`). Format: Istio's "compat" variant — one
# application/vnd.oci.image.layer.v1.tar+gzip layer holding `plugin.wasm`, i.e. what a
# `FROM scratch` + `COPY plugin.wasm /` image is. Built with umoci (Debian), and
# reproducibly (fixed timestamps, owners and modes), so the same .wasm always gives the
# same manifest digest: the value of the WasmPlugin's `sha256`.
#
# Writes $OUT/tollgate-filter/ (OCI image layout, tag = workspace version),
# $OUT/tollgate-filter.oci.tar (the same layout as one tarball, an "oci-archive") and
# $OUT/tollgate-filter.sha256. Prints the manifest digest as `sha256: <hex>`.
# Env: TOLLGATE_WASM (input), TOLLGATE_OCI_OUT (default target/oci), TOLLGATE_OCI_TAG.
set -euo pipefail
cd "$(dirname "$0")/.."

WASM=${TOLLGATE_WASM:-target/wasm32-wasip1/release/tollgate_filter.wasm}
OUT=${TOLLGATE_OCI_OUT:-target/oci}
VERSION=$(awk -F'"' '/^\[workspace.package\]/{p=1} p && /^version *=/{print $2; exit}' Cargo.toml)
TAG=${TOLLGATE_OCI_TAG:-$VERSION}
NAME=tollgate-filter

for tool in umoci skopeo jq; do
  command -v "$tool" >/dev/null 2>&1 || { echo "oci: $tool not found (run make setup)" >&2; exit 1; }
done
[ -f "$WASM" ] || { echo "oci: $WASM not found (run make wasm)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
layout=$tmp/layout
umoci init --layout "$layout"
umoci new --image "$layout:$TAG"
umoci unpack --rootless --image "$layout:$TAG" "$tmp/bundle" >/dev/null
install -m 0644 "$WASM" "$tmp/bundle/rootfs/plugin.wasm"
chmod 0755 "$tmp/bundle/rootfs"
touch -d @0 "$tmp/bundle/rootfs/plugin.wasm" "$tmp/bundle/rootfs"
# --no-history: a history entry would carry the build time and change the digest.
umoci repack --no-history --image "$layout:$TAG" "$tmp/bundle" 2>/dev/null
umoci config --no-history --image "$layout:$TAG" \
  --created 1970-01-01T00:00:00Z \
  --config.label "org.opencontainers.image.title=$NAME" \
  --config.label "org.opencontainers.image.version=$VERSION" \
  --manifest.annotation "module.wasm.image/variant=compat" 2>/dev/null
umoci gc --layout "$layout"
chmod -R u=rwX,go=rX "$layout"

mkdir -p "$OUT"
rm -rf "${OUT:?}/$NAME" "$OUT/$NAME.oci.tar"
cp -r "$layout" "$OUT/$NAME"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
  -C "$OUT/$NAME" -cf "$OUT/$NAME.oci.tar" oci-layout index.json blobs

# The digest Istio compares `sha256` with is that of the manifest bytes.
digest=$(jq -r '.manifests[0].digest' "$OUT/$NAME/index.json")
hex=${digest#sha256:}
[ "$(sha256sum < "$OUT/$NAME/blobs/sha256/$hex" | cut -d' ' -f1)" = "$hex" ] \
  || { echo "oci: manifest blob does not match its digest" >&2; exit 1; }
# skopeo reads both forms back: a malformed layout fails here, not at pull time.
for ref in "oci:$OUT/$NAME:$TAG" "oci-archive:$OUT/$NAME.oci.tar:$TAG"; do
  got=$(skopeo inspect --raw "$ref" | sha256sum | cut -d' ' -f1)
  [ "$got" = "$hex" ] || { echo "oci: skopeo reads $ref as $got, expected $hex" >&2; exit 1; }
done
echo "$hex" > "$OUT/$NAME.sha256"

cat <<EOF
OCI layout   $OUT/$NAME  (tag $TAG)
OCI archive  $OUT/$NAME.oci.tar
manifest digest, the WasmPlugin spec.sha256:
sha256: $hex
push it:     skopeo copy oci:$OUT/$NAME:$TAG docker://REGISTRY/$NAME:$TAG
             (then: skopeo inspect --raw docker://REGISTRY/$NAME:$TAG | sha256sum  ->  $hex)
EOF
