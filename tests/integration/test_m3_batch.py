"""BGE-M3's three outputs in the batch job: ``embedkit embed --outputs dense,sparse,colbert``, the
part files' columns, resume and the fingerprint, the Ray engine, ``embedkit search --mode`` and
``embedkit export``'s sparse and ColBERT files, on a tiny BGE-M3-like model (an XLM-RoBERTa encoder
with random ``sparse_linear.pt`` / ``colbert_linear.pt`` heads)."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.batch import embed_dataset
from embedkit.batch.settings import JobSettings
from embedkit.cli import main as cli
from embedkit.engine import multi
from embedkit.errors import ConfigError, InterruptedJobError, JobStateError
from tests.integration.batch_data import count_markers, local_ray, read_metadata, read_rejects, sentence

ALL = ("dense", "sparse", "colbert")


@pytest.fixture(scope="module")
def m3(small_m3):
    from embedkit import Embedder

    return Embedder(str(small_m3), device="cpu")


def _texts(n: int = 60) -> list[str]:
    return [sentence(i, 2 + (i * 5) % 17) for i in range(n)]


def _dataset(folder, texts, *, row_group_size: int = 10, name: str = "a.parquet") -> str:
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), os.path.join(folder, name), row_group_size=row_group_size)
    return str(folder)


def _run(inp, out, emb, **kw):
    kw.setdefault("progress", "none")
    kw.setdefault("unit_rows", 10)
    return embed_dataset(str(inp), str(out), embedder=emb, **kw)


def read_outputs(out) -> dict[str, dict]:
    """Every part's rows: id -> {"dense", "sparse" (ids, weights), "colbert"} (those present)."""
    rows: dict[str, dict] = {}
    for name in sorted(os.listdir(out)):
        if not (name.startswith("part-") or name == "embeddings.parquet"):
            continue
        t = pq.read_table(os.path.join(out, name))
        for r in t.to_pylist():
            got: dict = {}
            if "embedding" in r:
                got["dense"] = np.array(r["embedding"], np.float32)
            if "sparse_indices" in r:
                got["sparse"] = (np.array(r["sparse_indices"], np.int32), np.array(r["sparse_values"]))
            if "colbert" in r:
                got["colbert"] = np.array(r["colbert"], np.float32).reshape(
                    -1, t.schema.field("colbert").type.value_type.list_size
                )
            assert r["id"] not in rows, f"duplicate id {r['id']}"
            rows[r["id"]] = got
    return rows


def _assert_rows_equal(rows: dict, ref: dict, atol: float = 0.0) -> None:
    assert list(rows) == list(ref) or sorted(rows) == sorted(ref)
    for key, got in ref.items():
        mine = rows[key]
        assert set(mine) == set(got)
        if "dense" in got:
            np.testing.assert_allclose(mine["dense"], got["dense"], atol=atol, rtol=0)
        if "sparse" in got:
            np.testing.assert_array_equal(mine["sparse"][0], got["sparse"][0])
            np.testing.assert_allclose(mine["sparse"][1], got["sparse"][1], atol=atol, rtol=0)
        if "colbert" in got:
            assert mine["colbert"].shape == got["colbert"].shape
            np.testing.assert_allclose(mine["colbert"], got["colbert"], atol=atol, rtol=0)


# ------------------------------------------------------------------------------------ settings
def test_outputs_setting_from_flag_env_and_config_parsed_and_checked(tmp_path):
    assert JobSettings.resolve(environ={}).outputs == ("dense",)
    env = {"EMBEDKIT_OUTPUTS": "colbert, sparse"}
    got = JobSettings.resolve(environ=env, config={"outputs": ["dense"]})
    assert (got.outputs, got.source("outputs")) == (("sparse", "colbert"), "env EMBEDKIT_OUTPUTS")
    assert JobSettings.resolve(environ={}, config={"outputs": "sparse,dense"}).outputs == ("dense", "sparse")
    assert JobSettings.resolve({"outputs": "dense,colbert"}, environ=env).outputs == ("dense", "colbert")
    assert JobSettings.from_json(got.to_json()).outputs == ("sparse", "colbert")  # SageMaker's shipped JSON
    with pytest.raises(ConfigError, match="unknown output splade"):
        JobSettings.resolve({"outputs": "dense,splade"}, environ={})
    with pytest.raises(ConfigError, match="image jobs write dense vectors only"):
        JobSettings.resolve({"outputs": "sparse", "modality": "image"}, environ={})
    with pytest.raises(ConfigError, match="keep_columns cannot hold 'colbert'"):
        JobSettings.resolve({"outputs": "colbert", "keep_columns": "colbert"}, environ={})
    assert JobSettings.resolve({"keep_columns": "colbert"}, environ={}).keep_columns == ("colbert",)


