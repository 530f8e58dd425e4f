"""deploy/k8s: valid against the Kubernetes schemas (kubernetes-validate ships them; no network, no
cluster), and shaped as the issue asks: a resumable batch Job and a probed, gracefully stopping serve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from embedkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes still common on managed clusters, and the newest the package knows.
VERSIONS = ("1.29.0", "latest")

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate not installed: pip install -e '.[dev]'"
)


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def kind(name: str) -> dict:
    found = [d for _, d in documents() if d["kind"] == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def image_user() -> int:
    users = re.findall(r"^USER (\d+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    return int(users[-1])


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    from kubernetes_validate.utils import latest_version

    version = latest_version() if version == "latest" else version
    docs = documents()
    assert {d["kind"] for _, d in docs} >= {"Job", "Deployment", "Service", "ServiceAccount"}
    for name, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises naming the field on error
        assert doc["metadata"]["name"], name


def test_a_broken_manifest_is_rejected():
    bad = kind("Deployment")
    bad = {**bad, "spec": {**bad["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.29.0", strict=True)


def test_batch_job_resumes_after_a_killed_pod_and_reads_credentials_from_irsa_or_a_secret():
    job = kind("Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["backoffLimit"] >= 3 and pod["restartPolicy"] == "Never"  # a new pod per failure
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    fail_codes = next(r["onExitCodes"]["values"] for r in rules if r["action"] == "FailJob")
    assert 2 in fail_codes and 130 not in fail_codes  # bad input stops; interrupted (130) is retried
    c = container(job)
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    sa = kind("ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert c["envFrom"] == [{"secretRef": {"name": "embedkit-aws", "optional": True}}]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == image_user()


def test_batch_job_arguments_are_a_valid_embed_command_over_s3():
    job = kind("Job")
    args = [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in container(job)["args"]]
    assert args[0] == "embed" and job["spec"]["completionMode"] == "Indexed"
    ns = build_parser().parse_args(args)  # the CLI of this checkout accepts them
    assert ns.command == "embed"
    values = {str(v) for v in vars(ns).values()}
    assert "s3://my-bucket/input/" in values and "s3://my-bucket/embeddings/" in values
    assert str(job["spec"]["completions"]) in container(job)["args"]  # one shard per index


def test_serve_deployment_probes_ping_and_stops_gracefully():
    dep = kind("Deployment")
    pod, c = dep["spec"]["template"]["spec"], container(dep)
    assert c["args"] == ["serve"] and build_parser().parse_args(c["args"]).command == "serve"
    (port,) = c["ports"]
    assert port["containerPort"] == 8080
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/ping", "port": port["name"]}, probe
    # SIGTERM drain: the grace period covers preStop plus the server's own drain timeout
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert pod["terminationGracePeriodSeconds"] > 5 + float(env["EMBEDKIT_GRACEFUL_TIMEOUT"])
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsUser"] == image_user()


def test_service_routes_to_the_serve_pods():
    dep, svc = kind("Deployment"), kind("Service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8080 and port["targetPort"] == container(dep)["ports"][0]["name"]
    pdb = kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
