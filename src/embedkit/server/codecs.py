"""Content types in and out of ``/invocations``: JSON, JSON Lines, CSV, npy and npz, with ``Accept``
negotiation. Tiny pure functions, tested on their own.

>>> decode(b'{"inputs": "hi"}', None)
{'inputs': 'hi'}
>>> decode(b'first text\\nsecond, with a comma\\n', "text/csv")
{'inputs': ['first text', 'second, with a comma']}
>>> negotiate("text/csv;q=0.5, application/x-npy")
'application/x-npy'
"""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

from embedkit.errors import InputError, NotAcceptableError, UnsupportedMediaTypeError

JSON = "application/json"
JSONLINES = "application/jsonlines"
CSV = "text/csv"
NPY = "application/x-npy"
NPZ = "application/x-npz"  # several named arrays (np.savez): BGE-M3's outputs, see contracts/m3.py
ACCEPTED_OUT = (JSON, JSONLINES, CSV, NPY, NPZ)
_JSON_IN = {JSON, "application/x-www-form-urlencoded"}  # curl -d sends the latter by default
_JSONLINES_IN = {
    JSONLINES,
    "application/json-lines",
    "application/x-jsonlines",
    "application/jsonl",
    "application/x-ndjson",
}
_NUMPY_OPTS = orjson.OPT_SERIALIZE_NUMPY


def media_type(header: str | None) -> str:
    """``'Application/JSON; charset=utf-8'`` -> ``'application/json'``; absent -> JSON."""
    if not header:
        return JSON
    return header.split(";", 1)[0].strip().lower() or JSON


def parse_json(body: bytes) -> Any:
    """Parse JSON bytes; any failure (bad syntax, nesting over 1024, invalid UTF-8) is a 400."""
    if not body.strip():
        raise InputError('request body is empty; send a JSON object such as {"inputs": "some text"}')
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"request body is not valid JSON: {exc}") from None


def decode(body: bytes, content_type: str | None) -> Any:
    """Decode a request body by its content type: JSON -> the parsed value, CSV / JSON Lines ->
    ``{"inputs": [texts]}`` (so they are answered like the HF contract)."""
    kind = media_type(content_type)
    if kind in _JSON_IN:
        if kind != JSON and body.lstrip()[:1] not in (b"{", b"["):
            raise UnsupportedMediaTypeError(_unsupported(content_type))
        return parse_json(body)
    if kind == CSV:
        return {"inputs": _decode_csv(body)}
    if kind in _JSONLINES_IN:
        return {"inputs": _decode_jsonlines(body)}
    raise UnsupportedMediaTypeError(_unsupported(content_type))


def line_format(content_type: str | None) -> str | None:
    """``CSV`` or ``JSONLINES`` for the bodies that hold one record per line (what a Batch Transform
    job with ``SplitType=Line`` sends), else ``None``.

    >>> line_format("application/json-lines"), line_format("text/csv"), line_format(None)
    ('application/jsonlines', 'text/csv', None)
    """
    kind = media_type(content_type)
    if kind in _JSONLINES_IN:
        return JSONLINES
    return CSV if kind == CSV else None


def _unsupported(content_type: str | None) -> str:
    return (
        f"Content-Type {content_type!r} is not supported; use application/json, text/csv "
        f"(one text per line) or application/jsonlines"
    )


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"request body is not valid UTF-8 (byte {exc.start}); send UTF-8 text") from None


def _decode_csv(body: bytes) -> list[str]:
    """One text per line; quoting as in CSV, unquoted commas stay part of the text."""
    texts = []
    for row in csv.reader(io.StringIO(_text(body), newline="")):
        line = ",".join(row)
        if line.strip():
            texts.append(line)
    if not texts:
        raise InputError("text/csv body holds no text; send one text per line")
    return texts


