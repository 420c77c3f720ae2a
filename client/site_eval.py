"""Site-side evaluation for deployments: the site scores classifiers on its own test patients and
releases one DP vector; nothing else leaves.

Why: a hospital federation's coordinator usually holds no labelled real images, so utility
(TSTR vs TRTR) and fidelity can only be measured where the patients are. The coordinator sends
its synthetic-trained classifier and the synthetic images (both post-processing of DP outputs).
The site

1. refuses unless its own node config allows evaluations (``allow-evaluate``), then checks and
   computes everything that depends only on the coordinator's input (classifier shape and
   output, synthetic image size, the synthetic manifold), so that no later failure can depend
   on its data;
2. charges, before any private record is read, one Gaussian mechanism
   (``privacy.eval_noise_multiplier``) for the release and the DP-SGD steps of its own TRTR
   classifier (``eval_trtr_*``), so a ledger that cannot afford both stops here;
3. trains the TRTR reference on its train split with DP-SGD (a classifier trained without DP
   would make the test scores depend on every training patient without bound);
4. scores both classifiers on its test split, and tests each test image against the synthetic
   manifold in a fixed random-CNN feature space (recall);
5. releases ``ldm_core.evaluation.site_eval``'s count vector with noise from its own privacy
   source, plus public values (noise std, layout, epsilon).

The sensitivity bound is in ``ldm_core.evaluation.site_eval``; it holds whatever the classifier
computes, so a hostile coordinator's classifier learns no more than the release's epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from client import tasks
from client.site_config import SiteConfig
from ldm_core.classifier import make_classifier, predict_proba
from ldm_core.config import PhaseConfig, RunConfig
from ldm_core.data import SiteData
from ldm_core.dp_random import PrivacyRng
from ldm_core.evaluation.features import extract_features, random_feature_extractor
from ldm_core.evaluation.site_eval import (
    ARMS,
    Layout,
    SyntheticManifold,
    noisy_sum,
    patient_rows,
)
from ldm_core.models import resolve_device
from ldm_core.training import SamplingPlan, dp_train

# The site's TRTR classifier: public constants of its DP-SGD (the plan's rate and steps are in
# the run config; these only shape the optimisation, not the accounting).
TRTR_LR = 2e-3
TRTR_CLIP = 1.0
TRTR_EXPECTED_BATCH = 64


@dataclass(frozen=True)
class EvalRelease:
    values: tuple[float, ...]
    noise_std: float
    n_classes: int
    bins: int
    epsilon: float


def trtr_plan(cfg: RunConfig) -> tuple[PhaseConfig, SamplingPlan]:
    """The TRTR classifier's DP-SGD plan, from the run configuration alone (never the data)."""
    p = cfg.privacy
    phase = PhaseConfig(rounds=1, sample_rate=p.eval_trtr_sample_rate,
                        local_steps=p.eval_trtr_steps, batch_size=TRTR_EXPECTED_BATCH,
                        lr=TRTR_LR, max_grad_norm=TRTR_CLIP)
    return phase, SamplingPlan(p.eval_trtr_sample_rate, p.eval_trtr_steps)


def _ce(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator
        ) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y.long(), reduction="none")


