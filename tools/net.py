"""Free loopback ports for the stacks the tools start themselves (bench --raw, soak)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_endpoint() -> str:
    """``tcp://127.0.0.1:<free port>``."""
    return f"tcp://127.0.0.1:{free_port()}"
