"""The batch job end to end on real Parquet / JSON Lines / CSV files, local disk and S3 (moto)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.batch import embed_dataset
from embedkit.cli import main as cli
from embedkit.errors import InputError, JobStateError
from tests.integration.batch_data import (
    count_markers,
    read_metadata,
    read_parts,
    read_rejects,
    sentence,
    write_parquet_dataset,
)


def _run(inp, out, emb, **kw):
    kw.setdefault("progress", "none")
    return embed_dataset(str(inp), str(out), embedder=emb, **kw)


def test_every_row_ends_in_exactly_one_of_output_or_rejects(tmp_path, tiny_embedder):
    inp = tmp_path / "in"
    inp.mkdir()
    texts = [sentence(i) for i in range(200)]
    bad = {3: None, 10: "", 11: "   ", 50: "x " * 200}  # null, empty, blank, over-long (truncated)
    col = [bad.get(i, t) for i, t in enumerate(texts)]
    pq.write_table(pa.table({"text": col}), inp / "a.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": pa.array([1, 2, 3], pa.int64())}), inp / "b.parquet")
    (inp / "c.parquet").write_bytes(b"definitely not parquet")
    summary = _run(inp, tmp_path / "out", tiny_embedder, unit_rows=64)

    ids, vecs, parts = read_parts(tmp_path / "out")
    rejects = read_rejects(tmp_path / "out")
    embedded = {i for i in ids}
    rejected = {f"{r['source']}:{r['row']}" for r in rejects if r["row"] is not None}
    every_row = {f"a.parquet:{i}" for i in range(200)} | {f"b.parquet:{i}" for i in range(3)}
    assert embedded.isdisjoint(rejected) and embedded | rejected == every_row
    assert len(ids) == len(set(ids)) == 200 - 3
    reasons = {f"{r['source']}:{r['row']}": r["reason"] for r in rejects}
    assert reasons["a.parquet:3"] == "null text"
    assert reasons["a.parquet:10"] == reasons["a.parquet:11"] == "empty text"
    assert reasons["b.parquet:0"] == "not a string: int"
    assert [r["reason"].split(":")[0] for r in rejects if r["source"] == "c.parquet"] == ["unreadable"]

    # same vectors as the engine gives for the same texts
    valid = [i for i in range(200) if i not in (3, 10, 11)]
    expected = tiny_embedder.encode([col[i] for i in valid])
    got = {i: v for i, v in zip(ids, vecs, strict=True)}
    np.testing.assert_allclose(np.stack([got[f"a.parquet:{i}"] for i in valid]), expected, atol=1e-5)

    meta = read_metadata(tmp_path / "out")
    assert meta["complete"] and meta["rows"] == {"in": 203, "embedded": 197, "rejected": 6, "truncated": 1}
    assert meta["files"]["a.parquet"]["rejected"] == 3 and meta["files"]["c.parquet"]["unreadable"] == 1
    assert meta["reject_kinds"] == {"empty text": 2, "not a string": 3, "null text": 1, "unreadable": 1}
    assert meta["dimension"] == 32 and meta["model"]["content_hash"] == tiny_embedder.content_hash
    assert {"embedkit", "torch", "pyarrow"} <= set(meta["versions"])
    assert summary.complete and summary.rows_embedded == 197 and summary.files_rejected == 1
    assert len(parts) == 4  # a.parquet: 200 rows in row groups of 64 -> units 0-64, 64-128, 128-200; b


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parts_read_directly_by_pandas_polars_pyarrow_duckdb(tmp_path, tiny_embedder, dtype):
    import duckdb
    import pandas as pd
    import polars as pl

    write_parquet_dataset(str(tmp_path / "in"), files=2, rows=30)
    _run(tmp_path / "in", tmp_path / "out", tiny_embedder, dtype=dtype, keep_columns="n")
    glob = str(tmp_path / "out" / "part-*.parquet")
    files = sorted(str(p) for p in (tmp_path / "out").glob("part-*.parquet"))
    table = pq.read_table(files)
    assert table.num_rows == 60
    first = np.array(table.column("embedding")[0].as_py(), np.float32)
    assert first.shape == (32,) and abs(float(np.linalg.norm(first)) - 1) < 1e-2
    df = pd.read_parquet(files)
    assert len(df) == 60 and len(df["embedding"].iloc[0]) == 32
    pl_df = pl.read_parquet(glob)
    assert pl_df.height == 60 and pl_df["embedding"].dtype.size == 32
    con = duckdb.connect()
    n, dim, n_sum = con.execute(
        f"SELECT count(*), max(len(embedding)), sum(n) FROM read_parquet('{glob}')"
    ).fetchone()
    assert (n, dim, n_sum) == (60, 32, sum(range(60)))


def test_rerun_skips_recorded_units_and_redoes_only_a_missing_one(tmp_path, tiny_embedder):
    write_parquet_dataset(str(tmp_path / "in"), files=3, rows=40)
    first = _run(tmp_path / "in", tmp_path / "out", tiny_embedder)
    ids1, vecs1, parts1 = read_parts(tmp_path / "out")
    again = _run(tmp_path / "in", tmp_path / "out", tiny_embedder)
    assert (again.units_processed, again.units_skipped, again.rows_embedded) == (0, 3, 120)
    markers = sorted((tmp_path / "out" / "_state" / "units").iterdir())
    markers[1].unlink()  # as if the run had died before recording this unit
    (tmp_path / "out" / parts1[1]).unlink()
    redo = _run(tmp_path / "in", tmp_path / "out", tiny_embedder)
    assert (redo.units_processed, redo.units_skipped) == (1, 2)
    ids2, vecs2, parts2 = read_parts(tmp_path / "out")
    assert ids2 == ids1 and parts2 == parts1 and first.rows_embedded == 120
    np.testing.assert_array_equal(vecs1, vecs2)
    no_resume = _run(tmp_path / "in", tmp_path / "out", tiny_embedder, resume=False)
    assert no_resume.units_processed == 3 and read_parts(tmp_path / "out")[0] == ids1


def test_other_settings_are_refused_unless_overwrite(tmp_path, tiny_model, tiny_embedder):
    from embedkit import Embedder

    write_parquet_dataset(str(tmp_path / "in"), files=2, rows=20)
    _run(tmp_path / "in", tmp_path / "out", tiny_embedder, unit_rows=10)
    small = Embedder(str(tiny_model), device="cpu", dimensions=16)
    with pytest.raises(JobStateError, match=r"dimension: 32 -> 16.*--overwrite"):
        _run(tmp_path / "in", tmp_path / "out", small, unit_rows=10)
    with pytest.raises(JobStateError, match="unit_rows"):
        _run(tmp_path / "in", tmp_path / "out", tiny_embedder, unit_rows=5)
    _run(tmp_path / "in", tmp_path / "out", small, overwrite=True)  # also a new plan: 1 unit per file
    _ids, vecs, parts = read_parts(tmp_path / "out")
    assert vecs.shape == (40, 16) and len(parts) == 2  # the old 10-row parts are gone
    assert count_markers(tmp_path / "out") == 2
    assert read_metadata(tmp_path / "out")["dimension"] == 16


def test_no_truncate_rejects_over_long_texts_naming_their_length(tmp_path, tiny_embedder):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"text": ["short one", "cat " * 100, "short two"]}), inp / "a.parquet")
    s = _run(inp, tmp_path / "out", tiny_embedder, truncate=False)
    assert (s.rows_embedded, s.rows_rejected, s.rows_truncated) == (2, 1, 0)
    (rej,) = read_rejects(tmp_path / "out")
    assert rej["row"] == 1 and rej["reason"].startswith(
        "too long: 102 tokens, over the model's maximum of 32"
    )
    s = _run(inp, tmp_path / "out2", tiny_embedder)
    assert (s.rows_embedded, s.rows_truncated) == (3, 1)


def test_fail_fast_stops_at_the_first_rejected_row(tmp_path, tiny_embedder):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"text": ["fine", None, "fine too"]}), inp / "a.parquet")
    with pytest.raises(InputError, match=r"a\.parquet row 1: null text \(--fail-fast"):
        _run(inp, tmp_path / "out", tiny_embedder, fail_fast=True)
    assert count_markers(tmp_path / "out") == 0


def test_missing_text_column_fails_before_any_work(tmp_path, tiny_embedder):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"title": ["x"], "body": ["y"]}), inp / "a.parquet")
    with pytest.raises(InputError, match="columns found: title, body"):
        _run(inp, tmp_path / "out", tiny_embedder)
    assert not (tmp_path / "out").exists()


def test_single_file_merge_matches_the_parts_and_survives_a_rerun(tmp_path, tiny_embedder):
    write_parquet_dataset(str(tmp_path / "in"), files=3, rows=25)
    _run(tmp_path / "in", tmp_path / "parts", tiny_embedder)
    s = _run(tmp_path / "in", tmp_path / "out", tiny_embedder, single_file=True)
    assert s.single_file.endswith("embeddings.parquet")
    listing = sorted(os.listdir(tmp_path / "out"))
    assert listing == ["_state", "embeddings.parquet", "metadata.json"]
    merged = pq.read_table(tmp_path / "out" / "embeddings.parquet")
    assert merged.column("id").to_pylist() == [
        f"shard-{f:02d}.parquet:{i}" for f in range(3) for i in range(25)
    ]
    ids, vecs, _ = read_parts(tmp_path / "out")
    ids_p, vecs_p, _ = read_parts(tmp_path / "parts")
    assert ids == ids_p
    np.testing.assert_array_equal(vecs, vecs_p)
    assert read_metadata(tmp_path / "out")["layout"]["single_file"] == "embeddings.parquet"
    again = _run(tmp_path / "in", tmp_path / "out", tiny_embedder, single_file=True)
    assert again.units_processed == 0 and (tmp_path / "out" / "embeddings.parquet").exists()
    assert pq.read_table(tmp_path / "out" / "embeddings.parquet").num_rows == 75


def test_two_hosts_split_the_units_and_the_last_one_writes_job_metadata(tmp_path, tiny_embedder):
    write_parquet_dataset(str(tmp_path / "in"), files=3, rows=40, row_group_size=20)
    a = _run(tmp_path / "in", tmp_path / "out", tiny_embedder, unit_rows=20, num_shards=2, shard_index=0)
    assert not a.complete and read_metadata(tmp_path / "out") is None
    host0 = read_metadata(tmp_path / "out", "metadata-shard-0.json")
    assert host0["scope"] == "host" and host0["rows"]["embedded"] == 60 and host0["hosts"]["num_shards"] == 2
    b = _run(tmp_path / "in", tmp_path / "out", tiny_embedder, unit_rows=20, num_shards=2, shard_index=1)
    assert b.complete and a.units_total == b.units_total == 3
    ids, _, parts = read_parts(tmp_path / "out")
    assert len(ids) == len(set(ids)) == 120 and len(parts) == 6
    meta = read_metadata(tmp_path / "out")
    assert (
        meta["complete"]
        and meta["rows"]["embedded"] == 120
        and meta["units"]
        == {
            "total": 6,
            "done": 6,
            "rows_per_unit": 20,
        }
    )


def test_jsonl_and_csv_inputs_with_ids_and_pass_through_columns(tmp_path, tiny_embedder):
    inp = tmp_path / "in"
    inp.mkdir()
    recs = [{"key": f"j{i}", "caption": sentence(i), "lang": "en"} for i in range(5)]
    recs[2]["caption"] = None
    (inp / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    (inp / "b.csv").write_text("key,caption,lang\nc0,hello world,fr\nc1,,de\n")
    s = _run(inp, tmp_path / "out", tiny_embedder, keep_columns=["lang"])
    ids, _, parts = read_parts(tmp_path / "out")
    assert ids == ["c0", "j0", "j1", "j3", "j4"]
    langs = pq.read_table([str(tmp_path / "out" / p) for p in parts]).column("lang").to_pylist()
    assert sorted(langs) == ["en", "en", "en", "en", "fr"]
    reasons = sorted(
        (r["source"], r["row"], r["id"], r["reason"].split(":")[0]) for r in read_rejects(tmp_path / "out")
    )
    assert reasons == [
        ("a.jsonl", 2, "j2", "null text"),
        ("a.jsonl", 5, None, "invalid json"),
        ("b.csv", 1, "c1", "empty text"),
    ]
    assert (s.rows_in, s.rows_embedded, s.rows_rejected) == (8, 5, 3)


def test_s3_input_and_output_resume_and_export_search(moto_server, s3_bucket, tiny_embedder):
    inp, out = f"s3://{s3_bucket}/texts", f"s3://{s3_bucket}/emb"
    texts = write_parquet_dataset(inp, files=3, rows=30, row_group_size=10)
    s = _run(inp, out, tiny_embedder, unit_rows=10, keep_columns="text")
    assert s.complete and s.rows_embedded == 90 and s.units_processed == 9
    again = _run(inp, out, tiny_embedder, unit_rows=10, keep_columns="text")
    assert again.units_processed == 0 and again.units_skipped == 9
    ids, _vecs, parts = read_parts(out)
    assert len(ids) == len(set(ids)) == 90 and len(parts) == 9
    assert read_metadata(out)["rows"]["embedded"] == 90

    from embedkit.batch.export import export_output, load_export
    from embedkit.batch.search import search_output

    info = export_output(out, fmt="faiss")
    assert (info["count"], info["dimension"], info["metric"]) == (90, 32, "ip")
    _, ex_ids, ex_vecs = load_export(out)
    assert sorted(ex_ids.tolist()) == ids and ex_vecs.shape == (90, 32)
    hits = search_output(out, [texts[42]], k=3, embedder=tiny_embedder)[0]
    assert hits[0].id == "shard-01.parquet:12" and hits[0].text == texts[42] and hits[0].score > 0.999


def test_local_input_to_s3_output(moto_server, s3_bucket, tmp_path, tiny_embedder):
    write_parquet_dataset(str(tmp_path / "in"), files=1, rows=15)
    s = _run(tmp_path / "in", f"s3://{s3_bucket}/out", tiny_embedder, single_file=True)
    assert s.complete
    assert read_parts(f"s3://{s3_bucket}/out")[2] == ["embeddings.parquet"]


def test_export_npy_and_search_local_without_export(tmp_path, tiny_model, tiny_embedder):
    texts = write_parquet_dataset(str(tmp_path / "in"), files=2, rows=20)
    _run(tmp_path / "in", tmp_path / "out", tiny_embedder, keep_columns="text")
    from embedkit.batch.search import search_output

    # no export yet: the parts are scanned; the query model is the one recorded in metadata.json
    (hit, *_rest) = search_output(str(tmp_path / "out"), [texts[25]], k=2)[0]
    assert (hit.id, hit.text) == ("shard-01.parquet:5", texts[25])
    assert cli(["export", str(tmp_path / "out"), "--format", "npy"]) == 0
    ids = np.load(tmp_path / "out" / "export" / "ids.npy")
    vecs = np.load(tmp_path / "out" / "export" / "embeddings.npy")
    assert ids.dtype.kind == "U" and vecs.shape == (40, 32) and vecs.dtype == np.float32
    assert search_output(str(tmp_path / "out"), [texts[3]], k=1)[0][0].id == "shard-00.parquet:3"


def test_cli_exit_codes_and_summary(tmp_path, tiny_model, capsys):
    write_parquet_dataset(str(tmp_path / "in"), files=1, rows=10)
    args = [
        "embed",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "--model",
        str(tiny_model),
        "--progress",
        "none",
    ]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"rows embedded\s+10\n", out) and re.search(r"status\s+complete", out)
    assert cli([*args, "--dimensions", "8"]) == 6
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["embed", str(tmp_path / "nothing"), str(tmp_path / "o2"), "--model", str(tiny_model)]) == 5


def test_sagemaker_processing_layout_with_seed_000_arguments(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "opt" / "ml"
    write_parquet_dataset(
        str(root / "processing" / "input" / "data"), files=2, rows=20, column="texto", row_group_size=10
    )
    (root / "processing" / "input" / "code").mkdir(parents=True)
    (root / "processing" / "input" / "code" / "tokenizer.py").write_text(
        "# the Processing job's code input\n"
    )
    (root / "config").mkdir(parents=True)
    argv = [
        "embed",
        "--input-path",
        str(root / "processing" / "input"),
        "--output-path",
        str(root / "processing" / "output"),
        "--model",
        str(tiny_model),
        "--batch-size",
        "0",
        "--unit-rows",
        "10",
        "--progress",
        "none",
    ]
    for host in ("algo-1", "algo-2"):
        (root / "config" / "resourceconfig.json").write_text(
            json.dumps({"current_host": host, "hosts": ["algo-1", "algo-2"]})
        )
        monkeypatch.setenv("EMBEDKIT_RESOURCE_CONFIG", str(root / "config" / "resourceconfig.json"))
        assert cli(argv) == 0
    out = root / "processing" / "output"
    names = sorted(os.listdir(out))
    assert {"metadata-algo-1.json", "metadata-algo-2.json", "metadata.json", "rejects", "_state"} >= set(
        names
    ) - {n for n in names if n.startswith("part-")}
    meta = read_metadata(str(out))
    assert meta["text_column"] == "texto" and meta["rows"]["embedded"] == 40
    assert meta["hosts"]["processed_by"] == ["algo-1", "algo-2"]
    ids, _, parts = read_parts(str(out))
    assert len(ids) == len(set(ids)) == 40 and len(parts) == 4


def test_an_output_holding_someone_elses_part_files_is_refused(tmp_path, tiny_embedder):
    write_parquet_dataset(str(tmp_path / "in"), files=1, rows=5)
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "part-00000.parquet")  # e.g. a Spark output
    with pytest.raises(JobStateError, match="no embedkit job recorded"):
        _run(tmp_path / "in", tmp_path / "out", tiny_embedder)
    assert sorted(os.listdir(tmp_path / "out")) == ["part-00000.parquet"]  # untouched
    _run(tmp_path / "in", tmp_path / "out", tiny_embedder, overwrite=True)
    (part,) = read_parts(tmp_path / "out")[2]
    assert part.startswith("part-shard-00-")  # the foreign file was replaced


def test_a_large_jsonl_file_is_counted_cut_into_units_and_read_once(tmp_path, tiny_embedder, monkeypatch):
    import embedkit.batch.plan as plan_mod

    monkeypatch.setattr(plan_mod, "SPLIT_BYTES", 1000)  # "large" here: over 1 kB
    inp = tmp_path / "in"
    inp.mkdir()
    texts = [sentence(i) for i in range(230)]
    (inp / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (inp / "small.csv").write_text("text\nshort one\n")
    s = _run(inp, tmp_path / "out", tiny_embedder, unit_rows=50)
    assert s.units_processed == 5 + 1 and s.rows_embedded == 231
    ids, vecs, parts = read_parts(tmp_path / "out")
    assert len(parts) == 6 and len(ids) == len(set(ids)) == 231
    got = dict(zip(ids, vecs, strict=True))
    np.testing.assert_allclose(
        np.stack([got[f"big.jsonl:{i}"] for i in range(230)]), tiny_embedder.encode(texts), atol=1e-5
    )
