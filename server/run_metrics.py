"""Typed blocks of metrics.json, each with ONE JSON encoding (``to_json``/``from_json``).

metrics.json is the run's public record; its keys are a contract with the report, the data card,
the CLI summary and users' own scripts, so every encoder here writes exactly the keys earlier
versions wrote and every decoder accepts partial blocks (a crashed or unevaluated run has gaps,
and a gap must read "not measured", never crash). Non-finite floats are written as the strings
"inf"/"-inf"/"nan" by :func:`server.run_folder.write_json_atomic`; :func:`num` reads them back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ArmResult",
    "AuditSummary",
    "FederationMetrics",
    "FeatureSpaceScores",
    "Fidelity",
    "FIDELITY_HEADLINE",
    "LatentScale",
    "Reconstruction",
    "PrivacyBlock",
    "PrivacyRound",
    "Rejection",
    "RoundRecord",
    "SiteRound",
    "SiteAudit",
    "SitePrivacy",
    "SyntheticInfo",
    "Utility",
    "num",
]

NAN = float("nan")
# Fidelity values copied from the primary feature space to the top of the fidelity block.
FIDELITY_HEADLINE = ("fid", "kid", "precision", "recall", "density", "coverage")
_AUDIT_KEYS = ("mia_auc", "mia_tpr_at_1pct_fpr", "mia_fpr_at_threshold", "mia_noise_std",
               "memorized_fraction", "memorized_fraction_holdout")


def num(x: Any, default: float | None = NAN) -> float | None:
    """A number from metrics.json ("inf" strings included); `default` for missing or not a
    number (so a block written by an older or crashed run still decodes)."""
    if isinstance(x, bool) or x is None:
        return default
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return default
    return default


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class RoundRecord:
    """One aggregated training round (metrics.json `rounds`)."""

    phase: str
    round: int
    loss: float
    sites_ok: int = 0
    sites_ok: int = 0
    sites_failed: int = 0
    seconds: float = 0.0
    aggregation: str | None = None  # e.g. "trimmed-mean (...)": how the updates were combined

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RoundRecord:
        return cls(str(d["phase"]), int(d["round"]), float(num(d.get("loss"))),
                   int(d.get("sites_ok", 0)), int(d.get("sites_failed", 0)),
                   float(num(d.get("seconds"), 0.0)), d.get("aggregation"))

    def to_json(self) -> dict[str, Any]:
        return _drop_none({"phase": self.phase, "round": self.round, "loss": self.loss,
                           "sites_ok": self.sites_ok, "sites_failed": self.sites_failed,
                           "aggregation": self.aggregation, "seconds": self.seconds})


@dataclass(frozen=True)
class SiteRound:
    """One site's accepted reply in one round (metrics.json `training`): its DP loss release
    and the cumulative epsilon it reported, for the training curves."""

    phase: str
    round: int
    site: str
    loss: float
    epsilon: float

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SiteRound:
        return cls(str(d["phase"]), int(d["round"]), str(d["site"]), float(num(d.get("loss"))),
                   float(num(d.get("epsilon"))))

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "round": self.round, "site": self.site, "loss": self.loss,
                "epsilon": self.epsilon}


@dataclass(frozen=True)
class PrivacyRound:
    """A site's cumulative epsilon after a round (`privacy.rounds`, the epsilon figure)."""

    site: str
    phase: str
    round: int
    epsilon: float

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "phase": self.phase, "round": self.round,
                "epsilon": self.epsilon}


@dataclass(frozen=True)
class Rejection:
    """A reply the coordinator refused, or a site that never answered (`errors`)."""

    stage: str
    node: int
    reason: str

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Rejection:
        return cls(str(d.get("stage", "?")), int(d.get("node", -1)), str(d.get("reason", "?")))

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "node": self.node, "reason": self.reason}


@dataclass(frozen=True)
class LatentScale:
    """The pooled latent scale factor and how it was released (`latent_scale`)."""

    scale_factor: float
    released: str
    note: str | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> LatentScale | None:
        if not d or "scale_factor" not in d:
            return None
        return cls(float(num(d["scale_factor"])), str(d.get("released", "")), d.get("note"))

    def to_json(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor, "released": self.released, "note": self.note}


