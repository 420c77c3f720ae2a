"""`fedldm stress RUN --model PATH`: score a user's classifier on controlled synthetic variation.

The model is the user's, not fedldm's: a TorchScript file, a ``torch.export`` program (``.pt2``),
or a state dict with ``--arch`` naming
the architecture (``smallcnn``, MONAI's ``densenet121`` or ``resnet18``; 2D, one input channel,
one logit per class of the run, in the run's class order). Inputs are the run's images: ``[N, 1,
H, W]`` in [-1, 1] at the run's image size.

Variation, one factor at a time: the generator's guidance scale (same noise seeds, so only the
guidance changes), then standard intensity, noise, blur and contrast shifts applied to the
synthetic images drawn at the run's own guidance (``ldm_core.evaluation.stress``). The model's
score on real test patients, where this machine has them (a simulated run's sites, or
``--reference``), is the reference line. A run trained site-conditional (``--set
model.site_slots=N``) adds one row per site: the same classes and noise seeds in that site's
acquisition style. Lesion severity is not probed: the demo labels carry none.

Writes ``RUN/stress/<model name>/`` (or ``--out``): ``stress.json`` and ``stress.png``, never
overwriting an earlier result. Nothing is sent to a site and nothing is charged: synthetic images
are post-processing of the DP generator.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from common import files
from ldm_core.classifier import SmallCNN
from ldm_core.evaluation.stress import SHIFTS, Shift, apply_shift, score_predictions
from ldm_core.models import resolve_device
from ldm_core.sampling import generate_images
from server.offline import simulated_sites
from server.real_data import RealSource, ReferenceSet
from server.report_figures import new_figure, png_bytes
from server.run_folder import Run

__all__ = ["ARCHITECTURES", "StressError", "StressOptions", "load_user_model", "stress_run",
           "summary_table"]

ARCHITECTURES = ("smallcnn", "densenet121", "resnet18")
# Stress sampling seeds live apart from the evaluation's and augment's.
_SEED_OFFSET = 30_000


class StressError(ValueError):
    """Bad input to `fedldm stress` (message names the file or flag and the fix)."""


@dataclass(frozen=True)
class StressOptions:
    model: Path
    arch: str | None = None
    per_class: int = 50
    guidance: tuple[float, ...] | None = None  # default: 1, 2, the run's, twice the run's
    shifts: tuple[Shift, ...] = SHIFTS
    reference: Path | None = None
    out: Path | None = None
    show_progress: bool = True


def _build(arch: str, n_classes: int, spatial_dims: int = 2) -> torch.nn.Module:
    if arch == "smallcnn":
        return SmallCNN(n_classes, spatial_dims=spatial_dims)
    from monai.networks import nets

    if arch == "densenet121":
        return nets.DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=n_classes)
    return nets.resnet18(spatial_dims=spatial_dims, n_input_channels=1, num_classes=n_classes)


def load_user_model(path: Path, arch: str | None, n_classes: int, image_size: int,
                    spatial_dims: int = 2) -> torch.nn.Module:
    """The user's classifier in eval mode, checked to map [N,1,H,W] (a 3D run's volumes:
    [N,1,D,H,W]) to [N, n_classes] logits; a --arch state dict is built in the run's
    dimensionality."""
    if not path.is_file():
        raise StressError(f"--model {path}: no such file")
    if arch is None and path.suffix == ".pt2":
        try:
            model = torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise StressError(f"--model {path}: not a torch.export program ({type(e).__name__})"
                              ) from e
    elif arch is None:
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise StressError(f"--model {path}: not a TorchScript file ({str(e).splitlines()[0]}"
                              f"); for a state dict pass --arch {{{','.join(ARCHITECTURES)}}}, "
                              "for torch.export name the file .pt2") from e
    else:
        if arch not in ARCHITECTURES:
            raise StressError(f"--arch {arch!r}: known architectures are {list(ARCHITECTURES)}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:  # weights only: a pickled object with code in it is refused, not run
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise StressError(f"--model {path}: cannot read a state dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
        if not isinstance(state, dict):
            raise StressError(f"--model {path}: holds a {type(state).__name__}, not a state dict")
        model = _build(arch, n_classes, spatial_dims)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise StressError(f"--model {path}: does not fit --arch {arch} with {n_classes} "
                              f"classes: {' '.join(str(e).split())[:400]}") from e
    with contextlib.suppress(NotImplementedError):  # torch.export modules have no eval switch
        model.eval()
    probe = (2, 1, *(image_size,) * spatial_dims)
    with torch.no_grad():
        try:
            out = model(torch.zeros(probe))
        except Exception as e:  # noqa: BLE001 - the user's model may raise anything
            kind = "volumes" if spatial_dims == 3 else "images"
            raise StressError(f"--model {path}: fails on a batch of the run's {kind} "
                              f"{list(probe)}: {type(e).__name__}: {e}") from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise StressError(f"--model {path}: must return logits [N, {n_classes}] (one per class "
                          f"of the run), returned {shape}")
    return model


@torch.no_grad()
def _proba(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    outs = [torch.softmax(model(images[i:i + batch].float()), dim=1)
            for i in range(0, images.shape[0], batch)]
    return torch.cat(outs).double().numpy()


def _check(run: Run, opts: StressOptions) -> Path:
    if not run.root.is_dir():
        raise StressError(f"RUN {run.root}: no such run folder")
    if not run.has_final():
        raise StressError(f"RUN {run.root}: no checkpoints/final: the run did not finish "
                          "training (rerun `fedldm simulate` with the same --out to resume)")
    if opts.per_class < 2:
        raise StressError(f"--per-class {opts.per_class}: must be >= 2")
    if opts.guidance is not None and not all(g >= 0 and math.isfinite(g) for g in opts.guidance):
        raise StressError(f"--guidance {list(opts.guidance)}: scales must be finite and >= 0")
    if opts.reference is not None and not opts.reference.exists():
        raise StressError(f"--reference {opts.reference}: no such file or folder")
    out = opts.out or run.root / "stress" / opts.model.stem
    if out.exists() and any(out.iterdir()):
        raise StressError(f"{out} already holds a result; pass --out NEW_FOLDER or delete it "
                          "(results are never overwritten)")
    return out


def _reference(run: Run, opts: StressOptions) -> RealSource | None:
    return ReferenceSet(opts.reference) if opts.reference is not None else simulated_sites(run)


def site_slots(run: Run, n_slots: int) -> list[tuple[int, str]]:
    """(slot, site name) of a site-conditional run, from the coordinator's state.json; slots
    no site trained with are left out (nothing learnt them)."""
    if n_slots == 0:
        return []
    state = run.load_state() or {}
    named = {int(v): str(k) for k, v in (state.get("site_slots") or {}).items()}
    return sorted((k, named[k]) for k in range(n_slots) if k in named)


def stress_run(run_dir: Path, opts: StressOptions) -> dict[str, Any]:
    """Score the model per variation; write stress.json and stress.png; return the result."""
    run = Run(run_dir)
    out = _check(run, opts)
    final = run.load_final()
    cfg = final.cfg
    model = load_user_model(opts.model, opts.arch, cfg.model.n_classes, cfg.model.image_size,
                            cfg.model.spatial_dims)
    say = (lambda m: print(f"[stress] {m}", flush=True)) if opts.show_progress else (
        lambda m: None)
    device = resolve_device(cfg.device)
    reference, reference_note = None, "no real images on this machine (pass --reference PATH)"
    source = _reference(run, opts)
    if source is not None:  # before the slow sampling: a bad reference fails fast
        say("scoring the model on real test patients")
        real = source.load(cfg)
        if real.test[0].shape[0] == 0:
            reference_note = f"{real.source}: the real test split is empty"
        else:
            reference = {**score_predictions(real.test[1].numpy(), _proba(model, real.test[0]),
                                             groups=np.asarray(real.test[2])),
                         "source": real.source}
            reference_note = None
    labels = torch.arange(cfg.model.n_classes).repeat_interleave(opts.per_class)
    base_g = float(cfg.dm.guidance_scale)
    scales = sorted(set(opts.guidance or (1.0, 2.0, base_g, 2.0 * base_g)) | {base_g})
    rows: list[dict[str, Any]] = []
    base_images: torch.Tensor | None = None
    for g in scales:
        say(f"generating {labels.numel()} images at guidance {g:g}")
        images = generate_images(final.ae, final.dm, cfg.model, labels,
                                 scale_factor=final.scale_factor, steps=cfg.dm.ddim_steps,
                                 guidance_scale=g, seed=cfg.seed + _SEED_OFFSET, device=device,
                                 show_progress=opts.show_progress, clip=cfg.dm.clip_latent)
        if g == base_g:
            base_images = images
        rows.append({"family": "guidance", "level": g, "name": f"guidance {g:g}",
                     **score_predictions(labels.numpy(), _proba(model, images))})
    assert base_images is not None
    say(f"scoring {len(opts.shifts)} shifts of the guidance-{base_g:g} images")
    for k, shift in enumerate(opts.shifts):
        shifted = apply_shift(base_images, shift, torch.Generator().manual_seed(cfg.seed + k))
        rows.append({"family": shift.family, "level": shift.level, "name": shift.name,
                     **score_predictions(labels.numpy(), _proba(model, shifted))})
    for slot, name in site_slots(run, cfg.model.site_slots):
        say(f"generating {labels.numel()} images in the style of {name} (slot {slot})")
        images = generate_images(final.ae, final.dm, cfg.model, labels,
                                 scale_factor=final.scale_factor, steps=cfg.dm.ddim_steps,
                                 guidance_scale=base_g, seed=cfg.seed + _SEED_OFFSET,
                                 device=device, show_progress=opts.show_progress,
                                 clip=cfg.dm.clip_latent, site=slot)
        rows.append({"family": "site", "level": slot, "name": f"site {name}",
                     **score_predictions(labels.numpy(), _proba(model, images))})
    base = next(r for r in rows if r["family"] == "guidance" and r["level"] == base_g)
    result = {"model": str(opts.model), "arch": opts.arch or "torchscript", "run": str(run.root),
              "class_names": list(cfg.class_names), "per_class": opts.per_class,
              "base_guidance": base_g, "synthetic_base": base, "rows": rows,
              "reference": reference, "reference_note": reference_note,
              "note": "AUC is macro one-vs-rest; CIs bootstrap images (synthetic) or patients "
                      "(real). A drop under a shift is the model's sensitivity to it on "
                      "synthetic images, not a measurement on real scans of that kind."}
    with files.staged_folder(out) as tmp:
        files.write_bytes_atomic(tmp / "stress.png", png_bytes(stress_figure(result)))
        files.write_json_atomic(tmp / "stress.json", result)
    result["out"] = str(out)
    return result


def stress_figure(result: dict[str, Any]) -> Figure:
    """One panel per family: AUC (solid, CI band) and accuracy (dashed) against the level, the
    unshifted synthetic score (dotted) and the real test score (grey band) as references."""
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in result["rows"]:
        by_family[r["family"]].append(r)
    fig = new_figure(3.0 * len(by_family) + 0.5, 3.2)
    axes = fig.subplots(1, len(by_family), squeeze=False)[0]
    ref, base = result["reference"], result["synthetic_base"]
    for ax, (family, rows) in zip(axes, by_family.items(), strict=True):
        rows = sorted(rows, key=lambda r: r["level"])
        x = [r["level"] for r in rows]
        auc = [r["auc"] for r in rows]
        ax.plot(x, auc, "o-", color="#4c72b0", label="AUC")
        ax.fill_between(x, [r["auc_ci"][0] for r in rows], [r["auc_ci"][1] for r in rows],
                        color="#4c72b0", alpha=0.2)
        ax.plot(x, [r["acc"] for r in rows], "s--", color="#dd8452", label="accuracy")
        ax.axhline(base["auc"], color="#4c72b0", ls=":", lw=1, label="synthetic, unshifted")
        if ref is not None:
            ax.axhspan(*ref["auc_ci"], color="grey", alpha=0.2)
            ax.axhline(ref["auc"], color="grey", lw=1.5, label="real test AUC")
        ax.set_title(family, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"stress test of {Path(result['model']).name} ({result['per_class']} synthetic "
                 "images per class per setting)", fontsize=9)
    return fig


def summary_table(result: dict[str, Any]) -> str:
    """The per-variation table the command prints."""
    lines = [f"{'variation':<16} {'AUC':>6} {'95% CI':>16} {'accuracy':>9} {'95% CI':>16}",
             "-" * 67]

    def line(name: str, r: dict[str, Any]) -> str:
        return (f"{name:<16} {r['auc']:>6.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] "
                f"{r['acc']:>9.3f} [{r['acc_ci'][0]:.3f}, {r['acc_ci'][1]:.3f}]")

    if result["reference"] is not None:
        lines.append(line("real test", result["reference"]))
    lines += [line(r["name"], r) for r in result["rows"]]
    lines.append("")
    lines.append(f"Synthetic rows: {result['per_class']} images per class, the same noise seeds "
                 f"in every row; shifts apply to the guidance-{result['base_guidance']:g} images.")
    if result["reference"] is not None:
        lines.append(f"Real test: {result['reference']['source']}.")
    elif result.get("reference_note"):
        lines.append(f"No real-test reference: {result['reference_note']}.")
    return "\n".join(lines)
