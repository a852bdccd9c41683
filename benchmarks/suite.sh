#!/usr/bin/env bash
# The throughput suite: brings zembed up (text + ViT-B-32 with random weights, Redis cache),
# runs `zembed bench --raw` for each target of the throughput issue, and prints every figure
# beside its raw limit measured in the same run. ~10 minutes on the 2-core machine.
# Usage: benchmarks/suite.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
export HF_HUB_OFFLINE=1
Z=.venv/bin/zembed
port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
FE=$(port); BE=$(port); ST=$(port)
CFG=$(mktemp --suffix .toml)
cat > "$CFG" <<TOML
[broker]
frontend = "tcp://127.0.0.1:$FE"
backend = "tcp://127.0.0.1:$BE"
lanes = ["text", "image"]
cache_prefix = "zembed-suite-$FE"
stats_endpoint = "tcp://127.0.0.1:$ST"
[text]
broker = "tcp://127.0.0.1:$BE"
[image]
broker = "tcp://127.0.0.1:$BE"
random_weights = true
[client]
endpoint = "tcp://127.0.0.1:$FE"
stats_endpoint = "tcp://127.0.0.1:$ST"
TOML
$Z up --config "$CFG" > /tmp/zembed-suite-up.log 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null; rm -f "$CFG" "${LAST:-}"' EXIT
for _ in $(seq 600); do $Z ready --config "$CFG" >/dev/null 2>&1 && break; sleep 0.2; done
BROKER_PID=$(pgrep -f "zembed start broker --config $CFG" | head -1)
rss() { ps -o rss= -p "$BROKER_PID" | tr -d ' '; }
LAST=$(mktemp)
run() {  # prints the report; the JSON of the last run stays in $LAST
  echo; echo "== zembed bench $*"
  $Z bench --config "$CFG" --duration-s "$SECONDS_PER_RUN" --json "$@" 2>/dev/null > "$LAST"
  .venv/bin/python -c 'import json, sys; from zembed.tools.bench import render; print(render(json.load(open(sys.argv[1]))))' "$LAST"
}

run --kind text --items 32 --concurrency 2 --raw
run --kind text --items 1 --concurrency 64 --raw
CAPACITY=$(.venv/bin/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["served"]["requests_per_s"])' "$LAST")
run --kind text --items 1 --concurrency 64 --repeat 1.0 --requests 3000 --duration-s 60 >/dev/null  # fill the cache (the repeat pool is the same every run)
run --kind text --items 1 --concurrency 64 --repeat 1.0 --raw
run --kind image --items 4 --concurrency 4 --raw
OVERLOAD=$(.venv/bin/python -c "print(max(10, round(2 * $CAPACITY)))")
echo; echo "== 2x overload: open loop at $OVERLOAD req/s, twice the text lane's measured 1-item capacity ($CAPACITY req/s)"
run --kind text --items 1 --rate "$OVERLOAD"
echo; echo "== rejection soak: 1-item requests at ${SOAK_RATE:-3000}/s (70x the lane's capacity, below the broker's own limit for saying no), broker RSS sampled every 5 s"
SAMPLES=$(mktemp)
( while kill -0 "$BROKER_PID" 2>/dev/null; do echo "$(date +%s) $(rss)" >> "$SAMPLES"; sleep 5; done ) &
SAMPLER=$!
$Z bench --config "$CFG" --kind text --items 1 --rate "${SOAK_RATE:-3000}" \
  --requests "${SOAK_REQUESTS:-1000000}" --duration-s 900 2>/dev/null | grep -E "sent|time to 429"
kill "$SAMPLER" 2>/dev/null || true
echo "broker RSS samples (KiB), every 5 s:"; awk '{print $2}' "$SAMPLES" | tr '\n' ' '; echo
awk 'NR==1{first=$2} {last=$2; if($2>max)max=$2} END{printf "first %d, last %d, max %d KiB: last/first %.3f\n", first, last, max, last/first}' "$SAMPLES"
rm -f "$SAMPLES"
