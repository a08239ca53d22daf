#!/usr/bin/env bash
# Real-client check: Bazel builds tests/bazel/workspace against a fresh larder,
# the output base is thrown away, and a second build must get every action
# from the cache, with byte-identical (random) outputs. Runs once over gRPC
# (--remote_cache=grpc://) and once over Bazel's HTTP cache protocol
# (--remote_cache=http://), each against a larder of its own; then over gRPC
# with two larders sharing a Ceph RADOS Gateway bucket as their second tier:
# the first build against one, the rebuild against the other; and so again
# with the first larder in write-back mode; and so again with the bucket
# trimmed to a size budget below what the build wrote before the rebuild,
# which must then succeed, each action a hit with all its outputs or a miss
# that Bazel runs again. Last, Bazel's external downloads
# through larder's Remote Asset API (--experimental_remote_downloader): an
# http_file and an http_archive served by a local HTTP server, then built
# again from scratch with that server stopped.
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

# check NAME SCHEME [two-nodes|write-back|trimmed]: the first build against
# one larder; the second against the same one, or against a second larder
# (with an empty local tier) sharing an object store with the first, which
# with write-back acknowledges writes before they reach the object store, and
# which with trimmed keeps the bucket within 1 MiB (the build writes 3.4 MB).
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
  if [ "$mode" = trimmed ]; then
    extra+=(--s3-max-size 1MiB --s3-trim-interval 500ms --s3-trim-min-age 2s --s3-existence-ttl 1s
            --s3-touch-interval 1s --s3-trim-lease 3s)
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
  if [ "$mode" = trimmed ]; then
    # Either node may hold the trimmer's lease; wait until it has brought
    # the bucket within the budget (the 3 MB output is 2 s old by then).
    local trimmed= metrics
    for _ in $(seq 1 600); do
      for node in "$first" "$second"; do
        metrics=$(curl -sf "http://$node/metrics" || true)
        echo "$metrics" | grep -q '^larder_object_store_trims_total [1-9]' \
          && echo "$metrics" | awk '/^larder_object_store_bytes / { exit !($2 > 0 && $2 <= 1048576) }' \
          && trimmed=1
      done
      [ -n "$trimmed" ] && break
      sleep 0.1
    done
    [ -n "$trimmed" ] || { echo "check: FAILED over $name: the bucket was not trimmed in 60 s" >&2; exit 1; }
  fi
  (cd "$dir/ws" && bazel --output_user_root="$dir/bazel" --batch clean --expunge >/dev/null 2>&1)
  build second "$second"

  local summary others
  summary=$(grep -E "INFO: [0-9]+ processes?:" "$dir/build-second.log" | tail -1)
  echo "check: $name: second build: $summary"
  if [ "$mode" = trimmed ]; then
    grep -q "Build completed successfully" "$dir/build-second.log" \
      || { echo "check: FAILED over $name: the rebuild after trimming failed" >&2; exit 1; }
    # The 3 MB output cannot fit: its action at least runs again.
    echo "$summary" | grep -q -E "[0-9]+ (local|linux-sandbox|processwrapper-sandbox)" \
      || { echo "check: FAILED over $name: no action ran again, yet the bucket was trimmed: $summary" >&2; exit 1; }
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
    echo "check: OK over $name: after trimming, every action of the rebuild was a complete hit or ran again"
    return
  fi
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