def test_a_model_without_the_heads_fails_before_any_work(tmp_path, tiny_embedder, tiny_model, capsys):
    inp = _dataset(tmp_path / "in", _texts(20))
    with pytest.raises(ConfigError, match=r"output sparse asked for, but model .* has no sparse_linear.pt"):
        _run(inp, tmp_path / "out", tiny_embedder, outputs="dense,sparse")
    assert not (tmp_path / "out").exists()
    argv = ["embed", inp, str(tmp_path / "out"), "--model", str(tiny_model), "--outputs", "colbert"]
    assert cli([*argv, "--progress", "none"]) == 2
    assert "no colbert_linear.pt head" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- the part files
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_jobs_columns_are_the_engines_outputs(tmp_path, m3, dtype):
    texts = _texts(60)
    texts[7] = None  # rejected as with any job
    inp = _dataset(tmp_path / "in", texts)
    summary = _run(inp, tmp_path / "out", m3, outputs="dense,sparse,colbert", dtype=dtype)
    assert summary.complete and summary.rows_embedded == 59

    part = pq.read_table(next((tmp_path / "out").glob("part-*.parquet")))
    arrow = pa.float16() if dtype == "float16" else pa.float32()
    assert part.column_names == ["id", "embedding", "sparse_indices", "sparse_values", "colbert"]
    assert part.schema.field("embedding").type.value_type == arrow
    assert part.schema.field("sparse_indices").type == pa.list_(pa.int32())
    assert part.schema.field("sparse_values").type.value_type == pa.float32()
    assert part.schema.field("colbert").type.value_type.value_type == arrow

    valid = [i for i in range(60) if i != 7]
    ref = m3.embed_multi([texts[i] for i in valid], ALL)
    expected = {
        f"a.parquet:{i}": {"dense": ref.dense[j], "sparse": ref.sparse[j], "colbert": ref.colbert[j]}
        for j, i in enumerate(valid)
    }
    rows = read_outputs(tmp_path / "out")
    assert sorted(rows) == sorted(expected)
    if dtype == "float32":
        _assert_rows_equal(rows, expected, atol=1e-6)
    else:  # the vectors within fp16 rounding; the sparse weights stay float32
        for key, want in expected.items():
            got = rows[key]
            for name in ("dense", "colbert"):  # |x| <= 1: fp16 keeps 11 bits, an error <= 2**-12
                assert got[name].shape == want[name].shape
                np.testing.assert_allclose(got[name], want[name], atol=2**-11, rtol=0)
            np.testing.assert_array_equal(got["sparse"][0], want["sparse"][0])
            np.testing.assert_allclose(got["sparse"][1], want["sparse"][1], atol=1e-6, rtol=0)
    assert read_rejects(tmp_path / "out")[0]["reason"] == "null text"

    meta = read_metadata(tmp_path / "out")
    assert meta["outputs"] == list(ALL) and meta["vocab_size"] == m3.model.transformer.config.vocab_size
    assert meta["colbert_dimension"] == 32 and meta["dimension"] == 32


def test_any_subset_of_outputs_writes_only_its_columns(tmp_path, m3):
    texts = _texts(20)
    inp = _dataset(tmp_path / "in", texts)
    for outputs, columns in [
        ("sparse", ["id", "sparse_indices", "sparse_values"]),
        ("colbert,dense", ["id", "embedding", "colbert"]),
        ("dense", ["id", "embedding"]),
    ]:
        out = tmp_path / outputs.replace(",", "-")
        _run(inp, out, m3, outputs=outputs)
        part = pq.read_table(next(out.glob("part-*.parquet")))
        assert part.column_names == columns, outputs
        assert read_metadata(out)["outputs"] == list(multi.parse_outputs(outputs))
    ref = m3.embed_multi(texts, ("sparse",))
    rows = read_outputs(tmp_path / "sparse")
    _assert_rows_equal(rows, {f"a.parquet:{i}": {"sparse": ref.sparse[i]} for i in range(20)}, atol=1e-6)
    # a dense job's fingerprint is the one it had before there were other outputs
    job = json.loads((tmp_path / "dense" / "_state" / "job.json").read_text())
    assert "outputs" not in job["fingerprint"]


