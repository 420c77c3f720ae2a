"""Real images the coordinator's evaluation may see: a :class:`RealSource` and its two kinds.

- :class:`SimulatedSites`: in a simulation every site's data is on this machine, so the
  coordinator may read it (utility, fidelity, and the site-local closest-pairs figure). Each
  site's split is loaded ONCE and kept, because the steps of one evaluation all need it and
  loading means decoding every image again.
- :class:`ReferenceSet`: in a deployment only a `--reference` set held by the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from client.client_app import SimulationSites
from client.site_config import SiteConfig
from ldm_core.config import RunConfig
from ldm_core.data import SiteData, load_images, load_pairs, scan, split_by_patient

__all__ = ["RealSets", "RealSource", "ReferenceSet", "SimulatedSites", "subsample"]


@dataclass(frozen=True)
class RealSets:
    """Real images visible to the coordinator's evaluation (train = what the generator saw)."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]
    source: str
    # Lesion masks of the same images (paired runs on data that carries masks), else None.
    train_masks: torch.Tensor | None = None
    test_masks: torch.Tensor | None = None


@runtime_checkable
class RealSource(Protocol):
    """Where the evaluation's real train/test images come from."""

    def load(self, cfg: RunConfig) -> RealSets:
        """The real train and test sets, at the run's image size and class order."""
        ...


class SimulatedSites:
    """The simulated sites of a run, with each site's data loaded at most once."""

    def __init__(self, sites: SimulationSites, n_sites: int) -> None:
        self.sites, self.n_sites = sites, n_sites
        self._data: dict[int, SiteData] = {}

    @property
    def allow_audit(self) -> bool:
        return bool(self.sites.allow_audit)

    def site(self, index: int) -> SiteConfig:
        return self.sites.site(index)

    def site_data(self, index: int, cfg: RunConfig) -> SiteData:
        """Site `index`'s splits, read from disk on the first call only."""
        if index not in self._data:
            from client.tasks import load_data

            self._data[index] = load_data(self.sites.site(index), cfg)
        return self._data[index]

    def load(self, cfg: RunConfig) -> RealSets:
        parts = [self.site_data(k, cfg) for k in range(self.n_sites)]
        train = (torch.cat([p.train.images for p in parts]),
                 torch.cat([p.train.labels for p in parts]))
        test = (torch.cat([p.test.images for p in parts]),
                torch.cat([p.test.labels for p in parts]),
                tuple(f"{p.site_id}/{q}" for p in parts for q in p.test.patients))
        masked = all(p.train.masks is not None and p.test.masks is not None for p in parts)
        return RealSets(train, test, "union of the simulated sites' train and test splits",
                        train_masks=torch.cat([p.train.masks for p in parts])  # type: ignore[misc]
                        if masked else None,
                        test_masks=torch.cat([p.test.masks for p in parts])  # type: ignore[misc]
                        if masked else None)


@dataclass(frozen=True)
class ReferenceSet:
    """A labelled image set held by the coordinator (`fedldm evaluate --reference PATH`)."""

    path: Path

    def load(self, cfg: RunConfig) -> RealSets:
        index = scan(self.path)
        if tuple(index.class_names) != tuple(cfg.class_names):
            raise ValueError(f"reference set {self.path} has classes "
                             f"{list(index.class_names)}, the run has {list(cfg.class_names)}")
        splits = split_by_patient(index.records, holdout_fraction=0.0, test_fraction=0.3,
                                  seed=0) \
            if not any(r.split for r in index.records) else \
            split_by_patient(index.records, holdout_fraction=0.0, seed=0)
        patients = tuple(str(r.patient or r.path) for r in splits["test"])
        source = f"coordinator reference set {self.path}"
        vox = cfg.model.voxel_mm  # the sites' grid, so real and synthetic volumes compare
        if cfg.model.mask_channels and all(r.mask is not None for r in index.records):
            tx, ty, tm = load_pairs(splits["train"], cfg.model.image_size, voxel_mm=vox)
            ex, ey, em = load_pairs(splits["test"], cfg.model.image_size, voxel_mm=vox)
            return RealSets((tx, ty), (ex, ey, patients), source, train_masks=tm, test_masks=em)
        tr = load_images(splits["train"], cfg.model.image_size, voxel_mm=vox)
        te = load_images(splits["test"], cfg.model.image_size, voxel_mm=vox)
        return RealSets(tr, (te[0], te[1], patients), source)


def subsample(real: RealSets, cap: int, *, seed: int) -> RealSets:
    """At most `cap` training images, same class proportions, chosen with a fixed seed."""
    x, y = real.train
    if x.shape[0] <= cap:
        return real
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c)[:, 0]
        k = max(1, round(cap * idx.numel() / y.numel()))
        keep.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    sel = torch.sort(torch.cat(keep)).values
    return RealSets((x[sel], y[sel]), real.test,
                    f"{real.source} (a class-stratified subsample of {sel.numel()} of "
                    f"{x.shape[0]} training images)",
                    train_masks=None if real.train_masks is None else real.train_masks[sel],
                    test_masks=real.test_masks)
