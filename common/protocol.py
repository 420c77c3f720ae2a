"""Every message that crosses the site boundary, declared once, with its record encoding.

Why one module: "what leaves a site" is the privacy promise, so it must be written down in one
place that both sides import, and nothing may be sent that is not declared here. Each reply field
carries a `Kind` that says why it is safe to hand to a coordinator that may be malicious:

- `DP`: a differentially private release, charged to the site's ledger before it was computed;
- `MODEL`: weights after DP-SGD (charged per round like `DP`);
- `PUBLIC`: fixed by the configuration or the site's own settings, independent of its records
  (for example the budget, or epsilon spent, which depends only on the configured plan).

`tests/common/test_protocol.py` records every reply of a whole simulation and fails on anything
undeclared, on image-shaped arrays, and on any `PUBLIC` value that differs between two sites that
differ only in how many images they hold. The README table "What leaves a site" is checked
against `reply_fields()`.

Decoding is strict (unknown or missing fields, wrong types, non-finite numbers raise
`ProtocolError`) because the other side may be buggy or hostile.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.packed import PackError, pack, unpack
from ldm_core.config import TRANSFER_ENCODINGS
from ldm_core.evaluation.attacks import AUDIT_RELEASE_KEYS
from ldm_core.phases import PHASES as _REGISTRY

# The phase names a train request may carry: exactly the registered phases (ldm_core.phases).
PHASES: tuple[str, ...] = tuple(_REGISTRY)


# The version of what a request means: its records, the models its weights load into (layer
# shapes AND the strides and norms shapes do not show), and how a site uses them. A site answers
# only requests of its own version, so a coordinator and a site on different fedldm releases
# fail with a reason instead of loading each other's weights into a model that means something
# else. Bump it with any such change; `tests/common/test_protocol_version.py` fingerprints the
# models and replies and goes red when they change under the same version.
# 2: the run config may name ae_init "public-generic", which a site of version 1 refuses as an
# unknown value (with only a generic error reason reaching the coordinator).
# 3: every ArrayRecord travels packed, one flat array per dtype plus its layout
# (common.packed), which a site of version 2 could not read.
PROTOCOL_VERSION = 3


def other_version_run(what: str, found: object) -> str | None:
    """Why a run folder written under another protocol version cannot be resumed (None: it
    was written under this one). Its checkpoints are networks of that version and the sites'
    stored replies answer that version's requests: neither may cross into this release."""
    if found == PROTOCOL_VERSION:
        return None
    shown = "before versions existed" if found is None else found
    return (f"{what} was written by fedldm protocol {shown}; this one speaks "
            f"{PROTOCOL_VERSION}: finish that run with the release that started it, or start a "
            "new run (a new --out folder)")


class ProtocolError(ValueError):
    """A message does not match its declaration; the text says which field and why."""


class Kind(enum.Enum):
    DP = "DP release, charged to the site's ledger"
    MODEL = "weights after DP-SGD, charged to the site's ledger"
    PUBLIC = "fixed by configuration or site settings, independent of the site's records"


@dataclass(frozen=True)
class FieldSpec:
    record: str
    name: str
    kind: Kind
    doc: str


class ProtocolVersionError(ProtocolError):
    """A request of another protocol version (another fedldm release at the coordinator)."""


# Reply error codes and their fixed, data-independent reasons. Details stay in site.log.
ERR_BUDGET = 4001
ERR_SITE = 4002
ERR_REFUSED = 4003
ERR_VERSION = 4004
ERROR_REASONS = {
    ERR_BUDGET: "privacy budget exhausted: this round would exceed the site's epsilon budget",
    ERR_SITE: "the site failed; details are in site.log in the site's state directory",
    ERR_REFUSED: "the site does not allow this request (its own settings)",
    ERR_VERSION: (f"this site runs fedldm protocol {PROTOCOL_VERSION} and the request is of "
                  "another version: install the same fedldm release at the coordinator and "
                  "at every site"),
}

# ------------------------------------------------------------------------------------ helpers


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
    x = float(value)
    if math.isnan(x):
        raise ProtocolError(f"{where}: NaN")
    return x


def _exact_keys(record: Any, expected: set[str], where: str) -> None:
    keys = set(record.keys())
    if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        raise ProtocolError(f"{where}: undeclared fields {extra}, missing fields {missing}")


