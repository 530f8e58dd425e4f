"""One client for a local server and SageMaker: only configuration differs.

>>> from embedkit.client import EmbeddingClient
>>> client = EmbeddingClient(endpoint_url="http://localhost:8080")   # or EMBEDKIT_* env vars
>>> client.transport_name
'http'

``EMBEDKIT_ENDPOINT_URL`` picks HTTP (httpx); ``EMBEDKIT_SAGEMAKER_ENDPOINT`` picks boto3's
``sagemaker-runtime``. ``EMBEDKIT_CONTRACT`` picks the wire format: ``hf`` (default), ``search_term``,
``openai``.
"""

from embedkit.client.client import AsyncEmbeddingClient, ClientStats, EmbeddingClient
from embedkit.client.errors import EndpointError, EndpointUnavailableError, ResponseFormatError
from embedkit.client.settings import ClientSettings

__all__ = [
    "AsyncEmbeddingClient",
    "ClientSettings",
    "ClientStats",
    "EmbeddingClient",
    "EndpointError",
    "EndpointUnavailableError",
    "ResponseFormatError",
]