@dataclass(frozen=True)
class Reconstruction:
    """The global autoencoder on the sites' holdout patients (`reconstruction`): PSNR (dB) and
    SSIM from each site's DP release, pooled, with standard errors from the DP noise. A poor
    autoencoder caps everything downstream, so it is shown before TSTR."""

    psnr_db: float | None
    ssim: float | None
    patients: float  # noisy pooled holdout patient count
    psnr_se_db: float | None = None
    ssim_se: float | None = None
    released: str = ""
    sites: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Reconstruction | None:
        if not d or "patients" not in d:
            return None
        return cls(num(d.get("psnr_db"), None), num(d.get("ssim"), None),
                   float(num(d["patients"], 0.0)), num(d.get("psnr_se_db"), None),
                   num(d.get("ssim_se"), None), str(d.get("released", "")),
                   {str(k): dict(v) for k, v in (d.get("sites") or {}).items()
                    if isinstance(v, Mapping)})

    def to_json(self) -> dict[str, Any]:
        return {"psnr_db": self.psnr_db, "ssim": self.ssim, "patients": self.patients,
                "psnr_se_db": self.psnr_se_db, "ssim_se": self.ssim_se,
                "released": self.released, "sites": self.sites}


@dataclass(frozen=True)
class SitePrivacy:
    """One site's row of `privacy.sites`; a value the run never reported stays None (and is
    not written), so "not reported" and "zero" are never confused."""

    epsilon: float | None = None
    delta: float | None = None
    budget_epsilon: float | None = None
    epsilon_includes_audit: bool | None = None
    ledger: dict[str, Any] | None = None
    # Figures the coordinator refused to believe (over budget, spend going down, a changed
    # budget or delta): the report shows them and the DP verdict fails while any is listed.
    flags: tuple[str, ...] = ()
    # The epsilon includes the evaluation at the site (server.eval_sites).
    epsilon_includes_evaluation: bool | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SitePrivacy:
        flags = d.get("flags")
        return cls(num(d.get("epsilon"), None), num(d.get("delta"), None),
                   num(d.get("budget_epsilon"), None), d.get("epsilon_includes_audit"),
                   d.get("ledger"),
                   tuple(str(f) for f in flags) if isinstance(flags, list) else (),
                   d.get("epsilon_includes_evaluation"))

    def to_json(self) -> dict[str, Any]:
        return _drop_none({"epsilon": self.epsilon, "delta": self.delta,
                           "budget_epsilon": self.budget_epsilon,
                           "epsilon_includes_audit": self.epsilon_includes_audit,
                           "epsilon_includes_evaluation": self.epsilon_includes_evaluation,
                           "ledger": self.ledger, "flags": list(self.flags) or None})


@dataclass(frozen=True)
class SiteAudit:
    """One site's DP audit, turned into rates (`privacy.audit_sites[site]`)."""

    attacks: dict[str, dict[str, float]]
    best_attack: str
    near_copy_fraction: float = NAN
    near_copy_fraction_holdout: float = NAN
    noise_std: float = NAN
    records: int | None = None
    epsilon: float | None = None
    released: dict[str, float] | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SiteAudit:
        return cls({a: {k: float(num(v)) for k, v in (r or {}).items()}
                    for a, r in (d.get("attacks") or {}).items()},
                   str(d.get("best_attack", "")), float(num(d.get("near_copy_fraction"))),
                   float(num(d.get("near_copy_fraction_holdout"))),
                   float(num(d.get("noise_std"))),
                   None if d.get("records") is None else int(d["records"]),
                   num(d.get("epsilon"), None), d.get("released"))

    def to_json(self) -> dict[str, Any]:
        return _drop_none({"attacks": self.attacks, "best_attack": self.best_attack,
                           "near_copy_fraction": self.near_copy_fraction,
                           "near_copy_fraction_holdout": self.near_copy_fraction_holdout,
                           "noise_std": self.noise_std, "records": self.records,
                           "epsilon": self.epsilon, "released": self.released})


