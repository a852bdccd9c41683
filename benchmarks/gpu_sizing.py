"""Warm-up sizing on a GPU: the curve each engine measures, and what it chooses from it.

On a CUDA machine with zembed installed (``--no-deps`` is enough where torch, transformers
and open_clip are already there):
    python benchmarks/gpu_sizing.py --text-model PATH [--random-text-weights]
The text engine is MiniLM from PATH (``--random-text-weights``: weights drawn at random for
the folder's config, where the real ones cannot travel; timings depend on the shapes only).
The image engine is ViT-B-32 with seeded random weights. Both size themselves as
``zembed start text|image`` would on that GPU (batch, credits, token budget; a 200 ms target),
and the script prints the curves and the choices as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from zembed.config import ImageEngineConfig, TextEngineConfig, load
from zembed.engines.sizing import Plan


def random_copy(folder: str) -> str:
    """``folder`` with its weights replaced by random ones of the same config."""
    from transformers import AutoConfig, AutoModel

    out = Path(tempfile.mkdtemp(prefix="zembed-random-")) / "model"
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    AutoModel.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
    return str(out)


def size(kind: str, flags: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    if kind == "text":
        from zembed.engines.text import TextModel

        text_cfg = load(TextEngineConfig, env={}, flags=flags)
        model: Any = TextModel(text_cfg)
        plan = Plan(max_batch=0, credits=0, threads=0, latency_target_ms=200, min_credits=64)
    else:
        from zembed.engines.image import ImageModel

        image_cfg = load(ImageEngineConfig, env={}, flags=flags)
        model = ImageModel(image_cfg)
        plan = Plan(max_batch=0, credits=0, threads=0, latency_target_ms=200, min_credits=16)
    sizing, warm = model.warmup(plan)
    return {"describe": sizing.describe(), "sizing": warm.get("sizing"),
            "model": model.describe(), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-model", required=True)
    ap.add_argument("--random-text-weights", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    path = random_copy(args.text_model) if args.random_text_weights else args.text_model
    out = {"text": size("text", {"model": path, "device": args.device}),
           "image": size("image", {"model": "ViT-B-32", "random_weights": True,
                                   "device": args.device})}
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
