"""Real data: find images and labels, split by patient, share among sites, load as tensors.

Why patient-level everywhere: slices of one patient are near-duplicates. If a patient straddled
train and test, utility would be inflated; if a patient straddled train and holdout, the
membership-inference audit would be meaningless; if a patient straddled two sites, the per-site
privacy ledger would under-count that patient's exposure. So splits and site assignment are both
done on patients, deterministically from a seed, so that every site process that calls
:func:`load_site` on its own gets a consistent, disjoint share.

Layouts understood by :func:`scan`:

- class folders ``ROOT/<class>/*.png|jpg|jpeg|...``, optionally under ``ROOT/train|test/``
  (``training``/``testing`` and ``holdout``/``val``/``validation`` are accepted as aliases);
- a CSV manifest (a ``.csv`` file, or a folder holding ``manifest.csv``) with columns
  ``path,label`` and optional ``mask,patient,split,site``. ``mask`` names a binary lesion mask
  of the same size as the image (any non-zero pixel is foreground), read only by runs that
  generate image/mask pairs (``model.mask_channels = 1``).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

__all__ = [
    "DataError",
    "DataWarning",
    "Record",
    "DatasetIndex",
    "ImageSet",
    "SiteData",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "scan",
    "split_by_patient",
    "patient_draw",
    "SPLIT_SCHEME",
    "partition",
    "load_images",
    "load_pairs",
    "pair_channels",
    "split_channels",
    "load_site",
    "load_all_sites",
]

# The split rule's name, recorded in run.json: a run trained under another rule must not be
# resumed or evaluated as if its sites held the same patients in the same splits.
SPLIT_SCHEME = "patient-hash-v1"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# Volumes (3D runs): NIfTI files in class folders or manifest rows; a manifest row may also
# name a folder holding one DICOM series.
VOLUME_SUFFIXES = (".nii", ".nii.gz")
SPLITS: tuple[str, ...] = ("train", "holdout", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "holdout": "holdout",
    "val": "holdout",
    "valid": "holdout",
    "validation": "holdout",
    "test": "test",
    "testing": "test",
}
_MANIFEST_NAME = "manifest.csv"
_PROGRESS_THRESHOLD = 500
MIN_IMAGES_PER_SITE = 10
_DIRICHLET_TRIES = 20


class DataError(ValueError):
    """The data on disk cannot be used as given; the message names the file and the fix."""


class DataWarning(UserWarning):
    """The data can be used, but something about it costs quality the site should know about
    (it is a warning, not an error: it stays at the site, in its console and site.log)."""


# Warn when a volume loses more than this share of its tissue to the grid's field of view
# (any lost lesion voxel is always reported).
CUT_TISSUE_WARN = 0.01


@dataclass(frozen=True)
class Record:
    """One image: where it is, its label id, and (when known) patient, split, site and mask."""

    path: Path
    label: int
    patient: str | None = None
    split: str | None = None
    site: str | None = None
    mask: Path | None = None

    def __post_init__(self) -> None:
        if self.split is not None and self.split not in SPLITS:
            raise DataError(f"{self.path}: split {self.split!r} is not one of {SPLITS}.")
        if self.label < 0:
            raise DataError(f"{self.path}: label id must be >= 0, got {self.label}.")

    @property
    def patient_key(self) -> str:
        """The patient id, or the image path when unknown (each image is then its own patient)."""
        return self.patient if self.patient is not None else f"image:{self.path}"


@dataclass(frozen=True)
class DatasetIndex:
    """Everything :func:`scan` found: class names (sorted, so label ids are stable) and records."""

    root: Path
    class_names: tuple[str, ...]
    records: tuple[Record, ...]
    has_patient_ids: bool
    layout: str  # "folders" | "manifest"

    def __post_init__(self) -> None:
        if self.layout not in ("folders", "manifest"):
            raise ValueError(
                f"DatasetIndex.layout must be 'folders' or 'manifest', got {self.layout!r}."
            )
        n = len(self.class_names)
        bad = [r for r in self.records if r.label >= n]
        if bad:
            raise ValueError(f"{bad[0].path}: label id {bad[0].label} >= number of classes {n}.")


@dataclass(frozen=True)
class ImageSet:
    """Images ``[N,1,H,W]`` (volumes: ``[N,1,D,H,W]``) float32 in [-1, 1], labels ``[N]``
    int64, one patient id per image, and for paired generation the masks, shaped like the
    images, float32 in {0, 1}."""

    images: Tensor
    labels: Tensor
    patients: tuple[str, ...]
    masks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5) or self.images.shape[1] != 1:
            raise ValueError(f"ImageSet.images must be [N,1,H,W] or [N,1,D,H,W], got "
                             f"{tuple(self.images.shape)}.")
        if self.masks is not None and (self.masks.shape != self.images.shape
                                       or self.masks.dtype != torch.float32):
            raise ValueError(f"ImageSet.masks must be float32 {tuple(self.images.shape)} like "
                             f"the images, got {self.masks.dtype} {tuple(self.masks.shape)}.")
        if self.images.dtype != torch.float32 or self.labels.dtype != torch.int64:
            raise ValueError(
                f"ImageSet needs float32 images and int64 labels, got {self.images.dtype} and "
                f"{self.labels.dtype}."
            )
        n = self.images.shape[0]
        if self.labels.shape != (n,) or len(self.patients) != n:
            raise ValueError(
                f"ImageSet: {n} images but labels {tuple(self.labels.shape)} and "
                f"{len(self.patients)} patient ids."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def model_input(self, rows: Tensor | None = None) -> Tensor:
        """What the autoencoder reads: the images, then the masks as a -1/+1 channel (if any);
        only `rows` when given (indexed before pairing: no copy of the whole split)."""
        images = self.images if rows is None else self.images[rows]
        if self.masks is None:
            return images
        return pair_channels(images, self.masks if rows is None else self.masks[rows])


def pair_channels(images: Tensor, masks: Tensor) -> Tensor:
    """Images [N,1,H,W] in [-1, 1] and masks in {0, 1} -> the paired model input [N,2,H,W]."""
    return torch.cat([images, masks * 2.0 - 1.0], dim=1)


def split_channels(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """The inverse of `pair_channels` for generated pairs: images [N,1,H,W] and binary masks
    (a channel above 0 is foreground), or None when `x` has the image channel only."""
    if x.shape[1] == 1:
        return x, None
    return x[:, :1], (x[:, 1:2] > 0).float()


def rows_by_patient(groups: Sequence[str] | None, n: int) -> list[list[int]]:
    """Row indices per privacy unit, in first-seen order; without patient ids (None) every row
    is its own unit. The one grouping that DP-SGD and every per-patient release use."""
    if groups is None:
        return [[i] for i in range(n)]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} patient ids for {n} records")
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    return list(index.values())


@dataclass(frozen=True)
class SiteData:
    """One site's share of a dataset, already split by patient into train/holdout/test."""

    site_id: str
    class_names: tuple[str, ...]
    train: ImageSet
    holdout: ImageSet
    test: ImageSet
    has_patient_ids: bool

    def __post_init__(self) -> None:
        if len(self.class_names) < 2:
            raise ValueError(f"SiteData needs >= 2 classes, got {self.class_names}.")
        sizes = {s.images.shape[1:] for s in (self.train, self.holdout, self.test)}
        if len(sizes) != 1:
            raise ValueError(f"SiteData splits have different image sizes: {sizes}.")