def _get(content: RecordDict, name: str, kind: type, where: str) -> Any:
    if name not in content:
        raise ProtocolError(f"{where}: record {name!r} is missing")
    rec = content[name]
    if not isinstance(rec, kind):
        raise ProtocolError(f"{where}: record {name!r} is a {type(rec).__name__}, expected "
                            f"{kind.__name__}")
    return rec


def _arrays(content: RecordDict, name: str, where: str) -> ArrayRecord:
    """An ArrayRecord as the sender's `to_record` packed it (common.packed), unpacked."""
    try:
        return unpack(_get(content, name, ArrayRecord, where))
    except PackError as err:
        raise ProtocolError(f"{where}: record {name!r}: {err}") from err


def _records(content: RecordDict, allowed: set[str], where: str) -> None:
    extra = sorted(set(content.keys()) - allowed)
    if extra:
        raise ProtocolError(f"{where}: undeclared records {extra}")


# ------------------------------------------------------------------------------------ requests


def check_version(content: RecordDict, where: str) -> None:
    """Refuse a request of another protocol version before anything else in it is read, so a
    newer coordinator's new phase, task or record is answered with the version reason rather
    than a confusing 'unknown' one."""
    conf = content.get("config") if isinstance(content, RecordDict) else None
    if not isinstance(conf, ConfigRecord):
        raise ProtocolError(f"{where}: no config record")
    version = conf.get("protocol")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not 1.0, not True
        sent = "none (a fedldm release older than protocol 1)" if version is None \
            else repr(version)[:40]
        raise ProtocolVersionError(f"{where}: protocol version {sent}, this site speaks "
                                   f"{PROTOCOL_VERSION}")


@dataclass(frozen=True)
class RunRef:
    """What every request carries: the run's config (JSON), its name, and the seed.

    The seed drives only what is not privacy-relevant (timesteps, initialisation, evaluation);
    a site never derives privacy randomness from it (ldm_core.dp_random).
    """

    run_config: str
    run_name: str
    seed: int

    def items(self) -> dict[str, Any]:
        return {"run-config": self.run_config, "run-name": self.run_name, "seed": self.seed,
                "protocol": PROTOCOL_VERSION}

    @staticmethod
    def parse(conf: ConfigRecord, where: str) -> RunRef:
        try:
            json.loads(str(conf["run-config"]))
            return RunRef(str(conf["run-config"]), str(conf["run-name"]), int(conf["seed"]))
        except (KeyError, ValueError, TypeError) as err:
            raise ProtocolError(f"{where}: bad run-config/run-name/seed ({err})") from err


@dataclass(frozen=True)
class TrainRequest:
    run: RunRef
    phase: str
    server_round: int
    weights: ArrayRecord
    autoencoder: ArrayRecord | None = None
    scale_factor: float | None = None
    # A site-conditional model's slot for this site (the coordinator assigns it; not private).
    site_slot: int | None = None

    def to_record(self) -> RecordDict:
        conf = {**self.run.items(), "phase": self.phase, "server-round": self.server_round}
        if self.scale_factor is not None:
            conf["scale-factor"] = float(self.scale_factor)
        if self.site_slot is not None:
            conf["site-slot"] = int(self.site_slot)
        rec: dict[str, Any] = {"arrays": pack(self.weights), "config": ConfigRecord(conf)}
        if self.autoencoder is not None:
            rec["autoencoder"] = pack(self.autoencoder)
        return RecordDict(rec)

    @staticmethod
    def from_record(content: RecordDict) -> TrainRequest:
        where = "train request"
        check_version(content, where)
        _records(content, {"arrays", "config", "autoencoder"}, where)
        conf = _get(content, "config", ConfigRecord, where)
        phase = str(conf.get("phase", ""))
        if phase not in PHASES:
            raise ProtocolError(f"{where}: unknown phase {phase!r}")
        scale = conf.get("scale-factor")
        slot = conf.get("site-slot")
        if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int)
                                 or slot < 0):
            raise ProtocolError(f"{where}: site-slot must be an integer >= 0, got {slot!r}")
        return TrainRequest(
            run=RunRef.parse(conf, where), phase=phase, server_round=int(conf["server-round"]),
            weights=_arrays(content, "arrays", where),
            autoencoder=(_arrays(content, "autoencoder", where)
                         if "autoencoder" in content else None),
            scale_factor=None if scale is None else _finite(scale, f"{where}: scale-factor"),
            site_slot=slot)