@dataclass(frozen=True)
class AuditSummary:
    """The sites' DP audit releases, summarised (flat keys of the `privacy` block).

    A value is None when it was not measured (or is not a number): the verdicts then say
    "not measured" instead of inventing one.
    """

    mia_auc: float | None = None
    mia_tpr_at_1pct_fpr: float | None = None
    mia_fpr_at_threshold: float | None = None
    mia_noise_std: float | None = None
    memorized_fraction: float | None = None
    memorized_fraction_holdout: float | None = None
    audit_attacks: list[str] | None = None
    audit_sites: dict[str, SiteAudit] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.mia_auc is not None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AuditSummary:
        values = {k: (float(d[k]) if isinstance(d.get(k), (int, float))
                      and not isinstance(d.get(k), bool) else None) for k in _AUDIT_KEYS}
        return cls(**values, audit_attacks=d.get("audit_attacks"),
                   audit_sites={str(s): SiteAudit.from_json(v)
                                for s, v in (d.get("audit_sites") or {}).items()})

    def to_json(self) -> dict[str, Any]:
        out = _drop_none({k: getattr(self, k) for k in _AUDIT_KEYS})
        if self.audit_attacks is not None:
            out["audit_attacks"] = list(self.audit_attacks)
        if self.audit_sites:
            out["audit_sites"] = {s: a.to_json() for s, a in self.audit_sites.items()}
        return out


@dataclass
class PrivacyBlock:
    """metrics.json `privacy`: per-site accounting, disclosures and the audit summary.

    Mutable on purpose: the coordinator fills it round by round and the evaluation adds the
    audit. Keys this version does not know are kept in `extra` and written back unchanged.
    """

    sites: dict[str, SitePrivacy] | None = None
    rounds: list[dict[str, Any]] | None = None
    private: bool | None = None
    summary: dict[str, Any] | None = None
    disclosures: list[str] | None = None
    unit: str | None = None
    randomness: str | None = None
    audit: AuditSummary = field(default_factory=AuditSummary)
    extra: dict[str, Any] = field(default_factory=dict)

    _OWN = ("sites", "rounds", "private", "summary", "disclosures", "unit", "randomness",
            "audit_attacks", "audit_sites", *_AUDIT_KEYS)

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> PrivacyBlock:
        d = d or {}
        sites = d.get("sites")
        return cls(sites=None if not isinstance(sites, Mapping) else
                   {str(s): SitePrivacy.from_json(v) for s, v in sites.items()
                    if isinstance(v, Mapping)},
                   rounds=None if d.get("rounds") is None else list(d["rounds"]),
                   private=d.get("private"),
                   summary=d.get("summary"), disclosures=d.get("disclosures"),
                   unit=d.get("unit"), randomness=d.get("randomness"),
                   audit=AuditSummary.from_json(d),
                   extra={k: v for k, v in d.items() if k not in cls._OWN})

    def to_json(self) -> dict[str, Any]:
        out = dict(self.extra)
        if self.sites is not None:
            out["sites"] = {s: v.to_json() for s, v in self.sites.items()}
        if self.rounds is not None:
            out["rounds"] = list(self.rounds)
        out.update(_drop_none({"private": self.private, "summary": self.summary,
                               "disclosures": self.disclosures, "unit": self.unit,
                               "randomness": self.randomness}))
        out.update(self.audit.to_json())
        return out

    def budget(self) -> float | None:
        """The smallest finite site budget (the line drawn on the epsilon figure)."""
        budgets = [s.budget_epsilon for s in (self.sites or {}).values()
                   if s.budget_epsilon is not None and math.isfinite(s.budget_epsilon)]
        return min(budgets) if budgets else None


@dataclass(frozen=True)
class ArmResult:
    """One utility arm (TRTR / TSTR / TRS): the seed ensemble's values and their spread."""

    auc: float = NAN
    auc_seed_mean: float | None = None
    auc_std: float | None = None
    auc_ci: list[float] | None = None
    acc: float | None = None
    acc_std: float | None = None
    acc_ci: list[float] | None = None

    _FIELDS = ("auc", "auc_seed_mean", "auc_std", "auc_ci", "acc", "acc_std", "acc_ci")