# --------------------------------------------------------------------------------------------
# scan


def _natural_key(text: str) -> list[object]:
    """Sort key that puts site-2 before site-10 and class '2' before '10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _sorted_class_names(names: Iterable[str]) -> tuple[str, ...]:
    """Alphabetical (numeric when every name is an integer) so label ids are stable."""
    names = set(names)
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _is_volume_file(p: Path) -> bool:
    return p.name.lower().endswith(VOLUME_SUFFIXES)


def _is_image(p: Path) -> bool:
    return (p.is_file() and not p.name.startswith(".")
            and (p.suffix.lower() in IMAGE_EXTENSIONS or _is_volume_file(p)))


def _exists(p: Path) -> bool:
    """A listed image: a file, or a folder (a DICOM series, read as a volume)."""
    return p.is_file() or p.is_dir()


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_class_tree(folder: Path, split: str | None) -> dict[str, list[tuple[Path, str | None]]]:
    found: dict[str, list[tuple[Path, str | None]]] = {}
    for class_dir in _subdirs(folder):
        files = sorted(p for p in class_dir.iterdir() if _is_image(p))
        if not files:
            raise DataError(
                f"{class_dir}: class folder holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}, or volumes: "
                f"{', '.join(VOLUME_SUFFIXES)}); add images or remove the folder."
            )
        found[class_dir.name] = [(f, split) for f in files]
    return found


def _scan_folders(root: Path) -> DatasetIndex:
    subdirs = _subdirs(root)
    if not subdirs:
        raise DataError(
            f"{root}: no class folders found. Expected ROOT/<class>/*.png (optionally under "
            f"ROOT/train/ and ROOT/test/) or a {_MANIFEST_NAME} with columns path,label."
        )
    split_dirs = [d for d in subdirs if d.name.lower() in _SPLIT_ALIASES]
    per_class: dict[str, list[tuple[Path, str | None]]] = defaultdict(list)
    if split_dirs:
        others = [d.name for d in subdirs if d.name.lower() not in _SPLIT_ALIASES]
        if others:
            raise DataError(
                f"{root}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                f"folders ({', '.join(others)}); put every class folder under a split folder."
            )
        seen_splits: dict[str, Path] = {}
        for d in split_dirs:
            split = _SPLIT_ALIASES[d.name.lower()]
            if split in seen_splits:
                raise DataError(
                    f"{root}: both {seen_splits[split].name}/ and {d.name}/ mean split "
                    f"{split!r}; merge them."
                )
            seen_splits[split] = d
            tree = _scan_class_tree(d, split)
            if not tree:
                raise DataError(
                    f"{d}: split folder has no class folders; add {d}/<class>/ folders of images."
                )
            for name, items in tree.items():
                per_class[name].extend(items)
    else:
        for name, items in _scan_class_tree(root, None).items():
            per_class[name].extend(items)

    class_names = _sorted_class_names(per_class)
    if len(class_names) < 2:
        raise DataError(
            f"{root}: found a single class ({class_names[0]!r}); a classifier and a "
            "class-conditional generator need at least two class folders."
        )
    ids = {name: i for i, name in enumerate(class_names)}
    records = [
        Record(path=p, label=ids[name], split=split)
        for name in class_names
        for p, split in per_class[name]
    ]
    records.sort(key=lambda r: (SPLITS.index(r.split) if r.split else -1, str(r.path)))
    return DatasetIndex(
        root=root,
        class_names=class_names,
        records=tuple(records),
        has_patient_ids=False,
        layout="folders",
    )


def _read_manifest_rows(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            rows = []
            for row in reader:
                clean = {
                    (k or "").strip().lower(): (v or "").strip()
                    for k, v in row.items()
                    if not isinstance(v, list)
                }
                if any(clean.values()):
                    rows.append(clean)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"{manifest}: cannot read the CSV manifest ({exc}); save it as UTF-8 CSV with a "
            "header row path,label[,mask,patient,split,site]."
        ) from exc
    return columns, rows


def _scan_manifest(manifest: Path) -> DatasetIndex:
    columns, rows = _read_manifest_rows(manifest)
    missing_cols = [c for c in ("path", "label") if c not in columns]
    if missing_cols:
        raise DataError(
            f"{manifest}: missing column(s) {missing_cols}; found {columns}. The header must "
            "include path,label (optional: mask,patient,split,site)."
        )
    if not rows:
        raise DataError(f"{manifest}: the manifest has a header but no rows; list your images.")
    base = manifest.parent
    has_split = "split" in columns and any(r.get("split") for r in rows)
    entries = []
    missing_files: list[str] = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            raise DataError(f"{manifest}, row {line}: empty path or label; fill both in.")
        raw_split = row.get("split", "")
        split = None
        if has_split:
            if not raw_split:
                raise DataError(
                    f"{manifest}, row {line}: empty split while other rows have one; give every "
                    f"row a split ({'/'.join(SPLITS)}) or leave the column empty everywhere."
                )
            split = _SPLIT_ALIASES.get(raw_split.lower())
            if split is None:
                raise DataError(
                    f"{manifest}, row {line}: unknown split {raw_split!r}; use one of "
                    f"{'/'.join(SPLITS)} (aliases: training, testing, val, validation)."
                )
        path = Path(row["path"])
        if not path.is_absolute():
            path = base / path
        if not _exists(path):
            missing_files.append(row["path"])
        patient, site = row.get("patient") or None, row.get("site") or None
        mask = None
        if row.get("mask"):
            mask = Path(row["mask"]) if Path(row["mask"]).is_absolute() else base / row["mask"]
            if not _exists(mask):
                missing_files.append(row["mask"])
        entries.append((path, row["label"], patient, split, site, mask))
    if missing_files:
        shown = ", ".join(missing_files[:5])
        raise DataError(
            f"{manifest}: {len(missing_files)} listed file(s) do not exist (first: {shown}); "
            f"relative paths are read from {base}. Fix the paths or remove those rows."
        )
    dupes = [p for p, c in Counter(str(e[0]) for e in entries).items() if c > 1]
    if dupes:
        raise DataError(
            f"{manifest}: {len(dupes)} image(s) listed more than once (first: {dupes[0]}); a "
            "duplicate could land in two splits. Remove the duplicate rows."
        )
    class_names = _sorted_class_names(e[1] for e in entries)
    if len(class_names) < 2:
        raise DataError(
            f"{manifest}: every row has label {class_names[0]!r}; at least two classes are needed."
        )
    ids = {name: i for i, name in enumerate(class_names)}
    records = tuple(
        Record(path=p, label=ids[lab], patient=pat, split=split, site=site, mask=mask)
        for p, lab, pat, split, site, mask in entries
    )
    _check_patients_consistent(records, manifest)
    return DatasetIndex(
        root=base,
        class_names=class_names,
        records=records,
        has_patient_ids="patient" in columns and all(r.patient is not None for r in records),
        layout="manifest",
    )


def _check_patients_consistent(records: Sequence[Record], where: Path | str) -> None:
    """A patient in two splits or at two sites would leak; refuse it."""
    for attr in ("split", "site"):
        seen: dict[str, set[str | None]] = defaultdict(set)
        for r in records:
            if r.patient is not None:
                seen[r.patient].add(getattr(r, attr))
        bad = sorted(p for p, vals in seen.items() if len(vals) > 1)
        if bad:
            raise DataError(
                f"{where}: patient {bad[0]!r} (and {len(bad) - 1} more) appears in more than one "
                f"{attr} ({sorted(map(str, seen[bad[0]]))}); each patient's images must share "
                f"one {attr}."
            )


def scan(path: str | os.PathLike[str]) -> DatasetIndex:
    """Index a dataset: a class-folder tree, a CSV manifest, or a folder holding manifest.csv.

    Only file names are read here, not pixels, so scanning is cheap and every site can do it.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; check the data path.")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise DataError(
                f"{p}: expected a folder of class folders or a .csv manifest, got a "
                f"{p.suffix or 'extensionless'} file."
            )
        return _scan_manifest(p)
    if (p / _MANIFEST_NAME).is_file():
        return _scan_manifest(p / _MANIFEST_NAME)
    return _scan_folders(p)


