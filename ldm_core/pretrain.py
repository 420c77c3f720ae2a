"""Public pretraining of the autoencoder on procedural phantoms (no patient data at all).

DESIGN.md lists "public pretraining, then DP fine-tuning" among what makes DP generators work.
The autoencoder is a generic compressor, so it is the part that profits most and leaks least:
it is pretrained here on phantoms rendered from a fixed public seed, shipped with the package
(`ldm_core/pretrained/`), and then only fine-tuned under DP at the sites. The denoiser is never
pretrained: everything class-specific is learned from the sites' data under DP.

The shipped file is reproducible with `fedldm pretrain-ae` (same seed, same steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ldm_core.config import ModelConfig, to_dict
from ldm_core.losses import autoencoder_loss
from ldm_core.models import make_autoencoder
from ldm_core.phantoms import render_demo

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PUBLIC_SEED = 20_241_128  # the public phantom set; distinct from any demo-data seed in use


def _arch_key(cfg: ModelConfig) -> dict[str, object]:
    """The fields that define the autoencoder's tensors (n_classes etc. do not matter)."""
    d = to_dict(cfg)
    return {k: d[k] for k in ("image_size", "ae_channels", "ae_res_blocks", "latent_channels",
                              "ae_norm_groups")}


def pretrained_path(cfg: ModelConfig) -> Path:
    ch = "-".join(str(c) for c in cfg.ae_channels)
    return PRETRAINED_DIR / f"autoencoder-{cfg.image_size}px-{ch}-l{cfg.latent_channels}" \
        f"-rb{cfg.ae_res_blocks}.safetensors"


def public_images(n: int, image_size: int, seed: int = PUBLIC_SEED) -> torch.Tensor:
    """[N,1,H,W] in [-1,1]: public phantoms (all classes, several acquisition styles)."""
    patients = max(1, n // 4)
    imgs, *_ = render_demo(n_patients=patients, slices_per_patient=4, n_sites=4,
                           image_size=image_size, seed=seed)
    x = torch.from_numpy(imgs[:n]).float().unsqueeze(1) / 127.5 - 1.0
    return x


def pretrain_autoencoder(cfg: ModelConfig, *, steps: int = 600, batch_size: int = 64,
                         lr: float = 2e-3, kl_weight: float = 1e-3, n_images: int = 4000,
                         seed: int = 0, show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Plain (non-DP) training on public phantoms; returns the state dict."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = public_images(n_images, cfg.image_size)
    ae = make_autoencoder(cfg).train()
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    bar = tqdm(range(steps), desc="pretrain autoencoder (public phantoms)",
               disable=not show_progress)
    for _ in bar:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        noise = torch.randn((batch_size, cfg.latent_channels, cfg.latent_size, cfg.latent_size),
                            generator=gen)
        loss = autoencoder_loss(ae, x[idx], kl_weight=kl_weight, noise=noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return {k: v.detach().clone().contiguous() for k, v in ae.state_dict().items()}


def save_pretrained(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
                    meta: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    path.with_suffix(".json").write_text(json.dumps({"arch": _arch_key(cfg), **meta}, indent=2,
                                                    sort_keys=True) + "\n")


def _candidates(name: str) -> list[Path]:
    """Where the shipped file may be.

    Next to this module first; but under `flwr run` this module is imported from the app
    bundle (FAB), which only carries source/config files, so also look in the installed
    `fedldm` distribution (the source tree for editable installs) and $FEDLDM_PRETRAINED_DIR.
    """
    import os
    from importlib import metadata

    out = [PRETRAINED_DIR / name]
    if os.environ.get("FEDLDM_PRETRAINED_DIR"):
        out.insert(0, Path(os.environ["FEDLDM_PRETRAINED_DIR"]) / name)
    try:
        dist = metadata.distribution("fedldm")
        out.append(Path(str(dist.locate_file(f"ldm_core/pretrained/{name}"))))
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        url = str(direct.get("url", ""))
        if url.startswith("file://"):
            out.append(Path(url[len("file://"):]) / "ldm_core" / "pretrained" / name)
    except (metadata.PackageNotFoundError, json.JSONDecodeError):
        pass
    return out


def load_pretrained(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The shipped weights for this architecture, or a FileNotFoundError saying how to make them."""
    path = pretrained_path(cfg)
    path = next((p for p in _candidates(path.name) if p.exists()), path)
    if not path.exists():
        raise FileNotFoundError(
            f"no public-pretrained autoencoder at {path} for this architecture; create it with "
            f"`fedldm pretrain-ae --image-size {cfg.image_size} --set model.ae_channels="
            f"{list(cfg.ae_channels)} ...`, or set autoencoder init to 'random'")
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("arch") != _arch_key(cfg):
        raise ValueError(f"{path} was made for {meta.get('arch')}, not {_arch_key(cfg)}")
    return load_file(str(path))
