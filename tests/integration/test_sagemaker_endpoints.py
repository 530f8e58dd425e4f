"""`embedkit sagemaker package-model|deploy|describe|invoke|delete` against the moto server, with the
requests as boto3 sent them (captured through botocore's event hooks)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from types import SimpleNamespace

import boto3
import numpy as np
import pytest

from embedkit.cli import main as cli

ROLE = "arn:aws:iam::123456789012:role/embedkit-endpoint"


@pytest.fixture
def calls(sagemaker_calls):
    return sagemaker_calls


def _one(calls, op) -> dict:
    found = [p for name, p in calls if name == op]
    assert len(found) == 1, (op, [n for n, _ in calls])
    return found[0]


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_package_model_writes_sagemaker_layout_that_embedkit_loads_back(
    tmp_path, tiny_model, tiny_embedder, s3_bucket, capsys
):
    handler = tmp_path / "inference.py"
    handler.write_text("def model_fn(model_dir):\n    return model_dir\n")
    url = f"s3://{s3_bucket}/models/tiny/model.tar.gz"
    assert cli(["sagemaker", "package-model", str(tiny_model), url, "--inference", str(handler)]) == 0
    info = _json_out(capsys)
    assert info["destination"] == url and len(info["sha256"]) == 64
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="models/tiny/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = set(tar.getnames())
        assert tar.extractfile("code/inference.py").read() == handler.read_bytes()
    assert {"modules.json", "config.json", "code/inference.py"} <= names
    assert not any(n.startswith(("/", "..")) for n in names)  # everything at the archive root
    from embedkit import Embedder

    texts = ["a cat sits on the mat", "ein Hund im Park"]
    again = Embedder(url, device="cpu").encode(texts)
    assert np.allclose(again, tiny_embedder.encode(texts), atol=1e-6)


def test_deploy_serverless_then_update_to_real_time_describe_invoke_delete(s3_bucket, calls, capsys):
    name = "emb-" + s3_bucket[-8:]
    argv = ["sagemaker", "deploy", name, "--role", ROLE, "--poll", "0.01"]
    assert (
        cli(
            [
                *argv,
                "--image",
                "hf",
                "--model",
                "BAAI/bge-m3",
                "--serverless",
                "--memory",
                "4096",
                "--max-concurrency",
                "5",
            ]
        )
        == 0
    )
    out = _json_out(capsys)
    assert (out["action"], out["status"]) == ("created", "InService")
    model = _one(calls, "CreateModel")
    assert re.fullmatch(rf"{name}-\d{{8}}-\d{{6}}-[0-9a-f]{{4}}", model["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"] == {
        "Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-inference:"
        "2.6.0-transformers4.49.0-cpu-py312-ubuntu22.04",
        "Environment": {
            "HF_TASK": "feature-extraction",
            "HF_MODEL_ID": "BAAI/bge-m3",
            "SAGEMAKER_REGION": "us-east-1",
        },
    }
    config = _one(calls, "CreateEndpointConfig")
    assert config == {
        "EndpointConfigName": model["ModelName"],
        "ProductionVariants": [
            {
                "VariantName": "AllTraffic",
                "ModelName": model["ModelName"],
                "ServerlessConfig": {"MemorySizeInMB": 4096, "MaxConcurrency": 5},
            }
        ],
    }
    assert _one(calls, "CreateEndpoint") == {
        "EndpointName": name,
        "EndpointConfigName": config["EndpointConfigName"],
    }

    calls.clear()

    # moto 5.2 has no UpdateEndpoint: answer it as AWS does, and let DescribeEndpoint then show the
    # new config (botocore's own before/after-call hooks; everything else is moto).
    switched: dict[str, str] = {}

    def update_endpoint(params, **_):
        sent = json.loads(params["body"])  # the serialised request
        switched[sent["EndpointName"]] = sent["EndpointConfigName"]
        return SimpleNamespace(status_code=200, headers={}), {
            "EndpointArn": f"arn:aws:sagemaker:::endpoint/{name}"
        }

    def describe_endpoint(parsed, **_):
        if parsed.get("EndpointName") in switched:
            parsed["EndpointConfigName"] = switched[parsed["EndpointName"]]

    boto3.DEFAULT_SESSION.events.register("before-call.sagemaker.UpdateEndpoint", update_endpoint)
    boto3.DEFAULT_SESSION.events.register("after-call.sagemaker.DescribeEndpoint", describe_endpoint)
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/embedkit:0.1.0"
    data = f"s3://{s3_bucket}/models/m/model.tar.gz"
    assert (
        cli(
            [
                *argv,
                "--image",
                "embedkit",
                "--image-uri",
                image,
                "--model-data",
                data,
                "--instance-type",
                "ml.g4dn.xlarge",
                "--instance-count",
                "2",
                "--env",
                "EMBEDKIT_PRECISION=fp16",
            ]
        )
        == 0
    )
    updated = _json_out(capsys)
    assert updated["action"] == "updated" and updated["status"] == "InService"
    # once InService on the new config, the replaced config and model are deleted
    assert updated["removed"] == [config["EndpointConfigName"], model["ModelName"]]
    sm = boto3.client("sagemaker")
    with pytest.raises(sm.exceptions.ClientError):
        sm.describe_endpoint_config(EndpointConfigName=config["EndpointConfigName"])
    model2 = _one(calls, "CreateModel")
    assert model2["PrimaryContainer"] == {
        "Image": image,
        "Environment": {"SAGEMAKER_REGION": "us-east-1", "EMBEDKIT_PRECISION": "fp16"},
        "ModelDataUrl": data,
    }
    assert _one(calls, "CreateEndpointConfig")["ProductionVariants"] == [
        {
            "VariantName": "AllTraffic",
            "ModelName": model2["ModelName"],
            "InstanceType": "ml.g4dn.xlarge",
            "InitialInstanceCount": 2,
            "InitialVariantWeight": 1.0,
        }
    ]
    assert _one(calls, "UpdateEndpoint") == {"EndpointName": name, "EndpointConfigName": model2["ModelName"]}

    assert cli(["sagemaker", "describe", name]) == 0
    desc = _json_out(capsys)
    assert desc["status"] == "InService" and desc["endpoint_config"] == model2["ModelName"]
    assert desc["variants"][0]["InstanceType"] == "ml.g4dn.xlarge"
    assert desc["models"][0]["image"] == image and desc["models"][0]["model_data"] == data

    assert cli(["sagemaker", "invoke", name, "first text", "second text", "--dimensions", "8"]) == 0
    answer = _json_out(capsys)
    assert answer["endpoint"] == name and answer["response"]  # moto answers a canned body
    sent = _one(calls, "InvokeEndpoint")
    assert sent["EndpointName"] == name and sent["ContentType"] == "application/json"
    assert json.loads(sent["Body"]) == {
        "inputs": ["first text", "second text"],
        "parameters": {"dimensions": 8},
    }

    assert cli(["sagemaker", "delete", name]) == 0
    gone = _json_out(capsys)
    assert gone == {"endpoint": name, "endpoint_config": model2["ModelName"], "models": [model2["ModelName"]]}
    assert cli(["sagemaker", "describe", name]) == 1
    assert f"no endpoint {name}" in capsys.readouterr().err


def test_deploy_refuses_bad_options_before_calling_aws(calls, capsys):
    assert cli(["sagemaker", "deploy", "bad_name", "--role", ROLE, "--image", "hf"]) == 2
    assert "endpoint name 'bad_name' is not valid" in capsys.readouterr().err
    assert cli(["sagemaker", "deploy", "ok-name", "--role", ROLE, "--image", "hf", "--memory", "3000"]) == 2
    assert "--memory must be one of 1024" in capsys.readouterr().err
    assert cli(["sagemaker", "deploy", "ok-name", "--role", ROLE]) == 2  # embedkit image without its URI
    assert "--image-uri" in capsys.readouterr().err
    assert not [n for n, _ in calls if n.startswith("Create")]
