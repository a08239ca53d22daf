#!/usr/bin/env bash
# Real-client check: Bazel builds tests/bazel/workspace against a fresh larder,
# the output base is thrown away, and a second build must get every action
# from the cache, with byte-identical (random) outputs. Runs once over gRPC
# (--remote_cache=grpc://) and once over Bazel's HTTP cache protocol
# (--remote_cache=http://), each against a larder of its own.
#
#   tests/bazel/check.sh [path/to/larder]        (needs Debian's bazel-bootstrap)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
larder=${1:-$here/../../target/release/larder}
command -v bazel >/dev/null || { echo "check: bazel not found: apt-get install bazel-bootstrap" >&2; exit 1; }
[ -x "$larder" ] || { echo "check: no larder binary at $larder: cargo build --release" >&2; exit 1; }

work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

check() {
  local scheme=$1 dir="$work/$1"
  mkdir -p "$dir"
  cp -r "$here/workspace" "$dir/ws"
  "$larder" serve --listen 127.0.0.1:0 --dir "$dir/data" > "$dir/larder.out" 2> "$dir/larder.log" &
  pid=$!
  for _ in $(seq 1 100); do grep -q "serving REAPI on" "$dir/larder.out" 2>/dev/null && break; sleep 0.1; done
  local addr
  addr=$(sed -n 's/.*serving REAPI on \([^ ]*\).*/\1/p' "$dir/larder.out")
  [ -n "$addr" ] || { cat "$dir/larder.log" >&2; echo "check: larder did not start" >&2; exit 1; }
  echo "check: larder on $addr, --remote_cache=$scheme://$addr"

  build() {
    (cd "$dir/ws" && bazel --output_user_root="$dir/bazel" --batch build \
       --remote_cache="$scheme://$addr" //... 2>&1) | tee "$dir/build-$1.log" | grep -E "processes|ERROR|FAILED" || true
    # genrule outputs are read-only; copy them aside for comparison.
    mkdir -p "$dir/out-$1"
    cp "$dir/ws"/bazel-bin/*.bin "$dir/ws"/bazel-bin/*.txt "$dir/out-$1/"
  }
  build first
  (cd "$dir/ws" && bazel --output_user_root="$dir/bazel" --batch clean --expunge >/dev/null 2>&1)
  build second

  local summary others
  summary=$(grep -E "INFO: [0-9]+ processes?:" "$dir/build-second.log" | tail -1)
  echo "check: $scheme: second build: $summary"
  others=$(echo "$summary" | sed 's/.*processes\?: //' | tr ',' '\n' | sed 's/^ *//; s/\.$//' | grep -v -E "remote cache hit|internal" || true)
  if [ -n "$others" ] || ! echo "$summary" | grep -q "remote cache hit"; then
    echo "check: FAILED over $scheme: not every action came from the cache: $others" >&2
    exit 1
  fi
  diff -r "$dir/out-first" "$dir/out-second" >/dev/null || { echo "check: FAILED over $scheme: outputs differ" >&2; exit 1; }
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  echo "check: OK over $scheme: every action of the rebuild was a remote cache hit, outputs identical"
}

check grpc
check http
