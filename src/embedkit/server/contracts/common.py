"""What every wire format turns into: an :class:`EmbedRequest` (texts plus per-request options).

>>> req = texts_request("hello", field="inputs", limits=Limits(dimension=384))
>>> (req.texts, req.single)
(['hello'], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedkit.errors import InputError, PayloadTooLargeError


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: the model's full dimension, the inputs-per-request cap and the
    model's outputs (``dense``, and BGE-M3's ``sparse`` / ``colbert`` when it has their heads)."""

    dimension: int
    max_client_batch_size: int = 512
    outputs: tuple[str, ...] = ("dense", "sparse", "colbert")


@dataclass
class EmbedRequest:
    """Texts to embed and the options of one request (``None`` = the server's default)."""

    texts: list[str]
    single: bool = False
    field: str = "inputs"
    normalize: bool | None = None
    dimensions: int | None = None
    truncate: bool | None = None
    prompt_name: str | None = None
    # BGE-M3: which outputs (dense, sparse, colbert; see embedkit.engine.multi) and the vectors' dtype
    outputs: tuple[str, ...] = ("dense",)
    dtype: str = "float32"

    @property
    def multi(self) -> bool:
        """True when the request asks for more than dense vectors (lexical weights, ColBERT)."""
        return self.outputs != ("dense",)


def texts_request(value: Any, *, field: str, limits: Limits) -> EmbedRequest:
    """A string (``single``) or a non-empty list of strings, at most ``max_client_batch_size``."""
    if isinstance(value, str):
        if not value:
            raise InputError(f"{field} is an empty string; give it text", field=field)
        return EmbedRequest([value], single=True, field=field)
    if not isinstance(value, list):
        kind = "null" if value is None else type(value).__name__
        raise InputError(f"{field} must be a string or a list of strings, got {kind}", field=field)
    if not value:
        raise InputError(f"{field} is an empty list; send at least one text", field=field)
    check_batch_size(len(value), "texts", field, limits)
    return EmbedRequest(value, single=False, field=field)


def check_batch_size(count: int, noun: str, field: str, limits: Limits) -> None:
    """413 when one request holds more than ``max_client_batch_size`` items (``noun``: texts, images)."""
    if count > limits.max_client_batch_size:
        raise PayloadTooLargeError(
            f"{field} holds {count} {noun}, more than max_client_batch_size "
            f"({limits.max_client_batch_size}); split it into several requests",
            field=field,
        )


def check_bool(value: Any, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise InputError(f"{name} must be true or false, got {value!r}", field=name)


def check_dimensions(value: Any, name: str, limits: Limits) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits.dimension:
        raise InputError(
            f"{name} must be an integer between 1 and {limits.dimension} (the model's dimension), got {value!r}",
            field=name,
        )
    return value


def check_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InputError(f"{name} must be a string, got {type(value).__name__}", field=name)


# BGE-M3's outputs as FlagEmbedding's ``encode`` names them, in embedkit.engine.multi.OUTPUTS order
OUTPUT_FLAGS = (("return_dense", "dense"), ("return_sparse", "sparse"), ("return_colbert_vecs", "colbert"))
DTYPES = ("float32", "float16")
MULTI_PARAMETERS = frozenset({flag for flag, _ in OUTPUT_FLAGS} | {"dtype"})
_PARAMETERS = {"normalize", "truncate", "truncation", "dimensions", "prompt_name", *MULTI_PARAMETERS}


def apply_parameters(
    req: EmbedRequest, params: Any, limits: Limits, *, name: str = "parameters"
) -> EmbedRequest:
    """Apply the HF-style ``parameters`` object: ``normalize``, ``truncate``, ``dimensions``,
    ``prompt_name``, and BGE-M3's ``return_dense`` (default true), ``return_sparse``,
    ``return_colbert_vecs`` (default false) and ``dtype`` (``float32`` or ``float16``)."""
    if params is None:
        return req
    if not isinstance(params, dict):
        raise InputError(f"{name} must be an object, got {type(params).__name__}", field=name)
    unknown = sorted(set(params) - _PARAMETERS)
    if unknown:
        raise InputError(
            f"{name} has unknown key(s) {unknown}; allowed: normalize, truncate, dimensions, prompt_name, "
            "return_dense, return_sparse, return_colbert_vecs, dtype",
            field=name,
        )
    req.normalize = check_bool(params.get("normalize"), f"{name}.normalize")
    truncate = params.get("truncate", params.get("truncation"))
    req.truncate = check_bool(truncate, f"{name}.truncate")
    req.dimensions = check_dimensions(params.get("dimensions"), f"{name}.dimensions", limits)
    req.prompt_name = check_str(params.get("prompt_name"), f"{name}.prompt_name")
    wanted = []
    for flag, output in OUTPUT_FLAGS:
        asked = check_bool(params.get(flag), f"{name}.{flag}")
        if asked if asked is not None else output == "dense":
            wanted.append(output)
    if not wanted:
        raise InputError(
            f"{name} asks for no output; set return_dense, return_sparse or return_colbert_vecs to true",
            field=name,
        )
    req.outputs = tuple(wanted)
    dtype = params.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"{name}.dtype must be 'float32' or 'float16', got {dtype!r}", field=f"{name}.dtype")
    req.dtype = dtype or "float32"
    return req


def asks_multi(params: Any) -> bool:
    """True when a ``parameters`` object names any of BGE-M3's output options or ``dtype``."""
    return isinstance(params, dict) and bool(MULTI_PARAMETERS & set(params))


def require_object(payload: Any, example: str) -> dict:
    if not isinstance(payload, dict):
        raise InputError(
            f"request body must be a JSON object such as {example}, got {type(payload).__name__}"
        )
    return payload