@dataclass(frozen=True)
class LatentStatsRequest:
    run: RunRef
    autoencoder: ArrayRecord

    def to_record(self) -> RecordDict:
        return RecordDict({"autoencoder": pack(self.autoencoder), "config": ConfigRecord(
            {**self.run.items(), "task": "latent-stats"})})

    @staticmethod
    def from_record(content: RecordDict) -> LatentStatsRequest:
        where = "latent-stats request"
        check_version(content, where)
        _records(content, {"autoencoder", "config"}, where)
        conf = _get(content, "config", ConfigRecord, where)
        return LatentStatsRequest(RunRef.parse(conf, where),
                                  _arrays(content, "autoencoder", where))


@dataclass(frozen=True)
class AuditRequest:
    """The final model only: the site draws its own samples; the coordinator sends no images."""

    run: RunRef
    denoiser: ArrayRecord
    autoencoder: ArrayRecord
    scale_factor: float

    def to_record(self) -> RecordDict:
        return RecordDict({
            "arrays": pack(self.denoiser), "autoencoder": pack(self.autoencoder),
            "config": ConfigRecord({**self.run.items(), "task": "audit",
                                    "scale-factor": float(self.scale_factor)})})

    @staticmethod
    def from_record(content: RecordDict) -> AuditRequest:
        where = "audit request"
        check_version(content, where)
        _records(content, {"arrays", "autoencoder", "config"}, where)
        conf = _get(content, "config", ConfigRecord, where)
        return AuditRequest(RunRef.parse(conf, where), _arrays(content, "arrays", where),
                            _arrays(content, "autoencoder", where),
                            _finite(conf.get("scale-factor"), f"{where}: scale-factor"))


# The most synthetic images an evaluation request may carry: the site computes their pairwise
# distances (k-NN radii), so an unbounded set would be a memory attack on the site.
MAX_EVAL_SYNTHETIC = 5000


