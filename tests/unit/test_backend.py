"""Backends: torch, ONNX Runtime, and ``auto`` (ONNX Runtime for the small batches where it measured faster)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from bench.report import cosine_stats

from embedkit import Embedder
from embedkit.engine.backend import (
    COST_SHAPES,
    EVERY_BATCH,
    MAX_PROBE_REPS,
    PROBE_SHAPES,
    Crossover,
    measure_crossover,
    measure_forward_cost,
    resolve_backend,
    second_copy_fits,
)
from embedkit.engine.graph import BAKED_DIR, KEY_FILE, GraphKey, find_graph
from embedkit.errors import ConfigError
from embedkit.models import cache_dir
from embedkit.testing import build_tiny_bert

TEXTS = [
    "hello world",
    "the cat sat on the mat with a dog in the park and read a book",
    "x",
    "running fast " * 40,  # truncated at the model's 32 tokens
    "a small red car",
]


def _st_vectors(path, texts):
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    return ref


# ------------------------------------------------------------------- choosing
def test_backend_names_are_normalised_and_unknown_ones_refused(monkeypatch):
    import embedkit.engine.backend as backend

    monkeypatch.setattr(backend, "DEFAULT_BACKEND", "auto")
    monkeypatch.setenv("EMBEDKIT_BACKEND", "onnxruntime")
    assert resolve_backend(None) == "auto"  # the engine reads no environment
    assert resolve_backend(" ONNXRuntime ") == "onnx"
    assert resolve_backend("ort") == "onnx"
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("OpenVINO") == resolve_backend("ov") == "openvino"
    with pytest.raises(ConfigError, match="backend must be one of auto, torch, onnx, openvino"):
        resolve_backend("tensorrt")


def test_the_backend_variable_is_read_by_the_settings_and_a_flag_beats_it():
    from embedkit.settings import EngineSettings

    env = {"EMBEDKIT_BACKEND": "onnxruntime"}
    assert resolve_backend(EngineSettings.resolve(environ=env).backend) == "onnx"
    assert EngineSettings.resolve({"backend": "torch"}, environ=env).backend == "torch"
    assert (
        resolve_backend(EngineSettings.resolve(environ={"EMBEDKIT_BACKEND": "OpenVINO"}).backend)
        == "openvino"
    )
    assert EngineSettings.resolve(environ={}).backend is None  # Embedder(backend=None): auto


class FakeClock:
    """A clock that only the fake runtimes advance, so the decision is deterministic."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runtime(self, fixed_s: float, per_token_s: float):
        def run(rows: int, tokens: int) -> None:
            self.now += fixed_s + per_token_s * rows * tokens

        return run

    def table(self, times: dict, which: int):
        """A runtime whose pass on ``n`` padded tokens takes ``times[n][which]`` milliseconds."""

        def run(rows: int, tokens: int) -> None:
            self.now += times[rows * tokens][which] * 1e-3

        return run


def test_crossover_keeps_onnx_up_to_the_largest_shape_where_it_won():
    clock = FakeClock()
    # torch: 10 ms fixed + 10 us/token; onnx: 1 ms fixed + 20 us/token -> onnx wins below 900 tokens
    res = measure_crossover(
        clock.runtime(0.010, 10e-6), clock.runtime(0.001, 20e-6), budget_s=100.0, clock=clock
    )
    assert res.max_onnx_tokens == 512  # (8, 64); (32, 64) = 2048 tokens and the bulk 4096 are torch's
    assert [p["tokens"] * p["rows"] for p in res.probes] == [16, 64, 256, 512, 2048, 4096]
    assert "up to 512 padded tokens" in res.describe()


def test_crossover_that_onnx_wins_up_to_the_bulk_shape_routes_every_batch_to_onnx():
    clock = FakeClock()
    res = measure_crossover(
        clock.runtime(0.010, 10e-6), clock.runtime(0.001, 7e-6), budget_s=100.0, clock=clock
    )
    assert res.max_onnx_tokens == EVERY_BATCH and len(res.probes) == len(PROBE_SHAPES)
    assert res.describe() == "onnx for every batch (faster at every probed shape, up to 128x32 tokens)"
    assert Crossover.from_dict(json.loads(json.dumps(res.to_dict()))) == res


def test_a_tie_goes_to_onnx_runtime_and_torch_must_win_by_the_margin():
    clock = FakeClock()
    # torch 3% faster everywhere but the bulk shape, where it is 10% faster: ties up to 32 x 64
    times = {16: (0.97, 1.0), 64: (0.97, 1.0), 256: (0.97, 1.0), 512: (0.97, 1.0), 2048: (0.97, 1.0)}
    times[4096] = (0.90, 1.0)

    res = measure_crossover(clock.table(times, 0), clock.table(times, 1), budget_s=100.0, clock=clock)
    assert res.max_onnx_tokens == 2048 and len(res.probes) == len(PROBE_SHAPES)
    times[4096] = (0.97, 1.0)  # a tie at the bulk shape too: every batch
    res = measure_crossover(clock.table(times, 0), clock.table(times, 1), budget_s=100.0, clock=clock)
    assert res.max_onnx_tokens == EVERY_BATCH
    times[512] = (0.90, 1.0)  # torch clearly faster at 8 x 64 only: one loss does not end the ladder
    res = measure_crossover(clock.table(times, 0), clock.table(times, 1), budget_s=100.0, clock=clock)
    assert res.max_onnx_tokens == EVERY_BATCH and len(res.probes) == len(PROBE_SHAPES)


def test_crossover_stops_after_torch_wins_twice_and_within_its_budget():
    clock = FakeClock()
    res = measure_crossover(clock.runtime(0.001, 0), clock.runtime(0.002, 0), budget_s=100.0, clock=clock)
    assert res.max_onnx_tokens == 0 and len(res.probes) == 2
    assert "torch for every batch" in res.describe()
    clock = FakeClock()
    # a warm-up pass, then passes lasting PROBE_SHAPE_S (2 to 8 of them): torch 4 x 10 ms and onnx
    # 9 x 1 ms on (1, 16), 3 x 40 ms and 8 x 4 ms on (2, 32); (8, 32) is predicted on the line
    # through those two shapes' 49 and 152 ms at 564 ms, which would overrun the 0.3 s budget
    run = clock.runtime(0.0, 0.01 / 16)
    res = measure_crossover(run, clock.runtime(0.0, 0.001 / 16), budget_s=0.3, clock=clock)
    assert [(p["rows"], p["tokens"]) for p in res.probes] == [(1, 16), (2, 32)]
    assert res.seconds == pytest.approx(0.201) and res.seconds <= 0.3
    # the graph won the last shape the budget allowed outright: its verdict carries to the larger ones
    assert res.max_onnx_tokens == EVERY_BATCH
    assert res.describe() == (
        "onnx for every batch (faster at every probed shape, up to 2x32 tokens; "
        "larger ones did not fit the probe budget)"
    )


