#!/bin/sh
# What a change costs the gateway: benchmarks.bench_gateway on two commits, alternating on one machine (A B A B ...,
# so drift in the machine's speed hits both), N runs each; keep the machine idle while it runs (about 100 s a pair).
#   sh benchmarks/ab_gateway.sh cd90d89 7894458 5    -> runs/bench/ab/<commit>-<i>.json, then a line per commit
# Each commit runs from its own clean worktree (runs/bench/ab/tree-<commit>, removed at the end) with this venv.
# Each commit runs its own bench_gateway: commits before aa3465c measure the gateway with an httpx client (~1.4 ms
# more client CPU per request), so compare only commits on the same side of it (the summary warns when they are not).
set -e
[ $# -ge 2 ] || { echo "usage: $0 COMMIT_A COMMIT_B [RUNS]" >&2; exit 2; }
cd "$(dirname "$0")/.."
root=$(pwd); out=$root/runs/bench/ab; n=${3:-4}
mkdir -p "$out"
a=$(git rev-parse --short "$1"); b=$(git rev-parse --short "$2")
for c in "$a" "$b"; do
  [ -d "$out/tree-$c" ] || { git worktree add -q --detach "$out/tree-$c" "$c"; ln -s "$root/.venv" "$out/tree-$c/.venv"; }
done
for i in $(seq 1 "$n"); do
  for c in "$a" "$b"; do
    (cd "$out/tree-$c" && "$root/.venv/bin/python" -m benchmarks.bench_gateway --out "$out/$c-$i.json" > "$out/$c-$i.log" 2>&1)
  done
done
for c in "$a" "$b"; do git worktree remove --force "$out/tree-$c"; done
"$root/.venv/bin/python" - "$out" "$a" "$b" "$n" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[4])
for c in sys.argv[2:4]:
    runs = [json.load(open(f"{out}/{c}-{i}.json")) for i in range(1, n + 1)]
    o = [r["overhead_p50_ms"] for r in runs]
    t = [r["throughput_ratio"] for r in runs]
    print(f"{c}: overhead p50 {statistics.mean(o):.2f} ms (runs {', '.join(f'{v:.2f}' for v in o)}), "
          f"throughput {statistics.mean(t):.3f}x, load before {[round(r['loadavg_before'][0], 2) for r in runs]}")
lean = {c: all("client_cpu_ms" in json.load(open(f"{out}/{c}-{i}.json")) for i in range(1, n + 1)) for c in sys.argv[2:4]}
if len(set(lean.values())) > 1:
    print("WARNING: the two commits measure the gateway with different bench clients (httpx before aa3465c, aiohttp "
          "after): the difference includes ~1.4 ms of client CPU, not only the change")
PY
