"""SageMaker endpoints: model + endpoint config + endpoint, serverless or real-time, via boto3.

The request builders (:func:`model_request`, :func:`endpoint_config_request`) are pure functions;
:func:`deploy` sends them and waits until the endpoint is InService. Redeploying an existing name
creates a new model and config and updates the endpoint to them (SageMaker swaps without downtime).

>>> endpoint_config_request("cfg", "m", serverless=True, memory_mb=3072, max_concurrency=2)["ProductionVariants"][0]["ServerlessConfig"]
{'MemorySizeInMB': 3072, 'MaxConcurrency': 2}
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from embedkit.aws.names import MAX_NAME, sanitize, validate_job_name
from embedkit.aws.session import client, region_name
from embedkit.aws.settings import default_image
from embedkit.errors import ConfigError, EmbedkitError

log = logging.getLogger("embedkit.sagemaker")

SERVERLESS_MEMORY = (1024, 2048, 3072, 4096, 5120, 6144)
VARIANT = "AllTraffic"
HF_TASK = "feature-extraction"


@dataclass
class DeploySpec:
    """What :func:`deploy` creates. ``image`` is ``embedkit``, ``hf`` or an image URI."""

    name: str
    role_arn: str
    image: str = "embedkit"
    image_uri: str | None = None  # the embedkit image in your ECR (for image="embedkit")
    model_data: str | None = None  # s3://.../model.tar.gz (embedkit sagemaker package-model)
    model_id: str | None = None  # HF_MODEL_ID / EMBEDKIT_MODEL when there is no model_data
    hf_task: str = HF_TASK
    serverless: bool = True
    memory_mb: int = 3072
    max_concurrency: int = 2
    instance_type: str = "ml.m5.xlarge"
    instance_count: int = 1
    environment: dict[str, str] = field(default_factory=dict)
    region: str | None = None


def container(spec: DeploySpec) -> dict:
    """The model's PrimaryContainer for ``spec``."""
    region = region_name(spec.region)
    env: dict[str, str] = {}
    if spec.image == "hf":
        image = default_image(None if spec.serverless else spec.instance_type, region)
        env["HF_TASK"] = spec.hf_task
        if not spec.model_data:
            env["HF_MODEL_ID"] = spec.model_id or "sentence-transformers/all-MiniLM-L6-v2"
    else:
        image = spec.image_uri if spec.image == "embedkit" else spec.image
        if not image:
            raise ConfigError(
                "--image embedkit needs the image's URI in your ECR: pass --image-uri "
                "<account>.dkr.ecr.<region>.amazonaws.com/embedkit:<tag> (built from docker/), or set "
                "EMBEDKIT_IMAGE_URI; or deploy with --image hf"
            )
        if not spec.model_data:
            env["EMBEDKIT_MODEL"] = spec.model_id or "default"
    env["SAGEMAKER_REGION"] = region
    env.update(spec.environment)
    out: dict[str, Any] = {"Image": image, "Environment": env}
    if spec.model_data:
        if not spec.model_data.startswith("s3://"):
            raise ConfigError(f"--model-data must be an s3:// URL of a model.tar.gz, got {spec.model_data!r}")
        out["ModelDataUrl"] = spec.model_data
    return out


def model_request(spec: DeploySpec, model_name: str) -> dict:
    """CreateModel arguments."""
    validate_job_name(model_name, "model name")
    return {"ModelName": model_name, "ExecutionRoleArn": spec.role_arn, "PrimaryContainer": container(spec)}


