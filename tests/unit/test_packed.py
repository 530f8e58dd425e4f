"""The packed graph: merged batches of mixed lengths in one pass (engine/packed.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedkit import Embedder
from embedkit.engine.graph import _Pooled, openvino_version
from embedkit.engine.packed import _Packed, packed_inputs, packed_unavailable, position_offset
from embedkit.models import load_text_model
from embedkit.testing import build_tiny_bert

TEXTS = [
    "a",
    "the cat sat on the mat and looked at the garden for a while",
    "hello world",
    "a much longer text about embeddings, servers, batches and the lengths of inputs in them",
    "short one",
    "two words",
    "the quick brown fox jumps over the lazy dog",
]


def _ids(lengths: list[int]) -> list[np.ndarray]:
    return [np.arange(100 + 10 * i, 100 + 10 * i + n, dtype=np.int32) for i, n in enumerate(lengths)]


def test_packed_inputs_place_every_token_once_and_map_it_back():
    lengths = [3, 7, 2, 40, 1, 5, 30]
    feeds = packed_inputs(_ids(lengths), offset=2)
    tokens = sum(lengths)
    assert feeds["input_ids"].tolist() == np.concatenate(_ids(lengths)).tolist()
    # positions restart at the offset for each text
    assert feeds["position_ids"].tolist() == [p + 2 for n in lengths for p in range(n)]
    a, b, rows_b, seg_b = feeds["index_a"], feeds["index_b"], feeds["rows_b"], feeds["seg_b"]
    # the longest text alone; the six short ones several to a 32-wide attention row, first fit,
    # longest first: cells 40 x 40 + 2 x 32 x 32 = 3648 (one to a row, padded to 30: 6 x 900)
    assert a.shape == (1, 40) and b.shape == (6, 30) and rows_b.shape == seg_b.shape == (2, 32)
    flat = np.concatenate([a.ravel(), rows_b.ravel()])  # the attention rows
    real = flat[flat < tokens]
    assert sorted(real.tolist()) == list(range(tokens))  # each token once, padding points past the end
    assert (flat[feeds["back"]] == np.arange(tokens)).all()  # back finds each token's slot
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pooled = [*a, *b]  # the pooling rows: one text each
    for text, row in enumerate(feeds["order"]):  # order finds each text's pooling row
        got = pooled[row][pooled[row] < tokens]
        assert got.tolist() == list(range(starts[text], starts[text] + lengths[text]))
    for k, row in enumerate(b):  # the short text in pooling row k fills the slots marked k
        assert sorted(rows_b[seg_b == k].tolist()) == row[row < tokens].tolist()
    assert ((seg_b == -1) == (rows_b == tokens)).all()
    # 30 opens row 0, 7 row 1 (37 > 32), 5 and 3 join row 1, 2 fills row 0 to 32, 1 goes to row 1
    assert [sorted(set(r[r >= 0].tolist())) for r in seg_b] == [[1, 5], [0, 2, 3, 4]]


def test_short_texts_that_cannot_share_a_row_keep_one_each():
    """Texts of 17 tokens never share a row of 32: the short group stays one text to a row,
    padded to its longest, as wide rows would cost more."""
    feeds = packed_inputs(_ids([17] * 6 + [60]))
    assert feeds["index_a"].shape == (1, 60)
    assert feeds["rows_b"].shape == (6, 17) and (feeds["rows_b"] == feeds["index_b"]).all()
    assert feeds["seg_b"].tolist() == [[k] * 17 for k in range(6)]


def test_packed_inputs_one_text_and_the_attention_budget():
    one = packed_inputs(_ids([4]))
    assert one["index_a"].tolist() == [[0, 1, 2, 3]]
    assert one["index_b"].tolist() == one["rows_b"].tolist() == [[4]]  # no short text: one empty slot
    assert one["seg_b"].tolist() == [[-1]] and one["order"].tolist() == [0]
    # query-key cells: 40 x 40 + 2 x 32 x 32 = 3648
    assert packed_inputs(_ids([3, 7, 2, 40, 1, 5, 30]), max_attention_cells=3648) is not None
    assert packed_inputs(_ids([3, 7, 2, 40, 1, 5, 30]), max_attention_cells=3647) is None


@pytest.mark.parametrize(
    ("arch", "pooling"),
    [
        ("bert", "mean"),
        ("bert", "cls"),
        ("bert", "lasttoken"),
        ("bert", "weightedmean"),
        ("bert", "mean_sqrt_len"),
        ("xlm-roberta", "mean"),
    ],
)
@pytest.mark.parametrize("block", [32, 10_000])  # short texts sharing rows; one to a row
def test_the_packed_forward_equals_the_padded_one(tmp_path, monkeypatch, arch, pooling, block):
    """The packed module, run by torch, against the padded graph's module on the same model, with
    a Dense layer after pooling: within 1e-5 for every pooling but max (which it refuses), with the
    short texts sharing attention rows and (rows too wide to pay) one to a row."""
    monkeypatch.setattr("embedkit.engine.packed.BLOCK_WIDTH", block)
    path = build_tiny_bert(tmp_path / "m", arch=arch, pooling=pooling, max_seq_length=64)
    model = load_text_model(path)
    torch.manual_seed(0)
    dense = [torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh())]
    tok = Embedder(model, device="cpu", backend="torch").tokenize(TEXTS)
    with torch.inference_mode():
        packed = _Packed(model.transformer, pooling, dense).eval()
        feeds = packed_inputs(tok.ids, position_offset(model.transformer))
        assert feeds["rows_b"].shape[1] == (32 if block == 32 else feeds["index_b"].shape[1])
        got = packed(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        padded = _Pooled(model.transformer, pooling, dense, False).eval()
        width = int(tok.lengths.max())
        ids = torch.full((len(tok), width), model.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(tok), width), dtype=torch.long)
        for i, row in enumerate(tok.ids):
            ids[i, : len(row)] = torch.from_numpy(row.astype(np.int64))
            mask[i, : len(row)] = 1
        expected = padded(ids, mask).numpy()
    assert got.shape == (len(TEXTS), 16)
    assert float(np.abs(got - expected).max()) <= 1e-5


def test_what_has_no_packed_graph(tmp_path):
    assert packed_unavailable(load_text_model(build_tiny_bert(tmp_path / "b")).transformer, "max") == (
        "max pooling"
    )
    mpnet = load_text_model(build_tiny_bert(tmp_path / "m", arch="mpnet")).transformer
    assert "model type 'mpnet'" in packed_unavailable(mpnet, "mean")
    # only servers ask for it, and only auto picks runtimes per batch
    emb = Embedder(str(build_tiny_bert(tmp_path / "t")), device="cpu", backend="torch", packed=True)
    assert emb.packed_path is None and emb.open_packed() is None
    assert emb.describe()["merged_batches"].startswith("length groups: backend torch runs every batch")
    assert emb.embed_packed(emb.tokenize(TEXTS)) is None


def _needs_openvino() -> None:
    if openvino_version() is None:
        pytest.skip("OpenVINO is not installed (the openvino extra; make install brings it)")


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_merged_batches_run_packed_on_openvino_within_1e5(tmp_path, arch):
    """Exported and compiled as a server does it: a merged batch of mixed lengths comes back in
    one pass, in its rows' order, within 1e-5 of torch; with its bf16 kind, min cosine >= 0.99."""
    _needs_openvino()
    from embedkit.engine.packed import PackedSession
    from embedkit.server.batcher import adopt_packed, embed_merged

    path = build_tiny_bert(tmp_path / "m", arch=arch, max_seq_length=64)
    reference = Embedder(str(path), device="cpu", backend="torch")
    tok = reference.tokenize(TEXTS)
    expected = reference.embed_tokenized(tok)
    emb = Embedder(str(path), device="cpu", backend="auto", packed=True)
    assert emb.packed_path is not None and emb.packed_path.is_file()
    session = emb.open_packed()
    assert isinstance(session, PackedSession)
    got = emb.embed_packed(tok, session=session)
    assert float(np.abs(got - expected).max()) <= 1e-5
    kept = adopt_packed(emb, session)  # measured: either way it says what it measured
    assert emb.describe()["merged_batches"].startswith(
        "packed on OpenVINO (f32)" if kept else "length groups"
    )
    runs = []

    class Counted:  # the kept session, counting its passes
        offset, precision, label = session.offset, session.precision, session.label

        def run(self, feeds):
            runs.append(len(feeds["order"]))
            return session.run(feeds)

    emb.packed = Counted()
    emb.forward_cost_tokens = 1  # whatever was measured, these texts form several length groups
    merged = embed_merged(emb, tok, 10_000, dimensions=8)
    assert runs == [len(TEXTS)]  # one pass for the whole merged batch
    np.testing.assert_allclose(merged, reference.embed_tokenized(tok, dimensions=8), atol=1e-5)
    # one text, and texts of one length (the second attention group empty): no NaN, same vectors
    for idx in ([1], [2, 2, 2], [0, 4, 5]):
        part = tok.select(idx)
        got = emb.embed_packed(part, session=session)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, reference.embed_tokenized(part), atol=1e-5)
    # a second engine finds the graph in the cache instead of exporting it again
    again = Embedder(str(path), device="cpu", backend="auto", packed=True)
    assert again.packed_path == emb.packed_path


