"""text-embeddings-inference's ``POST /embed``.

Request ``{"inputs": str | [str], "normalize": true, "truncate": false, "dimensions": null,
"prompt_name": null}``; answer ``[[float], ...]`` (a list of vectors even for one string). As in
TEI, ``normalize`` defaults to true and ``truncate`` to false (an over-long input is a 400).
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
