"""AWS doors: run jobs as SageMaker Processing jobs, deploy endpoints, stage files in S3, tail logs.

Nothing here is imported by the engine; everything talks to AWS through boto3, so the same code
runs against real AWS or a moto server (``AWS_ENDPOINT_URL``).

>>> from embedkit.aws import job_name
>>> job_name("embedkit embed!", now=0, token="ab12")
'embedkit-embed-19700101-000000-ab12'
"""

from embedkit.aws.names import job_name, validate_job_name
from embedkit.aws.processing import Channel, OutputChannel, ProcessingJobSpec, build_processing_request

__all__ = [
    "Channel",
    "OutputChannel",
    "ProcessingJobSpec",
    "build_processing_request",
    "job_name",
    "validate_job_name",
]
