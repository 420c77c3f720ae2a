"""The `fedldm` command line: simulate, demo-data (and the site/coordinator commands)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from client import site_cli
from server import coordinator_cli


def _float_or_inf(s: str) -> float:
    if s.lower() in ("inf", "infinity", "none"):
        return math.inf
    try:
        v = float(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number (or 'inf')") from e
    if v <= 0:
        raise argparse.ArgumentTypeError("epsilon must be > 0 (use 'inf' for no DP)")
    return v


def _override(s: str) -> tuple[str, object]:
    key, sep, value = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {s!r}: use SECTION.FIELD=VALUE")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a simulated federation end to end")
    p.add_argument("--data", default="demo",
                   help="'demo' (built-in phantoms) or a class-folder tree / manifest.csv")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--partition", default="auto",
                   help="iid | dirichlet:ALPHA | site (auto: 'site' for demo, else iid)")
    p.add_argument("--epsilon", type=_float_or_inf, default=8.0,
                   help="per-site budget; 'inf' trains without DP (non-private baseline)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--preset", default="quick", choices=("tiny", "quick", "standard"))
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels per side (default: the preset's: tiny 16, quick 32, standard 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--ae-rounds", type=int, help="override autoencoder rounds")
    p.add_argument("--dm-rounds", type=int, help="override diffusion rounds")
    p.add_argument("--ae-steps", type=int, help="override autoencoder DP steps per round")
    p.add_argument("--dm-steps", type=int, help="override diffusion DP steps per round")
    p.add_argument("--demo-patients", type=int, default=12800,
                   help="demo data size (patients; --demo-slices images each)")
    p.add_argument("--demo-slices", type=int, default=1,
                   help="demo images per patient (the DP unit is the patient)")
    p.add_argument("--reproducible", action="store_true",
                   help="seed the sites' privacy randomness from --seed so a run repeats "
                   "exactly. NOT private against anyone who knows the seed: tests and research "
                   "only (run.json, the report and the data card say so)")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set diffusion.noise_multiplicity=8")


def _simulate(args: argparse.Namespace) -> int:
    from server.simulate import SimulationOptions, run_simulation, summary_lines

    overrides = dict(args.set)
    for flag, key in (("ae_rounds", "autoencoder.rounds"), ("dm_rounds", "diffusion.rounds"),
                      ("ae_steps", "autoencoder.local_steps"),
                      ("dm_steps", "diffusion.local_steps")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    opts = SimulationOptions(data=args.data, sites=args.sites, partition=args.partition,
                             epsilon=args.epsilon, delta=args.delta, preset=args.preset,
                             image_size=args.image_size, seed=args.seed, out=args.out,
                             device=args.device, overrides=overrides,
                             demo_patients=args.demo_patients, demo_slices=args.demo_slices,
                             reproducible=args.reproducible, evaluate=not args.no_evaluate)
    metrics = run_simulation(opts)
    print("\n".join(["", "== fedldm simulate: done =="] + summary_lines(metrics, args.out)))
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from ldm_core.phantoms import generate_demo

    manifest = generate_demo(args.out, n_patients=args.patients, slices_per_patient=args.slices,
                             n_sites=args.sites, image_size=args.image_size, seed=args.seed)
    print(f"wrote {manifest}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from server.evaluate import EvalOptions
    from server.offline import evaluate_existing_run

    opts = EvalOptions(per_class=args.per_class, reference=args.reference,
                       utility_epochs=args.utility_epochs,
                       utility_seeds=tuple(range(args.utility_seeds)))
    metrics = evaluate_existing_run(args.run, options=opts, audit=not args.no_audit)
    u = metrics.get("utility") or {}
    print(f"wrote {args.run / 'report.html'} and {args.run / 'metrics.json'}"
          + (f" (TSTR/TRTR ratio {u['ratio']:.3f})" if "ratio" in u else ""))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    """`pretrain-ae` / `pretrain-dm`: remake a shipped public prior (no patient data)."""
    from ldm_core import pretrain as pt
    from ldm_core.config import build_config

    cfg = build_config(preset=args.preset, image_size=args.image_size,
                       overrides=dict(args.set)).model
    meta: dict[str, object] = {"steps": args.steps, "seed": args.seed}
    if args.command == "pretrain-ae":
        state = pt.pretrain_autoencoder(cfg, steps=args.steps, seed=args.seed)
        path = args.out or pt.pretrained_path(cfg)
        meta.update(public_seed=pt.PUBLIC_SEED, data="procedural phantoms (ldm_core.phantoms)")
    else:
        state, scale = pt.pretrain_denoiser(cfg, pt.load_pretrained(cfg), steps=args.steps,
                                            seed=args.seed)
        path = args.out or pt.denoiser_pretrained_path(cfg)
        meta.update(public_seed=pt.PUBLIC_SEED + 1, public_scale_factor=scale,
                    labels="none (null class only)",
                    data="healthy procedural phantoms (ldm_core.phantoms, class 'normal' only), "
                         "encoded by the shipped public-phantom autoencoder")
    pt.save_pretrained(path, cfg, state, meta, denoiser=args.command == "pretrain-dm")
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedldm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    d = sub.add_parser("demo-data", help="write the procedural demo phantoms")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--patients", type=int, default=3200)
    d.add_argument("--slices", type=int, default=4)
    d.add_argument("--sites", type=int, default=3)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="(re-)evaluate a finished run folder")
    e.add_argument("run", type=Path)
    e.add_argument("--reference", type=Path, help="extra real reference set at the coordinator")
    e.add_argument("--per-class", type=int, help="synthetic images per class")
    e.add_argument("--utility-epochs", type=int, default=12)
    e.add_argument("--utility-seeds", type=int, default=3)
    e.add_argument("--no-audit", action="store_true", help="skip the site privacy audits")
    for name, steps, text in (
        ("pretrain-ae", 2500, "pretrain the autoencoder on public phantoms"),
        ("pretrain-dm", 3000, "pretrain the denoiser (no labels) on healthy public phantoms, "
                              "in the latent space of the shipped autoencoder"),
    ):
        pp = sub.add_parser(name, help=text)
        pp.add_argument("--preset", default="quick", choices=("tiny", "quick", "standard"))
        pp.add_argument("--image-size", type=int, default=None)
        pp.add_argument("--steps", type=int, default=steps)
        pp.add_argument("--seed", type=int, default=0)
        pp.add_argument("--out", type=Path)
        pp.add_argument("--set", type=_override, action="append", default=[],
                        metavar="KEY=VALUE")
    site_cli.register(sub)
    coordinator_cli.register(sub)
    return parser


COMMANDS = {"simulate": _simulate, "demo-data": _demo_data, "evaluate": _evaluate,
            "pretrain-ae": _pretrain, "pretrain-dm": _pretrain, "site": site_cli.main,
            "coordinator": coordinator_cli.main}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: the run folder keeps the last finished round; rerun the same "
              "command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
