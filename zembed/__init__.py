"""zembed: a ZeroMQ broker that serves text and image embeddings.

The client SDK is re-exported here so that ``from zembed import Client`` works; the broker and
engines are imported only by the processes that run them (they pull in torch).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
