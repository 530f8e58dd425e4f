"""deploy/compose/docker-compose.yml: the local stack's structure, and that switching the consumer from
the local endpoint to SageMaker is a change of environment variables only."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from embedkit.client import ClientSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"


def interpolate(value: object, shell: dict[str, str]) -> object:
    """Compose's ``${VAR}``, ``${VAR-default}`` and ``${VAR:-default}`` against ``shell``."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return shell.get(name) or default
        if op == "-":
            return shell.get(name, default)
        return shell.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", sub, value)


def consumer_environment(compose: dict, shell: dict[str, str]) -> dict[str, str]:
    """The environment the consumer container gets from ``shell`` (null values pass through)."""
    out = {}
    for k, v in compose["services"]["consumer"]["environment"].items():
        if v is None:
            if k in shell:
                out[k] = shell[k]
        else:
            out[k] = str(interpolate(v, shell))
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_sagemaker_local_service_is_the_container_surface(compose):
    svc = compose["services"]["sagemaker-local"]
    assert svc["command"] == ["serve"]
    assert (
        COMPOSE_DIR / svc["build"]["context"] / svc["build"]["dockerfile"]
    ).resolve() == ROOT / "docker" / "Dockerfile"
    assert interpolate(svc["ports"][0], {}) == "8080:8080"
    assert interpolate(svc["environment"]["SAGEMAKER_BIND_TO_PORT"], {}) == "8080"
    host, target, *mode = interpolate(svc["volumes"][0], {}).split(":")
    assert target == "/opt/ml/model" and mode == ["ro"] and (COMPOSE_DIR / host).is_dir()
    health = svc["healthcheck"]
    assert health["test"] == ["CMD", "embedkit-entrypoint", "healthcheck"]  # GET /ping, as the image's
    assert health["retries"] >= 3 and "start_period" in health
    assert svc["restart"] in ("unless-stopped", "always", "on-failure")


def test_consumer_waits_for_a_healthy_endpoint_and_runs_the_example(compose):
    svc = compose["services"]["consumer"]
    assert svc["depends_on"]["sagemaker-local"]["condition"] == "service_healthy"
    endpoint = compose["services"]["sagemaker-local"]
    assert (svc["image"], svc["build"]) == (endpoint["image"], endpoint["build"])  # the same image
    host, target, _ = svc["volumes"][0].split(":")
    assert (COMPOSE_DIR / host / "app.py").is_file() and svc["entrypoint"] == ["python", f"{target}/app.py"]
    assert "EmbeddingClient()" in (COMPOSE_DIR / host / "app.py").read_text()


def test_switching_to_sagemaker_is_a_change_of_environment_only(compose):
    local = ClientSettings.from_env(consumer_environment(compose, {})).validate()
    assert local.transport == "http" and local.endpoint_url == "http://sagemaker-local:8080"
    assert local.contract == "hf"
    cloud_shell = {
        "EMBEDKIT_ENDPOINT_URL": "",
        "EMBEDKIT_SAGEMAKER_ENDPOINT": "alex-embedding-endpoint",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIA...",
        "AWS_SECRET_ACCESS_KEY": "...",
    }
    env = consumer_environment(compose, cloud_shell)
    cloud = ClientSettings.from_env(env).validate()
    assert cloud.transport == "sagemaker" and cloud.sagemaker_endpoint == "alex-embedding-endpoint"
    assert cloud.region == "us-east-1" and env["AWS_ACCESS_KEY_ID"] == "AKIA..."
    assert "AWS_ACCESS_KEY_ID" not in consumer_environment(compose, {})  # no credentials locally


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed here (`docker compose version` fails)")
    proc = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
