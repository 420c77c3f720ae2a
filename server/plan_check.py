"""Can a fresh site's budget hold the run's whole plan? Asked before any site spends.

Every site calibrates its noise for the whole run at its first round (client.tasks.plan_for);
a budget that cannot hold the plan makes every site refuse that round, with the reason only in
the sites' own logs. The plan depends on the configuration, the budget and what the site allows
(audits and evaluations are reserved only where allowed), never on data, so the coordinator can
compute it for a fresh site and refuse early. A site with earlier runs in its ledger has less
left; that the coordinator cannot know.
"""

from __future__ import annotations

from pathlib import Path

from client.site_config import SiteConfig
from client.tasks import plan_for
from ldm_core.config import RunConfig
from server.federation import FederationError

# Fixed releases five times noisier (the latent scale and the training-curve values, the audit)
# and no retry reserve: with the quick preset and audits allowed they spend epsilon 0.19 instead
# of 1.20, which a budget of epsilon 1 can hold. benchmarks/privacy_utility.py applies them to
# such budgets.
CHEAPER_RELEASES: dict[str, float | int] = {"privacy.scale_noise_multiplier": 100,
                                            "privacy.audit_noise_multiplier": 40,
                                            "privacy.retry_reserve_rounds": 0}
CHEAPER = "make the fixed releases cheaper (" + " ".join(
    f"--set {k}={v}" for k, v in CHEAPER_RELEASES.items()) + ")"


def _cheaper(cfg: RunConfig) -> str:
    """The share knob only helps a plan that trains the autoencoder; with 0 rounds (the quick
    presets) its share is the denoiser's already, and naming it would send the user nowhere."""
    if cfg.autoencoder.rounds == 0:
        return CHEAPER
    return f"{CHEAPER} and give the autoencoder a larger share (--set privacy.ae_share=0.3)"


def check_plan_fits(cfg: RunConfig, epsilon: float, delta: float, *, audit: bool,
                    evaluate: bool) -> None:
    """Raise FederationError naming the fix when a fresh site at (epsilon, delta) that allows
    `audit` / `evaluate` could not afford the run's plan."""
    site = SiteConfig(site_id="plan-check", data="-", state_dir=Path("-"), epsilon=epsilon,
                      delta=delta, allow_audit=audit, allow_evaluate=evaluate)
    try:
        plan_for(site, cfg, [])
    except (ValueError, RuntimeError) as err:
        raise FederationError(f"--epsilon {epsilon:g} cannot hold this run's plan: {err} Raise "
                              f"--epsilon, or {_cheaper(cfg)}") from err
