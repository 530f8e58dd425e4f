"""Planning the batch job: units, shards, columns, settings and the earlier command lines."""

from __future__ import annotations

import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.batch.plan import Unit, make_plan, row_ranges
from embedkit.batch.settings import JobSettings, detect_hosts
from embedkit.cli import build_parser
from embedkit.commands.embed import settings_from_args
from embedkit.errors import ConfigError, InputError
from embedkit.io.readers import FileInfo


def _pq(path, cols: dict, row_group_size: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


@pytest.mark.parametrize(
    ("groups", "unit_rows", "expected"),
    [
        ([100, 100, 50], 150, [(0, 200), (200, 250)]),
        ([100, 100, 100], 100, [(0, 100), (100, 200), (200, 300)]),
        ([400], 100, [(0, 100), (100, 200), (200, 300), (300, 400)]),
        ([10, 500, 10], 200, [(0, 10), (10, 210), (210, 410), (410, 510), (510, 520)]),
        ([30], 1000, [(0, 30)]),
    ],
)
def test_units_follow_row_groups_and_cover_every_row_once(groups, unit_rows, expected):
    info = FileInfo("p", "a.parquet", "parquet", num_rows=sum(groups), row_groups=groups)
    ranges = row_ranges(info, unit_rows)
    assert ranges == expected
    assert ranges[0][0] == 0 and ranges[-1][1] == sum(groups)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_csv_of_known_length_is_cut_in_plain_row_ranges():
    info = FileInfo("p", "a.csv", "csv", num_rows=250)
    assert row_ranges(info, 100) == [(0, 100), (100, 200), (200, 250)]
    assert row_ranges(FileInfo("p", "b.csv", "csv"), 100) == [(0, None)]


def test_unit_keys_and_part_names_are_deterministic_and_distinct():
    info = FileInfo("p", "dir/x.parquet", "parquet")
    a, b = Unit("dir/x.parquet", 0, 100, info), Unit("dir/x.parquet", 100, 200, info)
    other = Unit("other/x.parquet", 0, 100, info)
    assert a.key == Unit("dir/x.parquet", 0, 100, info).key
    assert len({a.key, b.key, other.key}) == 3
    assert len({a.part_name, b.part_name, other.part_name}) == 3
    assert a.part_name.startswith("part-x-") and a.part_name.endswith("-0000000000.parquet")


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
def test_shards_cover_every_unit_exactly_once(tmp_path, num_shards):
    for f in range(3):
        _pq(tmp_path / "in" / f"f{f}.parquet", {"text": [f"t{i}" for i in range(95)]}, row_group_size=10)
    plan = make_plan(str(tmp_path / "in"), unit_rows=20)
    taken = [u.key for i in range(num_shards) for u in plan.for_shard(num_shards, i)]
    assert sorted(taken) == sorted(u.key for u in plan.units)
    assert len(set(taken)) == len(taken)
    assert plan.known_rows == 3 * 95


def test_text_column_autodetected_in_seed_order_and_non_data_files_ignored(tmp_path):
    _pq(tmp_path / "data" / "a.parquet", {"id": ["1"], "texto": ["hola"], "content": ["x"]})
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "tokenizer.py").write_text("print('the Processing job code input')\n")
    (tmp_path / "data" / "_SUCCESS").write_text("")
    plan = make_plan(str(tmp_path))
    assert plan.text_column == "texto"
    assert [f.source for f in plan.files] == ["data/a.parquet"]


def test_missing_text_column_fails_before_any_work_listing_columns(tmp_path):
    _pq(tmp_path / "a.parquet", {"title": ["x"], "body": ["y"]})
    with pytest.raises(InputError, match=r"title, body") as err:
        make_plan(str(tmp_path))
    assert "--text-column" in str(err.value)
    with pytest.raises(InputError, match="'summary' is in no input file"):
        make_plan(str(tmp_path), text_column="summary")


def test_key_column_is_the_default_id_and_an_explicit_id_column_must_exist(tmp_path):
    _pq(tmp_path / "a.parquet", {"key": ["k1"], "caption": ["a cat"], "uid": ["u1"]})
    assert make_plan(str(tmp_path)).id_column == "key"
    assert make_plan(str(tmp_path), id_column="uid").id_column == "uid"
    with pytest.raises(InputError, match="id column 'nope'"):
        make_plan(str(tmp_path), id_column="nope")


def test_corrupt_file_becomes_a_rejected_unit_or_stops_with_fail_fast(tmp_path):
    _pq(tmp_path / "a.parquet", {"text": ["fine"]})
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    plan = make_plan(str(tmp_path))
    bad = [u for u in plan.units if u.error]
    assert [u.source for u in bad] == ["b.parquet"] and bad[0].error.startswith("unreadable:")
    with pytest.raises(InputError, match=r"b\.parquet cannot be read"):
        make_plan(str(tmp_path), fail_fast=True)


def test_file_missing_a_needed_column_is_rejected_whole(tmp_path):
    _pq(tmp_path / "a.parquet", {"text": ["x"], "lang": ["en"]})
    _pq(tmp_path / "b.parquet", {"text": ["y"]})
    plan = make_plan(str(tmp_path), keep_columns=("lang",))
    errors = {u.source: u.error for u in plan.units}
    assert errors["a.parquet"] is None
    assert errors["b.parquet"].startswith("missing column: 'lang'")


