#!/usr/bin/env bash
# Real-client check: Bazel builds tests/bazel/workspace against a fresh larder,
# the output base is thrown away, and a second build must get every action
# from the cache, with byte-identical (random) outputs. Runs once over gRPC
# (--remote_cache=grpc://) and once over Bazel's HTTP cache protocol
# (--remote_cache=http://), each against a larder of its own; then over gRPC
# with two larders sharing a Ceph RADOS Gateway bucket as their second tier:
# the first build against one, the rebuild against the other; and so again
# with the first larder in write-back mode.
#
#   tests/bazel/check.sh [path/to/larder]        (needs Debian's bazel-bootstrap)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
larder=${1:-$here/../../target/release/larder}
command -v bazel >/dev/null || { echo "check: bazel not found: apt-get install bazel-bootstrap" >&2; exit 1; }
[ -x "$larder" ] || { echo "check: no larder binary at $larder: cargo build --release" >&2; exit 1; }

work=$(mktemp -d)
pids=()
ceph=
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "$ceph" ] && "$here/../s3/ceph-rgw-local.sh" stop "$ceph" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Starts a larder with data in $1 and extra flags; sets $addr.
start_larder() {
  local data=$1; shift
  mkdir -p "$data"
  "$larder" serve --listen 127.0.0.1:0 --dir "$data/db" "$@" > "$data/larder.out" 2> "$data/larder.log" &
  pids+=($!)
  addr=
  for _ in $(seq 1 600); do grep -q "serving REAPI on" "$data/larder.out" 2>/dev/null && break; sleep 0.1; done
  addr=$(sed -n 's/.*serving REAPI on \([^ ]*\).*/\1/p' "$data/larder.out")
  [ -n "$addr" ] || { cat "$data/larder.log" >&2; echo "check: larder did not start" >&2; exit 1; }
}

# check NAME SCHEME [two-nodes|write-back]: the first build against one
# larder; the second against the same one, or against a second larder (with
# an empty local tier) sharing an object store with the first, which with
# write-back acknowledges writes before they reach the object store.
check() {
  local name=$1 scheme=$2 mode=${3:-}
  local dir="$work/$name" extra=() first second
  mkdir -p "$dir"
  cp -r "$here/workspace" "$dir/ws"
  if [ -n "$mode" ]; then
    if [ -z "$ceph" ]; then
      ceph="$work/ceph"
      local env
      env=$(CEPH_RGW_NO_MGR=1 "$here/../s3/ceph-rgw-local.sh" start "$ceph" larder-check)
      eval "$env"
    fi
    # One bucket, a prefix per pass.
    extra=(--s3-endpoint "$AWS_ENDPOINT_URL" --s3-bucket larder-check --s3-prefix "$name")
  fi
  if [ "$mode" = write-back ]; then
    start_larder "$dir/a" "${extra[@]}" --s3-write-back
  else
    start_larder "$dir/a" "${extra[@]}"
  fi
  first=$addr second=$addr
  if [ -n "$mode" ]; then
    start_larder "$dir/b" "${extra[@]}"
    second=$addr
  fi
  echo "check: $name: first build against $scheme://$first, second against $scheme://$second"

  build() {
    (cd "$dir/ws" && bazel --output_user_root="$dir/bazel" --batch build \
       --remote_cache="$scheme://$2" //... 2>&1) | tee "$dir/build-$1.log" | grep -E "processes|ERROR|FAILED" || true
    # genrule outputs are read-only; copy them aside for comparison.
    mkdir -p "$dir/out-$1"
    cp "$dir/ws"/bazel-bin/*.bin "$dir/ws"/bazel-bin/*.txt "$dir/out-$1/"
  }
  build first "$first"
  if [ "$mode" = write-back ]; then
    # The rebuild is on another node: let the first one's queue drain.
    local drained=
    for _ in $(seq 1 1800); do
      curl -sf "http://$first/status.json" | grep -q '"queued":0,' && { drained=1; break; }
      sleep 0.1
    done
    [ -n "$drained" ] || { echo "check: FAILED over $name: the write-back queue did not drain in 180 s" >&2; exit 1; }
  fi
  (cd "$dir/ws" && bazel --output_user_root="$dir/bazel" --batch clean --expunge >/dev/null 2>&1)
  build second "$second"

  local summary others
  summary=$(grep -E "INFO: [0-9]+ processes?:" "$dir/build-second.log" | tail -1)
  echo "check: $name: second build: $summary"
  others=$(echo "$summary" | sed 's/.*processes\?: //' | tr ',' '\n' | sed 's/^ *//; s/\.$//' | grep -v -E "remote cache hit|internal" || true)
  if [ -n "$others" ] || ! echo "$summary" | grep -q "remote cache hit"; then
    echo "check: FAILED over $name: not every action came from the cache: $others" >&2
    exit 1
  fi
  diff -r "$dir/out-first" "$dir/out-second" >/dev/null || { echo "check: FAILED over $name: outputs differ" >&2; exit 1; }
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  echo "check: OK over $name: every action of the rebuild was a remote cache hit, outputs identical"
}

check grpc grpc
check http http
# Needs Debian's Ceph packages (see tests/s3.rs).
check two-nodes grpc two-nodes
check write-back grpc write-back
