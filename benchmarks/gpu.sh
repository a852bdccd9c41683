#!/usr/bin/env bash
# GPU benchmarks, one NVIDIA GPU, fresh checkout, no network beyond the package index that
# scripts/install uses. Bounded: every step runs under `timeout`, and steps that no longer
# fit in GPU_BUDGET_S (default 470 s, under 8 minutes, install included) are skipped and
# listed. In order:
#   1. install (scripts/install), check nvidia-smi and that torch sees CUDA;
#   2. raw, in-process: MiniLM forward at batch 32 and 256 on cuda; ViT-B-32 (seeded random
#      weights) forward at batch 16, 64 and 256; CPU decode+preprocess (PIL + open_clip) on
#      one thread and on the engine's decode pool; GPU decode (--decode gpu: nvJPEG + tensor
#      preprocessing) at 1, 16 and 64 JPEGs per call and on the pool; how far the GPU
#      pipeline's model inputs and vectors are from the CPU path's;
#   3. `zembed up` with both engines on cuda (bigger batches and credits, --decode gpu), then
#      `zembed bench --raw --json`: text 32 items/request, text 1 item at 64 in flight,
#      images with --decode gpu, all-hit cache; then an image-only stack with --decode cpu
#      and the same image bench.
# Results: JSON files (and the stacks' logs) under $OUT if set, else benchmarks/results-gpu/.
# Usage: benchmarks/gpu.sh [seconds-per-served-run]   (GPU_BUDGET_S, RAW_SECONDS, SKIP_INSTALL=1)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${GPU_BUDGET_S:-470}
SECONDS_PER_RUN=${1:-8}
RESULTS=${OUT:-benchmarks/results-gpu}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
Z=.venv/bin/zembed
PY=.venv/bin/python
SKIPPED=()
FAILED=()

die() { echo "gpu.sh: $*" >&2; exit 2; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# step NAME SECONDS CMD...: CMD under timeout, capped by what is left of the budget (less a
# 20 s reserve for shutting the stack down); skipped when under 15 s would remain.
step() {
  local name=$1 want=$2 cap rc=0
  shift 2
  cap=$(($(left) - 20))
  if ((cap < 15)); then
    echo "!! skipped (budget spent): $name"
    SKIPPED+=("$name")
    return 0
  fi
  ((want > cap)) && want=$cap
  echo; echo "== $name (at most ${want}s; $(left)s of the budget left)"
  timeout -k 5 "$want" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "!! $name timed out after ${want}s"
    FAILED+=("$name")
  elif ((rc != 0)); then
    echo "!! $name failed (exit $rc)"
    FAILED+=("$name")
  fi
  return 0
}
# "${TO[@]}" OUT ERR CMD...: CMD with its stdout and stderr in files (a program, for timeout)
# shellcheck disable=SC2016  # expanded by the inner bash
TO=(bash -c 'out=$1 err=$2; shift 2; exec "$@" > "$out" 2> "$err"' to)

# -- 0. the GPU, then install -------------------------------------------------------------
command -v nvidia-smi >/dev/null ||
  die "nvidia-smi not found: this script needs a machine with an NVIDIA GPU and its driver"
GPUS=$(timeout 30 nvidia-smi -L 2>&1) || die "nvidia-smi failed: $GPUS"
grep -q "^GPU " <<< "$GPUS" ||
  die "nvidia-smi lists no GPU (driver not loaded, or no device visible here): $GPUS"
echo "$GPUS"
timeout 30 nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
if [ "${SKIP_INSTALL:-0}" != 1 ] || [ ! -x "$PY" ]; then
  echo "== install (scripts/install)"
  timeout -k 10 300 scripts/install || die "scripts/install failed or took over 300 s"
fi
timeout 120 "$PY" - <<'PY' || die "torch cannot use CUDA here (see the line above: a CPU-only build, or a driver older than its CUDA? set ZEMBED_TORCH_SPEC to a matching CUDA build of the torch/torchvision pair and rerun scripts/install)"
import sys, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__,
      "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit(1)
print("device:", torch.cuda.get_device_name(0))
PY
echo "install and checks done at $(($(date +%s) - START)) s"

# -- 1. raw, in-process ---------------------------------------------------------------------
RAW_PY=$(mktemp --suffix .py)
cat > "$RAW_PY" <<'PY'
import json, os, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

from zembed.config import ImageEngineConfig, TextEngineConfig
from zembed.engines.image import ImageModel
from zembed.engines.text import TextModel
from zembed.tools.inputs import InputSource

SECONDS = float(os.environ["RAW_SECONDS"])
out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
       "cpu_cores": len(os.sched_getaffinity(0))}

