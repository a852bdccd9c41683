"""zembed: a ZeroMQ broker that serves text and image embeddings.

The client SDK is re-exported here so that ``from zembed import Client`` works; the broker and
engines are imported only by the processes that run them (they pull in torch).
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "EmbedChunk", "EmbedResult", "__version__"]

_SDK = frozenset({"AsyncClient", "Client", "EmbedChunk", "EmbedResult"})


def __getattr__(name: str) -> Any:
    """``from zembed import Client`` without importing the SDK for every ``import zembed``.

    Lazy (PEP 562): the broker and engines import ``zembed`` too, and the client modules import
    ``zembed``'s own submodules, so an eager import here would be circular.
    """
    if name in _SDK:
        from zembed import client

        return getattr(client, name)
    raise AttributeError(f"module 'zembed' has no attribute {name!r}")
