"""`--sagemaker-run local`: the generated bootstrap and container entrypoint run here with the /opt/ml
layout under a temp root, S3 inputs downloaded from and outputs uploaded to the moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import boto3
import pytest

from embedkit.cli import main as cli
from tests.integration.batch_data import read_parts, write_parquet_dataset

pytestmark = pytest.mark.slow  # ~35 s: local /opt/ml runs on 2 cores


def _markers(bucket: str, prefix: str) -> list[dict]:
    s3 = boto3.client("s3")
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}_state/units/").get("Contents", [])
        if not o["Key"].rsplit("/", 1)[-1].startswith(".")
    ]
    return [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys]


def test_local_run_embeds_s3_to_s3_two_hosts_cover_every_unit_once_and_a_rerun_resumes(
    tiny_model, s3_bucket, capfd
):
    texts = write_parquet_dataset(f"s3://{s3_bucket}/in", files=3, rows=40, row_group_size=20)
    out = f"s3://{s3_bucket}/out/"
    argv = ["embed", f"s3://{s3_bucket}/in/", out, "--model", str(tiny_model), "--unit-rows", "20"]
    code = cli([*argv, "--sagemaker-run", "local", "--sagemaker-instance-count", "2"])
    printed = capfd.readouterr().out
    assert code == 0
    assert "host algo-1 of 2" in printed and "host algo-2 of 2" in printed
    ids, vecs, parts = read_parts(out)
    assert len(ids) == len(texts) == 120 and len(set(ids)) == 120  # every row once
    assert vecs.shape == (120, 32)
    markers = _markers(s3_bucket, "out/")
    assert len(markers) == 6 and len({(m["source"], m["start"]) for m in markers}) == 6
    by_host: dict[str, set[str]] = {}
    for m in markers:
        by_host.setdefault(m["host"], set()).add(m["source"].rsplit("/", 1)[-1])
    # ShardedByS3Key: host i got objects i, i+2, ... in key order, and embedded all of them
    assert by_host == {"algo-1": {"shard-00.parquet", "shard-02.parquet"}, "algo-2": {"shard-01.parquet"}}
    s3 = boto3.client("s3")
    names = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]}
    # each host accounts for its own files; no host saw the whole input to write the job's metadata
    assert {
        "out/metadata-algo-1.json",
        "out/metadata-algo-2.json",
    } <= names and "out/metadata.json" not in names
    host1 = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/metadata-algo-1.json")["Body"].read())
    assert host1["rows"]["embedded"] == 80

    # A rerun (as a relaunch after a failure would be) brings the state back and skips every unit.
    code = cli([*argv, "--sagemaker-run", "local"])
    printed = capfd.readouterr()
    assert code == 0
    assert "restored" in printed.out and "state file(s) of the previous run" in printed.out
    assert "6 already done" in printed.out + printed.err
    ids2, vecs2, parts2 = read_parts(out)
    assert ids2 == ids and parts2 == parts
    assert (vecs2 == vecs).all()
    # the one-host rerun saw everything recorded: it writes the job's metadata
    meta = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/metadata.json")["Body"].read())
    assert meta["complete"] is True and meta["rows"]["embedded"] == 120


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from embedkit.sagemaker import processing_main
    from helper_mod import greet

    def main(args):
        with open(os.path.join(args.input, "words.txt")) as fh:
            words = fh.read().split()
        rc = os.environ.get("EMBEDKIT_RESOURCE_CONFIG", "/opt/ml/config/resourceconfig.json")
        host = json.load(open(rc))["current_host"] if os.path.exists(rc) else "here"
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, f"result-{host}.json"), "w") as fh:
            json.dump({"words": [greet(w) for w in words], "scale": args.scale, "input": args.input,
                       "marker": os.environ.get("MARKER")}, fh)

    if __name__ == "__main__":
        processing_main(
            main,
            inputs={"input": None},
            outputs={"output": None},
            dependencies={"helper": os.path.join(os.path.dirname(os.path.abspath(__file__)), "helper_mod")},
            additional_arguments=[{"dest": "--scale", "type": int, "default": 1}],
            configuration_command="export MARKER=configured",
        )
    """
)


def test_processing_main_script_runs_in_its_container_locally(tmp_path, s3_bucket, moto_server):
    (tmp_path / "helper_mod").mkdir()
    (tmp_path / "helper_mod" / "__init__.py").write_text("def greet(w):\n    return w.upper()\n")
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="words/words.txt", Body=b"alpha beta\n")
    env = dict(os.environ)
    common = ["--input", f"s3://{s3_bucket}/words/", "--scale", "3"]
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            *common,
            "--output",
            f"s3://{s3_bucket}/res/",
            "--sagemaker-run",
            "local",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(s3.get_object(Bucket=s3_bucket, Key="res/result-algo-1.json")["Body"].read())
    assert result["words"] == ["ALPHA", "BETA"] and result["scale"] == 3
    assert result["input"].endswith("/opt/ml/processing/input/input")  # the container path, under the root
    assert result["marker"] == "configured"  # the configuration command ran first


def test_processing_main_here_downloads_s3_inputs_and_uploads_outputs(tmp_path, s3_bucket):
    """--sagemaker-run no (the default): main runs in this process with local copies of S3 paths
    (aws-sagemaker-remote's local mode passed the s3:// URLs through unread)."""
    from embedkit.sagemaker import processing_main

    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="words/words.txt", Body=b"alpha beta\n")
    seen = {}

    def main(args):
        seen["input"] = args.input
        with open(os.path.join(args.input, "words.txt")) as fh:
            words = fh.read().split()
        with open(os.path.join(args.output, "count.txt"), "w") as fh:
            fh.write(f"{len(words) * args.scale}")
        return 0

    code = processing_main(
        main,
        script=__file__,
        inputs={"input": None},
        outputs={"output": None},
        additional_arguments=[(("--scale",), {"type": int, "default": 1})],
        argv=["--input", f"s3://{s3_bucket}/words/", "--output", f"s3://{s3_bucket}/here/", "--scale", "3"],
    )
    assert code == 0
    assert not seen["input"].startswith("s3://") and not os.path.exists(seen["input"])  # a temp copy, removed
    assert s3.get_object(Bucket=s3_bucket, Key="here/count.txt")["Body"].read() == b"6"
