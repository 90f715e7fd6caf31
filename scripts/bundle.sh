#!/usr/bin/env bash
# Builds the air-gapped bundle: one tarball with everything an install needs and nothing it
# must download.
#
#   scripts/bundle.sh [--bin-dir DIR] [--out DIR] [--no-vendor]
#
#   --bin-dir DIR  take gateway-plugin, queue-worker, faas-async and stats-function from DIR
#                  (default: build them with `cargo build --release`)
#   --out DIR      where the tarball goes (default: target/bundle)
#   --no-vendor    leave out the vendored crate sources (cargo vendor): the bundle can then
#                  not be rebuilt offline. Says so loudly, and the bundle's VERSION file too.
#
# Contents: bin/ (our binaries and the pinned nats-server), chart/, rendered/ (manifests for
# kubectl), systemd/ (units and env files), grafana/, Dockerfile, src/ (the sources with
# vendor/ and .cargo/config.toml, for `cargo build --offline`), README.md (deploy/README.md),
# install.sh, VERSION, ARCH and SHA256SUMS. Prints the tarball's path on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="" out="" vendor=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --no-vendor) vendor=no; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "bundle: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$root"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="${out:-$target_dir/bundle}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
arch="$(uname -m)"
name="faas-async-${version}-linux-${arch}"

if [ -z "$bin_dir" ]; then
  echo "==> bundle: building the release binaries" >&2
  cargo build --release --locked -p faas-async -p gateway-plugin -p queue-worker --bins >&2
  bin_dir="$target_dir/release"
fi
for b in gateway-plugin queue-worker faas-async stats-function; do
  [ -x "$bin_dir/$b" ] || { echo "bundle: $bin_dir/$b is missing (build it, or give --bin-dir)" >&2; exit 1; }
done
nats_server="$(./scripts/install-tools.sh | tail -n 1)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/$name"
mkdir -p "$stage/bin" "$stage/src"

echo "==> bundle: binaries from $bin_dir, nats-server $("$nats_server" --version)" >&2
for b in gateway-plugin queue-worker faas-async stats-function; do
  install -m 0755 "$bin_dir/$b" "$stage/bin/$b"
done
install -m 0755 "$nats_server" "$stage/bin/nats-server"

echo "==> bundle: chart, manifests, units, dashboard" >&2
cp -R deploy/chart "$stage/chart"
cp -R deploy/rendered "$stage/rendered"
cp -R deploy/systemd "$stage/systemd"
cp -R deploy/grafana "$stage/grafana"
cp deploy/README.md "$stage/README.md"
cp deploy/bundle/install.sh "$stage/install.sh"
cp Dockerfile .dockerignore "$stage/"
echo "$arch" > "$stage/ARCH"

echo "==> bundle: sources (tracked and new files, as in this work tree)" >&2
git ls-files -z --cached --others --exclude-standard | tar -C "$root" --null -T - -cf - | tar -C "$stage/src" -xf -
if [ "$vendor" = yes ]; then
  echo "==> bundle: cargo vendor (crate sources for an offline rebuild)" >&2
  start=$(date +%s)
  mkdir -p "$stage/src/.cargo"
  cargo vendor --locked --versioned-dirs --quiet "$stage/src/vendor" > /dev/null
  cat > "$stage/src/.cargo/config.toml" <<'EOF'
# Written by scripts/bundle.sh: build from the vendored sources, never the network.
#   cargo build --release --offline --locked
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"

[net]
offline = true
EOF
  echo "    vendored $(find "$stage/src/vendor" -mindepth 1 -maxdepth 1 | wc -l) crates in $(( $(date +%s) - start ))s" >&2
  echo "$version" > "$stage/VERSION"
else
  echo "" >&2
  echo "!!! bundle: --no-vendor: the vendored crate sources are NOT in this bundle." >&2
  echo "!!! It installs, but it cannot be rebuilt from source without network." >&2
  echo "" >&2
  echo "$version (without vendored sources: not rebuildable offline)" > "$stage/VERSION"
fi

echo "==> bundle: SHA256SUMS" >&2
(cd "$stage" && find . -type f ! -name SHA256SUMS -print0 | LC_ALL=C sort -z | xargs -0 sha256sum > SHA256SUMS)

mkdir -p "$out"
tarball="$out/$name.tar.gz"
tar -C "$work" -cf - "$name" | gzip -1 > "$tarball.tmp"
mv "$tarball.tmp" "$tarball"
(cd "$out" && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
echo "==> bundle: $(du -h "$tarball" | cut -f1) $(basename "$tarball") (checksum in $(basename "$tarball").sha256)" >&2
echo "$tarball"
