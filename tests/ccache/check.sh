#!/usr/bin/env bash
# ccache against larder's Bazel HTTP cache: compiles a few C files with the
# remote storage set, wipes the local cache, compiles again, and requires
# every result to be a remote hit. ccache's /ac/ entries are not
# ActionResults: larder runs with --disable-http-ac-validation.
#
#   tests/ccache/check.sh [path/to/larder]   (needs: ccache, cc)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
larder=${1:-$here/../../target/release/larder}
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
"$larder" serve --listen 127.0.0.1:0 --dir "$work/data" --disable-http-ac-validation \
  > "$work/larder.out" 2> "$work/larder.log" &
pid=$!
for _ in $(seq 1 100); do grep -q "serving REAPI on" "$work/larder.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/.*serving REAPI on \([^ ]*\).*/\1/p' "$work/larder.out")
[ -n "$addr" ] || { cat "$work/larder.log" >&2; echo "ccache: larder did not start" >&2; exit 1; }

files=4
mkdir -p "$work/src"
for i in $(seq 1 $files); do
  printf '#include <stdio.h>\nint f%d(int x) { return x * %d + 1; }\nint main(void) { printf("%%d\\n", f%d(%d)); return 0; }\n' \
    "$i" "$i" "$i" "$i" > "$work/src/f$i.c"
done
export CCACHE_DIR="$work/ccache" CCACHE_REMOTE_STORAGE="http://$addr|layout=bazel" CCACHE_NOHASHDIR=1
compile() {
  for i in $(seq 1 $files); do ccache cc -c "$work/src/f$i.c" -o "$work/src/f$i.o"; done
}
stat() { ccache --print-stats | awk -v k="$1" '$1 == k { print $2 }'; }

compile
[ "$(stat remote_storage_miss)" = "$files" ] || { ccache --print-stats >&2; echo "ccache: the first build should miss" >&2; exit 1; }
rm -rf "$CCACHE_DIR"
compile
hits=$(stat remote_storage_hit)
if [ "$hits" != "$files" ] || [ "$(stat remote_storage_error)" != "0" ]; then
  ccache --print-stats >&2
  echo "ccache: $hits of $files results were remote hits after the local cache was wiped" >&2
  exit 1
fi
echo "ccache: $hits of $files compilations were remote hits from larder"