def test_a_bf16_engine_compiles_the_packed_graph_in_bf16(tmp_path):
    """bf16 engines run their graph on OpenVINO in bf16, and so their packed graph: min cosine
    >= 0.99 against fp32 torch, as for the padded graph."""
    _needs_openvino()
    from bench.report import cosine_stats

    from embedkit.engine.device import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16/amx) for OpenVINO")
    path = build_tiny_bert(tmp_path / "m", max_seq_length=64)
    reference = Embedder(str(path), device="cpu", backend="torch")
    tok = reference.tokenize(TEXTS)
    emb = Embedder(str(path), device="cpu", backend="auto", precision="bf16", packed=True)
    session = emb.open_packed()
    assert session is not None and session.precision == "bf16"
    got = emb.embed_packed(tok, session=session)
    assert cosine_stats(reference.embed_tokenized(tok), got)["min_cosine"] >= 0.99


def test_a_failing_packed_graph_falls_back_to_length_groups_for_good(tmp_path, caplog):
    """The packed graph is a speed-up: when it fails on a batch, that batch and every later one run
    in length groups (same vectors), and /info's merged_batches says why."""
    from embedkit.server.batcher import embed_merged

    class Broken:
        offset = 0
        precision = "f32"
        label = "OpenVINO"

        def run(self, feeds):
            raise RuntimeError("out of luck")

    emb = Embedder(str(build_tiny_bert(tmp_path / "m", max_seq_length=64)), device="cpu", backend="torch")
    tok = emb.tokenize(TEXTS)
    expected = embed_merged(emb, tok, 10_000)
    emb.packed = Broken()
    with caplog.at_level("WARNING", logger="embedkit.server"):
        got = embed_merged(emb, tok, 10_000)
    np.testing.assert_array_equal(got, expected)
    assert emb.packed is None
    assert emb.describe()["merged_batches"].startswith("length groups: the packed graph failed")
    assert "RuntimeError: out of luck" in caplog.text
