"""Tests for client.audit.site_audit: the order of refusal / charge / data access, the exact
shape of the DP release, where its randomness comes from, the site-local diagnostics, and that
the shipped attacks flag a deliberately memorising model (and not an untrained one).

Models use the tiny preset on 16 px images; the planted leak trains ~15 s on one core.
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from client import tasks
from client.audit import diagnostics_path, site_audit
from client.ledger import BudgetExceededError, PrivacyLedger
from client.site_config import SiteConfig
from ldm_core.config import RunConfig, build_config
from ldm_core.data import ImageSet, SiteData
from ldm_core.dp_random import PrivacyRng
from ldm_core.evaluation.attacks import ATTACKS, AUDIT_RELEASE_KEYS, audit_sensitivity
from ldm_core.losses import autoencoder_loss, diffusion_loss
from ldm_core.models import make_autoencoder, make_denoiser, make_train_scheduler
from ldm_core.phantoms import render_demo

AUDIT = {"privacy.audit_records": 16, "privacy.audit_samples": 32}


# ------------------------------------------------------------------------------- helpers
def _cfg(class_names: tuple[str, ...], **overrides: float) -> RunConfig:
    return build_config(preset="tiny", image_size=16, class_names=class_names, epsilon=8.0,
                        device="cpu", overrides={**AUDIT, **overrides})


def _site(tmp_path: Path, data: str = "in-memory", *, epsilon: float = 8.0,
          allow_audit: bool = True, name: str = "site-0", enrol: bool = True,
          allow_masks: bool = False) -> SiteConfig:
    site = SiteConfig(site_id=name, data=data, state_dir=tmp_path / name, epsilon=epsilon,
                      delta=1e-5, partition="all", n_sites=1, device="cpu",
                      allow_audit=allow_audit, allow_masks=allow_masks)
    site.state_dir.mkdir(parents=True, exist_ok=True)
    if enrol and hasattr(PrivacyLedger, "create"):
        PrivacyLedger.create(site.ledger_path, budget_epsilon=epsilon, delta=1e-5,
                             site_id=name)
    return site


def _image_set(x: torch.Tensor, y: torch.Tensor) -> ImageSet:
    return ImageSet(x.contiguous(), y.contiguous(), tuple(f"p{i}" for i in range(x.shape[0])))


def _site_data(x: torch.Tensor, y: torch.Tensor, names: tuple[str, ...], n_train: int,
               n_holdout: int) -> SiteData:
    tr, ho = slice(0, n_train), slice(n_train, n_train + n_holdout)
    te = slice(n_train + n_holdout, n_train + n_holdout + 4)
    return SiteData("site-0", names, _image_set(x[tr], y[tr]), _image_set(x[ho], y[ho]),
                    _image_set(x[te], y[te]), has_patient_ids=True)


@pytest.fixture(scope="module")
def phantoms() -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    imgs, labels, _, _, names = render_demo(n_patients=100, slices_per_patient=1, n_sites=1,
                                            image_size=16, seed=3)
    x = torch.from_numpy(imgs).float().div(127.5).sub(1.0).unsqueeze(1)
    return x, torch.from_numpy(labels).long(), tuple(names)


@pytest.fixture
def in_memory(monkeypatch: pytest.MonkeyPatch, phantoms: tuple) -> dict[str, SiteData]:
    """`load_data` returns a SiteData held here, keyed by site id (sizes set per test)."""
    x, y, names = phantoms
    table = {"site-0": _site_data(x, y, names, 40, 40)}
    monkeypatch.setattr(tasks, "load_data", lambda site, cfg: table[site.site_id])
    monkeypatch.setattr(tasks, "check_data_kind", lambda *a: None)  # no files
    return table


def _untrained(cfg: RunConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return make_autoencoder(cfg.model), make_denoiser(cfg.model)


def _audit(site: SiteConfig, cfg: RunConfig, *, rng: PrivacyRng | None = None,
           run_id: str = "audit-test") -> dict[str, float]:
    ae, dm = _untrained(cfg)
    return site_audit(site, cfg, ae, dm, 1.0, run_id=run_id,
                      rng=rng or PrivacyRng.secure(), seed=0)


# ------------------------------------------------------------------------------- release shape
@pytest.mark.parametrize("mask_channels", [0, 1])
def test_release_has_exactly_the_declared_keys_and_charges_the_ledger(
        tmp_path: Path, demo_manifest: Path, class_names: tuple[str, ...],
        mask_channels: int) -> None:
    """Also for a paired model, whose records are scored with their masks."""
    cfg = _cfg(class_names, **{"model.mask_channels": mask_channels})
    # the real loader on the demo data
    site = _site(tmp_path, str(demo_manifest), allow_masks=mask_channels > 0)
    out = _audit(site, cfg)
    assert tuple(out) == AUDIT_RELEASE_KEYS
    assert all(type(v) is float and math.isfinite(v) for v in out.values())
    assert out["records"] == 16.0
    sigma = cfg.privacy.audit_noise_multiplier
    assert out["noise_std"] == pytest.approx(sigma * audit_sensitivity() / 16)
    entries = PrivacyLedger.open(site.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                 site_id=site.site_id).entries()
    audit = [e for e in entries if e["phase"] == "audit"]
    assert len(audit) == 1 and audit[0]["run_id"] == "audit-test"
    assert audit[0]["noise_multiplier"] == sigma and audit[0]["sample_rate"] == 1.0
    assert audit[0]["steps"] == 1
    assert out["epsilon"] == pytest.approx(audit[0]["epsilon_after"])
    again = _audit(site, cfg, run_id="audit-again")  # same records, same model: fresh noise
    assert again["members_fraction"] != out["members_fraction"]


def test_a_record_whose_score_overflows_gets_a_release_not_an_error(
        tmp_path: Path, demo_manifest: Path, class_names: tuple[str, ...],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A crafted model that makes one record's score NaN must not turn the audit into an error
    reply (an unnoised bit about that record)."""
    import client.audit as audit_mod

    real = audit_mod.autoencoder_scores
    calls: list[int] = []

    def one_nan(ae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = real(ae, x)
        if not calls:  # the first set scored is the members (private records)
            out[0] = float("nan")
        calls.append(len(x))
        return out

    monkeypatch.setattr(audit_mod, "autoencoder_scores", one_nan)
    out = _audit(_site(tmp_path, str(demo_manifest)), _cfg(class_names))
    assert all(math.isfinite(v) for v in out.values())


def test_refused_audit_charges_nothing(tmp_path: Path, in_memory: dict,
                                       class_names: tuple[str, ...]) -> None:
    site = _site(tmp_path, allow_audit=False)
    before = site.ledger_path.read_bytes() if site.ledger_path.exists() else None
    with pytest.raises(PermissionError, match="allow-audit"):
        _audit(site, _cfg(class_names))
    after = site.ledger_path.read_bytes() if site.ledger_path.exists() else None
    assert after == before
    assert not (site.state_dir / "audits").exists()


def test_a_paired_audit_is_refused_without_allow_masks(
        tmp_path: Path, demo_manifest: Path, class_names: tuple[str, ...]) -> None:
    site = _site(tmp_path, str(demo_manifest))  # audits allowed, masks not
    before = site.ledger_path.read_bytes()
    with pytest.raises(PermissionError, match="allow-masks"):
        _audit(site, _cfg(class_names, **{"model.mask_channels": 1}))
    assert site.ledger_path.read_bytes() == before


def test_budget_exceeded_loads_no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       class_names: tuple[str, ...]) -> None:
    def forbidden(*_: object) -> None:
        pytest.fail("load_data was called although the ledger refused the audit charge")

    monkeypatch.setattr(tasks, "load_data", forbidden)
    monkeypatch.setattr(tasks, "check_data_kind", lambda *a: None)  # no files
    site = _site(tmp_path, epsilon=0.01)  # one sigma=8 release costs far more than 0.01
    with pytest.raises(BudgetExceededError):
        _audit(site, _cfg(class_names))
    assert not (site.state_dir / "audits").exists()


