"""Send one HTTP request's inputs to the broker and bring back every vector, or one error.

A request that fits the lane (at most its ``max_request_items``) is one broker request,
never retried here: a 429 goes straight back to the HTTP client with the broker's estimate,
so refusing costs the gateway one round trip. A larger one (OpenAI allows 2,048 inputs;
LangChain sends up to 1,000) is cut into lane-sized requests kept in flight together by the
SDK's bulk machinery (:class:`~zembed.client.bulk.BulkPlan`): refused whole while the lane has
no room for any of it, and once admitted, its later parts wait out their 429s until the
request's deadline. Either way the answer is all rows in input order, or the first failed
input named by its index.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from zembed import protocol as p
from zembed.cache.bf16 import from_bf16
from zembed.client.aio import AsyncClient
from zembed.errors import DeadlineExceeded, EngineUnavailable, ZembedError
from zembed.gateway.errors import HttpError, from_zembed, unreachable
from zembed.gateway.models import Target
from zembed.messages import default_priority

_URI_PREFIXES = ("data:", "http://", "https://")


def image_input(value: str, index: int) -> str | bytes:
    """An image input as the wire carries it: data: URIs and URLs as they are, bare base64
    decoded to bytes; anything else is a 400 naming the input."""
    if value.startswith(_URI_PREFIXES):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"input[{index}]: an image input must be a data: URI, an http(s) "
                        "URL or base64-encoded image bytes", "invalid_image", "input") from None


def _item_error(errors: dict[int, tuple[int, str]]) -> HttpError:
    index = min(errors)
    status, message = errors[index]
    return from_zembed(ZembedError(message, status=status), where=f"input[{index}]: ")


def request_class(priority: str | None, input_type: str | None) -> str:
    """The class a request goes as: the one it names, else the broker's rule (``document``
    is bulk, everything else interactive), spelled out so a split request is sized for it."""
    return priority if priority is not None else default_priority(input_type)


async def embed(client: AsyncClient, target: Target, items: Sequence[Any], *,
                normalize: bool, dimensions: int | None, input_type: str | None,
                timeout_s: float,
                priority: str | None = None) -> tuple[npt.NDArray[np.float32], int]:
    """(float32 ``(len(items), d)``, how many came from the cache) for ``items`` on
    ``target``, or raise :class:`HttpError`."""
    klass = request_class(priority, input_type)
    if not client.connected:
        # Never wait for a broker that is not there: the client would hold the request until
        # its timeout hoping for a reconnect; an HTTP client is better told at once.
        raise unreachable(client.endpoint)
    try:
        if target.max_request_items <= 0 or len(items) <= target.max_request_items:
            return await _single(client, target, items, normalize, dimensions, input_type,
                                 timeout_s, klass)
        async with asyncio.timeout(timeout_s):
            return await _split(client, target, items, normalize, dimensions, input_type,
                                timeout_s, klass)
    except TimeoutError:
        raise from_zembed(DeadlineExceeded(
            f"{len(items)} inputs were not all embedded within {timeout_s:g} s")) from None
    except ZembedError as exc:
        raise from_zembed(exc) from None


async def _single(client: AsyncClient, target: Target, items: Sequence[Any], normalize: bool,
                  dimensions: int | None, input_type: str | None, timeout_s: float,
                  klass: str) -> tuple[npt.NDArray[np.float32], int]:
    result = await client.embed(target.lane, target.kind, items, normalize=normalize,
                                dtype=p.DTYPE_BF16, input_type=input_type,
                                dimensions=dimensions, priority=klass, timeout=timeout_s)
    if result.item_errors:
        raise _item_error(result.item_errors)
    return from_bf16(result.vectors), result.cached


async def _split(client: AsyncClient, target: Target, items: Sequence[Any], normalize: bool,
                 dimensions: int | None, input_type: str | None, timeout_s: float,
                 klass: str) -> tuple[npt.NDArray[np.float32], int]:
    parts: list[npt.NDArray[np.uint16]] = []
    cached = 0
    async for chunk in client.embed_many_iter(
            items, target.kind, normalize=normalize, dtype=p.DTYPE_BF16, input_type=input_type,
            dimensions=dimensions, retry_for=timeout_s, refuse_unadmitted=True,
            lane=target.lane, priority=klass):
        if chunk.item_errors:
            raise _item_error(chunk.item_errors)
        parts.append(chunk.vectors)
        cached += len(chunk.cached_items)
    if not parts:
        raise EngineUnavailable("no vectors came back")
    return from_bf16(np.concatenate(parts)), cached