# --------------------------------------------------------------------------------------------
# splits and partitions


def _group_by_patient(records: Sequence[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.patient_key].append(r)
    return dict(sorted(groups.items()))


def _patient_label(recs: Sequence[Record]) -> int:
    """Majority label of a patient's images (ties -> smallest id): the stratum."""
    counts = Counter(r.label for r in recs)
    return min(counts, key=lambda k: (-counts[k], k))


def _check_fractions(holdout_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= holdout_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError(
            f"holdout_fraction and test_fraction must lie in [0, 1), got {holdout_fraction} and "
            f"{test_fraction}."
        )
    if holdout_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"holdout_fraction + test_fraction must be < 1 to leave a train split, got "
            f"{holdout_fraction + test_fraction}."
        )


def patient_draw(patient_key: str, seed: int) -> float:
    """A uniform number in [0, 1) for one patient, fixed by its id and the seed alone.

    Why a keyed hash and not a shuffle: the DP accounting assumes that adding or removing one
    patient changes the training set by that patient only. A shuffle, a stratified draw or any
    split whose sizes depend on the patient count can move *other* patients between train,
    holdout and test when one patient comes or goes. A per-patient hash cannot: each patient's
    split is a function of its own id, so the split is a record-by-record map (stability 1) and
    every release on any split keeps its stated epsilon across neighbouring datasets.
    """
    digest = hashlib.blake2b(
        patient_key.encode("utf-8"), digest_size=8, key=str(int(seed)).encode("ascii")
    ).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_by_patient(
    records: Sequence[Record],
    *,
    holdout_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Split records into ``train``/``holdout``/``test`` so that no patient is in two splits.

    - Records carry a split (a ``split`` column or train/test folders; then every record must):
      test is the given test, never carved; holdout is the given holdout plus the given-train
      patients each drawn independently with probability ``holdout_fraction / (1 -
      test_fraction)`` (about ``holdout_fraction`` of all patients when the given test is
      about ``test_fraction``). Set ``holdout_fraction`` to 0 to keep a declared holdout as the
      only one.
    - No record has a split: each patient independently lands in test with probability
      ``test_fraction``, in holdout with ``holdout_fraction``, otherwise in train.
    - Records without a patient id are each their own patient.

    Which rule applies is a property of the layout (split column or not), never of which splits
    happen to be empty, and each patient's split depends on its own id and ``seed`` only
    (:func:`patient_draw`): adding or removing one patient moves no other patient. Split sizes
    are therefore binomial, not exact, and a small site can get an empty holdout or test split
    (its releases on that split then carry only noise). No stratification either, for the same
    reason. A split that leaves no training patient is an error.
    """
    _check_fractions(holdout_fraction, test_fraction)
    with_split = [r.split is not None for r in records]
    if any(with_split) and not all(with_split):
        raise DataError(
            "split_by_patient: some records have a split and others do not; give every record "
            "a split or none."
        )
    _check_patients_consistent(records, "split_by_patient")
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r in records:
        out[r.split or "train"].append(r)
    if records and not out["train"]:
        raise DataError(
            "split_by_patient: the data has no train split (only "
            f"{sorted({r.split for r in records})}); add training images."
        )
    layout_has_splits = any(with_split)
    keep: list[Record] = []
    for r in out["train"]:
        u = patient_draw(_split_key(r), seed)
        if layout_has_splits:
            dest = "holdout" if u < holdout_fraction / (1.0 - test_fraction) else None
        else:
            dest = ("test" if u < test_fraction else
                    "holdout" if u < test_fraction + holdout_fraction else None)
        (out[dest] if dest else keep).append(r)
    if records and not keep:
        n = len(_group_by_patient(records))
        raise DataError(
            f"split_by_patient: the patient-level split left no training patient ({n} "
            f"patient(s), holdout_fraction={holdout_fraction}, test_fraction={test_fraction})"
            "; add patients or lower the fractions."
        )
    out["train"] = keep
    return out


def _split_key(r: Record) -> str:
    """What the split hashes: the patient id, or for an image without one its class folder and
    file name, so that moving or remounting the data root does not re-split the images."""
    if r.patient is not None:
        return r.patient
    return "image:" + "/".join(r.path.parts[-2:])


def _parse_scheme(scheme: str) -> tuple[str, float]:
    text = str(scheme).strip().lower()
    if text in ("iid", "site"):
        return text, 0.0
    if text.startswith("dirichlet:"):
        try:
            alpha = float(text.split(":", 1)[1])
        except ValueError:
            alpha = float("nan")
        if not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(
                f"partition scheme {scheme!r}: alpha must be a positive number, e.g. dirichlet:0.5."
            )
        return "dirichlet", alpha
    raise ValueError(
        f"unknown partition scheme {scheme!r}; use 'iid', 'dirichlet:ALPHA' (e.g. dirichlet:0.5) "
        "or 'site' (by the manifest's site column)."
    )


def partition(
    records: Sequence[Record],
    n_sites: int,
    scheme: str,
    *,
    seed: int = 0,
    min_per_site: int = MIN_IMAGES_PER_SITE,
) -> list[list[Record]]:
    """Share records among ``n_sites`` sites, whole patients at a time.

    ``iid``: each patient's site drawn uniformly from a keyed hash of its id (independent of the
    other patients; site sizes are multinomial). ``dirichlet:ALPHA``: label
    skew as in Hsu et al. 2019: for each class, site shares ~ Dirichlet(ALPHA); small ALPHA
    means strong skew. Draws that leave a site with fewer than ``min_per_site`` images are
    redrawn (seeded, a bounded number of times) before giving up. ``site``: by the records'
    ``site`` column, sites in natural sort order. Site order in the result is the site index.
    """
    kind, alpha = _parse_scheme(scheme)
    if not isinstance(n_sites, (int, np.integer)) or n_sites < 1:
        raise ValueError(f"partition: n_sites must be a positive integer, got {n_sites!r}.")
    patients = _group_by_patient(records)
    if kind == "site":
        return _partition_by_site(records, n_sites, min_per_site)
    if n_sites > len(patients):
        raise DataError(
            f"partition: {n_sites} sites but only {len(patients)} patients; use fewer sites."
        )
    strata: dict[int, list[str]] = defaultdict(list)
    for key, recs in patients.items():
        strata[_patient_label(recs)].append(key)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD15C]))
    for _ in range(_DIRICHLET_TRIES if kind == "dirichlet" else 1):
        owner: dict[str, int] = {}
        for lab in sorted(strata):
            keys = [strata[lab][i] for i in rng.permutation(len(strata[lab]))]
            if kind == "iid":
                # Each patient's site from its own id alone (as for the split): sites that
                # share one dataset in a trial keep the neighbouring-dataset property.
                for key in keys:
                    owner[key] = min(int(patient_draw(key, seed ^ 0x5173) * n_sites),
                                     n_sites - 1)
            else:
                shares = rng.dirichlet(np.full(n_sites, alpha))
                bounds = np.round(np.cumsum(shares) * len(keys)).astype(int)
                site_of = np.searchsorted(bounds, np.arange(len(keys)), side="right")
                for key, s in zip(keys, site_of, strict=True):
                    owner[key] = int(min(s, n_sites - 1))
        sites: list[list[Record]] = [[] for _ in range(n_sites)]
        for key, recs in patients.items():
            sites[owner[key]].extend(recs)
        sizes = [len(s) for s in sites]
        if min(sizes) >= min_per_site:
            return sites
    hint = "use a larger alpha or fewer sites" if kind == "dirichlet" else "use fewer sites"
    raise DataError(
        f"partition {scheme!r}: a site would get only {min(sizes)} image(s) (sizes {sizes}, "
        f"minimum {min_per_site}); {hint}, or add data."
    )


def _partition_by_site(
    records: Sequence[Record], n_sites: int, min_per_site: int
) -> list[list[Record]]:
    unlabeled = [r for r in records if r.site is None]
    if unlabeled:
        raise DataError(
            f"partition 'site': {len(unlabeled)} record(s) have no site (first: "
            f"{unlabeled[0].path}); fill the manifest's site column or use 'iid'/'dirichlet:A'."
        )
    _check_patients_consistent(records, "partition 'site'")
    names = sorted({r.site for r in records if r.site is not None}, key=_natural_key)
    if len(names) != n_sites:
        raise DataError(
            f"partition 'site': the data names {len(names)} site(s) ({', '.join(names)}) but "
            f"n_sites is {n_sites}; set n_sites to {len(names)}."
        )
    sites = [[r for r in records if r.site == name] for name in names]
    small = [(name, len(s)) for name, s in zip(names, sites, strict=True) if len(s) < min_per_site]
    if small:
        raise DataError(
            f"partition 'site': site {small[0][0]!r} has only {small[0][1]} image(s) (minimum "
            f"{min_per_site}); add data for it or merge it with another site."
        )
    return sites


# --------------------------------------------------------------------------------------------
# pixels


def _to_gray_float(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 [H, W] in [0, 1].

    8-bit data is divided by 255 (keeps absolute intensities comparable across images);
    16-bit/int/float data uses the image's own min..max, since such files often hold 10-12 bit
    values or arbitrary scanner units.
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    if img.mode != "L":
        img = img.convert("RGB").convert("L") if img.mode not in ("RGB", "1") else img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def _read_gray(path: Path, image_size: int, draft: bool = True) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.format == "JPEG" and draft:
                img.draft("L", (image_size, image_size))  # decode at reduced scale: much faster
            img.load()
            return _to_gray_float(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); replace or remove the file.") from exc


def _read_mask(path: Path) -> np.ndarray:
    """Foreground (bool) = any non-zero stored value. Read raw, never rescaled: a 0/1 mask
    must not vanish, and a 16-bit mask that is all lesion must not min-max to all zeros."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img.convert("L") if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK")
                             else img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read mask ({exc}); replace or remove the file.") from exc
    if arr.ndim != 2:
        raise DataError(f"{path}: a mask must be a single-channel image, got shape {arr.shape}.")
    return arr > 0


