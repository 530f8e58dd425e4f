"""``embedkit serve``: a SageMaker-compatible embedding server (ASGI on starlette + uvicorn).

>>> from embedkit.server import ServerSettings
>>> ServerSettings().port
8080
"""

from embedkit.server.app import create_app
from embedkit.server.settings import ServerSettings, choose_model

__all__ = ["ServerSettings", "choose_model", "create_app"]
