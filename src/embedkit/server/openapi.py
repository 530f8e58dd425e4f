"""The server's OpenAPI 3.0 document, written out by hand and filled with the loaded model's limits
(dimension, inputs per request, outputs) so generated tests know what a valid request is: BGE-M3's
``parameters.return_sparse`` / ``return_colbert_vecs`` and ``POST /embed_sparse`` are described when
the model has those heads (or while it loads); otherwise they answer 400 / 424."""

from __future__ import annotations

from typing import Any

from embedkit import __version__
from embedkit.server.contracts import Limits

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_OBJECT: dict[str, Any] = {"type": "object"}
_VECTOR = {"type": "array", "items": {"type": "number"}}
_MATRIX = {"type": "array", "items": _VECTOR}
_LEXICAL = {"type": "object", "additionalProperties": {"type": "number"}}  # {"token_id": weight}
_BINARY = {"type": "string", "format": "binary"}


def _obj(properties: dict[str, Any], *required: str, **extra: Any) -> dict[str, Any]:
    """An object schema: ``properties``, the ``required`` ones, and other keywords."""
    out = {"type": "object", **extra, "properties": properties}
    if required:
        out["required"] = list(required)
    return out


def _record(properties: dict[str, Any]) -> dict[str, Any]:
    """An object schema whose properties are all required."""
    return _obj(properties, *properties)


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(schema: dict, codes: tuple[int, ...]) -> dict[str, Any]:
    return {str(c): {"description": "error", "content": _json(schema)} for c in codes}


