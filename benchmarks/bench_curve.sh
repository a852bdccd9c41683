#!/usr/bin/env bash
# What CurveZMQ costs: the same all-hit text load against two brokers in one run, one plain and
# one with CURVE on both sockets (keys made by `zembed keygen` in a temp dir). Each broker has
# its own text engine and an in-memory cache; the repeat pool is warmed first, so the measured
# requests never reach a model and the broker's transport path is what is compared.
# Usage: benchmarks/bench_curve.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-8}
export HF_HUB_OFFLINE=1
Z=.venv/bin/zembed
port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TMP=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"' EXIT

for name in broker client engine; do $Z keygen "$name" --dir "$TMP/keys" >/dev/null; done
mkdir -p "$TMP/clients" "$TMP/engines"
cp "$TMP/keys/client.key" "$TMP/clients/"; cp "$TMP/keys/engine.key" "$TMP/engines/"
CLIENT_KEYS=(--curve-secret-key "$TMP/keys/client.key_secret" --curve-server-key "$TMP/keys/broker.key")
ENGINE_KEYS=(--curve-secret-key "$TMP/keys/engine.key_secret" --curve-server-key "$TMP/keys/broker.key")
BROKER_KEYS=(--curve-secret-key "$TMP/keys/broker.key_secret" --curve-clients-dir "$TMP/clients"
             --curve-engines-dir "$TMP/engines")

start() {  # start <label> <curve: yes|no>; sets FE_<label>
  local fe be; fe=$(port); be=$(port)
  local bargs=() eargs=()
  if [ "$2" = yes ]; then bargs=("${BROKER_KEYS[@]}"); eargs=("${ENGINE_KEYS[@]}"); fi
  $Z start broker --frontend "tcp://127.0.0.1:$fe" --backend "tcp://127.0.0.1:$be" --lanes text \
    --cache memory --stats-endpoint "" "${bargs[@]}" >"$TMP/$1-broker.log" 2>&1 & PIDS+=($!)
  $Z start text --broker "tcp://127.0.0.1:$be" "${eargs[@]}" >"$TMP/$1-text.log" 2>&1 & PIDS+=($!)
  printf -v "FE_$1" '%s' "tcp://127.0.0.1:$fe"
}
start plain no
start curve yes
for label in plain curve; do
  fe_var="FE_$label"; keys=(); [ "$label" = curve ] && keys=("${CLIENT_KEYS[@]}")
  for _ in $(seq 600); do $Z ready --endpoint "${!fe_var}" "${keys[@]}" >/dev/null 2>&1 && break; sleep 0.2; done
done

bench() {  # bench <label> <args...>: requests/s and p50 from zembed bench --json
  local label=$1; shift
  local fe_var="FE_$label" keys=()
  [ "$label" = curve ] && keys=("${CLIENT_KEYS[@]}")
  $Z bench --endpoint "${!fe_var}" "${keys[@]}" --json "$@" 2>/dev/null | .venv/bin/python -c '
import json, sys
s = json.load(sys.stdin)["served"]
print(s["requests_per_s"], s["latency_ms"]["p50"], s["cache_hit_ratio"])'
}
for label in plain curve; do  # warm the repeat pool (256 sentences) into each cache
  bench "$label" --items 1 --concurrency 8 --repeat 1.0 --requests 2000 --duration-s 120 >/dev/null
done
echo "all-hit text, 1 item/request, ${SECS}s per run, same machine, same run"
printf '%-28s %12s %12s %12s %8s\n' case plain_req/s curve_req/s curve/plain hit
for shape in "1 1" "1 64" "16 64"; do
  read -r items conc <<<"$shape"
  read -r p_rate p_p50 p_hit < <(bench plain --items "$items" --concurrency "$conc" --repeat 1.0 --duration-s "$SECS")
  read -r c_rate c_p50 c_hit < <(bench curve --items "$items" --concurrency "$conc" --repeat 1.0 --duration-s "$SECS")
  ratio=$(.venv/bin/python -c "print(f'{$c_rate / $p_rate:.2f}')")
  printf '%-28s %12s %12s %12s %8s\n' "$items item(s) x $conc in flight" "$p_rate" "$c_rate" "$ratio" "$c_hit"
  echo "   p50 ms: plain $p_p50, curve $c_p50"
done
