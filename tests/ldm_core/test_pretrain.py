from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ldm_core.config import build_config
from ldm_core.models import make_autoencoder
from ldm_core.pretrain import load_pretrained, pretrained_path


def test_shipped_quick_autoencoder_loads_and_reconstructs_phantoms() -> None:
    """The quick preset starts from the shipped public-phantom autoencoder; it must fit."""
    from ldm_core.pretrain import public_images

    m = build_config(preset="quick").model
    assert pretrained_path(m).exists(), "the quick preset's pretrained autoencoder is missing"
    ae = make_autoencoder(m)
    ae.load_state_dict(load_pretrained(m))
    x = public_images(32, m.image_size, seed=99)
    with torch.no_grad():
        recon = ae.decode(ae.encode(x)[0])
    assert float((recon - x).abs().mean()) < 0.1


def test_shipped_generic_autoencoder_holds_shapes_the_phantom_prior_cannot() -> None:
    """The modality-agnostic prior: unseen generic images (another seed) reconstruct far better
    than through the phantom-only prior, and phantoms nearly as well (measured on 800 of each:
    33.8 vs 16.0 dB, 28.1 vs 28.4 dB; on real brain MRI 26.8 vs 24.0 dB)."""
    from ldm_core.evaluation.fidelity import reconstruction_quality
    from ldm_core.pretrain import public_images
    from ldm_core.procedural import generic_images

    m = build_config(preset="quick").model
    assert pretrained_path(m, generic=True).exists(), "the generic autoencoder is missing"
    psnr = {}
    for name, generic in (("phantom", False), ("generic", True)):
        ae = make_autoencoder(m)
        ae.load_state_dict(load_pretrained(m, generic=generic))
        for data, x in (("shapes", generic_images(96, m.image_size, seed=1234)),
                        ("phantoms", public_images(96, m.image_size, seed=99))):
            psnr[name, data] = float(reconstruction_quality(ae, x, torch.device("cpu"))[0].mean())
    assert psnr["generic", "shapes"] > psnr["phantom", "shapes"] + 10.0, psnr
    assert psnr["generic", "phantoms"] > psnr["phantom", "phantoms"] - 1.0, psnr
    assert psnr["generic", "phantoms"] > 26.0, psnr
    with pytest.raises(ValueError, match="2D image-only"):
        load_pretrained(dataclasses.replace(m, mask_channels=1), generic=True)