def test_max_samples_cuts_the_plan_deterministically(tmp_path):
    for f in range(3):
        _pq(tmp_path / f"f{f}.parquet", {"text": [f"t{i}" for i in range(50)]})
    (tmp_path / "g.jsonl").write_text("".join(json.dumps({"text": f"j{i}"}) + "\n" for i in range(30)))
    plan = make_plan(str(tmp_path), unit_rows=20, max_samples=75)
    assert sum(u.rows for u in plan.units) == 75
    assert [(u.source, u.start, u.stop) for u in plan.units][-2:] == [
        ("f1.parquet", 0, 20),
        ("f1.parquet", 20, 25),
    ]
    assert [u.key for u in plan.units] == [
        u.key for u in make_plan(str(tmp_path), unit_rows=20, max_samples=75).units
    ]


def test_glob_input_selects_files(tmp_path):
    _pq(tmp_path / "a-1.parquet", {"text": ["x"]})
    _pq(tmp_path / "b-1.parquet", {"text": ["y"]})
    plan = make_plan(str(tmp_path / "a-*.parquet"))
    assert [f.source for f in plan.files] == ["a-1.parquet"]


def test_hosts_from_sagemaker_resourceconfig_and_flags(tmp_path):
    rc = tmp_path / "resourceconfig.json"
    rc.write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2", "algo-3"]}))
    env = {"EMBEDKIT_RESOURCE_CONFIG": str(rc)}
    h = detect_hosts(None, None, env)
    assert (h.num_shards, h.shard_index, h.host, h.multi) == (3, 1, "algo-2", True)
    h = detect_hosts(4, 3, {"EMBEDKIT_RESOURCE_CONFIG": str(tmp_path / "absent.json")})
    assert (h.num_shards, h.shard_index, h.host) == (4, 3, "shard-3")
    assert (
        detect_hosts(None, None, {"EMBEDKIT_RESOURCE_CONFIG": str(tmp_path / "absent.json")}).num_shards == 1
    )
    with pytest.raises(ConfigError, match="shard_index"):
        detect_hosts(2, 2, env)
    # ShardedByS3Key: each host sees its own files, so it takes all it sees (--num-shards 1)
    h = detect_hosts(1, None, env)
    assert (h.num_shards, h.host, h.multi, h.sees_everything) == (1, "algo-2", True, False)


def test_settings_precedence_flag_over_env_over_yaml(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "input_dir: s3://bucket/in\nbatch_size: 16\nprecision: bf16\nno_checkpoint: true\nkeep-columns: [a, b]\n"
    )
    s = JobSettings.build(
        {"batch_size": 64}, config=str(cfg), environ={"EMBEDKIT_PRECISION": "int8", "EMBEDKIT_UNIT_ROWS": "7"}
    )
    assert (s.input, s.batch_size, s.precision, s.resume, s.keep_columns, s.unit_rows) == (
        "s3://bucket/in",
        64,
        "int8",
        False,
        ("a", "b"),
        7,
    )
    cfg.write_text("inptu: x\n")
    with pytest.raises(ConfigError, match="unknown option 'inptu'"):
        JobSettings.build({}, config=str(cfg))


def _parse(argv: list[str]) -> JobSettings:
    return settings_from_args(build_parser().parse_args(argv))


def test_seed_000_command_line_works_unchanged():
    s = _parse(
        [
            "embed",
            "--input-path",
            "/opt/ml/processing/input",
            "--output-path",
            "/opt/ml/processing/output",
            "--model",
            "pablosi/bge-m3-trained-2",
            "--batch-size",
            "0",
            "--no-checkpoint",
        ]
    )
    assert (s.input, s.output, s.model, s.batch_size, s.resume) == (
        "/opt/ml/processing/input",
        "/opt/ml/processing/output",
        "pablosi/bge-m3-trained-2",
        0,
        False,
    )


def test_seed_003_command_line_works_unchanged(tmp_path):
    cfg = tmp_path / "prod.yaml"
    cfg.write_text("max_samples: 5\nunit_rows: 1000\n")
    s = _parse(
        [
            "embed",
            "--model_directory",
            "models/clip",
            "--input_dir",
            "s3://my-bucket/datasets/images",
            "--output_dir",
            "./output/embeddings",
            "--num_workers",
            "4",
            "--batch_size",
            "64",
            "--max_samples",
            "100",
            "--aws_region",
            "eu-west-3",
            "--config",
            str(cfg),
            "--env",
            "prod",
        ]
    )
    assert (
        s.model,
        s.input,
        s.output,
        s.num_workers,
        s.batch_size,
        s.max_samples,
        s.aws_region,
        s.unit_rows,
    ) == (
        "models/clip",
        "s3://my-bucket/datasets/images",
        "./output/embeddings",
        4,
        64,
        100,
        "eu-west-3",
        1000,
    )


def test_positional_and_flag_forms_agree_and_conflicts_are_refused():
    s = _parse(
        ["embed", "in/", "out/", "--no-normalize", "--no-truncate", "--dtype", "float16", "--single-file"]
    )
    assert (s.input, s.output, s.normalize, s.truncate, s.dtype, s.single_file) == (
        "in/",
        "out/",
        False,
        False,
        "float16",
        True,
    )
    with pytest.raises(ConfigError, match="input given twice"):
        _parse(["embed", "in/", "out/", "--input-path", "other/"])
    with pytest.raises(ConfigError, match="keep_columns cannot hold 'embedding'"):
        _parse(["embed", "in/", "out/", "--keep-columns", "text,embedding"])
