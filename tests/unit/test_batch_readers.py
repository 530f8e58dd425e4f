"""Readers (row ranges of Parquet, JSON Lines, CSV) and writers (parts, rejects, atomic files)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.batch.output import REJECTS_SCHEMA, OutputFolder, embeddings_table, rejects_table
from embedkit.io.fs import TMP_PREFIX, get_fs, list_files, write_bytes
from embedkit.io.readers import count_rows, describe_file, format_of, read_rows


def _info(path):
    fs, p = get_fs(str(path))
    return fs, describe_file(fs, p, os.path.basename(p), size=os.path.getsize(p))


def test_format_detection_by_name():
    assert [format_of(n) for n in ("a.parquet", "b.JSONL", "c.ndjson.gz", "d.csv", "e.tsv", "f.txt")] == [
        "parquet",
        "jsonl",
        "jsonl",
        "csv",
        "tsv",
        None,
    ]


def test_parquet_row_ranges_read_only_their_rows(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.table({"text": [f"t{i}" for i in range(100)], "n": list(range(100))}), path, row_group_size=30
    )
    fs, info = _info(path)
    assert (info.num_rows, info.row_groups, info.columns) == (100, [30, 30, 30, 10], ["text", "n"])
    block = read_rows(fs, info, ["text"], 25, 65, arrow_columns=("n",))
    assert block.texts("text") == [f"t{i}" for i in range(25, 65)]
    assert block.arrow["n"].to_pylist() == list(range(25, 65)) and block.arrow["n"].type == pa.int64()
    assert read_rows(fs, info, ["text"], 90, None).num_rows == 10


def test_jsonl_bad_lines_are_per_row_errors_and_gzip_is_read(tmp_path):
    lines = ['{"text": "a"}', "not json", "", '{"text": 5}', "[1, 2]", '{"text": "z", "extra": 1}']
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    fs, info = _info(path)
    assert info.columns == ["text", "extra"] and info.error is None
    block = read_rows(fs, info, ["text"], 0, None)
    assert block.num_rows == 5  # blank lines are not rows
    assert block.texts("text") == ["a", None, 5, None, "z"]
    assert set(block.errors) == {1, 3} and block.errors[1].startswith("invalid json:")
    assert count_rows(fs, info) == 5
    assert read_rows(fs, info, ["text"], 4, 5).texts("text") == ["z"]


def test_jsonl_with_no_object_at_all_is_unreadable(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("garbage\nmore garbage\n")
    _fs, info = _info(path)
    assert info.error is not None and "no JSON object" in info.error


def test_csv_quoted_newlines_strings_kept_and_ranges(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('text,id\n"line one\nline two",007\nplain,008\n,009\n"x, y",010\n')
    fs, info = _info(path)
    assert info.columns == ["text", "id"]
    block = read_rows(fs, info, ["text", "id"], 0, None)
    assert block.texts("text") == ["line one\nline two", "plain", "", "x, y"]
    assert block.texts("id") == ["007", "008", "009", "010"]  # read as strings, leading zeros kept
    assert read_rows(fs, info, ["text"], 1, 3).texts("text") == ["plain", ""]
    assert count_rows(fs, info) == 4


def test_tsv(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("id\ttext\n1\thello, world\n")
    fs, info = _info(path)
    assert read_rows(fs, info, ["text"], 0, None).texts("text") == ["hello, world"]


def test_embeddings_table_is_a_fixed_size_list_in_both_dtypes():
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    t = embeddings_table(["a", "b", "c"], {"dense": vecs}, "float32", {"lang": pa.array(["en", "fr", "de"])})
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert t.column_names == ["id", "embedding", "lang"]
    np.testing.assert_array_equal(np.array(t.column("embedding").to_pylist(), np.float32), vecs)
    t16 = embeddings_table(["a", "b", "c"], {"dense": vecs}, "float16")
    assert t16.schema.field("embedding").type == pa.list_(pa.float16(), 4)
    np.testing.assert_allclose(np.array(t16.column("embedding").to_pylist(), np.float32), vecs, atol=1e-3)


def test_rejects_table_schema():
    t = rejects_table([("a.parquet", 3, "a.parquet:3", "null text"), ("b.csv", None, None, "unreadable: x")])
    assert t.schema == REJECTS_SCHEMA
    assert t.column("row").to_pylist() == [3, None]
    assert rejects_table([]).num_rows == 0


def test_write_bytes_replaces_whole_and_leaves_no_temp(tmp_path):
    fs, root = get_fs(str(tmp_path))
    target = os.path.join(root, "sub", "x.bin")
    write_bytes(fs, target, b"first")
    write_bytes(fs, target, b"second")
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"second"
    assert os.listdir(tmp_path / "sub") == ["x.bin"]


def test_output_folder_removes_stale_parts_and_leftover_temp_files(tmp_path):
    fs, root = get_fs(str(tmp_path))
    folder = OutputFolder(fs, root)
    table = embeddings_table(["a"], {"dense": np.ones((1, 2), np.float32)})
    folder.write_unit("part-keep.parquet", table, rejects_table([("s", 0, "a", "null text")]))
    folder.write_unit("part-old.parquet", table, None)
    (tmp_path / f"{TMP_PREFIX}abc-part-keep.parquet").write_bytes(b"half written")
    assert folder.scan() == {"part-keep.parquet", "part-old.parquet", "rejects/part-keep.parquet"}
    assert folder.remove_stale({"part-keep.parquet"}, all_temp=True) == 2
    assert sorted(os.listdir(tmp_path)) == ["part-keep.parquet", "rejects"]
    # a rerun of the unit that now has no rejects removes the old rejects file
    folder.scan()
    folder.write_unit("part-keep.parquet", table, None)
    assert os.listdir(tmp_path / "rejects") == []


def test_list_files_recurses_sorts_and_skips_hidden(tmp_path):
    for rel in ("b/2.parquet", "a/1.jsonl", "a/.hidden.parquet", "_tmp/3.csv", "a/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert [r for _, r in list_files(str(tmp_path), (".parquet", ".jsonl", ".csv"))] == [
        "a/1.jsonl",
        "b/2.parquet",
    ]
    with pytest.raises(Exception, match="does not exist"):
        list_files(str(tmp_path / "nope"), (".parquet",))


def test_metadata_like_json_is_not_an_input():
    assert format_of("metadata.json") is None


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_consecutive_ranges_reuse_one_open_stream_and_a_jump_back_reopens(tmp_path, fmt):
    from embedkit.io.readers import StreamCache

    rows = [f"text {i}" for i in range(50)]
    path = tmp_path / f"a.{fmt}"
    if fmt == "csv":
        path.write_text("text\n" + "".join(f"{r}\n" for r in rows))
    else:
        path.write_text("".join(f'{{"text": "{r}"}}\n\n' for r in rows))  # blank lines are not rows
    fs, info = _info(path)
    cache = StreamCache()
    got, streams = [], set()
    for start in range(0, 50, 15):
        got += read_rows(fs, info, ["text"], start, min(start + 15, 50), streams=cache).texts("text")
        streams.add(id(cache._stream))
    assert got == rows and len(streams) == 1  # the file was opened and parsed once
    assert read_rows(fs, info, ["text"], 5, 7, streams=cache).texts("text") == ["text 5", "text 6"]
    assert read_rows(fs, info, ["text"], 40, None, streams=cache).texts("text") == rows[40:]
    cache.close()
