"""Bad input to every `fedldm` command: one clear line, the right exit code, nothing changed.

Each row builds a small world under tmp_path (tiny demo data, ledgers, keys, bad files), takes a
snapshot of every path and its bytes, runs `cli.main.main(argv)` in this process, and checks:

- the exit code (2 bad input, 1 runtime failure: see `fedldm --help`);
- stderr holds no traceback and exactly one error line `fedldm <command>: ...` (warnings
  `fedldm: warning: ...` may come before it) that names the flag or file (`expect`);
- the tree under tmp_path is byte for byte what it was (no run folder, no ledger, no state dir).
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from cli.main import main
from client.ledger import PrivacyLedger
from ldm_core.config import build_config, to_dict
from ldm_core.phantoms import generate_demo
from tests.deploy.keys import ca_cert, site_keypair

# ---------------------------------------------------------------------------------------------
# the world a row may use


class World:
    """Lazily made files under one tmp folder; every maker returns the path as a string."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def data(self) -> str:
        """12 patients x 2 slices, 2 sites, 16 px: manifest.csv with path,label,patient,site."""
        folder = self.p("data")
        if not folder.exists():
            generate_demo(folder, n_patients=12, slices_per_patient=2, n_sites=2, image_size=16,
                          seed=0)
        return str(folder)

    def manifest(self, header: list[str], rows: list[list[str]], name: str = "bad") -> str:
        """A manifest over the demo images (paths relative to the demo folder)."""
        self.data()
        path = self.p("data", f"{name}.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        return str(path)

    def demo_rows(self) -> list[dict[str, str]]:
        with open(Path(self.data()) / "manifest.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def one_class(self) -> str:
        for i in range(12):
            _png(self.p("one", "normal", f"{i}.png"))
        return str(self.p("one"))

    def with_broken_image(self, kind: str) -> str:
        """A class-folder tree (2 classes x 6 images) with one broken file."""
        folder = self.p(f"broken-{kind}")
        ext = ".jpg" if kind == "jpeg" else ".png"
        for cls in ("normal", "tumor"):
            for i in range(6):
                _png(folder / cls / f"{i}{ext}")
        bad = folder / "tumor" / f"bad{ext}"
        if kind == "empty":
            bad.write_bytes(b"")
        else:  # the first 100 bytes of a real JPEG
            _png(bad, size=64)
            bad.write_bytes(bad.read_bytes()[:100])
        return str(folder)

    def state(self, site_id: str = "hospital-a", *, corrupt: bool = False,
              headless: bool = False, name: str = "state") -> str:
        folder = self.p(name)
        folder.mkdir(mode=0o700, exist_ok=True)
        ledger = folder / "ledger.json"
        PrivacyLedger.create(ledger, budget_epsilon=8.0, delta=1e-5, site_id=site_id)
        if corrupt:
            ledger.write_text('{"site_id": "hospital-a", "delta": 1e-05, "entries": [')
        if headless:  # a ledger with spend and no head: truncation cannot be ruled out
            PrivacyLedger.open(ledger, budget_epsilon=8.0, delta=1e-5, site_id=site_id).charge(
                [(1.0, 0.01, 10)], run_id="r", phase="autoencoder", round=1)
            (folder / "ledger.json.head").unlink()
        return str(folder)

    def empty_dir(self, name: str) -> str:
        self.p(name).mkdir(parents=True, exist_ok=True)
        return str(self.p(name))

    def text(self, name: str, content: str = "hello, not a key or certificate\n") -> str:
        path = self.p(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        return str(path)

    def ca(self) -> str:
        return str(ca_cert(self.p("ca.crt"))) if not self.p("ca.crt").exists() else str(
            self.p("ca.crt"))

    def keys(self) -> tuple[str, str]:
        if not self.p("keys", "auth.key").exists():
            site_keypair(self.p("keys"))
        return str(self.p("keys", "auth.key")), str(self.p("keys", "auth.key.pub"))

    def certs(self, *, bad: str) -> str:
        """A --certs folder where `bad` (ca.crt, superlink.crt or superlink.key) is garbage."""
        folder = self.p("certs")
        folder.mkdir(exist_ok=True)
        ca_cert(folder / "ca.crt")
        shutil.copy(folder / "ca.crt", folder / "superlink.crt")
        (folder / "superlink.key").write_text("not a key\n")
        (folder / bad).write_text("garbage\n")
        return str(folder)

    def old_run(self, protocol: int | None = None) -> str:
        """A run folder started with preset tiny (run.json + checkpoints/state.json), by this
        release or (`protocol`) by one of another protocol version."""
        import json

        from common.protocol import PROTOCOL_VERSION

        data = self.data()
        run = self.p("run")
        (run / "checkpoints").mkdir(parents=True)
        cfg = build_config(preset="tiny", class_names=("cyst", "edema", "normal", "tumor"))
        (run / "run.json").write_text(json.dumps({"config": to_dict(cfg), "data": data}))
        (run / "checkpoints" / "state.json").write_text(json.dumps(
            {"config": to_dict(cfg), "stage": "autoencoder", "round": 1,
             "checkpoint": "round-1", "run_name": "run-x",
             "protocol": PROTOCOL_VERSION if protocol is None else protocol}))
        return str(run)


def _png(path: Path, size: int = 16) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.full((size, size), 128, dtype=np.uint8))
    img.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[World], list[str]]
    expect: str  # a piece of the error line: the flag or file it names
    code: int = 2
    xfail: str | None = None


def _sim(w: World, *extra: str, data: str | None = None) -> list[str]:
    return ["simulate", "--data", data or w.data(), "--out", str(w.p("run")), "--preset",
            "tiny", "--sites", "2", "--no-evaluate", *extra]


def _start(w: World, *extra: str, state: str | None = None, data: str | None = None
           ) -> list[str]:
    return ["site", "start", "--superlink", "127.0.0.1:8000", "--data", data or w.data(),
            "--state-dir", state or w.state(), "--site-id", "hospital-a", "--dry-run", *extra]


def _init(w: World, *extra: str, state: str | None = None) -> list[str]:
    return ["site", "init", "--state-dir", state or str(w.p("new-state")), "--site-id",
            "hospital-a", *extra]


def _coord_start(w: World, *extra: str) -> list[str]:
    return ["coordinator", "start", "--state-dir", str(w.p("link")), "--dry-run", *extra]


def _run(w: World, *extra: str) -> list[str]:
    return ["coordinator", "run", "--superlink", "127.0.0.1:9", "--insecure", "--out",
            str(w.p("run")), "--preset", "tiny", *extra]


def _two_splits(w: World) -> str:
    rows = w.demo_rows()
    return w.manifest(["path", "label", "patient", "split"],
                      [[r["path"], r["label"], "p-shared", "train" if i % 2 else "test"]
                       for i, r in enumerate(rows)])


CASES = [
    # --- simulate: data
    Case("simulate-missing-data", lambda w: _sim(w, data=str(w.p("no-such-data"))),
         "no-such-data"),
    Case("simulate-one-class", lambda w: _sim(w, data=w.one_class()), "single class"),
    Case("simulate-manifest-missing-column",
         lambda w: _sim(w, data=w.manifest(["path", "patient"], [["normal/x.png", "p1"]])),
         "missing column"),
    Case("simulate-patient-in-two-splits", lambda w: _sim(w, data=_two_splits(w)),
         "more than one split"),
    Case("simulate-manifest-missing-files",
         lambda w: _sim(w, data=w.manifest(["path", "label"], [["nope/a.png", "tumor"],
                                                              ["nope/b.png", "normal"]])),
         "do not exist"),
    Case("simulate-empty-image",
         lambda w: _sim(w, "--sites", "1", data=w.with_broken_image("empty")), "bad.png"),
    Case("simulate-truncated-jpeg",
         lambda w: _sim(w, "--sites", "1", data=w.with_broken_image("jpeg")), "bad.jpg"),
    # --- simulate: flags and config
    Case("simulate-epsilon-not-a-number", lambda w: _sim(w, "--epsilon", "lots"), "--epsilon"),
    Case("simulate-epsilon-zero", lambda w: _sim(w, "--epsilon", "0"), "--epsilon"),
    # The fixed releases alone spend more than epsilon 0.5: every site would refuse round 1.
    Case("simulate-epsilon-below-the-plan", lambda w: _sim(w, "--epsilon", "0.5"),
         "--epsilon 0.5 cannot hold", code=1),
    # Paired generation on data without masks: refused before anything is written.
    Case("simulate-masks-without-a-mask-column",
         lambda w: _sim(w, "--set", "model.mask_channels=1", data=w.manifest(
             ["path", "label", "patient"],
             [[r["path"], r["label"], r["patient"]] for r in w.demo_rows()], "nomask")),
         "have no mask"),
    Case("simulate-mask-channels-two", lambda w: _sim(w, "--set", "model.mask_channels=2"),
         "mask_channels"),
    Case("simulate-negative-delta", lambda w: _sim(w, "--delta=-1e-5"), "--delta"),
    Case("simulate-delta-one", lambda w: _sim(w, "--delta", "1"), "--delta"),
    Case("simulate-unknown-preset", lambda w: _sim(w, "--preset", "huge"), "--preset"),
    Case("simulate-unknown-set-key", lambda w: _sim(w, "--set", "diffusion.no_such=3"),
         "diffusion.no_such"),
    Case("simulate-set-without-equals", lambda w: _sim(w, "--set", "diffusion.rounds"),
         "--set"),
    Case("simulate-set-unknown-section", lambda w: _sim(w, "--set", "nosection=3"),
         "nosection"),
    Case("simulate-zero-sites", lambda w: _sim(w, "--sites", "0"), "--sites"),
    Case("simulate-sites-not-a-number", lambda w: _sim(w, "--sites", "two"), "--sites"),
    Case("simulate-more-sites-than-patients", lambda w: _sim(w, "--sites", "20",
                                                             "--partition", "iid"), "--sites"),
    Case("simulate-bad-partition", lambda w: _sim(w, "--partition", "dirichlet:abc"),
         "--partition"),
    Case("simulate-site-partition-wrong-count", lambda w: _sim(w, "--partition", "site",
                                                               "--sites", "3"), "--partition"),
    Case("simulate-image-size-not-divisible", lambda w: _sim(w, "--image-size", "18"),
         "--image-size 18"),
    Case("simulate-unknown-flag", lambda w: _sim(w, "--bogus"), "--bogus"),
    Case("simulate-accept-unknown-metric", lambda w: _sim(w, "--accept", "fid<=10"),
         "--accept"),
    Case("simulate-accept-bad-syntax", lambda w: _sim(w, "--accept", "ratio=0.9"), "--accept"),
    Case("simulate-accept-needs-evaluation", lambda w: _sim(w, "--accept", "ratio>=0.9"),
         "--no-evaluate"),
    Case("simulate-accept-unreachable-epsilon",
         lambda w: _sim(w, "--accept", "epsilon<=4", "--epsilon", "8"), "--epsilon"),
    Case("simulate-out-is-a-file",
         lambda w: ["simulate", "--data", w.data(), "--out", w.text("run-file")], "run-file"),
    Case("simulate-rerun-other-preset",
         lambda w: ["simulate", "--data", w.data(), "--sites", "2", "--out", w.old_run(),
                    "--preset", "quick"], "another configuration"),
    Case("simulate-resume-a-run-of-an-older-protocol",
         lambda w: ["simulate", "--data", w.data(), "--sites", "2", "--out", w.old_run(1),
                    "--preset", "tiny"], "finish that run with the release that started it"),
    # --- export
    Case("export-missing-run", lambda w: ["export", str(w.p("no-run")), "--to",
                                          str(w.p("out"))], "no-run"),
    Case("export-unevaluated-run", lambda w: ["export", w.empty_dir("r"), "--to",
                                              str(w.p("out"))], "metrics.json"),
    # --- augment
    Case("augment-missing-run", lambda w: ["augment", str(w.p("no-run")), "--class", "tumor",
                                           "--count", "5"], "no-run"),
    Case("augment-no-checkpoints", lambda w: ["augment", w.empty_dir("r"), "--class", "tumor",
                                              "--count", "5"], "checkpoints/final"),
    Case("augment-zero-count", lambda w: ["augment", w.empty_dir("r"), "--class", "tumor",
                                          "--count", "0"], "--count"),
    Case("augment-no-class", lambda w: ["augment", w.empty_dir("r"), "--count", "3"],
         "--class"),
    # --- stress
    Case("stress-missing-run", lambda w: ["stress", str(w.p("no-run")), "--model",
                                          w.text("m.pt")], "no-run"),
    Case("stress-no-checkpoints", lambda w: ["stress", w.empty_dir("r"), "--model",
                                             w.text("m.pt")], "checkpoints/final"),
    Case("stress-unknown-arch", lambda w: ["stress", w.empty_dir("r"), "--model",
                                           w.text("m.pt"), "--arch", "vit"], "--arch"),
    Case("stress-bad-guidance", lambda w: ["stress", w.empty_dir("r"), "--model",
                                           w.text("m.pt"), "--guidance", "1,x"], "--guidance"),
    # --- demo rare class
    Case("simulate-rare-unknown-class", lambda w: _sim(w, "--data", "demo", "--demo-rare",
                                                       "tumour:0.03"), "--demo-rare"),
    Case("simulate-rare-not-rarer", lambda w: _sim(w, "--data", "demo", "--demo-rare",
                                                   "tumor:0.5"), "--demo-rare"),
    Case("simulate-rare-bad-syntax", lambda w: _sim(w, "--data", "demo", "--demo-rare",
                                                    "tumor"), "--demo-rare"),
    Case("simulate-rare-not-demo", lambda w: _sim(w, "--demo-rare", "tumor:0.03"),
         "--demo-rare"),
    # --- evaluate
    Case("evaluate-no-checkpoints", lambda w: ["evaluate", w.empty_dir("finished-run")],
         "checkpoints/final"),
    Case("evaluate-missing-folder", lambda w: ["evaluate", str(w.p("no-run"))], "no-run"),
    Case("evaluate-zero-seeds", lambda w: ["evaluate", w.empty_dir("r"), "--utility-seeds",
                                           "0"], "--utility-seeds"),
    # --- site check
    Case("site-check-missing-data", lambda w: ["site", "check", "--data", str(w.p("nope"))],
         "nope"),
    Case("site-check-one-class", lambda w: ["site", "check", "--data", w.one_class()],
         "single class"),
    Case("site-check-empty-image",
         lambda w: ["site", "check", "--data", w.with_broken_image("empty")], "bad.png"),
    Case("site-check-truncated-jpeg",
         lambda w: ["site", "check", "--data", w.with_broken_image("jpeg")], "bad.jpg"),
    Case("site-check-patient-in-two-splits",
         lambda w: ["site", "check", "--data", _two_splits(w)], "more than one split"),
    Case("site-check-missing-column",
         lambda w: ["site", "check", "--data", w.manifest(["path"], [["normal/x.png"]])],
         "missing column"),
    # --- site init
    Case("site-init-twice", lambda w: _init(w, "--epsilon", "8", "--delta", "1e-5",
                                            state=w.state()), "already"),
    Case("site-init-epsilon-not-a-number", lambda w: _init(w, "--epsilon", "eight",
                                                           "--delta", "1e-5"), "--epsilon"),
    Case("site-init-negative-delta", lambda w: _init(w, "--epsilon", "8", "--delta", "-0.1"),
         "--delta"),
    Case("site-init-state-dir-is-a-file",
         lambda w: _init(w, "--epsilon", "8", "--delta", "1e-5", state=w.text("statefile")),
         "statefile"),
    Case("site-init-empty-site-id",
         lambda w: ["site", "init", "--state-dir", str(w.p("s")), "--site-id", " ",
                    "--epsilon", "8", "--delta", "1e-5"], "--site-id"),
    # --- site start --dry-run
    Case("site-start-no-ledger", lambda w: _start(w, state=w.empty_dir("fresh")),
         "no privacy ledger"),
    Case("site-start-ledger-of-another-site", lambda w: _start(w, state=w.state("hospital-b")),
         "belongs to site 'hospital-b'"),
    Case("site-start-corrupt-ledger", lambda w: _start(w, state=w.state(corrupt=True)),
         "ledger.json"),
    Case("site-start-truncated-ledger", lambda w: _start(w, state=w.state(headless=True)),
         "head"),
    Case("site-start-missing-ca", lambda w: _start(w, "--root-certificates",
                                                   str(w.p("no-ca.crt"))), "no-ca.crt"),
    Case("site-start-ca-not-a-certificate",
         lambda w: _start(w, "--root-certificates", w.text("ca.txt")), "not a PEM certificate"),
    Case("site-start-auth-key-not-a-key",
         lambda w: _start(w, "--root-certificates", w.ca(), "--auth-key", w.text("k.key")),
         "not an unencrypted OpenSSH private key"),
    Case("site-start-auth-key-is-public",
         lambda w: _start(w, "--root-certificates", w.ca(), "--auth-key", w.keys()[1]),
         "PUBLIC key"),
    Case("site-start-superlink-without-port",
         lambda w: _start(w, "--superlink", "coordinator"), "--superlink"),
    Case("site-start-superlink-with-scheme",
         lambda w: _start(w, "--superlink", "https://c:8000"), "without a scheme"),
    Case("site-start-bad-port", lambda w: _start(w, "--port", "0"), "--port"),
    Case("site-start-missing-data", lambda w: _start(w, data=str(w.p("gone"))), "gone"),
    Case("site-start-insecure-with-ca",
         lambda w: _start(w, "--insecure", "--root-certificates", w.ca()), "--insecure"),
    Case("site-start-delta-differs", lambda w: _start(w, "--delta", "1e-6"), "--delta"),
    # --- site budget
    Case("site-budget-no-ledger", lambda w: ["site", "budget", "--state-dir",
                                             w.empty_dir("nothing")], "no ledger"),
    Case("site-budget-corrupt-ledger",
         lambda w: ["site", "budget", "--state-dir", w.state(corrupt=True)], "ledger.json"),
    Case("site-budget-truncated-ledger",
         lambda w: ["site", "budget", "--state-dir", w.state(headless=True)], "head"),
    # --- coordinator (no SuperLink needed)
    Case("coordinator-start-port-out-of-range", lambda w: _coord_start(w, "--port", "70000"),
         "--port"),
    Case("coordinator-start-port-not-a-number", lambda w: _coord_start(w, "--port", "http"),
         "--port"),
    Case("coordinator-start-missing-certs", lambda w: _coord_start(w, "--certs",
                                                                   str(w.p("no-certs"))),
         "no-certs"),
    Case("coordinator-start-ca-garbage", lambda w: _coord_start(w, "--certs",
                                                                w.certs(bad="ca.crt")),
         "ca.crt"),
    Case("coordinator-start-cert-garbage", lambda w: _coord_start(w, "--certs",
                                                                  w.certs(bad="superlink.crt")),
         "superlink.crt"),
    Case("coordinator-start-key-garbage", lambda w: _coord_start(w, "--certs",
                                                                 w.certs(bad="superlink.key")),
         "superlink.key"),
    Case("coordinator-start-no-certs", lambda w: _coord_start(w), "--certs"),
    Case("coordinator-start-insecure-with-certs",
         lambda w: _coord_start(w, "--insecure", "--certs", w.certs(bad="superlink.key")),
         "--insecure"),
    Case("coordinator-register-private-key",
         lambda w: ["coordinator", "register-site", w.keys()[0], "--insecure"], "PRIVATE key"),
    Case("coordinator-register-garbage-key",
         lambda w: ["coordinator", "register-site", w.text("x.pub"), "--insecure"],
         "not an OpenSSH public key"),
    Case("coordinator-register-missing-key",
         lambda w: ["coordinator", "register-site", str(w.p("none.pub")), "--insecure"],
         "none.pub"),
    Case("coordinator-register-bad-ca",
         lambda w: ["coordinator", "register-site", w.keys()[1], "--root-certificates",
                    w.text("ca.txt")], "not a PEM certificate"),
    Case("coordinator-run-set-without-equals", lambda w: _run(w, "--set", "x"), "--set"),
    Case("coordinator-run-unknown-set-key", lambda w: _run(w, "--set", "diffusion.nope=1"),
         "rejected before submitting"),
    Case("coordinator-run-epsilon-cannot-hold-the-plan",
         lambda w: _run(w, "--epsilon", "0.2"), "--epsilon 0.2 cannot hold"),
    Case("coordinator-run-prior-file-missing",
         lambda w: _run(w, "--set", f"ae_init={w.p('gone.safetensors')}"), "gone.safetensors"),
    Case("coordinator-run-zero-round-timeout", lambda w: _run(w, "--round-timeout", "0"),
         "--round-timeout"),
    Case("coordinator-run-nan-round-timeout", lambda w: _run(w, "--round-timeout", "nan"),
         "--round-timeout"),
    Case("coordinator-run-negative-retries", lambda w: _run(w, "--round-retries", "-1"),
         "--round-retries"),
    Case("coordinator-run-bad-superlink",
         lambda w: ["coordinator", "run", "--superlink", "nohost", "--out", str(w.p("run"))],
         "--superlink"),
    Case("coordinator-unregister-not-a-number",
         lambda w: ["coordinator", "unregister-site", "seven"], "NODE_ID"),
    # --- demo-data
    Case("demo-data-rare-unknown-class",
         lambda w: ["demo-data", "--out", str(w.p("demo")), "--rare", "x:0.1"], "--rare"),
    Case("demo-data-zero-patients",
         lambda w: ["demo-data", "--out", str(w.p("demo")), "--patients", "0"], "--patients"),
    Case("demo-data-image-too-small",
         lambda w: ["demo-data", "--out", str(w.p("demo")), "--image-size", "8"],
         "--image-size"),
    Case("demo-data-more-sites-than-patients",
         lambda w: ["demo-data", "--out", str(w.p("demo")), "--patients", "2", "--sites", "5"],
         "--sites"),
    Case("demo-data-out-is-a-file", lambda w: ["demo-data", "--out", w.text("demo-file")],
         "demo-file"),
    # --- pretrain-ae
    Case("pretrain-ae-unknown-set-key",
         lambda w: ["pretrain-ae", "--preset", "tiny", "--set", "nope.field=1", "--out",
                    str(w.p("ae.safetensors"))], "nope.field"),
    Case("pretrain-ae-zero-steps",
         lambda w: ["pretrain-ae", "--steps", "0", "--out", str(w.p("ae.safetensors"))],
         "--steps"),
    Case("pretrain-ae-unknown-preset",
         lambda w: ["pretrain-ae", "--preset", "huge", "--out", str(w.p("ae.safetensors"))],
         "--preset"),
    Case("pretrain-ae-image-size-not-divisible",
         lambda w: ["pretrain-ae", "--preset", "tiny", "--image-size", "18", "--out",
                    str(w.p("ae.safetensors"))], "--image-size 18"),
    # --- priors from a public set (pretrain --data, ae_init/dm_init files)
    Case("pretrain-ae-data-without-out",
         lambda w: ["pretrain-ae", "--preset", "tiny", "--data", w.data()], "--out"),
    Case("pretrain-ae-missing-public-data",
         lambda w: ["pretrain-ae", "--preset", "tiny", "--data", str(w.p("no-public")),
                    "--out", str(w.p("ae.safetensors"))], "no-public"),
    Case("pretrain-ae-out-not-safetensors",
         lambda w: ["pretrain-ae", "--preset", "tiny", "--data", w.data(), "--out",
                    str(w.p("ae.pt"))], "ae.pt"),
    Case("pretrain-ae-data-with-mask-channels",
         lambda w: ["pretrain-ae", "--preset", "tiny", "--data", w.data(), "--set",
                    "model.mask_channels=1", "--out", str(w.p("ae.safetensors"))],
         "image-only prior"),
    Case("pretrain-ae-generic-with-data",
         lambda w: ["pretrain-ae", "--generic", "--data", w.data(), "--out",
                    str(w.p("ae.safetensors"))], "--generic"),
    Case("pretrain-ae-generic-3d",
         lambda w: ["pretrain-ae", "--generic", "--set", "model.spatial_dims=3", "--out",
                    str(w.p("ae.safetensors"))], "--generic"),
    Case("simulate-generic-prior-on-a-paired-run",
         lambda w: _sim(w, "--set", "ae_init=public-generic", "--set",
                    "model.mask_channels=1"), "public-generic"),
    Case("pretrain-dm-data-without-autoencoder",
         lambda w: ["pretrain-dm", "--preset", "tiny", "--data", w.data(), "--out",
                    str(w.p("dm.safetensors"))], "--autoencoder"),
    Case("pretrain-dm-autoencoder-missing",
         lambda w: ["pretrain-dm", "--preset", "tiny", "--data", w.data(), "--autoencoder",
                    str(w.p("none.safetensors")), "--out", str(w.p("dm.safetensors"))],
         "none.safetensors"),
    Case("simulate-train-only-names-nothing",
         lambda w: _sim(w, "--set", "diffusion.train_only=no_such_layer"), "no_such_layer"),
    Case("pretrain-dm-paired",
         lambda w: ["pretrain-dm", "--preset", "tiny", "--set", "model.mask_channels=1",
                    "--out", str(w.p("dm.safetensors"))], "mask_channels"),
    Case("simulate-prior-file-missing",
         lambda w: _sim(w, "--set", f"ae_init={w.p('gone.safetensors')}"), "gone.safetensors"),
    Case("simulate-denoiser-prior-without-its-autoencoder",
         lambda w: _sim(w, "--set", f"dm_init={w.p('dm.safetensors')}", "--set",
                    "ae_init=random"), "dm_init"),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root: file bytes, or None for a folder."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_the_table_is_big_and_distinct() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(
    reason=c.xfail, strict=True)] if c.xfail else []) for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FEDLDM_PRETRAINED_DIR", str(tmp_path / "pretrained"))
    monkeypatch.chdir(tmp_path)  # a default relative path (runs/demo) would land here
    world = World(tmp_path / "w")
    world.root.mkdir()
    argv = case.argv(world)
    before = _snapshot(tmp_path)
    capsys.readouterr()

    code = main(argv)

    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text, text
    errors = [ln for ln in captured.err.splitlines()
              if ln.strip() and not ln.startswith(("fedldm: warning:", "!!"))]
    assert len(errors) == 1, f"expected one error line, got:\n{captured.err}"
    command = " ".join(argv[:2]) if argv[0] in ("site", "coordinator") else argv[0]
    assert errors[0].startswith(f"fedldm {command}: "), errors[0]
    assert case.expect in errors[0], errors[0]
    assert code == case.code, captured.err
    assert _snapshot(tmp_path) == before, "the command changed the file system"
