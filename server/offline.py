"""`fedldm evaluate RUN`: evaluation of an existing run folder without a live federation.

For a simulated run the sites are rebuilt from run.json and audited by calling the very function
their ClientApp `query` handler calls (client.audit.site_audit): each audit is a DP release
charged to that site's ledger under run id "evaluate-<run folder name>", with secure privacy
randomness. With `--at-sites` utility and recall are measured the same way (client.site_eval),
as a deployment measures them. For a deployed run only a `--reference` set at the coordinator
can be used afterwards.

The final model is loaded once (Run.load_final) and handed to samples, evaluation and audits.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from client.client_app import SimulationSites
from client.ledger import BudgetExceededError
from ldm_core.data import SPLIT_SCHEME
from server.eval_audit import AuditFn
from server.eval_sites import SiteEvalFn
from server.evaluate import EvalOptions, evaluate_run
from server.finalize import write_samples
from server.real_data import SimulatedSites
from server.run_folder import FinalModel, Run


def simulated_sites(run: Run | Path) -> SimulatedSites | None:
    """The sites of a simulated run, rebuilt from run.json (None for a deployed run)."""
    run = run if isinstance(run, Run) else Run(run)
    info = run.load_info()
    if info is None or not info.is_simulation:
        return None
    if info.split != SPLIT_SCHEME:
        print(f"warning: {run.info_path} was written with another patient split "
              f"({info.split or 'the stratified split of earlier versions'}); its sites are "
              f"rebuilt with {SPLIT_SCHEME}, so real test patients may include patients the "
              "model was trained on (results optimistic)", file=sys.stderr, flush=True)
    sites = SimulationSites(data=info.data, n_sites=info.sites, partition=info.partition,
                            state_root=run.sites, epsilon=info.epsilon, delta=info.delta,
                            data_seed=info.seed, device=info.device)
    return SimulatedSites(sites, info.sites)


def evaluate_existing_run(run: Path | Run, *, options: EvalOptions, audit: bool = True,
                          show_progress: bool = True) -> dict[str, Any]:
    run = run if isinstance(run, Run) else Run(run)
    if not run.has_final():
        raise FileNotFoundError(f"{run.root} has no checkpoints/final: the run did not finish "
                                "training (rerun `fedldm simulate` with the same --out to resume)")
    sites = simulated_sites(run)
    final = run.load_final()
    write_samples(run, final)
    if sites is None:
        return evaluate_run(run, final=final, options=options, show_progress=show_progress)
    run_id = audit_run_id(run.root)
    return evaluate_run(run, final=final, sites=sites,
                        audit=direct_audit(sites, final, run_id, show_progress) if audit
                        else None,
                        options=options, show_progress=show_progress, audit_run_id=run_id,
                        site_eval=direct_site_eval(sites, final, run_id, show_progress)
                        if options.at_sites else None)


def direct_audit(sites: SimulatedSites, final: FinalModel, run_id: str,
                 show_progress: bool = True) -> AuditFn:
    """The sites' audits by a direct call of the ClientApp's audit function (no Flower)."""

    def audit() -> list[dict[str, Any]]:
        from client.audit import site_audit
        from ldm_core.dp_random import privacy_rng_for

        out = []
        for k in range(sites.n_sites):
            site = sites.site(k)
            if show_progress:
                print(f"[evaluate] audit at {site.site_id} ({k + 1}/{sites.n_sites})",
                      flush=True)
            release = site_audit(site, final.cfg, final.ae, final.dm, final.scale_factor,
                                 run_id=run_id, rng=privacy_rng_for(None), seed=final.cfg.seed,
                                 data=sites.site_data(k, final.cfg))
            out.append({"site": site.site_id, **release})
        return out

    return audit


def direct_site_eval(sites: SimulatedSites, final: FinalModel, run_id: str,
                     show_progress: bool = True) -> SiteEvalFn:
    """The sites' evaluations by a direct call of the ClientApp's function (no Flower). The
    operator of a simulation runs every site, so asking for it is the sites' consent."""

    def site_eval(classifier: dict[str, Any], synthetic: Any) -> list[dict[str, Any]]:
        from client.site_eval import site_evaluate
        from ldm_core.dp_random import privacy_rng_for

        out: list[dict[str, Any]] = []
        for k in range(sites.n_sites):
            site = dataclasses.replace(sites.site(k), allow_evaluate=True)
            if show_progress:
                print(f"[evaluate] evaluation at {site.site_id} ({k + 1}/{sites.n_sites})",
                      flush=True)
            try:
                r = site_evaluate(site, final.cfg, classifier, synthetic, run_id=run_id,
                                  rng=privacy_rng_for(None), seed=final.cfg.seed,
                                  data=sites.site_data(k, final.cfg))
            except BudgetExceededError as err:
                out.append({"node": k, "error": f"site {site.site_id}: {err} (a simulation "
                            "reserves no evaluation in its plan)"})
                continue
            except Exception as err:  # noqa: BLE001 - one site's failure is reported, not fatal
                out.append({"node": k, "error": f"site {site.site_id}: "
                            f"{type(err).__name__}: {err}"})
                continue
            out.append({"site": site.site_id, "counts": list(r.values),
                        "noise_std": r.noise_std, "classes": r.n_classes, "bins": r.bins,
                        "epsilon": r.epsilon})
        return out

    return site_eval


def audit_run_id(run: Path) -> str:
    """Ledger run id (and diagnostics file name) of `fedldm evaluate RUN`'s audit."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(run).resolve().name).strip("-.") or "run"
    return f"evaluate-{name}"[:200]
