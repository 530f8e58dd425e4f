"""``bench.run`` end to end on a tiny random model and a tiny corpus: worker processes, interleaved
rounds, ratios, cosine, MFU, the encode_iter section and an optional door section.

Checks the harness's arithmetic against its own recorded timings; never asserts on speed."""

from __future__ import annotations

import json
import textwrap

import pytest
from bench import report
from bench import run as bench_run

pytestmark = pytest.mark.slow  # ~2 minutes on 2 cores: worker processes and interleaved rounds


@pytest.fixture
def fake_job_door(tmp_path, monkeypatch, tiny_model):
    """A door module with the bench_job contract, importable by the worker process."""
    (tmp_path / "fake_door_job.py").write_text(
        textwrap.dedent(
            """
            import os, time
            from pathlib import Path
            from embedkit import Embedder

            def run(texts, precision, workdir):
                emb = Embedder(os.environ["FAKE_DOOR_MODEL"], device="cpu", precision=precision)
                t0 = time.perf_counter()
                vecs = emb.encode(texts)
                seconds = time.perf_counter() - t0
                Path(workdir, "done").write_text("ok")
                t0 = time.perf_counter()
                emb.encode(texts)
                same_call = (time.perf_counter() - t0) / seconds
                return {"seconds": seconds, "texts": len(texts), "vectors": vecs, "workdir_used": True,
                        "vs_engine_same_call": same_call}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_DOOR_MODEL", str(tiny_model))
    monkeypatch.setitem(bench_run.DOOR_MODULES, "job", "fake_door_job")
    monkeypatch.setitem(bench_run.DOOR_MODULES, "serve", "no_such_door_module")


def test_bench_run_on_a_tiny_model_computes_ratios_cosine_and_mfu_from_its_timings(
    tiny_model, fake_job_door, tmp_path, capsys, monkeypatch
):
    # as a user without OpenMP settings: the baseline keeps the default, embedkit gets PASSIVE
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setitem(bench_run.USER_ENV, "OMP_WAIT_POLICY", None)
    monkeypatch.setitem(bench_run.EMBEDKIT_ENV, "OMP_WAIT_POLICY", "PASSIVE")
    argv = [
        "--model",
        str(tiny_model),
        "--short",
        "30",
        "--long",
        "3",
        "--reps",
        "2",
        "--sections",
        "engine,iter,job,serve",
        "--precisions",
        "fp32",
        "--peak-reps",
        "1",
        "--iter-sizes",
        "40,120",
        "--results-dir",
        str(tmp_path / "results"),
    ]
    result = bench_run.run(argv)

    rows = {r["config"]: r for r in result["engine"]["rows"]}
    base, fp32 = rows[bench_run.BASELINE], rows["embedkit fp32"]
    same_env = rows[bench_run.BASELINE_SAME_ENV]
    assert len(base["seconds"]) == len(fp32["seconds"]) == 2
    assert base["ratio"] == 1.0
    assert fp32["ratio"] == pytest.approx(report.paired_ratio(base["seconds"], fp32["seconds"]))
    assert fp32["median_s"] == pytest.approx(report.median(fp32["seconds"]))
    # the tiny model in fp32 is the same function in both: the cosine check must see that
    assert fp32["min_cosine"] > 0.9999
    cal = result["calibration"]
    assert result["corpus"]["texts"] == 33 and cal["texts"] == 33
    assert fp32["texts_per_s"] == pytest.approx(33 / fp32["median_s"])
    assert fp32["tokens_per_s"] == pytest.approx(cal["tokens"] / fp32["median_s"])
    # the peak is the best of the samples taken over the run (start, between rounds, before iter)
    peak = result["peak_flops"]["fp32"]
    assert peak == max(s["fp32"] for s in result["peak_samples"]) >= cal["peak_flops"]["fp32"]
    assert len(result["peak_samples"]) == 1 + 2 + 2
    assert fp32["mfu"] == pytest.approx(cal["corpus_flops"] / fp32["median_s"] / peak)
    assert base["peak_rss_mib"] > 50
    # the baseline runs in the user's environment, embedkit in what importing embedkit sets, and a
    # second baseline in embedkit's setting separates the engine's share of the speed-up
    assert base["omp_wait_policy"] is None
    assert fp32["omp_wait_policy"] == same_env["omp_wait_policy"] == "PASSIVE"
    assert fp32["ratio_same_omp_env"] == pytest.approx(
        report.paired_ratio(same_env["seconds"], fp32["seconds"])
    )
    assert same_env["min_cosine"] > 0.9999 and "ratio_same_omp_env" not in same_env

    it = result["iter"]
    assert [r["n"] for r in it["runs"]] == [40, 120] and it["precision"] == "fp32"
    assert it["rss_ratio"] == pytest.approx(it["runs"][1]["peak_rss_mib"] / it["runs"][0]["peak_rss_mib"])

    job = result["job"]["row"]
    # the door's own same-call ratio, chained with the engine's interleaved ratio to the baseline
    assert job["vs_engine"] == result["job"]["result"]["vs_engine_same_call"]
    assert job["ratio"] == pytest.approx(job["vs_engine"] * fp32["ratio"])
    assert job["mfu"] == pytest.approx(cal["corpus_flops"] / job["median_s"] / peak)
    assert job["min_cosine"] > 0.9999
    assert result["job"]["result"]["workdir_used"] is True
    assert "not present" in result["serve"]["skipped"]

    out = capsys.readouterr().out
    assert "embedkit fp32" in out and "job (fp32)" in out and "serve: skipped" in out
    latest = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert latest["machine"]["threads"] >= 1 and latest["machine"]["cpu_model"]
    assert [r["config"] for r in latest["table"]][:3] == [
        bench_run.BASELINE,
        bench_run.BASELINE_SAME_ENV,
        "embedkit fp32",
    ]
