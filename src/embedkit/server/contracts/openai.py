"""OpenAI's ``POST /v1/embeddings``, so the ``openai`` client works unchanged.

``base64`` answers carry each vector's little-endian float32 bytes; token counts include the model's
special tokens; token-id inputs (lists of integers) are refused with a 400.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from embedkit.errors import InputError
from embedkit.server.contracts.common import (
    EmbedRequest,
    Limits,
    check_dimensions,
    check_str,
    require_object,
    texts_request,
)

EXAMPLE = '{"input": "some text", "model": "default"}'


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(_is_int(x) or (isinstance(x, list) and bool(x) and all(map(_is_int, x))) for x in value)
    )


def parse(payload: Any, limits: Limits) -> tuple[EmbedRequest, str]:
    """The request and its ``encoding_format``."""
    body = require_object(payload, EXAMPLE)
    value = body.get("input")
    if _token_ids(value):
        raise InputError(
            "input holds token ids; this server takes text only (a string or a list of strings)",
            field="input",
        )
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    asked = sorted(k for k in ("return_sparse", "return_colbert_vecs") if k in body or k in params)
    if asked:
        raise InputError(
            f"the OpenAI route gives dense vectors only and takes no {', '.join(asked)}; for BGE-M3's "
            "lexical weights or ColBERT vectors POST /invocations with parameters.return_sparse / "
            "return_colbert_vecs, or POST /embed_sparse",
            field=asked[0],
        )
    req = texts_request(value, field="input", limits=limits)
    fmt = body.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if fmt not in ("float", "base64"):
        raise InputError(f"encoding_format must be 'float' or 'base64', got {fmt!r}", field="encoding_format")
    req.dimensions = check_dimensions(body.get("dimensions"), "dimensions", limits)
    check_str(body.get("model"), "model")
    check_str(body.get("user"), "user")
    return req, fmt


def respond(vecs: np.ndarray, fmt: str, model: str, tokens: int) -> dict[str, Any]:
    if fmt == "base64":
        little = vecs.astype("<f4", copy=False)
        items = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        items = list(vecs)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
