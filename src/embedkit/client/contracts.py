"""Wire contracts the client speaks (``hf``, ``search_term``, ``openai``, ``tei``: docs/client.md),
and how a long list of texts is split into requests. A contract turns texts into a JSON request body
and the answer back into a float32 matrix (token-level answers pooled by ``token_pooling``).

BGE-M3's other outputs (:meth:`Contract.multi`): ``hf`` carries all three in one request, ``tei``
lexical weights only (``/embed_sparse``, HTTP), ``search_term`` and ``openai`` dense vectors only; a
contract that cannot carry an output raises :class:`ConfigError` saying so.

>>> c = make_contract("hf")
>>> c.encode(["a", "b"], {})
b'{"inputs":["a","b"]}'
>>> c.decode(b'{"embeddings": [[1, 0], [0, 1]]}', 2).tolist()
[[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedkit.client.errors import ResponseFormatError
from embedkit.client.retry import WireResponse
from embedkit.errors import ConfigError, InputError

# Per-call options and the contracts able to carry them.
OPTION_NAMES = ("normalize", "dimensions", "truncate", "prompt_name")
# BGE-M3's outputs (embedkit.engine.multi.OUTPUTS) and FlagEmbedding's names for them.
OUTPUTS = ("dense", "sparse", "colbert")
FLAG_KEYS = {"dense": "dense_vecs", "sparse": "lexical_weights", "colbert": "colbert_vecs"}
JSON = "application/json"
NPZ = "application/x-npz"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def validate_texts(texts: Sequence[str]) -> list[str]:
    """Every item a non-empty string; raise :class:`InputError` naming ``texts[i]`` otherwise."""
    if isinstance(texts, (str, bytes)):
        raise InputError(
            "embed() takes a list of texts, got a single string; use embed_one(text) for one text",
            field="texts",
        )
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            kind = "null" if t is None else type(t).__name__
            raise InputError(f"texts[{i}] must be a string, got {kind}", field="texts", index=i)
        if t == "":
            raise InputError(
                f"texts[{i}] is an empty string; remove it or give it text", field="texts", index=i
            )
    return out


class Contract:
    """Base: subclasses set ``name``, ``path`` and implement :meth:`body` and :meth:`decode`."""

    name = ""
    path = "/invocations"  # appended to a bare base URL
    route: str | None = None  # another route of the same server (None: the endpoint's own URL)
    accept = JSON
    lists = True  # one request may carry several texts

    def __init__(self, *, token_pooling: str = "mean", openai_model: str = "default") -> None:
        self.token_pooling = token_pooling
        self.openai_model = openai_model

    def body(self, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, texts: list[str], options: dict[str, Any]) -> bytes:
        return _dumps(self.body(texts, options))

    def envelope_size(self, options: dict[str, Any]) -> int:
        """Bytes of a request carrying no text (what every request costs besides its texts)."""
        return len(self.encode([], options))

    def decode(self, body: bytes, count: int, options: dict[str, Any] | None = None) -> np.ndarray:
        raise NotImplementedError

    def decode_response(self, response: WireResponse, count: int, options: dict[str, Any]) -> Any:
        """A 200 answer's result (what :meth:`decode` makes of its body, by default)."""
        return self.decode(response.body, count, options)

    def multi(self, outputs: tuple[str, ...]) -> list[Contract]:
        """The requests that carry BGE-M3's ``outputs`` (each decodes to a FlagEmbedding-style dict
        of the outputs it carries); :class:`ConfigError` when this contract cannot carry them."""
        if outputs == ("dense",):
            return [_DenseAsFlag(self)]
        raise ConfigError(
            f"contract {self.name!r} carries dense vectors only, not {_flag_names(outputs)}; use contract "
            "hf against embedkit serve (EMBEDKIT_CONTRACT=hf), or tei for lexical weights"
        )

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError:
            raise ResponseFormatError(
                f"the endpoint answered 200 with a body that is not JSON ({body[:120]!r}); "
                f"is contract {self.name!r} the one it speaks?"
            ) from None

    def _matrix(self, rows: Any, count: int, options: dict[str, Any] | None) -> np.ndarray:
        """Rows (vectors, or token-level matrices to pool) -> float32 (count, dim)."""
        if not isinstance(rows, list) or len(rows) != count:
            got = f"{len(rows)} rows" if isinstance(rows, list) else type(rows).__name__
            raise ResponseFormatError(
                f"expected {count} embeddings from contract {self.name!r}, got {got}; "
                "the server may speak another contract (set EMBEDKIT_CONTRACT)"
            )
        if count == 0:
            return np.zeros((0, 0), dtype=np.float32)
        try:
            arrays = [np.asarray(r, dtype=np.float32) for r in rows]
        except (TypeError, ValueError):
            raise ResponseFormatError(
                f"embeddings from contract {self.name!r} are not numeric arrays"
            ) from None
        pooled = False
        out = []
        for a in arrays:
            while a.ndim > 2 and a.shape[0] == 1:
                a = a[0]
            if a.ndim == 2:  # token-level (tokens, dim): the HF container's feature-extraction answer
                a = a.mean(axis=0) if self.token_pooling == "mean" else a[0]
                pooled = True
            if a.ndim != 1:
                raise ResponseFormatError(f"an embedding has shape {a.shape}; expected a vector")
            out.append(a)
        if len({a.shape[0] for a in out}) != 1:
            raise ResponseFormatError(f"embeddings of different lengths: {sorted({a.shape[0] for a in out})}")
        mat = np.stack(out).astype(np.float32, copy=False)
        if pooled and (options or {}).get("normalize") is not False:
            norms = np.linalg.norm(mat, axis=1, keepdims=True)
            mat = mat / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(mat, dtype=np.float32)


