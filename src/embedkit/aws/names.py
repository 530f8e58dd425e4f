"""Names SageMaker accepts: job, model, endpoint names (``[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}``).

>>> job_name("My_Job.v2", now=86400, token="x1")
'My-Job-v2-19700102-000000-x1'
>>> validate_job_name("ok-name-1")
'ok-name-1'
"""

from __future__ import annotations

import re
import secrets
import time

from embedkit.errors import ConfigError

NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
MAX_NAME = 63
RETRY_ROOM = 4  # generated names leave room for "-r<N>" so retries keep the unique tail


def sanitize(base: str) -> str:
    """``base`` with every run of characters SageMaker refuses turned into one ``-``."""
    out = re.sub(r"[^a-zA-Z0-9]+", "-", base).strip("-")
    return out or "job"


def job_name(base: str, *, now: float | None = None, token: str | None = None, suffix: str = "") -> str:
    """A unique, valid name: ``<base>-<UTC yyyymmdd-HHMMSS>-<random>[<suffix>]``, base cut to fit."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    token = token or secrets.token_hex(4)  # 8 hex digits: names made in the same second stay apart
    tail = f"-{stamp}-{token}{suffix}"
    head = sanitize(base)[: MAX_NAME - RETRY_ROOM - len(tail)].rstrip("-") or "job"
    return validate_job_name(head + tail)


def retry_name(name: str, attempt: int) -> str:
    """The name of retry ``attempt`` of job ``name``: ``<name>-r<attempt>`` (a name longer than
    :func:`job_name` makes is cut at its start, keeping its unique end).

    >>> retry_name("embed-20250101-000000-ab12-r1", 2)
    'embed-20250101-000000-ab12-r2'
    """
    suffix = f"-r{attempt}"
    base = re.sub(r"-r\d+$", "", name)
    over = len(base) + len(suffix) - MAX_NAME
    if over > 0:
        base = base[over:].lstrip("-")
    return validate_job_name(base + suffix)


def validate_job_name(name: str, what: str = "job name") -> str:
    """Return ``name`` if SageMaker accepts it, else raise :class:`ConfigError` saying why."""
    if not NAME_RE.match(name):
        raise ConfigError(
            f"{what} {name!r} is not valid for SageMaker: use 1-63 letters, digits and hyphens, "
            f"starting and ending with a letter or digit (pattern [a-zA-Z0-9](-*[a-zA-Z0-9]){{0,62}})"
        )
    return name