def _fit(arr: np.ndarray, image_size: int, resample: Image.Resampling) -> np.ndarray:
    """Pad to square with black (anatomy keeps its aspect ratio), then resize."""
    h, w = arr.shape
    if h != w:
        side = max(h, w)
        padded = np.zeros((side, side), dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        padded[top : top + h, left : left + w] = arr
        arr = padded
    if arr.shape[0] != image_size:
        resized = Image.fromarray(arr).resize((image_size, image_size), resample)
        arr = np.asarray(resized, dtype=np.float32)
    return np.clip(arr, 0.0, 1.0)


def _load_one(path: Path, image_size: int) -> np.ndarray:
    return _fit(_read_gray(path, image_size), image_size, Image.Resampling.BILINEAR)


def _load_pair(record: Record, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask, checked to be pixel-aligned, through the same pad and resize (nearest
    for the mask, so it stays binary)."""
    # Full-size decode (no JPEG draft): the mask is compared with the image's stored size.
    image = _read_gray(record.path, image_size, draft=False)
    assert record.mask is not None  # load_images checked
    raw = _read_mask(record.mask)
    if raw.shape != image.shape:
        raise DataError(f"{record.mask}: mask is {raw.shape[1]}x{raw.shape[0]} pixels but its "
                        f"image {record.path} is {image.shape[1]}x{image.shape[0]}; a mask must "
                        "be pixel-aligned with its image (same width and height).")
    mask = _fit(raw.astype(np.float32), image_size, Image.Resampling.NEAREST)
    return _fit(image, image_size, Image.Resampling.BILINEAR), mask


def _volume_records(records: Sequence[Record]) -> bool:
    """True when the records are volumes (NIfTI files, DICOM series folders); a mix of volumes
    and 2D images is refused, naming one of each."""
    kinds = [r.path.is_dir() or _is_volume_file(r.path) for r in records]
    if any(kinds) and not all(kinds):
        vol = records[kinds.index(True)].path
        img = records[kinds.index(False)].path
        raise DataError(f"{vol} is a volume but {img} is a 2D image; a dataset holds one or the "
                        "other (3D runs read volumes only, 2D runs images only).")
    return bool(kinds) and all(kinds)


def _load_volume(r: Record, size: int, masks: bool, voxel_mm: float | None
                 ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]]:
    """A volume (and its mask) on a grid of ``size`` voxels a side, in [0, 1]: resampled to
    ``voxel_mm`` and cropped or padded (centred), or with None its field of view fitted.
    Also the shares of its tissue and of its lesion cropped away (`Volume.cut`)."""
    from ldm_core.volumes import VolumeSpec, load_volume, load_volume_pair

    spacing = None if voxel_mm is None else (float(voxel_mm),) * 3
    spec = VolumeSpec(shape=(size, size, size), spacing=spacing)
    if masks:
        assert r.mask is not None  # _load checked
        vol, mask = load_volume_pair(r.path, r.mask, spec)
        return (vol.array + 1.0) / 2.0, mask.array, (vol.cut, mask.cut)
    vol = load_volume(r.path, spec)
    return (vol.array + 1.0) / 2.0, None, (vol.cut, 0.0)


def _warn_cut(records: Sequence[Record], cuts: Sequence[tuple[float, float]], size: int,
              voxel_mm: float, what: str) -> None:
    """One warning for the volumes that lose tissue or lesion to the grid's field of view.

    Why: with a fixed voxel size the grid covers ``size * voxel_mm`` mm; anatomy beyond it is
    cropped without error, and a lesion cropped away leaves an image labelled with a finding it
    no longer shows. Shares only, never pixel data; the warning stays at the site."""
    tissue = [(c[0], r) for c, r in zip(cuts, records, strict=True) if c[0] > CUT_TISSUE_WARN]
    lesion = [(c[1], r) for c, r in zip(cuts, records, strict=True) if c[1] > 0.0]
    if not tissue and not lesion:
        return
    fov = f"{size} x {voxel_mm:g} mm = {size * voxel_mm:g} mm a side"
    parts = []
    if tissue:
        worst, r = max(tissue, key=lambda t: t[0])
        parts.append(f"{len(tissue)} of {len(records)} {what}volume(s) lose more than "
                     f"{CUT_TISSUE_WARN:.0%} of their tissue (worst {worst:.0%}: {r.path})")
    if lesion:
        worst, r = max(lesion, key=lambda t: t[0])
        parts.append(f"{len(lesion)} of {len(records)} {what}volume(s) lose lesion voxels "
                     f"(worst {worst:.0%} of the lesion: {r.mask})")
    warnings.warn(DataWarning(
        f"the grid's field of view ({fov}) is smaller than the scans: {'; '.join(parts)}. "
        "Raise model.voxel_mm or model.image_size so the anatomy fits, or leave voxel_mm unset "
        "to fit each scan's field of view."), stacklevel=3)


def load_images(
    records: Sequence[Record], image_size: int, *, progress: bool | None = None,
    voxel_mm: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Read, grayscale, pad to square, resize and scale records to ``[N,1,S,S]`` in [-1, 1]
    (volumes: ``[N,1,S,S,S]``, reoriented to RAS, then resampled to ``voxel_mm`` and cropped
    or padded, or with None the field of view fitted to the grid).

    Returns ``(images float32, labels int64)``. Decoding runs on a few threads (PIL releases
    the GIL) and shows a progress bar above ~500 files.
    """
    x, y, _ = _load(records, image_size, progress=progress, masks=False, voxel_mm=voxel_mm)
    return x, y


def load_pairs(
    records: Sequence[Record], image_size: int, *, progress: bool | None = None,
    voxel_mm: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """As `load_images`, plus each record's mask ``[N,1,S,S]`` in {0, 1} (pixel-aligned)."""
    x, y, m = _load(records, image_size, progress=progress, masks=True, voxel_mm=voxel_mm)
    assert m is not None
    return x, y, m


def _load(records: Sequence[Record], image_size: int, *, progress: bool | None, masks: bool,
          voxel_mm: float | None = None, what: str = "") -> tuple[Tensor, Tensor, Tensor | None]:
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"load_images: image_size must be an integer >= 8, got {image_size!r}.")
    if masks:
        unmasked = [r for r in records if r.mask is None]
        if unmasked:
            raise DataError(
                f"{unmasked[0].path}: no mask for this image ({len(unmasked)} of {len(records)} "
                "images have none); paired generation (model.mask_channels=1) needs a mask "
                "for every image: add a 'mask' column to the CSV manifest (path,label,mask,...)."
            )
    n = len(records)
    volumes = _volume_records(records)
    if voxel_mm is not None and records and not volumes:
        raise DataError(f"{records[0].path} is a 2D image; a voxel size (voxel_mm={voxel_mm}) "
                        "applies to volumes only (drop model.voxel_mm for a 2D run).")
    images = np.empty((n, 1, *(image_size,) * (3 if volumes else 2)), dtype=np.float32)
    mask_arr = np.empty_like(images) if masks else None
    workers = max(1, min(4, os.cpu_count() or 1))

    cuts: list[tuple[float, float]] = []
    none_cut = (0.0, 0.0)

    def one(r: Record) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]]:
        if volumes:
            return _load_volume(r, image_size, masks, voxel_mm)
        if masks:
            return (*_load_pair(r, image_size), none_cut)
        return _load_one(r.path, image_size), None, none_cut

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, records)
        quiet = n <= _PROGRESS_THRESHOLD if progress is None else not progress
        bar = tqdm(results, total=n, desc="loading images", disable=quiet)
        for i, (arr, m, cut) in enumerate(bar):
            cuts.append(cut)
            images[i, 0] = arr
            if mask_arr is not None:
                mask_arr[i, 0] = m
    if volumes and voxel_mm is not None:
        _warn_cut(records, cuts, image_size, voxel_mm, what)
    x = torch.from_numpy(images).mul_(2.0).sub_(1.0)
    y = torch.tensor([r.label for r in records], dtype=torch.int64)
    return x, y, None if mask_arr is None else torch.from_numpy(mask_arr)


