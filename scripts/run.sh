#!/usr/bin/env bash
# The main job (`make run`). With root on Linux it brings up the lab (three emulated regions,
# id-jakarta, br-saopaulo and ae-dubai, with their candidate edges and edge services) and runs
# one agent per region inside its namespace; otherwise it falls back to one agent probing
# loopback. Ctrl-C (or SIGTERM) stops the agents and tears the lab down.
#   EDGEPROBE_LAB=0 scripts/run.sh   forces the loopback world.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
EP=.venv/bin/edgeprobe
STATE=run/lab
PORT=9798

loopback() {
  echo "make run: $1" >&2
  echo "make run: falling back to the loopback world (examples/loopback.yaml):" \
       "http://127.0.0.1:${PORT}/metrics" >&2
  exec "$EP" run --config.file=examples/loopback.yaml --web.listen-address=127.0.0.1:${PORT}
}

if [ "${EDGEPROBE_LAB:-1}" = 0 ]; then
  loopback "EDGEPROBE_LAB=0"
fi
why=$("$PY" -c 'from lab import lab_available; ok, why = lab_available(); print("" if ok else why)' 2>&1) \
  || why="cannot import the lab package: $why"
if [ -n "$why" ]; then
  loopback "the lab is not available here ($why)"
fi

# A world left by a previous run that was killed hard: take it down first.
if [ -f "$STATE/state.json" ]; then
  "$PY" -m lab down --state "$STATE" >/dev/null 2>&1 || true
fi
mkdir -p "$STATE"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "make run: stopping agents and tearing the lab down"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  "$PY" -m lab down --state "$STATE" || true
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

"$PY" -m lab up --state "$STATE"
"$PY" -m lab agent-config --state "$STATE" --out "$STATE/agents" >/dev/null

echo
echo "Agents (one per region, each inside its region's namespace):"
while read -r region ns mgmt; do
  "$EP" check-config "$STATE/agents/$region.yaml" >/dev/null
  ip netns exec "$ns" "$EP" run --config.file="$STATE/agents/$region.yaml" \
    --web.listen-address="$mgmt:$PORT" >"$STATE/agent-$region.log" 2>&1 &
  pids+=("$!")
  printf '  %-12s http://%s:%s/metrics   (log %s)\n' "$region" "$mgmt" "$PORT" \
    "$STATE/agent-$region.log"
done < <("$PY" -c '
import json, sys
st = json.load(open(sys.argv[1]))
for r in st["regions"].values():
    print(r["name"], r["ns"], r["mgmt_addr"])' "$STATE/state.json")

cat <<EOF

What to look at (from this shell, the root namespace):
  curl -s http://<mgmt>:${PORT}/metrics | grep -E 'edgeprobe_(rtt_seconds_count|packets_lost_total|connect_budget_miss_probability|connect_estimate_seconds)'
      per edge: near edges pass the 600 ms budget, far ones are marginal, lossy/jittery ones miss it
  .venv/bin/python -m lab truth --state ${STATE}
      what the lab really did (true RTT, loss, bursts per region and edge) and its own precision
  .venv/bin/python -m lab exec --state ${STATE} id-jakarta -- .venv/bin/edgeprobe probe -c 20 198.18.4.1
      a one-shot probe from Jakarta to Frankfurt (8 hops, one bad; degrades at t=60 s)
  .venv/bin/python -m lab set --state ${STATE} ae-dubai dxb-1 '{"delay": "80ms", "loss": "5%"}'
      degrade a path now
Ctrl-C stops everything.
EOF

# Exit when an agent dies, or on a signal (the trap tears down).
while :; do
  for p in "${pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      echo "make run: an agent exited; see $STATE/agent-*.log" >&2
      exit 1
    fi
  done
  sleep 1 &
  wait $! || true
done
