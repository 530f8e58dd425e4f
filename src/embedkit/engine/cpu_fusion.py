"""CPU kernel fusion for transformer encoders: oneDNN linear with the bias (and GELU) in the epilogue.

``nn.Linear`` on CPU copies the bias into the output before the GEMM, and the feed-forward GELU is
another pass over a 4x-wide activation; oneDNN's ``linear_pointwise`` does both inside the GEMM
(same arithmetic; speed-ups in docs/backends.md). CPU fp32/bf16 only; ``cpu_fusion=False`` turns it off.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _op_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available() and mkldnn is not None and hasattr(mkldnn, "_linear_pointwise")
    )


def _kernel_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear runs in ``dtype`` on this CPU: bf16 needs at least AVX-512
    (an AVX2-only CPU refuses the primitive, where a plain bf16 ``nn.Linear`` still runs), so try it."""
    try:
        x = torch.ones(2, 8, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 8, dtype=dtype), None, "none", [], "")
        return True
    except RuntimeError as exc:
        log.info("cpu fusion off for %s: oneDNN's fused linear does not run here (%s)", dtype, str(exc)[:80])
        return False


class FusedLinear(torch.nn.Module):
    """``activation(x @ W.T + b)`` in one oneDNN call; ``activation`` is ``none`` or ``gelu``."""

    def __init__(self, linear: torch.nn.Linear, activation: str = "none") -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.attr = activation
        # GELU takes its algorithm ("none" = exact erf, "tanh"); a plain linear takes no algorithm.
        self.algorithm = "none" if activation == "gelu" else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # e.g. fp32 activations reaching bf16 weights
            x = x.to(self.weight.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [], self.algorithm)


def _is_exact_gelu(act: object) -> bool:
    name = type(act).__name__
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "none"
    # transformers' GELUActivation uses the exact erf form; the "new"/"fast" variants are tanh.
    return name == "GELUActivation"


class _FusedIntermediate(torch.nn.Module):
    """Replaces a BERT-style ``Intermediate`` (``dense`` + ``intermediate_act_fn``) by one fused call."""

    def __init__(self, dense: torch.nn.Linear) -> None:
        super().__init__()
        self.dense = FusedLinear(dense, "gelu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)


def fuse_for_cpu(model: torch.nn.Module) -> int:
    """Swap linear layers (and Linear+GELU intermediates) for fused oneDNN ones, in place.

    Returns the number of modules replaced (0 when the op or the dtype is not supported).
    """
    if not _op_available():
        return 0
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.bfloat16) or not _kernel_runs(dtype):
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            dense = getattr(child, "dense", None)
            act = getattr(child, "intermediate_act_fn", None)
            if isinstance(dense, torch.nn.Linear) and act is not None and _is_exact_gelu(act):
                setattr(parent, name, _FusedIntermediate(dense))
                replaced += 1
            elif type(child) is torch.nn.Linear:
                setattr(parent, name, FusedLinear(child))
                replaced += 1
    log.debug("cpu fusion: replaced %d modules", replaced)
    return replaced
