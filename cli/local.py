"""One-machine commands: `simulate`, `evaluate`, `export`, `demo-data`, `pretrain-ae`/`-dm`.

`simulate` checks everything it can before it creates or touches anything (the data's file list
and every image, the partition among --sites, the configuration, and, for an existing run
folder, that the run there has the same configuration), so bad input exits 2 and leaves the file
system as it was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli import args as A
from cli.errors import BadInput

if TYPE_CHECKING:  # imported lazily at run time: `fedldm --help` stays fast
    from server.simulate import SimulationOptions

PRESETS = ("tiny", "quick", "standard")


class LocalCliError(BadInput):
    """Bad input to a one-machine command (exit 2); the message names the flag or file."""


# ---------------------------------------------------------------------------------------------
# simulate


def _overrides(args: argparse.Namespace, shortcuts: tuple[tuple[str, str], ...]
               ) -> dict[str, Any]:
    overrides = dict(args.set)
    for flag, key in shortcuts:
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    return overrides


def _check_out_folder(out: Path, flag: str = "--out") -> None:
    if out.exists() and not out.is_dir():
        raise LocalCliError(f"{flag} {out}: exists and is not a folder")


def _check_images(paths: list[Path], where: str) -> None:
    from cli.site import decode_images

    bad = [i for i in decode_images(paths) if i.error is not None]
    if bad:
        raise LocalCliError(f"--data {where}: {len(bad)} image(s) cannot be decoded (first: "
                            f"{bad[0].path}: {bad[0].error}); run `fedldm site check --data "
                            f"{where}` for the full list")


def check_resume(out: Path, config: dict[str, Any]) -> None:
    """An existing run folder may only be resumed with the configuration it was started with."""
    state = out / "checkpoints" / "state.json"
    if not state.exists():
        return
    try:
        saved = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LocalCliError(f"--out {out}: {state} is unreadable ({e}); use a new --out folder"
                            ) from e
    from common.protocol import other_version_run

    # Checked first: an older release's run differs in its config too (new defaults), and
    # "the same settings" could never resume it.
    reason = other_version_run(f"--out {out}", saved.get("protocol")) \
        if isinstance(saved, dict) else None
    if reason:
        raise LocalCliError(reason)
    if not isinstance(saved, dict) or saved.get("config") != config:
        changed = _changed_keys(saved.get("config") if isinstance(saved, dict) else None, config)
        raise LocalCliError(f"--out {out} holds a run with another configuration (differs in: "
                            f"{changed}); use a new --out folder, or the same settings to "
                            "resume that run (nothing was changed)")


def _changed_keys(old: Any, new: Any, prefix: str = "") -> str:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return prefix.rstrip(".") or "everything"
    keys = sorted(set(old) | set(new))
    diff = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if a != b:
            diff.append(_changed_keys(a, b, f"{prefix}{k}.") if isinstance(a, dict)
                        and isinstance(b, dict) else f"{prefix}{k}")
    return ", ".join(diff[:6]) + (", ..." if len(diff) > 6 else "")


def build_config_from(args: argparse.Namespace, overrides: dict[str, Any], **kwargs: Any) -> Any:
    """`build_config` with the command's flags; a refusal names the flags that made the config."""
    from ldm_core.config import ConfigError, build_config

    try:
        return build_config(preset=args.preset, image_size=args.image_size,
                            overrides=overrides, **kwargs)
    except ConfigError as e:
        flags = [f"--preset {args.preset}"]
        if args.image_size is not None:
            flags.append(f"--image-size {args.image_size}")
        flags += [f"--set {k}={v}" for k, v in overrides.items()]
        raise LocalCliError(f"configuration ({', '.join(flags)}) refused: {e}") from e