def test_single_file_merge_keeps_the_nested_columns(tmp_path, m3):
    inp = _dataset(tmp_path / "in", _texts(30))
    _run(inp, tmp_path / "parts", m3, outputs="dense,sparse,colbert")
    _run(inp, tmp_path / "one", m3, outputs="dense,sparse,colbert", single_file=True)
    assert not list((tmp_path / "one").glob("part-*.parquet"))
    _assert_rows_equal(read_outputs(tmp_path / "one"), read_outputs(tmp_path / "parts"))


# ----------------------------------------------------------------------- resume and fingerprint
class _StopAfter:
    """``embedder``, setting ``stop`` once ``calls`` chunks were embedded (as a SIGTERM would)."""

    def __init__(self, embedder, stop: threading.Event, calls: int) -> None:
        self._e, self._stop, self._left = embedder, stop, calls

    def __getattr__(self, name):
        return getattr(self._e, name)

    def embed_tokenized_multi(self, tok, outputs, **kw):
        self._left -= 1
        if self._left <= 0:
            self._stop.set()
        return self._e.embed_tokenized_multi(tok, outputs, **kw)


def test_an_interrupted_multi_output_job_resumes_without_losing_or_duplicating_rows(tmp_path, m3):
    inp = _dataset(tmp_path / "in", _texts(80))
    ref = tmp_path / "ref"
    _run(inp, ref, m3, outputs=ALL)
    out = tmp_path / "out"
    stop = threading.Event()
    with pytest.raises(InterruptedJobError):
        _run(inp, out, _StopAfter(m3, stop, 3), outputs=ALL, stop_event=stop)
    stopped_at = count_markers(out)
    assert 0 < stopped_at < 8 and read_metadata(out) is None
    summary = _run(inp, out, m3, outputs=ALL)
    assert summary.complete and summary.units_skipped == stopped_at
    assert summary.units_processed == 8 - stopped_at and summary.rows_embedded == 80
    _assert_rows_equal(read_outputs(out), read_outputs(ref))

    # a unit whose record was lost (the run died before recording it) is redone, alone
    markers = sorted((out / "_state" / "units").iterdir())
    markers[2].unlink()
    redo = _run(inp, out, m3, outputs=ALL)
    assert (redo.units_processed, redo.units_skipped) == (1, 7)
    _assert_rows_equal(read_outputs(out), read_outputs(ref))


def test_other_outputs_are_another_job_refused_unless_overwrite(tmp_path, m3):
    inp = _dataset(tmp_path / "in", _texts(20))
    out = tmp_path / "out"
    _run(inp, out, m3, outputs="dense,sparse")
    with pytest.raises(
        JobStateError, match=r"outputs: \['dense', 'sparse'\] -> \['dense', 'sparse', 'colbert'\]"
    ):
        _run(inp, out, m3, outputs=ALL)
    with pytest.raises(JobStateError, match=r"outputs: \['dense', 'sparse'\] -> None"):
        _run(inp, out, m3)  # dense alone
    assert _run(inp, out, m3, outputs="sparse,dense").units_processed == 0  # the same outputs resume
    summary = _run(inp, out, m3, outputs=ALL, overwrite=True)
    assert summary.units_processed == 2 and summary.complete
    assert pq.read_table(next(out.glob("part-*.parquet"))).column_names[-1] == "colbert"
    assert read_metadata(out)["outputs"] == list(ALL)


# ---------------------------------------------------------------------------------------- search
@pytest.fixture(scope="module")
def m3_job(tmp_path_factory, m3):
    """A finished job with the three outputs, the text kept for the hits."""
    root = tmp_path_factory.mktemp("m3-job")
    texts = _texts(40)
    pq.write_table(pa.table({"text": texts, "key": [f"doc-{i:02d}" for i in range(40)]}), root / "in.parquet")
    _run(root / "in.parquet", root / "out", m3, outputs=ALL, keep_columns="text")
    return str(root / "out"), texts


