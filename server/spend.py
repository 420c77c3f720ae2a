"""The coordinator's memory of each site's cumulative epsilon, across rounds, runs and restarts.

Why: a site's spend can only grow. A site that reports less than before has lost or reset its
ledger (a deleted state folder) or is lying; in both cases its privacy accounting can no longer be
trusted, so the coordinator refuses its replies, loudly, instead of believing the lower figure.
"""

from __future__ import annotations

from pathlib import Path

from common import jsonio
from server.run_folder import read_json, write_json_atomic


class SpendRegistry:
    """`{site: highest cumulative epsilon reported}` in one JSON file, rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._spend: dict[str, float] = {}
        if self.path.exists():
            doc = read_json(self.path)
            if not isinstance(doc, dict):
                raise RuntimeError(f"{self.path}: not a site-spend registry; restore it from a "
                                   "backup")
            self._spend = {str(k): float(jsonio.decode_float(v)) for k, v in doc.items()}

    def get(self, site: str) -> float | None:
        return self._spend.get(site)

    def record(self, site: str, epsilon: float) -> None:
        if epsilon > self._spend.get(site, -1.0):
            self._spend[site] = float(epsilon)
            write_json_atomic(self.path, self._spend)
