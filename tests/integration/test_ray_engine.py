"""``embedkit embed --engine ray``: the same dataset as the local engine, resumable across engines,
exactly once when the driver is killed, and a clear error (not a hang) when the cluster is too small.

One local Ray (2 CPUs, no GPU) is shared by the module (starting Ray and its actors costs seconds);
the killed driver joins it with ``--ray-address``, so killing it leaves no Ray processes behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit import __version__
from embedkit.batch import embed_dataset
from embedkit.batch.ray_runner import size_workers
from embedkit.cli import main as cli
from embedkit.errors import ConfigError, InputError
from embedkit.io.fs import get_fs
from tests.integration.batch_data import (
    count_markers,
    local_ray,
    read_metadata,
    read_parts,
    read_rejects,
    sentence,
    write_parquet_dataset,
)

pytestmark = pytest.mark.slow  # ~95 s: Ray clusters and actors on 2 cores

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'embedkit[ray]')")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model)


@pytest.fixture(autouse=True)
def _actor_threads_stay_here():
    """A UnitWorker built in this process (as some tests do, to test the actor's code without Ray)
    sets OMP_NUM_THREADS and torch's thread count as an actor does; put both back, so later tests
    (and the servers they start, which inherit the environment) keep the machine's threads."""
    import torch

    env, threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    yield
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for the module (starting one costs seconds); yields its address."""
    with local_ray() as address:
        yield address


def _same_dataset(out, ref) -> None:
    ids, vecs, parts = read_parts(out)
    ref_ids, ref_vecs, ref_parts = read_parts(ref)
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert ids == ref_ids and parts == ref_parts
    assert vecs.shape == ref_vecs.shape and float(np.abs(vecs - ref_vecs).max()) <= 1e-6
    key = lambda r: (r["source"], r["row"])  # noqa: E731
    assert sorted(read_rejects(out), key=key) == sorted(read_rejects(ref), key=key)
    meta, ref_meta = read_metadata(out), read_metadata(ref)
    assert meta["complete"] and meta["rows"] == ref_meta["rows"] and meta["units"] == ref_meta["units"]


# ------------------------------------------------------------------------------ sizing (no Ray)
def test_workers_on_two_cores_reserve_fractions_that_leave_cpu_free():
    two = size_workers([{"CPU": 2}], 2)
    assert (two.cpus_per_worker, two.threads) == (0.75, 1)  # 1.5 of 2 reserved: never every core
    one = size_workers([{"CPU": 2}], 1)
    assert (one.cpus_per_worker, one.threads) == (1.5, 2)  # one worker uses both cores, like local
    # two nodes of 4: three workers cannot get 2.5 CPUs each (only one fits per node), 2.0 can
    three = size_workers([{"CPU": 4}, {"CPU": 4}], 3)
    assert three.cpus_per_worker == 2.0 and three.num_workers == 3
    gpus = size_workers([{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}], gpus_per_worker=1)
    assert (gpus.num_workers, gpus.cpus_per_worker, gpus.gpus_per_worker) == (4, 1.0, 1.0)


def test_requests_the_cluster_cannot_hold_fail_fast_naming_what_it_has():
    with pytest.raises(ConfigError, match=r"has no GPU .*2 CPU, 0 GPU.*--gpus-per-worker 0"):
        size_workers([{"name": "n1", "CPU": 2}], 1, gpus_per_worker=1)
    with pytest.raises(ConfigError, match=r"3 worker\(s\) x 1.0 CPU cannot be placed.*room for 2"):
        size_workers([{"CPU": 2}], 3, cpus_per_worker=1)
    with pytest.raises(ConfigError, match=r"room for 2 such worker"):
        size_workers([{"CPU": 16, "GPU": 2}], 3, gpus_per_worker=1)
    with pytest.raises(ConfigError, match="fraction below 1 or a whole number"):
        size_workers([{"CPU": 16, "GPU": 4}], 1, gpus_per_worker=1.5)


# ------------------------------------------------------------- the actor's code, without Ray
def _worker_job(inp: str, out: str, model: str, fingerprint_changes: dict | None = None, **options):
    """A WorkerJob as the driver builds it (plan, state, folder, fingerprint) for ``inp`` -> ``out``."""
    from embedkit.batch.metadata import job_fingerprint
    from embedkit.batch.output import OutputFolder
    from embedkit.batch.plan import make_plan
    from embedkit.batch.ray_runner.worker import WorkerJob, driver_embedder, worker_engine_settings
    from embedkit.batch.settings import JobSettings, detect_hosts
    from embedkit.batch.state import JobState

    settings = JobSettings.build({"input": inp, "output": out, "model": model, "unit_rows": 10, **options})
    emb = driver_embedder(settings)
    plan = make_plan(inp, unit_rows=10, fail_fast=settings.fail_fast)
    fs, root = get_fs(out)
    state = JobState(fs, root, {**job_fingerprint(settings, emb, plan), **(fingerprint_changes or {})})
    state.check(overwrite=False)
    folder = OutputFolder(fs, root)
    folder.scan()
    engine = worker_engine_settings(emb, "cpu")
    hosts = detect_hosts(None, None)
    return WorkerJob(
        settings, engine, plan, state, folder, hosts, plan.units, state.fingerprint, 1, __version__
    )


def test_actor_records_units_and_returns_errors_as_embedkit_errors(tmp_path, model_dir):
    from embedkit.batch.ray_runner.worker import UnitWorker, rebuild_error

    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    col = [sentence(i) for i in range(20)]
    col[13] = None
    os.makedirs(inp)
    pq.write_table(pa.table({"text": col}), os.path.join(inp, "a.parquet"), row_group_size=10)

    worker = UnitWorker(_worker_job(inp, out, model_dir))
    res = [json.loads(worker.run_unit(k)) for k in (0, 1)]
    assert [r["ok"] for r in res] == [True, True] and count_markers(out) == 2
    assert [r["marker"]["embedded"] for r in res] == [10, 9] and res[0]["engine"]["threads"] == 1
    assert read_rejects(out) == [
        {"source": "a.parquet", "row": 13, "id": "a.parquet:13", "reason": "null text"}
    ]

    strict = UnitWorker(_worker_job(inp, str(tmp_path / "strict"), model_dir, fail_fast=True))
    rec = json.loads(strict.run_unit(1))
    err = rebuild_error(rec)
    assert isinstance(err, InputError) and err.exit_code == 2 and "a.parquet row 13: null text" in str(err)
    assert count_markers(tmp_path / "strict") == 0

    # a node whose model differs from the driver's refuses to write into the job
    other = UnitWorker(_worker_job(inp, str(tmp_path / "other"), model_dir, {"model_hash": "0" * 16}))
    err = rebuild_error(json.loads(other.run_unit(0)))
    assert (
        isinstance(err, ConfigError) and "differs from the driver's" in str(err) and "model_hash" in str(err)
    )
    assert count_markers(tmp_path / "other") == 0


def test_gpu_workers_driver_fingerprints_on_cpu_with_the_workers_precision(model_dir):
    from embedkit.batch.ray_runner.worker import driver_embedder, worker_engine_settings
    from embedkit.batch.settings import JobSettings

    view = driver_embedder(
        JobSettings.build({"model": model_dir, "gpus_per_worker": 1, "precision": "float16"})
    )
    assert (view.precision, view.device, view.describe()["device"]) == ("fp16", "cuda", "cuda")
    assert str(view.model.transformer.device) == "cpu"  # the driver never takes the workers' GPU
    engine = worker_engine_settings(view, "cuda")
    assert (engine["device"], engine["precision"], engine["max_batch_tokens"]) == ("cuda", "fp16", 0)
    with pytest.raises(ConfigError, match="--device cuda with --engine ray needs --gpus-per-worker"):
        driver_embedder(JobSettings.build({"model": model_dir, "device": "cuda"}))


# ------------------------------------------------------------------------------ on a local Ray
def test_ray_engine_with_two_workers_gives_the_local_engines_dataset(tmp_path, model_dir, ray_cluster):
    inp = tmp_path / "in"
    write_parquet_dataset(str(inp), files=2, rows=60, row_group_size=10)
    col = [sentence(i) for i in range(30)]
    col[4], col[7] = None, "  "  # rejected rows go to rejects/ with either engine
    pq.write_table(pa.table({"text": col}), inp / "with-bad-rows.parquet", row_group_size=10)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    embed_dataset(str(inp), str(local), model=model_dir, device="cpu", unit_rows=10, progress="none")

    argv = ["embed", str(inp), str(on_ray), "--model", model_dir, "--unit-rows", "10", "--progress", "none"]
    assert cli([*argv, "--engine", "ray", "--num-workers", "2"]) == 0
    _same_dataset(on_ray, local)
    assert count_markers(on_ray) == count_markers(local) == 15
    assert {r["reason"] for r in read_rejects(on_ray)} == {"null text", "empty text"}
    runner = read_metadata(on_ray)["runner"]
    assert runner["engine"] == "ray" and runner["sizing"]["num_workers"] == 2
    assert runner["sizing"]["cpus_per_worker"] == 0.75 and runner["worker_engine"]["threads"] == 1
    assert 1 <= len(runner["workers"]) <= 2
    assert sum(w["units"] for w in runner["workers"].values()) == 15
    assert sum(w["rows"] for w in runner["workers"].values()) == 148
    assert runner["startup_seconds"] > 0 and runner["pool_seconds"] > 0

    # either engine resumes the other's job: everything is recorded, nothing is recomputed
    summary = embed_dataset(
        str(inp), str(on_ray), model=model_dir, device="cpu", unit_rows=10, progress="none"
    )
    assert summary.complete and summary.units_processed == 0 and summary.units_skipped == 15
    _same_dataset(on_ray, local)


def _driver(inp: str, out: str, model: str, address: str) -> subprocess.Popen:
    """``embedkit embed --engine ray`` in a child process, joining the module's Ray (one worker: the
    parity test covers two, and one actor starts faster on 2 busy cores)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.path.join(ROOT, "src"))
    cmd = [sys.executable, "-m", "embedkit", "embed", inp, out, "--model", model, "--progress", "log"]
    cmd += ["--unit-rows", "10", "--max-batch-tokens", "32", "--engine", "ray", "--num-workers", "1"]
    return subprocess.Popen(
        [*cmd, "--ray-address", address],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _signal_at(proc: subprocess.Popen, out: str, markers: int, sig: int) -> tuple[int, str]:
    """Send ``sig`` once ``markers`` units are recorded; the exit code and stderr."""
    try:
        deadline = time.monotonic() + 150
        while count_markers(out) < markers and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"the job ended before the signal: {proc.stderr.read()}"
        assert count_markers(out) >= markers, "no unit recorded in time"
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)  # SageMaker's grace after SIGTERM is 30 s
        return rc, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()


