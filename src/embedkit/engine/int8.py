"""int8 on CPU that keeps the vectors: int8 weights per output channel, int8 activations per token.

Every token row gets its own asymmetric range (not one per batch, as PyTorch's dynamic quantisation;
docs/backends.md, "int8") and every weight row its own symmetric scale; the GEMM runs on
``torch._int_mm`` and the scales, zero points and bias are applied to the int32 result.

Maths, for one token row ``x`` and output channel ``j``::

    s = (max(x, 0) - min(x, 0)) / 253          zc = round(-min(x, 0) / s) - 127
    q = round(x / s) + zc  in [-128, 127]       x ~= s * (q - zc)
    W[j] ~= ws[j] * Wq[j]                        ws[j] = max|W[j]| / 127
    x . W[j] + b[j] ~= s * ws[j] * (q . Wq[j]) - s * zc * ws[j] * sum(Wq[j]) + b[j]

The two rank-1 terms (zero point, bias) are added with one ``addmm_`` of inner size 2. (253 rather
than 255 steps keeps ``round`` provably inside int8, so no clamp pass is needed.) The passes over the
activations are memory-bound, hence the small token budget :data:`INT8_CPU_BATCH_TOKENS`.

Sibling layers fed the same tensor (query/key/value) quantise it once: they share a
:class:`_SharedInput` that remembers, per thread, the last input it quantised.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from embedkit.errors import DeviceError

INT8_CPU_BATCH_TOKENS = 2048
_STEPS = 253.0


def int8_supported() -> bool:
    """True when this torch can multiply int8 matrices on the CPU."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones((17, 8), dtype=torch.int8)
        return int(torch._int_mm(a, torch.ones((8, 8), dtype=torch.int8))[0, 0]) == 8
    except (RuntimeError, NotImplementedError):
        return False


class _SharedInput:
    """The last input quantised by one group of sibling layers, per thread.

    A weak reference identifies the input, so a freed tensor never matches (inference tensors carry
    no version counter; siblings read their common input without changing it). Copies of a model
    (device replicas) start with an empty one.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedInput:
        return _SharedInput()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()

    def get(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        entry = getattr(self._local, "entry", None)
        if entry is None:
            return None
        ref, packed = entry
        return packed if ref() is x else None

    def put(self, x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        self._local.entry = (weakref.ref(x), packed)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int8 per row of a 2-D float tensor.

    Returns ``(q, s, u)``: ``q`` int8 ``(M, K)``, the row scales ``s`` ``(M, 1)`` and ``u`` ``(M, 2)``
    = ``[-s * zc, 1]``, the left factor of the zero-point and bias correction.
    """
    lo = x2.amin(1, keepdim=True).clamp_max_(0)
    hi = x2.amax(1, keepdim=True).clamp_min_(0)
    s = ((hi - lo) / _STEPS).clamp_min_(1e-12)
    inv = 1.0 / s
    zc = (-lo * inv).round_() - 127.0
    q = (x2 * inv).add_(zc).round_().to(torch.int8)
    u = torch.cat([-(s * zc), torch.ones_like(s)], 1)
    return q, s, u


class Int8Linear(torch.nn.Module):
    """Drop-in for ``nn.Linear`` (float in, float out) computing in int8 on the CPU."""

    def __init__(self, linear: torch.nn.Linear, shared: _SharedInput | None = None) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        ws = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
        wq = (w / ws[:, None]).round().clamp(-127, 127).to(torch.int8)
        bias = torch.zeros(w.shape[0]) if linear.bias is None else linear.bias.detach().float()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # (K, N) as a transposed view of the row-major (N, K) weight: oneDNN's fastest layout here.
        self.register_buffer("weight_int8", wq)
        self.register_buffer("weight_scale", ws)
        # Right factor of the rank-2 correction: [ws * rowsum(Wq); bias].
        self.register_buffer("correction", torch.stack([ws * wq.sum(1, dtype=torch.int32).float(), bias]))
        self.shared = shared

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8 per-token"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        packed = self.shared.get(x) if self.shared is not None else None
        if packed is None:
            packed = quantize_rows(x.reshape(-1, shape[-1]).float())
            if self.shared is not None:
                self.shared.put(x, packed)
        q, s, u = packed
        out = torch._int_mm(q, self.weight_int8.t()) * self.weight_scale
        out.mul_(s).addmm_(u, self.correction)
        return out.reshape(*shape[:-1], self.out_features)


def quantize_int8(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` (in place) by :class:`Int8Linear`; returns the count.

    Sibling linears with the same input width share the quantised input when fed the same tensor.
    Raises :class:`DeviceError` when this torch build has no CPU int8 matrix multiply.
    """
    if not int8_supported():
        raise DeviceError(
            "precision int8 needs torch._int_mm on the CPU, which this torch build lacks; use fp32 or bf16"
        )
    replaced = 0
    for parent in list(model.modules()):
        groups: dict[int, _SharedInput] = {}
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                shared = groups.setdefault(child.in_features, _SharedInput())
                setattr(parent, name, Int8Linear(child, shared))
                replaced += 1
    return replaced
