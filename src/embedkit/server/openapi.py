"""The server's OpenAPI 3.0 document, written out by hand and filled with the loaded model's limits
(dimension, inputs per request, outputs) so generated tests know what a valid request is: BGE-M3's
``parameters.return_sparse`` / ``return_colbert_vecs`` and ``POST /embed_sparse`` are described when
the model has those heads (or while it loads); otherwise they answer 400 / 424."""

from __future__ import annotations

from typing import Any

from embedkit import __version__
from embedkit.server.contracts import Limits

_ERROR = {
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
}
_DLC_ERROR = {
    "type": "object",
    "required": ["code", "type", "message"],
    "properties": {"code": {"type": "integer"}, "type": {"type": "string"}, "message": {"type": "string"}},
}
_AWS_ERROR = {
    "type": "object",
    "properties": {
        "message": {"type": "string"},
        "ErrorCode": {"type": "string"},
        "Message": {"type": "string"},
        "OriginalMessage": {"type": "string"},
        "OriginalStatusCode": {"type": "integer"},
        "LogStreamArn": {"type": "string"},
    },
}
_VECTOR = {"type": "array", "items": {"type": "number"}}
_MATRIX = {"type": "array", "items": _VECTOR}
_LEXICAL = {"type": "object", "additionalProperties": {"type": "number"}}  # {"token_id": weight}
_SPARSE_VALUE = {
    "type": "object",
    "required": ["index", "value"],
    "properties": {"index": {"type": "integer"}, "value": {"type": "number"}},
}
_BINARY = {"type": "string", "format": "binary"}


