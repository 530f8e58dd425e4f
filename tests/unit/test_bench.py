"""The benchmark harness's own logic: FLOP arithmetic, MFU, ratios, cosine, tables, corpus, JSON.

Benchmarks are not tests: nothing here asserts on timing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from bench import corpus as bench_corpus
from bench import report
from bench.flops import ModelShape, corpus_flops, corpus_flops_from_sums, measure_peak, mfu
from bench.run import SECTIONS, done_when, parse_args, table_rows

MINILM = SimpleNamespace(hidden_size=384, num_hidden_layers=6, intermediate_size=1536, num_attention_heads=12)


def test_minilm_dense_flops_per_token_from_its_config():
    shape = ModelShape.from_config(MINILM)
    assert shape.linear_params == 10_637_568
    assert shape.dense_flops_per_token == 2 * 10_637_568  # 21.3 MFLOP per token


def test_linear_params_formula_matches_the_linear_layers_of_a_real_bert(tiny_model):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_model))
    counted = sum(
        m.weight.numel() + m.bias.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("encoder.")
    )
    assert ModelShape.from_config(model.config).linear_params == counted


def test_corpus_flops_adds_attention_quadratic_in_length():
    shape = ModelShape(layers=6, hidden=384, intermediate=1536, heads=12)
    dense = shape.dense_flops_per_token
    assert corpus_flops(shape, [256]) == dense * 256 + 4 * 6 * 384 * 256 * 256
    assert corpus_flops(shape, [10, 20]) == corpus_flops_from_sums(shape, 30, 100 + 400)
    assert corpus_flops(shape, []) == 0


def test_mfu_is_achieved_rate_over_peak():
    assert mfu(1e9, 2.0, 1e9) == pytest.approx(0.5)
    assert mfu(1e9, 1.0, None) is None
    assert mfu(1e9, 0.0, 1e9) is None


def test_measure_peak_reports_a_positive_rate_for_each_dtype():
    assert measure_peak("fp32", n=64, reps=1, inner=1) > 0
    assert measure_peak("bf16", n=64, reps=1, inner=1) > 0
    int8 = measure_peak("int8", n=64, reps=1, inner=1)
    assert int8 is None or int8 > 0
    with pytest.raises(ValueError):
        measure_peak("fp8", n=8)


def test_paired_ratio_is_the_median_of_per_round_speedups():
    # rounds: 2x, 4x, 2x -> 2x (a mean of medians would say 12/5 = 2.4x)
    assert report.paired_ratio([2.0, 4.0, 6.0], [1.0, 1.0, 3.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        report.paired_ratio([1.0], [1.0, 2.0])


def test_cosine_stats_finds_the_worst_row():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    cand = np.array([[2.0, 0.0], [1.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    stats = report.cosine_stats(ref, cand)
    assert stats["min_cosine"] == pytest.approx(np.sqrt(0.5))
    assert stats["max_abs_diff"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        report.cosine_stats(ref, cand[:2])


def test_table_formats_numbers_and_shows_missing_values_as_dash():
    rows = [
        {"config": "baseline", "texts_per_s": 123.4, "tokens_per_s": 45_678.0, "ratio": 1.0},
        {
            "config": "embedkit bf16",
            "texts_per_s": 456.0,
            "ratio": 3.25,
            "min_cosine": 0.999912,
            "mfu": 0.4123,
        },
    ]
    lines = report.format_table(rows).splitlines()
    assert lines[0].split() == [
        "config",
        "texts/s",
        "tokens/s",
        "ratio",
        "vs",
        "engine",
        "min",
        "cos",
        "MFU",
        "RSS",
        "MiB",
    ]
    assert lines[2].split() == ["baseline", "123", "45.7k", "1.00x", "-", "-", "-", "-"]
    assert lines[3].split() == ["embedkit", "bf16", "456", "-", "3.25x", "-", "0.99991", "41.2%", "-"]
    # columns line up: every row's second column starts where the header's does
    start = lines[0].index("texts/s")
    assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines[2:])
    md = report.markdown_table(rows).splitlines()
    assert md[0].startswith("| config |") and md[1].startswith("| --- |") and len(md) == 4


def test_corpus_is_deterministic_mixed_and_real_text():
    a = bench_corpus.build_corpus(n_short=50, n_long=5)
    assert a == bench_corpus.build_corpus(n_short=50, n_long=5)
    assert a != bench_corpus.build_corpus(n_short=50, n_long=5, seed=1)
    long_positions = [i for i, t in enumerate(a) if len(t.split()) > 200]
    assert len(long_positions) == 5 and long_positions != list(range(50, 55))
    with pytest.raises(ValueError, match="available"):
        bench_corpus.build_corpus(n_short=10**6)


def test_cycled_short_streams_n_texts_round_the_pool():
    it = bench_corpus.cycled_short(5, ["a", "b"])
    assert not isinstance(it, list)
    assert list(it) == ["a", "b", "a", "b", "a"]


def _row(kind, precision, ratio, min_cosine=None, rate=100.0):
    return {
        "kind": kind,
        "precision": precision,
        "ratio": ratio,
        "min_cosine": min_cosine,
        "texts_per_s": rate,
    }


def test_done_when_uses_the_fastest_precision_that_meets_the_cosine_bar():
    result = {
        "engine": {
            "rows": [
                _row("baseline", "fp32", 1.0),
                _row("embedkit", "fp32", 1.4, 1.0),
                _row("embedkit", "bf16", 2.6, 0.9999),
                _row("embedkit", "int8", 3.0, 0.98),
            ]
        },
        "iter": {"rss_ratio": 1.05, "ok": True},
    }
    c = done_when(result)
    assert c["fp32_ok"] and c["iter_ok"]
    assert c["fastest_non_exact"]["precision"] == "int8"
    assert c["best_non_exact_at_cosine_bar"]["precision"] == "bf16" and c["non_exact_ok"]
    result["engine"]["rows"][2]["ratio"] = 2.4
    assert not done_when(result)["non_exact_ok"]


def test_table_rows_are_engine_then_iter_then_door_rows():
    result = {
        "engine": {"rows": [{"config": "a"}, {"config": "b"}]},
        "iter": {"runs": [{"config": "it"}]},
        "job": {"row": {"config": "job"}},
        "serve": {"skipped": "absent"},
    }
    assert [r["config"] for r in table_rows(result)] == ["a", "b", "it", "job"]


def test_quick_mode_shrinks_everything_and_sections_are_checked():
    q = parse_args(["--quick"])
    full = parse_args([])
    assert q.short < full.short and q.iter_sizes[-1] < full.iter_sizes[-1] and q.long > 0
    assert full.iter_sizes == [2_000, 20_000] and full.sections == list(SECTIONS)
    assert "coldstart" in SECTIONS
    # quick smoke runs keep to the harness's own sections unless others are named
    assert q.sections == ["engine", "iter"]
    assert parse_args(["--quick", "--sections", "engine,job"]).sections == ["engine", "job"]
    assert parse_args(["--sections", "iter"]).sections == ["iter"]
    with pytest.raises(SystemExit):
        parse_args(["--sections", "engine,warp"])


def test_results_go_to_a_timestamped_file_and_latest_but_quick_runs_never_replace_latest(tmp_path):
    stamped, latest = report.write_results({"x": 1}, tmp_path)
    assert latest.name == "latest.json" and stamped.name.endswith("Z.json")
    q_stamped, q_latest = report.write_results({"x": 2}, tmp_path, quick=True)
    assert q_latest.name == "latest-quick.json" and q_stamped.name.endswith("-quick.json")
    assert json.loads(latest.read_text()) == {"x": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_readme_block_is_replaced_between_the_markers_only():
    from bench.readme_table import END, START, render, replace_block

    result = {
        "created_utc": "2024-01-01T00:00:00+00:00",
        "machine": {"cpu_model": "Test CPU", "cpu_count": 2, "torch": "2.13.0", "threads": 2},
        "table": [{"config": "embedkit fp32", "texts_per_s": 50.0, "ratio": 1.5}],
        "summary": ["machine: ...", "done-when fp32 >= 1.3x baseline: 1.50x PASS"],
    }
    block = render(result)
    assert "Test CPU (2 cores" in block and "| embedkit fp32 | 50 |" in block
    assert "- done-when fp32 >= 1.3x baseline: 1.50x PASS" in block and "machine: ..." not in block
    readme = f"# T\n\n## Benchmarks\n{START}\nold table\n{END}\n\n## Next\nkept\n"
    new = replace_block(readme, block)
    assert "old table" not in new and block in new and new.endswith("## Next\nkept\n")
    assert replace_block(new, block) == new
    with pytest.raises(ValueError):
        replace_block("# no markers\n", block)


def _serve_result(**over):
    res = {
        "texts_per_s": 180.0,
        "offline_texts_per_s": 200.0,
        "p50_ms_c1": 6.0,
        "p50_ms_c1_search_term": 8.0,
        "naive_p50_ms": 20.0,
        "infinity": {"version": "0.0.78", "requests_per_s": 80.0, "p99_ms": 500.0},
        "memory": {"ratio": 1.04},
    }
    res.update(over)
    return res


def test_serve_summary_ratios_are_against_the_capped_engine_naive_st_and_infinity():
    from bench.bench_serve import summarize

    s = summarize(_serve_result())
    assert s["vs_offline"] == pytest.approx(0.9) and s["ok"]
    assert s["latency_ratio_inputs"] == pytest.approx(0.3)
    assert s["latency_ratio_search_term"] == pytest.approx(0.4)
    assert not s["latency_ok"]  # both bodies must meet 0.35x
    assert s["vs_infinity"] == pytest.approx(2.25) and s["infinity_ok"] and s["memory_ok"]
    s = summarize(_serve_result(texts_per_s=170.0, p50_ms_c1_search_term=7.0, memory={"ratio": 1.2}))
    assert not s["ok"] and s["latency_ok"] and not s["memory_ok"]
    skipped = summarize(_serve_result(infinity={"skipped": "not installed"}))
    assert "vs_infinity" not in skipped and "infinity_ok" not in skipped


def test_serve_reports_the_server_against_its_own_batches_replayed_without_deciding_the_bar():
    from bench.bench_serve import describe, summarize

    res = _serve_result(replay_texts_per_s=190.0, requests_per_s=180.0, texts=1500, precision="fp32")
    res.update(memory={}, p99_ms_c32=200.0, mean_batch_texts_c32=20.0, p99_ms_c1=9.0)
    res.update(summarize(res))
    assert res["vs_replay"] == pytest.approx(180 / 190) and res["ok"] is True  # the bar: 180 / 200
    line = next(line for line in describe(res) if "replayed in process" in line)
    assert "0.95x (reported" in line and "replay / offline 0.95x" in line
    res = _serve_result()  # a result without the replay (an older run): no ratio, no line
    res.update(summarize(res))
    assert res["vs_replay"] is None


def test_a_serve_section_in_another_precision_judges_c32_at_the_servers_default_too():
    from bench.bench_serve import describe, summarize
    from bench.run import done_when

    default = {"precision": "fp32", "requests_per_s": 80.0, "p99_ms": 300.0, "offline_texts_per_s": 100.0}
    default.update(vs_offline=0.8, replay_texts_per_s=85.0, vs_replay=80.0 / 85.0)
    res = _serve_result(precision="bf16", c32_default_precision=default, requests_per_s=180.0, texts=1500)
    res["memory"] = {}
    res.update(p99_ms_c32=200.0, mean_batch_texts_c32=20.0, p99_ms_c1=9.0)
    res.update(summarize(res))
    assert res["ok"] and default["ok"] is False  # bf16 at 0.9x passes, fp32 at 0.8x does not
    assert any("in fp32 (the server's default)" in line and "FAIL" in line for line in describe(res))
    checks = done_when({"serve": {"result": res}})
    assert checks["serve_c32_ok"] and checks["serve_c32_default_precision_ok"] is False
    assert checks["serve_vs_offline_default_precision"] == pytest.approx(0.8)
    assert checks["serve_vs_replay_default_precision"] == pytest.approx(80.0 / 85.0)
    assert any("replayed in process 85.0 texts/s: 0.94x (reported)" in line for line in describe(res))


def test_c32_rounds_report_the_median_round_with_every_rate(monkeypatch, tmp_path):
    from bench import bench_serve

    rates = iter([310.0, 390.0, 350.0])
    monkeypatch.setattr(
        bench_serve, "drive", lambda *a, **k: {"requests_per_s": next(rates), "p99_ms": 1.0, "errors": {}}
    )
    got = bench_serve.drive_rounds(0, ["t"], 1.0, tmp_path, rounds=3)
    assert got["requests_per_s"] == 350.0 and got["rounds"] == [310.0, 390.0, 350.0]


def test_percentile_is_the_nearest_rank_below_in_ms():
    from bench.bench_serve import percentile_ms

    assert percentile_ms([0.003, 0.001, 0.002, 0.004], 0.5) == pytest.approx(3.0)
    assert percentile_ms([0.001] * 99 + [1.0], 0.99) == pytest.approx(1000.0)
    assert percentile_ms([], 0.5) == 0.0


def test_the_load_client_counts_search_term_and_openai_answers_by_their_own_shape():
    """The raw client against a tiny loopback server answering each route as embedkit and
    infinity do: a right answer counts, a 200 of the wrong shape is an error."""
    import asyncio

    from bench.bench_serve import _client

    answers = {
        b"/invocations": {b"inputs": b'{"embeddings":[[0.1]]}', b"search_term": b'{"embedding":[0.1]}'},
        b"/embeddings": {b"input": b'{"object":"list","data":[]}'},
    }

    async def handle(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            route = head.split(b" ")[1]
            key = next(k for k in answers[route] if b'"' + k + b'"' in body)
            payload = answers[route][key] if key != b"inputs" or b"wrong" not in body else b'{"oops":1}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload))
            await writer.drain()
        writer.close()

    async def scenario():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            search = await _client(port, ["a", "b", "c"], 1, 30.0, "search_term")
            openai = await _client(port, ["a", "b"], 2, 30.0, "openai")
            inputs = await _client(port, ["a", "wrong"], 1, 30.0, "inputs")
        finally:
            server.close()
        return search, openai, inputs

    search, openai, inputs = asyncio.run(scenario())
    assert (search["requests"], search["errors"], search["body"]) == (3, {}, "search_term")
    assert (openai["requests"], openai["errors"]) == (2, {})
    assert inputs["errors"] == {"200": 1}  # a 200 without an embeddings list is not a success


def test_coldstart_summary_medians_export_time_and_the_one_second_bar():
    from bench.bench_coldstart import describe, summarize

    def start(s, export=None, measure=None):
        return {"ready_s": s, "export_s": export, "auto_measure_s": measure, "auto_choice": None,
                "graph_exported": export is not None}  # fmt: skip

    starts = {
        "torch": [start(5.0), start(4.0), start(6.0)],
        "auto, baked": [start(5.5, None, 0.4), start(5.9, None, 0.5), start(9.0, None, 0.6)],
        "auto, no graph": [start(12.0, 6.0, 0.5), start(13.0, 7.0, 0.5), start(11.0, 5.0, 0.5)],
    }
    res = summarize(starts)
    rows = {r["case"]: r for r in res["rows"]}
    assert rows["torch"]["ready_s"] == 5.0 and rows["auto, baked"]["ready_s"] == 5.9
    assert rows["auto, no graph"]["export_s"] == 6.0 and rows["auto, no graph"]["graph_exported"]
    assert rows["auto, baked"]["export_s"] is None and not rows["auto, baked"]["graph_exported"]
    assert res["auto_baked_over_torch_s"] == pytest.approx(0.9) and res["ok"]
    starts["auto, baked"][1]["ready_s"] = 6.5
    assert not summarize(starts)["ok"]  # 1.5 s over torch
    assert "PASS" in describe({**res, "reps": 3})[0] and "export 6.0s" in describe({**res, "reps": 3})[0]


def test_done_when_reports_the_serving_memory_and_cold_start_bars():
    result = {
        "job": {"result": {"rss": {"ratio": 1.08}}},
        "serve": {
            "result": {
                **_serve_result(),
                "vs_offline": 0.95,
                "ok": True,
                "latency_ratio_inputs": 0.3,
                "latency_ratio_search_term": 0.32,
                "latency_ok": True,
                "vs_infinity": 2.4,
                "infinity_ok": True,
                "memory_ok": True,
            }
        },
        "coldstart": {
            "result": {
                "rows": [
                    {"case": "torch", "ready_s": 5.0, "export_s": None},
                    {"case": "auto, no graph", "ready_s": 12.0, "export_s": 6.5},
                ],
                "auto_baked_over_torch_s": 0.4,
                "ok": True,
            }
        },
    }
    c = done_when(result)
    assert c["job_rss_ok"] and c["serve_latency_ok"] and c["serve_c32_ok"] and c["serve_vs_infinity_ok"]
    assert c["serve_rss_ok"] and c["coldstart_ok"] and c["coldstart_export_s"] == 6.5
    assert c["coldstart_s"] == {"torch": 5.0, "auto, no graph": 12.0}
    result["job"]["result"]["rss"]["ratio"] = 1.15
    result["serve"]["result"]["infinity"] = {"skipped": "infinity-emb is not installed"}
    del result["serve"]["result"]["infinity_ok"]
    c = done_when(result)
    assert not c["job_rss_ok"] and "not installed" in c["serve_vs_infinity_skipped"]


def test_done_when_compares_engine_ratios_with_the_previous_run_only_on_the_same_cpu():
    rows = [
        _row("baseline", "fp32", 1.0),
        _row("embedkit", "fp32", 1.30, 1.0),
        _row("embedkit", "bf16", 3.0, 0.9999),
    ]
    previous = {"same_cpu": True, "fp32_ratio": 1.35, "best_non_exact_ratio": 3.5}
    c = done_when({"engine": {"rows": rows}, "previous": previous})
    assert c["fp32_not_worse"] and c["fp32_previous_ratio"] == 1.35  # within the 5% spread
    assert not c["non_exact_not_worse"]  # 3.0 against 3.5
    c = done_when({"engine": {"rows": rows}, "previous": {**previous, "same_cpu": False}})
    assert "fp32_not_worse" not in c and "non_exact_not_worse" not in c


def test_previous_ratios_read_latest_json_and_note_the_cpu(tmp_path):
    from bench.run import previous_ratios

    assert previous_ratios(tmp_path, "X") == {}
    latest = {
        "created_utc": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_model": "X"},
        "done_when": {"fp32_ratio": 1.4, "best_non_exact_at_cosine_bar": {"precision": "bf16", "ratio": 3.2}},
    }
    (tmp_path / "latest.json").write_text(json.dumps(latest))
    got = previous_ratios(tmp_path, "X")
    assert got["same_cpu"] and got["fp32_ratio"] == 1.4 and got["best_non_exact_ratio"] == 3.2
    assert not previous_ratios(tmp_path, "Y")["same_cpu"]


def test_the_summary_says_which_backend_auto_picked_and_whether_the_forward_is_unpadded():
    """The closing notes must say which runtime auto gave which batches: the report carries the
    fp32 engine's plan from calibration (the issue's done-when asks for it)."""
    from bench.run import summary_lines

    machine = {"cpu": "Test CPU", "cores": 2, "flags": [], "mem_gib": 1.0, "torch": "2.13.0", "threads": 2}
    result = {
        "machine": machine,
        "corpus": {"texts": 3, "short": 2, "long": 1, "tokens": 30},
        "done_when": {},
        "calibration": {
            "backend_plan": "onnx for batches up to 512 padded tokens, torch above",
            "unpadded": True,
        },
    }
    lines = summary_lines(result)
    assert "embedkit fp32 backend (auto): onnx for batches up to 512 padded tokens, torch above" in lines[-1]
    assert lines[-1].endswith("unpadded forward: yes")
    result["calibration"] = {}  # an older run's calibration: no line rather than a wrong one
    assert not any("backend (auto)" in line for line in summary_lines(result))
