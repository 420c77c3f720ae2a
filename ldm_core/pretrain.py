"""Public pretraining on procedural phantoms (no patient data at all).

Public pretraining, then DP fine-tuning, is among what makes DP generators work
(docs/architecture.md).
Two priors are shipped with the package (`ldm_core/pretrained/`), both made from phantoms
rendered from a fixed public seed, and both only *starting points* that the sites then fine-tune
under DP:

* the autoencoder, a generic compressor, pretrained on phantoms of every kind;
* the denoiser, pretrained *unconditionally* on HEALTHY phantoms only (the `normal` class): it
  knows head anatomy (skull, ventricles, tissue), the analogue of the public healthy-brain scans
  that exist in reality (IXI, OASIS), but it has never seen a lesion nor a label. Everything
  class-specific -- which lesion goes with which label -- is learned from the sites' data under
  DP. All class embeddings start as the null embedding, so at round 0 every class draws a
  healthy head and DP training is what pulls the classes apart. It is opt-in
  (``dm_init="public-healthy-phantoms"``): at the quick preset's compute it draws cleaner heads
  but never learns to use the label (README, "Results"), so the quick preset starts from scratch.

On the built-in demo data the public phantoms come from the same generator as the sites' data
(another seed), so the demo's anatomy is easier than real data's; the report says so. On real
data, pretrain on a public set of the same modality instead (or use `random` inits).

Both files are reproducible with `fedldm pretrain-ae` / `fedldm pretrain-dm` (same seeds and
steps); their JSON sidecar records the architecture they fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ldm_core.config import ModelConfig, to_dict
from ldm_core.losses import autoencoder_loss, diffusion_loss
from ldm_core.models import make_autoencoder, make_denoiser, make_train_scheduler
from ldm_core.phantoms import CLASS_NAMES, render_demo

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PUBLIC_SEED = 20_241_128  # the public phantom set; distinct from any demo-data seed in use
HEALTHY = CLASS_NAMES.index("normal")
_AE_KEYS = ("image_size", "ae_channels", "ae_res_blocks", "latent_channels", "ae_norm_groups")
_DM_KEYS = _AE_KEYS + ("dm_channels", "dm_res_blocks", "dm_attention", "dm_norm_groups",
                       "dm_head_channels", "num_train_timesteps", "prediction_type")
_CLASS_EMBEDDING = "class_embedding.weight"


def _arch_key(cfg: ModelConfig, keys: tuple[str, ...] = _AE_KEYS) -> dict[str, object]:
    """The fields that define the tensors (and, for the denoiser, the latent space it models)."""
    d = to_dict(cfg)
    return {k: d[k] for k in keys}


def _ae_tag(cfg: ModelConfig) -> str:
    ch = "-".join(str(c) for c in cfg.ae_channels)
    return f"{cfg.image_size}px-{ch}-l{cfg.latent_channels}-rb{cfg.ae_res_blocks}"


def pretrained_path(cfg: ModelConfig) -> Path:
    return PRETRAINED_DIR / f"autoencoder-{_ae_tag(cfg)}.safetensors"


def denoiser_pretrained_path(cfg: ModelConfig) -> Path:
    ch = "-".join(str(c) for c in cfg.dm_channels)
    pred = "v" if cfg.prediction_type == "v_prediction" else "eps"
    return PRETRAINED_DIR / (f"denoiser-healthy-{_ae_tag(cfg)}-dm{ch}-rb{cfg.dm_res_blocks}"
                             f"-{pred}.safetensors")


def public_images(n: int, image_size: int, seed: int = PUBLIC_SEED, *,
                  healthy_only: bool = False) -> torch.Tensor:
    """[N,1,H,W] in [-1,1]: public phantoms (all classes, or healthy ones only)."""
    # 4 slices a patient; about a third of the patients are healthy, so render n patients
    # (~1.3 n healthy slices) when only healthy ones are kept
    patients = max(1, n if healthy_only else n // 4)
    imgs, labels, *_ = render_demo(n_patients=patients, slices_per_patient=4, n_sites=4,
                                   image_size=image_size, seed=seed)
    if healthy_only:
        imgs = imgs[labels == HEALTHY]
    return torch.from_numpy(imgs[:n]).float().unsqueeze(1) / 127.5 - 1.0


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


def pretrain_denoiser(cfg: ModelConfig, ae_state: dict[str, torch.Tensor], *, steps: int = 3000,
                      batch_size: int = 128, lr: float = 2e-3, n_images: int = 8000,
                      seed: int = 0, show_progress: bool = True
                      ) -> tuple[dict[str, torch.Tensor], float]:
    """Unconditional (null-label) DDPM training on healthy public phantoms' latents.

    Returns the state dict with the class embedding reduced to its null row (the only one
    trained; `load_pretrained_denoiser` copies it to every class) and the public scale factor.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ae = make_autoencoder(cfg)
    ae.load_state_dict(ae_state)
    ae.eval()
    x = public_images(n_images, cfg.image_size, seed=PUBLIC_SEED + 1, healthy_only=True)
    with torch.no_grad():
        z = torch.cat([ae.encode(x[i:i + 512])[0] for i in range(0, len(x), 512)])
    scale = float(1.0 / z.pow(2).mean().sqrt())
    z = z * scale
    unet = make_denoiser(cfg).train()
    sched = make_train_scheduler(cfg)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                   pct_start=0.05)
    null = torch.full((batch_size,), cfg.n_classes)
    bar = tqdm(range(steps), desc="pretrain denoiser (healthy public phantoms)",
               disable=not show_progress)
    for _ in bar:
        idx = torch.randint(0, z.shape[0], (batch_size,), generator=gen)
        t = torch.randint(0, cfg.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(z[idx].shape, generator=gen)
        loss = diffusion_loss(unet, sched, z[idx], null, timesteps=t, noise=noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    state = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    state[_CLASS_EMBEDDING] = state[_CLASS_EMBEDDING][cfg.n_classes:].clone()
    return state, scale


def save_pretrained(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
                    meta: dict[str, object], *, denoiser: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    arch = _arch_key(cfg, _DM_KEYS if denoiser else _AE_KEYS)
    path.with_suffix(".json").write_text(json.dumps({"arch": arch, **meta}, indent=2,
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


def _load(path: Path, arch: dict[str, object], how: str) -> dict[str, torch.Tensor]:
    path = next((p for p in _candidates(path.name) if p.exists()), path)
    if not path.exists():
        raise FileNotFoundError(f"no public-pretrained weights at {path} for this architecture; "
                                f"{how}")
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("arch") != arch:
        raise ValueError(f"{path} was made for {meta.get('arch')}, not {arch}")
    return load_file(str(path))


def load_pretrained(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The shipped autoencoder for this architecture, or an error saying how to make it;
    widened for a mask channel when the run generates image/mask pairs (`widen_for_masks`)."""
    state = _load(pretrained_path(cfg), _arch_key(cfg),
                  f"create it with `fedldm pretrain-ae --image-size {cfg.image_size} --set "
                  f"model.ae_channels={list(cfg.ae_channels)} ...`, or set autoencoder init to "
                  "'random'")
    return widen_for_masks(state, cfg) if cfg.mask_channels else state


# A fresh mask output channel starts at "no lesion" (masks travel as -1/+1 in the model).
_MASK_BIAS = -1.0


def widen_for_masks(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Add the mask channels to an image-only autoencoder's first and last convolutions.

    Why: the public prior knows anatomy, not lesion masks, and no public masks ship. The new
    input weights are zero, so the image path computes exactly what the prior computed (the
    mask is learnt under DP from there); the new output channel starts at "background".
    """
    target = make_autoencoder(cfg).state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, want in target.items():
        have = state[key]
        if have.shape == want.shape:
            out[key] = have
        elif have.ndim == want.ndim and have.shape[1:] == want.shape[1:]:  # output conv
            extra = torch.zeros((want.shape[0] - have.shape[0], *have.shape[1:]), dtype=have.dtype)
            if have.ndim == 1:
                extra.fill_(_MASK_BIAS)
            out[key] = torch.cat([have, extra])
        elif have.ndim == want.ndim and have.shape[0] == want.shape[0]:  # input conv
            extra = torch.zeros((have.shape[0], want.shape[1] - have.shape[1], *have.shape[2:]),
                                dtype=have.dtype)
            out[key] = torch.cat([have, extra], dim=1)
        else:
            raise ValueError(f"pretrained autoencoder tensor {key} {tuple(have.shape)} cannot "
                             f"be widened to {tuple(want.shape)} for mask channels")
    return out


def load_pretrained_denoiser(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The shipped healthy-anatomy denoiser, its null embedding copied to every class row."""
    state = _load(denoiser_pretrained_path(cfg), _arch_key(cfg, _DM_KEYS),
                  "create it with `fedldm pretrain-dm` (same --preset/--set as the run), or "
                  "set dm_init to 'random'")
    null = state[_CLASS_EMBEDDING]
    if null.shape[0] != 1:
        raise ValueError(f"pretrained denoiser class embedding has {null.shape[0]} rows; "
                         "expected the single null row written by `fedldm pretrain-dm`")
    state[_CLASS_EMBEDDING] = null.expand(cfg.n_classes + 1, -1).clone()
    return state
