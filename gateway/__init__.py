"""The HTTP gateway: OpenAI- and TEI-compatible embeddings in front of a zembed broker.

A stateless ASGI app (:mod:`zembed.gateway.app`) served by uvicorn; each worker process holds
one asyncio client connection to the broker and never queues work of its own. Installed with
``pip install 'zembed[gateway]'`` and run with ``zembed gateway`` (docs/http.md).
"""
