"""BGE-M3's lexical weights and ColBERT vectors on ``/invocations`` (``parameters.return_sparse``,
``return_colbert_vecs``, ``return_dense``, ``dtype``), in JSON, npz or npy.

JSON (FlagEmbedding's names beside the contract's own): ``{"embeddings": [[...]], "lexical_weights":
[{"token_id": weight}], "colbert_vecs": [[[...]]]}``, one item per input, each unwrapped for a
string input (``embeddings`` a vector, ``lexical_weights`` a dict, ``colbert_vecs`` a matrix); the
search contract's single answer names the vector ``embedding``. ``Accept: application/x-npz``: one
``np.savez`` file whose members are

- ``dense``: (inputs, dim);
- ``sparse_ids`` (int32), ``sparse_weights`` (float32), ``sparse_offsets`` (int64, inputs + 1): input
  ``i``'s ids are ``sparse_ids[sparse_offsets[i]:sparse_offsets[i + 1]]`` (a CSR matrix's
  ``indices`` / ``data`` / ``indptr``);
- ``colbert`` (all inputs' vectors, stacked) and ``colbert_offsets`` (int64, inputs + 1): input
  ``i``'s vectors are ``colbert[colbert_offsets[i]:colbert_offsets[i + 1]]``.

``Accept: application/x-npy`` carries one array: the dense matrix, or one input's ColBERT vectors
when that is all it asks for. ``dtype: float16`` applies to dense and ColBERT vectors (lexical
weights stay float32).

>>> from embedkit.engine.multi import MultiVectors
>>> mv = MultiVectors(dense=None, sparse=[(np.array([7, 3], np.int32), np.array([0.5, 0.25], np.float32))],
...                   colbert=None, token_counts=np.array([4]), truncated=np.array([False]))
>>> MultiAnswer(mv, ("sparse",), single=True).encode(codecs.JSON)
b'{"lexical_weights":{"7":0.5,"3":0.25}}'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedkit.engine.multi import MultiVectors
from embedkit.errors import NotAcceptableError, PayloadTooLargeError
from embedkit.server import codecs

# What a number costs at least in JSON ("0.0" and a separator), for refusing before computing.
MIN_JSON_NUMBER_BYTES = 4


def offsets(counts: Sequence[int]) -> np.ndarray:
    """``[0, c0, c0 + c1, ...]``: where each input's rows start in a stacked array (int64)."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