@dataclass(frozen=True)
class Utility:
    """metrics.json `utility` (ldm_core.evaluation.evaluate_utility plus `real_source`).

    The arms are written flat as ``<arm>_<field>`` keys (``tstr_auc``, ``trtr_auc_ci`` ...),
    the layout the report and users' scripts read.
    """

    arms: dict[str, ArmResult]
    ratio: float | None = None
    ratio_ci: list[float] | None = None
    per_class: dict[str, list[float]] | None = None
    per_seed: dict[str, list[dict[str, Any]]] | None = None
    n_train: int | None = None
    n_synthetic: int | None = None
    n_test: int | None = None
    n_test_patients: int | None = None
    n_boot_valid: int | None = None
    seeds: list[int] | None = None
    epochs: int | None = None
    real_source: str | None = None
    # Deployment evaluation (server.eval_sites): "sites" when measured from the sites' DP
    # releases, which sites answered, which refused, the pooled noise std, what TRTR was.
    measured_at: str | None = None
    sites: list[str] | None = None
    sites_missing: list[str] | None = None
    noise_std: float | None = None
    trtr_kind: str | None = None
    # Paired runs: Dice TSTR/TRTR of a segmenter (ldm_core.evaluation.segmentation), or
    # {"not_measured": why}.
    segmentation: dict[str, Any] | None = None

    _SCALARS = ("ratio", "ratio_ci", "per_class", "per_seed", "n_train", "n_synthetic",
                "n_test", "n_test_patients", "n_boot_valid", "seeds", "epochs", "real_source",
                "measured_at", "sites", "sites_missing", "noise_std", "trtr_kind",
                "segmentation")

    def arm(self, name: str) -> ArmResult:
        return self.arms.get(name, ArmResult())

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Utility | None:
        if not d:
            return None
        arms = {}
        for a in ("trtr", "tstr", "trs"):
            if f"{a}_auc" in d:
                arms[a] = ArmResult(**{f: d.get(f"{a}_{f}") for f in ArmResult._FIELDS})
        return cls(arms, **{k: d.get(k) for k in cls._SCALARS})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a, r in self.arms.items():
            out.update({f"{a}_{f}": getattr(r, f) for f in ArmResult._FIELDS
                        if getattr(r, f) is not None})
        out.update(_drop_none({k: getattr(self, k) for k in self._SCALARS}))
        return out


@dataclass(frozen=True)
class FeatureSpaceScores:
    """Real vs synthetic in one feature space (one entry of ldm_core's fidelity_report)."""

    values: dict[str, Any]

    def get(self, key: str, default: float = NAN) -> Any:
        return self.values.get(key, default)

    @property
    def precision(self) -> float:
        return float(num(self.values.get("precision")))

    @property
    def recall(self) -> float:
        return float(num(self.values.get("recall")))

    @property
    def real_split(self) -> dict[str, Any] | None:
        return self.values.get("real_split")


