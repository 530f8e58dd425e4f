"""The packed graph: one forward pass over texts of mixed lengths, with no padding in the dense layers.

A server merges up to 32 requests in arrival order, so a merged batch holds texts of every length.
Padded to its longest text, it spends most of its GEMMs on padding; cut into length groups (what
the server did before), it makes 3-4 passes where the offline engine, with every text sorted by
length, makes one, and a pass of a few texts costs more per text than one of 32 (the weights
stream through the caches once per pass). The packed graph runs the batch's real tokens as one
``[tokens, hidden]`` matrix through every dense layer, and pads only for attention: the longest
texts one to a row (padded to the longest of them), the short ones several to a row of at least
:data:`BLOCK_WIDTH` slots, each query seeing its own text's keys only. Replayed in arrival order on
the AMX Xeon, the server's batches ran at 0.83-0.85x of the offline engine cut into length groups,
and at 0.97-1.03x packed on OpenVINO.

Inputs (built by :func:`packed_inputs`): ``input_ids`` and ``position_ids`` ``[tokens]``;
``index_a`` ``[rows, longest]``, the longest texts one to a row, each row the packed positions of
one text's tokens padded with ``tokens`` (an extra zero row); ``index_b`` the same for the short
texts (pooling reads it); ``rows_b`` and ``seg_b`` ``[rows, width]``, the short texts several to a
row for attention (at least :data:`BLOCK_WIDTH` wide), with ``seg_b`` naming the text each slot
holds (-1: empty), so attention stays within a text; ``back`` ``[tokens]``, each token's place in
``index_a``'s rows and ``rows_b``'s laid end to end; ``order`` ``[texts]``, each text's row among
``index_a``'s and ``index_b``'s. Output ``sentence_embedding`` ``[texts, dim]``: pooled (with the
model's own pooling code, on the one-text-per-row layout), then the Dense layers; not normalised,
as the padded graph.

Same arithmetic as the padded forward, so fp32 agrees with it within float rounding (tests hold
it within 1e-5 of sentence-transformers). Covers what :func:`embedkit.engine.unpad.can_unpad`
covers (BERT, RoBERTa, XLM-RoBERTa with absolute positions) and every pooling but ``max``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedkit.engine.graph import (
    GRAPH_FILE,
    OPSET,
    GraphKey,
    OpenVINOModel,
    find_graph,
    graph_outputs,
    place_graph,
)
from embedkit.engine.unpad import can_unpad
from embedkit.models import cache_dir
from embedkit.models.pooling import pool

log = logging.getLogger(__name__)

# Bump when what the packed graph computes, or its inputs, change.
PACKED_FORMAT = 2
# The short texts' attention rows are at least this wide, several texts to a row. On the AMX Xeon
# (2026-12-05, the server's 47 batches of the bench's 1,500 texts, five alternating rounds) rows
# of 32 took 3.00-3.31 s against 3.23-3.62 s with one short text per row; 16 and 64 gained less
# (a few hundred attention products of 40 x 40 cost more than fewer, fuller ones).
BLOCK_WIDTH = 32
# What one more attention row costs beyond its query-key cells, in cells: OpenVINO's profile of a
# 32-text batch (f32, default model) gave 1.35 ms per layer for 2 rows of 256 and 1.1 ms for 30
# rows of 40, i.e. ~1e-5 ms per cell and ~0.02 ms per row.
ROW_COST = 2000
# RoBERTa-style embeddings count positions from the padding id + 1.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta")


def packed_unavailable(transformer: torch.nn.Module, pooling: str) -> str | None:
    """Why ``transformer`` with ``pooling`` has no packed graph, or ``None`` when it has one."""
    why = can_unpad(transformer)
    if why is not None:
        return why
    if pooling == "max":
        return "max pooling"
    return None


def packed_key(content_hash: str, pooling: str, dense_layers: int) -> GraphKey:
    """What a model's packed graph must have been made from; its digest names the graph's folder
    (beside the padded graph's, baked or in the cache)."""
    return GraphKey(
        content_hash=content_hash,
        precision="fp32",
        outputs="packed " + graph_outputs(pooling, dense_layers),
        runtime="openvino",
        format=PACKED_FORMAT,
    )


def find_or_export_packed(model: Any, content_hash: str) -> Path:
    """The packed graph of ``model`` (a loaded text model whose weights hash to ``content_hash``)
    baked next to its weights or in the cache, else exported into the cache now: from its fp32
    transformer, before an engine fuses or casts it."""
    key = packed_key(content_hash, model.pooling, len(model.dense))
    found = find_graph(key, model.path)
    if found is not None:
        return found
    return export_packed(model.transformer, model.pooling, model.dense, key, cache_dir() / "graphs")


def position_offset(transformer: torch.nn.Module) -> int:
    """The position id of a text's first token: 0 for BERT, the padding id + 1 for RoBERTa's kind."""
    config = transformer.config
    if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
        return int(getattr(config, "pad_token_id", 1)) + 1
    return 0


class _Packed(torch.nn.Module):
    """The model on packed tokens (see the module's docstring); exported, never run in serving."""

    def __init__(self, transformer: torch.nn.Module, pooling: str, dense: list[torch.nn.Module]) -> None:
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.dense = torch.nn.ModuleList(dense)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        index_a: torch.Tensor,
        index_b: torch.Tensor,
        rows_b: torch.Tensor,
        seg_b: torch.Tensor,
        back: torch.Tensor,
        order: torch.Tensor,
    ) -> torch.Tensor:
        model = self.transformer
        tokens = input_ids.shape[0]
        h = model.embeddings(
            input_ids=input_ids[None],
            position_ids=position_ids[None],
            token_type_ids=torch.zeros_like(input_ids)[None],
        )[0]
        low = torch.finfo(h.dtype).min
        # attention: the long texts one to a row (padding masked), the short ones several to a
        # row (each query sees the keys of its own text only)
        attention = [
            (index_a, (index_a >= tokens).to(h.dtype)[:, None, None, :] * low),
            (rows_b, (seg_b[:, :, None] != seg_b[:, None, :]).to(h.dtype)[:, None, :, :] * low),
        ]
        for layer in model.encoder.layer:
            att = layer.attention.self
            heads, size = att.num_attention_heads, att.attention_head_size
            # one GEMM for query, key and value (the stacked weights fold into one constant)
            weight = torch.cat([att.query.weight, att.key.weight, att.value.weight])
            bias = torch.cat([att.query.bias, att.key.bias, att.value.bias])
            qkv = torch.nn.functional.linear(h, weight, bias)
            qkv = torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])])  # the padding slot
            context = []
            for index, add in attention:
                rows, width = index.shape[0], index.shape[1]
                q, k, v = qkv[index].view(rows, width, 3, heads, size).permute(2, 0, 3, 1, 4).unbind(0)
                scores = torch.matmul(q, k.transpose(-1, -2)) * (size**-0.5) + add
                ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
                context.append(ctx.transpose(1, 2).reshape(rows * width, heads * size))
            ctx = torch.cat(context)[back]
            out = layer.attention.output  # as the padded forward: LayerNorm(dense(x) + residual)
            h = out.LayerNorm(out.dense(ctx) + h)
            h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)
        h = torch.cat([h, h.new_zeros(1, h.shape[1])])
        vecs = torch.cat(
            [pool(self.pooling, h[index], (index < tokens).long()) for index in (index_a, index_b)]
        )
        vecs = vecs[order]
        for layer in self.dense:
            vecs = layer(vecs)
        return vecs


