"""Unpadded encoder forward for BERT-family models: the dense layers see only real tokens.

A batch padded to its longest text spends the feed-forward and projection GEMMs (about 90% of a
short text's compute) on padding. A server batch merges requests in arrival order, so its lengths
are mixed: on the server's replayed batches, padding was 1.4-1.8x the real tokens. This forward
packs the batch's real tokens into one ``[tokens, hidden]`` matrix for every dense layer, and pads
only for attention, in chunks of rows of similar length (rows sorted by length, each chunk padded
to its own longest). Query, key and value run as one GEMM over weights stacked once at load.
A batch padded by at most 10% (length-sorted bulk batches) runs the model's own forward.

Same arithmetic as the padded forward (each token's dense layers, attention over its own text's
keys), so fp32 agrees with it within float rounding (GEMMs of another row count may round in
another order; tests hold it within 1e-5, as between backends). Positions padded in the output
hold zeros, where the padded forward holds values nothing reads.

Covers ``BertModel``, ``RobertaModel`` and ``XLMRobertaModel`` (the default model and BGE-M3) with
absolute positions; other models keep their own forward (:func:`can_unpad` says which). Inputs are
right-padded (as :func:`embedkit.engine.batching.pad_batch` pads). The engine applies it on CPU only:
the code is device-agnostic, but its host synchronisations (lengths, indices) are unmeasured on a GPU.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from embedkit.engine.cpu_fusion import FusedLinear

log = logging.getLogger(__name__)

MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
# Rows sorted by length go into one attention chunk while the chunk's padded query-key rows stay
# within this factor of its real tokens (a 256-token text among 16-token ones starts its own).
CHUNK_SLACK = 1.25
# A batch whose padding adds at most this share runs the model's own padded forward: packing costs
# ~3-5% (index copies, per-chunk attention, 2-D layouts), more than it saves there. Length-sorted
# bulk batches are such batches: packed, bf16 bulk ran 2-6% slower on the AMX Xeon (and a batch
# with no padding at all 0-10% slower in fp32 at 8k tokens).
PACK_MIN_PADDING = 0.10


def can_unpad(model: torch.nn.Module) -> str | None:
    """``None`` when :class:`UnpaddedEncoder` can run ``model``, else why not."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {', '.join(MODEL_TYPES)}"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return "a decoder or relative positions"
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if getattr(model, "embeddings", None) is None or not layers:
        return "no embeddings or encoder layers"
    for layer in layers:
        att = getattr(getattr(layer, "attention", None), "self", None)
        parts = [getattr(att, n, None) for n in ("query", "key", "value")]
        if not all(isinstance(p, torch.nn.Linear | FusedLinear) for p in parts):
            return "attention projections that are not linear layers (int8?)"
        if len({(p.weight.dtype, p.weight.device) for p in parts}) != 1:
            return "attention projections in different dtypes or devices"
        for path in (
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate",
            "output.LayerNorm",
        ):
            try:
                layer.get_submodule(path)
            except AttributeError:
                return f"a layer without {path}"
    return None


