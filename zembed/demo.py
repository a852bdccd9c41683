"""The demo ``zembed up --demo`` runs once everything is ready: embed a few inputs, show them."""

from __future__ import annotations

import time

import click
import numpy as np

from zembed.client import Client

SENTENCES = [
    "How do I reset my password?",
    "I forgot my login credentials and cannot sign in.",
    "Red running shoes for women, size 38",
    "Lightweight trail sneakers in crimson",
    "The quarterly report is due on Friday.",
]


def run(endpoint: str) -> None:
    """Embed the demo sentences through the broker and print what came back."""
    with Client(endpoint, timeout=30.0, retries=3) as client:
        t0 = time.perf_counter()
        vectors = client.embed_texts(SENTENCES)
        ms = (time.perf_counter() - t0) * 1000
        click.echo(f"embedded {len(SENTENCES)} sentences in {ms:.1f} ms: "
                   f"shape {vectors.shape}, dtype {vectors.dtype}")
        for text, vec in zip(SENTENCES, vectors, strict=True):
            head = " ".join(f"{x:+.3f}" for x in vec[:4])
            click.echo(f"  |v|={np.linalg.norm(vec):.4f} [{head} ...]  {text}")
        sims = vectors @ vectors.T
        click.echo("cosine similarity (rows/columns in the order above):")
        for row in sims:
            click.echo("  " + " ".join(f"{s:5.2f}" for s in row))
        best = [int(np.argsort(-row)[1]) for row in sims]
        for i, j in enumerate(best):
            click.echo(f"  nearest to #{i}: #{j}")
        stats = client.stats()
        lane = stats["lanes"]["text"]
        click.echo(f"text lane: {len(lane['engines'])} engine(s), "
                   f"{lane['credits_free']}/{lane['credits_total']} credits free, "
                   f"{lane['requests'].get('200', 0)} request(s) served")
