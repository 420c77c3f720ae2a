"""Shared fixtures: a tiny demo dataset on disk (phantoms, 16 px) and a tiny run config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# One BLAS/OpenMP thread per process: oversubscribing 2 cores slows torch by 10x or more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from ldm_core.config import RunConfig, build_config  # noqa: E402
from ldm_core.phantoms import generate_demo  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _memoised_rdp() -> Iterator[None]:
    """Opacus' per-order RDP term is a pure function of (sample rate, sigma, order); every
    tiny site in the suite calibrates the same plans, so compute each term once per session
    (in this process; Ray workers and subprocesses compute their own)."""
    from tests.common.federation import fast_accounting

    with fast_accounting():
        yield


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 patients x 3 slices over 2 sites, written like `fedldm demo-data` does."""
    root = tmp_path_factory.mktemp("demo")
    return generate_demo(root, n_patients=36, slices_per_patient=3, n_sites=2, image_size=16,
                         seed=0)


@pytest.fixture(scope="session")
def class_names(demo_manifest: Path) -> tuple[str, ...]:
    from ldm_core.data import scan

    return tuple(scan(demo_manifest).class_names)


@pytest.fixture
def tiny_cfg(class_names: tuple[str, ...]) -> RunConfig:
    return build_config(preset="tiny", image_size=16, class_names=class_names, epsilon=8.0)
