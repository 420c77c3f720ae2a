"""`fedldm augment RUN --class NAME --count N`: measure what synthetic images of one class add.

Where the real images come from decides what the answer means, so it is written next to every
result: in a simulated run, the union of the simulated sites' train and test splits (all on this
machine); otherwise a labelled set named with ``--reference`` (a site running this on its own data
with the federation's final model, or a coordinator holding a reference set). The synthetic images
are post-processing of the DP generator: drawing more costs no privacy budget. The real images
never leave the machine the command runs on.

Writes ``RUN/augment/<class>-<count>/`` (or ``--out``): ``synthetic/`` (the extra images and
their manifest), ``augment.json`` (every number, with CIs) and ``augment.png`` (per-class AUC and
sensitivity at the fixed specificity, both arms). An existing result folder is never overwritten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from common import files
from ldm_core.evaluation.augment import AUGMENT_ARMS, evaluate_augmentation
from ldm_core.evaluation.utility import judge_epochs
from ldm_core.models import resolve_device
from ldm_core.sampling import generate_images
from server.evaluate import export_synthetic
from server.offline import simulated_sites
from server.real_data import RealSource, ReferenceSet, subsample
from server.report_figures import ci_error_bars, new_figure, png_bytes
from server.run_folder import Run

__all__ = ["AugmentError", "AugmentOptions", "augment_run", "summary_table"]

# Sampling seeds of `augment` live apart from the evaluation's (seed + 10_000), so the extra
# images are not copies of the exported synthetic set.
_SEED_OFFSET = 20_000


class AugmentError(ValueError):
    """Bad input to `fedldm augment` (message names the file or flag and the fix)."""


@dataclass(frozen=True)
class AugmentOptions:
    class_name: str
    count: int
    reference: Path | None = None
    out: Path | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int | None = None  # None: the utility judge's (12 for images, 90 for volumes)
    specificity: float = 0.90
    # Real training images per arm (class-stratified subsample): keeps it to minutes on a CPU.
    max_real_train: int = 1000
    show_progress: bool = True


def _check(run: Run, opts: AugmentOptions) -> tuple[int, Path]:
    if not run.root.is_dir():
        raise AugmentError(f"RUN {run.root}: no such run folder")
    if not run.has_final():
        raise AugmentError(f"RUN {run.root}: no checkpoints/final: the run did not finish "
                           "training (rerun `fedldm simulate` with the same --out to resume)")
    names = run.load_final().cfg.class_names
    if opts.class_name not in names:
        raise AugmentError(f"--class {opts.class_name!r}: the run's classes are {list(names)}")
    if opts.count < 1:
        raise AugmentError(f"--count {opts.count}: must be >= 1")
    if not 0.0 < opts.specificity < 1.0:
        raise AugmentError(f"--specificity {opts.specificity}: must lie in (0, 1)")
    if opts.reference is not None and not opts.reference.exists():
        raise AugmentError(f"--reference {opts.reference}: no such file or folder")
    out = opts.out or run.root / "augment" / f"{opts.class_name}-{opts.count}"
    if out.exists() and any(out.iterdir()):
        raise AugmentError(f"{out} already holds a result; pass --out NEW_FOLDER or delete it "
                           "(results are never overwritten)")
    return names.index(opts.class_name), out


def _source(run: Run, opts: AugmentOptions) -> RealSource:
    if opts.reference is not None:
        return ReferenceSet(opts.reference)
    sites = simulated_sites(run)
    if sites is None:
        raise AugmentError(f"RUN {run.root} is a deployed run: no real images are on this "
                           "machine. Pass --reference PATH, a labelled set held here (e.g. the "
                           "site's own class folders or manifest.csv)")
    return sites


def augment_run(run_dir: Path, opts: AugmentOptions) -> dict[str, Any]:
    """Generate ``count`` images of the class, train real vs real+synthetic, write results."""
    run = Run(run_dir)
    target, out = _check(run, opts)
    final = run.load_final()
    cfg = final.cfg
    say = (lambda m: print(f"[augment] {m}", flush=True)) if opts.show_progress else (
        lambda m: None)
    say("loading real images")
    real = subsample(_source(run, opts).load(cfg), opts.max_real_train, seed=cfg.seed)
    if not bool((real.test[1] == target).any()):  # before minutes of sampling, not after
        raise AugmentError(f"{real.source}: the real test split has no '{opts.class_name}' "
                           "image, so its AUC and sensitivity are undefined; use a --reference "
                           "set with some, or a run with more data")
    device = resolve_device(cfg.device)
    say(f"generating {opts.count} synthetic '{opts.class_name}' images")
    labels = torch.full((opts.count,), target, dtype=torch.long)
    images = generate_images(final.ae, final.dm, cfg.model, labels,
                             scale_factor=final.scale_factor, steps=cfg.dm.ddim_steps,
                             guidance_scale=cfg.dm.guidance_scale,
                             seed=cfg.seed + _SEED_OFFSET + target, device=device,
                             show_progress=opts.show_progress, clip=cfg.dm.clip_latent)
    say(f"training real vs real + {opts.count} synthetic over seeds {list(opts.seeds)}")
    try:
        result = evaluate_augmentation(
            real.train, (images, labels), real.test, n_classes=cfg.model.n_classes,
            target=target, seeds=opts.seeds,
            epochs=judge_epochs(cfg.model.spatial_dims, opts.epochs), specificity=opts.specificity,
            device=device, show_progress=opts.show_progress)
    except ValueError as exc:
        raise AugmentError(f"{real.source}: {exc}") from exc
    result.update({
        "run": str(run.root),
        "class_names": list(cfg.class_names),
        "target": opts.class_name,
        "real_source": real.source,
        "privacy_note": "the extra images are drawn from the DP generator (post-processing: no "
                        "privacy cost); the real images were read where this command ran and "
                        "did not leave it",
    })
    with files.staged_folder(out) as tmp:
        export_synthetic(tmp / "synthetic", images, labels, cfg.class_names,
                         voxel_mm=cfg.model.voxel_mm)
        files.write_bytes_atomic(tmp / "augment.png", png_bytes(augment_figure(result)))
        files.write_json_atomic(tmp / "augment.json", result)
    result["out"] = str(out)
    return result


def augment_figure(result: dict[str, Any]) -> Figure:
    """Per-class AUC and sensitivity at the fixed specificity, real vs augmented, with CIs."""
    names = list(result["class_names"])
    fig = new_figure(max(7.0, 1.6 * len(names) + 3), 3.6)
    axes = fig.subplots(1, 2)
    width, colors = 0.38, {"real": "#4c72b0", "augmented": "#55a868"}
    x = np.arange(len(names))
    for ax, key, label in zip(axes, ("auc", "sensitivity"), (
            "one-vs-rest AUC", f"sensitivity at specificity {result['specificity']:.2f}"),
            strict=True):
        for k, arm in enumerate(AUGMENT_ARMS):
            vals = [float(e[arm][key]) for e in result["per_class"]]
            errs = [ci_error_bars(v, e[arm][f"{key}_ci"]) for v, e in zip(vals, result["per_class"],
                                                                  strict=True)]
            ax.bar(x + (k - 0.5) * width, [0 if math.isnan(v) else v for v in vals], width,
                   yerr=np.array(errs).T, capsize=3, color=colors[arm],
                   label=f"{arm} ({'real train' if arm == 'real' else 'real + synthetic'})")
        ticks = [f"{n}\n(+{result['n_extra']})" if n == result["target"] else n for n in names]
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    d = next(e for e in result["per_class"] if e["class"] == result["target_class"])
    fig.suptitle(f"+{result['n_extra']} synthetic '{result['target']}': "
                 f"delta AUC {d['delta_auc']:+.3f} {_fmt_ci(d['delta_auc_ci'])}, delta "
                 f"sensitivity {d['delta_sensitivity']:+.3f} "
                 f"{_fmt_ci(d['delta_sensitivity_ci'])}", fontsize=9)
    return fig


def _fmt_ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def verdict(delta: float, ci: list[float]) -> str:
    """A gain or loss only when the paired 95 % interval excludes zero."""
    if any(math.isnan(v) for v in ci):
        return "undefined"
    if ci[0] > 0:
        return "gain"
    if ci[1] < 0:
        return "loss"
    return "no measurable change"


def summary_table(result: dict[str, Any]) -> str:
    """A plain-text table of the per-class results (what the command prints)."""
    spec = result["specificity"]
    head = (f"{'class':<12} {'train':>6} {'AUC real':>9} {'AUC aug':>8} {'delta AUC [95% CI]':>26}"
            f" {'sens@' + format(spec, '.2f') + ' real':>15} {'aug':>6} "
            f"{'delta sens [95% CI]':>26}")
    lines = [head, "-" * len(head)]
    for e in result["per_class"]:
        name = result["class_names"][e["class"]]
        mark = "*" if e["class"] == result["target_class"] else " "
        lines.append(
            f"{mark}{name:<11} {result['n_train_per_class'][e['class']]:>6} "
            f"{e['real']['auc']:>9.3f} {e['augmented']['auc']:>8.3f} "
            f"{e['delta_auc']:>+8.3f} {_fmt_ci(e['delta_auc_ci']):>17} "
            f"{e['real']['sensitivity']:>15.3f} {e['augmented']['sensitivity']:>6.3f} "
            f"{e['delta_sensitivity']:>+8.3f} {_fmt_ci(e['delta_sensitivity_ci']):>17}")
    d = next(e for e in result["per_class"] if e["class"] == result["target_class"])
    m = result["macro_auc"]
    lines += ["", f"* target class, +{result['n_extra']} synthetic images. "
              f"{result['target']}: AUC {verdict(d['delta_auc'], d['delta_auc_ci'])}, "
              f"sensitivity {verdict(d['delta_sensitivity'], d['delta_sensitivity_ci'])}; "
              f"macro AUC {m['real']['auc']:.3f} -> {m['augmented']['auc']:.3f} "
              f"({verdict(m['delta'], m['delta_ci'])}).",
              f"Real images: {result['real_source']}; {result['n_test_patients']} test "
              f"patients, seeds {result['seeds']}, {result['epochs']} epochs. CIs: bootstrap over "
              "test patients, paired for the deltas."]
    return "\n".join(lines)
