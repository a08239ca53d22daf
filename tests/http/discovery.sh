#!/usr/bin/env bash
# Runs tests/http/discovery.py (Google's discovery-based Python client over
# REAPI's REST mapping) against a fresh larder.
#
#   tests/http/discovery.sh [path/to/larder]   (needs: pip install google-api-python-client)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
larder=${1:-$here/../../target/release/larder}
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
"$larder" serve --listen 127.0.0.1:0 --dir "$work/data" > "$work/larder.out" 2> "$work/larder.log" &
pid=$!
for _ in $(seq 1 100); do grep -q "serving REAPI on" "$work/larder.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/.*serving REAPI on \([^ ]*\).*/\1/p' "$work/larder.out")
[ -n "$addr" ] || { cat "$work/larder.log" >&2; echo "discovery: larder did not start" >&2; exit 1; }
python3 "$here/discovery.py" "http://$addr/"
