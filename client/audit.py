"""Site-side privacy audits: computed where the data is, only aggregates leave.

Returned: membership-inference AUC / TPR / ROC and loss histograms on shared bin edges (so the
coordinator can pool sites), and nearest-neighbour distance histograms with the *indices* (not
pixels) of the closest (synthetic, train) pairs. These aggregates are not covered by the DP
guarantee; a site can refuse audits (node config `allow-audit=false`), and the report lists
them as a disclosure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from client.site_config import SiteConfig
from client.tasks import check_classes, load_data
from ldm_core.config import RunConfig
from ldm_core.evaluation import (
    extract_features,
    loss_bin_edges,
    membership_inference,
    nearest_neighbour_audit,
    random_feature_extractor,
)
from ldm_core.evaluation.scores import denoising_scores

MIA_BINS = 100


def site_audit(site: SiteConfig, cfg: RunConfig, ae: torch.nn.Module, dm: torch.nn.Module,
               scale_factor: float, synthetic: torch.Tensor, *, seed: int = 0) -> dict[str, Any]:
    """MIA on (train = members, holdout = non-members) and the memorisation audit."""
    if not site.allow_audit:
        raise PermissionError(f"site {site.site_id} does not allow audits (allow-audit=false)")
    data = load_data(site, cfg)
    check_classes(site, cfg, data)
    if data.holdout.images.shape[0] < 2 or data.train.images.shape[0] < 2:
        raise ValueError(f"site {site.site_id} has too few train/holdout images for an audit")
    members = denoising_scores(ae, dm, cfg.model, data.train.images, data.train.labels,
                               scale_factor=scale_factor, seed=seed)
    nonmembers = denoising_scores(ae, dm, cfg.model, data.holdout.images, data.holdout.labels,
                                  scale_factor=scale_factor, seed=seed + 1)
    mia = membership_inference(members.numpy(), nonmembers.numpy(),
                               bin_edges=loss_bin_edges(n_bins=MIA_BINS))
    extractor = random_feature_extractor(seed=0)
    feats = {name: extract_features(extractor, imgs) for name, imgs in
             (("synthetic", synthetic), ("train", data.train.images),
              ("holdout", data.holdout.images))}
    nn_feat = nearest_neighbour_audit(feats["synthetic"], feats["train"], feats["holdout"])
    flat = {name: imgs.flatten(1).numpy().astype(np.float64) for name, imgs in
            (("synthetic", synthetic), ("train", data.train.images),
             ("holdout", data.holdout.images))}
    nn_pix = nearest_neighbour_audit(flat["synthetic"], flat["train"], flat["holdout"])
    return {"site": site.site_id, "mia": mia, "nn_audit": nn_feat, "nn_audit_pixel": nn_pix}
