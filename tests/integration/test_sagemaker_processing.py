"""`embedkit embed --sagemaker-run yes` and processing_main against the moto server: what is staged,
the CreateProcessingJob request as sent (captured with botocore's own event hooks), log tailing,
and relaunching a failed job onto the same output."""

from __future__ import annotations

import json
import re
import time
import uuid

import boto3

from embedkit.cli import main as cli
from tests.integration.batch_data import write_parquet_dataset

ROLE = "arn:aws:iam::123456789012:role/embedkit-processing"
CODE = "/opt/ml/processing/input/embedkit-code"
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


def _sent(calls, op="CreateProcessingJob") -> list[dict]:
    return [p for name, p in calls if name == op]


def _remote_embed(src: str, dst: str, *extra: str) -> list[str]:
    """argv for `embedkit embed SRC DST` launched as a processing job that polls its logs quickly."""
    return [
        "embed",
        src,
        dst,
        "--sagemaker-run",
        "yes",
        "--sagemaker-role",
        ROLE,
        "--sagemaker-log-poll",
        "0.01",
        *extra,
    ]


def _keys(bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_remote_embed_stages_inputs_model_and_code_and_sends_a_valid_request(
    tmp_path, tiny_model, s3_bucket, sagemaker_calls
):
    data = tmp_path / "data"
    write_parquet_dataset(str(data), files=2, rows=10)
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("pyarrow>=14\n")
    out = f"s3://{s3_bucket}/emb/out"
    code = cli(
        [
            "embed",
            str(data),
            out,
            "--model",
            str(tiny_model),
            "--text-column",
            "text",
            "--dtype",
            "float16",
            "--no-truncate",
            "--sagemaker-run",
            "yes",
            "--sagemaker-role",
            ROLE,
            "--sagemaker-instance",
            "ml.g4dn.xlarge",
            "--sagemaker-instance-count",
            "2",
            "--sagemaker-volume-size",
            "60",
            "--sagemaker-max-runtime",
            "7200",
            "--sagemaker-env",
            "EMBEDKIT_PROGRESS=log",
            "--sagemaker-requirements",
            str(reqs),
            "--sagemaker-configuration-command",
            "export HF_HUB_OFFLINE=1",
            "--sagemaker-wait",
            "no",
        ]
    )
    assert code == 0
    [req] = _sent(sagemaker_calls)
    name = req["ProcessingJobName"]
    assert NAME_RE.match(name) and name.startswith("embedkit-embed-")
    stage = f"s3://{s3_bucket}/emb/out/_sagemaker/{name}"
    assert req["RoleArn"] == ROLE
    assert req["AppSpecification"]["ImageUri"] == (
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-inference:"
        "2.6.0-transformers4.49.0-gpu-py312-cu124-ubuntu22.04"
    )
    assert req["AppSpecification"]["ContainerEntrypoint"] == ["bash", f"{CODE}/bootstrap.sh"]
    # the job travels as its resolved settings, not as a command line rebuilt from flags
    assert req["AppSpecification"]["ContainerArguments"] == [
        "embedkit",
        "embed",
        "--settings-json",
        f"{CODE}/settings.json",
    ]
    assert req["ProcessingResources"] == {
        "ClusterConfig": {"InstanceCount": 2, "InstanceType": "ml.g4dn.xlarge", "VolumeSizeInGB": 60}
    }
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200}
    inputs = {i["InputName"]: i["S3Input"] for i in req["ProcessingInputs"]}
    assert list(inputs) == ["embedkit-code", "data", "model"]  # fresh output: no resume input
    assert inputs["embedkit-code"]["S3Uri"] == f"{stage}/code/"
    assert inputs["data"] == {
        "S3Uri": f"{stage}/inputs/data/",
        "LocalPath": "/opt/ml/processing/input/data",
        "S3DataType": "S3Prefix",
        "S3InputMode": "File",
        "S3DataDistributionType": "ShardedByS3Key",
        "S3CompressionType": "None",
    }
    assert inputs["model"]["S3DataDistributionType"] == "FullyReplicated"
    assert req["ProcessingOutputConfig"]["Outputs"] == [
        {
            "OutputName": "output",
            "AppManaged": False,
            "S3Output": {
                "S3Uri": f"{out}/",
                "LocalPath": "/opt/ml/processing/output/output",
                "S3UploadMode": "Continuous",
            },
        }
    ]
    env = req["Environment"]
    assert env["EMBEDKIT_PROGRESS"] == "log" and env["AWS_REGION"] == "us-east-1"
    assert len(env) <= 100 and all(len(a) <= 256 for a in req["AppSpecification"]["ContainerArguments"])

    keys = _keys(s3_bucket, f"emb/out/_sagemaker/{name}/")
    prefix = f"emb/out/_sagemaker/{name}/"
    rel = [k[len(prefix) :] for k in keys]
    for expected in (
        "code/bootstrap.sh",
        "code/job.json",
        "code/requirements.txt",
        "code/command.sh",
        "code/dist/embedkit-0.1.0-py3-none-any.whl",
        "inputs/data/shard-00.parquet",
        "inputs/data/shard-01.parquet",
        "inputs/model/modules.json",
        "code/settings.json",
    ):
        assert expected in rel, expected
    s3 = boto3.client("s3")
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key=prefix + "code/job.json")["Body"].read())
    assert manifest["resume"] == [
        {
            "from": "/opt/ml/processing/input/embedkit-resume-output",
            "to": "/opt/ml/processing/output/output/_state",
        }
    ]
    assert manifest["settings_file"] == "settings.json"
    shipped = json.loads(s3.get_object(Bucket=s3_bucket, Key=prefix + "code/settings.json")["Body"].read())
    assert {k: shipped[k] for k in ("input", "output", "model", "num_shards", "shard_index")} == {
        "input": "/opt/ml/processing/input/data",
        "output": "/opt/ml/processing/output/output",
        "model": "/opt/ml/processing/input/model",
        "num_shards": 1,  # ShardedByS3Key: each host embeds every file it received
        "shard_index": None,
    }
    # resolved on the user's side: flags, and the test suite's EMBEDKIT_BACKEND from the environment
    assert (shipped["text_column"], shipped["dtype"], shipped["truncate"], shipped["backend"]) == (
        "text",
        "float16",
        False,
        "torch",
    )
    from embedkit.batch.settings import JobSettings

    assert JobSettings.from_json(json.dumps(shipped)).unit_rows == 50_000  # complete: every field
    assert set(shipped) == set(JobSettings.field_names())
    command = s3.get_object(Bucket=s3_bucket, Key=prefix + "code/command.sh")["Body"].read()
    assert command == b"export HF_HUB_OFFLINE=1\n"
    # What moto recorded matches what was sent (it leaves out ProcessingResources and Environment).
    desc = boto3.client("sagemaker").describe_processing_job(ProcessingJobName=name)
    assert desc["AppSpecification"] == req["AppSpecification"]
    assert desc["ProcessingInputs"] == req["ProcessingInputs"]


