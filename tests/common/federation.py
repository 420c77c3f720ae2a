"""Whole tiny federations on the in-process grid, for the server tests.

`make_federation` wires simulated sites (enrolled ledgers), the real ClientApp on a `LocalGrid`
and a `Coordinator`. `fast_accounting` memoises Opacus' per-order RDP computation, a pure
function of (sample rate, noise multiplier, order): the sites' noise calibration repeats the
same computations for every site and run, and without the cache it dominates a tiny run.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

from flwr.app import Message

from client.client_app import SimulationSites, make_client_app
from client.ledger import PrivacyLedger
from ldm_core.config import RunConfig
from server.federation import Coordinator, ServerSettings
from tests.common.local_grid import LocalGrid, Tamper


def make_federation(tmp: Path, manifest: Path, cfg: RunConfig, *, n_sites: int = 2,
                    partition: str = "site", reproducible: bool = False,
                    registry: Path | None = None, enroll: bool = True,
                    site_budget: float | None = None, min_sites: int | None = None,
                    tamper: Tamper | None = None,
                    unavailable: Callable[[int, Message], bool] | None = None) -> Coordinator:
    eps = cfg.privacy.epsilon if site_budget is None else site_budget
    sites = SimulationSites(data=str(manifest), n_sites=n_sites, partition=partition,
                            state_root=tmp / "sites", epsilon=eps, delta=1e-5, data_seed=0,
                            device="cpu", reproducible_seed=0 if reproducible else None,
                            allow_audit=False)
    for k in range(n_sites):
        s = sites.site(k)
        if enroll and not s.ledger_path.exists():
            s.state_dir.mkdir(parents=True, exist_ok=True)
            PrivacyLedger.create(s.ledger_path, budget_epsilon=eps, delta=1e-5,
                                 site_id=s.site_id)
    grid = LocalGrid(make_client_app(sites), n_sites=n_sites, tamper=tamper,
                     unavailable=unavailable)
    return Coordinator(grid, cfg, ServerSettings(
        out=tmp / "run", min_sites=n_sites if min_sites is None else min_sites,
        expected_sites=n_sites, show_progress=False, spend_registry=registry))


@contextlib.contextmanager
def fast_accounting() -> Iterator[None]:
    """Memoise opacus' `_compute_rdp(q, sigma, alpha)` (pure) for the duration."""
    from opacus.accountants.analysis import rdp

    original = rdp._compute_rdp
    rdp._compute_rdp = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        rdp._compute_rdp = original
