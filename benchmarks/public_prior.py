"""What a public prior of the sites' own modality buys: the same DP federation started from the
shipped autoencoder prior, or from priors made by `fedldm pretrain-ae/-dm --data PUBLIC`.

    .venv/bin/python benchmarks/public_prior.py --data ../shared/data/brain-tumor-mri \\
        --out runs/public-prior

The dataset's training images are split once, by a keyed hash of each patient id (of each file's
path where the data has no ids), into a "public" part (--public-fraction; labels never used) and
the sites' private part; every test image stays private, so no test image is in the prior and
the two parts never overlap (checked). Without patient ids (brain-tumor-mri has none) slices of
one patient may fall on both sides: read the MIA and memorisation columns with that in mind.
Arms (each a `fedldm simulate` at --epsilon on the private part, same sites and partition):

* `shipped`: the quick preset's default start (the shipped autoencoder prior: the
  modality-agnostic `public-generic` since 2026-12-07, the phantom-only one before; the
  measurements in docs/benchmarks.md section 10 are of the phantom-only one);
* `public-ae`: the autoencoder prior from the public part, denoiser from scratch;
* `public-ae+dm`: both priors from the public part (the denoiser unconditional, labels unused);
* `public-ae+dm+cond`: the same, DP fine-tuning only the denoiser's conditioning path (class
  and time embeddings, their projections into each block, attention: `diffusion.train_only`).

Finished run folders and priors are reused. Writes OUT/public_prior.md (printed) with the
privacy-utility table's columns plus the autoencoder's reconstruction quality.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from privacy_utility import HEADER, _fmt, row  # the privacy-utility table's cells

ARMS = ("shipped", "public-ae", "public-ae+dm", "public-ae+dm+cond")
CONDITIONING = '["class_embedding", "time_emb", "attn"]'


def split_public(data: Path, out: Path, fraction: float, key: str) -> tuple[Path, Path, int]:
    """public.csv (path,label) and private.csv (path,label,split); returns both and the count
    of public images."""
    from ldm_core.data import scan

    index = scan(data)
    public, private = [], []
    # By patient where the data has ids (all of a patient's images on one side), else by image.
    extra = [c for c in ("patient", "split", "site")
             if all(getattr(r, c) is not None for r in index.records)]
    for r in index.records:
        unit = r.patient or str(r.path.relative_to(index.root))
        h = hashlib.blake2b(unit.encode(), key=key.encode(), digest_size=8).digest()
        u = int.from_bytes(h, "big") / 2 ** 64
        name = index.class_names[r.label]
        if r.split in (None, "train") and u < fraction:
            public.append({"path": str(r.path), "label": name})
        else:
            private.append({"path": str(r.path), "label": name,
                            **{c: getattr(r, c) for c in extra}})
    assert not {p["path"] for p in public} & {p["path"] for p in private}
    if "patient" in extra:
        assert not ({r.patient for r in index.records if str(r.path) in
                     {p["path"] for p in public}} & {p["patient"] for p in private})
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows, cols in (("public.csv", public, ["path", "label"]),
                             ("private.csv", private, ["path", "label", *extra])):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        paths.append(out / name)
    return paths[0], paths[1], len(public)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--public-fraction", type=float, default=0.3)
    ap.add_argument("--key", default="public-prior-v1", help="the split's hash key")
    ap.add_argument("--epsilon", default="8")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--ae-steps", type=int, default=2500)
    ap.add_argument("--dm-steps", type=int, default=3000)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--out", type=Path, default=Path("runs/public-prior"))
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="passed to fedldm simulate")
    args = ap.parse_args(argv)
    fedldm = str(Path(sys.executable).with_name("fedldm"))
    out = args.out.resolve()
    public, private, n_public = split_public(args.data, out, args.public_fraction, args.key)
    size = ["--image-size", str(args.image_size)] if args.image_size else []
    common = ["--preset", args.preset, *size]
    ae, dm = out / "prior-ae.safetensors", out / "prior-dm.safetensors"
    if not ae.exists():
        subprocess.run([fedldm, "pretrain-ae", *common, "--data", str(public), "--steps",
                        str(args.ae_steps), "--out", str(ae)], check=True)
    if any(a.startswith("public-ae+dm") for a in args.arms) and not dm.exists():
        subprocess.run([fedldm, "pretrain-dm", *common, "--data", str(public), "--autoencoder",
                        str(ae), "--steps", str(args.dm_steps), "--out", str(dm)], check=True)
    inits = {"shipped": [], "public-ae": ["--set", f"ae_init={ae}"],
             "public-ae+dm": ["--set", f"ae_init={ae}", "--set", f"dm_init={dm}"]}
    inits["public-ae+dm+cond"] = [*inits["public-ae+dm"], "--set",
                                  f"diffusion.train_only={CONDITIONING}"]
    rows = []
    for arm in args.arms:
        run = out / arm
        if not (run / "report.html").exists():
            cmd = [fedldm, "simulate", "--data", str(private), *common, "--sites",
                   str(args.sites), "--partition", args.partition, "--epsilon", args.epsilon,
                   "--out", str(run), *inits[arm], *args.extra]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        metrics = json.loads((run / "metrics.json").read_text())
        rec = metrics.get("reconstruction") or {}
        cells = row(args.epsilon, metrics).strip("|").split("|")
        rows.append(f"| {arm} |{'|'.join(cells[1:])}| {_fmt(rec.get('psnr_db'), 1)} | "
                    f"{_fmt(rec.get('ssim'))} |")
    head, rule = HEADER.split("\n")
    table = "\n".join([
        "| start " + head.replace("| requested epsilon ", "", 1) + " recon PSNR dB | "
        "recon SSIM |", "|---" + rule.replace("|---", "", 1) + "---|---|", *rows])
    cmd = (f"python benchmarks/public_prior.py --data {args.data} --public-fraction "
           f"{args.public_fraction} --epsilon {args.epsilon} --preset {args.preset} "
           f"{' '.join(size)} --sites {args.sites} --partition {args.partition} --ae-steps "
           f"{args.ae_steps} --dm-steps {args.dm_steps} --out {args.out}")
    text = (f"{table}\n\nPublic part: {n_public} training images (labels unused); the sites "
            f"hold the rest and every test image. Produced by `{cmd}`.\n")
    (out / "public_prior.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
