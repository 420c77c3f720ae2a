"""Paired image/mask data: the manifest's mask column, pixel alignment through pad and resize,
clear errors, the autoencoder's mask channel and the demo phantoms' lesion masks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.config import ConfigError, build_config
from ldm_core.data import (
    DataError,
    ImageSet,
    load_pairs,
    load_site,
    pair_channels,
    scan,
    split_channels,
)
from ldm_core.models import make_autoencoder
from ldm_core.phantoms import CLASS_NAMES, generate_demo, render_demo, render_demo_pairs
from ldm_core.pretrain import widen_for_masks


def _write_pairs(root: Path, n: int = 12, shape: tuple[int, int] = (24, 40),
                 mask_shape: tuple[int, int] | None = None, with_mask_column: bool = True
                 ) -> Path:
    """Images with one bright rectangle each, its mask the same rectangle (non-square images,
    so alignment must survive the pad to square and the resize)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = ("a", "b")[i % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / "m" / label).mkdir(parents=True, exist_ok=True)
        img = np.full(shape, 20, np.uint8)
        mask = np.zeros(mask_shape or shape, np.uint8)
        top, left = int(rng.integers(2, shape[0] - 10)), int(rng.integers(2, shape[1] - 10))
        img[top:top + 8, left:left + 8] = 230
        mask[top:top + 8, left:left + 8] = 1  # any non-zero value is foreground
        Image.fromarray(img).save(root / label / f"{i}.png")
        Image.fromarray(mask).save(root / "m" / label / f"{i}.png")
        rows.append((f"{label}/{i}.png", label, f"m/{label}/{i}.png", f"p{i}"))
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label", "mask", "patient") if with_mask_column
                   else ("path", "label", "patient"))
        w.writerows(r if with_mask_column else (r[0], r[1], r[3]) for r in rows)
    return root / "manifest.csv"


def test_masks_load_pixel_aligned_with_their_images(tmp_path: Path) -> None:
    manifest = _write_pairs(tmp_path)
    index = scan(manifest)
    assert all(r.mask is not None and r.mask.is_file() for r in index.records)
    x, y, m = load_pairs(index.records, 32)
    assert x.shape == m.shape == (12, 1, 32, 32) and y.shape == (12,)
    assert set(torch.unique(m).tolist()) == {0.0, 1.0}
    bright = x > 0  # halfway between background and rectangle: the bilinear edge
    # The mask covers the rectangle and nothing else (up to the resize's edge pixels).
    inter = (bright & (m > 0)).sum().item()
    assert inter / (m > 0).sum().item() > 0.85 and inter / bright.sum().item() > 0.85
    # Padding rows (top and bottom of a 24x40 image) are background in both.
    assert not m[:, :, :4].any() and not m[:, :, -4:].any()


def test_a_mask_of_another_size_is_refused_naming_the_mask(tmp_path: Path) -> None:
    manifest = _write_pairs(tmp_path, mask_shape=(24, 41))
    with pytest.raises(DataError, match=r"m/a/0\.png.*pixel-aligned"):
        load_pairs(scan(manifest).records, 32)


def test_a_missing_mask_file_is_refused_at_scan(tmp_path: Path) -> None:
    manifest = _write_pairs(tmp_path)
    (tmp_path / "m" / "b" / "3.png").unlink()
    with pytest.raises(DataError, match=r"do not exist.*m/b/3\.png"):
        scan(manifest)


def test_paired_loading_without_a_mask_column_says_how_to_fix_it(tmp_path: Path) -> None:
    manifest = _write_pairs(tmp_path, with_mask_column=False)
    with pytest.raises(DataError, match="add a 'mask' column"):
        load_site(manifest, site_index=0, n_sites=1, scheme="iid", image_size=16, masks=True)
    # An image-only run on the same data is unaffected.
    assert load_site(manifest, site_index=0, n_sites=1, scheme="iid", image_size=16).train.masks \
        is None