def packed_inputs(
    ids: list[np.ndarray], offset: int = 0, max_attention_cells: int | None = None
) -> dict[str, np.ndarray] | None:
    """The packed graph's inputs for texts ``ids`` (one token-id array each): the longest texts
    one to an attention row, the shortest several to a row where that takes fewer query-key cells
    than one to a row, cut where the cells are fewest (estimated for the shared rows).
    ``None`` when those cells (per head) exceed ``max_attention_cells``."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    n, tokens = len(ids), int(lengths.sum())
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    sorted_rows = np.argsort(lengths, kind="stable")
    sl = lengths[sorted_rows]
    # cut c, priced in query-key cells plus ROW_COST per row: the rest one to a row padded to the
    # longest (the longest text always stands alone); the shortest c texts several to a row (at
    # least ceil(tokens / width) rows) or, where that costs more, one to a row padded to the
    # longest of them (texts of 17-31 tokens never share a row of 32)
    longest_b = np.concatenate([[0], sl[:-1]])
    width_b = np.maximum(BLOCK_WIDTH, longest_b)
    short_tokens = np.concatenate([[0], np.cumsum(sl)[:-1]])
    shared = -(-short_tokens // width_b) * (width_b**2 + ROW_COST)
    one_each = np.arange(n) * (longest_b**2 + ROW_COST)
    long_rows = (n - np.arange(n)) * (sl[-1] ** 2 + ROW_COST)
    cut = int(np.argmin(long_rows + np.minimum(shared, one_each)))

    def layout(rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.full((1, 1), tokens, dtype=np.int64)
        width = np.arange(int(lengths[rows].max()))
        return np.where(
            width[None, :] < lengths[rows][:, None], starts[rows][:, None] + width[None, :], tokens
        )

    group_a, group_b = sorted_rows[cut:], sorted_rows[:cut]  # b may be empty
    index_a, index_b = layout(group_a), layout(group_b)
    rows_b, seg_b = _block_rows(group_b, lengths, starts, int(width_b[cut]) if cut else 1, tokens)
    if len(rows_b) * (rows_b.shape[1] ** 2 + ROW_COST) >= one_each[cut]:
        # sharing rows saves nothing here: the best cut with every text one to a row
        cut = int(np.argmin(long_rows + one_each))
        group_a, group_b = sorted_rows[cut:], sorted_rows[:cut]
        index_a, index_b = layout(group_a), layout(group_b)
        rows_b = index_b
        seg_b = np.where(index_b < tokens, np.arange(len(index_b))[:, None], -1)
    cells = index_a.size * index_a.shape[1] + rows_b.size * rows_b.shape[1]
    if max_attention_cells is not None and cells > max_attention_cells:
        return None
    flat = np.concatenate([index_a.ravel(), rows_b.ravel()])
    real = np.flatnonzero(flat < tokens)
    back = np.empty(tokens, dtype=np.int64)
    back[flat[real]] = real
    order = np.empty(n, dtype=np.int64)
    order[group_a] = np.arange(len(group_a))
    order[group_b] = index_a.shape[0] + np.arange(len(group_b))
    first = np.repeat(starts[:-1], lengths)
    return {
        "input_ids": np.concatenate(ids).astype(np.int64),
        "position_ids": np.arange(tokens, dtype=np.int64) - first + offset,
        "index_a": index_a,
        "index_b": index_b,
        "rows_b": rows_b,
        "seg_b": seg_b,
        "back": back,
        "order": order,
    }


def _block_rows(
    texts: np.ndarray, lengths: np.ndarray, starts: np.ndarray, width: int, tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """``texts`` laid several to a row of ``width`` slots, first fit, longest first: each slot's
    packed position (``tokens``: empty) and the index in ``texts`` of the text it holds (-1)."""
    fill = np.zeros(max(1, len(texts)), dtype=np.int64)
    used = 0
    place = []
    for k in sorted(range(len(texts)), key=lambda k: -lengths[texts[k]]):
        size = int(lengths[texts[k]])
        row = int(np.argmax(fill[:used] + size <= width)) if used else 0
        if not used or fill[row] + size > width:
            row, used = used, used + 1
        place.append((k, row, int(fill[row])))
        fill[row] += size
    rows = np.full((max(1, used), width), tokens, dtype=np.int64)
    seg = np.full((max(1, used), width), -1, dtype=np.int64)
    for k, row, at in place:
        t = texts[k]
        size = int(lengths[t])
        rows[row, at : at + size] = np.arange(starts[t], starts[t] + size)
        seg[row, at : at + size] = k
    return rows, seg


def export_packed(
    transformer: torch.nn.Module,
    pooling: str,
    dense: list[torch.nn.Module],
    key: GraphKey,
    dest_root: Path,
) -> Path:
    """Export the fp32 CPU ``transformer`` (+ pooling, Dense) as a packed graph to
    ``dest_root/<key>/model.onnx`` (written aside and renamed into place). Returns its path."""
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    target = dest_root / key.digest
    wrapper = _Packed(transformer, pooling, dense).eval()
    # Both groups, with padding in each and two texts in a short row, so the trace keeps every path.
    vocab = int(getattr(transformer.config, "vocab_size", 100))
    rng = np.random.default_rng(0)
    ids = [rng.integers(min(5, vocab - 1), vocab, size=n) for n in (3, 4, 10, 18, 20, 38, 40)]
    feeds = packed_inputs(ids, position_offset(transformer))
    assert feeds is not None
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest_root))
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                tuple(torch.from_numpy(v) for v in feeds.values()),
                str(tmp / GRAPH_FILE),
                input_names=list(feeds),
                output_names=["sentence_embedding"],
                dynamic_axes={
                    "input_ids": {0: "tokens"},
                    "position_ids": {0: "tokens"},
                    "index_a": {0: "rows_a", 1: "width_a"},
                    "index_b": {0: "texts_b", 1: "width_b"},
                    "rows_b": {0: "rows_b", 1: "block_width"},
                    "seg_b": {0: "rows_b", 1: "block_width"},
                    "back": {0: "tokens"},
                    "order": {0: "texts"},
                    "sentence_embedding": {0: "texts"},
                },
                opset_version=OPSET,
                dynamo=False,
            )
        place_graph(tmp, target, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported the packed graph in %.1fs to %s", time.perf_counter() - t0, target)
    return target / GRAPH_FILE


class PackedSession(OpenVINOModel):
    """The packed graph compiled by OpenVINO in ``precision`` (``f32`` or ``bf16``):
    ``run(feeds)`` -> float32 vectors; ``offset`` is the model's first position id
    (:func:`position_offset`), which :func:`packed_inputs` needs."""

    def __init__(self, path: Path, threads: int, precision: str, offset: int) -> None:
        super().__init__(path, threads, precision)
        self.offset = offset
        self._output = self._compiled.output("sentence_embedding")

    def run(self, feeds: dict[str, Any]) -> np.ndarray:
        return self._infer(feeds, (self._output,))[0]
