"""The ClientApp as Flower loads it (`[tool.flwr.app.components] clientapp`).

Imported under common.app_imports.APP_IMPORT_LOCK: see that module for why.
"""

from __future__ import annotations

from common.app_imports import APP_IMPORT_LOCK

with APP_IMPORT_LOCK:
    from client.client_app import app

__all__ = ["app"]
