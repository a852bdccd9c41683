"""Batch invariance of the text engine: what changes a vector's bits, and what avoiding it costs.

Two parts, one run:

``probe``: in-process, the real model, the engine's own ``TextModel``. For texts of several
lengths it compares the bits of one text's vector computed alone with the same text in batches
of equal-length texts (sizes 2..64), next to shorter texts, next to a long text, and with 1 and
2 torch threads, for the raw padded pass (``batch_invariant`` off) and for the engine in each
mode. It prints the largest fp32 difference and how many BF16 vectors (normalised, as the wire
and the cache carry them) differ in any bit.

``throughput``: a broker (cache off) and one text engine, first with ``--no-batch-invariant``,
then with ``--batch-invariant``, alternating for ``--rounds``; each time ``zembed bench --kind
text --items 32 --concurrency 2 --raw`` (its own product-title inputs, 18-34 tokens) and the same
closed loop with a realistic mix of lengths (half 2-8-word queries, 35% 8-16-word titles, 15%
30-150-word descriptions). Items/s of both modes, their ratio, and the raw forward limit of each.

Usage::

    .venv/bin/python benchmarks/bench_determinism.py probe [--dtype auto|fp32|bf16]
    .venv/bin/python benchmarks/bench_determinism.py throughput [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from stacks import text_stack

from zembed import protocol as p
from zembed.cache.bf16 import to_bf16
from zembed.tools.inputs import WORDS

Vec = npt.NDArray[np.float32]
LENGTHS = (5, 8, 12, 16, 20, 24, 32, 48, 64, 100, 129, 200)
SIZES = (2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64)


def wire(v: Vec) -> npt.NDArray[np.uint16]:
    """The BF16 words the engine replies and the cache stores for a normalised vector."""
    v = v / max(float(np.linalg.norm(v)), 1e-12)
    return to_bf16(v[None].astype(np.float32))[0]


class MixSource:
    """Unique texts of a realistic mix of lengths: queries, product titles, descriptions."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.counter = 0
        self.salt = f"{time.time_ns() % 10**8}"

    def take(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            self.counter += 1
            r = self.rng.random()
            k = (self.rng.randint(2, 8) if r < 0.5 else self.rng.randint(8, 16) if r < 0.85
                 else self.rng.randint(30, 150))
            out.append(" ".join(self.rng.choices(WORDS, k=k)) + f" {self.counter}{self.salt}")
        return out


# -- probe -----------------------------------------------------------------------------------


def by_length(model: Any, seed: int = 3) -> dict[int, list[list[int]]]:
    """Token-id lists of random word sentences, grouped by token count (enough per length)."""
    rng = random.Random(seed)
    groups: dict[int, list[list[int]]] = {}
    for _ in range(40):
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 230))) for _ in range(500)]
        for ids in model.prepare(p.KIND_TEXT, texts, None):
            groups.setdefault(len(ids), []).append(ids)
        if all(len(groups.get(L, [])) >= 64 for L in LENGTHS):
            break
    return groups


