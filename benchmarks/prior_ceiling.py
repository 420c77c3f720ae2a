"""What an autoencoder prior keeps of the data: the ceiling any denoiser on its latents works under.

    .venv/bin/python benchmarks/prior_ceiling.py RUN [--prior FILE.safetensors ...]

Reads a simulated run's data and split (run.json) and scores each autoencoder (the run's
configured start, then every `--prior` file of the same architecture) on the union of the
sites' splits:

* reconstruction PSNR / SSIM of the test images;
* head-size spread: the within-class standard deviation of each image's foreground share
  (pixels above -0.8 of [-1, 1]), reconstructions over real images. A decoder that maps every
  latent to one template head scores near 0, and no denoiser on its latents can draw heads of
  other sizes;
* class signal: a judge trained on the real train images (the evaluation's own recipe and
  epochs) scored, macro AUC, on the real test images and on their reconstructions. The second
  is how well the decoder keeps what a real-trained classifier looks for (a TRS-like ceiling);
* TSTR ceiling: the same recipe trained on the reconstructions of the real train images, scored
  on the real test images. A perfect denoiser samples the real latents' distribution, so its
  decoded samples are distributed like these reconstructions: this is the TSTR such a
  denoiser would reach (at the real train set's size), the ceiling that counts for TSTR/TRTR.

docs/benchmarks.md section 12 used it on the quick 3D plan. A benchmark on simulated data,
not a DP release: nothing here is charged to any budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ldm_core.classifier import macro_auc, predict_proba, train_classifier
from ldm_core.config import RunConfig
from ldm_core.data import load_site
from ldm_core.evaluation.fidelity import reconstruction_quality
from ldm_core.evaluation.utility import CLASSIFIER_RECIPE, judge_epochs
from ldm_core.models import make_autoencoder
from ldm_core.pretrain import autoencoder_prior


def shape_spread(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Within-class standard deviation of each image's foreground share (pixels above -0.8 of
    [-1, 1]): how much head sizes vary; compare it with the real images' (a ratio)."""
    fg = (images > -0.8).flatten(1).float().mean(1)
    return float(torch.stack([fg[labels == c].std() for c in labels.unique()]).mean())


@torch.no_grad()
def reconstruct(ae: torch.nn.Module, x: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    return torch.cat([ae.reconstruct(x[i:i + chunk]).clamp(-1, 1)
                      for i in range(0, len(x), chunk)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--prior", type=Path, action="append", default=[],
                    help="another autoencoder prior file of the run's architecture")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = json.loads((args.run / "run.json").read_text())
    cfg = RunConfig.from_dict(meta["config"])
    m = cfg.model
    splits: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"train": [], "test": []}
    for s in range(int(meta["sites"])):
        site = load_site(meta["data"], site_index=s, n_sites=int(meta["sites"]),
                         scheme=meta["partition"], image_size=m.image_size, seed=cfg.seed,
                         progress=False, voxel_mm=m.voxel_mm)
        splits["train"].append((site.train.images, site.train.labels))
        splits["test"].append((site.test.images, site.test.labels))
    x_tr, y_tr = (torch.cat(t) for t in zip(*splits["train"], strict=True))
    x_te, y_te = (torch.cat(t) for t in zip(*splits["test"], strict=True))
    t0 = time.time()
    judge = train_classifier(x_tr, y_tr, m.n_classes,
                             epochs=judge_epochs(m.spatial_dims), seed=0, **CLASSIFIER_RECIPE)
    real_auc = macro_auc(y_te.numpy(), np.asarray(predict_proba(judge, x_te)))
    print(json.dumps({"run": str(args.run), "train": len(y_tr), "test": len(y_te),
                      "judge_s": round(time.time() - t0), "judge_auc_real_test":
                      round(real_auc, 3), "real_shape_spread": round(shape_spread(x_te, y_te),
                                                                     4)}), flush=True)
    named = [("run's start", autoencoder_prior(cfg))]
    named += [(str(p), _load_prior(p)) for p in args.prior]
    for name, state in named:
        ae = make_autoencoder(m)
        ae.load_state_dict(state)  # type: ignore[arg-type]
        ae.eval()
        rec = reconstruct(ae, x_te)
        p, q = reconstruction_quality(ae, x_te, torch.device("cpu"), chunk=16)
        t1 = time.time()
        on_rec = train_classifier(reconstruct(ae, x_tr), y_tr, m.n_classes,
                                  epochs=judge_epochs(m.spatial_dims), seed=0,
                                  **CLASSIFIER_RECIPE)
        tstr_ceiling = macro_auc(y_te.numpy(), np.asarray(predict_proba(on_rec, x_te)))
        print(json.dumps({
            "prior": name, "psnr_db": round(float(p.mean()), 2), "ssim": round(float(q.mean()), 3),
            "shape_spread_ratio": round(shape_spread(rec, y_te) / shape_spread(x_te, y_te), 3),
            "judge_auc_reconstructed_test": round(
                macro_auc(y_te.numpy(), np.asarray(predict_proba(judge, rec))), 3),
            "tstr_ceiling_auc": round(tstr_ceiling, 3),
            "tstr_ceiling_over_real": round(tstr_ceiling / real_auc, 3),
            "ceiling_s": round(time.time() - t1)}), flush=True)


def _load_prior(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


if __name__ == "__main__":
    main()