@dataclass
class MultiAnswer:
    """A request's BGE-M3 outputs, before they are encoded as ``Accept`` asks."""

    vectors: MultiVectors
    outputs: tuple[str, ...]
    single: bool = False
    dtype: str = "float32"
    dense_key: str = "embeddings"

    def _cast(self, arr: np.ndarray) -> np.ndarray:
        return arr.astype(np.float16) if self.dtype == "float16" else arr

    def to_json(self) -> dict[str, Any]:
        """The JSON answer (arrays left as arrays for the encoder)."""
        v = self.vectors
        out: dict[str, Any] = {}
        if "dense" in self.outputs and v.dense is not None:
            dense = self._cast(v.dense)
            out[self.dense_key] = dense[0] if self.single else dense
        if "sparse" in self.outputs and v.sparse is not None:
            # np.float32 values: JSON gets float32's shortest decimal, not float64's 17 digits
            lexical = [dict(zip(map(str, ids.tolist()), weights, strict=True)) for ids, weights in v.sparse]
            out["lexical_weights"] = lexical[0] if self.single else lexical
        if "colbert" in self.outputs and v.colbert is not None:
            colbert = [self._cast(c) for c in v.colbert]
            out["colbert_vecs"] = colbert[0] if self.single else colbert
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The npz members (see the module docstring)."""
        v = self.vectors
        out: dict[str, np.ndarray] = {}
        if "dense" in self.outputs and v.dense is not None:
            out["dense"] = self._cast(v.dense)
        if "sparse" in self.outputs and v.sparse is not None:
            out["sparse_ids"] = np.concatenate([ids for ids, _ in v.sparse] or [np.empty(0, np.int32)])
            out["sparse_weights"] = np.concatenate([w for _, w in v.sparse] or [np.empty(0, np.float32)])
            out["sparse_offsets"] = offsets([len(ids) for ids, _ in v.sparse])
        if "colbert" in self.outputs and v.colbert is not None:
            out["colbert"] = self._cast(np.concatenate(v.colbert))
            out["colbert_offsets"] = offsets([len(c) for c in v.colbert])
        return out

    def one_array(self) -> np.ndarray:
        """The answer as one array, for ``application/x-npy``."""
        if self.outputs == ("dense",):
            return self._cast(self.vectors.dense)  # type: ignore[arg-type]
        return self._cast(self.vectors.colbert[0])  # type: ignore[index]

    def encode(self, accept: str) -> bytes:
        if accept == codecs.JSON:
            return codecs.encode(self.to_json(), codecs.JSON)
        if accept == codecs.NPZ:
            return codecs.npz_bytes(self.arrays())
        if accept == codecs.NPY:
            return codecs.npy_bytes(self.one_array())
        raise NotAcceptableError(f"cannot produce {accept!r}")


def check_accept(outputs: tuple[str, ...], count: int, accept: str) -> None:
    """406 (before any compute) for a type that cannot carry these outputs."""
    if accept in (codecs.JSON, codecs.NPZ):
        return
    if accept == codecs.NPY and (outputs == ("dense",) or (outputs == ("colbert",) and count == 1)):
        return
    raise NotAcceptableError(
        f"an answer with {' and '.join(_names(outputs))} for {count} input(s) cannot be {accept}; "
        "send Accept: application/json, application/x-npz (one member per output) or, for one input's "
        "colbert_vecs alone, application/x-npy"
    )


def _names(outputs: tuple[str, ...]) -> list[str]:
    names = {"dense": "embeddings", "sparse": "lexical_weights", "colbert": "colbert_vecs"}
    return [names[o] for o in outputs]


def least_bytes(
    lengths: np.ndarray,
    outputs: tuple[str, ...],
    *,
    dense_dim: int,
    colbert_dim: int,
    accept: str,
    dtype: str,
) -> int:
    """A lower bound on the answer's size from the inputs' token counts alone (dense and ColBERT
    vectors; lexical weights counted as nothing): exact for npz / npy arrays, 4 bytes a number in
    JSON. Refusing above the limit with it costs no compute."""
    numbers = len(lengths) * dense_dim if "dense" in outputs else 0
    if "colbert" in outputs:
        numbers += int(np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0).sum()) * colbert_dim
    per_number = MIN_JSON_NUMBER_BYTES if accept == codecs.JSON else (2 if dtype == "float16" else 4)
    return numbers * per_number


def too_large(
    size: int,
    limit: int,
    *,
    accept: str,
    outputs: tuple[str, ...],
    dtype: str = "float32",
    binary: bool = True,
    at_least: bool = False,
) -> PayloadTooLargeError:
    """The 413 for an answer of ``size`` bytes over ``limit``: what it would be and how to stay under
    (``binary``: the route can answer npz; ``at_least``: ``size`` is :func:`least_bytes`)."""
    ways = ["send fewer (or shorter) inputs per request"]
    if binary and accept == codecs.JSON:
        ways.append("ask for Accept: application/x-npz (binary, about a third of JSON's size)")
    if binary and dtype != "float16" and ("dense" in outputs or "colbert" in outputs):
        ways.append('set parameters.dtype to "float16" (half the bytes of npz vectors)')
    ways.append(
        "or raise the server's max_response_bytes (--max-response-bytes, EMBEDKIT_MAX_RESPONSE_BYTES)"
    )
    size_text = f"at least {size}" if at_least else f"{size}"
    return PayloadTooLargeError(
        f"the answer would be {size_text} bytes ({accept}), over the server's limit of {limit} bytes "
        f"(max_response_bytes); {', '.join(ways)}",
        limit=limit,
        size=size,
    )