def rate(fn, per_call):
    fn()  # warm-up (also CUDA kernels' first launch)
    torch.cuda.synchronize()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS:
        fn()
        done += per_call
    torch.cuda.synchronize()
    return round(done / (time.perf_counter() - t0), 1)

def show(key):
    print(f"{key}: {out[key]}", flush=True)

text = TextModel(TextEngineConfig(device="cuda"))
out["text_dtype"] = text.describe()["dtype"]
src = InputSource("text", seed=5)
for b in (32, 256):
    items = src.take(b)
    prepared = text.prepare("text", items, None)
    out[f"text_forward_per_s@{b}"] = rate(lambda: text.forward("text", prepared), b)
    show(f"text_forward_per_s@{b}")
    out[f"text_tokenize_forward_per_s@{b}"] = rate(
        lambda: text.forward("text", text.prepare("text", items, None)), b)
    show(f"text_tokenize_forward_per_s@{b}")
del text
torch.cuda.empty_cache()

img = ImageModel(ImageEngineConfig(random_weights=True, device="cuda", decode="gpu"))
out["image_dtype"] = img.describe()["dtype"]
photos = InputSource("image", seed=7).take(256)  # 640x480 photo-like JPEGs, all distinct
base = [t.to("cuda") for t in img.prepare_cpu(photos[:16])]
for b in (16, 64, 256):
    inputs = (base * (b // 16 + 1))[:b]
    out[f"image_forward_per_s@{b}"] = rate(lambda: img.forward("image", inputs), b)
    show(f"image_forward_per_s@{b}")

pool_n = img.prepare_workers
pool = ThreadPoolExecutor(pool_n)
chunks = [photos[i:i + 16] for i in range(0, 256, 16)]
def pooled(fn):
    list(pool.map(fn, chunks))
out["decode_pool_threads"] = pool_n
out["cpu_decode_preprocess_per_s@1thread"] = rate(lambda: img.prepare_cpu(photos[:16]), 16)
show("cpu_decode_preprocess_per_s@1thread")
out["cpu_decode_preprocess_per_s@pool"] = rate(lambda: pooled(img.prepare_cpu), 256)
show("cpu_decode_preprocess_per_s@pool")
for n in (1, 16, 64):
    out[f"gpu_decode_preprocess_per_s@{n}_per_call"] = rate(
        lambda: img.prepare("image", photos[:n], None), n)
    show(f"gpu_decode_preprocess_per_s@{n}_per_call")
out["gpu_decode_preprocess_per_s@pool_16_per_call"] = rate(
    lambda: pooled(lambda c: img.prepare("image", c, None)), 256)
show("gpu_decode_preprocess_per_s@pool_16_per_call")
prep = img.jpeg_prep
out["gpu_pipeline_jpegs_decoded"], out["gpu_pipeline_fallbacks_to_cpu"] = prep.decoded, prep.fallbacks
show("gpu_pipeline_fallbacks_to_cpu")

# How far the GPU pipeline's model inputs (and vectors) are from the CPU path's.
gpu_in = img.prepare("image", photos[:16], None)
cpu_draft = img.prepare_cpu(photos[:16])
saved, img.limits = img.limits, replace(img.limits, draft=False)
cpu_full = img.prepare_cpu(photos[:16])
img.limits = saved
def compare(a, b, name):
    d = torch.stack([x.float().cpu() for x in a]) - torch.stack([x.float().cpu() for x in b])
    va, vb = img.forward("image", a), img.forward("image", b)
    cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    out[f"gpu_vs_{name}"] = {"input_mean_abs": round(d.abs().mean().item(), 5),
                             "input_max_abs": round(d.abs().max().item(), 4),
                             "vector_cosine_min": round(float(cos.min()), 6)}
    show(f"gpu_vs_{name}")
compare(gpu_in, cpu_full, "cpu_full_decode")
compare(gpu_in, cpu_draft, "cpu_draft_decode")
out["gpu_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
with open(os.path.join(os.environ["RESULTS"], "raw.json"), "w") as fh:
    json.dump(out, fh, indent=1)
print("raw figures written to raw.json")
PY
step "raw forward and decode, in-process" 150 \
  env RAW_SECONDS="${RAW_SECONDS:-2}" RESULTS="$RESULTS" "$PY" "$RAW_PY"

# -- 2. served, through the stack -------------------------------------------------------------
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
FE=$(port); BE=$(port); ST=$(port)
CFG_GPU=$(mktemp --suffix .toml); CFG_CPU=$(mktemp --suffix .toml)
common() {  # common LANES: broker and client tables
  cat <<TOML
[broker]
frontend = "tcp://127.0.0.1:$FE"
backend = "tcp://127.0.0.1:$BE"
lanes = [$1]
cache_prefix = "zembed-gpu-$FE"
stats_endpoint = "tcp://127.0.0.1:$ST"
[client]
endpoint = "tcp://127.0.0.1:$FE"
stats_endpoint = "tcp://127.0.0.1:$ST"
timeout_s = 30.0
TOML
}
image_table() {  # image_table DECODE
  cat <<TOML
[image]
broker = "tcp://127.0.0.1:$BE"
random_weights = true
device = "cuda"
max_batch = 64
credits = 256
decode = "$1"
TOML
}
{ common '"text", "image"'; cat <<TOML
[text]
broker = "tcp://127.0.0.1:$BE"
device = "cuda"
max_batch = 256
max_batch_tokens = 16384
credits = 512
TOML
  image_table gpu; } > "$CFG_GPU"
{ common '"image"'; image_table cpu; } > "$CFG_CPU"

UP=""
stack_up() {  # stack_up CONFIG LOG: zembed up in its own process group, then wait for ready
  local cap=$(($(left) - 20))
  ((cap < 30)) && return 1
  setsid timeout -k 10 "$cap" "$Z" up --config "$1" > "$2" 2>&1 &
  UP=$!
  local deadline=$(($(date +%s) + 120))
  while (($(date +%s) < deadline)); do
    timeout 5 "$Z" ready --config "$1" > /dev/null 2>&1 && return 0
    kill -0 "$UP" 2>/dev/null || { echo "!! zembed up exited; see $2"; tail -20 "$2"; return 1; }
    sleep 0.5
  done
  echo "!! not ready within 120 s; see $2"; tail -20 "$2"; return 1
}
stack_down() {  # SIGTERM to `zembed up` (stops engines, then broker), SIGKILL the group after 20 s
  [ -n "$UP" ] || return 0
  kill -TERM "$UP" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$UP" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$UP" 2>/dev/null || true
  wait "$UP" 2>/dev/null || true
  UP=""
}
trap 'stack_down; rm -f "$CFG_GPU" "$CFG_CPU" "$RAW_PY"' EXIT

bench() {  # bench NAME CONFIG ARGS...: zembed bench --raw --json into NAME.json, then a summary
  local name=$1 cfg=$2
  shift 2
  step "zembed bench $*" $((SECONDS_PER_RUN + 90)) "${TO[@]}" "$RESULTS/$name.json" "$RESULTS/$name.stderr" \
    "$Z" bench --config "$cfg" --duration-s "$SECONDS_PER_RUN" --raw --json "$@"
  timeout 30 "$PY" -c 'import json, sys
from zembed.tools.bench import render
print(render(json.load(open(sys.argv[1]))))' "$RESULTS/$name.json" 2>/dev/null ||
    echo "(no result in $name.json; see $name.stderr)"
}

timeout 60 scripts/ensure-redis 2>&1 || echo "no Redis: the broker's cache will be in memory"
echo; echo "== zembed up: text and image engines on cuda, --decode gpu ($(left)s left)"
if stack_up "$CFG_GPU" "$RESULTS/up-gpu.log"; then
  bench text-32 "$CFG_GPU" --kind text --items 32 --concurrency 8
  bench text-1x64 "$CFG_GPU" --kind text --items 1 --concurrency 64
  bench image-decode-gpu "$CFG_GPU" --kind image --items 8 --concurrency 16
  # The repeat pool is the same in every run: a short run fills the cache for the measured one.
  timeout 60 "$Z" bench --config "$CFG_GPU" --kind text --items 1 --concurrency 64 --repeat 1.0 \
    --requests 3000 --duration-s 30 >/dev/null 2>&1 || true
  bench cache-all-hit "$CFG_GPU" --kind text --items 1 --concurrency 64 --repeat 1.0
else
  FAILED+=("stack with --decode gpu")
fi
stack_down
echo; echo "== zembed up: image engine on cuda, --decode cpu ($(left)s left)"
if stack_up "$CFG_CPU" "$RESULTS/up-cpu.log"; then
  bench image-decode-cpu "$CFG_CPU" --kind image --items 8 --concurrency 16
else
  FAILED+=("stack with --decode cpu")
fi
stack_down

echo
echo "done in $(($(date +%s) - START)) s; results in $RESULTS"
((${#SKIPPED[@]} == 0)) || echo "skipped (budget): ${SKIPPED[*]}"
((${#FAILED[@]} == 0)) || { echo "failed: ${FAILED[*]}"; exit 1; }