def test_model_input_pairs_the_mask_as_a_signed_channel_and_splits_back() -> None:
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    m = (torch.rand(5, 1, 8, 8) > 0.7).float()
    s = ImageSet(images=x, labels=torch.zeros(5, dtype=torch.int64), patients=("p",) * 5,
                 masks=m)
    paired = s.model_input()
    assert paired.shape == (5, 2, 8, 8)
    assert torch.equal(paired[:, 1], m[:, 0] * 2 - 1)
    img, back = split_channels(paired)
    assert torch.equal(img, x) and back is not None and torch.equal(back, m)
    assert split_channels(x)[1] is None
    assert torch.equal(pair_channels(x, m), paired)
    with pytest.raises(ValueError, match="masks must be float32"):
        ImageSet(images=x, labels=torch.zeros(5, dtype=torch.int64), patients=("p",) * 5,
                 masks=m[:, :, :4])


def test_mask_channels_config_and_autoencoder_shape() -> None:
    with pytest.raises(ConfigError, match="mask_channels"):
        build_config(preset="tiny", overrides={"model.mask_channels": 2})
    cfg = build_config(preset="tiny", overrides={"model.mask_channels": 1}).model
    ae = make_autoencoder(cfg).eval()
    assert ae.decode(ae.encode(torch.zeros(2, 2, 16, 16))[0]).shape == (2, 2, 16, 16)


def test_widened_prior_keeps_the_image_path_and_starts_masks_at_background() -> None:
    """Zero weights for the new input channel: the image reconstruction of the widened prior is
    exactly the image-only prior's, whatever the mask holds."""
    paired_cfg = build_config(preset="tiny", overrides={"model.mask_channels": 1}).model
    image_cfg = build_config(preset="tiny").model
    torch.manual_seed(0)
    prior = make_autoencoder(image_cfg).eval()
    widened = make_autoencoder(paired_cfg)
    widened.load_state_dict(widen_for_masks(prior.state_dict(), paired_cfg))
    widened.eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    mask = (torch.rand(3, 1, 16, 16) > 0.5).float()
    with torch.no_grad():
        want = prior.decode(prior.encode(x)[0])
        got = widened.decode(widened.encode(pair_channels(x, mask))[0])
    assert torch.allclose(got[:, :1], want, atol=1e-6)
    out_bias = widened.state_dict()["decoder.blocks.5.conv.bias"]
    assert out_bias.shape == (2,) and out_bias[1].item() == -1.0


