"""File loggers for the readable logs (a site's site.log, a run's run.log)."""

from __future__ import annotations

import logging
from pathlib import Path


def file_logger(path: Path) -> logging.Logger:
    """A logger that appends to `path` only (no console echo), one per file path.

    Keyed by the resolved path so that two runs or sites in one process never share a file.
    """
    path = Path(path)
    logger = logging.getLogger(f"fedldm.file.{path.resolve()}")
    if not logger.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