@dataclass(frozen=True)
class EvaluateRequest:
    """The coordinator's synthetic-trained classifier and the synthetic images (both
    post-processing of DP outputs): the site scores them on its own test patients."""

    run: RunRef
    classifier: ArrayRecord
    synthetic: ArrayRecord

    def to_record(self) -> RecordDict:
        return RecordDict({"arrays": pack(self.classifier), "synthetic": pack(self.synthetic),
                           "config": ConfigRecord({**self.run.items(), "task": "evaluate"})})

    @staticmethod
    def from_record(content: RecordDict) -> EvaluateRequest:
        where = "evaluate request"
        check_version(content, where)
        _records(content, {"arrays", "synthetic", "config"}, where)
        conf = _get(content, "config", ConfigRecord, where)
        syn = _arrays(content, "synthetic", where)
        if set(syn.keys()) != {"images"}:
            raise ProtocolError(f"{where}: the synthetic record must hold exactly 'images'")
        return EvaluateRequest(RunRef.parse(conf, where),
                               _arrays(content, "arrays", where), syn)

    def synthetic_images(self) -> torch.Tensor:
        """The synthetic images ``[N, 1, H, W]`` (volumes ``[N, 1, D, H, W]``), checked (finite,
        4-D or 5-D); the site checks the size against the run's grid."""
        x = self.synthetic.to_torch_state_dict()["images"]
        if x.ndim not in (4, 5) or x.shape[1] != 1 or not x.is_floating_point():
            raise ProtocolError(f"evaluate request: synthetic images must be float [N, 1, H, W]"
                                f" or [N, 1, D, H, W], got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] > MAX_EVAL_SYNTHETIC:
            raise ProtocolError(f"evaluate request: {x.shape[0]} synthetic images, at most "
                                f"{MAX_EVAL_SYNTHETIC}")
        if not torch.isfinite(x).all():
            raise ProtocolError("evaluate request: non-finite synthetic pixels")
        return x.float()


def query_task(content: RecordDict) -> str:
    """Which query a QUERY message is ("latent-stats", "audit" or "evaluate")."""
    check_version(content, "query")
    conf = _get(content, "config", ConfigRecord, "query")
    task = str(conf.get("task", ""))
    if task not in ("latent-stats", "audit", "evaluate"):
        raise ProtocolError(f"query: unknown task {task!r}")
    return task


# ------------------------------------------------------------------------ update encoding
# How a site's trained weights travel (RunConfig.aggregation.transfer). "float16-delta" sends the
# difference from the global weights the site received, in half precision: half the bytes, and
# the rounding error is relative to the round's change, not to the weight. Rounding the weights
# themselves to float16 would lose every change smaller than half a float16 step of the weight
# (about 2.4e-4 for a weight near 1), which is a typical DP-SGD round's change. A change under
# 6e-5 falls in float16's subnormal range and keeps an absolute precision of 3e-8.


def encode_update(update: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                  encoding: str) -> dict[str, torch.Tensor]:
    """The arrays a site puts in its train reply. Non-floating buffers travel as they are."""
    if encoding == "float32":
        return update
    if encoding not in TRANSFER_ENCODINGS[1:]:
        raise ProtocolError(f"unknown transfer encoding {encoding!r}; known: "
                            f"{list(TRANSFER_ENCODINGS)}")
    return {k: (v.float() - sent[k].float()).to(torch.float16) if v.is_floating_point() else v
            for k, v in update.items()}


def decode_update(arrays: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                  encoding: str) -> dict[str, torch.Tensor]:
    """The weights a reply's arrays stand for, given the global weights that were sent.

    Strict: every floating array must be in the declared dtype (float16 differences, or the
    global weights' own dtype with "float32"): a reply that does not follow the run's encoding
    is refused, not silently accepted. Names and shapes are checked afterwards,
    on the decoded weights (server.aggregate.check_update).
    """
    if encoding == "float32":
        for k, v in arrays.items():
            ref = sent.get(k)
            if (ref is not None and v.is_floating_point() and ref.is_floating_point()
                    and v.dtype != ref.dtype):
                raise ProtocolError(f"train reply: {k} has dtype {v.dtype}; the run's transfer "
                                    f"'float32' sends the weights as {ref.dtype}")
        return arrays
    if encoding != "float16-delta":
        raise ProtocolError(f"unknown transfer encoding {encoding!r}")
    out: dict[str, torch.Tensor] = {}
    for k, v in arrays.items():
        ref = sent.get(k)
        if ref is None or not v.is_floating_point() or not ref.is_floating_point():
            out[k] = v
            continue
        if v.dtype != torch.float16:
            raise ProtocolError(f"train reply: {k} has dtype {v.dtype}; the run's transfer "
                                "'float16-delta' sends float16 differences")
        if tuple(v.shape) != tuple(ref.shape):
            out[k] = v  # check_update names the wrong shape
            continue
        out[k] = (ref.float() + v.float()).to(ref.dtype)
    return out


# ------------------------------------------------------------------------------------ replies

TRAIN_REPLY_FIELDS = (
    FieldSpec("arrays", "*", Kind.MODEL, "the phase's weights after local DP-SGD (float32), or "
              "their difference from the global weights sent (float16, with aggregation."
              "transfer 'float16-delta')"),
    FieldSpec("metrics", "loss", Kind.DP,
              "mean per-patient training loss (clipped), one Gaussian release per round"),
    FieldSpec("metrics", "epsilon", Kind.PUBLIC,
              "cumulative epsilon of the site's ledger; a function of the configured plans only"),
    FieldSpec("metrics", "budget-epsilon", Kind.PUBLIC, "the site's own budget"),
    FieldSpec("metrics", "delta", Kind.PUBLIC, "the site's delta"),
    FieldSpec("metrics", "has-autoencoder", Kind.PUBLIC,
              "1 once the site holds the frozen autoencoder (so it need not be re-sent)"),
    FieldSpec("site", "site-id", Kind.PUBLIC, "the site's configured name"),
)
LATENT_REPLY_FIELDS = (
    FieldSpec("metrics", "second-moment-sum", Kind.DP,
              "noisy sum of clipped per-patient latent second moments"),
    FieldSpec("metrics", "count", Kind.DP, "noisy patient count (same Gaussian release)"),
    FieldSpec("metrics", "recon-psnr-sum", Kind.DP,
              "noisy sum of holdout patients' clipped autoencoder reconstruction PSNR / 50 dB "
              "(a second Gaussian release, charged on its own)"),
    FieldSpec("metrics", "recon-ssim-sum", Kind.DP,
              "noisy sum of holdout patients' clipped reconstruction SSIM (same release)"),
    FieldSpec("metrics", "recon-count", Kind.DP,
              "noisy holdout patient count (same release as the reconstruction sums)"),
    FieldSpec("metrics", "epsilon", Kind.PUBLIC, "cumulative epsilon after the releases"),
    FieldSpec("site", "site-id", Kind.PUBLIC, "the site's configured name"),
)
_AUDIT_DOCS = {
    "auc": "attack AUC statistic over (member, non-member) pairs, normalised by the public m",
    "tpr": "fraction of members scoring below a threshold set on the site's own samples",
    "fpr": "fraction of non-members below that threshold",
    "near_copy_fraction": "members with a near copy among the site's samples (ratio test), / m",
    "near_copy_fraction_holdout": "the same for non-members: the chance reference",
    "members_fraction": "members scored / m (to renormalise when a split is smaller than m)",
    "nonmembers_fraction": "non-members scored / m",
    "records": "m, the audit size from the run configuration",
    "noise_std": "std of the noise on each fraction (from the noise multiplier and m)",
    "epsilon": "cumulative epsilon after the audit's charge",
}
_AUDIT_PUBLIC = ("records", "noise_std", "epsilon")
AUDIT_REPLY_FIELDS = tuple(
    FieldSpec("audit", key, Kind.PUBLIC if key in _AUDIT_PUBLIC else Kind.DP,
              _AUDIT_DOCS[key.rsplit(".", 1)[-1]]
              + ("" if key in _AUDIT_PUBLIC else " (one Gaussian release for all)"))
    for key in AUDIT_RELEASE_KEYS
) + (FieldSpec("site", "site-id", Kind.PUBLIC, "the site's configured name"),)


EVALUATE_REPLY_FIELDS = (
    FieldSpec("evaluation", "counts", Kind.DP,
              "noisy counts of the site's test patients: per classifier (synthetic-trained, "
              "site-trained with DP-SGD) score histograms per true class and a confusion "
              "matrix, then per class the patients' fraction inside the synthetic manifold "
              "(one Gaussian release; layout in ldm_core.evaluation.site_eval)"),
    FieldSpec("evaluation", "noise-std", Kind.PUBLIC,
              "std of the noise on each count (noise multiplier x sensitivity)"),
    FieldSpec("evaluation", "classes", Kind.PUBLIC, "the run's number of classes (layout)"),
    FieldSpec("evaluation", "bins", Kind.PUBLIC, "score histogram bins (layout)"),
    FieldSpec("evaluation", "epsilon", Kind.PUBLIC, "cumulative epsilon after the charge"),
    FieldSpec("site", "site-id", Kind.PUBLIC, "the site's configured name"),
)


def reply_fields() -> dict[str, tuple[FieldSpec, ...]]:
    """Every reply field by message, for docs and the protocol test."""
    return {"train": TRAIN_REPLY_FIELDS, "latent-stats": LATENT_REPLY_FIELDS,
            "audit": AUDIT_REPLY_FIELDS, "evaluate": EVALUATE_REPLY_FIELDS}


def _names(fields: tuple[FieldSpec, ...], record: str) -> set[str]:
    return {f.name for f in fields if f.record == record}


def _site(content: RecordDict, where: str) -> str:
    rec = _get(content, "site", ConfigRecord, where)
    _exact_keys(rec, {"site-id"}, f"{where}: site")
    site = str(rec["site-id"])
    if not site or len(site) > 64 or not site.replace("-", "").replace("_", "").isalnum():
        raise ProtocolError(f"{where}: site-id must be 1-64 letters, digits, '-' or '_'")
    return site


@dataclass(frozen=True)
class TrainReply:
    site_id: str
    weights: ArrayRecord
    loss: float
    epsilon: float
    budget_epsilon: float
    delta: float
    has_autoencoder: bool

    def to_record(self) -> RecordDict:
        return RecordDict({
            "arrays": pack(self.weights),
            "metrics": MetricRecord({"loss": float(self.loss), "epsilon": float(self.epsilon),
                                     "budget-epsilon": float(self.budget_epsilon),
                                     "delta": float(self.delta),
                                     "has-autoencoder": int(self.has_autoencoder)}),
            "site": ConfigRecord({"site-id": self.site_id})})

    @staticmethod
    def from_record(content: RecordDict) -> TrainReply:
        where = "train reply"
        _records(content, {"arrays", "metrics", "site"}, where)
        m = _get(content, "metrics", MetricRecord, where)
        _exact_keys(m, _names(TRAIN_REPLY_FIELDS, "metrics"), f"{where}: metrics")
        eps = _finite(m["epsilon"], f"{where}: epsilon")
        delta = _finite(m["delta"], f"{where}: delta")
        if eps < 0 or not 0 < delta < 1:
            raise ProtocolError(f"{where}: epsilon {eps} or delta {delta} out of range")
        flag = m["has-autoencoder"]
        if flag not in (0, 1):
            raise ProtocolError(f"{where}: has-autoencoder must be 0 or 1")
        return TrainReply(site_id=_site(content, where),
                          weights=_arrays(content, "arrays", where),
                          loss=_finite(m["loss"], f"{where}: loss"), epsilon=eps,
                          budget_epsilon=_finite(m["budget-epsilon"], f"{where}: budget-epsilon"),
                          delta=delta, has_autoencoder=bool(flag))


@dataclass(frozen=True)
class LatentStatsReply:
    site_id: str
    second_moment_sum: float
    count: float
    epsilon: float
    recon_psnr_sum: float
    recon_ssim_sum: float
    recon_count: float

    def to_record(self) -> RecordDict:
        return RecordDict({
            "metrics": MetricRecord({"second-moment-sum": float(self.second_moment_sum),
                                     "count": float(self.count), "epsilon": float(self.epsilon),
                                     "recon-psnr-sum": float(self.recon_psnr_sum),
                                     "recon-ssim-sum": float(self.recon_ssim_sum),
                                     "recon-count": float(self.recon_count)}),
            "site": ConfigRecord({"site-id": self.site_id})})

    @staticmethod
    def from_record(content: RecordDict) -> LatentStatsReply:
        where = "latent-stats reply"
        _records(content, {"metrics", "site"}, where)
        m = _get(content, "metrics", MetricRecord, where)
        _exact_keys(m, _names(LATENT_REPLY_FIELDS, "metrics"), f"{where}: metrics")
        vals = {k: _finite(m[k], f"{where}: {k}") for k in m}
        if any(math.isinf(v) for k, v in vals.items() if k != "epsilon"):
            raise ProtocolError(f"{where}: infinite statistic")
        return LatentStatsReply(_site(content, where), vals["second-moment-sum"], vals["count"],
                                vals["epsilon"], vals["recon-psnr-sum"], vals["recon-ssim-sum"],
                                vals["recon-count"])


@dataclass(frozen=True)
class AuditReply:
    site_id: str
    values: dict[str, float]

    def to_record(self) -> RecordDict:
        return RecordDict({"audit": MetricRecord({k: float(v) for k, v in self.values.items()}),
                           "site": ConfigRecord({"site-id": self.site_id})})

    @staticmethod
    def from_record(content: RecordDict) -> AuditReply:
        where = "audit reply"
        _records(content, {"audit", "site"}, where)
        m = _get(content, "audit", MetricRecord, where)
        _exact_keys(m, set(AUDIT_RELEASE_KEYS), f"{where}: audit")
        return AuditReply(_site(content, where),
                          {k: _finite(m[k], f"{where}: {k}") for k in AUDIT_RELEASE_KEYS})


@dataclass(frozen=True)
class EvaluateReply:
    site_id: str
    counts: tuple[float, ...]
    noise_std: float
    classes: int
    bins: int
    epsilon: float

    def to_record(self) -> RecordDict:
        return RecordDict({
            "evaluation": MetricRecord({"counts": [float(v) for v in self.counts],
                                        "noise-std": float(self.noise_std),
                                        "classes": int(self.classes), "bins": int(self.bins),
                                        "epsilon": float(self.epsilon)}),
            "site": ConfigRecord({"site-id": self.site_id})})

    @staticmethod
    def from_record(content: RecordDict) -> EvaluateReply:
        where = "evaluate reply"
        _records(content, {"evaluation", "site"}, where)
        m = _get(content, "evaluation", MetricRecord, where)
        _exact_keys(m, _names(EVALUATE_REPLY_FIELDS, "evaluation"), f"{where}: evaluation")
        counts = m["counts"]
        if not isinstance(counts, list):
            raise ProtocolError(f"{where}: counts must be a list of numbers")
        values = tuple(_finite(v, f"{where}: counts") for v in counts)
        if any(math.isinf(v) for v in values):
            raise ProtocolError(f"{where}: infinite count")
        classes, bins = m["classes"], m["bins"]
        if not (isinstance(classes, int) and isinstance(bins, int) and classes >= 2
                and bins >= 2):
            raise ProtocolError(f"{where}: classes and bins must be integers >= 2")
        std = _finite(m["noise-std"], f"{where}: noise-std")
        if std < 0 or math.isinf(std):
            raise ProtocolError(f"{where}: noise-std must be finite and >= 0")
        return EvaluateReply(_site(content, where), values, std, classes, bins,
                             _finite(m["epsilon"], f"{where}: epsilon"))
