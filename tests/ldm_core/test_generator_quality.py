"""The metrics must tell a trained generator from an untrained one (issue: evaluation)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm_core.config import build_config
from ldm_core.evaluation import extract_features, fid, prdc, random_feature_extractor
from ldm_core.losses import multiplicity_diffusion_loss
from ldm_core.models import make_autoencoder, make_denoiser, make_train_scheduler
from ldm_core.pretrain import pretrain_autoencoder, public_images
from ldm_core.sampling import generate_images
from ldm_core.training import dp_train, sampling_plan


@pytest.mark.slow
def test_trained_generator_scores_clearly_better_than_untrained() -> None:
    torch.manual_seed(0)
    cfg = build_config(preset="tiny", image_size=16, class_names=("a", "b"))
    m = cfg.model
    ae = make_autoencoder(m)
    ae.load_state_dict(pretrain_autoencoder(m, steps=150, batch_size=32, n_images=400,
                                            show_progress=False))
    real = public_images(400, 16, seed=7)
    labels = torch.zeros(400, dtype=torch.long)
    with torch.no_grad():
        z = ae.encode(real)[0]
    scale = float(1 / z.pow(2).mean().sqrt())
    sched = make_train_scheduler(m)
    trained = make_denoiser(m)
    phase = dataclasses.replace(cfg.diffusion, batch_size=64, local_steps=280, lr=3e-3,
                                noise_multiplicity=1)

    def loss(model, b, g):  # noqa: ANN001, ANN202
        return multiplicity_diffusion_loss(model, sched, b[0], b[1], k=1, generator=g)

    dp_train(trained, (z * scale, labels), loss, phase=phase, plan=sampling_plan(phase),
             noise_multiplier=0.0, seed=0, device=torch.device("cpu"), show_progress=False)
    untrained = make_denoiser(m)
    extractor = random_feature_extractor(seed=0)
    real_f = extract_features(extractor, public_images(200, 16, seed=8))
    scores = {}
    for name, dm in (("trained", trained), ("untrained", untrained)):
        imgs = generate_images(ae, dm, m, torch.zeros(200, dtype=torch.long), scale_factor=scale,
                               steps=20, guidance_scale=1.0, seed=1, device=torch.device("cpu"))
        f = extract_features(extractor, imgs)
        scores[name] = {"fid": fid(real_f, f), **prdc(real_f, f, k=5)}
    assert scores["trained"]["fid"] < 0.7 * scores["untrained"]["fid"], scores
    assert scores["trained"]["precision"] > scores["untrained"]["precision"], scores
    assert scores["trained"]["density"] > scores["untrained"]["density"], scores