class _StackedQKV(torch.nn.Module):
    """Query, key and value as one linear layer (oneDNN-fused when they were); the three originals
    become views of its weight."""

    def __init__(self, query: torch.nn.Module, key: torch.nn.Module, value: torch.nn.Module) -> None:
        super().__init__()
        with torch.no_grad():
            weight = torch.cat([query.weight, key.weight, value.weight]).contiguous()
            bias = torch.cat([query.bias, key.bias, value.bias]).contiguous()
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.linear = FusedLinear(linear) if isinstance(query, FusedLinear) else linear
        self.bind(query, key, value)

    def bind(self, query: torch.nn.Module, key: torch.nn.Module, value: torch.nn.Module) -> None:
        """Make the three layers' weights views of the stacked ones: one copy of the weights, not two."""
        rows = self.linear.weight.shape[0] // 3
        for k, part in enumerate((query, key, value)):
            part.weight = torch.nn.Parameter(
                self.linear.weight[k * rows : (k + 1) * rows], requires_grad=False
            )
            part.bias = torch.nn.Parameter(self.linear.bias[k * rows : (k + 1) * rows], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class _Chunk(NamedTuple):
    """``rows`` rows of the length-sorted batch, tokens ``[start, stop)`` of the packed matrix,
    padded to ``length``; ``index``/``mask`` are None when every row has that length."""

    rows: int
    start: int
    stop: int
    length: int
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def attention_chunks(lengths: list[int], slack: float = CHUNK_SLACK) -> list[tuple[int, int]]:
    """Contiguous ``(first, last)`` row ranges of ascending ``lengths`` whose padded size (rows x
    longest) stays within ``slack`` x their real tokens.

    >>> attention_chunks([5, 5, 6, 16, 256])
    [(0, 3), (3, 4), (4, 5)]
    """
    chunks, first, real = [], 0, 0
    for i, n in enumerate(lengths):
        if i > first and n * (i + 1 - first) > slack * (real + n):
            chunks.append((first, i))
            first, real = i, 0
        real += n
    if lengths:
        chunks.append((first, len(lengths)))
    return chunks


class UnpaddedEncoder(torch.nn.Module):
    """Runs a BERT-family ``model`` (see :func:`can_unpad`) without padding in its dense layers;
    called like the model, it returns ``(last_hidden_state,)`` padded as the input was."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.qkv = torch.nn.ModuleList(
            _StackedQKV(layer.attention.self.query, layer.attention.self.key, layer.attention.self.value)
            for layer in model.encoder.layer
        )

    def _apply(self, fn, recurse=True):  # torch.nn.Module._apply
        """``.to(device)`` moves every parameter on its own, so views come back as copies: bind again."""
        out = super()._apply(fn, recurse)
        for layer, qkv in zip(self.model.encoder.layer, self.qkv, strict=True):
            att = layer.attention.self
            qkv.bind(att.query, att.key, att.value)
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        rows, width = input_ids.shape
        lengths = attention_mask.sum(1)
        lengths_host = lengths.tolist()
        if rows * width <= (1 + PACK_MIN_PADDING) * sum(lengths_host):
            return (self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,)
        hidden = self.model.embeddings(input_ids=input_ids)
        size = hidden.shape[-1]
        order = torch.argsort(lengths, stable=True)
        sorted_lengths = [lengths_host[i] for i in order.tolist()]
        keep = attention_mask[order].bool()
        # Each real token's position in the sorted [rows * width] layout and in the caller's.
        where = keep.reshape(-1).nonzero().squeeze(1)
        home = (order[:, None] * width + torch.arange(width, device=order.device)).reshape(-1)[where]
        packed = hidden.reshape(rows * width, size).index_select(0, home)
        chunks, start = [], 0
        for first, last in attention_chunks(sorted_lengths):
            length, n = sorted_lengths[last - 1], last - first
            stop = start + sum(sorted_lengths[first:last])
            if sorted_lengths[first] == length:
                chunks.append(_Chunk(n, start, stop, length))
            else:
                kept = keep[first:last, :length]
                index = kept.reshape(-1).nonzero().squeeze(1)
                chunks.append(_Chunk(n, start, stop, length, index, kept[:, None, None, :]))
            start = stop
        packed = self._layers(packed, chunks)
        out = packed.new_zeros(rows * width, size)
        out.index_copy_(0, home, packed)
        return (out.view(rows, width, size),)

    def _layers(self, h: torch.Tensor, chunks: list[_Chunk]) -> torch.Tensor:
        for layer, qkv in zip(self.model.encoder.layer, self.qkv, strict=True):
            heads = layer.attention.self.num_attention_heads
            head_size = layer.attention.self.attention_head_size
            projected = qkv(h)
            context = []
            for c in chunks:
                part = projected[c.start : c.stop]
                if c.index is not None:  # pad this chunk's rows to its longest (zeros: finite)
                    padded = part.new_zeros(c.rows * c.length, part.shape[-1])
                    part = padded.index_copy_(0, c.index, part)
                q, k, v = part.view(c.rows, c.length, 3, heads, head_size).permute(2, 0, 3, 1, 4).unbind(0)
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=c.mask)
                ctx = ctx.transpose(1, 2).reshape(c.rows * c.length, heads * head_size)
                context.append(ctx if c.index is None else ctx.index_select(0, c.index))
            ctx = context[0] if len(context) == 1 else torch.cat(context)
            attn = layer.attention.output  # as the padded forward: LayerNorm(dense(x) + residual)
            h = attn.LayerNorm(attn.dense(ctx) + h)
            h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)
        return h


def unpad_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` wrapped in :class:`UnpaddedEncoder` where :func:`can_unpad` allows, else as it is."""
    why = can_unpad(model)
    if why is not None:
        log.debug("padded forward kept: %s", why)
        return model
    return UnpaddedEncoder(model).eval()