def test_a_budget_cut_after_a_tie_keeps_torch_for_the_larger_batches():
    clock = FakeClock()
    times = {16: (9.0, 2.0), 64: (12.0, 4.0), 256: (30.0, 29.5)}  # a tie at 8 x 32, then the budget

    res = measure_crossover(clock.table(times, 0), clock.table(times, 1), budget_s=0.45, clock=clock)
    assert [p["rows"] * p["tokens"] for p in res.probes] == [16, 64, 256]
    assert res.max_onnx_tokens == 256
    assert res.describe() == "onnx for batches up to 256 padded tokens, torch above"


def test_the_small_shapes_get_more_timed_passes_than_the_large_ones():
    clock = FakeClock()
    calls: dict[int, int] = {}

    def run(rows: int, tokens: int) -> None:
        calls[rows * tokens] = calls.get(rows * tokens, 0) + 1
        clock.now += 0.1e-3 * rows * tokens

    measure_crossover(run, run, budget_s=100.0, clock=clock)
    # two runtimes, each a warm-up and then as many passes as fit in PROBE_SHAPE_S, 2 to 8
    assert calls[16] == 2 * (1 + MAX_PROBE_REPS)  # 1.6 ms a pass
    assert calls[4096] == 2 * (1 + 2)  # 410 ms a pass


def test_a_second_copy_of_the_weights_must_leave_room():
    gib = 1 << 30
    assert second_copy_fits(1 * gib, available=4 * gib)
    assert not second_copy_fits(2 * gib, available=4 * gib)  # 2.2 GB BGE-M3 on a 4 GiB box


def _measure_three(times):
    """``measure_crossover`` of fake torch, ONNX Runtime and OpenVINO runs, whose milliseconds on a
    shape of ``n`` padded tokens are ``times[n]``."""
    clock = FakeClock()

    run = [clock.table(times, which) for which in range(3)]
    return measure_crossover(run[0], run[1], run_openvino=run[2], budget_s=100.0, clock=clock)


def test_openvino_takes_the_graphs_batches_from_its_first_win_and_onnx_runtime_keeps_those_before():
    # ONNX Runtime fastest on 1-2 texts, OpenVINO from 8 x 32 (as on the AMX Xeon), torch in bulk
    times = {16: (9.0, 2.0, 2.3), 64: (12.0, 4.0, 4.1), 256: (30, 22, 19), 512: (46, 43, 38)}
    times |= {2048: (178, 183, 150), 4096: (250, 370, 290)}
    res = _measure_three(times)
    assert res.max_ort_tokens == 64 and res.max_onnx_tokens == 2048
    assert all("openvino_ms" in p for p in res.probes)
    assert res.describe() == (
        "onnx for batches up to 2048 padded tokens: ONNX Runtime up to 64, OpenVINO (fp32) above; torch above that"
    )
    assert Crossover.from_dict(json.loads(json.dumps(res.to_dict()))) == res
    # torch is weighed against the runtime that would run the shape: OpenVINO, not the faster ONNX
    # Runtime, once OpenVINO has taken over (one route per size)
    times[2048] = (178, 150, 190)
    res = _measure_three(times)
    assert res.max_ort_tokens == 64 and res.max_onnx_tokens == 512


def test_openvino_that_never_wins_or_wins_everything_leaves_one_graph_runtime():
    times = {16: (9.0, 2.0, 2.3), 64: (12.0, 4.0, 4.1), 256: (30, 22, 22), 512: (46, 43, 43)}
    times |= {2048: (178, 183, 183), 4096: (250, 370, 300)}
    res = _measure_three(times)
    assert res.max_ort_tokens is None and res.max_onnx_tokens == 2048  # ties stay on ONNX Runtime
    assert res.describe() == "onnx for batches up to 2048 padded tokens, torch above"
    times = {k: (t, o, v * 0.8) for k, (t, o, v) in times.items()}
    times[4096] = (250, 370, 240)
    res = _measure_three(times)
    assert res.max_ort_tokens == 0 and res.max_onnx_tokens == EVERY_BATCH
    assert res.describe().startswith("onnx for every batch, on OpenVINO (fp32) (faster at every probed shape")
    # OpenVINO beating ONNX Runtime only where torch beats both gives it nothing
    times = {16: (9.0, 2.0, 2.3), 64: (12.0, 4.0, 4.1), 256: (15, 22, 19), 512: (20, 43, 38)}
    res = _measure_three(times)
    assert res.max_onnx_tokens == 64 and res.max_ort_tokens is None


# ------------------------------------------------------------------- parity
@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "mpnet"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_onnx_backend_matches_sentence_transformers_to_1e5(tmp_path, arch, pooling):
    path = build_tiny_bert(tmp_path / "m", arch=arch, pooling=pooling)
    ref = _st_vectors(path, TEXTS)
    emb = Embedder(str(path), device="cpu", backend="onnx")
    got = emb.encode(TEXTS)
    assert emb.stats.onnx_batches == emb.stats.batches >= 1
    assert float(np.abs(got - ref).max()) <= 1e-5
    torch_got = Embedder(str(path), device="cpu", backend="torch").encode(TEXTS)
    assert float(np.abs(torch_got - ref).max()) <= 1e-5


def test_batches_up_to_the_crossover_run_on_onnx_and_larger_ones_on_torch_to_onnx_and_large_ones_to_torch(
    tiny_model,
):
    emb = Embedder(str(tiny_model), device="cpu", backend="onnx", max_batch_tokens=64)
    emb.onnx_max_tokens = 20  # what auto would have measured
    before = emb.stats.onnx_batches, emb.stats.batches
    emb.encode(["hello world"])  # 4 tokens: onnx
    assert emb.stats.onnx_batches == before[0] + 1
    emb.encode(["the cat sat on the mat with a dog in the park"] * 4)  # 4 x 13 tokens: torch
    assert emb.stats.onnx_batches == before[0] + 1 and emb.stats.batches == before[1] + 2
    assert emb.describe()["backend"] == "onnx"


def test_one_text_on_onnx_takes_the_straight_path_with_the_runners_bits(tiny_model):
    """A lone text skips the runner (a serving hot path): same vectors to the bit as the runner's
    batch of one, Matryoshka cut and normalisation options honoured, and counted in the stats."""
    emb = Embedder(str(tiny_model), device="cpu", backend="onnx")
    tok = emb.tokenize(["the cat sat on the mat"])
    for normalize, dims in ((None, None), (False, None), (True, 8)):
        straight = emb.embed_tokenized(tok, normalize=normalize, dimensions=dims)
        via_runner = emb._run(emb._workload(tok), emb._plan(tok), 1, normalize, dims)
        assert straight.shape == via_runner.shape and straight.flags["C_CONTIGUOUS"]
        assert np.array_equal(straight, via_runner)
    before = emb.stats.onnx_batches
    emb.encode(["hello"])
    assert emb.stats.onnx_batches == before + 1
    emb.onnx_max_tokens = 0  # auto measured torch faster: a lone text runs on torch
    emb.encode(["hello"])
    assert emb.stats.onnx_batches == before + 1


