"""The OpenAI embeddings API: what ``POST /v1/embeddings`` accepts and what it answers.

Request fields (https://platform.openai.com/docs/api-reference/embeddings/create): ``input``
(a string or a list of strings; token-id arrays are refused with a 400 that says so),
``model``, ``encoding_format`` (``float`` or ``base64``: little-endian float32, base64), and
``dimensions``; ``user`` is accepted and ignored. Three extensions, all optional:
``modality: "image"`` (inputs are images: data: URIs, URLs or base64), ``input_type``
(``query``, ``document`` or a model's prompt name, for asymmetric models) and ``priority``
(``interactive`` or ``bulk``; left out, ``document`` is bulk). Unknown fields are
ignored, as OpenAI-compatible servers do, so clients that send their own extras still work.

The answer has OpenAI's exact shape and key order: ``{"object": "list", "data": [{"object":
"embedding", "index": i, "embedding": [...]}, ...], "model": ..., "usage": {"prompt_tokens",
"total_tokens"}}``.
"""

from __future__ import annotations

import base64
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from zembed.gateway.errors import HttpError, bad_request
from zembed.gateway.models import MODALITIES
from zembed.protocol import PRIORITIES

#: OpenAI's own limit on inputs per request.
OPENAI_MAX_INPUTS = 2048


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    """A checked ``/v1/embeddings`` request."""

    inputs: list[str]
    model: str | None
    base64: bool
    dimensions: int | None
    modality: str
    input_type: str | None
    priority: str | None = None


def positive_int(value: Any, name: str) -> int:
    """A JSON integer ≥ 1 (not a bool, not a float), or a 400 naming the field."""
    if isinstance(value, bool):
        raise bad_request(f"'{name}' must be an integer, got a boolean", param=name)
    try:
        number = operator.index(value)
    except TypeError:
        raise bad_request(f"'{name}' must be an integer, got {type(value).__name__}",
                          param=name) from None
    if number < 1:
        raise bad_request(f"'{name}' must be at least 1, got {number}", param=name)
    return number


def optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    raise bad_request(f"'{name}' must be a string, got {type(value).__name__}", param=name)


def text_inputs(value: Any, field: str, max_inputs: int) -> list[str]:
    """``input``/``inputs`` as a list of strings, or a 400/413 that names the problem."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise bad_request(f"'{field}' must be a string or a list of strings, got "
                          f"{type(value).__name__}", param=field)
    if not value:
        raise bad_request(f"'{field}' must not be empty", param=field)
    if len(value) > max_inputs:
        raise HttpError(413, f"'{field}' has {len(value)} inputs; at most {max_inputs} are "
                        "allowed in one request", "too_many_inputs", field)
    if all(isinstance(x, int) for x in value) or all(
            isinstance(x, list) and all(isinstance(t, int) for t in x) for x in value):
        raise bad_request(f"'{field}' holds token ids: send text; zembed tokenises with the "
                          "model's own tokenizer (LangChain: OpenAIEmbeddings("
                          "check_embedding_ctx_length=False))", param=field,
                          code="token_ids_not_supported")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise bad_request(f"{field}[{index}] must be a string, got {type(item).__name__}",
                              param=field)
    return value


def parse(body: Any, max_inputs: int) -> EmbeddingsRequest:
    """Check a decoded JSON body; raise :class:`HttpError` (400/413) for what is wrong."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    if "input" not in body:
        raise bad_request("'input' is required", param="input")
    inputs = text_inputs(body["input"], "input", max_inputs)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}",
                          param="encoding_format")
    dims = body.get("dimensions")
    modality = body.get("modality") or "text"
    if modality not in MODALITIES:
        raise bad_request(f"'modality' must be one of {', '.join(MODALITIES)}, got "
                          f"{modality!r}", param="modality")
    priority = optional_str(body, "priority")
    if priority is not None and priority not in PRIORITIES:
        raise bad_request(f"'priority' must be one of {', '.join(sorted(PRIORITIES))}, got "
                          f"{priority!r}", param="priority")
    return EmbeddingsRequest(
        inputs, optional_str(body, "model"), encoding == "base64",
        None if dims is None else positive_int(dims, "dimensions"), modality,
        optional_str(body, "input_type"), priority)


def render(vectors: npt.NDArray[np.float32], model: str, as_base64: bool,
           tokens: int = 0) -> bytes:
    """The response body, OpenAI's shape and key order."""
    if as_base64:
        rows: Any = [base64.b64encode(row.tobytes()).decode("ascii")
                     for row in np.ascontiguousarray(vectors, dtype="<f4")]
    else:
        rows = vectors
    return orjson.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row}
                 for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, option=orjson.OPT_SERIALIZE_NUMPY)


def model_entry(model: str, lane: str) -> dict[str, Any]:
    """One model as OpenAI lists it (``created`` is unknown: 0), with zembed's lane."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "zembed", "lane": lane}


def render_models(served: list[tuple[str, str]]) -> bytes:
    """``GET /v1/models``: OpenAI's list shape, one entry per name a lane answers to."""
    return orjson.dumps({"object": "list",
                         "data": [model_entry(model, lane) for model, lane in served]})


def render_model(model: str, lane: str) -> bytes:
    """``GET /v1/models/{id}``."""
    return orjson.dumps(model_entry(model, lane))
