"""Epsilon of a preset's whole per-site plan under Opacus' RDP and PRV accountants.

The ledger charges the RDP figure (an upper bound that composes cheaply and never needs a
numerical tolerance); PRV is tighter. This prints how much tighter, for the plan a site calibrates
from its budget (both phases, the latent-scale release, one loss release per round, the audit).

    .venv/bin/python benchmarks/accountants.py --preset quick --epsilon 8
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import warnings
from pathlib import Path

from opacus.accountants import PRVAccountant

from client.ledger import PrivacyLedger
from client.site_config import SiteConfig
from client.tasks import plan_noise
from ldm_core.config import build_config
from ldm_core.phases import PHASES
from ldm_core.privacy import epsilon_of, gaussian_mechanism_entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--no-audit", action="store_true")
    args = ap.parse_args()
    cfg = build_config(preset=args.preset, class_names=("a", "b", "c", "d"),
                       epsilon=args.epsilon, delta=args.delta)
    with tempfile.TemporaryDirectory() as tmp:
        site = SiteConfig(site_id="s", data="-", state_dir=Path(tmp), epsilon=args.epsilon,
                          delta=args.delta, allow_audit=not args.no_audit)
        ledger = PrivacyLedger.create(site.ledger_path, budget_epsilon=args.epsilon,
                                      delta=args.delta, site_id="s")
        noise = plan_noise(site, cfg, ledger, "run")
    # Composition is order-free: every phase's training, then the fixed releases.
    rounds = {name: p.config(cfg).rounds for name, p in PHASES.items()}
    history = [(noise.phase_sigma(name), noise.phase_plan(name).sample_rate,
                noise.phase_plan(name).steps * r) for name, r in rounds.items()]
    history.append(gaussian_mechanism_entry(noise.scale))
    history += [gaussian_mechanism_entry(noise.metric)] * sum(rounds.values())
    if noise.audit:
        history.append(gaussian_mechanism_entry(noise.audit))
    rdp = epsilon_of(history, args.delta)
    prv = PRVAccountant()
    prv.history = [h for h in history if h[2] > 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prv_eps = float(prv.get_epsilon(delta=args.delta, eps_error=0.01))
    sigmas = {f"sigma_{p.prefix}": round(noise.phase_sigma(name), 4)
              for name, p in PHASES.items()}
    print(json.dumps({"preset": args.preset, "target_epsilon": args.epsilon,
                      "delta": args.delta, **sigmas, "rdp_epsilon": round(rdp, 4),
                      "prv_epsilon": round(prv_eps, 4),
                      "prv_below_rdp_pct": round(100 * (1 - prv_eps / rdp), 1)
                      if math.isfinite(rdp) else None}))


if __name__ == "__main__":
    main()
