"""Public pretraining on procedural phantoms (no patient data at all).

Public pretraining, then DP fine-tuning, is among what makes DP generators work
(docs/architecture.md).
The priors shipped with the package (`ldm_core/pretrained/`) are all made from phantoms
rendered from a fixed public seed, and all only *starting points* that the sites then fine-tune
under DP (besides the two below: the paired autoencoder, trained on phantoms with their lesion
masks, and the 3D autoencoder of the quick 3D plan, trained on phantom volumes):

* the autoencoder, a generic compressor, pretrained on phantoms of every kind
  (``ae_init="public-phantoms"``, what the built-in demo starts from);
* the modality-agnostic autoencoder (``ae_init="public-generic"``, the quick preset's default
  for any other data): the same network pretrained on those phantoms and as many generic
  procedural images (``ldm_core.procedural``: shapes, rings, textures at every contrast). It
  reconstructs real brain MRI 2.8 dB better than the phantom-only prior, and phantoms 0.3 dB
  worse (docs/benchmarks.md section 10b);
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
data, pretrain on a public set of the same modality instead (or use `random` inits):
`fedldm pretrain-ae --data PUBLIC --out ae.safetensors` (and `pretrain-dm --data PUBLIC
--autoencoder ae.safetensors --out dm.safetensors`) train the same two priors on any folder or
manifest a user may legally use, and a run starts from them with `--set ae_init=ae.safetensors
--set dm_init=dm.safetensors` (`prior file`). Such a prior is public by assumption: nothing in
it is charged to a site's budget, so it must never be made from the sites' own patients.

The shipped files are reproducible with `fedldm pretrain-ae` / `fedldm pretrain-dm` (same seeds
and steps), the paired autoencoder (phantoms with their lesion masks, for image/mask runs) with
`fedldm pretrain-ae --set model.mask_channels=1`; each JSON sidecar records the architecture it
fits and the data it was made from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ldm_core.config import ModelConfig, RunConfig, is_prior_file, to_dict
from ldm_core.losses import autoencoder_loss, diffusion_loss
from ldm_core.models import make_autoencoder, make_denoiser, make_train_scheduler
from ldm_core.phantoms import CLASS_NAMES, render_demo, render_demo_pairs

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PUBLIC_SEED = 20_241_128  # the public phantom set; distinct from any demo-data seed in use
GENERIC_SEED = 7  # the generic procedural half of the modality-agnostic prior's images
GENERIC = "public-generic"
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
    dims = "-3d" if cfg.spatial_dims == 3 else ""
    return f"{cfg.image_size}px-{ch}-l{cfg.latent_channels}-rb{cfg.ae_res_blocks}{dims}"


def _ae_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """A paired prior's sidecar also records its mask channels, a volume prior its spatial
    dimensions (2D image-only sidecars predate both, so a 2D prior never fits a 3D run)."""
    return (_AE_KEYS + (("mask_channels",) if cfg.mask_channels else ())
            + (("spatial_dims",) if cfg.spatial_dims == 3 else ()))


def pretrained_path(cfg: ModelConfig, *, generic: bool = False) -> Path:
    """The shipped autoencoder; for a paired model (mask channels) the one pretrained on public
    phantoms with their lesion masks; with `generic` the modality-agnostic one (2D image-only
    models: no paired or volume version is made)."""
    if generic:
        return PRETRAINED_DIR / f"autoencoder-generic-{_ae_tag(cfg)}.safetensors"
    mask = f"-m{cfg.mask_channels}" if cfg.mask_channels else ""
    return PRETRAINED_DIR / f"autoencoder-{_ae_tag(cfg)}{mask}.safetensors"


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


def public_generic_images(n: int, image_size: int) -> torch.Tensor:
    """[N,1,H,W] in [-1,1]: the modality-agnostic prior's public images, half phantoms of every
    class and half generic procedural images (ldm_core.procedural), in that order."""
    from ldm_core.procedural import generic_images

    return torch.cat([public_images(n // 2, image_size),
                      generic_images(n - n // 2, image_size, GENERIC_SEED)])


def public_volumes(n: int, size: int, seed: int = PUBLIC_SEED, *, masks: bool = False
                   ) -> torch.Tensor:
    """[N,1,S,S,S] in [-1,1]: public phantom head volumes (ldm_core.phantoms3d, all classes),
    written as NIfTI and read back through the sites' own loader, so they arrive in the same
    RAS orientation and intensity scaling as a site's volumes. With `masks`, [N,2,S,S,S]: each
    volume with its lesion mask, as a paired model reads them."""
    import tempfile

    from ldm_core.data import load_images, load_pairs, pair_channels, scan
    from ldm_core.phantoms3d import generate_demo3d

    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_demo3d(Path(tmp), n_patients=n, n_sites=4, size=size, seed=seed)
        records = scan(manifest).records
        if not masks:
            return load_images(records, size, progress=False)[0]
        x, _, m = load_pairs(records, size, progress=False)
    return pair_channels(x, m)


def public_pairs(n: int, image_size: int, seed: int = PUBLIC_SEED) -> torch.Tensor:
    """[N,2,H,W]: public phantoms with their lesion masks, as a paired model reads them."""
    from ldm_core.data import pair_channels

    imgs, masks, *_ = render_demo_pairs(n_patients=max(1, n // 4), slices_per_patient=4,
                                        n_sites=4, image_size=image_size, seed=seed)
    x = torch.from_numpy(imgs[:n]).float().unsqueeze(1) / 127.5 - 1.0
    return pair_channels(x, torch.from_numpy(masks[:n] > 0).float().unsqueeze(1))


def _shipped_ae_images(cfg: ModelConfig, n_images: int, generic: bool) -> torch.Tensor:
    """The public images a shipped autoencoder prior is made from."""
    if generic:
        return public_generic_images(2 * n_images, cfg.image_size)
    if cfg.spatial_dims == 3:
        return public_volumes(max(1, n_images // 8), cfg.image_size,
                              masks=bool(cfg.mask_channels))
    if cfg.mask_channels:
        return public_pairs(n_images, cfg.image_size)
    return public_images(n_images, cfg.image_size)


def pretrain_autoencoder(cfg: ModelConfig, *, steps: int = 600, batch_size: int | None = None,
                         lr: float = 2e-3, kl_weight: float = 1e-3, n_images: int = 4000,
                         seed: int = 0, show_progress: bool = True,
                         images: torch.Tensor | None = None, generic: bool = False
                         ) -> dict[str, torch.Tensor]:
    """Plain (non-DP) training on public images; returns the state dict.

    `images` ([N,1,S,S] in [-1, 1], a public set's; [N,1,S,S,S] for a volume model) replaces
    the shipped phantoms. A volume model (spatial_dims 3) without `images` trains on public
    phantom volumes (`public_volumes`, n_images // 8 of them: each is a whole head). `generic`
    trains the modality-agnostic prior on 2 * n_images public images
    (`public_generic_images`: n_images phantoms and as many generic ones).
    """
    if generic and (images is not None or cfg.spatial_dims != 2 or cfg.mask_channels):
        raise ValueError("the modality-agnostic prior is a 2D image-only autoencoder made from "
                         "the built-in public images: no --data, masks or volumes with it")
    # A 32^3 volume is 32 slices of work: batches of 16 volumes (64 images in 2D).
    if batch_size is None:
        batch_size = 64 if cfg.spatial_dims == 2 else 16
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if images is not None and images.shape[1] != cfg.image_channels:
        raise ValueError(f"public images have {images.shape[1]} channel(s), the autoencoder "
                         f"reads {cfg.image_channels}; a public set trains an image-only prior "
                         "(a paired run widens it for its mask channel)")
    if images is not None and images.ndim - 2 != cfg.spatial_dims:
        raise ValueError(f"public data are {images.ndim - 2}D but the autoencoder is "
                         f"{cfg.spatial_dims}D (model.spatial_dims); pretrain a volume prior on "
                         "volumes and an image prior on images")
    x = images if images is not None else _shipped_ae_images(cfg, n_images, generic)
    ae = make_autoencoder(cfg).train()
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    what = (f"{x.shape[0]} public images" if images is not None else
            f"{x.shape[0]} public phantoms and generic images" if generic else
            f"{x.shape[0]} public phantom volumes"
            + (" with masks" if cfg.mask_channels else "") if cfg.spatial_dims == 3 else
            "public phantoms with masks" if cfg.mask_channels else "public phantoms")
    bar = tqdm(range(steps), desc=f"pretrain autoencoder ({what})", disable=not show_progress)
    for _ in bar:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        noise = torch.randn((batch_size, *cfg.latent_shape), generator=gen)
        loss = autoencoder_loss(ae, x[idx], kl_weight=kl_weight, noise=noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return {k: v.detach().clone().contiguous() for k, v in ae.state_dict().items()}


def pretrain_denoiser(cfg: ModelConfig, ae_state: dict[str, torch.Tensor], *, steps: int = 3000,
                      batch_size: int = 128, lr: float = 2e-3, n_images: int = 8000,
                      seed: int = 0, show_progress: bool = True,
                      images: torch.Tensor | None = None
                      ) -> tuple[dict[str, torch.Tensor], float]:
    """Unconditional (null-label) DDPM training on healthy public phantoms' latents, or on the
    latents of `images` (a public set's, every image, labels unused).

    Returns the state dict with the class embedding reduced to its null row (the only one
    trained; `load_pretrained_denoiser` copies it to every class) and the public scale factor.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ae = make_autoencoder(cfg)
    ae.load_state_dict(ae_state)
    ae.eval()
    x = (public_images(n_images, cfg.image_size, seed=PUBLIC_SEED + 1, healthy_only=True)
         if images is None else images)
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
    what = "healthy public phantoms" if images is None else f"{x.shape[0]} public images"
    bar = tqdm(range(steps), desc=f"pretrain denoiser ({what})", disable=not show_progress)
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
    arch = _arch_key(cfg, _DM_KEYS if denoiser else _ae_keys(cfg))
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


class PriorError(ValueError):
    """A prior file that cannot start this run; the message names the file and the fix."""


def _read_checked(path: Path, arch: dict[str, object], fix: str) -> dict[str, torch.Tensor]:
    """Weights whose sidecar says they fit `arch`, or an error naming the file and `fix`."""
    if not path.is_file():
        raise FileNotFoundError(f"no prior weights at {path}; {fix}")
    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PriorError(f"{side}: the prior's sidecar is missing or not JSON ({e}); it is "
                         f"written next to the weights by fedldm pretrain-ae/-dm; {fix}") from e
    if meta.get("arch") != arch:
        raise PriorError(f"{path} was made for {meta.get('arch')}, not this run's {arch}; {fix}")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise PriorError(f"{path}: not a readable safetensors file ({e}); {fix}") from e


def _load(path: Path, arch: dict[str, object], how: str) -> dict[str, torch.Tensor]:
    path = next((p for p in _candidates(path.name) if p.exists()), path)
    if not path.exists():
        raise FileNotFoundError(f"no public-pretrained weights at {path} for this architecture; "
                                f"{how}")
    return _read_checked(path, arch, how)


def _ships(path: Path) -> bool:
    return any(p.exists() for p in _candidates(path.name))


# The image size the shipped 2D autoencoder priors were made at.
SHIPPED_2D_SIZE = 32


def shipped_arch(cfg: ModelConfig, *, generic: bool = False) -> ModelConfig:
    """The architecture whose shipped autoencoder file a 2D run of another image size reads.

    Why a 32 px prior may start a 64 px run: a 2D autoencoder is fully convolutional, so its
    weights do not depend on the image size. Measured on 800 images of each kind it never saw
    (`benchmarks/prior_transfer.py --image-size 64`, docs/benchmarks.md section 10b): real brain
    MRI at 64 px reconstructs better than at 32 px (modality-agnostic prior 28.0 dB / SSIM 0.85
    against 26.8 / 0.79; phantom-only 24.8 against 24.0), while 64 px phantoms lose detail
    through the phantom-only prior (23.3 dB against 28.4 at 32 px; the modality-agnostic prior
    27.2). Better than no start at all; a prior made at the run's own size (`fedldm pretrain-ae
    --image-size 64`) always wins, and volumes keep their own.
    """
    if cfg.spatial_dims != 2 or _ships(pretrained_path(cfg, generic=generic)):
        return cfg
    made = dataclasses.replace(cfg, image_size=SHIPPED_2D_SIZE)
    return made if _ships(pretrained_path(made, generic=generic)) else cfg


def _paired_prior_ships(cfg: ModelConfig) -> bool:
    """Whether a prior pretrained with masks exists for this paired architecture."""
    return bool(cfg.mask_channels) and _ships(pretrained_path(shipped_arch(cfg)))


def load_pretrained(cfg: ModelConfig, *, generic: bool = False) -> dict[str, torch.Tensor]:
    """The shipped autoencoder for this architecture, or an error saying how to make it.

    `generic`: the modality-agnostic prior (2D image-only architectures only). A paired run
    (mask channels) takes the prior pretrained on public phantoms with their
    masks when one ships for the architecture; otherwise the image-only prior widened for the
    mask channel (`widen_for_masks`), whose mask is then learnt from the sites' pairs alone,
    in the run's autoencoder rounds (`autoencoder_prior` refuses a widened prior without any).
    """
    if generic:
        if cfg.mask_channels or cfg.spatial_dims != 2:
            raise PriorError("ae_init 'public-generic' is a 2D image-only prior; a paired or "
                             "volume run starts from ae_init 'public-phantoms'")
        phantom_ships = _ships(pretrained_path(shipped_arch(cfg)))
        at = shipped_arch(cfg, generic=True)
        return _load(pretrained_path(at, generic=True), _arch_key(at, _ae_keys(at)),
                     f"create it with `fedldm pretrain-ae --generic --image-size "
                     f"{cfg.image_size} --set model.ae_channels={list(cfg.ae_channels)} ...`, or "
                     + ("set ae_init=public-phantoms" if phantom_ships else
                        "set ae_init=random with autoencoder rounds (--ae-rounds N)"))
    if _paired_prior_ships(cfg):
        at = shipped_arch(cfg)
        return _load(pretrained_path(at), _arch_key(at, _ae_keys(at)), "")
    image_only = shipped_arch(dataclasses.replace(cfg, mask_channels=0))
    state = _load(pretrained_path(image_only), _arch_key(image_only, _ae_keys(image_only)),
                  f"create it with `fedldm pretrain-ae --image-size {cfg.image_size} --set "
                  f"model.ae_channels={list(cfg.ae_channels)} "
                  + ("--set model.spatial_dims=3 " if cfg.spatial_dims == 3 else "")
                  + "...`, or set ae_init=random with autoencoder rounds (--ae-rounds N)")
    return widen_for_masks(state, cfg) if cfg.mask_channels else state


# A fresh mask output channel starts at "no lesion" (masks travel as -1/+1 in the model).
_MASK_BIAS = -1.0


def widen_for_masks(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Add the mask channels to an image-only autoencoder's first and last convolutions.

    Why: an image-only prior (a public-set prior file, or an architecture without a shipped
    paired prior) knows anatomy, not lesion masks. The new
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
    return _every_class_from_null(state, cfg)


def _every_class_from_null(state: dict[str, torch.Tensor], cfg: ModelConfig
                           ) -> dict[str, torch.Tensor]:
    null = state[_CLASS_EMBEDDING]
    if null.shape[0] != 1:
        raise ValueError(f"pretrained denoiser class embedding has {null.shape[0]} rows; "
                         "expected the single null row written by `fedldm pretrain-dm`")
    state[_CLASS_EMBEDDING] = null.expand(cfg.n_classes + 1, -1).clone()
    return state


# --------------------------------------------------------------------------- prior files
# A user's own public set (`fedldm pretrain-ae/-dm --data PUBLIC`), named by path in the run's
# ae_init / dm_init. Only the coordinator reads them (the initial global weights).


def load_public(path: str | Path, image_size: int, *, progress: bool = True,
                voxel_mm: float | None = None) -> tuple[torch.Tensor, dict[str, object]]:
    """Every image of a public folder or CSV manifest, [N,1,S,S] in [-1, 1] ([N,1,S,S,S] for
    volumes), and its source
    record for the prior's sidecar. Labels, splits and masks are not used: a prior learns what
    the modality looks like, the sites teach the classes."""
    from ldm_core.data import load_images, scan

    index = scan(path)
    x, _ = load_images(index.records, image_size, progress=progress, voxel_mm=voxel_mm)
    listing = "\n".join(sorted(str(r.path.relative_to(index.root)) if r.path.is_relative_to(
        index.root) else str(r.path) for r in index.records))
    source = {"data": str(Path(path).expanduser().resolve()), "images": int(x.shape[0]),
              **({} if voxel_mm is None else {"voxel_mm": float(voxel_mm)}),
              "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    return x, source


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prior_meta(path: str | Path) -> dict[str, object]:
    """A prior file's sidecar (empty when it cannot be read here)."""
    try:
        return dict(json.loads(Path(path).with_suffix(".json").read_text()))
    except (OSError, json.JSONDecodeError):
        return {}


def _fix(kind: str, path: str) -> str:
    return (f"make it with `fedldm pretrain-{kind} --data PUBLIC --out {path}` using the run's "
            "--preset, --image-size and model --set options")


def _check_mask_is_learnt(cfg: RunConfig, prior: str) -> None:
    """A widened prior's mask channel is blank until autoencoder rounds train it: without any,
    every generated mask would be empty, silently."""
    if cfg.autoencoder.rounds == 0:
        raise ValueError(
            f"a paired run (model.mask_channels=1) from {prior}, which has no mask channel, "
            "learns its masks only in autoencoder rounds, and autoencoder.rounds is 0: every "
            "generated mask would be empty. Give the autoencoder rounds (--ae-rounds N) or "
            "start from a prior pretrained with masks (fedldm pretrain-ae --data PUBLIC on "
            "image/mask pairs)")


def autoencoder_prior(cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    """The run's starting autoencoder (None: random), widened for a paired run's mask."""
    if cfg.ae_init == "random":
        return None
    if not is_prior_file(cfg.ae_init):
        m = cfg.model
        if m.mask_channels and not _paired_prior_ships(m):
            _check_mask_is_learnt(cfg, "the shipped image-only autoencoder of this architecture")
        return load_pretrained(m, generic=cfg.ae_init == GENERIC)
    path = Path(cfg.ae_init)
    paired = "mask_channels" in (prior_meta(path).get("arch") or {})  # made with masks
    if cfg.model.mask_channels and not paired:
        _check_mask_is_learnt(cfg, f"the image-only prior file {path.name}")
    model = cfg.model if paired else dataclasses.replace(cfg.model, mask_channels=0)
    state = _read_checked(path, _arch_key(model, _ae_keys(model)), _fix("ae", cfg.ae_init))
    return widen_for_masks(state, cfg.model) if cfg.model.mask_channels and not paired else state


def denoiser_prior(cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    """The run's starting denoiser (None: random). A prior file must have been made in the
    latent space of the run's own autoencoder prior (its sidecar records that file's hash)."""
    if cfg.dm_init == "random":
        return None
    if not is_prior_file(cfg.dm_init):
        return load_pretrained_denoiser(cfg.model)
    path = Path(cfg.dm_init)
    state = _read_checked(path, _arch_key(cfg.model, _DM_KEYS), _fix("dm", cfg.dm_init))
    want = prior_meta(path).get("autoencoder_sha256")
    have = file_sha256(cfg.ae_init) if Path(cfg.ae_init).is_file() else None
    if want != have:
        raise PriorError(f"{path} models the latents of another autoencoder (sha256 {want}) "
                         f"than this run's ae_init {cfg.ae_init} ({have}); start the run from "
                         "the autoencoder the denoiser was pretrained with (pretrain-dm "
                         "--autoencoder), or set dm_init to 'random'")
    if _CLASS_EMBEDDING not in state or state[_CLASS_EMBEDDING].shape[0] != 1:
        raise PriorError(f"{path}: not a pretrain-dm prior (expected a single null class row)")
    return _every_class_from_null(state, cfg.model)

