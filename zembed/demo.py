"""The demo ``zembed up --demo`` runs once everything is ready: embed a few inputs, show them."""

from __future__ import annotations

import time
from typing import Any

import click
import numpy as np

from zembed import protocol as p
from zembed.client import Client

SENTENCES = [
    "How do I reset my password?",
    "I forgot my login credentials and cannot sign in.",
    "Red running shoes for women, size 38",
    "Lightweight trail sneakers in crimson",
    "The quarterly report is due on Friday.",
]
CLIP_QUERIES = ["a photo of a red shoe", "a photo of a blue sky"]


def run(endpoint: str, gateway_url: str = "") -> None:
    """Embed demo inputs on every lane the broker serves and print what came back (and the
    same sentences through the HTTP gateway, when it runs)."""
    with Client(endpoint, timeout=60.0, retries=3) as client:
        lanes = client.stats()["lanes"]
        if p.LANE_TEXT in lanes:
            show_text(client)
            if gateway_url:
                show_http(client, gateway_url)
        if p.LANE_IMAGE in lanes:
            show_image(client, lanes[p.LANE_IMAGE])
        for name, lane in client.stats()["lanes"].items():
            click.echo(f"{name} lane: {len(lane['engines'])} engine(s), "
                       f"{lane['credits_free']}/{lane['credits_total']} credits free, "
                       f"{lane['requests'].get('200', 0)} request(s) served")


def show_text(client: Client) -> None:
    """Sentences through the text lane: norms, a similarity matrix, nearest neighbours."""
    t0 = time.perf_counter()
    vectors = client.embed_texts(SENTENCES)
    ms = (time.perf_counter() - t0) * 1000
    click.echo(f"text: embedded {len(SENTENCES)} sentences in {ms:.1f} ms: "
               f"shape {vectors.shape}, dtype {vectors.dtype}")
    for text, vec in zip(SENTENCES, vectors, strict=True):
        head = " ".join(f"{x:+.3f}" for x in vec[:4])
        click.echo(f"  |v|={np.linalg.norm(vec):.4f} [{head} ...]  {text}")
    sims = vectors @ vectors.T
    click.echo("cosine similarity (rows/columns in the order above):")
    for row in sims:
        click.echo("  " + " ".join(f"{s:5.2f}" for s in row))
    for i, row in enumerate(sims):
        click.echo(f"  nearest to #{i}: #{int(np.argsort(-row)[1])}")


def show_http(client: Client, url: str, wait_s: float = 30.0) -> None:
    """The sentences through the gateway's OpenAI route, compared with the SDK's vectors."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"model": p.LANE_TEXT, "input": SENTENCES}).encode()
    deadline = time.monotonic() + wait_s
    while True:  # the gateway may still be starting
        try:
            request = urllib.request.Request(f"{url}/v1/embeddings", data=body,
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as resp:
                answer = json.loads(resp.read())
            break
        except (urllib.error.URLError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                click.echo(f"http: the gateway at {url} did not answer: {exc}")
                return
            time.sleep(0.2)
    vectors = np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)
    same = np.array_equal(vectors, client.embed_texts(SENTENCES))
    click.echo(f"http: POST {url}/v1/embeddings (OpenAI API) answered {len(vectors)} vectors "
               f"of {vectors.shape[1]}; {'identical to' if same else 'DIFFERENT from'} the "
               "SDK's")


def show_image(client: Client, lane: dict[str, Any]) -> None:
    """Photos and CLIP text queries through the image lane, one corrupt image among them."""
    from zembed.engines.image import synthetic_jpeg

    if any(e.get("random_weights") for e in lane["engines"]):
        click.echo("image: NOTE the image engine serves RANDOM weights (no CLIP weights here): "
                   "similarities below are meaningless; the plumbing is what is shown")
    photos = [synthetic_jpeg(640, 480, seed) for seed in range(3)] + [b"not an image"]
    t0 = time.perf_counter()
    result = client.embed_images(photos)
    ms = (time.perf_counter() - t0) * 1000
    click.echo(f"image: embedded {len(photos)} 640x480 JPEGs in {ms:.1f} ms: "
               f"shape {result.vectors.shape}; item errors: {result.item_errors}")
    queries = client.embed_clip_texts(CLIP_QUERIES)
    scores = queries @ result.vectors[:3].T
    for q, row in zip(CLIP_QUERIES, scores, strict=True):
        click.echo(f"  {q!r}: scores against the photos " + " ".join(f"{s:+.3f}" for s in row))