# --------------------------------------------------------------- graph cache
def test_graph_is_exported_once_then_reused_from_the_cache(tmp_path, monkeypatch):
    path = build_tiny_bert(tmp_path / "m")
    first = Embedder(str(path), device="cpu", backend="onnx")
    key = first.graph_key
    graph = find_graph(key, path)
    assert graph is not None and graph.is_relative_to(cache_dir())
    stored = json.loads((graph.parent / KEY_FILE).read_text())
    assert stored["content_hash"] == first.content_hash and stored["runtime"].startswith("onnxruntime-")

    def no_export(*a, **k):
        raise AssertionError("exported again although the cache holds the graph")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    again = Embedder(str(path), device="cpu", backend="onnx")
    assert again.graph_path == graph
    np.testing.assert_allclose(again.encode(TEXTS), first.encode(TEXTS), atol=1e-6)


def test_baked_graph_next_to_the_weights_wins_over_the_cache(tmp_path):
    path = build_tiny_bert(tmp_path / "m")
    emb = Embedder(str(path), device="cpu", backend="onnx")
    cached = emb.graph_path
    baked = path / BAKED_DIR / emb.graph_key.digest
    shutil.copytree(cached.parent, baked)
    shutil.rmtree(cached.parent)
    again = Embedder(str(path), device="cpu", backend="onnx")
    assert again.graph_path == baked / "model.onnx"
    assert again.content_hash == emb.content_hash  # the hidden folder is not part of the model's hash


def test_graph_key_covers_outputs_precision_and_runtime(tiny_model):
    mean = Embedder(str(tiny_model), device="cpu", backend="torch")
    cls = Embedder(str(tiny_model), device="cpu", backend="torch", pooling="cls")
    assert mean.graph_key.outputs != cls.graph_key.outputs
    assert mean.graph_key.digest != cls.graph_key.digest
    k = mean.graph_key
    assert GraphKey(k.content_hash, k.precision, k.outputs, "onnxruntime-0.0").digest != k.digest
    assert GraphKey(k.content_hash, "int8", k.outputs, k.runtime).digest != k.digest


def test_a_stale_key_file_is_not_reused(tmp_path):
    path = build_tiny_bert(tmp_path / "m")
    emb = Embedder(str(path), device="cpu", backend="onnx")
    key_file = emb.graph_path.parent / KEY_FILE
    data = json.loads(key_file.read_text())
    data["outputs"] = "something else"
    key_file.write_text(json.dumps(data))
    assert find_graph(emb.graph_key, path) is None


# ------------------------------------------------------------- falling back
def test_onnx_with_reduced_precision_says_why_and_runs_torch(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="embedkit.engine.embedder"):
        emb = Embedder(str(tiny_model), device="cpu", backend="onnx", precision="int8")
    assert "runs fp32 (ONNX Runtime) and bf16 (OpenVINO) only" in caplog.text and "using torch" in caplog.text
    emb.encode(TEXTS)
    assert emb.stats.onnx_batches == 0 and emb.stats.batches >= 1


def test_failed_export_logs_one_line_and_runs_torch(tmp_path, monkeypatch, caplog):
    path = build_tiny_bert(tmp_path / "m")

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with caplog.at_level(logging.WARNING, logger="embedkit.engine.embedder"):
        emb = Embedder(str(path), device="cpu", backend="auto")
    lines = [r for r in caplog.records if "ONNX export failed" in r.getMessage()]
    assert len(lines) == 1 and "exporter exploded" in lines[0].getMessage()
    assert emb.graph_path is None and emb.encode(TEXTS).shape == (len(TEXTS), 32)
    assert find_graph(emb.graph_key, path) is None  # nothing half-written was left in the cache


def test_torch_backend_never_exports(tmp_path, monkeypatch):
    path = build_tiny_bert(tmp_path / "m")
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported"))
    emb = Embedder(str(path), device="cpu", backend="torch")
    assert emb.graph_path is None and "torch asked for" in emb.describe()["backend_plan"]


def test_a_deferred_graph_runs_torch_until_attached_then_routes_small_batches(tiny_model):
    emb = Embedder(str(tiny_model), device="cpu", backend="auto", defer_graph=True)
    assert emb.pending_graph is not None and emb.graph_path is None
    assert "until the ONNX graph is attached" in emb.describe()["backend_plan"]
    before = emb.encode(TEXTS)
    assert emb.stats.onnx_batches == 0
    session = emb.open_graph()
    assert session is not None
    emb.use_graph(session)
    assert emb.pending_graph is None and emb.graph_path == session.path and emb.crossover is not None
    emb.onnx_max_tokens = 1 << 20  # what a machine where ONNX Runtime always wins would measure
    after = emb.encode(TEXTS)
    assert emb.stats.onnx_batches >= 1
    assert float(np.abs(after - before).max()) <= 1e-5


def test_explicit_onnx_is_never_deferred(tiny_model):
    emb = Embedder(str(tiny_model), device="cpu", backend="onnx", defer_graph=True)
    assert emb.pending_graph is None and emb.graph_path is not None


# ------------------------------------------------------ fusions and the kept measurement
@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_exported_graph_carries_onnx_runtime_fusions_and_the_same_outputs(tmp_path, arch):
    import onnx

    path = build_tiny_bert(tmp_path / "m", arch=arch)
    emb = Embedder(str(path), device="cpu", backend="onnx")
    ops = {node.op_type for node in onnx.load(str(emb.graph_path)).graph.node}
    assert "SkipLayerNormalization" in ops  # fused at export (plain LayerNormalization before)
    ref = _st_vectors(path, TEXTS)
    assert float(np.abs(emb.encode(TEXTS) - ref).max()) <= 1e-5


def test_fusions_that_move_outputs_are_not_kept(tmp_path, monkeypatch):
    from embedkit.engine import graph as graph_mod

    path = build_tiny_bert(tmp_path / "m")
    emb = Embedder(str(path), device="cpu", backend="onnx")
    plain = tmp_path / "plain.onnx"
    shutil.copy(emb.graph_path, plain)
    before = plain.read_bytes()
    cfg = emb.model.transformer.config
    kwargs = {
        "num_heads": cfg.num_attention_heads,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
    }
    # an impossible tolerance: any float difference refuses the fused graph and keeps the file as it was
    assert graph_mod.fuse_graph(plain, **kwargs, tol=-1.0) == 0
    assert plain.read_bytes() == before and not (tmp_path / "fused.onnx").exists()


def test_auto_keeps_its_measurement_and_the_next_start_reuses_it(tmp_path, monkeypatch):
    import embedkit.engine.backend as backend_mod
    import embedkit.engine.embedder as embedder_mod

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "fresh-cache"))  # no earlier test's measurement
    monkeypatch.setattr(backend_mod, "cpu_sample", lambda: None)  # whatever else runs, it is kept
    path = build_tiny_bert(tmp_path / "m")
    first = Embedder(str(path), device="cpu", backend="auto")
    assert first.crossover is not None and first.crossover.probes
    kept = list((cache_dir() / "crossover").glob(f"{first.graph_key.digest}-*.json"))
    assert len(kept) == 1

    calls = []
    real = embedder_mod.measure_crossover

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedder_mod, "measure_crossover", counting)
    second = Embedder(str(path), device="cpu", backend="auto")
    assert not calls and second.crossover == first.crossover
    assert second.onnx_max_tokens == first.onnx_max_tokens
    # another thread count is another machine shape: it measures afresh
    threads = torch.get_num_threads()
    torch.set_num_threads(threads - 1 if threads > 1 else 2)
    try:
        third = Embedder(str(path), device="cpu", backend="auto")
    finally:
        torch.set_num_threads(threads)
    assert calls == [1] and third.crossover is not None


