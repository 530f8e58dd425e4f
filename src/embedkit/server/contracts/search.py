"""The search contract: ``{"search_term": str}`` -> ``{"embedding": [float]}``, what an application
calling a local stand-in for a SageMaker endpoint sends.

A list of search terms is an embedkit extension answered as ``{"embeddings": [[float], ...]}``;
an optional ``parameters`` object works as in the HF contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedkit.server.contracts.common import EmbedRequest, Limits, apply_parameters, texts_request


def parse(payload: dict, limits: Limits) -> EmbedRequest:
    req = texts_request(payload.get("search_term"), field="search_term", limits=limits)
    return apply_parameters(req, payload.get("parameters"), limits)


def respond(req: EmbedRequest, vecs: np.ndarray) -> dict[str, Any]:
    vecs = vecs.astype(np.float16) if req.dtype == "float16" else vecs
    return {"embedding": vecs[0]} if req.single else {"embeddings": vecs}