class Tally:
    """Per case: largest fp32 difference and count of BF16 vectors that differ."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[float, bool]]] = {}

    def add(self, case: str, ref: Vec, got: Vec) -> None:
        flip = bool((wire(ref) != wire(got)).any())
        self.rows.setdefault(case, []).append((float(np.abs(ref - got).max()), flip))

    def print(self, title: str) -> None:
        print(f"\n{title}")
        for case, rows in self.rows.items():
            print(f"  {case:48s} max|diff| {max(d for d, _ in rows):9.3g}   BF16 vectors "
                  f"differing {sum(f for _, f in rows):3d}/{len(rows)}")


def probe_model(model: Any, groups: dict[int, list[list[int]]], tally: Tally) -> None:
    """One text per length x 2: alone vs equal-length batches, shorter mates, a long mate."""
    forward: Callable[[list[list[int]]], Vec] = lambda xs: model.forward(p.KIND_TEXT, xs)  # noqa: E731
    long_text = groups[max(groups)][0]
    for L in LENGTHS:
        same = groups[L]
        for t in range(2):
            text, others = same[t], same[:t] + same[t + 1:]
            ref = forward([text])[0]
            for b in SIZES:
                mates = others[:b - 1]
                tally.add("equal length, batch 2..64 (first, last)", ref, forward([text, *mates])[0])
                tally.add("equal length, batch 2..64 (first, last)", ref, forward([*mates, text])[-1])
            shorter = [x for k in range(3, L) for x in groups.get(k, [])[:2]][:31]
            if shorter:
                tally.add("with shorter texts (it is the longest), 8 and 32",
                          ref, forward([text, *shorter[:7]])[0])
                tally.add("with shorter texts (it is the longest), 8 and 32",
                          ref, forward([*shorter, text])[-1])
            near = [x for k in range(L - 7, L + 8) if k != L for x in groups.get(k, [])[:2]]
            tally.add("with texts 1-7 tokens shorter and longer", ref,
                      forward([*near[:8], text, *near[8:]])[8])
            if len(long_text) > L:
                tally.add(f"with one long text ({len(long_text)} tokens)", ref,
                          forward([text, long_text])[0])
                tally.add("with a long text and 6 equal-length texts", ref,
                          forward([long_text, *others[:6], text])[-1])


def probe_small_passes(models: dict[bool, Any], groups: dict[int, list[list[int]]]) -> None:
    """Per length, the batch sizes at which a text differs from itself alone: unpadded
    (equal-length mates, padded mode) and in its 8-token bucket (mates of other lengths)."""
    print("\nbatch sizes 2..33 at which a text differs from itself alone, 2 threads")
    for L in (5, 7, 9, 12, 13, 20, 21, 24, 100, 129):
        text, others = groups[L][0], groups[L][1:]
        width = models[True].padded_length(L)
        near = [x for k in range(width - 7, width + 1) if k != L for x in groups.get(k, [])[:4]]
        exact_ref = models[False].forward(p.KIND_TEXT, [text])[0]
        bucket_ref = models[True].forward(p.KIND_TEXT, [text])[0]
        exact, bucket = [], []
        for b in (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33):
            got = models[False].forward(p.KIND_TEXT, [text, *others[:b - 1]])[0]
            if not np.array_equal(got, exact_ref):
                exact.append(b)
            got = models[True].forward(p.KIND_TEXT, [*(near * 10)[:b - 1], text])[-1]
            if not np.array_equal(got, bucket_ref):
                bucket.append(b)
        print(f"  {L:3d} tokens: unpadded {exact or 'none'}; in its {width}-token bucket "
              f"{bucket or 'none'}")


def probe(dtype: str) -> None:
    """Bits of one text alone and in company, per mode and thread count."""
    import torch

    from zembed.config import TextEngineConfig
    from zembed.engines.text import TextModel

    models = {mode: TextModel(TextEngineConfig(threads=1, dtype=dtype, batch_invariant=mode))
              for mode in (False, True)}
    groups = by_length(models[False])
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()},"
          f" dtype {models[False].describe()['dtype']}, texts of {list(LENGTHS)} tokens")
    alone: dict[int, list[Vec]] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for mode, model in models.items():
            tally = Tally()
            probe_model(model, groups, tally)
            tally.print(f"batch_invariant={mode}, {threads} thread(s): vs the same text alone")
        alone[threads] = [models[True].forward(p.KIND_TEXT, [groups[L][0]])[0] for L in LENGTHS]
        alone[threads] += [models[True].forward(p.KIND_TEXT, groups[L][:32])[0] for L in LENGTHS]
    probe_small_passes(models, groups)
    tally = Tally()
    for a, b in zip(alone[1], alone[2], strict=True):
        tally.add("alone and in equal-length batches of 32", a, b)
    tally.print("1 thread vs 2 threads")


# -- throughput ------------------------------------------------------------------------------


def stack(invariant: bool) -> Any:
    """Broker (cache off) + one text engine in the given mode; yields (endpoint, config file)."""
    from zembed.engines.text import bundled_model_path

    # The model as a path, so that --raw (which loads what the engine announced) finds it offline.
    return text_stack(f'model = "{bundled_model_path()}"\n'
                      f'batch_invariant = {str(invariant).lower()}\n')


def bench_cli(config: str, seconds: float) -> dict[str, Any]:
    """``zembed bench --kind text --items 32 --concurrency 2 --raw``: served and raw figures."""
    cmd = [sys.executable, "-m", "zembed", "bench", "--config", config, "--kind", "text",
           "--items", "32", "--concurrency", "2", "--raw", "--json", "--duration-s", str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"zembed bench failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout)
    raw = result["raw"]["text"]
    return {"items_per_s": result["served"]["items_per_s"],
            "raw_forward@32": raw.get("forward_items_per_s@32"),
            "errors": result["served"]["errors"]}


def bench_mix(endpoint: str, invariant: bool, seconds: float) -> dict[str, Any]:
    """The same closed loop as ``zembed bench`` (its ``Bench``) with :class:`MixSource` inputs,
    and the raw in-process forward rate of 32-item mix batches in the same mode."""
    from zembed.config import TextEngineConfig
    from zembed.engines.text import TextModel, bundled_model_path
    from zembed.tools.bench import Bench, BenchSpec
    from zembed.tools.raw import _rate

    spec = BenchSpec(kinds=(p.KIND_TEXT,), items=32, concurrency=2, duration_s=seconds)
    bench = Bench(endpoint, spec, progress=False)
    bench.sources[p.KIND_TEXT] = MixSource()  # type: ignore[assignment]
    summary = bench.run().summary()
    model = TextModel(TextEngineConfig(model=str(bundled_model_path()), batch_invariant=invariant))
    source = MixSource(seed=99)
    batches = [source.take(32) for _ in range(16)]
    turn = iter(range(10**9))
    raw = _rate(lambda: model.encode(batches[next(turn) % len(batches)]), 32, 3 * seconds / 4)
    return {"items_per_s": summary["items_per_s"], "raw_forward@32": raw,
            "errors": summary["errors"]}


def throughput(seconds: float, rounds: int) -> None:
    """Both modes, alternating, same inputs; median items/s of each and the ratio."""
    runs: dict[str, dict[bool, list[dict[str, Any]]]] = {"titles": {False: [], True: []},
                                                         "mix": {False: [], True: []}}
    for r in range(rounds):
        for invariant in (False, True):
            with stack(invariant) as (endpoint, config):
                bench_mix(endpoint, invariant, 2)  # warm the engine's shapes
                runs["titles"][invariant].append(bench_cli(config, seconds))
                runs["mix"][invariant].append(bench_mix(endpoint, invariant, seconds))
            print(f"round {r + 1} batch_invariant={invariant}: "
                  f"titles {runs['titles'][invariant][-1]}, mix {runs['mix'][invariant][-1]}",
                  flush=True)
    print(f"\n{'inputs':8} {'mode':14} {'items/s':>8} {'raw@32':>8} {'served/raw':>10}")
    for name, by_mode in runs.items():
        med = {m: statistics.median(x["items_per_s"] for x in rs) for m, rs in by_mode.items()}
        for mode, rs in by_mode.items():
            raw = statistics.median(x["raw_forward@32"] for x in rs)
            label = "invariant" if mode else "padded"
            print(f"{name:8} {label:14} {med[mode]:8.1f} {raw:8.1f} {med[mode] / raw:10.2f}")
        print(f"{name:8} invariant / padded = {med[True] / med[False]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("--dtype", default="auto")
    th = sub.add_parser("throughput")
    th.add_argument("--seconds", type=float, default=10.0)
    th.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "probe":
        probe(args.dtype)
    else:
        throughput(args.seconds, args.rounds)


if __name__ == "__main__":
    main()