def _by_hand(m3, texts, query, mode, weights=multi.HYBRID_WEIGHTS):
    d = m3.embed_multi(texts, ALL)
    q = m3.embed_multi([query], ALL)
    dense = multi.dense_scores(q.dense, d.dense)[0]
    sparse = [multi.sparse_score(q.sparse[0], s) for s in d.sparse]
    colbert = [multi.colbert_score(q.colbert[0], c) for c in d.colbert]
    per = {"dense": dense, "sparse": sparse, "colbert": colbert}
    if mode != "hybrid":
        return np.asarray(per[mode], np.float64)
    return np.array(
        [multi.hybrid_score((dense[i], sparse[i], colbert[i]), weights) for i in range(len(texts))]
    )


@pytest.mark.parametrize(
    ("mode", "weights"),
    [("dense", None), ("sparse", None), ("colbert", None), ("hybrid", None), ("hybrid", "1,0.5,0.25")],
)
def test_search_modes_rank_by_m3s_scores(m3_job, m3, mode, weights):
    from embedkit.batch.search import parse_weights, search_output

    out, texts = m3_job
    query = texts[11] + " cat"
    hits = search_output(out, [query], k=5, embedder=m3, mode=mode, weights=weights)[0]
    expected = _by_hand(m3, texts, query, mode, parse_weights(weights))
    top = np.argsort(-expected, kind="stable")[:5]
    assert [h.id for h in hits] == [f"doc-{i:02d}" for i in top]
    np.testing.assert_allclose([h.score for h in hits], expected[top], atol=1e-5, rtol=0)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and hits[0].text == texts[top[0]]


