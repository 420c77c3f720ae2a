"""What a site owns: where its data and ledger live, and its privacy budget.

In deployment these come from the SuperNode's `--node-config` (set by `fedldm site start`), never
from the coordinator's run config: the coordinator may *ask* for a smaller epsilon for a run, but
the site's budget is the ceiling (`effective_target`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SiteConfigError(ValueError):
    """A node-config value is missing or invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    data: str
    state_dir: Path
    epsilon: float
    delta: float
    partition: str = "site"
    site_index: int = 0
    n_sites: int = 1
    data_seed: int = 0
    device: str = "auto"
    holdout_fraction: float = 0.15
    test_fraction: float = 0.15
    show_progress: bool = False
    # Opt-in: an audit is a DP release charged to the ledger, and a site decides to spend on it.
    allow_audit: bool = False
    # Opt-in too: scoring the coordinator's classifier on the site's test patients (deployments
    # without a coordinator-held reference set) is a DP release and a DP-trained classifier.
    allow_evaluate: bool = False
    # Opt-in as well: a paired image/mask run (model.mask_channels > 0) reads the site's lesion
    # masks and trains on them. Masks go out only through the same DP paths as images, but
    # whether a site holds them at all is the site's to declare, not the coordinator's to probe.
    allow_masks: bool = False
    # Simulation and tests only: seed the site's privacy randomness so a run can be repeated.
    # NOT private against anyone who knows the seed; deployed sites refuse it.
    reproducible_seed: int | None = None

    def __post_init__(self) -> None:
        if not self.site_id:
            raise SiteConfigError("site-id is empty: set --site-id NAME (e.g. hospital-a)")
        if not self.data:
            raise SiteConfigError("data is empty: set --data PATH to the site's images")
        if not self.epsilon > 0:
            raise SiteConfigError(f"epsilon must be > 0 (inf = no DP), got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise SiteConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not 0 <= self.site_index < self.n_sites:
            raise SiteConfigError(f"site-index {self.site_index} not in [0, {self.n_sites})")

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.json"

    def effective_target(self, requested_epsilon: float) -> float:
        """The run's epsilon target: the coordinator can lower it, never raise it."""
        return min(self.epsilon, requested_epsilon)

    @staticmethod
    def from_node_config(node_config: Mapping[str, Any]) -> SiteConfig:
        """Parse Flower node config (string/number values, kebab-case keys)."""

        if "privacy-seed" in node_config:
            raise SiteConfigError(
                "node config sets 'privacy-seed': seeded privacy randomness is for simulations "
                "only (it voids the DP guarantee against anyone who knows the seed); remove it")

        def get(key: str, default: Any = None) -> Any:
            if key in node_config:
                return node_config[key]
            if default is None:
                raise SiteConfigError(
                    f"node config has no '{key}': start the site with `fedldm site start` "
                    f"(which sets it) or pass --node-config \"{key}=...\""
                )
            return default

        def as_float(key: str, default: Any = None) -> float:
            v = get(key, default)
            try:
                return math.inf if str(v).lower() == "inf" else float(v)
            except ValueError as e:
                raise SiteConfigError(f"node config '{key}'={v!r} is not a number") from e

        return SiteConfig(
            site_id=str(get("site-id")),
            data=str(get("data-path")),
            state_dir=Path(str(get("state-dir"))),
            epsilon=as_float("epsilon"),
            delta=as_float("delta"),
            partition=str(get("partition", "all")),
            site_index=int(get("site-index", 0)),
            n_sites=int(get("num-sites", 1)),
            data_seed=int(get("data-seed", 0)),
            device=str(get("device", "auto")),
            show_progress=str(get("progress", "false")).lower() == "true",
            allow_audit=str(get("allow-audit", "false")).lower() == "true",
            allow_evaluate=str(get("allow-evaluate", "false")).lower() == "true",
            allow_masks=str(get("allow-masks", "false")).lower() == "true",
        )