def endpoint_config_request(
    config_name: str,
    model_name: str,
    *,
    serverless: bool,
    memory_mb: int = 3072,
    max_concurrency: int = 2,
    instance_type: str = "ml.m5.xlarge",
    instance_count: int = 1,
) -> dict:
    """CreateEndpointConfig arguments: one variant, serverless or on instances."""
    validate_job_name(config_name, "endpoint config name")
    variant: dict[str, Any] = {"VariantName": VARIANT, "ModelName": model_name}
    if serverless:
        if memory_mb not in SERVERLESS_MEMORY:
            raise ConfigError(
                f"--memory must be one of {', '.join(map(str, SERVERLESS_MEMORY))} MB, got {memory_mb}"
            )
        if not 1 <= max_concurrency <= 200:
            raise ConfigError(f"--max-concurrency must be 1..200, got {max_concurrency}")
        variant["ServerlessConfig"] = {"MemorySizeInMB": memory_mb, "MaxConcurrency": max_concurrency}
    else:
        if not instance_type.startswith("ml."):
            raise ConfigError(f"--instance-type must look like ml.m5.xlarge, got {instance_type!r}")
        if instance_count < 1:
            raise ConfigError(f"--instance-count must be >= 1, got {instance_count}")
        variant.update(
            {
                "InstanceType": instance_type,
                "InitialInstanceCount": instance_count,
                "InitialVariantWeight": 1.0,
            }
        )
    return {"EndpointConfigName": config_name, "ProductionVariants": [variant]}


def _versioned(name: str, stamp: str) -> str:
    tail = f"-{stamp}"
    return sanitize(name)[: MAX_NAME - len(tail)].rstrip("-") + tail


def _current_config(sm: Any, name: str) -> str | None:
    """The endpoint config an existing endpoint runs, or None when there is no such endpoint."""
    try:
        return sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
    except sm.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ValidationException":  # no such endpoint
            return None
        raise


def _config_models(sm: Any, config: str) -> list[str]:
    variants = sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
    return [v["ModelName"] for v in variants]


def _endpoint(name: str, region: str | None) -> tuple[Any, dict]:
    """The SageMaker client and endpoint ``name``'s description (an error when there is none)."""
    sm = client("sagemaker", region)
    try:
        return sm, sm.describe_endpoint(EndpointName=name)
    except sm.exceptions.ClientError as exc:
        raise EmbedkitError(f"no endpoint {name}: {exc}") from exc


def _remove_config(sm: Any, config: str, keep_models: set[str]) -> list[str]:
    """Delete a replaced endpoint config and its models (best effort); returns what was deleted."""
    removed = []
    try:
        models = _config_models(sm, config)
        sm.delete_endpoint_config(EndpointConfigName=config)
        removed.append(config)
        for m in models:
            if m not in keep_models:
                sm.delete_model(ModelName=m)
                removed.append(m)
    except sm.exceptions.ClientError as exc:
        log.warning("could not remove the replaced endpoint config %s: %s", config, exc)
    return removed


def wait_in_service(
    sm: Any,
    name: str,
    *,
    timeout: float = 1800.0,
    poll_seconds: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Poll until the endpoint is InService; raise on Failed or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        desc = sm.describe_endpoint(EndpointName=name)
        status = desc["EndpointStatus"]
        if status != last:
            log.info("endpoint %s: %s", name, status)
            last = status
        if status == "InService":
            return desc
        if status in ("Failed", "OutOfService"):
            raise EmbedkitError(
                f"endpoint {name} is {status}: {desc.get('FailureReason', 'no reason given')}"
            )
        if time.monotonic() > deadline:
            raise EmbedkitError(f"endpoint {name} still {status} after {timeout:.0f}s; check the console")
        sleep(poll_seconds)


def deploy(
    spec: DeploySpec, *, wait: bool = True, timeout: float = 1800.0, poll_seconds: float = 15.0
) -> dict:
    """Create the model, the endpoint config and the endpoint (or update an existing endpoint)."""
    validate_job_name(spec.name, "endpoint name")
    if not spec.role_arn:
        raise ConfigError(
            "no execution role: pass --role arn:aws:iam::<account>:role/<name> (or set "
            "EMBEDKIT_SAGEMAKER_ROLE); the Terraform module infra/terraform/sagemaker-endpoint creates one"
        )
    sm = client("sagemaker", spec.region)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)
    model_name = config_name = _versioned(spec.name, stamp)
    model = model_request(spec, model_name)
    config = endpoint_config_request(
        config_name,
        model_name,
        serverless=spec.serverless,
        memory_mb=spec.memory_mb,
        max_concurrency=spec.max_concurrency,
        instance_type=spec.instance_type,
        instance_count=spec.instance_count,
    )
    try:
        sm.create_model(**model)
        sm.create_endpoint_config(**config)
        previous = _current_config(sm, spec.name)
        if previous is not None:
            sm.update_endpoint(EndpointName=spec.name, EndpointConfigName=config_name)
            action = "updated"
        else:
            sm.create_endpoint(EndpointName=spec.name, EndpointConfigName=config_name)
            action = "created"
    except sm.exceptions.ClientError as exc:
        raise EmbedkitError(f"SageMaker refused the deployment of {spec.name}: {exc}") from exc
    log.info("endpoint %s %s with config %s", spec.name, action, config_name)
    status = "Creating" if action == "created" else "Updating"
    removed: list[str] = []
    if wait:
        desc = wait_in_service(sm, spec.name, timeout=timeout, poll_seconds=poll_seconds)
        status = desc["EndpointStatus"]
        if previous and previous != config_name and desc["EndpointConfigName"] == config_name:
            removed = _remove_config(sm, previous, keep_models={model_name})
    return {
        "endpoint": spec.name,
        "action": action,
        "model": model_name,
        "endpoint_config": config_name,
        "status": status,
        "image": model["PrimaryContainer"]["Image"],
        "removed": removed,
    }