def test_a_stale_graph_folder_under_the_same_digest_is_replaced_on_export(tmp_path):
    path = build_tiny_bert(tmp_path / "m")
    emb = Embedder(str(path), device="cpu", backend="onnx")
    key_file = emb.graph_path.parent / KEY_FILE
    data = json.loads(key_file.read_text())
    key_file.write_text(json.dumps({**data, "outputs": "stale"}))
    again = Embedder(str(path), device="cpu", backend="onnx")
    assert json.loads((again.graph_path.parent / KEY_FILE).read_text()) == again.graph_key.to_dict()


def test_forward_cost_in_tokens_comes_from_the_small_probes_line():
    clock = FakeClock()
    # torch: 10 ms fixed + 100 us/token -> 100 tokens; onnx: 2 ms fixed + 100 us/token -> 20 tokens
    res = measure_crossover(
        clock.runtime(0.010, 100e-6), clock.runtime(0.002, 100e-6), budget_s=100.0, clock=clock
    )
    assert res.forward_cost_tokens("torch") == pytest.approx(100, rel=1e-6)
    assert res.forward_cost_tokens("onnx") == pytest.approx(20, rel=1e-6)
    assert Crossover(max_onnx_tokens=0).forward_cost_tokens("onnx") is None


def test_a_torch_only_engine_measures_its_forward_cost_alone():
    clock = FakeClock()
    # bf16 eager torch on the AMX Xeon looks like this: a large fixed cost, cheap tokens
    res = measure_forward_cost(clock.runtime(0.020, 40e-6), clock=clock)
    assert [(p["rows"], p["tokens"]) for p in res.probes] == list(COST_SHAPES)
    assert all("onnx_ms" not in p for p in res.probes) and res.max_onnx_tokens == 0
    assert res.forward_cost_tokens("torch") == pytest.approx(500, rel=1e-6)
    assert res.seconds == pytest.approx(clock.now)
    # capped: merging past ~1000 padded tokens per pass stopped paying
    assert measure_forward_cost(clock.runtime(1.0, 1e-6), clock=clock).forward_cost_tokens("torch") == 1024


def _one_thread_runtime(clock, all_threads, one):
    """A fake torch whose pass costs ``all_threads`` or, inside the returned context, ``one``
    (each ``(fixed_s, per_token_s)``): ``(run, one_thread)`` for measure_forward_cost."""
    import contextlib

    state = {"one": False}

    def run(rows, tokens):
        fixed, per_token = one if state["one"] else all_threads
        clock.now += fixed + per_token * rows * tokens

    @contextlib.contextmanager
    def one_thread():
        state["one"] = True
        try:
            yield
        finally:
            state["one"] = False

    return run, one_thread


def test_one_thread_takes_the_small_shapes_it_wins_by_the_margin_and_stops_at_its_first_loss():
    clock = FakeClock()
    # PASSIVE OpenMP: every parallel region wakes the second thread, a fixed cost per pass
    run, one_thread = _one_thread_runtime(clock, all_threads=(0.010, 10e-6), one=(0.002, 30e-6))
    shapes = ((1, 16), (4, 32), (8, 64), (2, 16))
    res = measure_forward_cost(run, shapes=shapes, clock=clock, one_thread=one_thread)
    assert res.one_thread_tokens == 4 * 32  # 16 and 128 won; 512 lost (17.4 against 15.1 ms)
    small, mid, large, after = res.probes
    assert small["torch_ms"] == pytest.approx(2 + 0.48) and small["all_threads_ms"] == pytest.approx(10.16)
    assert mid["torch_ms"] == pytest.approx(2 + 3.84)  # a won shape costs what its route costs
    assert large["torch_ms"] == pytest.approx(15.12) and large["one_thread_ms"] == pytest.approx(17.36)
    assert "one_thread_ms" not in after  # not timed on one thread once it lost
    # within the 5% margin is no win; without the context nothing is timed on one thread
    run, one_thread = _one_thread_runtime(clock, all_threads=(0.010, 0), one=(0.0097, 0))
    assert measure_forward_cost(run, clock=clock, one_thread=one_thread).one_thread_tokens == 0
    res = measure_forward_cost(run, clock=clock)
    assert res.one_thread_tokens == 0 and all("one_thread_ms" not in p for p in res.probes)
    assert Crossover.from_dict({"max_onnx_tokens": 0}).one_thread_tokens == 0  # older kept plans


