#!/usr/bin/env bash
# Real-client check: Bazel builds tests/bazel/workspace against a fresh larder,
# the output base is thrown away, and a second build must get every action
# from the cache, with byte-identical (random) outputs.
#
#   tests/bazel/check.sh [path/to/larder]        (needs Debian's bazel-bootstrap)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
larder=${1:-$here/../../target/release/larder}
command -v bazel >/dev/null || { echo "check: bazel not found: apt-get install bazel-bootstrap" >&2; exit 1; }
[ -x "$larder" ] || { echo "check: no larder binary at $larder: cargo build --release" >&2; exit 1; }

work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
cp -r "$here/workspace" "$work/ws"
"$larder" serve --listen 127.0.0.1:0 --dir "$work/data" > "$work/larder.out" 2> "$work/larder.log" &
pid=$!
for _ in $(seq 1 100); do grep -q "serving REAPI on" "$work/larder.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/.*serving REAPI on \([^ ]*\).*/\1/p' "$work/larder.out")
[ -n "$addr" ] || { cat "$work/larder.log" >&2; echo "check: larder did not start" >&2; exit 1; }
echo "check: larder on $addr"

build() {
  (cd "$work/ws" && bazel --output_user_root="$work/bazel" --batch build \
     --remote_cache="grpc://$addr" //... 2>&1) | tee "$work/build-$1.log" | grep -E "processes|ERROR|FAILED" || true
  # genrule outputs are read-only; copy them aside for comparison.
  mkdir -p "$work/out-$1"
  cp "$work/ws"/bazel-bin/*.bin "$work/ws"/bazel-bin/*.txt "$work/out-$1/"
}
build first
(cd "$work/ws" && bazel --output_user_root="$work/bazel" --batch clean --expunge >/dev/null 2>&1)
build second

summary=$(grep -E "INFO: [0-9]+ processes?:" "$work/build-second.log" | tail -1)
echo "check: second build: $summary"
others=$(echo "$summary" | sed 's/.*processes\?: //' | tr ',' '\n' | sed 's/^ *//; s/\.$//' | grep -v -E "remote cache hit|internal" || true)
if [ -n "$others" ] || ! echo "$summary" | grep -q "remote cache hit"; then
  echo "check: FAILED: not every action came from the cache: $others" >&2
  exit 1
fi
diff -r "$work/out-first" "$work/out-second" >/dev/null || { echo "check: FAILED: outputs differ" >&2; exit 1; }
echo "check: OK: every action of the rebuild was a remote cache hit, outputs identical"
