"""The engine on a tiny random model: parity, ordering, budgets, truncation, errors, OOM splitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedkit import Embedder
from embedkit.engine import plan_batches
from embedkit.errors import ConfigError, DeviceError, InputError, InputTooLongError, OutOfMemoryError
from tests.parity_texts import parity_texts


def _st_encode(path, texts, **kw):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(texts, batch_size=32, **kw)


def test_fp32_matches_sentence_transformers_on_tiny_model(tiny_model, tiny_embedder):
    texts = parity_texts()
    ours = tiny_embedder.encode(texts)
    ref = _st_encode(tiny_model, texts)
    assert ours.shape == ref.shape == (len(texts), 32)
    assert np.abs(ours - ref).max() <= 1e-5


def test_plain_hf_directory_uses_mean_pooling_like_sentence_transformers(tmp_path):
    from embedkit.testing import build_tiny_bert

    path = build_tiny_bert(tmp_path / "hf", layout="hf")
    emb = Embedder(str(path), device="cpu")
    assert emb.model.pooling == "mean" and emb.normalize is False
    texts = ["hello world", "the cat sat on the mat"]
    assert np.abs(emb.encode(texts) - _st_encode(path, texts)).max() <= 1e-5


def test_bge_named_plain_directory_gets_cls_pooling_and_normalisation(tmp_path):
    from embedkit.testing import build_tiny_bert

    path = build_tiny_bert(tmp_path / "bge-small-test", layout="hf")
    emb = Embedder(str(path), device="cpu")
    assert (emb.model.pooling, emb.normalize) == ("cls", True)
    assert Embedder(str(path), device="cpu", pooling="max").model.pooling == "max"


def test_input_order_is_kept_whatever_the_batching(tiny_embedder):
    texts = [("word " * (i % 17 + 1)).strip() for i in range(100)]
    whole = tiny_embedder.encode(texts)
    one_by_one = np.stack([tiny_embedder.encode([t])[0] for t in texts])
    assert np.abs(whole - one_by_one).max() <= 1e-5


def test_small_token_budget_gives_same_vectors_as_large(tiny_model):
    texts = [("hello world " * (i % 9 + 1)).strip() for i in range(60)]
    small = Embedder(str(tiny_model), device="cpu", max_batch_tokens=40).encode(texts)
    large = Embedder(str(tiny_model), device="cpu", max_batch_tokens=100_000).encode(texts)
    assert np.abs(small - large).max() <= 1e-5


def test_plan_batches_respects_budget_and_covers_every_index():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=1000)
    batches = plan_batches(lengths, max_batch_tokens=2048)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1000))
    for b in batches:
        assert len(b) * lengths[b].max() <= 2048


def test_plan_batches_single_input_over_budget_is_a_batch_of_one():
    batches = plan_batches(np.array([5000, 3, 3]), max_batch_tokens=100)
    assert batches[0].tolist() == [0]


def test_truncation_is_counted(tiny_embedder):
    res = tiny_embedder.embed(["hello", "hello world " * 50])
    assert res.truncated.tolist() == [False, True]
    assert res.token_counts[1] == tiny_embedder.max_seq_length


def test_truncate_false_names_index_and_token_count(tiny_embedder):
    with pytest.raises(InputTooLongError) as err:
        tiny_embedder.encode(["short", "ok", "hello world " * 50], truncate=False)
    assert "inputs[2]" in str(err.value) and "102 tokens" in str(err.value)
    assert err.value.context["index"] == 2


@pytest.mark.parametrize(
    ("bad", "index", "words"),
    [
        (["ok", ""], 1, "empty string"),
        (["ok", "fine", None], 2, "got null"),
        ([3.5], 0, "got float"),
        (["a", ["nested"]], 1, "got list"),
    ],
)
def test_bad_inputs_raise_naming_the_index(tiny_embedder, bad, index, words):
    with pytest.raises(InputError) as err:
        tiny_embedder.encode(bad)
    assert f"inputs[{index}]" in str(err.value) and words in str(err.value)


def test_matryoshka_dimensions_truncate_then_renormalise(tiny_embedder):
    full = tiny_embedder.encode(["hello world"])
    cut = tiny_embedder.encode(["hello world"], dimensions=8)
    assert cut.shape == (1, 8)
    assert np.isclose(np.linalg.norm(cut), 1.0, atol=1e-5)
    ref = full[:, :8] / np.linalg.norm(full[:, :8])
    assert np.abs(cut - ref).max() <= 1e-6
    with pytest.raises(InputError, match="dimensions"):
        tiny_embedder.encode(["x"], dimensions=33)


def test_normalize_false_gives_raw_pooled_vectors(tiny_embedder):
    raw = tiny_embedder.encode(["hello world"], normalize=False)
    assert not np.isclose(np.linalg.norm(raw), 1.0)


def test_prompt_name_prepends_prompt(tmp_path):
    from embedkit.testing import build_tiny_bert

    path = build_tiny_bert(tmp_path / "p", prompts={"query": "query: "})
    emb = Embedder(str(path), device="cpu")
    with_prompt = emb.encode(["hello"], prompt_name="query")
    assert np.abs(with_prompt - emb.encode(["query: hello"])).max() <= 1e-6
    with pytest.raises(InputError, match="not defined"):
        emb.encode(["hello"], prompt_name="passage")
    with pytest.raises(ConfigError):
        Embedder(str(path), device="cpu", prompt_name="nope")


def test_encode_iter_streams_in_order(tiny_embedder):
    texts = [f"text number {i} " + "hello " * (i % 7) for i in range(250)]
    streamed = np.concatenate(list(tiny_embedder.encode_iter(iter(texts), chunk_size=64)))
    assert np.abs(streamed - tiny_embedder.encode(texts)).max() <= 1e-6


def test_encode_iter_error_names_global_index(tiny_embedder):
    texts = ["fine"] * 70 + [""]
    with pytest.raises(InputError, match=r"inputs\[70\]"):
        list(tiny_embedder.encode_iter(texts, chunk_size=32))


def test_out_of_memory_splits_the_batch_and_loses_nothing(tiny_model):
    emb = Embedder(str(tiny_model), device="cpu", max_batch_tokens=10_000, backend="torch")
    texts = [f"hello world {i}" for i in range(40)]
    expected = emb.encode(texts)
    real_forward = emb._transformer.forward

    def forward_that_ooms_on_big_batches(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[0] > 8:
            raise MemoryError("simulated: batch too large for this device")
        return real_forward(*args, **kwargs)

    emb._transformer.forward = forward_that_ooms_on_big_batches
    got = emb.encode(texts)
    assert np.abs(got - expected).max() <= 1e-6
    assert emb.stats.oom_splits >= 2
    assert emb.max_batch_tokens < 10_000


def test_out_of_memory_on_a_single_input_is_a_clear_error(tiny_model):
    emb = Embedder(str(tiny_model), device="cpu", backend="torch")

    def always_oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    emb._transformer.forward = always_oom
    with pytest.raises(OutOfMemoryError, match="input 0"):
        emb.encode(["hello"])


def test_out_of_memory_while_padding_ahead_splits_the_batch_too(tiny_model):
    # The next batch is padded (and moved to the device) in a helper thread; running out of memory
    # there splits the batch like running out of memory in the model does.
    emb = Embedder(str(tiny_model), device="cpu", max_batch_tokens=10_000, backend="torch")
    texts = [f"hello world {i}" for i in range(40)]
    expected = emb.encode(texts)
    real_to_tensors = emb._to_tensors

    def to_tensors_that_ooms_on_big_batches(ids, device=None):
        if len(ids) > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_to_tensors(ids, device)

    emb._to_tensors = to_tensors_that_ooms_on_big_batches
    assert np.abs(emb.encode(texts) - expected).max() <= 1e-6
    assert emb.stats.oom_splits >= 2


def test_fp16_on_cpu_is_refused_with_advice(tiny_model):
    with pytest.raises(DeviceError, match="bf16"):
        Embedder(str(tiny_model), device="cpu", precision="fp16")


def test_unknown_precision_is_a_config_error(tiny_model):
    with pytest.raises(ConfigError, match="precision"):
        Embedder(str(tiny_model), device="cpu", precision="fp8")


def test_token_embeddings_are_unpooled(tiny_embedder):
    out = tiny_embedder.token_embeddings(["hello world", "a"])
    assert out[0].shape == (4, 32) and out[1].shape == (3, 32)


def test_replicas_on_several_devices_give_identical_vectors(tiny_model, tiny_embedder):
    # Two CPU replicas exercise the multi-device path (one thread per replica) without a GPU.
    texts = [("hello world " * (i % 11 + 1)).strip() for i in range(120)]
    multi = Embedder(str(tiny_model), device="cpu,cpu", max_batch_tokens=64)
    assert len(multi.devices) == 2 and multi.describe()["device"] == "cpu,cpu"
    assert np.abs(multi.encode(texts) - tiny_embedder.encode(texts)).max() <= 1e-6
    assert multi.stats.batches > 2


def test_mixed_device_types_are_refused(tiny_model):
    with pytest.raises((ConfigError, DeviceError)):
        Embedder(str(tiny_model), device="cpu,cuda:0")


def test_cpu_fusion_replaces_linear_layers_and_keeps_vectors(tiny_model, monkeypatch):
    from embedkit.engine import build_embedder
    from embedkit.engine.cpu_fusion import FusedLinear
    from embedkit.settings import EngineSettings

    fused = Embedder(str(tiny_model), device="cpu")
    assert fused.fused_modules > 0
    assert any(isinstance(m, FusedLinear) for m in fused._transformer.modules())
    monkeypatch.setenv("EMBEDKIT_CPU_FUSION", "0")
    assert Embedder(str(tiny_model), device="cpu").fused_modules > 0  # the engine reads no environment
    # the settings read EMBEDKIT_CPU_FUSION and pass cpu_fusion=False in
    plain = build_embedder(EngineSettings.resolve({"model": str(tiny_model), "device": "cpu"}))
    assert plain.cpu_fusion is False
    assert plain.fused_modules == 0
    assert not any(isinstance(m, FusedLinear) for m in plain._transformer.modules())
    texts = ["hello world", "the cat sat on the mat " * 5, "a"]
    assert np.abs(fused.encode(texts) - plain.encode(texts)).max() <= 1e-5


def test_cpu_fusion_is_left_off_where_onednn_refuses_the_dtype(monkeypatch):
    """An AVX2-only CPU has no oneDNN bf16 linear: the model keeps torch's layers instead of failing."""
    from embedkit.engine import cpu_fusion

    layer = torch.nn.Sequential(torch.nn.Linear(8, 4)).to(torch.bfloat16)

    def refuse(*args):
        raise RuntimeError("could not create a primitive descriptor for the inner product")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    assert cpu_fusion.fuse_for_cpu(layer) == 0
    assert type(layer[0]) is torch.nn.Linear


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "mpnet"])
def test_cut_texts_report_their_uncut_length_without_a_second_tokenisation(tmp_path, arch):
    """A cut text's original length comes from its overflowing pieces; it must equal what the
    uncut tokenizer counts, at the boundary and far past it, and so must the re-tokenising fallback."""
    from embedkit.testing import build_tiny_bert

    emb = Embedder(str(build_tiny_bert(tmp_path / arch, arch=arch, max_seq_length=24)), device="cpu")
    tok = emb.tokenizer
    words = "the cat sat on the mat python reads data 42 times".split()
    texts = [" ".join(words[: i % len(words)] * (1 + i // 3)) or "a" for i in range(40)]
    want = [len(tok._fast_full.encode(t, add_special_tokens=True).ids) for t in texts]
    assert tok._overflow_counts and max(want) > 3 * tok.max_seq_length > min(want)
    for exact in (True, False):
        tok._overflow_counts = exact
        got = tok(texts)
        assert got.original_lengths.tolist() == want
        assert got.truncated.tolist() == [n > tok.max_seq_length for n in want]
        assert got.lengths.max() == tok.max_seq_length


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "mpnet"])
def test_one_text_is_tokenised_as_it_would_be_in_a_batch(tmp_path, arch):
    """A query (one text) skips the Rust thread pool; its ids, lengths and cut must not change."""
    from embedkit.testing import build_tiny_bert

    emb = Embedder(str(build_tiny_bert(tmp_path / arch, arch=arch, max_seq_length=24)), device="cpu")
    texts = ["hello world", "the cat sat on the mat " * 12, "x"]
    together = emb.tokenize(texts)
    for i, text in enumerate(texts):
        alone = emb.tokenize([text])
        assert alone.ids[0].tolist() == together.ids[i].tolist()
        assert alone.lengths[0] == together.lengths[i]
        assert alone.original_lengths[0] == together.original_lengths[i]
        assert alone.truncated[0] == together.truncated[i]
    assert together.truncated.tolist() == [False, True, False]