def preflight_simulation(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """Everything `run_simulation` would refuse late, checked before anything is written."""
    from ldm_core.config import to_dict
    from ldm_core.data import DEMO_DATA, DEMO_FOLDERS, partition, scan
    from ldm_core.phantoms import CLASS_NAMES
    from server.simulate import SimulationOptions, demo_patients

    out = Path(args.out)
    _check_out_folder(out)
    _check_rare(args.demo_rare, "--demo-rare")
    if args.demo_rare is not None and args.data != "demo":
        raise LocalCliError(f"--demo-rare applies to --data demo only, not {args.data}")
    if args.data in DEMO_FOLDERS:
        manifest = out / DEMO_FOLDERS[args.data] / "manifest.csv"
        n_demo = demo_patients(SimulationOptions(data=args.data,
                                                 demo_patients=args.demo_patients))
        if manifest.exists() and args.demo_rare is not None:
            print(f"note: {manifest} exists and is reused as it is; --demo-rare applies to "
                  "newly generated demo data only")
        class_names = tuple(scan(manifest).class_names) if manifest.exists() else CLASS_NAMES
        if not manifest.exists() and args.sites > n_demo:
            raise LocalCliError(f"--sites {args.sites}: more sites than --demo-patients "
                                f"{n_demo}")
        scheme = "site" if args.partition == "auto" else args.partition
        records = scan(manifest).records if manifest.exists() else None
    else:
        data = Path(args.data).expanduser()
        if not data.exists():
            raise LocalCliError(f"--data {data}: no such file or folder ('demo' for the "
                                "built-in phantoms, 'demo3d' for phantom head volumes)")
        index = scan(data)
        class_names = tuple(index.class_names)
        scheme = "iid" if args.partition == "auto" else args.partition
        records = index.records
    if records is not None:
        try:
            partition(records, args.sites, scheme, seed=args.seed)
        except ValueError as e:  # DataError is a ValueError; bad schemes raise ValueError
            raise LocalCliError(f"--partition {scheme!r} over --sites {args.sites}: {e}") from e
    cfg = build_config_from(args, overrides, class_names=class_names, epsilon=args.epsilon,
                            delta=args.delta, seed=args.seed, device=args.device,
                            phantom_data=args.data == DEMO_DATA)
    check_resume(out, to_dict(cfg))
    from ldm_core.phases import check_models

    try:
        check_models(cfg)
    except (OSError, ValueError, RuntimeError) as e:
        raise LocalCliError(f"the run's models (ae_init / dm_init / train_only): {e}") from e
    unmasked = [r for r in records or () if r.mask is None] if cfg.model.mask_channels else []
    if unmasked:
        where = out / DEMO_FOLDERS[args.data] if args.data in DEMO_FOLDERS else args.data
        raise LocalCliError(
            f"--set model.mask_channels=1: {len(unmasked)} of {len(records or ())} images in "
            f"{where} have no mask (first: {unmasked[0].path}); paired generation needs a "
            "'mask' column in the CSV manifest" + (
                f" (demo data written by an older fedldm: delete {where} to regenerate it)"
                if args.data in DEMO_FOLDERS else ""))
    if args.accept is not None:
        from server.acceptance import AcceptanceError, check_feasible, parse_acceptance

        try:
            check_feasible(parse_acceptance(args.accept), epsilon=args.epsilon,
                           evaluate=not args.no_evaluate)
        except AcceptanceError as e:
            raise LocalCliError(str(e)) from e
    if args.data not in DEMO_FOLDERS:
        _check_images([r.path for r in records or ()], str(args.data))


def _check_rare(rare: tuple[str, float] | None, flag: str) -> None:
    """A rare-class request the phantoms can honour (named class, rarer than its default)."""
    if rare is None:
        return
    from ldm_core.phantoms import class_probs

    try:
        class_probs(rare)
    except ValueError as e:
        raise LocalCliError(f"{flag} {rare[0]}:{rare[1]}: {str(e).removeprefix('phantoms: ')}"
                            ) from e


def simulation_options(args: argparse.Namespace) -> SimulationOptions:
    """The `SimulationOptions` of a parsed `fedldm simulate` command line (also used by the
    benchmarks that drive simulate, so they plan exactly what the command will run)."""
    from server.simulate import SimulationOptions, with_volume_overrides

    overrides = _overrides(args, (("ae_rounds", "autoencoder.rounds"),
                                  ("dm_rounds", "diffusion.rounds"),
                                  ("ae_steps", "autoencoder.local_steps"),
                                  ("dm_steps", "diffusion.local_steps")))
    # Volumes (--data demo3d, or NIfTI / DICOM data) make a 3D run: the preflight checks that.
    overrides = with_volume_overrides(args.data, overrides)
    return SimulationOptions(data=args.data, sites=args.sites, partition=args.partition,
                             epsilon=args.epsilon, delta=args.delta, preset=args.preset,
                             image_size=args.image_size, seed=args.seed, out=args.out,
                             device=args.device, overrides=overrides,
                             demo_patients=args.demo_patients, demo_slices=args.demo_slices,
                             demo_rare=args.demo_rare, reproducible=args.reproducible,
                             evaluate=not args.no_evaluate, accept=args.accept)


def simulate(args: argparse.Namespace) -> int:
    from server.simulate import run_simulation, summary_lines

    opts = simulation_options(args)
    preflight_simulation(args, dict(opts.overrides))
    metrics = run_simulation(opts)
    print("\n".join(["", "== fedldm simulate: done =="] + summary_lines(metrics, args.out)))
    return 0


# ---------------------------------------------------------------------------------------------
# evaluate, demo-data, pretrain


def export(args: argparse.Namespace) -> int:
    from server.export import export_run

    acc = export_run(args.run, args.to, force=args.force)
    verdict = "GO" if acc.get("go") else "NO-GO (exported with --force; the data card says so)"
    print(f"exported {args.run / 'synthetic'} to {args.to}: {verdict}")
    return 0


def augment(args: argparse.Namespace) -> int:
    from server.augment import AugmentOptions, augment_run, summary_table

    result = augment_run(args.run, AugmentOptions(
        class_name=args.class_name, count=args.count, reference=args.reference, out=args.out,
        seeds=tuple(range(args.seeds)), epochs=args.epochs, specificity=args.specificity,
        max_real_train=args.max_real_train))
    print(summary_table(result))
    print(f"wrote {result['out']} (augment.json, augment.png, synthetic/)")
    return 0


def stress(args: argparse.Namespace) -> int:
    from server.stress import StressOptions, stress_run, summary_table

    result = stress_run(args.run, StressOptions(
        model=args.model, arch=args.arch, per_class=args.per_class, guidance=args.guidance,
        reference=args.reference, out=args.out))
    print(summary_table(result))
    print(f"wrote {result['out']} (stress.json, stress.png)")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.is_dir():
        raise LocalCliError(f"RUN {run}: no such run folder")
    if not (run / "checkpoints" / "final").exists():
        raise LocalCliError(f"RUN {run}: no checkpoints/final: the run did not finish training "
                            "(rerun `fedldm simulate` with the same --out to resume)")
    if args.reference is not None and not args.reference.exists():
        raise LocalCliError(f"--reference {args.reference}: no such file or folder")
    if args.at_sites and args.reference is not None:
        raise LocalCliError("--at-sites measures utility at the sites, --reference at the "
                            "coordinator: pass one of them")
    from server.evaluate import EvalOptions
    from server.offline import evaluate_existing_run

    opts = EvalOptions(per_class=args.per_class, reference=args.reference,
                       utility_epochs=args.utility_epochs,
                       utility_seeds=None if args.utility_seeds is None
                       else tuple(range(args.utility_seeds)), at_sites=args.at_sites)
    metrics = evaluate_existing_run(run, options=opts, audit=not args.no_audit)
    u = metrics.get("utility") or {}
    print(f"wrote {run / 'report.html'} and {run / 'metrics.json'}"
          + (f" (TSTR/TRTR ratio {u['ratio']:.3f})" if "ratio" in u else ""))
    return 0


def demo_data(args: argparse.Namespace) -> int:
    _check_out_folder(args.out)
    if args.image_size is not None and args.image_size < 16:
        raise LocalCliError(f"--image-size {args.image_size}: must be >= 16")
    _check_rare(args.rare, "--rare")
    if args.sites > args.patients:
        raise LocalCliError(f"--sites {args.sites} exceeds --patients {args.patients}: every "
                            "site needs at least one patient")
    if args.volumes:
        if args.rare is not None or args.slices is not None:
            raise LocalCliError("--volumes writes one whole head volume per patient (no "
                                "--slices) with the demo's class mix (no --rare)")
        from ldm_core.phantoms3d import generate_demo3d

        manifest = generate_demo3d(args.out, n_patients=args.patients, n_sites=args.sites,
                                   size=args.image_size or 32, seed=args.seed)
        print(f"wrote {manifest}")
        return 0
    from ldm_core.phantoms import generate_demo

    manifest = generate_demo(args.out, n_patients=args.patients,
                             slices_per_patient=args.slices or 4,
                             n_sites=args.sites, image_size=args.image_size or 64,
                             seed=args.seed, rare=args.rare)
    print(f"wrote {manifest}")
    return 0


def pretrain(args: argparse.Namespace) -> int:
    """`pretrain-ae` / `pretrain-dm`: remake a shipped public prior (no patient data), or make
    one from a public set of the user's own modality (`--data PUBLIC`)."""
    from ldm_core import pretrain as pt
    from server.simulate import with_volume_overrides

    overrides = dict(args.set)
    if args.data is not None:  # a public set of volumes makes a 3D prior, as in simulate
        overrides = with_volume_overrides(str(args.data), overrides)
    cfg = build_config_from(args, overrides).model
    if args.data is not None and args.out is None:
        raise LocalCliError("--data: give --out FILE.safetensors for the prior (the shipped "
                            "priors in the package are made from phantoms only)")
    if args.out is not None:
        _check_out_folder(args.out.parent, "--out")
        if args.out.is_dir():
            raise LocalCliError(f"--out {args.out}: is a folder; give a .safetensors file path")
        if args.out.suffix != ".safetensors":
            raise LocalCliError(f"--out {args.out}: name it *.safetensors (runs select a prior "
                                "file by that suffix: --set ae_init=FILE.safetensors)")
    generic = bool(getattr(args, "generic", False))  # pretrain-ae only
    if generic and (args.data is not None or cfg.mask_channels or cfg.spatial_dims != 2):
        raise LocalCliError("--generic makes the shipped modality-agnostic 2D image-only prior "
                            "from built-in public images: no --data, mask channels or volumes "
                            "with it")
    if args.data is not None and cfg.mask_channels:
        raise LocalCliError("--data with model.mask_channels: a public set trains an image-only "
                            "prior (its masks are not read); drop the mask channel here, a "
                            "paired run widens the prior itself")
    dm = args.command == "pretrain-dm"
    if dm and cfg.spatial_dims == 3:
        raise LocalCliError("pretrain-dm makes 2D denoiser priors only; a 3D run's denoiser "
                            "starts from scratch (dm_init=random), its autoencoder can start "
                            "from a 3D prior (pretrain-ae --set model.spatial_dims=3)")
    if dm and cfg.mask_channels:
        raise LocalCliError("pretrain-dm with model.mask_channels: a denoiser prior is made for "
                            "an image-only autoencoder's latents; a paired run's denoiser starts "
                            "from scratch (dm_init=random)")
    ae_arg = getattr(args, "autoencoder", None)  # pretrain-dm only
    if ae_arg is not None and args.data is None:
        raise LocalCliError("--autoencoder applies with --data only (the shipped denoiser is "
                            "made in the shipped autoencoder's latent space)")
    if dm and args.data is not None and ae_arg is None:
        raise LocalCliError("pretrain-dm --data: give --autoencoder FILE, the prior made by "
                            "pretrain-ae --data (the denoiser learns that autoencoder's latents)")
    meta: dict[str, object] = {"steps": args.steps, "seed": args.seed}
    ae_state: dict[str, Any] | None = None
    if ae_arg is not None:  # checked before the public images are read
        from ldm_core.config import RunConfig

        ae_file = str(ae_arg.expanduser().resolve())
        try:
            ae_state = pt.autoencoder_prior(RunConfig(model=cfg, ae_init=ae_file))
        except (OSError, ValueError) as e:
            raise LocalCliError(f"--autoencoder: {e}") from e
        meta.update(autoencoder=ae_file, autoencoder_sha256=pt.file_sha256(ae_file),
                    labels="none (null class only)")
    images = None
    if args.data is not None:
        data = Path(args.data).expanduser()
        if not data.exists():
            raise LocalCliError(f"--data {data}: no such file or folder")
        images, source = pt.load_public(data, cfg.image_size, voxel_mm=cfg.voxel_mm)
        meta.update(source, kind="denoiser" if dm else "autoencoder",
                    note="a user-supplied public set; never the sites' own patients (a prior is "
                         "not charged to any privacy budget)")
    if not dm:
        state = pt.pretrain_autoencoder(cfg, steps=args.steps, seed=args.seed, images=images,
                                        generic=generic)
        path = args.out or pt.pretrained_path(cfg, generic=generic)
        if generic:
            meta.update(public_seed=pt.PUBLIC_SEED, generic_seed=pt.GENERIC_SEED,
                        data="procedural phantoms (ldm_core.phantoms) and as many generic "
                             "procedural images (ldm_core.procedural)")
        elif images is None:
            meta.update(public_seed=pt.PUBLIC_SEED,
                        data="procedural phantom volumes (ldm_core.phantoms3d)"
                        if cfg.spatial_dims == 3 else "procedural phantoms (ldm_core.phantoms)")
    else:
        if ae_state is None:
            ae_state = pt.load_pretrained(cfg)
        state, scale = pt.pretrain_denoiser(cfg, ae_state, steps=args.steps, seed=args.seed,
                                            images=images)
        path = args.out or pt.denoiser_pretrained_path(cfg)
        meta.update(public_scale_factor=scale)
        if images is None:
            meta.update(public_seed=pt.PUBLIC_SEED + 1, labels="none (null class only)",
                        data="healthy procedural phantoms (ldm_core.phantoms, class 'normal' "
                             "only), encoded by the shipped public-phantom autoencoder")
    pt.save_pretrained(path, cfg, state, meta, denoiser=dm)
    print(f"wrote {path}")
    if args.data is not None:
        key = "dm_init" if dm else "ae_init"
        print(f"start a run from it with --set {key}={path.expanduser().resolve()}")
    return 0


# ---------------------------------------------------------------------------------------------
# argparse wiring


def register(sub: argparse._SubParsersAction) -> None:
    """Add `simulate`, `evaluate`, `demo-data`, `pretrain-ae`, `pretrain-dm`."""
    p = sub.add_parser("simulate", help="run a simulated federation end to end")
    p.add_argument("--data", default="demo",
                   help="'demo' (built-in phantoms), 'demo3d' (phantom head volumes: a 3D run) "
                   "or a class-folder tree / manifest.csv (of images, or of NIfTI volumes / "
                   "DICOM series folders: a 3D run)")
    p.add_argument("--sites", type=A.positive_int, default=3)
    p.add_argument("--partition", default="auto",
                   help="iid | dirichlet:ALPHA | site (auto: 'site' for demo, else iid)")
    p.add_argument("--epsilon", type=A.epsilon, default=8.0,
                   help="per-site budget; 'inf' trains without DP (non-private baseline)")
    p.add_argument("--delta", type=A.delta, default=1e-5)
    p.add_argument("--preset", default="quick", choices=PRESETS)
    p.add_argument("--image-size", type=A.positive_int, default=None,
                   help="pixels per side (default: the preset's: tiny 16, quick 32, standard 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--out", type=A.path, default=Path("runs/demo"))
    p.add_argument("--ae-rounds", type=A.nonneg_int, help="override autoencoder rounds")
    p.add_argument("--dm-rounds", type=A.nonneg_int, help="override diffusion rounds")
    p.add_argument("--ae-steps", type=A.positive_int,
                   help="override autoencoder DP steps per round")
    p.add_argument("--dm-steps", type=A.positive_int, help="override diffusion DP steps per round")
    p.add_argument("--demo-patients", type=A.positive_int, default=None,
                   help="demo data size (patients; --demo-slices images each; default 12800, "
                   "600 volumes for demo3d)")
    p.add_argument("--demo-slices", type=A.positive_int, default=1,
                   help="demo images per patient (the DP unit is the patient)")
    p.add_argument("--demo-rare", type=A.rare_class, metavar="CLASS:FRACTION",
                   help="make one demo class rare at the sites, e.g. tumor:0.03 (to show "
                   "`fedldm augment`)")
    p.add_argument("--reproducible", action="store_true",
                   help="seed the sites' privacy randomness from --seed so a run repeats "
                   "exactly. NOT private against anyone who knows the seed: tests and research "
                   "only (run.json, the report and the data card say so)")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--accept", default=None, metavar="CRITERIA",
                   help="acceptance criteria, declared before training and judged in the "
                   "report (go / no-go), e.g. 'ratio>=0.9,mia_auc<=0.55,epsilon<=8'; without "
                   "it the report's default thresholds decide")
    p.add_argument("--set", type=A.override, action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set diffusion.noise_multiplicity=8")

    d = sub.add_parser("demo-data", help="write the procedural demo phantoms")
    d.add_argument("--out", type=A.path, required=True)
    d.add_argument("--patients", type=A.positive_int, default=3200)
    d.add_argument("--slices", type=A.positive_int, default=None,
                   help="images per patient (default 4; not with --volumes)")
    d.add_argument("--sites", type=A.positive_int, default=3)
    d.add_argument("--image-size", type=A.positive_int, default=None,
                   help="pixels (voxels) a side; default 64 for images, 32 for --volumes")
    d.add_argument("--volumes", action="store_true",
                   help="write 3D phantom head volumes (NIfTI) with lesion masks, one per "
                   "patient: the data of `simulate --data demo3d`")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--rare", type=A.rare_class, metavar="CLASS:FRACTION",
                   help="make one class rare, e.g. tumor:0.03 (for `fedldm augment`)")

    e = sub.add_parser("evaluate", help="(re-)evaluate a finished run folder")
    e.add_argument("run", type=A.path, metavar="RUN")
    e.add_argument("--reference", type=A.path, help="extra real reference set at the "
                   "coordinator")
    e.add_argument("--per-class", type=A.positive_int, help="synthetic images per class")
    e.add_argument("--utility-epochs", type=A.positive_int,
                   help="epochs of each utility classifier (default: 12 for images, 90 for "
                   "volumes)")
    e.add_argument("--utility-seeds", type=A.positive_int,
                   help="classifier seeds per utility arm (default: 3 for images, 1 for volumes)")
    e.add_argument("--no-audit", action="store_true", help="skip the site privacy audits")
    e.add_argument("--at-sites", action="store_true",
                   help="simulated run: measure utility and recall as a deployment does, at "
                   "each site on its own test patients with one DP release charged to its "
                   "ledger, instead of with the real images at the coordinator (a "
                   "simulation reserves no evaluation in its budget plan: a site whose run "
                   "spent its whole budget refuses and is listed as missing)")

    x = sub.add_parser("export", help="copy a run's synthetic dataset and its data card to a "
                       "folder; refused when the run is NO-GO unless --force")
    x.add_argument("run", type=A.path, metavar="RUN")
    x.add_argument("--to", type=A.path, required=True, metavar="DIR",
                   help="a new (or empty) folder")
    x.add_argument("--force", action="store_true",
                   help="export a NO-GO run anyway; the data card's first line says so")

    g = sub.add_parser("augment", help="generate more of one class and measure, on real test "
                       "patients, real training data plus the synthetic extra against real alone")
    g.add_argument("run", type=A.path, metavar="RUN")
    g.add_argument("--class", dest="class_name", required=True, metavar="NAME",
                   help="the class to add synthetic images of (e.g. the rare one)")
    g.add_argument("--count", type=A.positive_int, required=True, metavar="N",
                   help="synthetic images to add")
    g.add_argument("--reference", type=A.path, help="the real labelled set to train and test "
                   "on (required for a deployed run: e.g. a site's own data); a simulated run "
                   "uses its sites' splits")
    g.add_argument("--out", type=A.path, help="result folder (default RUN/augment/NAME-N)")
    g.add_argument("--seeds", type=A.positive_int, default=3, help="classifier seeds per arm")
    g.add_argument("--epochs", type=A.positive_int,
                   help="epochs per classifier (default: 12 for images, 90 for volumes)")
    g.add_argument("--specificity", type=float, default=0.90,
                   help="operating point for the sensitivity column")
    g.add_argument("--max-real-train", type=A.positive_int, default=1000,
                   help="real training images per arm (class-stratified subsample)")

    t = sub.add_parser("stress", help="score your classifier on controlled synthetic variation "
                       "(guidance, noise, blur, contrast, intensity) against real test data")
    t.add_argument("run", type=A.path, metavar="RUN")
    t.add_argument("--model", type=A.path, required=True, metavar="PATH",
                   help="TorchScript file, torch.export program (.pt2), or a state dict (.pt "
                   "weights-only / .safetensors) with --arch; input [N,1,H,W] in [-1,1] (a 3D "
                   "run's volumes: [N,1,D,H,W]), output one logit per class")
    t.add_argument("--arch", choices=("smallcnn", "densenet121", "resnet18"),
                   help="architecture of a state dict (MONAI DenseNet121 / resnet18, one "
                   "channel, 2D or 3D as the run; smallcnn = ldm_core.classifier.SmallCNN with its "
                   "defaults, the 2D utility judge's network)")
    t.add_argument("--per-class", type=A.positive_int, default=50,
                   help="synthetic images per class per setting")
    t.add_argument("--guidance", type=A.float_list, metavar="G1,G2,...",
                   help="guidance scales to probe (default: 1, 2, the run's, twice the run's)")
    t.add_argument("--reference", type=A.path, help="real labelled set for the reference line "
                   "(a simulated run uses its sites' test splits)")
    t.add_argument("--out", type=A.path, help="result folder (default RUN/stress/MODEL_NAME)")

    for name, steps, text in (
        ("pretrain-ae", 2500, "pretrain the autoencoder on public phantoms, or on a public set "
                              "of your modality (--data)"),
        ("pretrain-dm", 3000, "pretrain the denoiser (no labels) on healthy public phantoms, "
                              "in the latent space of the shipped autoencoder, or on a public "
                              "set (--data, --autoencoder)"),
    ):
        pp = sub.add_parser(name, help=text)
        pp.add_argument("--preset", default="quick", choices=PRESETS)
        pp.add_argument("--image-size", type=A.positive_int, default=None)
        pp.add_argument("--steps", type=A.positive_int, default=steps)
        pp.add_argument("--seed", type=int, default=0)
        pp.add_argument("--out", type=A.path, help="the prior file (*.safetensors; a JSON "
                        "sidecar with its architecture and source is written next to it)")
        pp.add_argument("--data", type=A.path, metavar="PUBLIC",
                        help="a folder or CSV manifest of PUBLIC images of your modality "
                        "(labels unused). Never the sites' patients: a prior is not charged to "
                        "any privacy budget")
        if name == "pretrain-ae":
            pp.add_argument("--generic", action="store_true",
                            help="the modality-agnostic prior (ae_init=public-generic): public "
                            "phantoms and as many generic procedural images (2D, image-only)")
        if name == "pretrain-dm":
            pp.add_argument("--autoencoder", type=A.path, metavar="FILE",
                            help="with --data: the pretrain-ae --data prior whose latents the "
                            "denoiser learns (the run must start from it too)")
        pp.add_argument("--set", type=A.override, action="append", default=[],
                        metavar="KEY=VALUE")


COMMANDS = {"simulate": simulate, "demo-data": demo_data, "evaluate": evaluate,
            "export": export, "augment": augment, "stress": stress, "pretrain-ae": pretrain,
            "pretrain-dm": pretrain}
