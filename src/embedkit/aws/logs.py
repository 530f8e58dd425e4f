"""Tail a processing job's CloudWatch logs to the terminal while it runs.

SageMaker writes each instance's output to log group ``/aws/sagemaker/ProcessingJobs``, stream
``<job name>/<host>-<epoch>``. :class:`LogTailer` finds the job's streams by that prefix and prints
new events as ``[<host>] message``; :func:`wait_for_job` polls the job's status between rounds and
returns its final description.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger("embedkit.sagemaker")

LOG_GROUP = "/aws/sagemaker/ProcessingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")


class LogTailer:
    """Prints the events of every stream named ``<job_name>/...`` once, in order per stream."""

    def __init__(self, job_name: str, logs_client: Any, out: TextIO | None = None, group: str = LOG_GROUP):
        self.job_name = job_name
        self.logs = logs_client
        self.out = out
        self.group = group
        self._tokens: dict[str, str | None] = {}
        self.printed = 0

    def _streams(self) -> list[str]:
        names: list[str] = []
        kwargs = {"logGroupName": self.group, "logStreamNamePrefix": self.job_name + "/"}
        try:
            while True:
                page = self.logs.describe_log_streams(**kwargs)
                names.extend(s["logStreamName"] for s in page.get("logStreams", []))
                if not page.get("nextToken"):
                    break
                kwargs["nextToken"] = page["nextToken"]
        except self.logs.exceptions.ResourceNotFoundException:
            return []  # the group appears with the first instance's first line
        return sorted(names)

    def poll(self) -> int:
        """Print the events written since the last call; returns how many."""
        out = self.out or sys.stdout
        n = 0
        for stream in self._streams():
            host = stream.split("/", 1)[1] if "/" in stream else stream
            host = host.rsplit("-", 1)[0] if host.rsplit("-", 1)[-1].isdigit() else host
            token = self._tokens.get(stream)
            while True:
                kwargs: dict[str, Any] = {
                    "logGroupName": self.group,
                    "logStreamName": stream,
                    "startFromHead": True,
                }
                if token:
                    kwargs["nextToken"] = token
                page = self.logs.get_log_events(**kwargs)
                for event in page.get("events", []):
                    out.write(f"[{host}] {event['message'].rstrip()}\n")
                    n += 1
                new = page.get("nextForwardToken")
                if not page.get("events") or new == token:
                    token = new or token
                    break
                token = new
            self._tokens[stream] = token
        out.flush()
        self.printed += n
        return n


def describe(sm: Any, job_name: str) -> dict:
    return sm.describe_processing_job(ProcessingJobName=job_name)


def wait_for_job(
    sm: Any,
    job_name: str,
    *,
    logs_client: Any = None,
    poll_seconds: float = 5.0,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Poll until the job is Completed, Failed or Stopped, printing its logs when ``logs_client`` is
    given; returns the final ``describe_processing_job`` answer."""
    tailer = LogTailer(job_name, logs_client, out) if logs_client is not None else None
    last = None
    while True:
        desc = describe(sm, job_name)
        status = desc["ProcessingJobStatus"]
        if status != last:
            log.info("job %s: %s", job_name, status)
            last = status
        if tailer is not None:
            tailer.poll()
        if status in TERMINAL:
            if tailer is not None:
                tailer.poll()  # lines written between the last round and the end
            return desc
        sleep(poll_seconds)