def test_diagnostics_are_private_and_stay_out_of_the_reply(
        tmp_path: Path, in_memory: dict, class_names: tuple[str, ...]) -> None:
    site = _site(tmp_path)
    out = _audit(site, _cfg(class_names), run_id="evaluate-run-1")
    path = diagnostics_path(site, "evaluate-run-1")
    assert path == site.state_dir / "audits" / "evaluate-run-1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    diag = json.loads(path.read_text())
    for a in ATTACKS:
        roc = diag["attacks"][a]["roc"]
        assert len(roc["fpr"]) == len(roc["tpr"]) >= 2
    assert diag["near_copy"]["closest_pairs"]  # indices live here, not in the reply
    assert diag["train_size"] == 40
    for v in out.values():
        assert not isinstance(v, (list, tuple, dict, np.ndarray, torch.Tensor))
    assert "40" not in json.dumps({k: out[k] for k in ("records", "noise_std")})
    with pytest.raises(ValueError, match="run_id"):
        _audit(site, _cfg(class_names), run_id="../escape")


def test_dataset_size_does_not_change_the_public_values(
        tmp_path: Path, in_memory: dict, phantoms: tuple, class_names: tuple[str, ...]) -> None:
    x, y, names = phantoms
    in_memory["site-1"] = _site_data(x, y, names, 12, 70)  # smaller than m, and larger
    cfg = _cfg(class_names)
    a = _audit(_site(tmp_path, name="site-0"), cfg)
    b = _audit(_site(tmp_path, name="site-1"), cfg)
    assert a["records"] == b["records"] == 16.0
    assert a["noise_std"] == b["noise_std"]


