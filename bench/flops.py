"""Model FLOPs, the machine's peak matmul rate, and model FLOP utilisation (MFU).

FLOPs of a BERT-style encoder for one text of ``n`` tokens (``L`` layers, width ``h``, feed-forward
``i``), counting a multiply-add as 2 FLOPs:

* dense layers: ``2 * P`` per token, where ``P`` = parameters of the encoder's linear layers
  (weights and biases of Q, K, V, attention output, feed-forward in and out):
  ``P = L * (4 * (h*h + h) + (h*i + i) + (i*h + h))``. all-MiniLM-L6-v2 (L=6, h=384, i=1536):
  P = 10.64 M, so 21.3 MFLOP per token.
* attention scores and the weighted sum (QK^T and AV): ``4 * n * h`` per token per layer, so
  ``4 * L * h * n**2`` per text (2.4 MFLOP per token at n=256, negligible for short texts).

Embeddings, layer norms, softmax, GELU and pooling are left out (element-wise, a few percent).
Only real tokens count (``n`` after truncation, with [CLS]/[SEP]); padding is wasted work, so MFU
shows how much of the machine goes to useful work. ``MFU = achieved FLOP/s / peak FLOP/s`` of the
matching dtype (fp32 rows against the fp32 peak, bf16 against bf16, int8 against int8).

>>> shape = ModelShape(layers=6, hidden=384, intermediate=1536, heads=12)
>>> round(shape.dense_flops_per_token / 1e6, 2)
21.28
>>> round(corpus_flops(shape, [10, 10]) / 1e6, 1)
427.3
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

PEAK_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "int8"}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a BERT-style encoder that its FLOPs depend on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        """From a transformers config (``BertConfig`` and friends)."""
        hidden = int(cfg.hidden_size)
        return cls(
            layers=int(cfg.num_hidden_layers),
            hidden=hidden,
            intermediate=int(getattr(cfg, "intermediate_size", 4 * hidden)),
            heads=int(cfg.num_attention_heads),
        )

    @property
    def linear_params(self) -> int:
        """Parameters of the encoder's linear layers (weights and biases)."""
        h, i = self.hidden, self.intermediate
        return self.layers * (4 * (h * h + h) + (h * i + i) + (i * h + h))

    @property
    def dense_flops_per_token(self) -> int:
        return 2 * self.linear_params

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "linear_params": self.linear_params}


def corpus_flops(shape: ModelShape, lengths: Iterable[int]) -> float:
    """Useful FLOPs to encode texts of these token ``lengths`` (dense plus attention)."""
    total = sq = 0
    for n in lengths:
        total += int(n)
        sq += int(n) * int(n)
    return float(shape.dense_flops_per_token * total + 4 * shape.layers * shape.hidden * sq)


def corpus_flops_from_sums(shape: ModelShape, tokens: int, tokens_sq: int) -> float:
    """Same as :func:`corpus_flops`, from ``sum(n)`` and ``sum(n*n)``."""
    return float(shape.dense_flops_per_token * tokens + 4 * shape.layers * shape.hidden * tokens_sq)


def mfu(flops: float, seconds: float, peak_flops_per_s: float | None) -> float | None:
    """Model FLOP utilisation: ``flops / seconds`` as a fraction of the peak (None if unknown)."""
    if not peak_flops_per_s or seconds <= 0:
        return None
    return flops / seconds / peak_flops_per_s


def _best_rate(fn: Callable[[], object], flops_per_call: float, reps: int, inner: int) -> float:
    fn()  # warm-up: kernel selection, packing, allocator
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, time.perf_counter() - t0)
    return flops_per_call * inner / best


def measure_peak(dtype: str, n: int = 2048, reps: int = 5, inner: int = 3) -> float | None:
    """Best observed ``torch.mm`` rate (FLOP/s, or OP/s for int8) for ``n x n`` matrices.

    Runs with the current ``torch.get_num_threads()``. ``int8`` takes the faster of
    ``torch._int_mm`` and the dynamically quantised linear kernel (what ``quantize_dynamic`` uses);
    None where this torch build has neither.
    """
    import torch

    flops = 2.0 * n**3
    gen = torch.Generator().manual_seed(0)
    if dtype in ("fp32", "bf16", "fp16"):
        tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        a = torch.randn(n, n, generator=gen).to(tdt)
        b = torch.randn(n, n, generator=gen).to(tdt)
        with torch.inference_mode():
            return _best_rate(lambda: torch.mm(a, b), flops, reps, inner)
    if dtype != "int8":
        raise ValueError(f"unknown dtype {dtype!r}")
    rates: list[float] = []
    a8 = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)
    b8 = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)
    try:
        with torch.inference_mode():
            rates.append(_best_rate(lambda: torch._int_mm(a8, b8), flops, reps, inner))
    except (RuntimeError, AttributeError, NotImplementedError):
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = torch.quantize_per_tensor(torch.randn(n, n, generator=gen), 0.05, 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(w, None)
        x = torch.randn(n, n, generator=gen)
        with torch.inference_mode():
            rates.append(
                _best_rate(lambda: torch.ops.quantized.linear_dynamic(x, packed), flops, reps, inner)
            )
    except (RuntimeError, AttributeError, NotImplementedError):
        pass
    return max(rates) if rates else None
