"""infra/terraform/sagemaker-endpoint: formatted, initialises offline from the local plugin mirror,
validates, refuses bad variables, and applies against the moto server (real-time checked by plan)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import boto3
import pytest

MODULE = Path(__file__).resolve().parents[2] / "infra" / "terraform" / "sagemaker-endpoint"
TERRAFORM = shutil.which("terraform") or (
    "/usr/local/bin/terraform" if os.path.exists("/usr/local/bin/terraform") else None
)
PLUGINS = os.environ.get("EMBEDKIT_TF_PLUGIN_DIR", "/opt/tf-plugins")
HAS_AWS_PLUGIN = os.path.isdir(os.path.join(PLUGINS, "registry.terraform.io", "hashicorp", "aws"))

pytestmark = [
    pytest.mark.skipif(
        TERRAFORM is None, reason="terraform is not installed (needs /usr/local/bin/terraform)"
    ),
    pytest.mark.skipif(
        not HAS_AWS_PLUGIN, reason=f"no hashicorp/aws provider in the offline plugin mirror {PLUGINS}"
    ),
]

ANSI = re.compile(r"\x1b\[[0-9;]*m")
OVERRIDE = """
provider "aws" {{
  region                      = "us-east-1"
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  endpoints {{
    iam       = "{url}"
    sts       = "{url}"
    sagemaker = "{url}"
    s3        = "{url}"
  }}
}}
"""


def _tf(cwd: Path, *args: str, timeout: float = 80, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",  # no version check call to the internet
        "TF_IN_AUTOMATION": "1",
        "TF_CLI_CONFIG_FILE": "/dev/null",
        "TF_INPUT": "0",
    }
    return subprocess.run(
        [TERRAFORM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=stdin
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, moto_server) -> Path:
    """A copy of the module, initialised offline, its provider pointed at moto by an override file."""
    d = tmp_path_factory.mktemp("tf-sagemaker-endpoint")
    for f in MODULE.glob("*.tf"):
        shutil.copy(f, d / f.name)
    (d / "moto_override.tf").write_text(OVERRIDE.format(url=moto_server))
    proc = _tf(d, "init", "-input=false", "-backend=false", f"-plugin-dir={PLUGINS}", "-no-color")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return d


def test_module_is_formatted_and_valid(workdir):
    proc = _tf(MODULE, "fmt", "-check", "-recursive", "-diff", "-no-color")
    assert proc.returncode == 0, f"terraform fmt would change:\n{proc.stdout}"
    proc = _tf(workdir, "validate", "-json", "-no-color")
    report = json.loads(proc.stdout)
    assert report["valid"] is True, report["diagnostics"]
    assert (MODULE / "README.md").read_text().count("terraform apply") >= 1


def test_bad_variables_are_refused_with_their_rule(workdir):
    proc = _tf(
        workdir,
        "console",
        "-var=memory_size_mb=1000",
        "-var=name=bad_name",
        "-var=max_concurrency=0",
        stdin="var.name\n",
    )
    text = ANSI.sub("", proc.stdout + proc.stderr)
    assert "memory_size_mb must be one of 1024, 2048, 3072, 4096, 5120, 6144." in text
    assert "name must be 1-54 letters, digits and hyphens" in text
    assert "max_concurrency must be a whole number from 1 to 200." in text


def test_apply_against_moto_creates_a_least_privilege_role_and_a_serverless_endpoint(workdir):
    name = f"tf-{uuid.uuid4().hex[:10]}"
    proc = _tf(
        workdir,
        "apply",
        "-auto-approve",
        "-no-color",
        f"-var=name={name}",
        "-var=iam_propagation_seconds=1",
        '-var=environment={EMBEDKIT_PRECISION="fp32"}',
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outputs = json.loads(_tf(workdir, "output", "-json").stdout)
    assert outputs["endpoint_name"]["value"] == name
    assert (
        "invoke-endpoint" in outputs["invoke_example"]["value"] and name in outputs["invoke_example"]["value"]
    )

    sm = boto3.client("sagemaker")
    ep = sm.describe_endpoint(EndpointName=name)
    assert ep["EndpointStatus"] == "InService"
    cfg = sm.describe_endpoint_config(EndpointConfigName=ep["EndpointConfigName"])
    [variant] = cfg["ProductionVariants"]
    assert variant["VariantName"] == "AllTraffic"
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 3072, "MaxConcurrency": 2}
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert re.fullmatch(rf"{name}-[0-9a-f]{{8}}", model["ModelName"])
    assert model["PrimaryContainer"]["Image"].endswith(
        "/huggingface-pytorch-inference:2.6.0-transformers4.49.0-cpu-py312-ubuntu22.04"
    )
    assert model["PrimaryContainer"]["Environment"] == {
        "HF_MODEL_ID": "sentence-transformers/all-MiniLM-L6-v2",
        "HF_TASK": "feature-extraction",
        "SAGEMAKER_REGION": "us-east-1",
        "EMBEDKIT_PRECISION": "fp32",
    }
    role_name = model["ExecutionRoleArn"].rsplit("/", 1)[1]
    assert outputs["role_arn"]["value"] == model["ExecutionRoleArn"]
    iam = boto3.client("iam")
    trust = iam.get_role(RoleName=role_name)["Role"]["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    assert iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"] == []  # no full access
    [policy_name] = iam.list_role_policies(RoleName=role_name)["PolicyNames"]
    doc = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    sids = {s["Sid"]: s for s in doc["Statement"]}
    assert set(sids) == {"EcrAuth", "EcrPull", "Logs", "Metrics"}
    assert sids["EcrPull"]["Resource"] == (
        "arn:aws:ecr:us-east-1:763104351884:repository/huggingface-pytorch-inference"
    )
    assert sids["Logs"]["Resource"].endswith(f":log-group:/aws/sagemaker/Endpoints/{name}*")

    # The same stack on real-time GPU instances: new model and config are created before the old go.
    proc = _tf(
        workdir,
        "plan",
        "-no-color",
        "-refresh=false",  # the state was just written by apply
        "-out=realtime.tfplan",
        f"-var=name={name}",
        "-var=iam_propagation_seconds=1",
        '-var=environment={EMBEDKIT_PRECISION="fp32"}',
        "-var=serverless=false",
        "-var=instance_type=ml.g4dn.xlarge",
        "-var=instance_count=2",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads(_tf(workdir, "show", "-json", "realtime.tfplan").stdout)
    changes = {c["address"]: c["change"] for c in plan["resource_changes"]}
    config = changes["aws_sagemaker_endpoint_configuration.this"]
    assert config["actions"] == ["create", "delete"]  # create_before_destroy
    [pv] = config["after"]["production_variants"]
    assert (pv["instance_type"], pv["initial_instance_count"], pv["serverless_config"]) == (
        "ml.g4dn.xlarge",
        2,
        [],
    )
    assert changes["aws_sagemaker_endpoint.this"]["actions"] == ["update"]  # same endpoint, new config
    model = changes["aws_sagemaker_model.this"]
    assert model["actions"] == ["create", "delete"]  # a GPU instance gets the DLC's GPU build
    assert model["after"]["primary_container"][0]["image"].endswith(
        ":2.6.0-transformers4.49.0-gpu-py312-cu124-ubuntu22.04"
    )
