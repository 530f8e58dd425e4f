"""text-embeddings-inference's ``POST /embed`` and ``POST /embed_sparse``.

``/embed``: request ``{"inputs": str | [str], "normalize": true, "truncate": false, "dimensions": null,
"prompt_name": null}``; answer ``[[float], ...]`` (a list of vectors even for one string). As in
TEI, ``normalize`` defaults to true and ``truncate`` to false (an over-long input is a 400).

``/embed_sparse`` (a BGE-M3 model's lexical weights): request ``{"inputs", "truncate", "prompt_name"}``;
answer ``[[{"index": token_id, "value": weight}, ...], ...]``, one list per input, token ids in
order of first occurrence (FlagEmbedding's), special tokens and zero weights left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedkit.server.contracts.common import (
    EmbedRequest,
    Limits,
    check_bool,
    check_dimensions,
    check_str,
    require_object,
    texts_request,
)

EXAMPLE = '{"inputs": ["some text"]}'


def parse(payload: Any, limits: Limits) -> EmbedRequest:
    body = require_object(payload, EXAMPLE)
    req = texts_request(body.get("inputs"), field="inputs", limits=limits)
    normalize = check_bool(body.get("normalize"), "normalize")
    req.normalize = True if normalize is None else normalize
    truncate = check_bool(body.get("truncate"), "truncate")
    req.truncate = False if truncate is None else truncate
    req.dimensions = check_dimensions(body.get("dimensions"), "dimensions", limits)
    req.prompt_name = check_str(body.get("prompt_name"), "prompt_name")
    return req


def respond(req: EmbedRequest, vecs: np.ndarray) -> np.ndarray:
    return vecs


def parse_sparse(payload: Any, limits: Limits) -> EmbedRequest:
    body = require_object(payload, EXAMPLE)
    req = texts_request(body.get("inputs"), field="inputs", limits=limits)
    truncate = check_bool(body.get("truncate"), "truncate")
    req.truncate = False if truncate is None else truncate
    req.prompt_name = check_str(body.get("prompt_name"), "prompt_name")
    req.outputs = ("sparse",)
    return req


def respond_sparse(sparse: list[tuple[np.ndarray, np.ndarray]]) -> list[list[dict[str, Any]]]:
    """One ``[{"index", "value"}]`` list per input (np.float32 values: float32's shortest decimal)."""
    return [
        [{"index": i, "value": w} for i, w in zip(ids.tolist(), weights, strict=True)]
        for ids, weights in sparse
    ]