def test_sigkilled_then_sigtermed_ray_driver_then_local_engine_give_the_uninterrupted_dataset(
    tmp_path, model_dir, ray_cluster
):
    inp, out, ref = str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "ref")
    write_parquet_dataset(inp, files=3, rows=100, row_group_size=10)
    rc, _ = _signal_at(_driver(inp, out, model_dir, ray_cluster), out, 3, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    killed_at = count_markers(out)
    assert killed_at < 30

    # rerun on Ray: it skips what the killed run recorded; SIGTERM after 2 more units
    rc, err = _signal_at(_driver(inp, out, model_dir, ray_cluster), out, killed_at + 2, signal.SIGTERM)
    assert rc == 130, err
    assert "received SIGTERM" in err and "Rerun the same command to resume" in err
    assert re.search(rf"units +\d+ processed, {killed_at} skipped, 30 total", err), err
    stopped_at = count_markers(out)
    assert killed_at + 2 <= stopped_at < 30 and read_metadata(out) is None

    # then the local engine finishes the job: the same dataset as one uninterrupted run
    summary = embed_dataset(inp, out, model=model_dir, device="cpu", unit_rows=10, progress="none")
    assert summary.complete and summary.units_skipped == stopped_at
    embed_dataset(inp, ref, model=model_dir, device="cpu", unit_rows=10, progress="none")
    _same_dataset(out, ref)
    assert [n for n in os.listdir(out) if n.startswith(".")] == []  # temp files of the killed run cleaned


def test_cli_refuses_a_pool_the_cluster_cannot_hold_instead_of_hanging(
    tmp_path, model_dir, ray_cluster, capsys
):
    inp = tmp_path / "in"
    write_parquet_dataset(str(inp), files=1, rows=20)
    base = ["embed", str(inp), str(tmp_path / "out"), "--model", model_dir, "--engine", "ray"]
    assert cli([*base, "--num-workers", "2", "--gpus-per-worker", "1"]) == 2
    err = capsys.readouterr().err
    assert "has no GPU" in err and "--gpus-per-worker 0" in err
    assert cli([*base, "--num-workers", "3", "--cpus-per-worker", "1"]) == 2
    err = capsys.readouterr().err
    assert "3 worker(s) x 1.0 CPU cannot be placed" in err and "room for 2" in err
    assert count_markers(tmp_path / "out") == 0


def test_the_driver_embeds_while_its_private_ray_starts_and_the_dataset_is_the_local_one(tmp_path, model_dir):
    """Without --ray-address the job starts its own Ray; until the first actor has loaded the model
    the driver runs units from the same queue. Every unit is recorded once, by one of them."""
    inp, out, ref = str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "ref")
    write_parquet_dataset(inp, files=3, rows=100, row_group_size=10)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.path.join(ROOT, "src"))
    cmd = [sys.executable, "-m", "embedkit", "embed", inp, out, "--model", model_dir, "--progress", "none"]
    cmd += ["--unit-rows", "10", "--engine", "ray", "--num-workers", "1"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    embed_dataset(inp, ref, model=model_dir, device="cpu", unit_rows=10, progress="none")
    _same_dataset(out, ref)
    runner = read_metadata(out)["runner"]
    assert runner["engine"] == "ray" and runner["address"] == "local"
    assert runner["driver_units"] >= 1
    assert runner["driver_units"] + sum(w["units"] for w in runner["workers"].values()) == 30
    assert count_markers(out) == 30