# check_downloads: a workspace whose http_file and http_archive come from a
# local HTTP server, fetched through larder (which downloads, verifies and
# records them); then the server is stopped, the output base and Bazel's
# repository cache are removed, and the build must succeed again with every
# download answered by larder.
check_downloads() {
  local dir="$work/downloads" port origin
  mkdir -p "$dir/origin/src"
  cp -r "$here/workspace" "$dir/ws"
  echo "a file Bazel downloads $RANDOM$RANDOM" > "$dir/origin/dep.txt"
  echo "inside an archive $RANDOM$RANDOM" > "$dir/origin/src/hello.txt"
  tar -C "$dir/origin/src" -czf "$dir/origin/dep.tar.gz" hello.txt
  (cd "$dir/origin" && exec python3 -u -m http.server --bind 127.0.0.1 0 > "$dir/origin.out" 2> "$dir/origin.log") &
  origin=$!
  pids+=("$origin")
  port=
  for _ in $(seq 1 100); do
    port=$(sed -n 's/.*port \([0-9]*\).*/\1/p' "$dir/origin.out" 2>/dev/null | head -1)
    [ -n "$port" ] && break
    sleep 0.1
  done
  [ -n "$port" ] || { echo "check: FAILED over downloads: the HTTP server did not start" >&2; exit 1; }
  cat >> "$dir/ws/WORKSPACE" <<EOF_WS

load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive", "http_file")

# Bazel downloads plain http URLs only with a checksum.
http_file(
    name = "dep_file",
    urls = ["http://127.0.0.1:$port/dep.txt"],
    sha256 = "$(sha256sum "$dir/origin/dep.txt" | cut -d' ' -f1)",
    downloaded_file_path = "dep.txt",
)

http_archive(
    name = "dep_archive",
    urls = ["http://127.0.0.1:$port/dep.tar.gz"],
    sha256 = "$(sha256sum "$dir/origin/dep.tar.gz" | cut -d' ' -f1)",
    build_file_content = 'exports_files(["hello.txt"])',
)
EOF_WS
  cat > "$dir/ws/BUILD" <<'EOF_BUILD'
genrule(
    name = "deps",
    srcs = ["@dep_file//file", "@dep_archive//:hello.txt"],
    outs = ["deps.txt"],
    cmd = "cat $(SRCS) > $@",
)
EOF_BUILD
  start_larder "$dir/larder" --download-allow 127.0.0.1
  echo "check: downloads: http://127.0.0.1:$port through grpc://$addr"
  fetch_build() {
    (cd "$dir/ws" && bazel --output_user_root="$dir/bazel" --batch build \
       --experimental_remote_downloader="grpc://$addr" --remote_cache="grpc://$addr" \
       --repository_cache="$dir/repository-cache" //:deps 2>&1) > "$dir/build-$1.log" \
      || { tail -30 "$dir/build-$1.log" >&2; echo "check: FAILED over downloads: the $1 build failed" >&2; exit 1; }
    cp "$dir/ws/bazel-bin/deps.txt" "$dir/deps-$1.txt"
  }
  fetch_build first
  local served
  served=$(grep -c '"GET /dep' "$dir/origin.log" || true)
  [ "$served" = 2 ] || { echo "check: FAILED over downloads: the origin served $served downloads, not 2" >&2; exit 1; }
  kill "$origin"
  wait "$origin" 2>/dev/null || true
  (cd "$dir/ws" && bazel --output_user_root="$dir/bazel" --batch clean --expunge >/dev/null 2>&1)
  rm -rf "$dir/repository-cache"
  fetch_build second
  cmp -s "$dir/deps-first.txt" "$dir/deps-second.txt" || { echo "check: FAILED over downloads: outputs differ" >&2; exit 1; }
  cat "$dir/origin/dep.txt" "$dir/origin/src/hello.txt" | cmp -s - "$dir/deps-second.txt" \
    || { echo "check: FAILED over downloads: the output is not the origin's files" >&2; exit 1; }
  local metrics
  metrics=$(curl -sf "http://$addr/metrics" | grep '^larder_asset_fetches_total' | tr '\n' ' ')
  echo "check: downloads: $metrics"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  echo "check: OK over downloads: the rebuild with the origin gone got both files from larder"
}

check_downloads
check grpc grpc
check http http
# Needs Debian's Ceph packages (see tests/s3.rs).
check two-nodes grpc two-nodes
check write-back grpc write-back
check trimmed grpc trimmed