def _seed_logs(job: str, streams: dict[str, list[str]]) -> None:
    logs = boto3.client("logs")
    group = "/aws/sagemaker/ProcessingJobs"
    try:
        logs.create_log_group(logGroupName=group)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    now = int(time.time() * 1000)
    for stream, lines in streams.items():
        logs.create_log_stream(logGroupName=group, logStreamName=f"{job}/{stream}")
        logs.put_log_events(
            logGroupName=group,
            logStreamName=f"{job}/{stream}",
            logEvents=[{"timestamp": now + i, "message": m} for i, m in enumerate(lines)],
        )


def test_wait_tails_the_jobs_cloudwatch_logs_and_exits_with_its_outcome(s3_bucket, sagemaker_calls, capsys):
    write_parquet_dataset(f"s3://{s3_bucket}/in", files=1, rows=5)
    job = f"tail-{uuid.uuid4().hex[:8]}"
    _seed_logs(job, {"algo-1-1700000000": ["embedkit bootstrap: Python 3.12", "units 3/3 done"]})
    _seed_logs(job, {"algo-2-1700000000": ["units 2/2 done"]})
    _seed_logs(f"{job}-other", {"algo-1-1700000000": ["not this job"]})
    code = cli(_remote_embed(f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/out/", "--sagemaker-job-name", job))
    printed = capsys.readouterr().out
    assert code == 0
    assert "[algo-1] embedkit bootstrap: Python 3.12\n[algo-1] units 3/3 done\n" in printed
    assert "[algo-2] units 2/2 done" in printed
    assert "not this job" not in printed
    assert f"processing job {job} completed" in printed
    [req] = _sent(sagemaker_calls)
    data = next(i for i in req["ProcessingInputs"] if i["InputName"] == "data")["S3Input"]
    # an S3 input is used in place, and one instance replicates it fully
    assert data["S3Uri"] == f"s3://{s3_bucket}/in/" and data["S3DataDistributionType"] == "FullyReplicated"


def test_a_failed_job_is_relaunched_onto_the_same_output_with_its_state(s3_bucket, sagemaker_calls, capsys):
    write_parquet_dataset(f"s3://{s3_bucket}/in", files=1, rows=5)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="out/_state/job.json", Body=b"{}")  # a previous run's state
    job = f"retry-{uuid.uuid4().hex[:8]}"
    failing = {job}

    def fail_first(parsed, **_):
        if parsed.get("ProcessingJobName") in failing:
            parsed["ProcessingJobStatus"] = "Failed"
            parsed["FailureReason"] = "AlgorithmError: instance terminated"

    boto3.DEFAULT_SESSION.events.register("after-call.sagemaker.DescribeProcessingJob", fail_first)
    argv = _remote_embed(f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/out/", "--sagemaker-job-name", job)
    assert cli([*argv, "--sagemaker-retries", "1"]) == 0
    first, second = _sent(sagemaker_calls)
    assert (first["ProcessingJobName"], second["ProcessingJobName"]) == (job, f"{job}-r1")
    for req in (first, second):
        resume = next(i for i in req["ProcessingInputs"] if i["InputName"] == "embedkit-resume-output")
        assert resume["S3Input"]["S3Uri"] == f"s3://{s3_bucket}/out/_state/"
        assert resume["S3Input"]["LocalPath"] == "/opt/ml/processing/input/embedkit-resume-output"
        assert req["ProcessingOutputConfig"] == first["ProcessingOutputConfig"]
        assert req["AppSpecification"] == first["AppSpecification"]
    assert (
        "failed (AlgorithmError: instance terminated); relaunching onto the same output"
        in capsys.readouterr().out
    )

    job2 = f"retry-{uuid.uuid4().hex[:8]}"
    failing.add(job2)
    argv[argv.index(job)] = job2
    assert cli(argv) == 1  # no retries left: the job's outcome is the exit code
    assert "AlgorithmError: instance terminated" in capsys.readouterr().err


def test_processing_main_ships_script_modules_and_rewrites_paths(tmp_path, s3_bucket, sagemaker_calls):
    from embedkit.sagemaker import processing_main

    module = tmp_path / "src" / "mymod"
    module.mkdir(parents=True)
    (module / "__init__.py").write_text("WIDTH = 1\n")
    script = tmp_path / "job.py"
    script.write_text("print('hello')\n")
    data = tmp_path / "data.txt"
    data.write_text("a\nb\n")

    def main(args):  # pragma: no cover - runs remotely only
        raise AssertionError("main must not run here when --sagemaker-run yes")

    code = processing_main(
        main,
        script=str(script),
        inputs={"input": None},
        outputs={"output": (None, "default")},
        dependencies={"my_module": str(module)},
        additional_arguments=[{"dest": "--filter-width", "default": 32, "type": int}],
        argv=[
            "--input",
            str(data),
            "--output",
            f"s3://{s3_bucket}/res",
            "--filter-width",
            "64",
            "--sagemaker-run",
            "yes",
            "--sagemaker-role",
            ROLE,
            "--sagemaker-wait",
            "no",
        ],
    )
    assert code == 0
    [req] = _sent(sagemaker_calls)
    assert req["ProcessingJobName"].startswith("job-")
    assert req["AppSpecification"]["ContainerArguments"] == [
        "script/job.py",
        "--input",
        "/opt/ml/processing/input/input/data.txt",
        "--output",
        "/opt/ml/processing/output/output",
        "--my-module",
        f"{CODE}/deps/my-module/mymod",
        "--filter-width",
        "64",
        "--sagemaker-run",
        "no",
    ]
    inputs = {i["InputName"]: i["S3Input"] for i in req["ProcessingInputs"]}
    assert set(inputs) == {"embedkit-code", "input"}
    outs = req["ProcessingOutputConfig"]["Outputs"]
    assert [(o["OutputName"], o["S3Output"]["S3Uri"]) for o in outs] == [("output", f"s3://{s3_bucket}/res/")]
    code_prefix = inputs["embedkit-code"]["S3Uri"].split(f"s3://{s3_bucket}/", 1)[1]
    rel = [k[len(code_prefix) :] for k in _keys(s3_bucket, code_prefix)]
    assert {"script/job.py", "deps/my-module/mymod/__init__.py", "bootstrap.sh", "job.json"} <= set(rel)
    manifest = json.loads(
        boto3.client("s3").get_object(Bucket=s3_bucket, Key=code_prefix + "job.json")["Body"].read()
    )
    assert manifest["pythonpath"] == ["deps/my-module"]


def test_local_output_folder_is_staged_in_the_default_bucket_and_downloaded_after(
    tmp_path, moto_server, sagemaker_calls
):
    import hashlib

    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n')
    out = tmp_path / "emb"
    bucket = "sagemaker-us-east-1-123456789012"  # the SageMaker SDK's default bucket, created if absent
    digest = hashlib.sha1(str(out).encode()).hexdigest()[:12]
    remote = f"embedkit/outputs/{digest}/output"
    boto3.client("s3").create_bucket(Bucket=bucket)
    # what the job would have uploaded (moto runs nothing)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{remote}/part-x.parquet", Body=b"PAR1")
    code = cli(_remote_embed(str(data), str(out)))
    assert code == 0
    [req] = _sent(sagemaker_calls)
    [output] = req["ProcessingOutputConfig"]["Outputs"]
    assert output["S3Output"]["S3Uri"] == f"s3://{bucket}/{remote}/"
    data_in = next(i for i in req["ProcessingInputs"] if i["InputName"] == "data")["S3Input"]
    assert data_in["S3Uri"] == f"s3://{bucket}/embedkit/{req['ProcessingJobName']}/inputs/data/texts.jsonl"
    shipped = boto3.client("s3").get_object(
        Bucket=bucket, Key=f"embedkit/{req['ProcessingJobName']}/code/settings.json"
    )
    assert json.loads(shipped["Body"].read())["input"] == "/opt/ml/processing/input/data/texts.jsonl"
    assert (out / "part-x.parquet").read_bytes() == b"PAR1"  # downloaded once the job completed