def site_evaluate(site: SiteConfig, cfg: RunConfig, classifier: dict[str, torch.Tensor],
                  synthetic: torch.Tensor, *, run_id: str, rng: PrivacyRng, seed: int,
                  data: SiteData | None = None) -> EvalRelease:
    """Evaluate at this site; see the module doc for the steps. ``classifier`` is the state
    dict of a ``make_classifier(n_classes, spatial_dims)`` trained by the coordinator on the
    synthetic set.

    Raises ``PermissionError`` when the site disallows evaluations and lets
    ``BudgetExceededError`` through (nothing is read then).
    """
    if not site.allow_evaluate:
        raise PermissionError(f"site {site.site_id} does not allow evaluations (node config "
                              "allow-evaluate=false); set allow-evaluate=true to permit one")
    # Private unless the run is epsilon = inf (then every release is exact and charged as inf).
    private = math.isfinite(site.effective_target(cfg.privacy.epsilon))
    layout = Layout(cfg.model.n_classes, cfg.privacy.eval_bins)
    n_classes = cfg.model.n_classes
    # Everything that depends only on the coordinator's input is done (and may fail) here,
    # before the charge and the data: a failure after it could depend on the data (for
    # example only when the site has test patients) and would leak that without noise.
    dims = cfg.model.spatial_dims
    tstr = make_classifier(n_classes, dims)
    tstr.load_state_dict(classifier)
    grid = (cfg.model.image_size,) * dims
    if tuple(synthetic.shape[1:]) != (1, *grid):
        raise ValueError(f"synthetic images must be [N, 1, {', '.join(map(str, grid))}] (the "
                         f"run's image size), got {tuple(synthetic.shape)}")
    extractor = random_feature_extractor(seed=0, spatial_dims=dims)
    manifold = SyntheticManifold.build(extract_features(extractor, synthetic))
    with torch.no_grad():
        probe = tstr.eval()(torch.zeros(1, 1, *grid))
    if probe.shape != (1, n_classes):
        raise ValueError(f"the classifier returns {tuple(probe.shape)} for one image, expected "
                         f"(1, {n_classes})")
    tasks.check_permitted(site, cfg)
    if data is None:  # before the charge: a mismatched site pays nothing
        tasks.check_data_kind(site, cfg)
    ledger = tasks.open_ledger(site)
    # Charge first: a crash after this line over-counts, never under-counts.
    entries = tasks.evaluation_entries(cfg) if private else [(0.0, 1.0, 1)]
    epsilon = ledger.charge(entries, run_id=run_id, phase="evaluate", round=0)

    data = tasks.load_data(site, cfg) if data is None else data
    tasks.check_classes(site, cfg, data)
    device = resolve_device(site.device)
    phase, plan = trtr_plan(cfg)
    sigma_trtr = cfg.privacy.eval_trtr_noise_multiplier if private else 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trtr = make_classifier(n_classes, dims)
    if data.train.images.shape[0]:
        stats = dp_train(trtr, (data.train.images, data.train.labels), _ce, phase=phase,
                         plan=plan, noise_multiplier=sigma_trtr, seed=seed, device=device,
                         privacy_rng=rng, groups=tasks.patient_groups(data, data.train),
                         images_per_step=cfg.privacy.patient_images_per_step,
                         max_patient_images=cfg.privacy.max_patient_images,
                         desc=f"{site.site_id} evaluation classifier",
                         show_progress=site.show_progress)
        if private and (stats.noise_multiplier != sigma_trtr or stats.max_grad_norm != TRTR_CLIP):
            raise RuntimeError(f"the TRTR classifier's DP-SGD used noise "
                               f"{stats.noise_multiplier} and clip {stats.max_grad_norm}, but "
                               f"the ledger was charged for {sigma_trtr} and {TRTR_CLIP}")
    test = data.test
    if test.images.shape[0]:
        # One image at a time, on the CPU: a batched kernel may round an image's output
        # differently depending on which other patients share its batch, and a flipped bin
        # edge would move a second patient's row (beyond the sensitivity bound).
        cpu = torch.device("cpu")
        probas = {"tstr": predict_proba(tstr.to(cpu).eval(), test.images, batch_size=1),
                  "trtr": predict_proba(trtr.to(cpu).eval(), test.images, batch_size=1)}
        inside = manifold.contains(extract_features(extractor.to(cpu), test.images,
                                                    batch_size=1))
        rows = patient_rows(probas, test.labels.numpy(), inside,
                            tasks.patient_groups(data, test), layout)
    else:
        rows = np.zeros((0, layout.size))
    sigma = cfg.privacy.eval_noise_multiplier if private else 0.0
    values = noisy_sum(rows, layout, noise_multiplier=sigma,
                       generator=rng.generator() if private else None)
    return EvalRelease(tuple(float(v) for v in values), sigma * layout.sensitivity, n_classes,
                       layout.bins, epsilon)


__all__ = ["ARMS", "EvalRelease", "site_evaluate", "trtr_plan"]