def test_small_torch_batches_run_on_one_thread_where_that_measured_faster(tiny_model, monkeypatch):
    """After measure_forward_cost found one thread faster up to 64 padded tokens, torch runs such
    batches on one thread and larger ones on all, with the same vectors."""
    from embedkit.engine import embedder as embedder_module

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        emb = Embedder(str(tiny_model), device="cpu", backend="torch")
        short, long = ["hello world", "a cat"], ["the cat sat on the mat with a dog in the park"] * 8
        before = emb.encode(short), emb.encode(long)

        def fake_measure(run_torch, *, runtime, shapes, one_thread=None):
            assert one_thread is not None
            with one_thread():
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 2
            return Crossover(max_onnx_tokens=0, one_thread_tokens=64)

        monkeypatch.setattr(embedder_module, "measure_forward_cost", fake_measure)
        emb.measure_forward_cost()
        assert (
            emb.torch_one_thread_tokens == 64
            and "up to 64 padded tokens on one thread" in emb.torch_threads_note
        )
        seen = []
        real = emb._forward

        def spy(input_ids, mask, **kw):
            seen.append((int(input_ids.numel()), torch.get_num_threads()))
            return real(input_ids, mask, **kw)

        monkeypatch.setattr(emb, "_forward", spy)
        after = emb.encode(short), emb.encode(long)
        assert seen == [(seen[0][0], 1), (seen[1][0], 2)] and seen[0][0] <= 64 < seen[1][0]
        assert torch.get_num_threads() == 2
        for a, b in zip(before, after, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_an_engine_on_one_thread_or_the_graph_times_no_one_thread_route(tiny_model, monkeypatch):
    from embedkit.engine import embedder as embedder_module

    seen = []

    def fake_measure(run, *, runtime, shapes, one_thread=None):
        seen.append((runtime, one_thread))
        return Crossover(max_onnx_tokens=0)

    monkeypatch.setattr(embedder_module, "measure_forward_cost", fake_measure)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Embedder(str(tiny_model), device="cpu", backend="torch").measure_forward_cost()
    finally:
        torch.set_num_threads(threads)
    Embedder(str(tiny_model), device="cpu", backend="onnx").measure_forward_cost()
    assert seen == [("torch", None), ("onnx", None)]


def test_an_engine_without_a_graph_keeps_its_measured_forward_cost(tiny_model, monkeypatch):
    from embedkit.engine import embedder as embedder_module

    emb = Embedder(str(tiny_model), device="cpu", backend="torch")
    assert emb.forward_cost_tokens is None
    clock, seen = FakeClock(), []

    def fake_measure(run_torch, *, runtime, shapes, one_thread=None):
        assert runtime == "torch"
        seen.extend(shapes)
        run_torch(*shapes[0])  # the engine's own forward pass on the probe inputs
        return measure_forward_cost(clock.runtime(0.020, 40e-6), shapes=shapes, clock=clock)

    monkeypatch.setattr(embedder_module, "measure_forward_cost", fake_measure)
    assert emb.measure_forward_cost() == pytest.approx(500) and emb.forward_cost_tokens == pytest.approx(500)
    assert max(t for _, t in seen) <= emb.max_seq_length  # probes fit the model
    emb.forward_cost_tokens = 123.0  # auto's crossover (or an earlier call) already priced it
    assert emb.measure_forward_cost() == 123.0


def test_an_onnx_engine_prices_the_pass_it_runs_not_torchs(tiny_model, monkeypatch):
    """backend="onnx" runs every batch on ONNX Runtime: its forward cost is ONNX Runtime's."""
    from embedkit.engine import embedder as embedder_module

    emb = Embedder(str(tiny_model), device="cpu", backend="onnx")
    assert emb.forward_cost_tokens is None
    seen = []

    def fake_measure(run, *, runtime, shapes, one_thread=None):
        assert one_thread is None  # ONNX Runtime has its own threads
        seen.append(runtime)
        run(*shapes[0])  # ONNX Runtime's pass on the probe inputs
        clock = FakeClock()
        return measure_forward_cost(clock.runtime(0.002, 100e-6), runtime=runtime, shapes=shapes, clock=clock)

    monkeypatch.setattr(embedder_module, "measure_forward_cost", fake_measure)
    before = emb.stats.batches
    assert emb.measure_forward_cost() == pytest.approx(20) and seen == ["onnx"]
    assert emb.stats.batches == before  # probes are not counted as the engine's batches


def _assert_m3_outputs_close(a, b, atol=1e-5):
    """BGE-M3's three outputs (``encode(..., return_sparse=True, return_colbert_vecs=True)``)
    agree within ``atol``: dense vectors, each text's lexical weights (same tokens) and ColBERT vectors."""
    np.testing.assert_allclose(b["dense_vecs"], a["dense_vecs"], atol=atol)
    for x, y in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        assert set(x) == set(y)
        np.testing.assert_allclose([y[k] for k in x], list(x.values()), atol=atol)
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, atol=atol)


def test_bge_m3_outputs_on_onnx_come_from_the_graphs_token_states(tiny_m3):
    """A model with BGE-M3's heads gets a graph that also gives the last hidden states, so its
    sparse and ColBERT outputs run on ONNX Runtime too, within 1e-5 of torch."""
    from tests.reference_m3 import M3_TEXTS

    texts = [t for t in M3_TEXTS if len(t) < 3000]
    exact = Embedder(str(tiny_m3), device="cpu", backend="torch")
    fast = Embedder(str(tiny_m3), device="cpu", backend="onnx")
    assert fast.graph_key.outputs.endswith("+token_embeddings") and fast._onnx.token_states
    a = exact.encode(texts, return_sparse=True, return_colbert_vecs=True)
    b = fast.encode(texts, return_sparse=True, return_colbert_vecs=True)
    assert fast.stats.onnx_batches > 0
    _assert_m3_outputs_close(a, b)
    np.testing.assert_allclose(fast.encode(texts), a["dense_vecs"], atol=1e-5)  # dense alone: same graph


def test_a_measurement_taken_while_other_processes_were_busy_is_used_but_not_kept(
    tmp_path, monkeypatch, caplog
):
    """A start on a busy machine (other processes on the cores) measures skewed times; it routes
    this process's batches, but the next start measures again instead of inheriting the skew."""
    import embedkit.engine.backend as backend_mod

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "fresh-cache"))
    ticks = iter([(0.0, 0.0, 0.0), (1.0, 1.6, 0.9)] * 4)  # 1 s; all CPUs 1.6 s busy, this process 0.9 s
    monkeypatch.setattr(backend_mod, "cpu_sample", lambda: next(ticks))
    monkeypatch.setattr(backend_mod.os, "cpu_count", lambda: 2)
    path = build_tiny_bert(tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="embedkit"):
        emb = Embedder(str(path), device="cpu", backend="auto")
    assert emb.crossover is not None and emb.crossover.others_cpu_share == pytest.approx(0.35)
    assert not emb.crossover.keep and emb.crossover.probes
    assert not list((cache_dir() / "crossover").glob("*.json"))
    assert "other processes used 35% of the CPUs, so not kept" in caplog.text


def test_the_share_of_the_cpus_other_processes_used():
    from embedkit.engine.backend import others_cpu_share

    assert (
        others_cpu_share(
            (0.0, 10.0, 1.0),
            (2.0, 12.0, 3.0),
        )
        == 0.0
    )  # all of it was ours
    assert others_cpu_share((0.0, 0.0, 0.0), (1.0, 2.0, 0.0)) == pytest.approx(2.0 / (os.cpu_count() or 1))
    assert others_cpu_share(None, (1.0, 1.0, 1.0)) is None
    assert others_cpu_share((1.0, 0.0, 0.0), (1.0, 1.0, 0.0)) is None  # no time passed


# ------------------------------------------------------------ bf16 on OpenVINO
def _needs_openvino_bf16():
    from embedkit.engine.device import cpu_supports_bf16
    from embedkit.engine.graph import openvino_version

    if openvino_version() is None:
        pytest.skip("OpenVINO is not installed (the openvino extra; make install brings it)")
    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16/amx), so bf16 runs torch")


def _min_cos(reference, candidate):
    return cosine_stats(reference, candidate)["min_cosine"]


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "mpnet"])
def test_bf16_runs_the_fp32_graph_on_openvino_within_cosine_0_99(tmp_path, arch):
    """bf16 with the ONNX backend: the same fp32 graph, computed in bf16 by OpenVINO; its vectors
    stay within min cosine 0.99 of sentence-transformers in fp32, as torch's bf16 does."""
    _needs_openvino_bf16()
    path = build_tiny_bert(tmp_path / "m", arch=arch)
    ref = _st_vectors(path, TEXTS)
    emb = Embedder(str(path), device="cpu", backend="onnx", precision="bf16", normalize=False)
    got = emb.encode(TEXTS)
    assert emb.stats.onnx_batches == emb.stats.batches >= 1
    assert "OpenVINO" in emb.describe()["backend_plan"]
    assert _min_cos(ref, got) >= 0.99
    tok = emb.tokenize(["the cat sat on the mat"])  # a lone text: the straight path, same bits
    assert np.array_equal(
        emb.embed_tokenized(tok), emb._run(emb._workload(tok), emb._plan(tok), 1, None, None)
    )


