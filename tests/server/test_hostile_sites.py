"""One hostile or buggy site of three, through the real Coordinator and ClientApp.

Every case tampers with the replies of node 103 (site-2) on an in-process grid (tests/common/
local_grid.py). For each, the run must finish, the global weights must stay within the honest
sites' values, no false privacy figure may reach metrics.json, and each tampered reply must be
rejected with exactly one bounded, escaped line in run.log.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common.packed import LAYOUT_KEY, pack, unpack
from common.protocol import LatentStatsReply, TrainReply
from ldm_core.config import RunConfig
from ldm_core.privacy import pooled_scale_factor
from server.report_sections import privacy_html, run_html
from server.report_verdicts import verdicts
from tests.common.federation import fast_accounting, make_federation

HOSTILE = 103  # node of site-2
HUGE = ("A" * 650_000 + "\n2026-01-01 00:00:00 ERROR forged coordinator line\n" + "B" * 650_000)
FORGED = "forged coordinator line"

# A tamper gets the reply content of one stage ("train" rounds of both phases, or "latent") and
# returns the replacement (a RecordDict or an Error), or None to leave that reply alone.
Fn = Callable[[str, RecordDict], "RecordDict | Error | None"]


def _copy(c: RecordDict, **records) -> RecordDict:
    out = {k: v for k, v in c.items()}
    for k, v in records.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return RecordDict(out)


def _metrics(c: RecordDict, drop: str | None = None, **values: float) -> RecordDict:
    m = {k: v for k, v in c["metrics"].items() if k != drop}
    m.update({k.replace("_", "-"): v for k, v in values.items()})
    return _copy(c, metrics=MetricRecord(m))


def _weights(c: RecordDict, f: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
             ) -> RecordDict:
    """The reply with its weights (the tensors, unpacked) rewritten by `f`, packed again."""
    return _copy(c, arrays=pack(ArrayRecord(f(unpack(c["arrays"]).to_torch_state_dict()))))


def _wire(c: RecordDict, f: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
          ) -> RecordDict:
    """The reply with its packed arrays (layout and flat data, as sent) rewritten by `f`."""
    return _copy(c, arrays=ArrayRecord(f(c["arrays"].to_torch_state_dict())))


def _layout(sd: dict[str, torch.Tensor], f: Callable[[list], list | bytes]
            ) -> dict[str, torch.Tensor]:
    """`sd` with its layout's entries (or the raw layout bytes) replaced by `f`'s."""
    out = f(json.loads(bytes(sd[LAYOUT_KEY].tolist())))
    raw = out if isinstance(out, bytes) else json.dumps(out).encode()
    return {**sd, LAYOUT_KEY: torch.tensor(list(raw), dtype=torch.uint8)}


def _first(sd: dict[str, torch.Tensor], f: Callable[[torch.Tensor], torch.Tensor]
           ) -> dict[str, torch.Tensor]:
    k = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    return {**sd, k: f(sd[k].clone())}


def _set0(v: torch.Tensor, x: float) -> torch.Tensor:
    v.view(-1)[0] = x
    return v


def train(f: Callable[[RecordDict], RecordDict | Error]) -> Fn:
    return lambda stage, c: f(c) if stage != "latent scale" else None


def dm(f: Callable[[RecordDict], RecordDict | Error]) -> Fn:
    return lambda stage, c: f(c) if stage.startswith("diffusion") else None


def latent(f: Callable[[RecordDict], RecordDict | Error]) -> Fn:
    return lambda stage, c: f(c) if stage == "latent scale" else None


def everywhere(f: Callable[[RecordDict], RecordDict | Error]) -> Fn:
    return lambda stage, c: f(c)


@dataclass(frozen=True)
class Case:
    name: str
    fn: Fn | None
    privacy_flag: bool = False  # the lie is about privacy figures: the site must be flagged


CASES = [
    Case("honest", None),
    Case("extra-metric-key", train(lambda c: _metrics(c, n_records=5000.0))),
    Case("extra-record", train(lambda c: _copy(c, debug=ConfigRecord({"x": "y"})))),
    Case("missing-metrics-record", train(lambda c: _copy(c, metrics=None))),
    Case("missing-site-record", train(lambda c: _copy(c, site=None))),
    Case("weights-under-another-name",
         train(lambda c: _copy(c, arrays=None, weights=c["arrays"]))),
    Case("diffusion-reply-without-has-autoencoder",
         dm(lambda c: _metrics(c, drop="has-autoencoder"))),
    Case("nan-loss", train(lambda c: _metrics(c, loss=math.nan))),
    Case("inf-loss", train(lambda c: _metrics(c, loss=math.inf))),
    Case("nan-weights", train(lambda c: _weights(c, lambda sd: _first(
        sd, lambda v: _set0(v, math.nan))))),
    Case("inf-weights", train(lambda c: _weights(c, lambda sd: _first(
        sd, lambda v: _set0(v, math.inf))))),
    Case("weights-x100", train(lambda c: _weights(c, lambda sd: {
        k: v * 100 if v.is_floating_point() else v for k, v in sd.items()}))),
    Case("weights-x1e6", train(lambda c: _weights(c, lambda sd: {
        k: v * 1e6 if v.is_floating_point() else v for k, v in sd.items()}))),
    Case("int64-weights", train(lambda c: _weights(c, lambda sd: {
        k: v.round().to(torch.int64) for k, v in sd.items()}))),
    Case("wrong-shape", train(lambda c: _weights(c, lambda sd: _first(
        sd, lambda v: v.reshape(-1)[:-1].clone())))),
    Case("missing-parameter", train(lambda c: _weights(c, lambda sd: dict(
        list(sd.items())[1:])))),
    Case("extra-parameter", train(lambda c: _weights(c, lambda sd: {
        **sd, "backdoor.weight": torch.ones(3)}))),
    Case("weights-not-packed", train(lambda c: _copy(c, arrays=unpack(c["arrays"])))),
    Case("layout-one-tensor-short", train(lambda c: _wire(c, lambda sd: _layout(
        sd, lambda e: e[:-1])))),
    Case("layout-a-shape-doubled", train(lambda c: _wire(c, lambda sd: _layout(
        sd, lambda e: [[e[0][0], e[0][1], [2, *e[0][2]]], *e[1:]])))),
    Case("layout-not-json", train(lambda c: _wire(c, lambda sd: _layout(
        sd, lambda e: b"\xff\x00[")))),
    Case("flat-data-one-value-short", train(lambda c: _wire(c, lambda sd: {
        k: v[:-1].clone() if k.endswith("float32") else v for k, v in sd.items()}))),
    Case("epsilon-above-budget",
         train(lambda c: _metrics(c, epsilon=c["metrics"]["budget-epsilon"] + 1.0)), True),
    Case("negative-epsilon", train(lambda c: _metrics(c, epsilon=-1.0)), True),
    Case("epsilon-lower-than-before", dm(lambda c: _metrics(c, epsilon=0.0)), True),
    Case("delta-changed-mid-run", dm(lambda c: _metrics(c, delta=1e-3)), True),
    Case("budget-changed-mid-run", dm(lambda c: _metrics(c, budget_epsilon=100.0)), True),
    Case("claims-another-sites-name",
         everywhere(lambda c: _copy(c, site=ConfigRecord({"site-id": "site-0"})))),
    Case("huge-metric-key-with-newline", train(lambda c: _metrics(c, **{HUGE: 1.0}))),
    Case("huge-error-reason-with-newline", train(lambda c: Error(code=4002, reason=HUGE))),
    Case("latent-second-moment-sum-1e12",
         latent(lambda c: _metrics(c, second_moment_sum=1e12))),
    Case("latent-negative-count", latent(lambda c: _metrics(c, count=-1e6))),
    Case("latent-recon-ssim-sum-1e12", latent(lambda c: _metrics(c, recon_ssim_sum=1e12))),
    Case("latent-epsilon-above-budget", latent(lambda c: _metrics(c, epsilon=1e3)), True),
]


class Hostile:
    """LocalGrid tamper: rewrites node 103's replies with `fn`, remembering every reply as the
    site sent it (the truth) and which stages were tampered."""

    def __init__(self, fn: Fn | None) -> None:
        self.fn = fn
        self.tampered: list[str] = []
        self.true_figures: dict[str, dict[str, set[float]]] = defaultdict(lambda: defaultdict(set))
        self.honest: dict[str, list[dict[str, torch.Tensor]]] = defaultdict(list)
        self.latent: dict[int, tuple[float, float]] = {}

    def __call__(self, node: int, reply: Message) -> Message:
        group = reply.metadata.group_id
        stage = ("latent scale" if group == "latent-stats"
                 else "{} round {}".format(*group.rsplit("-", 1)))
        if not reply.has_error():
            self._remember(node, stage, reply)
        if node != HOSTILE or self.fn is None or reply.has_error():
            return reply
        out = self.fn(stage, reply.content)
        if out is None:
            return reply
        self.tampered.append(stage)
        if isinstance(out, Error):
            reply.__dict__["_content"] = None
            reply.error = out
        else:
            reply.content = out
        return reply

    def _remember(self, node: int, stage: str, reply: Message) -> None:
        if reply.metadata.message_type == MessageType.TRAIN:
            r = TrainReply.from_record(reply.content)
            figs = self.true_figures[r.site_id]
            figs["epsilon"].add(r.epsilon)
            figs["delta"].add(r.delta)
            figs["budget_epsilon"].add(r.budget_epsilon)
            if node != HOSTILE:
                self.honest[stage.split()[0]].append(
                    {k: v.clone() for k, v in r.weights.to_torch_state_dict().items()})
        else:
            lr = LatentStatsReply.from_record(reply.content)
            self.true_figures[lr.site_id]["epsilon"].add(lr.epsilon)
            self.latent[node] = (lr.second_moment_sum, lr.count)


@pytest.fixture(scope="module", autouse=True)
def _memoised_accounting() -> Iterator[None]:
    with fast_accounting():
        yield


def _within(final: dict[str, torch.Tensor], honest: list[dict[str, torch.Tensor]]) -> None:
    assert len(honest) == 2
    for k, v in final.items():
        if not v.is_floating_point():
            continue
        stack = torch.stack([h[k].to(v.dtype) for h in honest])
        lo, hi = stack.min(0).values, stack.max(0).values
        tol = 1e-6 * (1 + stack.abs().max(0).values)
        assert bool(((v >= lo - tol) & (v <= hi + tol)).all()), k


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_hostile_site_of_three(case: Case, tmp_path: Path, demo_manifest: Path,
                                   tiny_cfg: RunConfig) -> None:
    hostile = Hostile(case.fn)
    coord = make_federation(tmp_path, demo_manifest, tiny_cfg, n_sites=3, partition="iid",
                            min_sites=2, tamper=hostile)
    coord.run()  # never aborts: two good sites remain

    assert coord.state["stage"] == "done"
    assert (case.fn is None) == (not hostile.tampered)
    # The global weights stay within the two honest sites' values, parameter by parameter.
    _within(coord.ae.state_dict(), hostile.honest["autoencoder"])
    _within(coord.dm.state_dict(), hostile.honest["diffusion"])

    # No false privacy figure: every figure in metrics.json is one the site really sent.
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for site, entry in saved["privacy"]["sites"].items():
        for key in ("epsilon", "delta", "budget_epsilon"):
            if key in entry:
                assert entry[key] in hostile.true_figures[site][key], (site, key, entry[key])
    for row in saved["privacy"]["rounds"]:
        assert row["epsilon"] in hostile.true_figures[row["site"]]["epsilon"], row
    flags = saved["privacy"]["sites"].get("site-2", {}).get("flags", [])
    assert bool(flags) == case.privacy_flag, flags
    assert not any("flags" in e for s, e in saved["privacy"]["sites"].items() if s != "site-2")

    # Exactly one rejection per tampered reply: one bounded, escaped line in run.log, one
    # metrics error; and nothing about the honest nodes.
    log = (tmp_path / "run" / "run.log").read_text()
    lines = log.splitlines()
    assert all(len(line) < 1000 for line in lines)
    assert not any(FORGED in line and "\\n" not in line for line in lines)
    for stage in set(hostile.tampered):
        hits = [ln for ln in lines if f"{stage}: " in ln and f"node {HOSTILE}" in ln]
        assert len(hits) == hostile.tampered.count(stage), (stage, hits)
    assert sum(f"node {HOSTILE}" in ln for ln in lines) == len(hostile.tampered)
    assert not any(("node 101" in ln or "node 102" in ln) and f"node {HOSTILE}" not in ln
                   for ln in lines)
    errors = saved.get("errors", [])
    assert [e["node"] for e in errors] == [HOSTILE] * len(hostile.tampered)
    assert all(len(e["reason"]) < 400 for e in errors)

    # The report shows every rejection and every refused figure; a refused figure fails the
    # DP verdict instead of being believed.
    shown = run_html(saved) + privacy_html(saved)
    assert ("Replies the coordinator rejected" in shown) == bool(errors)
    assert all(html.escape(e["reason"]) in shown for e in errors)
    assert all(html.escape(f) in shown for f in flags)
    dp = dict((a, st) for a, st, _ in verdicts(saved))["Formal privacy (DP)"]
    assert (dp == "FAIL") == case.privacy_flag, dp

    rounds = {(r["phase"], r["round"]): r for r in saved["rounds"]}
    for (phase, rnd), r in rounds.items():
        tampered = f"{phase} round {rnd}" in hostile.tampered
        assert r["sites_ok"] == (2 if tampered else 3)
        assert r["aggregation"].startswith("mean" if tampered else "trimmed-mean")
    if "latent scale" in hostile.tampered:  # the hostile release is not pooled
        honest = [v for n, v in hostile.latent.items() if n != HOSTILE]
        scale, _ = pooled_scale_factor(honest, clip=tiny_cfg.privacy.scale_clip)
        assert saved["latent_scale"]["scale_factor"] == pytest.approx(scale)
        assert len(saved["reconstruction"]["sites"]) == 2