def test_a_64px_2d_run_starts_from_the_32px_prior_unless_one_of_its_size_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2D autoencoder is fully convolutional: the shipped 32 px priors start a 64 px run (on
    800 real brain MRI slices the generic one gave 28.0 dB at 64 px, 26.8 dB at 32 px; on 800
    generic images 34.5 dB), while a prior made at the run's own size wins and a volume run
    never borrows another size."""
    from ldm_core.evaluation.fidelity import reconstruction_quality
    from ldm_core.pretrain import save_pretrained, shipped_arch
    from ldm_core.procedural import generic_images

    m32 = build_config(preset="quick").model
    m64 = build_config(preset="quick", image_size=64).model
    assert not pretrained_path(m64, generic=True).exists()
    assert shipped_arch(m64, generic=True).image_size == 32
    for generic in (False, True):
        have, want = load_pretrained(m64, generic=generic), load_pretrained(m32, generic=generic)
        assert have.keys() == want.keys() and all(torch.equal(have[k], want[k]) for k in want)
    ae = make_autoencoder(m64)
    ae.load_state_dict(load_pretrained(m64, generic=True))
    x = generic_images(48, 64, seed=1234)
    assert float(reconstruction_quality(ae, x, torch.device("cpu"))[0].mean()) > 26.0
    own = {k: torch.zeros_like(v) for k, v in make_autoencoder(m64).state_dict().items()}
    monkeypatch.setenv("FEDLDM_PRETRAINED_DIR", str(tmp_path))
    save_pretrained(tmp_path / pretrained_path(m64, generic=True).name, m64, own, {"steps": 0})
    assert all(float(v.abs().sum()) == 0 for v in load_pretrained(m64, generic=True).values())
    vol = build_config(preset="quick", image_size=64,
                       overrides={"model.spatial_dims": 3, "ae_init": "random",
                                  "autoencoder.rounds": 1}).model
    assert shipped_arch(vol) is vol
    with pytest.raises(FileNotFoundError, match="pretrain-ae"):
        load_pretrained(vol)


def test_missing_or_mismatched_pretrained_weights_explain_the_fix() -> None:
    m = build_config(preset="tiny", image_size=16).model
    with pytest.raises(FileNotFoundError, match="pretrain-ae"):
        load_pretrained(m)
    quick = build_config(preset="quick").model
    other = dataclasses.replace(quick, ae_res_blocks=2)
    with pytest.raises(FileNotFoundError):
        load_pretrained(other)


def test_shipped_quick_denoiser_prior_knows_healthy_anatomy_but_no_labels() -> None:
    """The shipped healthy-anatomy prior for the quick architecture: every class row equals the
    null row (no label was ever seen), and it denoises healthy public phantoms' latents far
    better than a fresh network does."""
    from ldm_core.losses import diffusion_loss
    from ldm_core.models import make_denoiser, make_train_scheduler
    from ldm_core.pretrain import denoiser_pretrained_path, load_pretrained_denoiser, public_images

    cfg = build_config(preset="quick", class_names=("a", "b", "c"),
                       overrides={"dm_init": "public-healthy-phantoms"})
    m = cfg.model
    assert denoiser_pretrained_path(m).exists(), "the quick preset's denoiser prior is missing"
    state = load_pretrained_denoiser(m)
    emb = state["class_embedding.weight"]
    assert emb.shape[0] == m.n_classes + 1 and torch.equal(emb, emb[-1:].expand_as(emb))
    ae = make_autoencoder(m)
    ae.load_state_dict(load_pretrained(m))
    x = public_images(64, m.image_size, seed=99, healthy_only=True)
    with torch.no_grad():
        z = ae.encode(x)[0]
        z = z / z.pow(2).mean().sqrt()
        gen = torch.Generator().manual_seed(0)
        t = torch.randint(0, m.num_train_timesteps, (z.shape[0],), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        labels = torch.zeros(z.shape[0], dtype=torch.long)
        sched = make_train_scheduler(m)
        prior, fresh = make_denoiser(m), make_denoiser(m)
        prior.load_state_dict(state)
        loss_prior = diffusion_loss(prior, sched, z, labels, timesteps=t, noise=noise).mean()
        loss_fresh = diffusion_loss(fresh, sched, z, labels, timesteps=t, noise=noise).mean()
    assert float(loss_prior) < 0.5 * float(loss_fresh)


def test_denoiser_prior_needs_its_autoencoder_and_matching_architecture() -> None:
    from ldm_core.config import ConfigError
    from ldm_core.pretrain import load_pretrained_denoiser

    with pytest.raises(ConfigError, match="ae_init"):
        build_config(preset="quick", overrides={"ae_init": "random",
                                                "dm_init": "public-healthy-phantoms"})
    with pytest.raises(ConfigError, match="dm_init must be one of"):
        build_config(preset="quick", overrides={"dm_init": "imagenet"})
    other = dataclasses.replace(build_config(preset="quick").model, dm_channels=(32, 32))
    with pytest.raises(FileNotFoundError, match="pretrain-dm"):
        load_pretrained_denoiser(other)
    eps = dataclasses.replace(build_config(preset="quick").model, prediction_type="epsilon")
    with pytest.raises(FileNotFoundError):
        load_pretrained_denoiser(eps)


def test_pretrain_denoiser_round_trip_through_the_pretrained_dir(tmp_path, monkeypatch) -> None:
    """`fedldm pretrain-dm` in miniature: a tiny prior trains on healthy phantoms only, is saved
    with its single null row, and loads for any class count with that row in every class."""
    from ldm_core.pretrain import (
        denoiser_pretrained_path,
        load_pretrained_denoiser,
        pretrain_denoiser,
        save_pretrained,
    )

    m = build_config(preset="tiny", image_size=16, class_names=("a", "b")).model
    ae_state = make_autoencoder(m).state_dict()
    state, scale = pretrain_denoiser(m, ae_state, steps=3, batch_size=4, n_images=16,
                                     show_progress=False)
    assert state["class_embedding.weight"].shape[0] == 1 and scale > 0
    monkeypatch.setenv("FEDLDM_PRETRAINED_DIR", str(tmp_path))
    save_pretrained(tmp_path / denoiser_pretrained_path(m).name, m, state, {"steps": 3},
                    denoiser=True)
    four = dataclasses.replace(m, n_classes=4)
    loaded = load_pretrained_denoiser(four)
    emb = loaded["class_embedding.weight"]
    assert emb.shape[0] == 5 and torch.equal(emb, state["class_embedding.weight"].expand(5, -1))
    eps = dataclasses.replace(m, num_train_timesteps=200)
    with pytest.raises(ValueError, match="was made for"):
        # same file name, different schedule: the sidecar's architecture check refuses it
        load_pretrained_denoiser(eps)



def test_shipped_paired_autoencoder_draws_the_lesion_masks() -> None:
    """A paired quick run starts from the prior pretrained on public phantoms and their masks:
    its reconstructed masks outline the lesions (not the image-only prior's blank channel)."""
    from ldm_core.pretrain import public_pairs

    m = build_config(preset="quick", overrides={"model.mask_channels": 1}).model
    assert pretrained_path(m).exists(), "the quick preset's paired autoencoder is missing"
    ae = make_autoencoder(m).eval()
    ae.load_state_dict(load_pretrained(m))
    x = public_pairs(64, m.image_size, seed=99)
    with torch.no_grad():
        recon = ae.decode(ae.encode(x)[0])
    truth, drawn = x[:, 1] > 0, recon[:, 1] > 0
    dice = 2 * (truth & drawn).sum() / (truth.sum() + drawn.sum())
    assert truth.any() and float(dice) > 0.6
    assert float((recon[:, 0] - x[:, 0]).abs().mean()) < 0.1


def test_a_volume_prior_round_trips_and_priors_never_cross_dimensions(tmp_path) -> None:
    """`pretrain-ae` on volumes makes a 3D prior that a 3D run loads; a 2D prior file is
    refused by a 3D run and a 3D one by a 2D run (the sidecar records spatial_dims 3), and
    images of the wrong dimensionality never train an autoencoder."""
    from ldm_core.pretrain import (
        PriorError,
        autoencoder_prior,
        pretrain_autoencoder,
        save_pretrained,
    )

    cfg3 = build_config(preset="tiny", image_size=16, overrides={"model.spatial_dims": 3})
    m3 = cfg3.model
    vols = torch.rand(6, 1, 16, 16, 16) * 2 - 1
    state = pretrain_autoencoder(m3, steps=2, batch_size=2, images=vols, show_progress=False)
    assert any(v.ndim == 5 for v in state.values())
    prior3 = tmp_path / "ae3d.safetensors"
    save_pretrained(prior3, m3, state, {"steps": 2})
    assert "-3d" in pretrained_path(m3).name
    loaded = autoencoder_prior(dataclasses.replace(cfg3, ae_init=str(prior3)))
    assert loaded is not None and all(torch.equal(loaded[k], state[k]) for k in state)

    cfg2 = build_config(preset="tiny", image_size=16)
    prior2 = tmp_path / "ae2d.safetensors"
    save_pretrained(prior2, cfg2.model, make_autoencoder(cfg2.model).state_dict(), {})
    with pytest.raises(PriorError, match="spatial_dims"):
        autoencoder_prior(dataclasses.replace(cfg3, ae_init=str(prior2)))
    with pytest.raises(PriorError, match="spatial_dims"):
        autoencoder_prior(dataclasses.replace(cfg2, ae_init=str(prior3)))
    with pytest.raises(ValueError, match="2D but the autoencoder is 3D"):
        pretrain_autoencoder(m3, steps=1, images=torch.zeros(4, 1, 16, 16),
                             show_progress=False)


def test_shipped_3d_autoencoder_reconstructs_phantom_volumes_it_never_saw() -> None:
    """The quick 3D plan starts from the shipped 3D prior; on volumes of another seed it must
    reconstruct far beyond a random network (4.7 dB) and as well as the 1,000-step prior
    (23.7 dB here; the 400-step prior shipped before it decoded one head size: 20.1 dB)."""
    from ldm_core.pretrain import public_volumes

    m = build_config(preset="quick", overrides={"model.spatial_dims": 3}).model
    ae = make_autoencoder(m).eval()
    ae.load_state_dict(load_pretrained(m))
    x = public_volumes(6, m.image_size, seed=99)
    with torch.no_grad():
        recon = ae.decode(ae.encode(x)[0])
    psnr = 10 * torch.log10(4.0 / (recon - x).pow(2).mean())
    assert float(psnr) > 22.0


def test_a_paired_3d_run_starts_from_the_shipped_paired_3d_prior() -> None:
    """`--data demo3d --set model.mask_channels=1`: the autoencoder starts from the prior
    trained on public phantom volumes with their masks (two input channels, 5D weights), not
    from the image-only one widened with an untrained mask channel."""
    from ldm_core.pretrain import widen_for_masks

    m = build_config(preset="quick", overrides={"model.spatial_dims": 3,
                                                "model.mask_channels": 1}).model
    assert pretrained_path(m).name.endswith("-3d-m1.safetensors") and pretrained_path(m).exists()
    state = load_pretrained(m)
    first = state["encoder.blocks.0.conv.weight"]
    assert first.ndim == 5 and first.shape[1] == 2
    widened = widen_for_masks(load_pretrained(dataclasses.replace(m, mask_channels=0)), m)
    assert not torch.equal(first[:, 1], widened["encoder.blocks.0.conv.weight"][:, 1])


def test_shipped_paired_3d_autoencoder_draws_the_lesion_masks_of_unseen_volumes() -> None:
    """The paired 3D prior (1,000 steps) reconstructs public volumes of another seed with
    their lesion masks: mask Dice 0.48 and 19.2 dB here (the 400-step prior: 0.39, 18.7 dB)."""
    from ldm_core.pretrain import public_volumes

    m = build_config(preset="quick", overrides={"model.spatial_dims": 3,
                                                "model.mask_channels": 1}).model
    ae = make_autoencoder(m).eval()
    ae.load_state_dict(load_pretrained(m))
    x = public_volumes(6, m.image_size, seed=99, masks=True)
    with torch.no_grad():
        recon = ae.decode(ae.encode(x)[0])
    truth, drawn = x[:, 1] > 0, recon[:, 1] > 0
    dice = 2 * (truth & drawn).sum() / (truth.sum() + drawn.sum())
    assert truth.any() and float(dice) > 0.44
    assert float(10 * torch.log10(4.0 / (recon[:, 0] - x[:, 0]).pow(2).mean())) > 18.0


def test_public_volumes_for_a_prior_are_read_on_the_runs_voxel_grid(tmp_path: Path) -> None:
    """`fedldm pretrain-ae --data PUBLIC --set model.voxel_mm=X`: the prior learns volumes on
    the grid the sites will use, and its sidecar records that voxel size."""
    from ldm_core.phantoms3d import HEAD_EXTENT_MM, generate_demo3d
    from ldm_core.pretrain import load_public

    manifest = generate_demo3d(tmp_path / "pub", n_patients=6, n_sites=2, size=16, seed=5)
    x, source = load_public(manifest, 16, progress=False, voxel_mm=2 * HEAD_EXTENT_MM / 16)
    assert x.shape == (6, 1, 16, 16, 16) and source["voxel_mm"] == 2 * HEAD_EXTENT_MM / 16
    border = torch.ones(16, 16, 16, dtype=torch.bool)
    border[4:12, 4:12, 4:12] = False
    assert (x[:, 0][:, border] == -1.0).all()
    fitted, plain = load_public(manifest, 16, progress=False)
    assert "voxel_mm" not in plain and (fitted[:, 0][:, border] > -1.0).any()


def test_a_paired_run_from_a_widened_shipped_prior_needs_autoencoder_rounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no paired prior ships for the architecture, the image-only one is widened with a
    blank mask channel that only autoencoder rounds can train: with none, refused by name."""
    from ldm_core import pretrain

    shipped = pretrain._candidates
    monkeypatch.setattr(pretrain, "_candidates",  # as if no paired prior shipped
                        lambda name: [] if "-m1" in name else shipped(name))
    cfg = build_config(preset="quick", overrides={"model.mask_channels": 1})
    assert cfg.autoencoder.rounds == 0
    with pytest.raises(ValueError, match="shipped image-only autoencoder.*empty"):
        pretrain.autoencoder_prior(cfg)
    trained = build_config(preset="quick", overrides={"model.mask_channels": 1,
                                                      "autoencoder.rounds": 1})
    state = pretrain.autoencoder_prior(trained)
    assert state is not None and state["encoder.blocks.0.conv.weight"].shape[1] == 2