def test_bf16_on_openvino_serves_callers_on_several_threads(tiny_model):
    """One engine called from several threads at once (as with ONNX Runtime or torch): OpenVINO's
    shared inference request is taken in turns, and each caller gets its own texts' vectors."""
    _needs_openvino_bf16()
    from concurrent.futures import ThreadPoolExecutor

    emb = Embedder(str(tiny_model), device="cpu", backend="onnx", precision="bf16")
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(48)]
    alone = [emb.encode(texts[k::4]) for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(lambda k: emb.encode(texts[k::4]), range(4)))
            for a, b in zip(alone, together, strict=True):
                assert np.array_equal(a, b)


def test_bf16_bge_m3_outputs_on_openvino_come_from_the_graphs_token_states(tiny_m3):
    _needs_openvino_bf16()
    from tests.reference_m3 import M3_TEXTS

    texts = [t for t in M3_TEXTS if len(t) < 3000]
    exact = Embedder(str(tiny_m3), device="cpu", backend="torch")
    fast = Embedder(str(tiny_m3), device="cpu", backend="onnx", precision="bf16")
    assert fast._onnx.token_states
    a = exact.encode(texts, return_sparse=True, return_colbert_vecs=True)
    b = fast.encode(texts, return_sparse=True, return_colbert_vecs=True)
    assert fast.stats.onnx_batches > 0
    assert _min_cos(a["dense_vecs"], b["dense_vecs"]) >= 0.99
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True):
        assert x.shape == y.shape and _min_cos(x, y) >= 0.99


def test_bf16_without_openvino_or_native_bf16_says_why_and_runs_torch(tiny_model, monkeypatch, caplog):
    import embedkit.engine.embedder as embedder_mod

    monkeypatch.setattr(embedder_mod, "openvino_version", lambda: None)
    with caplog.at_level(logging.WARNING, logger="embedkit.engine.embedder"):
        emb = Embedder(str(tiny_model), device="cpu", backend="onnx", precision="bf16")
    assert "OpenVINO, which is not installed" in caplog.text and "embedkit[openvino]" in caplog.text
    emb.encode(TEXTS)
    assert emb.stats.onnx_batches == 0 and emb.stats.batches >= 1

    monkeypatch.setattr(embedder_mod, "openvino_version", lambda: "openvino-2026.4.1")
    monkeypatch.setattr(embedder_mod, "cpu_supports_bf16", lambda: False)
    emb = Embedder(str(tiny_model), device="cpu", backend="auto", precision="bf16")
    assert emb._onnx is None and "no native bf16" in emb.backend_note


def test_auto_keeps_separate_measurements_for_onnx_runtime_and_openvino(tmp_path, monkeypatch):
    """The fp32 and bf16 engines share one graph file but not a measurement: each runtime's
    crossover against torch is its own."""
    _needs_openvino_bf16()
    import embedkit.engine.backend as backend_mod

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(backend_mod, "cpu_sample", lambda: None)
    path = build_tiny_bert(tmp_path / "m")
    fp32 = Embedder(str(path), device="cpu", backend="auto")
    bf16 = Embedder(str(path), device="cpu", backend="auto", precision="bf16")
    assert fp32.graph_key == bf16.graph_key
    kept = list((cache_dir() / "crossover").glob(f"{fp32.graph_key.digest}-*.json"))
    assert len(kept) == 2


# ---------------------------------------------------- fp32 batches on OpenVINO
def _needs_openvino():
    from embedkit.engine.graph import openvino_version

    if openvino_version() is None:
        pytest.skip("OpenVINO is not installed (the openvino extra; make install brings it)")


def _auto_with_split(path, monkeypatch, max_ort_tokens, max_onnx_tokens=EVERY_BATCH):
    """An fp32 ``auto`` engine whose measurement (faked) gave ONNX Runtime the graph's batches up
    to ``max_ort_tokens`` padded tokens and OpenVINO the rest."""
    import embedkit.engine.embedder as embedder_mod

    seen = {}

    def measured(run_torch, run_onnx, *, run_openvino=None, **kwargs):
        seen["openvino"] = run_openvino
        run_openvino(2, 8)  # OpenVINO's compiled graph runs
        return Crossover(max_onnx_tokens=max_onnx_tokens, max_ort_tokens=max_ort_tokens)

    monkeypatch.setattr(embedder_mod, "measure_crossover", measured)
    emb = Embedder(str(path), device="cpu", backend="auto")
    assert seen["openvino"] is not None  # auto weighed OpenVINO
    return emb


def _count_runs(session):
    calls = []
    real = session.run

    def run(ids, mask):
        calls.append(ids.shape)
        return real(ids, mask)

    session.run = run
    return calls


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "mpnet"])
def test_auto_gives_openvino_the_batches_above_onnx_runtimes_and_stays_within_1e5(
    tmp_path, monkeypatch, arch
):
    _needs_openvino()
    from embedkit.engine.graph import GraphSession, OpenVINOSession

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tiny_bert(tmp_path / "m", arch=arch)
    ref = _st_vectors(path, TEXTS)
    emb = _auto_with_split(path, monkeypatch, max_ort_tokens=20)
    assert isinstance(emb._onnx, GraphSession) and isinstance(emb._openvino, OpenVINOSession)
    assert emb._openvino.precision == "f32" and emb.max_ort_tokens == 20
    assert emb.describe()["backend_plan"].startswith(
        "onnx for every batch: ONNX Runtime up to 20 padded tokens"
    )
    on_ort, on_openvino = _count_runs(emb._onnx), _count_runs(emb._openvino)
    got = emb.encode(TEXTS)
    assert float(np.abs(got - ref).max()) <= 1e-5
    assert on_openvino and all(r * t > 20 for r, t in on_openvino)
    assert all(r * t <= 20 for r, t in on_ort)
    assert emb.stats.onnx_batches == emb.stats.batches  # both are the graph's batches
    # a lone text takes the straight path on whichever runtime its length routes it to
    on_ort.clear(), on_openvino.clear()
    emb.encode(["hi"])
    emb.encode(["the cat sat on the mat with a dog in the park and read a book " * 2])
    assert len(on_ort) == 1 and len(on_openvino) == 1


def test_openvino_winning_every_graph_batch_frees_onnx_runtime(tmp_path, monkeypatch):
    _needs_openvino()
    from embedkit.engine.graph import OpenVINOSession

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tiny_bert(tmp_path / "m")
    ref = _st_vectors(path, TEXTS)
    emb = _auto_with_split(path, monkeypatch, max_ort_tokens=0, max_onnx_tokens=64)
    assert isinstance(emb._onnx, OpenVINOSession) and emb._openvino is None  # ONNX Runtime's is gone
    assert emb.describe()["backend_plan"].startswith(
        "onnx for batches up to 64 padded tokens, on OpenVINO (fp32)"
    )
    on_openvino = _count_runs(emb._onnx)
    assert float(np.abs(emb.encode(TEXTS) - ref).max()) <= 1e-5  # 5 x 32 padded tokens: torch
    small = [TEXTS[0], TEXTS[2], TEXTS[4]]
    assert float(np.abs(emb.encode(small) - ref[[0, 2, 4]]).max()) <= 1e-5
    assert on_openvino and all(r * t <= 64 for r, t in on_openvino)