@dataclass(frozen=True)
class Fidelity:
    """metrics.json `fidelity`: per feature space, within-class diversity, and the primary
    space's headline values repeated at the top (the data card reads those)."""

    spaces: dict[str, FeatureSpaceScores]
    diversity: dict[str, dict[Any, float]] | None = None
    headline: dict[str, Any] = field(default_factory=dict)
    primary_space: str | None = None

    def verdict_space(self) -> str | None:
        """The space the verdicts read: ``classifier`` when measured, else the first one."""
        if not self.spaces:
            return None
        return "classifier" if "classifier" in self.spaces else next(iter(self.spaces))

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Fidelity | None:
        if not d:
            return None
        spaces = {k: FeatureSpaceScores(dict(v)) for k, v in d.items()
                  if k != "diversity" and isinstance(v, Mapping)}
        return cls(spaces, d.get("diversity"),
                   {k: d[k] for k in FIDELITY_HEADLINE if k in d}, d.get("primary_space"))

    @classmethod
    def from_report(cls, report: Mapping[str, Any], primary: str, note: str) -> Fidelity:
        """From ldm_core's fidelity_report, with `primary`'s headline values on top."""
        f = cls.from_json(report)
        assert f is not None
        headline = {k: f.spaces[primary].values[k] for k in FIDELITY_HEADLINE}
        return cls(f.spaces, f.diversity, headline, f"{primary}: {note}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: dict(v.values) for k, v in self.spaces.items()}
        if self.diversity is not None:
            out["diversity"] = self.diversity
        out.update(self.headline)
        if self.primary_space is not None:
            out["primary_space"] = self.primary_space
        return out


@dataclass(frozen=True)
class SyntheticInfo:
    """metrics.json `synthetic`: how the exported synthetic set was drawn."""

    n: int | None = None
    per_class: int | None = None
    ddim_steps: int | None = None
    guidance_scale: float | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> SyntheticInfo:
        d = d or {}
        return cls(d.get("n"), d.get("per_class"), d.get("ddim_steps"), d.get("guidance_scale"))

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "per_class": self.per_class, "ddim_steps": self.ddim_steps,
                "guidance_scale": self.guidance_scale}


@dataclass
class FederationMetrics:
    """What the coordinator writes to metrics.json while it trains: typed, filled round by
    round, and written at the run-folder boundary. Blocks the evaluation adds later (utility,
    fidelity, ...) and keys this version does not know ride along in `extra`, unchanged."""

    config: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)
    training: list[SiteRound] = field(default_factory=list)
    privacy: PrivacyBlock = field(default_factory=PrivacyBlock)
    errors: list[Rejection] = field(default_factory=list)
    latent_scale: LatentScale | None = None
    reconstruction: Reconstruction | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    _OWN = ("config", "rounds", "training", "privacy", "errors", "latent_scale",
            "reconstruction", "meta")

    def site(self, name: str) -> SitePrivacy:
        return (self.privacy.sites or {}).get(name, SitePrivacy())

    def set_site(self, name: str, entry: SitePrivacy) -> None:
        if self.privacy.sites is None:
            self.privacy.sites = {}
        self.privacy.sites[name] = entry

    def max_epsilon(self) -> float | None:
        eps = [s.epsilon for s in (self.privacy.sites or {}).values() if s.epsilon is not None]
        return max(eps) if eps else None

    def summarise_privacy(self) -> None:
        """`privacy.summary`: the largest spend and whether every site stayed in budget."""
        sites = (self.privacy.sites or {}).values()
        self.privacy.summary = {
            "max_epsilon": self.max_epsilon() or 0.0,
            "all_within_budget": all(
                (s.epsilon or 0.0) <= (math.inf if s.budget_epsilon is None
                                       else s.budget_epsilon) + 1e-9 for s in sites)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FederationMetrics:
        return cls(config=dict(d.get("config") or {}),
                   rounds=[RoundRecord.from_json(r) for r in d.get("rounds") or []],
                   training=[SiteRound.from_json(r) for r in d.get("training") or []],
                   privacy=PrivacyBlock.from_json(d.get("privacy")),
                   errors=[Rejection.from_json(e) for e in d.get("errors") or []
                           if isinstance(e, Mapping)],
                   latent_scale=LatentScale.from_json(d.get("latent_scale")),
                   reconstruction=Reconstruction.from_json(d.get("reconstruction")),
                   meta=dict(d.get("meta") or {}),
                   extra={k: v for k, v in d.items() if k not in cls._OWN})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"config": self.config,
                               "training": [t.to_json() for t in self.training],
                               "rounds": [r.to_json() for r in self.rounds],
                               "privacy": self.privacy.to_json(), "meta": self.meta}
        if self.errors:
            out["errors"] = [e.to_json() for e in self.errors]
        if self.latent_scale is not None:
            out["latent_scale"] = self.latent_scale.to_json()
        if self.reconstruction is not None:
            out["reconstruction"] = self.reconstruction.to_json()
        out.update(self.extra)
        return out
