#!/usr/bin/env bash
# Local multi-node demo: N real `vmswarm serve` processes on loopback QUIC, one publishes a generated
# image (random data with sparse zero regions), the others pull it at once; prints who served what.
# Every process and the temp dir are removed on exit, also on Ctrl-C or failure.
#
#   bash scripts/demo.sh [NODES=5] [SIZE_MIB=128]
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-5}
size_mib=${2:-128}
[ "$nodes" -ge 2 ] || { echo "demo: need at least 2 nodes" >&2; exit 2; }

cargo build --release --locked -q -p vmswarm-node
bin=$PWD/target/release/vmswarm
work=$(mktemp -d -t vmswarm-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

start() { # dir site [bootstrap]
  local dir=$1 site=$2 boot=${3:-}
  mkdir -p "$dir"
  RUST_LOG=warn "$bin" --data "$dir" serve --listen /ip4/127.0.0.1/udp/0/quic-v1 --site "$site" \
    ${boot:+--bootstrap "$boot"} 2>"$dir/daemon.log" &
  pids+=($!)
  for _ in $(seq 200); do
    [ -f "$dir/node.json" ] && "$bin" --data "$dir" status >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "demo: node in $dir did not start:" >&2; cat "$dir/daemon.log" >&2; exit 1
}
addr_of() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listen_addrs"][0])' "$1/node.json"; }

echo "== starting $nodes nodes"
start "$work/n0" dc1
boot=$(addr_of "$work/n0")
for i in $(seq 1 $((nodes - 1))); do start "$work/n$i" dc1 "$boot"; done

echo "== generating a ${size_mib} MiB image (random data, every 4th MiB zero)"
python3 - "$work/disk.raw" "$size_mib" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    for i in range(int(sys.argv[2])):
        f.write(bytes(1 << 20) if i % 4 == 3 else os.urandom(1 << 20))
PY

echo "== publishing on n0"
image=$("$bin" --data "$work/n0" publish "$work/disk.raw" --name demo | tail -n 1)
echo "image id: $image"

echo "== pulling on n1..n$((nodes - 1)) at once"
start_t=$(date +%s.%N)
pull_pids=()
for i in $(seq 1 $((nodes - 1))); do
  "$bin" --data "$work/n$i" pull "$image" -o "$work/out$i.raw" >"$work/pull$i.log" 2>&1 &
  pull_pids+=($!)
done
fail=0
for i in "${!pull_pids[@]}"; do wait "${pull_pids[$i]}" || { fail=1; cat "$work/pull$((i + 1)).log" >&2; }; done
end_t=$(date +%s.%N)
[ "$fail" -eq 0 ] || { echo "demo: a pull failed" >&2; exit 1; }
for i in $(seq 1 $((nodes - 1))); do cmp -s "$work/disk.raw" "$work/out$i.raw" || { echo "demo: copy $i differs" >&2; exit 1; }; done

echo "== result: $((nodes - 1)) verified copies in $(python3 -c "print(f'{$end_t-$start_t:.2f}')") s"
printf '%-4s %14s %14s\n' node "bytes out" "bytes in"
for i in $(seq 0 $((nodes - 1))); do
  "$bin" --data "$work/n$i" status --json | python3 -c '
import json, sys
s = json.load(sys.stdin)["metrics"]
print("n%s   %14d %14d" % (sys.argv[1], s["bytes_out"], s["bytes_in"]))' "$i"
done
size=$(stat -c %s "$work/disk.raw")
"$bin" --data "$work/n0" status --json | python3 -c '
import json,sys; out=json.load(sys.stdin)["metrics"]["bytes_out"]
print(f"the publisher uploaded {out/'$size':.2f} images for '$((nodes - 1))' pulls (a central server would upload '$((nodes - 1))')")'
