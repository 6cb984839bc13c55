"""ASGI entry point: `uvicorn tileserver.main:app` (settings from CLEARSKY_* env vars)."""

from tileserver.app import create_app

app = create_app()
