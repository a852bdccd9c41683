"""Realistic load inputs, made in memory: product-like sentences and photo-like JPEGs.

Uniqueness is cheap on purpose, so the generator is never the bottleneck: a unique sentence is
a realistic one with a counter in it, and a unique image is a pre-encoded JPEG with a few
bytes appended after its end-of-image marker (decoders ignore them; the content hash, and so
the cache key, changes).
"""

from __future__ import annotations

import random
import struct
import uuid
from typing import Any

WORDS = (
    "red blue black white green light dark trail running walking shoes boots sandals women "
    "men kids size cotton linen wool shirt dress jacket coat waterproof leather canvas bag "
    "backpack travel kitchen knife steel pan pot coffee grinder kettle phone case charger "
    "cable fast wireless garden chair table lamp desk office ergonomic organic vegan gift set "
    "premium classic slim fit large small medium pack of two three for summer winter"
).split()


class InputSource:
    """Inputs of one kind with a set share of repeats (to exercise the cache).

    :param kind: text, clip-text or image.
    :param repeat: fraction of items drawn from a fixed pool of ``pool`` inputs (0 = all
        unique, 1 = all from the pool).
    :param seed: RNG seed for the words and the repeat choices.
    :param salt: mixed into every fresh input, so "unique" also means unique across runs
        (a new random salt by default; fix it to replay a run exactly, cache included). The
        repeat pool does not take the salt: it is the same in every run with the same seed,
        so one run can warm the cache for the next.
    """

    def __init__(self, kind: str, repeat: float = 0.0, pool: int = 256, seed: int = 1,
                 image_size: tuple[int, int] = (640, 480), salt: str | None = None) -> None:
        self.kind = kind
        self.salt = salt if salt is not None else uuid.uuid4().hex[:8]
        self.repeat = repeat
        self.rng = random.Random(seed)
        self.counter = 0
        self._images: list[bytes] = []
        if kind == "image":
            from zembed.tools.synthimg import synthetic_jpeg  # numpy only: no torch, no Pillow

            self._images = [synthetic_jpeg(*image_size, seed=s) for s in range(16)]
        self.pool = [self._fresh("pool") for _ in range(pool)]

    def _fresh(self, salt: str | None = None) -> Any:
        self.counter += 1
        salt = self.salt if salt is None else salt
        if self.kind == "image":
            base = self._images[self.counter % len(self._images)]
            return base + struct.pack("<Q", self.counter) + salt.encode()
        words = self.rng.choices(WORDS, k=self.rng.randint(8, 16))
        return " ".join(words) + f" {self.counter}{salt}"

    def take(self, n: int) -> list[Any]:
        """``n`` items, each a repeat with probability ``repeat``."""
        return [self.rng.choice(self.pool) if self.rng.random() < self.repeat else self._fresh()
                for _ in range(n)]
