"""Exactly once, whatever happens: ``kill -9`` at random points, then a rerun, gives the same dataset
as an uninterrupted run (same ids, same vectors, no duplicates), on local disk and on S3 (moto).
SIGTERM stops the job within the grace period with exit code 130 and a resume hint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from embedkit.batch import embed_dataset
from tests.integration.batch_data import (
    count_markers,
    read_metadata,
    read_parts,
    read_rejects,
    write_parquet_dataset,
)

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The in-process reference runs use a tiny model: one thread is fastest on a shared machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _start(inp: str, out: str, model: str, *extra: str) -> subprocess.Popen:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.path.join(ROOT, "src")
    )
    cmd = [sys.executable, "-m", "embedkit", "embed", inp, out, "--model", model, "--progress", "log", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for_markers(out: str, proc: subprocess.Popen, at_least: int, timeout: float = 120.0) -> bool:
    """Poll the job's state until ``at_least`` units are recorded; False if the job ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_markers(out) >= at_least:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise TimeoutError(f"no {at_least} recorded units in {out} after {timeout}s")


def _same_dataset(out: str, ref: str) -> None:
    ids, vecs, parts = read_parts(out)
    ref_ids, ref_vecs, ref_parts = read_parts(ref)
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert ids == ref_ids and parts == ref_parts
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)
    key = lambda r: (r["source"], r["row"])  # noqa: E731
    assert sorted(read_rejects(out), key=key) == sorted(read_rejects(ref), key=key)
    meta, ref_meta = read_metadata(out), read_metadata(ref)
    assert meta["complete"] and meta["rows"] == ref_meta["rows"] and meta["units"] == ref_meta["units"]


def _kill_at_random_points(inp: str, out: str, ref: str, model: str, seed: int, kills: int = 3) -> None:
    from embedkit import Embedder

    emb = Embedder(model, device="cpu")
    args = ("--unit-rows", "10")
    embed_dataset(inp, ref, embedder=emb, unit_rows=10, progress="none")
    total = read_metadata(ref)["units"]["total"]
    rng = random.Random(seed)
    killed = 0
    for _ in range(kills):
        done = count_markers(out)
        proc = _start(inp, out, model, *args)
        target = rng.randint(done + 1, max(done + 1, done + (total - done) // 2))
        if _wait_for_markers(out, proc, target):
            time.sleep(rng.uniform(0.0, 0.15))  # the kill point: anywhere inside the next unit(s)
            proc.send_signal(signal.SIGKILL)
            killed += proc.wait(timeout=30) == -signal.SIGKILL
        else:
            assert proc.wait(timeout=30) == 0, proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert killed >= 1, "the job always finished before the kill: make the dataset larger"
    summary = embed_dataset(inp, out, embedder=emb, unit_rows=10, progress="none")
    assert summary.complete and summary.units_skipped > 0
    _same_dataset(out, ref)


def test_kill_9_at_random_points_then_rerun_gives_the_uninterrupted_dataset_local(tmp_path, model_dir):
    inp = str(tmp_path / "in")
    write_parquet_dataset(inp, files=3, rows=100, row_group_size=10)
    _kill_at_random_points(inp, str(tmp_path / "out"), str(tmp_path / "ref"), model_dir, seed=9)
    leftovers = [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]
    assert leftovers == []  # temp files of killed runs are cleaned by the rerun


def test_kill_9_at_random_points_then_rerun_gives_the_uninterrupted_dataset_s3(
    moto_server, s3_bucket, model_dir
):
    inp = f"s3://{s3_bucket}/in"
    write_parquet_dataset(inp, files=2, rows=80, row_group_size=10)
    _kill_at_random_points(inp, f"s3://{s3_bucket}/out", f"s3://{s3_bucket}/ref", model_dir, seed=3)


def test_sigterm_saves_state_exits_130_and_says_how_to_resume(tmp_path, model_dir):
    from embedkit import Embedder

    inp, out, ref = str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "ref")
    write_parquet_dataset(inp, files=2, rows=100, row_group_size=10)
    proc = _start(inp, out, model_dir, "--unit-rows", "10", "--max-batch-tokens", "32")
    assert _wait_for_markers(out, proc, 2), proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=20)  # SageMaker's grace is 30 s
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert rc == 130, err
    assert "Rerun the same command to resume" in err and "received SIGTERM" in err
    recorded = count_markers(out)
    assert 2 <= recorded < 20 and read_metadata(out) is None
    emb = Embedder(model_dir, device="cpu")  # the batch budget is not part of the job's fingerprint
    summary = embed_dataset(inp, out, embedder=emb, unit_rows=10, progress="none")
    assert summary.units_skipped == recorded and summary.complete
    embed_dataset(inp, ref, embedder=emb, unit_rows=10, progress="none")
    _same_dataset(out, ref)
