"""boto3 clients configured the AWS SDK way: region and endpoints from the environment.

``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_<SERVICE>``) points every client at a moto server or
another endpoint with configuration only; boto3 reads those names itself.
"""

from __future__ import annotations

import functools
import os
from typing import Any

DEFAULT_REGION = "us-east-1"


def region_name(explicit: str | None = None) -> str:
    """The region: ``explicit``, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else the profile's, else
    us-east-1."""
    if explicit:
        return explicit
    env = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if env:
        return env
    import boto3

    return boto3.session.Session().region_name or DEFAULT_REGION


def client(service: str, region: str | None = None) -> Any:
    """A boto3 client for ``service`` in :func:`region_name`."""
    import boto3

    return boto3.client(service, region_name=region_name(region))


@functools.lru_cache(maxsize=8)
def _account(region: str, endpoint: str | None) -> str:
    return client("sts", region).get_caller_identity()["Account"]


def account_id(region: str | None = None) -> str:
    """The caller's AWS account id (cached per region and endpoint)."""
    return _account(region_name(region), os.environ.get("AWS_ENDPOINT_URL"))
