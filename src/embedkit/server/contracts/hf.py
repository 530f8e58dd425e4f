"""Hugging Face inference contract: ``{"inputs": str | [str], "parameters": {...}}``.

Default answer ``{"embeddings": [float]}`` for a string, ``{"embeddings": [[float], ...]}`` for a list
(what the boto3 client of a Terraform-built serverless endpoint reads). The opt-in ``dlc-exact`` mode
answers like the official Hugging Face SageMaker container with ``HF_TASK=feature-extraction``:
unpooled token vectors as the transformers pipeline returns them, ``(1, tokens, hidden)`` for a string
and ``(batch, 1, tokens, hidden)`` for a list.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedkit.server.contracts.common import EmbedRequest, Limits, apply_parameters, texts_request

EXAMPLE = '{"inputs": "some text"}'


def parse(payload: dict, limits: Limits) -> EmbedRequest:
    req = texts_request(payload.get("inputs"), field="inputs", limits=limits)
    return apply_parameters(req, payload.get("parameters"), limits)


def respond(req: EmbedRequest, vecs: np.ndarray) -> dict[str, Any]:
    vecs = vecs.astype(np.float16) if req.dtype == "float16" else vecs
    return {"embeddings": vecs[0] if req.single else vecs}


def respond_dlc(req: EmbedRequest, token_vectors: list[np.ndarray]) -> list:
    nested = [[tv.tolist()] for tv in token_vectors]
    return nested[0] if req.single else nested