def test_openvino_is_weighed_only_by_auto_in_fp32_with_room_for_a_third_copy(tmp_path, monkeypatch):
    _needs_openvino()
    import embedkit.engine.embedder as embedder_mod

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tiny_bert(tmp_path / "m")
    compiled = []
    real = embedder_mod.OpenVINOSession

    def counting(*args, **kwargs):
        compiled.append(kwargs.get("precision", "bf16"))
        return real(*args, **kwargs)

    monkeypatch.setattr(embedder_mod, "OpenVINOSession", counting)
    emb = Embedder(str(path), device="cpu", backend="onnx")
    assert not compiled and "only auto in fp32" in emb._openvino_f32_unavailable()
    Embedder(str(path), device="cpu", backend="auto")
    assert compiled == ["f32"]  # room, and OpenVINO installed: auto weighs it
    monkeypatch.setattr(embedder_mod, "second_copy_fits", lambda weights, available=None: False)
    compiled.clear()
    emb = Embedder(str(path), device="cpu", backend="auto", max_batch_tokens=512)
    assert not compiled and emb._openvino is None
    assert "third copy" in emb._openvino_f32_unavailable()
    monkeypatch.setattr(embedder_mod, "openvino_version", lambda: None)
    assert "not installed" in emb._openvino_f32_unavailable()


def test_openvino_failing_in_the_measurement_leaves_onnx_runtime_and_torch(tmp_path, monkeypatch, caplog):
    _needs_openvino()
    import embedkit.engine.embedder as embedder_mod
    from embedkit.engine.graph import GraphSession

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tiny_bert(tmp_path / "m")

    def measured(run_torch, run_onnx, *, run_openvino=None, **kwargs):
        if run_openvino is not None:
            raise RuntimeError("OpenVINO broke")
        return Crossover(max_onnx_tokens=512)

    monkeypatch.setattr(embedder_mod, "measure_crossover", measured)
    with caplog.at_level(logging.WARNING, logger="embedkit.engine.embedder"):
        emb = Embedder(str(path), device="cpu", backend="auto")
    assert "OpenVINO broke" in caplog.text and "measuring without it" in caplog.text
    assert isinstance(emb._onnx, GraphSession) and emb._openvino is None and emb.onnx_max_tokens == 512
    assert emb.backend_note == "onnx for batches up to 512 padded tokens, torch above"


def test_three_and_two_runtime_measurements_are_kept_apart_and_a_kept_split_is_applied(tmp_path, monkeypatch):
    _needs_openvino()
    import embedkit.engine.backend as backend_mod
    import embedkit.engine.embedder as embedder_mod

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(backend_mod, "cpu_sample", lambda: None)  # kept, whatever else runs
    path = build_tiny_bert(tmp_path / "m")
    calls = []

    def measured(run_torch, run_onnx, *, run_openvino=None, **kwargs):
        calls.append(run_openvino is not None)
        return Crossover(max_onnx_tokens=EVERY_BATCH, max_ort_tokens=16 if run_openvino else None)

    monkeypatch.setattr(embedder_mod, "measure_crossover", measured)
    three = Embedder(str(path), device="cpu", backend="auto")
    again = Embedder(str(path), device="cpu", backend="auto")
    assert calls == [True]  # the second start read the kept three-way plan
    assert again._openvino is not None and again.max_ort_tokens == 16 == three.max_ort_tokens
    monkeypatch.setattr(Embedder, "_openvino_f32_unavailable", lambda self: "not here")
    two = Embedder(str(path), device="cpu", backend="auto")
    assert calls == [True, False] and two._openvino is None and two.max_ort_tokens == EVERY_BATCH
    assert len(list((cache_dir() / "crossover").glob(f"{two.graph_key.digest}-*.json"))) == 2


def test_the_forward_cost_is_fitted_on_the_runtime_the_plan_gives_each_small_shape():
    probes = [
        {"rows": 1, "tokens": 16, "onnx_ms": 2.0, "openvino_ms": 9.0},
        {"rows": 2, "tokens": 32, "onnx_ms": 3.0, "openvino_ms": 9.5},
        {"rows": 8, "tokens": 32, "onnx_ms": 50.0, "openvino_ms": 11.0},
        {"rows": 8, "tokens": 64, "onnx_ms": 90.0, "openvino_ms": 13.0},
    ]
    split = Crossover(max_onnx_tokens=EVERY_BATCH, probes=probes, max_ort_tokens=64)
    onnx_only = Crossover(max_onnx_tokens=EVERY_BATCH, probes=probes)
    # onnx 2, 3 ms at 16, 64 tokens; openvino 11, 13 ms at 256, 512 tokens
    x, y = np.array([16, 64, 256, 512]), np.array([2.0, 3.0, 11.0, 13.0])
    slope, intercept = np.polyfit(x, y, 1)
    assert split.forward_cost_tokens("graph") == pytest.approx(intercept / slope)
    assert onnx_only.forward_cost_tokens("graph") == onnx_only.forward_cost_tokens("onnx")
    assert split.forward_cost_tokens("graph") != split.forward_cost_tokens("onnx")


def test_bge_m3_outputs_on_openvino_fp32_come_from_the_graphs_token_states(tiny_m3, tmp_path, monkeypatch):
    """BGE-M3's sparse and ColBERT outputs on batches that auto gives OpenVINO in fp32: the same
    graph's token states, within 1e-5 of torch."""
    _needs_openvino()
    from tests.reference_m3 import M3_TEXTS

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    texts = [t for t in M3_TEXTS if len(t) < 3000]
    exact = Embedder(str(tiny_m3), device="cpu", backend="torch")
    fast = _auto_with_split(tiny_m3, monkeypatch, max_ort_tokens=16)
    assert fast._openvino is not None and fast._openvino.token_states
    on_openvino = _count_runs(fast._openvino)
    real_tokens = fast._openvino.run_tokens
    fast._openvino.run_tokens = lambda ids, mask: on_openvino.append(ids.shape) or real_tokens(ids, mask)
    a = exact.encode(texts, return_sparse=True, return_colbert_vecs=True)
    b = fast.encode(texts, return_sparse=True, return_colbert_vecs=True)
    assert on_openvino
    _assert_m3_outputs_close(a, b)


