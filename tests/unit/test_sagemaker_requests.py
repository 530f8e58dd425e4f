"""Pure pieces of the SageMaker door: request builders, names, limits, argument rebuilding, settings."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile

import pytest

from embedkit.aws.argv import rebuild_arguments
from embedkit.aws.container import host_path
from embedkit.aws.endpoints import DeploySpec, container, endpoint_config_request, model_request
from embedkit.aws.job import Ref
from embedkit.aws.names import job_name, retry_name, validate_job_name
from embedkit.aws.processing import (
    Channel,
    OutputChannel,
    ProcessingJobSpec,
    arguments_fit,
    build_processing_request,
)
from embedkit.aws.settings import SageMakerSettings, default_image, parse_run_mode
from embedkit.errors import ConfigError

ROLE = "arn:aws:iam::123456789012:role/embedkit-processing"
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


def _spec(**kw) -> ProcessingJobSpec:
    base = dict(
        job_name="embedkit-embed-20250101-000000-ab12",
        role_arn=ROLE,
        image_uri="763104351884.dkr.ecr.eu-west-3.amazonaws.com/huggingface-pytorch-inference:x",
        entrypoint=["bash", "/opt/ml/processing/input/embedkit-code/bootstrap.sh"],
        arguments=["embedkit", "embed", "/opt/ml/processing/input/data", "/opt/ml/processing/output/output"],
        inputs=[
            Channel("embedkit-code", "s3://b/stage/code/", "/opt/ml/processing/input/embedkit-code"),
            Channel("data", "s3://b/in/", "/opt/ml/processing/input/data", distribution="ShardedByS3Key"),
        ],
        outputs=[OutputChannel("output", "s3://b/out/", "/opt/ml/processing/output/output")],
        instance_type="ml.g4dn.xlarge",
        instance_count=2,
        volume_size_gb=50,
        max_runtime_seconds=7200,
        environment={"AWS_REGION": "eu-west-3", "EMBEDKIT_PRECISION": "fp16"},
        tags={"team": "search"},
    )
    base.update(kw)
    return ProcessingJobSpec(**base)


def test_processing_request_carries_every_field_as_create_processing_job_expects():
    req = build_processing_request(_spec())
    assert req["ProcessingJobName"] == "embedkit-embed-20250101-000000-ab12"
    assert req["RoleArn"] == ROLE
    assert req["AppSpecification"] == {
        "ImageUri": "763104351884.dkr.ecr.eu-west-3.amazonaws.com/huggingface-pytorch-inference:x",
        "ContainerEntrypoint": ["bash", "/opt/ml/processing/input/embedkit-code/bootstrap.sh"],
        "ContainerArguments": [
            "embedkit",
            "embed",
            "/opt/ml/processing/input/data",
            "/opt/ml/processing/output/output",
        ],
    }
    assert req["ProcessingResources"] == {
        "ClusterConfig": {"InstanceCount": 2, "InstanceType": "ml.g4dn.xlarge", "VolumeSizeInGB": 50}
    }
    code, data = req["ProcessingInputs"]
    assert code == {
        "InputName": "embedkit-code",
        "AppManaged": False,
        "S3Input": {
            "S3Uri": "s3://b/stage/code/",
            "LocalPath": "/opt/ml/processing/input/embedkit-code",
            "S3DataType": "S3Prefix",
            "S3InputMode": "File",
            "S3DataDistributionType": "FullyReplicated",
            "S3CompressionType": "None",
        },
    }
    assert data["S3Input"]["S3DataDistributionType"] == "ShardedByS3Key"
    assert req["ProcessingOutputConfig"] == {
        "Outputs": [
            {
                "OutputName": "output",
                "AppManaged": False,
                "S3Output": {
                    "S3Uri": "s3://b/out/",
                    "LocalPath": "/opt/ml/processing/output/output",
                    "S3UploadMode": "Continuous",
                },
            }
        ]
    }
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200}
    assert req["Environment"] == {"AWS_REGION": "eu-west-3", "EMBEDKIT_PRECISION": "fp16"}
    assert req["Tags"] == [{"Key": "team", "Value": "search"}]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"job_name": "bad_name"}, "not valid for SageMaker"),
        ({"job_name": "a" * 64}, "not valid for SageMaker"),
        ({"role_arn": "my-role"}, "not an IAM role ARN"),
        ({"arguments": ["x"] * 101}, "at most 100"),
        ({"arguments": ["embedkit", "y" * 257]}, "ContainerArguments[1] is 257 characters"),
        ({"environment": {f"K{i}": "v" for i in range(101)}}, "at most 100"),
        ({"environment": {"1BAD": "v"}}, "Environment name '1BAD'"),
        ({"environment": {"LONG": "v" * 257}}, "at most 256 characters"),
        ({"max_runtime_seconds": 6 * 24 * 3600}, "5 days"),
        ({"instance_count": 0}, "instance count"),
        ({"instance_type": "m5.xlarge"}, "ml.m5.xlarge"),
    ],
)
def test_processing_request_refuses_what_sagemaker_refuses_naming_the_field(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_processing_request(_spec(**change))


def test_at_most_ten_inputs_and_local_paths_under_opt_ml_processing():
    many = [Channel(f"in{i}", f"s3://b/{i}/", f"/opt/ml/processing/input/in{i}") for i in range(11)]
    with pytest.raises(ConfigError, match=r"11 inputs.*at most 10"):
        build_processing_request(_spec(inputs=many))
    outside = [Channel("data", "s3://b/in/", "/tmp/data")]
    with pytest.raises(ConfigError, match="LocalPath must be under /opt/ml/processing/input/"):
        build_processing_request(_spec(inputs=outside))
    with pytest.raises(ConfigError, match="S3Uri must be an s3:// URL"):
        build_processing_request(
            _spec(inputs=[Channel("data", "file:///x", "/opt/ml/processing/input/data")])
        )
    # a local run (never sent to AWS) accepts file:// sources
    req = build_processing_request(
        _spec(inputs=[Channel("data", "file:///x", "/opt/ml/processing/input/data")]), local=True
    )
    assert req["ProcessingInputs"][0]["S3Input"]["S3Uri"] == "file:///x"
    dup = [
        Channel("data", "s3://b/a/", "/opt/ml/processing/input/a"),
        Channel("data", "s3://b/b/", "/opt/ml/processing/input/b"),
    ]
    with pytest.raises(ConfigError, match="repeats"):
        build_processing_request(_spec(inputs=dup))


def test_arguments_fit_only_within_the_limits():
    assert arguments_fit(["a"] * 100)
    assert not arguments_fit(["a"] * 101)
    assert not arguments_fit(["x" * 257])


def test_job_names_are_valid_unique_and_fit_63_characters_with_retry_suffixes():
    names = {job_name("embedkit embed") for _ in range(50)}
    assert len(names) == 50
    assert all(NAME_RE.match(n) for n in names)
    long = job_name("my_very_long_project_name_" * 5, now=0, token="abcd")
    assert len(long) <= 63 and NAME_RE.match(long) and long.endswith("-19700101-000000-abcd")
    assert retry_name(long, 1).endswith("-r1") and len(retry_name(long, 1)) <= 63
    assert retry_name(retry_name(long, 1), 2).endswith("-abcd-r2")
    with pytest.raises(ConfigError, match="letters, digits and hyphens"):
        validate_job_name("-starts-with-hyphen")


def test_deploy_requests_serverless_and_real_time_field_by_field():
    spec = DeploySpec(
        name="emb",
        role_arn=ROLE,
        image="hf",
        model_id="BAAI/bge-m3",
        region="eu-west-3",
        environment={"X": "1"},
    )
    model = model_request(spec, "emb-20250101-000000")
    assert model == {
        "ModelName": "emb-20250101-000000",
        "ExecutionRoleArn": ROLE,
        "PrimaryContainer": {
            "Image": "763104351884.dkr.ecr.eu-west-3.amazonaws.com/huggingface-pytorch-inference:"
            "2.6.0-transformers4.49.0-cpu-py312-ubuntu22.04",
            "Environment": {
                "HF_TASK": "feature-extraction",
                "HF_MODEL_ID": "BAAI/bge-m3",
                "SAGEMAKER_REGION": "eu-west-3",
                "X": "1",
            },
        },
    }
    serverless = endpoint_config_request("emb-c", "emb-m", serverless=True, memory_mb=3072, max_concurrency=2)
    assert serverless == {
        "EndpointConfigName": "emb-c",
        "ProductionVariants": [
            {
                "VariantName": "AllTraffic",
                "ModelName": "emb-m",
                "ServerlessConfig": {"MemorySizeInMB": 3072, "MaxConcurrency": 2},
            }
        ],
    }
    real = endpoint_config_request(
        "emb-c", "emb-m", serverless=False, instance_type="ml.g4dn.xlarge", instance_count=3
    )
    assert real["ProductionVariants"] == [
        {
            "VariantName": "AllTraffic",
            "ModelName": "emb-m",
            "InstanceType": "ml.g4dn.xlarge",
            "InitialInstanceCount": 3,
            "InitialVariantWeight": 1.0,
        }
    ]
    with pytest.raises(ConfigError, match="1024, 2048"):
        endpoint_config_request("c", "m", serverless=True, memory_mb=3000)
    gpu = container(
        DeploySpec(
            name="e",
            role_arn=ROLE,
            image="hf",
            serverless=False,
            instance_type="ml.g4dn.xlarge",
            region="us-east-1",
        )
    )
    assert "-gpu-py312-cu124-" in gpu["Image"]


def test_embedkit_image_needs_its_uri_and_model_data_is_an_s3_archive():
    with pytest.raises(ConfigError, match="--image-uri"):
        container(DeploySpec(name="e", role_arn=ROLE, image="embedkit", region="us-east-1"))
    c = container(
        DeploySpec(
            name="e",
            role_arn=ROLE,
            image="embedkit",
            image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/embedkit:1",
            model_data="s3://b/m/model.tar.gz",
            region="us-east-1",
        )
    )
    assert c["ModelDataUrl"] == "s3://b/m/model.tar.gz" and "EMBEDKIT_MODEL" not in c["Environment"]
    with pytest.raises(ConfigError, match=re.escape("s3:// URL of a model.tar.gz")):
        container(
            DeploySpec(name="e", role_arn=ROLE, image="hf", model_data="./model.tar.gz", region="us-east-1")
        )


def test_rebuilt_arguments_replace_paths_with_placeholders_and_drop_sagemaker_flags():
    p = argparse.ArgumentParser()
    p.add_argument("src", nargs="?")
    p.add_argument("--input", default="data/")
    p.add_argument("--filter-width", type=int, default=32)
    p.add_argument("--no-cache", dest="cache", action="store_false")
    p.add_argument("--sagemaker-run", dest="sagemaker_run")
    args = p.parse_args(["pos", "--filter-width", "64", "--no-cache", "--sagemaker-run", "yes"])
    out = rebuild_arguments(p, args, replace={"input": Ref("input", "input")})
    assert out == ["pos", "--input", Ref("input", "input"), "--filter-width", "64", "--no-cache"]
    assert p.parse_args([a if isinstance(a, str) else "X" for a in out]).filter_width == 64


def test_settings_precedence_flag_over_env_over_file_over_code_defaults(tmp_path):
    cfg = tmp_path / "sm.yaml"
    cfg.write_text("role: arn:aws:iam::123456789012:role/from-file\nsagemaker_instance: ml.g4dn.xlarge\n")
    env = {
        "EMBEDKIT_SAGEMAKER_ROLE": "arn:aws:iam::123456789012:role/from-env",
        "EMBEDKIT_SAGEMAKER_RETRIES": "2",
    }
    s = SageMakerSettings.build(
        {"instance_count": "3"}, config=str(cfg), environ=env, defaults={"retries": 1, "volume_size": 80}
    )
    assert s.role.endswith("from-env") and s.instance == "ml.g4dn.xlarge"
    assert (s.retries, s.instance_count, s.volume_size) == (2, 3, 80)
    s = SageMakerSettings.build({}, environ={"SAGEMAKER_ROLE": "arn:aws:iam::123456789012:role/r"})
    assert s.role.endswith("role/r")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rolle: x\n")
    with pytest.raises(ConfigError, match="unknown option 'rolle'"):
        SageMakerSettings.build({}, config=str(bad), environ={})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        SageMakerSettings.build({"env": ("NOEQUALS",)}, environ={})


def test_run_modes_accept_seed_001_spellings_and_images_follow_the_instance():
    assert [parse_run_mode(v) for v in ("yes", "True", "1", "no", "false", "0", "LOCAL")] == [
        "yes",
        "yes",
        "yes",
        "no",
        "no",
        "no",
        "local",
    ]
    with pytest.raises(ConfigError, match="boolean"):
        parse_run_mode("maybe")
    assert "-gpu-" in default_image("ml.g4dn.xlarge", "eu-west-3")
    assert "-cpu-" in default_image("ml.m5.xlarge", "eu-west-3")


def test_container_paths_move_under_the_local_root_only():
    assert host_path("/opt/ml/processing/output/output", "/r") == "/r/opt/ml/processing/output/output"
    assert host_path("--output=/opt/ml/processing/output/o", "/r") == "--output=/r/opt/ml/processing/output/o"
    assert host_path("/opt/ml/x", "") == "/opt/ml/x"
    assert host_path("relative/opt/ml", "/r") == "relative/opt/ml"


def test_the_shipped_wheel_installs_with_pip_and_holds_this_package(tmp_path):
    from embedkit.aws.dist import build_wheel

    whl = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(whl) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith("dist-info/METADATA"))).decode()
        entry = zf.read(next(n for n in names if n.endswith("dist-info/entry_points.txt"))).decode()
    assert "embedkit/aws/container.py" in names and "embedkit/sagemaker.py" in names
    assert not any("__pycache__" in n for n in names)
    assert "Requires-Dist: pyarrow" in meta and "embedkit = embedkit.cli:main" in entry
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(whl),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (target / "embedkit" / "aws" / "container.py").is_file()
    record = next(target.glob("embedkit-*.dist-info")) / "RECORD"
    assert "embedkit/aws/container.py,sha256=" in record.read_text()