class HFContract(Contract):
    """Hugging Face inference: ``{"inputs": [...], "parameters": {...}}`` -> ``{"embeddings": ...}``."""

    name = "hf"

    def body(self, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"inputs": texts}
        if options:
            out["parameters"] = options
        return out

    def multi(self, outputs: tuple[str, ...]) -> list[Contract]:
        if outputs == ("dense",):
            return super().multi(outputs)
        return [HFMultiContract(outputs, token_pooling=self.token_pooling, openai_model=self.openai_model)]

    def decode(self, body: bytes, count: int, options: dict[str, Any] | None = None) -> np.ndarray:
        data = self._json(body)
        if isinstance(data, dict):
            if "embeddings" not in data:
                raise ResponseFormatError(
                    f"the answer has no 'embeddings' field (keys: {sorted(data)[:8]}); "
                    "the server may speak another contract (set EMBEDKIT_CONTRACT)"
                )
            data = data["embeddings"]
        return self._matrix(data, count, options)


class SearchTermContract(Contract):
    """The search-term contract: ``{"search_term": "..."}`` -> ``{"embedding": [...]}`` (lists when
    ``lists``)."""

    name = "search_term"

    def __init__(self, *, lists: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.lists = lists

    def body(self, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
        if options:
            raise InputError(
                f"contract 'search_term' carries no options; got {sorted(options)} "
                "(use contract hf or openai, or configure the server)"
            )
        if self.lists:
            return {"search_term": texts}
        if len(texts) != 1:  # an empty list only sizes the envelope
            return {"search_term": texts[0] if texts else ""}
        return {"search_term": texts[0]}

    def decode(self, body: bytes, count: int, options: dict[str, Any] | None = None) -> np.ndarray:
        data = self._json(body)
        if isinstance(data, dict) and "embedding" in data and not self.lists:
            return self._matrix([data["embedding"]], count, options)
        if isinstance(data, dict) and "embeddings" in data:
            rows = data["embeddings"]
            if not self.lists and rows and not isinstance(rows[0], list):
                rows = [rows]
            return self._matrix(rows, count, options)
        keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ResponseFormatError(
            f"the answer has no 'embedding' field ({keys}); the server may speak another contract"
        )


class OpenAIContract(Contract):
    """OpenAI: ``{"input": [...], "model": ...}`` -> ``{"data": [{"index", "embedding"}]}``."""

    name = "openai"
    path = "/v1/embeddings"

    def body(self, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
        unsupported = set(options) - {"dimensions"}
        if unsupported:
            raise InputError(
                f"contract 'openai' carries only the 'dimensions' option; got {sorted(unsupported)}"
            )
        out: dict[str, Any] = {"input": texts, "model": self.openai_model, "encoding_format": "float"}
        if options.get("dimensions") is not None:
            out["dimensions"] = options["dimensions"]
        return out

    def decode(self, body: bytes, count: int, options: dict[str, Any] | None = None) -> np.ndarray:
        data = self._json(body)
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise ResponseFormatError(
                "the answer has no 'data' list; is this an OpenAI /v1/embeddings server?"
            )
        try:
            items = sorted(items, key=lambda d: d["index"])
            rows = [_openai_vector(d["embedding"]) for d in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise ResponseFormatError(f"malformed item in 'data': {exc}") from None
        return self._matrix(rows, count, options)


def _openai_vector(value: Any) -> Any:
    if isinstance(value, str):  # encoding_format=base64: little-endian float32
        return np.frombuffer(base64.b64decode(value), dtype="<f4").tolist()
    return value


class TEIContract(Contract):
    """text-embeddings-inference: ``POST /embed`` with ``{"inputs": [...], ...options}`` -> ``[[...]]``."""

    name = "tei"
    path = "/embed"

    def body(self, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
        return {"inputs": texts, **options}

    def decode(self, body: bytes, count: int, options: dict[str, Any] | None = None) -> np.ndarray:
        data = self._json(body)
        if not isinstance(data, list):
            raise ResponseFormatError(
                f"the answer is a {type(data).__name__}, not TEI's list of vectors; the server may speak "
                "another contract (set EMBEDKIT_CONTRACT)"
            )
        return self._matrix(data, count, options)

    def multi(self, outputs: tuple[str, ...]) -> list[Contract]:
        if "colbert" in outputs:
            raise ConfigError(
                "contract 'tei' cannot carry ColBERT vectors (TEI has no route for them); use contract hf "
                "against embedkit serve (EMBEDKIT_CONTRACT=hf)"
            )
        parts: list[Contract] = [_DenseAsFlag(self)] if "dense" in outputs else []
        return [*parts, TEISparseContract()] if "sparse" in outputs else parts


class TEISparseContract(Contract):
    """TEI's ``POST /embed_sparse``: ``{"inputs": [...]}`` -> ``[[{"index", "value"}, ...], ...]``."""

    name = "tei"
    path = "/embed"
    route = "/embed_sparse"

    def body(self, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
        unsupported = sorted(set(options) - {"truncate", "prompt_name"})
        if unsupported:
            raise InputError(f"TEI's /embed_sparse takes truncate and prompt_name only; got {unsupported}")
        return {"inputs": texts, **options}

    def decode(self, body: bytes, count: int, options: dict[str, Any] | None = None) -> Any:
        data = self._json(body)
        if not isinstance(data, list) or len(data) != count:
            got = f"{len(data)} items" if isinstance(data, list) else type(data).__name__
            raise ResponseFormatError(
                f"expected {count} lists of lexical weights from /embed_sparse, got {got}"
            )
        try:
            lexical = [_lexical([str(e["index"]) for e in item], [e["value"] for e in item]) for item in data]
        except (KeyError, TypeError, ValueError) as exc:
            raise ResponseFormatError(f"malformed /embed_sparse item: {exc}") from None
        return _flag(sparse=lexical)


class HFMultiContract(HFContract):
    """BGE-M3's outputs on ``/invocations``: ``{"inputs": [...], "parameters": {"return_dense",
    "return_sparse", "return_colbert_vecs", ...}}``, answered as npz (asked for first) or JSON."""

    accept = f"{NPZ}, {JSON};q=0.5"

    def __init__(self, outputs: tuple[str, ...], **kw: Any) -> None:
        super().__init__(**kw)
        self.outputs = outputs

    def body(self, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
        flags = {
            "return_dense": "dense" in self.outputs,
            "return_sparse": "sparse" in self.outputs,
            "return_colbert_vecs": "colbert" in self.outputs,
        }
        return {"inputs": texts, "parameters": {**options, **flags}}

    def decode_response(self, response: WireResponse, count: int, options: dict[str, Any]) -> Any:
        kind = str(response.headers.get("content-type") or "").split(";")[0].strip().lower()
        dtype = np.float16 if options.get("dtype") == "float16" else np.float32
        if kind == NPZ:
            return self._from_npz(response.body, count, dtype)
        data = self._json(response.body)
        if not isinstance(data, dict):
            raise ResponseFormatError(
                f"the answer is a {type(data).__name__}, not an object with embeddings / lexical_weights / "
                "colbert_vecs; is the server embedkit serve with --hf-mode embeddings?"
            )
        out = _flag()
        try:
            if "dense" in self.outputs:
                out["dense_vecs"] = self._rows(
                    data, "embeddings", count, lambda rows: np.asarray(rows, dtype)
                )
                if out["dense_vecs"].ndim != 2:
                    raise ValueError("embeddings are not one vector per input")
            if "sparse" in self.outputs:
                out["lexical_weights"] = self._rows(
                    data,
                    "lexical_weights",
                    count,
                    lambda rows: [_lexical(list(d), list(d.values())) for d in rows],
                )
            if "colbert" in self.outputs:
                out["colbert_vecs"] = self._rows(
                    data, "colbert_vecs", count, lambda rows: [_matrix_of(m, dtype) for m in rows]
                )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ResponseFormatError(f"malformed BGE-M3 answer: {exc}") from None
        return out

    def _rows(self, data: dict, key: str, count: int, convert: Any) -> Any:
        rows = data.get(key)
        if not isinstance(rows, list) or len(rows) != count:
            got = (
                f"{len(rows)} items"
                if isinstance(rows, list)
                else ("nothing" if rows is None else type(rows).__name__)
            )
            raise ResponseFormatError(
                f"expected {count} {key} in the answer, got {got}; does the server (embedkit serve, "
                f"--hf-mode embeddings) serve a BGE-M3 model?"
            )
        return convert(rows)

    def _from_npz(self, body: bytes, count: int, dtype: Any) -> dict[str, Any]:
        try:
            z = np.load(io.BytesIO(body), allow_pickle=False)
            out = _flag()
            if "dense" in self.outputs:
                out["dense_vecs"] = np.ascontiguousarray(z["dense"], dtype=dtype)
                if out["dense_vecs"].shape[0] != count:
                    raise ValueError(f"{out['dense_vecs'].shape[0]} dense rows")
            if "sparse" in self.outputs:
                ids = np.split(z["sparse_ids"], _cuts(z["sparse_offsets"], count))
                weights = np.split(z["sparse_weights"], _cuts(z["sparse_offsets"], count))
                out["lexical_weights"] = [
                    dict(zip(map(str, i.tolist()), w.astype(np.float32).tolist(), strict=True))
                    for i, w in zip(ids, weights, strict=True)
                ]
            if "colbert" in self.outputs:
                parts = np.split(z["colbert"].astype(dtype, copy=False), _cuts(z["colbert_offsets"], count))
                out["colbert_vecs"] = [np.ascontiguousarray(p) for p in parts]
        except (KeyError, ValueError, OSError) as exc:
            raise ResponseFormatError(f"malformed npz answer ({type(exc).__name__}: {exc})") from None
        return out


class _DenseAsFlag(Contract):
    """A dense contract whose result is ``{"dense_vecs": matrix}`` (for :meth:`Contract.multi`)."""

    def __init__(self, inner: Contract) -> None:
        self.inner = inner
        self.name, self.path, self.route, self.lists = inner.name, inner.path, inner.route, inner.lists

    def encode(self, texts: list[str], options: dict[str, Any]) -> bytes:
        return self.inner.encode(texts, options)

    def decode_response(self, response: WireResponse, count: int, options: dict[str, Any]) -> Any:
        return _flag(dense=self.inner.decode_response(response, count, options))


def _flag(dense: Any = None, sparse: Any = None, colbert: Any = None) -> dict[str, Any]:
    return {"dense_vecs": dense, "lexical_weights": sparse, "colbert_vecs": colbert}


def _flag_names(outputs: tuple[str, ...]) -> str:
    return " or ".join(FLAG_KEYS[o] for o in outputs if o != "dense") or "dense_vecs"


def _lexical(ids: list[str], weights: list[Any]) -> dict[str, float]:
    """``{token_id: weight}`` with float32 weights (as the engine gives them), as Python floats."""
    return dict(zip(ids, np.asarray(weights, dtype=np.float32).tolist(), strict=True))


def _matrix_of(rows: Any, dtype: Any) -> np.ndarray:
    arr = np.asarray(rows, dtype=dtype)
    if arr.ndim != 2:
        raise ValueError(f"ColBERT vectors of shape {arr.shape}; expected (tokens, dim)")
    return arr


def _cuts(offsets: np.ndarray, count: int) -> np.ndarray:
    if len(offsets) != count + 1:
        raise ValueError(f"{len(offsets) - 1} inputs in the offsets, expected {count}")
    return np.asarray(offsets[1:-1], dtype=np.int64)


def merge_flags(parts: list[dict[str, Any]], outputs: tuple[str, ...]) -> dict[str, Any]:
    """FlagEmbedding's ``encode`` dict from the results of several requests, in input order (each
    part: one request's dict, or, when one call needed two routes, several dicts of the same rows)."""
    out = _flag()
    for name in outputs:
        key = FLAG_KEYS[name]
        found = [p[key] for p in parts if p[key] is not None]
        if name == "dense":
            out[key] = np.concatenate(found) if found else np.zeros((0, 0), np.float32)
        else:
            out[key] = [item for chunk in found for item in chunk]
    return out


def make_contract(
    name: str, *, search_term_batch: bool = False, token_pooling: str = "mean", openai_model: str = "default"
) -> Contract:
    """The contract called ``name`` (``hf``, ``search_term``, ``openai``, ``tei``)."""
    kw = {"token_pooling": token_pooling, "openai_model": openai_model}
    if name == "hf":
        return HFContract(**kw)
    if name == "search_term":
        return SearchTermContract(lists=search_term_batch, **kw)
    if name == "openai":
        return OpenAIContract(**kw)
    if name == "tei":
        return TEIContract(**kw)
    raise ConfigError(f"unknown contract {name!r}; use hf, search_term, openai or tei")


def plan_requests(
    texts: Sequence[str],
    contract: Contract,
    options: dict[str, Any],
    *,
    max_batch: int,
    max_payload_bytes: int,
) -> list[tuple[int, int]]:
    """Split ``texts`` into ``[start, end)`` ranges, in order, each one request under both limits.

    A range holds at most ``max_batch`` texts (1 when the contract takes no lists) and its encoded
    body stays within ``max_payload_bytes``. A single text too large on its own is an
    :class:`InputError` naming its index.

    >>> plan_requests(["aa", "bb", "cc"], make_contract("hf"), {}, max_batch=2, max_payload_bytes=100)
    [(0, 2), (2, 3)]
    """
    per_request = max_batch if contract.lists else 1
    envelope = contract.envelope_size(options)
    ranges: list[tuple[int, int]] = []
    start, size = 0, envelope
    for i, text in enumerate(texts):
        item = len(_dumps(text)) + 1  # the text as a JSON string, plus a separating comma
        if envelope + item > max_payload_bytes:
            raise InputError(
                f"texts[{i}] takes {envelope + item} bytes on the wire, over the {max_payload_bytes}-byte "
                "payload limit (EMBEDKIT_MAX_PAYLOAD_BYTES); shorten it, or raise the limit up to what "
                "the endpoint accepts (SageMaker: 6 MiB real-time, 4 MB serverless)",
                field="texts",
                index=i,
            )
        if i > start and (i - start >= per_request or size + item > max_payload_bytes):
            ranges.append((start, i))
            start, size = i, envelope
        size += item
    if start < len(texts):
        ranges.append((start, len(texts)))
    return ranges