def _decode_jsonlines(body: bytes) -> list[str]:
    """Each line a JSON string, or an object with ``inputs``, ``search_term``, ``input`` or ``text``."""
    texts: list[str] = []
    for n, raw in enumerate(body.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InputError(f"line {n} is not valid JSON: {exc}", field="line", index=n) from None
        if isinstance(item, dict):
            item = next((item[k] for k in ("inputs", "search_term", "input", "text") if k in item), None)
        if not isinstance(item, str):
            raise InputError(
                f'line {n} must be a JSON string or an object with a string "inputs" (or "text")',
                field="line",
                index=n,
            )
        texts.append(item)
    if not texts:
        raise InputError("application/jsonlines body holds no lines; send one JSON text per line")
    return texts


@lru_cache(maxsize=256)
def negotiate(accept: str | None) -> str:
    """The response type for an ``Accept`` header (q-values honoured); absent or ``*/*`` -> JSON."""
    if not accept or not accept.strip():
        return JSON
    ranked: list[tuple[float, int, str]] = []
    for pos, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        kind, q = fields[0].lower(), 1.0
        for param in fields[1:]:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if kind and q > 0:
            ranked.append((-q, pos, kind))
    for _q, _pos, kind in sorted(ranked):
        if kind in ("*/*", "application/*"):
            return JSON
        if kind == "text/*":
            return CSV
        if kind in _JSONLINES_IN:
            return JSONLINES
        if kind in ACCEPTED_OUT:
            return kind
    raise NotAcceptableError(
        f"Accept {accept!r} asks for no type this server produces; use one of {', '.join(ACCEPTED_OUT)}"
    )


def dumps(obj: Any) -> bytes:
    """JSON bytes; numpy float32 arrays are written with the shortest repr that round-trips in float32."""
    return orjson.dumps(obj, option=_NUMPY_OPTS, default=_default)


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # torch tensors, numpy scalars of odd types
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def short_float16(arr: np.ndarray) -> np.ndarray:
    """float16 values as float64 numbers with 5 significant digits, which JSON writes short
    (``0.031235`` instead of float32's ``0.031234741``) and which read back to the same float16
    (5 digits are float16's round-trip precision).

    >>> x = np.array([0.0312347, -1.5, 0.0, 65504.0], np.float16)
    >>> dumps(short_float16(x))
    b'[0.031235,-1.5,0.0,65504.0]'
    >>> bool((np.asarray(orjson.loads(dumps(short_float16(x))), np.float16) == x).all())
    True
    """
    x = np.asarray(arr, dtype=np.float16).astype(np.float64)
    magnitude = np.abs(x)
    exponent = np.floor(np.log10(np.where(magnitude > 0, magnitude, 1.0)))
    scale = 10.0 ** (4 - exponent)  # float16 spans 6e-8..65504: exact powers of ten up to 1e12
    return np.round(x * scale) / scale


def _text_ready(obj: Any) -> Any:
    """Float16 arrays (``parameters.dtype``), at the top of an answer, in a dict of them or a list of
    them, as :func:`short_float16` numbers; anything else as it is."""
    if isinstance(obj, np.ndarray):
        return short_float16(obj) if obj.dtype == np.float16 else obj
    if isinstance(obj, dict):
        return {k: _text_ready(v) if isinstance(v, (np.ndarray, list)) else v for k, v in obj.items()}
    if isinstance(obj, list) and obj and isinstance(obj[0], np.ndarray) and obj[0].dtype == np.float16:
        return [short_float16(a) for a in obj]
    return obj


def npy_bytes(arr: np.ndarray) -> bytes:
    """One array as a ``.npy`` file (``np.load(io.BytesIO(body))`` reads it; no pickles)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as an uncompressed ``.npz`` file (``np.load(io.BytesIO(body))`` reads it)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _vectors(arr: Any) -> np.ndarray:
    """float16 arrays stay float16 (``parameters.dtype``); everything else becomes float32."""
    arr = np.asarray(arr)
    return arr if arr.dtype == np.float16 else arr.astype(np.float32, copy=False)


def _matrix(prediction: Any) -> np.ndarray:
    if isinstance(prediction, dict) and len(prediction) == 1:
        prediction = next(iter(prediction.values()))
    arr = _vectors(prediction)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def encode(prediction: Any, accept: str) -> bytes:
    """Serialise a prediction (``{"embeddings": array}`` or an array) as ``accept`` asks; an npz
    holds it as ``dense`` (rows, dim)."""
    if accept == JSON:
        return dumps(_text_ready(prediction))
    if accept == NPY:
        arr = prediction
        if isinstance(arr, dict) and len(arr) == 1:
            arr = next(iter(arr.values()))
        return npy_bytes(_vectors(arr))
    rows = _matrix(prediction)
    if accept == NPZ:
        return npz_bytes({"dense": rows})
    rows = _text_ready(rows)
    if accept == CSV:
        return b"".join(orjson.dumps(row, option=_NUMPY_OPTS)[1:-1] + b"\n" for row in rows)
    if accept == JSONLINES:
        return b"".join(orjson.dumps({"embedding": row}, option=_NUMPY_OPTS) + b"\n" for row in rows)
    raise NotAcceptableError(f"cannot produce {accept!r}")