def _image_set(
    records: Sequence[Record], image_size: int, root: Path, progress: bool | None = None,
    masks: bool = False, voxel_mm: float | None = None, split: str = "",
) -> ImageSet:
    x, y, m = _load(records, image_size, progress=progress, masks=masks, voxel_mm=voxel_mm,
                    what=f"{split} " if split else "")
    patients = []
    for r in records:
        if r.patient is not None:
            patients.append(r.patient)
        else:
            try:
                patients.append(str(r.path.relative_to(root)))
            except ValueError:
                patients.append(str(r.path))
    return ImageSet(images=x, labels=y, patients=tuple(patients), masks=m)


def _site_splits(share: Sequence[Record], site_index: int, *, seed: int,
                 holdout_fraction: float, test_fraction: float) -> dict[str, list[Record]]:
    """One site's patient-level split; the seed mixes in the site so sites split differently."""
    return split_by_patient(
        share,
        holdout_fraction=holdout_fraction,
        test_fraction=test_fraction,
        seed=int(np.random.SeedSequence([seed, site_index]).generate_state(1)[0]),
    )


def missing_test_classes(path: str | os.PathLike[str], *, n_sites: int, scheme: str,
                         seed: int = 0, holdout_fraction: float = 0.15,
                         test_fraction: float = 0.15) -> list[str]:
    """Classes with no image in any site's test split (read from the file list, no pixels).

    Why: the evaluation tests on the union of the test splits; finding out after hours of
    training that a class is missing there wastes the run (and its privacy budget).
    """
    index = scan(path)
    shares = partition(index.records, n_sites, scheme, seed=seed)
    present: set[int] = set()
    for k, share in enumerate(shares):
        splits = _site_splits(share, k, seed=seed, holdout_fraction=holdout_fraction,
                              test_fraction=test_fraction)
        present.update(r.label for r in splits["test"])
    return [name for i, name in enumerate(index.class_names) if i not in present]