def _op(
    summary: str,
    ok: str,
    content: dict | None = None,
    errors: dict | None = None,
    *,
    public: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """One operation: a 200 described by ``ok`` (with ``content``) and the ``errors``; ``public``
    operations need no key; ``extra`` carries ``parameters`` and ``requestBody``."""
    answer: dict[str, Any] = {"description": ok}
    if content:
        answer["content"] = content
    op = {"summary": summary, **extra, "responses": {"200": answer, **(errors or {})}}
    if public:
        op["security"] = []
    return op


_ERROR = _record({"error": _STR, "error_type": _STR})
_DLC_ERROR = _record({"code": _INT, "type": _STR, "message": _STR})
_AWS_ERROR = _obj(
    {
        "message": _STR,
        "ErrorCode": _STR,
        "Message": _STR,
        "OriginalMessage": _STR,
        "OriginalStatusCode": _INT,
        "LogStreamArn": _STR,
    }
)


def build_spec(
    limits: Limits | None, *, dlc: bool = False, auth: bool = False, tei: bool = False
) -> dict[str, Any]:
    """The OpenAPI document; ``limits`` is ``None`` while the model loads (no bounds then)."""
    max_items = limits.max_client_batch_size if limits else None
    dim = limits.dimension if limits and limits.dimension else None
    text = {"type": "string", "minLength": 1}
    texts: dict[str, Any] = {"type": "array", "items": text, "minItems": 1}
    if max_items:
        texts["maxItems"] = max_items
    one_or_many = {"oneOf": [text, texts]}
    dims: dict[str, Any] = {"type": "integer", "minimum": 1, "nullable": True}
    if dim:
        dims["maximum"] = dim
    options = {"normalize": {"type": "boolean"}, "truncate": {"type": "boolean"}, "dimensions": dims}
    m3_params = {
        "return_dense": {"type": "boolean", "default": True},
        "return_sparse": {"type": "boolean", "default": False},
        "return_colbert_vecs": {"type": "boolean", "default": False},
        "dtype": {"type": "string", "enum": ["float32", "float16"], "default": "float32"},
    }
    outputs = limits.outputs if limits else ("dense", "sparse", "colbert")
    flags = {"return_sparse": "sparse", "return_colbert_vecs": "colbert"}
    m3_params = {k: v for k, v in m3_params.items() if flags.get(k, "dense") in outputs}
    # --hf-mode tei and dlc-exact refuse them on /invocations
    params = _obj({**options, **({} if tei or dlc else m3_params)}, additionalProperties=False)
    line_text = {"schema": {"type": "string", "minLength": 1, "pattern": "\\S"}}
    hf_req, search_req = (
        _obj({key: one_or_many, "parameters": params}, key) for key in ("inputs", "search_term")
    )
    invocation_body = {
        "required": True,
        "content": {
            **_json({"oneOf": [hf_req, search_req]}),
            "text/csv": line_text,
            "application/jsonlines": line_text,
        },
    }
    hf_ok = _obj(
        {
            "embeddings": {"oneOf": [_VECTOR, _MATRIX]},
            "embedding": _VECTOR,
            "lexical_weights": {"oneOf": [_LEXICAL, {"type": "array", "items": _LEXICAL}]},
            "colbert_vecs": {"oneOf": [_MATRIX, {"type": "array", "items": _MATRIX}]},
        }
    )
    invocation_ok = (
        _json({"type": "array"})
        if dlc
        else {
            **_json({"oneOf": [_MATRIX, hf_ok]} if tei else hf_ok),
            "application/x-npy": {"schema": _BINARY},
            "application/x-npz": {"schema": _BINARY},
            "text/csv": {"schema": _STR},
            "application/jsonlines": {"schema": _STR},
        }
    )
    openai_req = _obj(
        {
            "input": one_or_many,
            "model": _STR,
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": dims,
            "user": _STR,
        },
        "input",
    )
    item = _record({"object": _STR, "index": _INT, "embedding": {"oneOf": [_VECTOR, _STR]}})
    openai_resp = _record(
        {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": item},
            "model": _STR,
            "usage": _obj({"prompt_tokens": _INT, "total_tokens": _INT}),
        }
    )
    transform = _record({"MaxConcurrentTransforms": _INT, "BatchStrategy": _STR, "MaxPayloadInMB": _INT})
    codes = (400, 401, 406, 413, 415, 429, 500, 503)
    not_ready, no_key = _errors(_ERROR, (503,)), _errors(_ERROR, (401,))
    spec: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "embedkit serve",
            "version": __version__,
            "description": "SageMaker-compatible embedding server (container and runtime surfaces), "
            "TEI /embed and OpenAI /v1/embeddings.",
        },
        "paths": {
            "/ping": {
                "get": _op(
                    "SageMaker health check: 200 once the model is loaded and warmed up",
                    "ready",
                    errors=not_ready,
                    public=True,
                )
            },
            "/health": {"get": _op("same as /ping", "ready", errors=not_ready, public=True)},
            "/invocations": {
                "post": _op(
                    "SageMaker container invocation",
                    "embeddings",
                    invocation_ok,
                    _errors(_DLC_ERROR if dlc else _ERROR, codes),
                    requestBody=invocation_body,
                )
            },
            "/endpoints/{name}/invocations": {
                "post": _op(
                    "SageMaker runtime InvokeEndpoint (what boto3 sagemaker-runtime calls)",
                    "embeddings",
                    invocation_ok,
                    _errors(_AWS_ERROR, (400, 403, 413, 424, 429, 503)),
                    parameters=[{"name": "name", "in": "path", "required": True, "schema": _STR}],
                    requestBody=invocation_body,
                )
            },
            "/execution-parameters": {
                "get": _op(
                    "SageMaker Batch Transform: how to split and send the job's records",
                    "execution parameters",
                    _json(transform),
                    public=True,
                )
            },
            "/embed": {
                "post": _op(
                    "text-embeddings-inference embed",
                    "one vector per input",
                    _json(_MATRIX),
                    _errors(_ERROR, codes),
                    requestBody={
                        "required": True,
                        "content": _json(_obj({"inputs": one_or_many, **options}, "inputs")),
                    },
                )
            },
            "/v1/embeddings": {
                "post": _op(
                    "OpenAI embeddings",
                    "embeddings",
                    _json(openai_resp),
                    _errors(_ERROR, codes),
                    requestBody={"required": True, "content": _json(openai_req)},
                )
            },
            "/info": {"get": _op("model, limits and readiness", "info", _json(_OBJECT), no_key)},
            "/metrics": {
                "get": _op("Prometheus metrics", "metrics", {"text/plain": {"schema": _STR}}, no_key)
            },
            "/openapi.json": {"get": _op("this document", "spec", _json(_OBJECT), public=True)},
        },
    }
    if "sparse" in outputs:
        sparse_value = _record({"index": _INT, "value": {"type": "number"}})
        sparse_req = _obj(
            {"inputs": one_or_many, "truncate": {"type": "boolean"}, "prompt_name": _STR}, "inputs"
        )
        spec["paths"]["/embed_sparse"] = {
            "post": _op(
                "text-embeddings-inference embed_sparse: BGE-M3 lexical weights",
                "one list of {index, value} per input",
                _json({"type": "array", "items": {"type": "array", "items": sparse_value}}),
                _errors(_ERROR, (*codes, 424)),
                requestBody={"required": True, "content": _json(sparse_req)},
            )
        }
    if auth:
        spec["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
        spec["security"] = [{"bearer": []}]
    return spec