def _errors(schema: dict, codes: tuple[int, ...]) -> dict[str, Any]:
    return {
        str(c): {"description": "error", "content": {"application/json": {"schema": schema}}} for c in codes
    }


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
    params = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "normalize": {"type": "boolean"},
            "truncate": {"type": "boolean"},
            "dimensions": dims,
        },
    }
    m3_params = {
        "return_dense": {"type": "boolean", "default": True},
        "return_sparse": {"type": "boolean", "default": False},
        "return_colbert_vecs": {"type": "boolean", "default": False},
        "dtype": {"type": "string", "enum": ["float32", "float16"], "default": "float32"},
    }
    outputs = limits.outputs if limits else ("dense", "sparse", "colbert")
    flags = {"return_sparse": "sparse", "return_colbert_vecs": "colbert"}
    m3_params = {k: v for k, v in m3_params.items() if flags.get(k, "dense") in outputs}
    if not tei and not dlc:  # --hf-mode tei and dlc-exact refuse them on /invocations
        params = {**params, "properties": {**params["properties"], **m3_params}}
    hf_req = {
        "type": "object",
        "required": ["inputs"],
        "properties": {"inputs": one_or_many, "parameters": params},
    }
    search_req = {
        "type": "object",
        "required": ["search_term"],
        "properties": {"search_term": one_or_many, "parameters": params},
    }
    invocation_body = {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [hf_req, search_req]}},
            "text/csv": {"schema": {"type": "string", "minLength": 1, "pattern": "\\S"}},
            "application/jsonlines": {"schema": {"type": "string", "minLength": 1, "pattern": "\\S"}},
        },
    }
    container_errors = _DLC_ERROR if dlc else _ERROR
    hf_ok = {
        "type": "object",
        "properties": {
            "embeddings": {"oneOf": [_VECTOR, _MATRIX]},
            "embedding": _VECTOR,
            "lexical_weights": {"oneOf": [_LEXICAL, {"type": "array", "items": _LEXICAL}]},
            "colbert_vecs": {"oneOf": [_MATRIX, {"type": "array", "items": _MATRIX}]},
        },
    }
    invocation_ok = (
        {"application/json": {"schema": {"type": "array"}}}
        if dlc
        else {
            "application/json": {"schema": {"oneOf": [_MATRIX, hf_ok]} if tei else hf_ok},
            "application/x-npy": {"schema": _BINARY},
            "application/x-npz": {"schema": _BINARY},
            "text/csv": {"schema": {"type": "string"}},
            "application/jsonlines": {"schema": {"type": "string"}},
        }
    )
    tei_req = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": one_or_many,
            **{k: v for k, v in params["properties"].items() if k not in m3_params},
        },
    }
    tei_sparse_req = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": one_or_many,
            "truncate": {"type": "boolean"},
            "prompt_name": {"type": "string"},
        },
    }
    openai_req = {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": one_or_many,
            "model": {"type": "string"},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": dims,
            "user": {"type": "string"},
        },
    }
    openai_resp = {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["object", "index", "embedding"],
                    "properties": {
                        "object": {"type": "string"},
                        "index": {"type": "integer"},
                        "embedding": {"oneOf": [_VECTOR, {"type": "string"}]},
                    },
                },
            },
            "model": {"type": "string"},
            "usage": {
                "type": "object",
                "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
            },
        },
    }
    codes = (400, 401, 406, 413, 415, 429, 500, 503)
    sparse_route = {
        "post": {
            "summary": "text-embeddings-inference embed_sparse: BGE-M3 lexical weights",
            "requestBody": {"required": True, "content": {"application/json": {"schema": tei_sparse_req}}},
            "responses": {
                "200": {
                    "description": "one list of {index, value} per input",
                    "content": {
                        "application/json": {
                            "schema": {"type": "array", "items": {"type": "array", "items": _SPARSE_VALUE}}
                        }
                    },
                },
                **_errors(_ERROR, (*codes, 424)),
            },
        }
    }
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
                "get": {
                    "summary": "SageMaker health check: 200 once the model is loaded and warmed up",
                    "security": [],
                    "responses": {"200": {"description": "ready"}, **_errors(_ERROR, (503,))},
                }
            },
            "/health": {
                "get": {
                    "summary": "same as /ping",
                    "security": [],
                    "responses": {"200": {"description": "ready"}, **_errors(_ERROR, (503,))},
                }
            },
            "/invocations": {
                "post": {
                    "summary": "SageMaker container invocation",
                    "requestBody": invocation_body,
                    "responses": {
                        "200": {"description": "embeddings", "content": invocation_ok},
                        **_errors(container_errors, codes),
                    },
                }
            },
            "/endpoints/{name}/invocations": {
                "post": {
                    "summary": "SageMaker runtime InvokeEndpoint (what boto3 sagemaker-runtime calls)",
                    "parameters": [
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "requestBody": invocation_body,
                    "responses": {
                        "200": {"description": "embeddings", "content": invocation_ok},
                        **_errors(_AWS_ERROR, (400, 403, 413, 424, 429, 503)),
                    },
                }
            },
            "/execution-parameters": {
                "get": {
                    "summary": "SageMaker Batch Transform: how to split and send the job's records",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "execution parameters",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": [
                                            "MaxConcurrentTransforms",
                                            "BatchStrategy",
                                            "MaxPayloadInMB",
                                        ],
                                        "properties": {
                                            "MaxConcurrentTransforms": {"type": "integer"},
                                            "BatchStrategy": {"type": "string"},
                                            "MaxPayloadInMB": {"type": "integer"},
                                        },
                                    }
                                }
                            },
                        }
                    },
                }
            },
            "/embed": {
                "post": {
                    "summary": "text-embeddings-inference embed",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": tei_req}}},
                    "responses": {
                        "200": {
                            "description": "one vector per input",
                            "content": {"application/json": {"schema": _MATRIX}},
                        },
                        **_errors(_ERROR, codes),
                    },
                }
            },
            "/v1/embeddings": {
                "post": {
                    "summary": "OpenAI embeddings",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": openai_req}},
                    },
                    "responses": {
                        "200": {
                            "description": "embeddings",
                            "content": {"application/json": {"schema": openai_resp}},
                        },
                        **_errors(_ERROR, codes),
                    },
                }
            },
            "/info": {
                "get": {
                    "summary": "model, limits and readiness",
                    "responses": {
                        "200": {
                            "description": "info",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors(_ERROR, (401,)),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_errors(_ERROR, (401,)),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "spec",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }
    if "sparse" in outputs:
        spec["paths"]["/embed_sparse"] = sparse_route
    if auth:
        spec["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
        spec["security"] = [{"bearer": []}]
    return spec
