"""The detection service: ``decodet serve`` and :func:`create_app` for your own ASGI server.

>>> from decodet.serve import create_app
>>> app = create_app("runs/exp/best.safetensors", max_batch=8, score_threshold=0.3)
>>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)

``create_app`` is loaded on first use (it needs FastAPI); :class:`ServeConfig` does not.
"""

from __future__ import annotations

from typing import Any

from decodet.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from decodet.serve.app import create_app

        return create_app
    raise AttributeError(name)
