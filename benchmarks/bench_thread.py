"""Why the engine runs inference on its main thread: the same forward pass, main vs helper thread.

Usage: ``.venv/bin/python benchmarks/bench_thread.py [--seconds 4] [--threads 2]``
Prints sentences/s at batch 32 alternating main thread and a secondary thread, three rounds.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_text import sentences

from zembed.config import TextEngineConfig
from zembed.engines.text import TextModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    model = TextModel(TextEngineConfig(threads=args.threads))
    texts = sentences(4096, seed=32)
    rates: dict[str, list[float]] = {"main": [], "thread": []}

    def run(where: str) -> None:
        model.encode(texts[:32])
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            model.encode(texts[done % 4000:done % 4000 + 32])
            done += 32
        rates[where].append(done / (time.perf_counter() - t0))

    for _ in range(3):
        run("main")
        t = threading.Thread(target=run, args=("thread",))
        t.start()
        t.join()
    for where, values in rates.items():
        print(f"{where:6} thread: " + ", ".join(f"{v:.0f}" for v in values) + " sentences/s @32")


if __name__ == "__main__":
    main()