def describe(name: str, region: str | None = None) -> dict:
    """Endpoint status with its config's variants and its models' images, data and environment."""
    sm, ep = _endpoint(name, region)
    cfg = sm.describe_endpoint_config(EndpointConfigName=ep["EndpointConfigName"])
    models = []
    for v in cfg["ProductionVariants"]:
        m = sm.describe_model(ModelName=v["ModelName"])
        c = m.get("PrimaryContainer", {})
        models.append(
            {
                "name": m["ModelName"],
                "image": c.get("Image"),
                "model_data": c.get("ModelDataUrl"),
                "environment": c.get("Environment", {}),
                "role": m.get("ExecutionRoleArn"),
            }
        )
    return {
        "endpoint": ep["EndpointName"],
        "arn": ep["EndpointArn"],
        "status": ep["EndpointStatus"],
        "failure_reason": ep.get("FailureReason"),
        "endpoint_config": ep["EndpointConfigName"],
        "variants": [
            {k: v for k, v in var.items() if k != "ModelName"} | {"model": var["ModelName"]}
            for var in cfg["ProductionVariants"]
        ],
        "models": models,
        "created": str(ep.get("CreationTime")),
    }


def delete(name: str, *, keep_model: bool = False, region: str | None = None) -> dict:
    """Delete the endpoint and (unless ``keep_model``) its endpoint config and models."""
    sm, ep = _endpoint(name, region)
    config = ep["EndpointConfigName"]
    models = _config_models(sm, config)
    sm.delete_endpoint(EndpointName=name)
    deleted: dict[str, Any] = {"endpoint": name, "endpoint_config": None, "models": []}
    if not keep_model:
        sm.delete_endpoint_config(EndpointConfigName=config)
        deleted["endpoint_config"] = config
        for m in models:
            sm.delete_model(ModelName=m)
            deleted["models"].append(m)
    return deleted


def invoke(
    name: str,
    texts: Sequence[str] | str,
    *,
    parameters: Mapping[str, Any] | None = None,
    content_type: str = "application/json",
    region: str | None = None,
) -> tuple[Any, str]:
    """Send ``{"inputs": texts}`` (HF inference payload) to the endpoint; returns (decoded body, content
    type). The body is parsed JSON when it is JSON, else text."""
    runtime = client("sagemaker-runtime", region)
    payload: dict[str, Any] = {"inputs": texts}
    if parameters:
        payload["parameters"] = dict(parameters)
    try:
        resp = runtime.invoke_endpoint(
            EndpointName=name,
            Body=json.dumps(payload).encode(),
            ContentType=content_type,
            Accept="application/json",
        )
    except runtime.exceptions.ModelError as exc:
        err = exc.response
        raise EmbedkitError(
            f"endpoint {name}'s model answered {err.get('OriginalStatusCode')}: {err.get('OriginalMessage')}"
        ) from exc
    except runtime.exceptions.ClientError as exc:
        raise EmbedkitError(f"cannot invoke endpoint {name}: {exc}") from exc
    raw = resp["Body"].read()
    ctype = resp.get("ContentType", "")
    try:
        return json.loads(raw), ctype
    except ValueError:
        return raw.decode("utf-8", "replace"), ctype