def _site_data(
    index: DatasetIndex,
    share: Sequence[Record],
    site_index: int,
    scheme: str,
    *,
    image_size: int,
    seed: int,
    holdout_fraction: float,
    test_fraction: float,
    progress: bool | None = None,
    masks: bool = False,
    voxel_mm: float | None = None,
) -> SiteData:
    splits = _site_splits(share, site_index, seed=seed, holdout_fraction=holdout_fraction,
                          test_fraction=test_fraction)
    if not splits["train"]:
        raise DataError(
            f"{index.root}: site {site_index} has no training images after the split; use "
            "fewer sites or smaller holdout/test fractions."
        )
    site_id = f"site-{site_index}"
    if _parse_scheme(scheme)[0] == "site" and share[0].site is not None:
        site_id = share[0].site
    return SiteData(
        site_id=site_id,
        class_names=index.class_names,
        train=_image_set(splits["train"], image_size, index.root, progress, masks, voxel_mm,
                        "train"),
        holdout=_image_set(splits["holdout"], image_size, index.root, progress, masks, voxel_mm,
                        "holdout"),
        test=_image_set(splits["test"], image_size, index.root, progress, masks, voxel_mm,
                        "test"),
        has_patient_ids=index.has_patient_ids,
    )


def load_site(
    path: str | os.PathLike[str],
    *,
    site_index: int,
    n_sites: int,
    scheme: str,
    image_size: int,
    seed: int = 0,
    holdout_fraction: float = 0.15,
    test_fraction: float = 0.15,
    progress: bool | None = None,
    masks: bool = False,
    voxel_mm: float | None = None,
) -> SiteData:
    """Load one site's share: scan, assign patients to sites, split by patient, read pixels
    (and each image's mask with ``masks``: paired generation).

    Each site process may call this on its own: the assignment depends only on the file list
    and ``seed``, so shares are disjoint and consistent across processes.
    """
    if not isinstance(site_index, (int, np.integer)) or not 0 <= site_index < n_sites:
        raise ValueError(f"load_site: site_index must be in [0, {n_sites}), got {site_index!r}.")
    _check_fractions(holdout_fraction, test_fraction)
    index = scan(path)
    shares = partition(index.records, n_sites, scheme, seed=seed)
    return _site_data(
        index,
        shares[site_index],
        site_index,
        scheme,
        image_size=image_size,
        seed=seed,
        holdout_fraction=holdout_fraction,
        test_fraction=test_fraction,
        progress=progress,
        masks=masks,
        voxel_mm=voxel_mm,
    )