# ------------------------------------------------------------------------------- randomness
def test_noise_is_fresh_in_secure_mode_and_scales_with_sigma(
        tmp_path: Path, in_memory: dict, class_names: tuple[str, ...]) -> None:
    site = _site(tmp_path, epsilon=math.inf)
    cfg = _cfg(class_names)
    a, b = _audit(site, cfg), _audit(site, cfg)
    assert a["denoiser.auc"] != b["denoiser.auc"]
    assert a["members_fraction"] != b["members_fraction"]  # 40 > m: exactly 1 without noise
    loud = _cfg(class_names, **{"privacy.audit_noise_multiplier": 1e4})
    vals = np.array([_audit(site, loud)["members_fraction"] for _ in range(3)])
    assert np.abs(vals - 1.0).max() > 100  # std = 1e4 * sqrt(6) / 16 ~ 1500


def test_reproducible_rng_gives_identical_releases(
        tmp_path: Path, in_memory: dict, class_names: tuple[str, ...]) -> None:
    cfg = _cfg(class_names)
    site = _site(tmp_path, epsilon=math.inf)
    a = _audit(site, cfg, rng=PrivacyRng.reproducible(7, "audit"))
    b = _audit(site, cfg, rng=PrivacyRng.reproducible(7, "audit"))
    c = _audit(site, cfg, rng=PrivacyRng.reproducible(8, "audit"))
    assert {k: a[k] for k in a if k != "epsilon"} == {k: b[k] for k in b if k != "epsilon"}
    assert a["denoiser.auc"] != c["denoiser.auc"]


# ------------------------------------------------------------------------------- planted leak
def _memorising_model(cfg: RunConfig, x: torch.Tensor, y: torch.Tensor
                      ) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """Train AE then denoiser WITHOUT DP on a handful of images until they are memorised."""
    torch.manual_seed(0)
    m = cfg.model
    ae, dm = make_autoencoder(m), make_denoiser(m)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    zero = torch.zeros(x.shape[0], m.latent_channels, m.latent_size, m.latent_size)
    for _ in range(300):
        loss = autoencoder_loss(ae, x, kl_weight=1e-6, noise=zero).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = ae.encode(x)[0]
    scale = 1.0 / float(z.std())
    z = z * scale
    sched = make_train_scheduler(m)
    opt = torch.optim.Adam(dm.parameters(), lr=3e-3)
    for _ in range(600):
        t = torch.randint(0, m.num_train_timesteps, (x.shape[0],), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        drop = torch.rand(y.shape[0], generator=gen) < 0.15  # trains the guidance's null label
        yy = torch.where(drop, torch.full_like(y, m.n_classes), y)
        loss = diffusion_loss(dm, sched, z, yy, timesteps=t, noise=noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae.eval(), dm.eval(), scale


@pytest.fixture(scope="module")
def planted(phantoms: tuple) -> tuple:
    x, y, names = phantoms
    data = _site_data(x, y, names, 16, 48)
    cfg = build_config(preset="tiny", image_size=16, class_names=names, epsilon=8.0,
                       device="cpu", overrides={"privacy.audit_records": 48,
                                                "privacy.audit_samples": 64})
    ae, dm, scale = _memorising_model(cfg, data.train.images, data.train.labels)
    return cfg, data, ae, dm, scale


def _best(diag: dict) -> tuple[float, float]:
    rocs = [diag["attacks"][a]["roc"] for a in ATTACKS]
    return max(r["auc"] for r in rocs), max(r["tpr_at_1pct_fpr"] for r in rocs)


def test_planted_leak_is_flagged_and_untrained_model_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: tuple) -> None:
    cfg, data, ae, dm, scale = planted
    monkeypatch.setattr(tasks, "load_data", lambda site, cfg: data)
    monkeypatch.setattr(tasks, "check_data_kind", lambda *a: None)  # no files
    site = _site(tmp_path, epsilon=math.inf)
    rng = PrivacyRng.reproducible(0, "planted")
    site_audit(site, cfg, ae, dm, scale, run_id="leak", rng=rng, seed=0)
    leak = json.loads(diagnostics_path(site, "leak").read_text())
    auc, tpr = _best(leak)
    assert auc > 0.7 and tpr > 0.1, (auc, tpr)

    fresh_ae, fresh_dm = _untrained(cfg)
    site_audit(site, cfg, fresh_ae, fresh_dm, 1.0, run_id="control", rng=rng, seed=0)
    control = json.loads(diagnostics_path(site, "control").read_text())
    auc0, tpr0 = _best(control)
    assert abs(auc0 - 0.5) < 0.2 and auc0 < 0.7, auc0
    assert tpr0 < tpr

