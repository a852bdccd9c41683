"""zembed client SDK: :class:`Client` (sync) and :class:`AsyncClient` (asyncio), typed errors.

Only pyzmq, msgpack and numpy are needed on the client side.
"""

if __name__ != "zembed.client":  # the folder is installed as zembed.client only (setup.cfg)
    raise ImportError(f"import zembed.client, not {__name__}: the folder client/ is "
                      "the package zembed.client (setup.cfg's package_dir)")

from zembed.cache.bf16 import from_bf16
from zembed.client.aio import AsyncClient
from zembed.client.bulk import EmbedChunk
from zembed.client.codec import EmbedResult
from zembed.client.sync import Client, Pending
from zembed.errors import (
    BadRequest,
    ConnectionClosed,
    DeadlineExceeded,
    EngineError,
    EngineUnavailable,
    Overloaded,
    TooLarge,
    UnknownLane,
    ZembedError,
)

__all__ = [
    "AsyncClient", "BadRequest", "Client", "ConnectionClosed", "DeadlineExceeded", "EmbedChunk",
    "EmbedResult",
    "EngineError", "EngineUnavailable", "Overloaded", "Pending", "TooLarge", "UnknownLane",
    "ZembedError", "from_bf16",
]