def test_a_ray_actor_keeps_auto_where_the_graphs_batches_are_split_between_two_runtimes():
    from types import SimpleNamespace

    from embedkit.batch.ray_runner.worker import worker_backend

    def driver(max_onnx_tokens, max_ort_tokens=None):
        return SimpleNamespace(
            backend="auto",
            pending_graph=None,
            graph_path="g.onnx",
            onnx_max_tokens=max_onnx_tokens,
            crossover=Crossover(max_onnx_tokens=max_onnx_tokens, max_ort_tokens=max_ort_tokens),
        )

    assert worker_backend(driver(EVERY_BATCH), "cpu") == "onnx"  # ONNX Runtime alone: nothing to split
    assert worker_backend(driver(512), "cpu") == "auto"
    assert worker_backend(driver(0), "cpu") == "torch"
    # "onnx" would be ONNX Runtime alone: an actor measures for itself to use OpenVINO as well
    assert worker_backend(driver(EVERY_BATCH, max_ort_tokens=64), "cpu") == "auto"
    assert worker_backend(driver(EVERY_BATCH, max_ort_tokens=0), "cpu") == "auto"


def test_a_kept_plan_that_gives_openvino_no_batch_is_applied_without_compiling_openvino(
    tmp_path, monkeypatch
):
    _needs_openvino()
    import embedkit.engine.backend as backend_mod
    import embedkit.engine.embedder as embedder_mod
    from embedkit.engine.graph import GraphSession

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(backend_mod, "cpu_sample", lambda: None)  # kept, whatever else runs
    path = build_tiny_bert(tmp_path / "m")
    compiled, calls = [], []
    real = embedder_mod.OpenVINOSession

    def counting(*args, **kwargs):
        compiled.append(kwargs.get("precision", "bf16"))
        return real(*args, **kwargs)

    def measured(run_torch, run_onnx, *, run_openvino=None, **kwargs):
        calls.append(run_openvino is not None)
        return Crossover(max_onnx_tokens=EVERY_BATCH)  # OpenVINO never beat ONNX Runtime

    monkeypatch.setattr(embedder_mod, "OpenVINOSession", counting)
    monkeypatch.setattr(embedder_mod, "measure_crossover", measured)
    first = Embedder(str(path), device="cpu", backend="auto")
    assert compiled == ["f32"] and calls == [True] and first._openvino is None  # weighed, then dropped
    compiled.clear()
    again = Embedder(str(path), device="cpu", backend="auto")
    assert compiled == [] and calls == [True]  # neither compiled nor measured again
    assert isinstance(again._onnx, GraphSession) and again._openvino is None
    assert again.max_ort_tokens == EVERY_BATCH and again.onnx_max_tokens == EVERY_BATCH
    assert again.backend_note == first.backend_note
    ref = _st_vectors(path, TEXTS)
    assert float(np.abs(again.encode(TEXTS) - ref).max()) <= 1e-5
    # a kept plan in which OpenVINO takes batches still compiles it
    monkeypatch.setattr(
        Crossover, "from_dict", classmethod(lambda cls, data: Crossover(EVERY_BATCH, max_ort_tokens=16))
    )
    third = Embedder(str(path), device="cpu", backend="auto")
    assert compiled == ["f32"] and calls == [True] and third.max_ort_tokens == 16


# ------------------------------------------------------------ backend openvino
@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "mpnet"])
def test_openvino_backend_matches_sentence_transformers_to_1e5(tmp_path, arch, monkeypatch):
    """backend="openvino" in fp32: every batch on the graph, compiled by OpenVINO in f32, within
    1e-5 of sentence-transformers; a lone text takes the straight path with the runner's bits."""
    _needs_openvino()
    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tiny_bert(tmp_path / "m", arch=arch)
    ref = _st_vectors(path, TEXTS)
    emb = Embedder(str(path), device="cpu", backend="openvino")
    on_openvino = _count_runs(emb._onnx)
    got = emb.encode(TEXTS)
    assert (
        emb.backend == "openvino"
        and emb.describe()["backend_plan"] == "openvino for every batch (OpenVINO, f32)"
    )
    assert emb._openvino is None and emb._onnx.precision == "f32"
    assert emb.stats.onnx_batches == emb.stats.batches >= 1 and on_openvino
    assert float(np.abs(got - ref).max()) <= 1e-5
    tok = emb.tokenize(["the cat sat on the mat"])
    assert np.array_equal(
        emb.embed_tokenized(tok), emb._run(emb._workload(tok), emb._plan(tok), 1, None, None)
    )


def test_openvino_backend_in_bf16_computes_the_graph_in_bf16(tiny_model):
    _needs_openvino_bf16()
    ref = _st_vectors(tiny_model, TEXTS)
    emb = Embedder(str(tiny_model), device="cpu", backend="openvino", precision="bf16", normalize=False)
    got = emb.encode(TEXTS)
    assert emb.describe()["backend_plan"] == "openvino for every batch (OpenVINO, bf16)"
    assert emb.stats.onnx_batches == emb.stats.batches >= 1
    assert _min_cos(ref, got) >= 0.99


def test_openvino_backend_prices_its_own_forward_pass(tiny_model, caplog):
    """Without auto's measurement, the forward cost the server splits merged requests by is
    OpenVINO's, timed on the graph, and the log names it."""
    _needs_openvino()
    emb = Embedder(str(tiny_model), device="cpu", backend="openvino")
    runs = _count_runs(emb._onnx)
    with caplog.at_level(logging.INFO, logger="embedkit.engine.embedder"):
        emb.measure_forward_cost()
    assert runs and "one more OpenVINO forward pass costs" in caplog.text


def test_openvino_backend_without_openvino_or_in_int8_says_why_and_runs_torch(
    tiny_model, monkeypatch, caplog
):
    import embedkit.engine.embedder as embedder_mod

    monkeypatch.setattr(embedder_mod, "openvino_version", lambda: None)
    with caplog.at_level(logging.WARNING, logger="embedkit.engine.embedder"):
        emb = Embedder(str(tiny_model), device="cpu", backend="openvino")
    lines = [r.getMessage() for r in caplog.records if "OpenVINO is not installed" in r.getMessage()]
    assert len(lines) == 1 and "embedkit[openvino]" in lines[0] and "using torch" in lines[0]
    emb.encode(TEXTS)
    assert emb.graph_path is None and emb.stats.onnx_batches == 0 and emb.stats.batches >= 1

    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embedkit.engine.embedder"):
        emb = Embedder(str(tiny_model), device="cpu", backend="openvino", precision="int8")
    assert "runs fp32 and bf16 (OpenVINO) only" in caplog.text and "int8 runs torch" in caplog.text
    assert emb.graph_path is None and emb.encode(TEXTS).shape == (len(TEXTS), 32)


def test_bge_m3_outputs_on_the_openvino_backend_come_from_the_graphs_token_states(
    tiny_m3, tmp_path, monkeypatch
):
    _needs_openvino()
    from tests.reference_m3 import M3_TEXTS

    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    texts = [t for t in M3_TEXTS if len(t) < 3000]
    exact = Embedder(str(tiny_m3), device="cpu", backend="torch")
    fast = Embedder(str(tiny_m3), device="cpu", backend="openvino")
    assert fast._onnx.token_states and fast._onnx.label == "OpenVINO"
    a = exact.encode(texts, return_sparse=True, return_colbert_vecs=True)
    b = fast.encode(texts, return_sparse=True, return_colbert_vecs=True)
    assert fast.stats.onnx_batches == fast.stats.batches >= 1
    _assert_m3_outputs_close(a, b)