def test_the_mask_loss_weighs_lesion_and_background_alike() -> None:
    """Golden values: one lesion pixel of four, drawn as background, costs as much as getting
    the whole background wrong; a plain L1 would call it 0.5 and learn to draw no lesion."""
    from ldm_core.losses import balanced_mask_l1

    mask = torch.tensor([[[[1.0, -1.0], [-1.0, -1.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]])
    empty = torch.full_like(mask, -1.0)
    assert balanced_mask_l1(empty, mask).tolist() == [1.0, 0.0]
    assert balanced_mask_l1(-empty, mask).tolist() == [1.0, 2.0]  # all lesion: bg wrong
    assert balanced_mask_l1(mask, mask).tolist() == [0.0, 0.0]


def test_a_paired_autoencoder_loss_scores_image_and_balanced_mask() -> None:
    from ldm_core.losses import autoencoder_loss, balanced_mask_l1

    cfg = build_config(preset="tiny", overrides={"model.mask_channels": 1}).model
    torch.manual_seed(0)
    ae = make_autoencoder(cfg).eval()
    x = pair_channels(torch.rand(3, 1, 16, 16) * 2 - 1,
                      (torch.rand(3, 1, 16, 16) > 0.9).float())
    noise = torch.zeros(3, cfg.latent_channels, 8, 8)
    with torch.no_grad():
        got = autoencoder_loss(ae, x, kl_weight=0.0, noise=noise)
        recon = ae.decode(ae.encode(x)[0])
    want = ((recon[:, :1] - x[:, :1]).abs().flatten(1).mean(1)
            + balanced_mask_l1(recon[:, 1:], x[:, 1:])) / 2
    assert torch.allclose(got, want, atol=1e-6)
    # Per sample (what DP-SGD clips): another mask for sample 0 moves loss 0 alone.
    x2 = x.clone()
    x2[0, 1] = -x2[0, 1]
    with torch.no_grad():
        moved = autoencoder_loss(ae, x2, kl_weight=0.0, noise=noise)
    assert not torch.isclose(moved[0], got[0]) and torch.allclose(moved[1:], got[1:], atol=1e-6)


def test_demo_phantoms_carry_lesion_masks(tmp_path: Path) -> None:
    images, masks, labels, *_ = render_demo_pairs(n_patients=40, slices_per_patient=2,
                                                  image_size=32, seed=1)
    assert masks.shape == images.shape and set(np.unique(masks)) <= {0, 255}
    normal = labels == CLASS_NAMES.index("normal")
    assert not masks[normal].any()
    assert (masks[~normal].reshape((~normal).sum(), -1).max(1) > 0).mean() > 0.8
    # The masks change nothing about the images the image-only demo draws.
    assert np.array_equal(render_demo(n_patients=40, slices_per_patient=2, image_size=32,
                                      seed=1)[0], images)
    manifest = generate_demo(tmp_path, n_patients=8, slices_per_patient=1, n_sites=1,
                             image_size=16)
    header = manifest.read_text().splitlines()[0]
    assert header == "path,label,mask,patient,site"
    x, _, m = load_pairs(scan(manifest).records, 16)
    assert m.shape == x.shape


def test_generated_pairs_come_from_one_decode_in_order() -> None:
    """Image i and mask i are the two channels of the same decoded latent (same seed, same
    order as `generate_images`), the mask thresholded at 0; an image-only model refuses."""
    from ldm_core.models import make_denoiser
    from ldm_core.sampling import generate_images, generate_pairs

    cfg = build_config(preset="tiny", overrides={"model.mask_channels": 1}).model
    torch.manual_seed(0)
    ae, dm = make_autoencoder(cfg), make_denoiser(cfg)
    labels = torch.tensor([0, 1, 1, 0, 1])
    kw = {"scale_factor": 1.0, "steps": 2, "guidance_scale": 1.0, "seed": 3,
          "device": torch.device("cpu"), "batch_size": 2}
    full = generate_images(ae, dm, cfg, labels, all_channels=True, **kw)
    images, masks = generate_pairs(ae, dm, cfg, labels, **kw)
    assert full.shape == (5, 2, 16, 16)
    assert torch.equal(images, full[:, :1])
    assert torch.equal(masks, (full[:, 1:] > 0).float())
    assert torch.equal(generate_images(ae, dm, cfg, labels, **kw), images)
    image_only = build_config(preset="tiny").model
    with pytest.raises(ValueError, match="mask_channels"):
        generate_pairs(make_autoencoder(image_only), make_denoiser(image_only), image_only,
                       labels, **kw)


def test_a_large_jpeg_image_pairs_with_its_full_size_mask(tmp_path: Path) -> None:
    """JPEG images are decoded at reduced scale for image-only runs; a paired run must compare
    the mask with the image's stored size, or every large JPEG would be refused."""
    img = np.full((128, 160), 20, np.uint8)
    img[40:80, 60:100] = 230
    mask = np.zeros((128, 160), np.uint8)
    mask[40:80, 60:100] = 1
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(img).save(tmp_path / "b.jpg", quality=95)
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    Image.fromarray(mask).save(tmp_path / "b_mask.png")
    (tmp_path / "manifest.csv").write_text("path,label,mask\na.jpg,x,a_mask.png\n"
                                           "b.jpg,y,b_mask.png\n")
    x, _, m = load_pairs(scan(tmp_path / "manifest.csv").records, 32)
    inter = ((x > 0) & (m > 0)).sum().item()
    assert inter / (m > 0).sum().item() > 0.85 and inter / (x > 0).sum().item() > 0.85


def test_sixteen_bit_masks_are_read_raw(tmp_path: Path) -> None:
    """A 16-bit mask that is lesion everywhere stays lesion (no min-max rescaling)."""
    rows = ["path,label,mask"]
    for i, label in enumerate(("x", "y")):
        Image.fromarray(np.full((16, 16), 100, np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(np.ones((16, 16), np.uint16)).save(tmp_path / f"{i}_m.png")
        rows.append(f"{i}.png,{label},{i}_m.png")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    _, _, m = load_pairs(scan(tmp_path / "manifest.csv").records, 16)
    assert bool((m == 1).all())
