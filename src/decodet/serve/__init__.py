"""The detection service: ``decodet serve`` and :func:`create_app` for your own ASGI server.

>>> from decodet.serve import create_app
>>> app = create_app("runs/exp/best.safetensors", max_batch=8, threshold=0.3)
>>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

from decodet.serve.app import create_app
from decodet.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