def test_search_cli_modes_and_clear_errors(m3_job, small_m3, tmp_path, m3, capsys):
    from embedkit.batch.search import search_output

    out, texts = m3_job
    base = ["search", out, texts[3], "-k", "3", "--model", str(small_m3), "--json"]
    assert cli([*base, "--mode", "hybrid", "--weights", "0.5,0.5,0"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert len(hits) == 3 and hits[0]["id"] == "doc-03"
    assert cli([*base, "--mode", "sparse", "--weights", "1,1,1"]) == 2
    assert "--weights applies to --mode hybrid" in capsys.readouterr().err
    assert cli([*base, "--mode", "hybrid", "--weights", "1,1"]) == 2
    assert "three numbers" in capsys.readouterr().err

    # a dense job has no sparse or ColBERT columns to search
    _run(_dataset(tmp_path / "in", texts[:10]), tmp_path / "dense", m3)
    with pytest.raises(ConfigError, match=r"--mode colbert needs the colbert output \(colbert column\)"):
        search_output(str(tmp_path / "dense"), ["x"], embedder=m3, mode="colbert")
    with pytest.raises(ConfigError, match=r"--mode hybrid needs the sparse, colbert output"):
        search_output(str(tmp_path / "dense"), ["x"], embedder=m3, mode="hybrid")
    # ...but hybrid with those weights at 0 is plain dense scoring
    hits = search_output(str(tmp_path / "dense"), [texts[2]], embedder=m3, mode="hybrid", weights="1,0,0")
    dense = search_output(str(tmp_path / "dense"), [texts[2]], embedder=m3)
    assert [h.id for h in hits[0]] == [h.id for h in dense[0]]
    np.testing.assert_allclose([h.score for h in hits[0]], [h.score for h in dense[0]], atol=1e-6)


# ---------------------------------------------------------------------------------------- export
def test_export_writes_csr_sparse_and_stacked_colbert_with_offsets(m3_job, m3, tmp_path):
    from embedkit.batch.export import export_output
    from embedkit.batch.search import search_output

    out, texts = m3_job
    dest = str(tmp_path / "export")
    info = export_output(out, dest=dest)
    assert info["files"] == ["embeddings.npy", "ids.npy", "sparse.npz", "colbert.npy", "colbert_offsets.npy"]
    assert info["outputs"] == list(ALL) and info["vocab_size"] == m3.model.transformer.config.vocab_size
    assert json.loads((tmp_path / "export" / "export.json").read_text())["colbert_dimension"] == 32
    ids = list(np.load(os.path.join(dest, "ids.npy")))
    ref = m3.embed_multi(texts, ALL)
    order = [int(i.split("-")[1]) for i in ids]

    np.testing.assert_allclose(np.load(os.path.join(dest, "embeddings.npy")), ref.dense[order], atol=1e-6)

    with np.load(os.path.join(dest, "sparse.npz")) as z:
        assert set(z.files) == {"data", "indices", "indptr", "shape", "format"}
        assert z["format"].item() == b"csr"
    scipy_sparse = pytest.importorskip("scipy.sparse")
    csr = scipy_sparse.load_npz(os.path.join(dest, "sparse.npz"))
    assert csr.format == "csr" and csr.shape == (40, info["vocab_size"]) and csr.has_sorted_indices
    assert csr.nnz == info["sparse_nnz"] == sum(len(s[0]) for s in ref.sparse)
    for row, i in enumerate(order):
        want_ids, want_w = ref.sparse[i]
        dense_row = csr.getrow(row).toarray()[0]
        np.testing.assert_allclose(dense_row[want_ids], want_w, atol=1e-6, rtol=0)
        assert np.count_nonzero(dense_row) == len(want_ids)

    vecs = np.load(os.path.join(dest, "colbert.npy"))
    offsets = np.load(os.path.join(dest, "colbert_offsets.npy"))
    assert offsets.dtype == np.int64 and len(offsets) == 41 and offsets[0] == 0
    assert offsets[-1] == len(vecs) == info["colbert_vectors"] and vecs.shape[1] == 32
    assert (np.diff(offsets) == [len(ref.colbert[i]) for i in order]).all()
    for row, i in enumerate(order):
        np.testing.assert_allclose(vecs[offsets[row] : offsets[row + 1]], ref.colbert[i], atol=1e-6)

    # the export in OUTPUT/export answers dense searches; the other modes still read the parts
    export_output(out)
    assert search_output(out, [texts[5]], k=1, embedder=m3)[0][0].id == "doc-05"
    assert search_output(out, [texts[5]], k=1, embedder=m3, mode="colbert")[0][0].id == "doc-05"


def test_export_of_a_sparse_only_float16_colbert_job(tmp_path, m3, capsys):
    from embedkit.batch.export import export_output

    inp = _dataset(tmp_path / "in", _texts(25))
    _run(inp, tmp_path / "sparse", m3, outputs="sparse")
    info = export_output(str(tmp_path / "sparse"))
    assert info["files"] == ["ids.npy", "sparse.npz"] and info["dimension"] is None
    with pytest.raises(ConfigError, match="--format faiss needs the dense output"):
        export_output(str(tmp_path / "sparse"), fmt="faiss")

    _run(inp, tmp_path / "half", m3, outputs="colbert", dtype="float16")
    assert cli(["export", str(tmp_path / "half")]) == 0
    assert "outputs colbert" in capsys.readouterr().out
    vecs = np.load(tmp_path / "half" / "export" / "colbert.npy")
    offsets = np.load(tmp_path / "half" / "export" / "colbert_offsets.npy")
    assert vecs.dtype == np.float16 and offsets[-1] == len(vecs) and len(offsets) == 26


# ------------------------------------------------------------------------------------------- Ray
@pytest.mark.slow  # ~30 s: a local Ray and two actors on 2 cores
def test_ray_engine_writes_the_local_engines_columns(tmp_path, small_m3):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'embedkit[ray]')")
    texts = _texts(60)
    texts[4] = "  "
    inp = _dataset(tmp_path / "in", texts)
    common = ["--model", str(small_m3), "--unit-rows", "10", "--progress", "none"]
    common += ["--outputs", "dense,sparse,colbert", "--dtype", "float16"]
    assert cli(["embed", inp, str(tmp_path / "local"), *common]) == 0
    with local_ray():
        assert (
            cli(["embed", inp, str(tmp_path / "ray"), *common, "--engine", "ray", "--num-workers", "2"]) == 0
        )
    _assert_rows_equal(read_outputs(tmp_path / "ray"), read_outputs(tmp_path / "local"))
    assert read_rejects(tmp_path / "ray") == read_rejects(tmp_path / "local")
    meta, local = read_metadata(tmp_path / "ray"), read_metadata(tmp_path / "local")
    assert meta["runner"]["engine"] == "ray" and meta["outputs"] == local["outputs"] == list(ALL)
    assert meta["rows"] == local["rows"] and meta["colbert_dimension"] == 32
    assert sorted(os.listdir(tmp_path / "ray")) == sorted(os.listdir(tmp_path / "local"))
