"""Raw in-process forward rate of the text engine's own model code, for comparing versions.

Prints one JSON line: sentences/s at each batch size (unique 8-16 word sentences, the engine's
default thread count). ``benchmarks/raw_versions.sh <commit>`` runs it alternately on an older
commit and on this checkout, so a change to the model code is measured against the code before
it in the same run. Usage::

    .venv/bin/python benchmarks/raw_text.py [seconds] [batches, e.g. 1,32]
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import zembed
from zembed.config import TextEngineConfig
from zembed.engines.text import TextModel

WORDS = ("red blue light trail running shoes women men size cotton shirt summer winter jacket "
         "waterproof leather bag travel kitchen knife").split()


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
    batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1,32").split(",")]
    rng = random.Random(7)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(8, 16))) + f" #{i}" for i in range(4096)]
    model = TextModel(TextEngineConfig())
    out: dict[str, object] = {"zembed": os.path.dirname(zembed.__file__)}
    for batch in batches:
        model.encode(texts[:batch])
        done, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.encode(texts[i:i + batch])
            i = (i + batch) % (len(texts) - batch)
            done += batch
        out[f"batch_{batch}_per_s"] = round(done / (time.perf_counter() - t0), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
