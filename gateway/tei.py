"""Hugging Face Text Embeddings Inference's ``POST /embed``.

Request: ``inputs`` (a string or a list of strings), ``normalize`` (default true),
``truncate`` (accepted: zembed's engines always truncate at the model's maximum length, which
is TEI's ``truncate: true``), ``truncation_direction`` (``Right`` only, as the engines cut),
``prompt_name`` (a prompt of the model, as TEI's) and ``dimensions``. Answer: a JSON array of
arrays of floats, one per input, in order, also for a single string (as TEI answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from zembed.gateway.errors import bad_request
from zembed.gateway.openai_api import optional_str, positive_int, text_inputs


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """A checked ``/embed`` request."""

    inputs: list[str]
    normalize: bool
    prompt_name: str | None
    dimensions: int | None


def parse(body: Any, max_inputs: int) -> EmbedRequest:
    """Check a decoded JSON body; raise :class:`~zembed.gateway.errors.HttpError`."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    if "inputs" not in body:
        raise bad_request("'inputs' is required", param="inputs")
    inputs = text_inputs(body["inputs"], "inputs", max_inputs)
    normalize = body.get("normalize", True)
    if not isinstance(normalize, bool):
        raise bad_request("'normalize' must be a boolean", param="normalize")
    truncate = body.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise bad_request("'truncate' must be a boolean", param="truncate")
    direction = body.get("truncation_direction")
    if direction not in (None, "Right", "right"):
        raise bad_request("'truncation_direction' must be 'Right': zembed's engines keep the "
                          "start of a long input", param="truncation_direction")
    dims = body.get("dimensions")
    return EmbedRequest(inputs, normalize, optional_str(body, "prompt_name"),
                        None if dims is None else positive_int(dims, "dimensions"))


def render(vectors: npt.NDArray[np.float32]) -> bytes:
    """``[[...], [...]]``."""
    return orjson.dumps(vectors, option=orjson.OPT_SERIALIZE_NUMPY)
