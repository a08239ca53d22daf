#!/usr/bin/env bash
# Loads larder's status page in headless Chromium (Debian's `chromium`) from a
# running server with some traffic behind it, and saves a screenshot.
#
#   tests/status/screenshot.sh [path/to/larder] [out.png]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
larder=${1:-$here/../../target/release/larder}
out=${2:-status.png}
command -v chromium >/dev/null || { echo "screenshot: chromium not found: apt-get install chromium" >&2; exit 1; }
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
"$larder" serve --listen 127.0.0.1:0 --dir "$work/data" --max-size 1GiB > "$work/larder.out" 2> "$work/larder.log" &
pid=$!
for _ in $(seq 1 100); do grep -q "serving REAPI on" "$work/larder.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/.*serving REAPI on \([^ ]*\).*/\1/p' "$work/larder.out")
[ -n "$addr" ] || { cat "$work/larder.log" >&2; exit 1; }
# Traffic for the figures and the chart: blobs up and down, hits and misses.
for round in $(seq 1 6); do
  for i in $(seq 1 20); do
    head -c $((200000 * i)) /dev/urandom > "$work/blob"
    hash=$(sha256sum "$work/blob" | cut -d' ' -f1)
    curl -s -X PUT --data-binary @"$work/blob" "http://$addr/cas/$hash" > /dev/null
    curl -s "http://$addr/cas/$hash" > /dev/null
    curl -s "http://$addr/ac/$hash" > /dev/null
  done
  sleep 2.5
done
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,1150 \
  --screenshot="$out" "http://$addr/" 2>/dev/null
echo "screenshot: $out"
