"""Pooling of token embeddings into one vector, exactly as sentence-transformers' Pooling module does."""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken")


def pool(mode: str, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Pool ``hidden`` (batch, seq, dim) into (batch, dim) under ``attention_mask`` (batch, seq).

    Computed in float32 whatever the model's precision, so pooling never adds rounding error.
    """
    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode in ("mean", "mean_sqrt_len"):
        summed = (hidden * mask).sum(1)
        counts = mask.sum(1).clamp(min=1e-9)
        return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)
    if mode == "max":
        masked = hidden.masked_fill(mask == 0, -1e9)
        return masked.max(1).values
    if mode == "weightedmean":
        weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
        weights = weights.view(1, -1, 1) * mask
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if mode == "lasttoken":
        # Right padding: the last real token sits at (number of real tokens - 1).
        last = attention_mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]
    raise ValueError(f"unknown pooling mode {mode!r}; choose one of {', '.join(POOLING_MODES)}")


def pooling_from_st_config(cfg: dict) -> str:
    """Read a sentence-transformers ``1_Pooling/config.json`` (old flag style or new ``pooling_mode``)."""
    if isinstance(cfg.get("pooling_mode"), str):
        mode = cfg["pooling_mode"].lower()
        return {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(mode, mode)
    flags = [
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
        ("pooling_mode_weightedmean_tokens", "weightedmean"),
        ("pooling_mode_lasttoken", "lasttoken"),
    ]
    chosen = [name for key, name in flags if cfg.get(key)]
    if len(chosen) > 1:
        raise ValueError(f"combined pooling modes {chosen} are not supported; pick one")
    return chosen[0] if chosen else "mean"