def load_all_sites(
    path: str | os.PathLike[str],
    *,
    n_sites: int,
    scheme: str,
    image_size: int,
    seed: int = 0,
    holdout_fraction: float = 0.15,
    test_fraction: float = 0.15,
    masks: bool = False,
    voxel_mm: float | None = None,
) -> list[SiteData]:
    """All sites at once (simulation, central evaluation); same result as :func:`load_site`."""
    _check_fractions(holdout_fraction, test_fraction)
    index = scan(path)
    shares = partition(index.records, n_sites, scheme, seed=seed)
    return [
        _site_data(
            index,
            share,
            i,
            scheme,
            image_size=image_size,
            seed=seed,
            holdout_fraction=holdout_fraction,
            test_fraction=test_fraction,
            masks=masks,
            voxel_mm=voxel_mm,
        )
        for i, share in enumerate(shares)
    ]


DEMO_DATA = "demo"
DEMO3D_DATA = "demo3d"
# Where a simulation writes each built-in demo set, under its run folder.
DEMO_FOLDERS = {DEMO_DATA: "demo-data", DEMO3D_DATA: "demo3d-data"}


def simulation_source(data: str, out: str | os.PathLike[str], partition: str = "auto"
                      ) -> tuple[str, str]:
    """Where a simulated run's images are and how they are shared among its sites.

    "demo" ("demo3d": head volumes) means the phantoms a simulation writes to
    ``OUT/demo-data/manifest.csv`` (``OUT/demo3d-data/``), shared by site: each phantom site
    differs in acquisition; any other path is split "iid" unless a scheme is given. One rule
    for the coordinator and the simulated sites, which resolve it in different processes.
    """
    if data in DEMO_FOLDERS:
        return (str(Path(out) / DEMO_FOLDERS[data] / "manifest.csv"),
                "site" if partition == "auto" else partition)
    return data, "iid" if partition == "auto" else partition


def holds_volumes(path: str | os.PathLike[str]) -> bool:
    """True when the dataset at `path` is volumes (a 3D run's data), from the file list."""
    return _volume_records(scan(path).records)
