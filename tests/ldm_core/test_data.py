"""Data loading: both layouts, validation errors, patient-level splits, site partitions, pixels."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.data import (
    DataError,
    ImageSet,
    Record,
    load_all_sites,
    load_images,
    load_site,
    partition,
    patient_draw,
    scan,
    split_by_patient,
)
from ldm_core.phantoms import generate_demo

# --------------------------------------------------------------------------------------------
# helpers


def _png(path: Path, value: int = 128, size: tuple[int, int] = (12, 12), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]), value, dtype=np.uint8)
    arr[0, 0] = 0  # not constant
    img = Image.fromarray(arr)
    if mode == "RGB":
        img = img.convert("RGB")  # RGB-encoded gray, as many exported datasets are
    img.save(path)
    return path


def _tree(root: Path, classes: dict[str, int], split: str | None = None) -> None:
    for name, n in classes.items():
        base = root / split / name if split else root / name
        for i in range(n):
            _png(base / f"{name}_{i}.png", value=40 + 10 * i, mode="RGB" if i % 2 else "L")


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _records(n_patients: int, per_patient: int = 3, n_classes: int = 3, split=None, site=None):
    """Synthetic records (no files needed for splitting/partitioning)."""
    out = []
    for p in range(n_patients):
        for k in range(per_patient):
            out.append(
                Record(
                    path=Path(f"/x/p{p}_{k}.png"),
                    label=p % n_classes,
                    patient=f"p{p}",
                    split=split(p) if split else None,
                    site=site(p) if site else None,
                )
            )
    return out


def _patients(records) -> set[str]:
    return {r.patient_key for r in records}


# --------------------------------------------------------------------------------------------
# scan: folders


def test_scan_flat_folders(tmp_path: Path) -> None:
    _tree(tmp_path, {"tumor": 3, "normal": 2, "cyst": 2})
    (tmp_path / "notes.txt").write_text("ignored")
    index = scan(tmp_path)
    assert index.layout == "folders" and not index.has_patient_ids
    assert index.class_names == ("cyst", "normal", "tumor")
    assert len(index.records) == 7
    assert Counter(r.label for r in index.records) == {0: 2, 1: 2, 2: 3}
    assert all(r.split is None and r.patient is None for r in index.records)
    assert all(r.path.parent.name == index.class_names[r.label] for r in index.records)


@pytest.mark.parametrize("names", [("train", "test"), ("training", "testing")])
def test_scan_split_folders(tmp_path: Path, names: tuple[str, str]) -> None:
    _tree(tmp_path, {"a": 3, "b": 3}, names[0])
    _tree(tmp_path, {"a": 1, "b": 2}, names[1])
    index = scan(tmp_path)
    assert index.class_names == ("a", "b")
    assert Counter(r.split for r in index.records) == {"train": 6, "test": 3}


def test_scan_folder_errors(tmp_path: Path) -> None:
    _tree(tmp_path / "mixed", {"a": 2}, "train")
    _tree(tmp_path / "mixed", {"b": 2})
    with pytest.raises(DataError, match="mixes split folders"):
        scan(tmp_path / "mixed")

    _tree(tmp_path / "empty", {"a": 2})
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(DataError, match=r"empty[/\\]b: class folder holds no images"):
        scan(tmp_path / "empty")

    _tree(tmp_path / "single", {"only": 3})
    with pytest.raises(DataError, match="single class"):
        scan(tmp_path / "single")

    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan(tmp_path / "nothing")

    with pytest.raises(DataError, match="no such file"):
        scan(tmp_path / "missing")

    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"data\.txt: expected a folder"):
        scan(tmp_path / "data.txt")


# --------------------------------------------------------------------------------------------
# scan: manifest


def test_scan_manifest_relative_and_absolute(tmp_path: Path) -> None:
    a = _png(tmp_path / "imgs" / "a.png")
    b = _png(tmp_path / "elsewhere" / "b.png")
    c = _png(tmp_path / "imgs" / "c.png", mode="RGB")
    m = _manifest(
        tmp_path / "manifest.csv",
        [
            {"path": "imgs/a.png", "label": "tumor", "patient": "p1", "site": "s1"},
            {"path": str(b), "label": "normal", "patient": "p2", "site": "s2"},
            {"path": "imgs/c.png", "label": "tumor", "patient": "p1", "site": "s1"},
        ],
    )
    for target in (m, tmp_path):  # the csv itself, or its folder
        index = scan(target)
        assert index.layout == "manifest" and index.has_patient_ids
        assert index.root == tmp_path
        assert index.class_names == ("normal", "tumor")
        assert [r.path for r in index.records] == [a, b, c]
        assert [r.label for r in index.records] == [1, 0, 1]
        assert [r.site for r in index.records] == ["s1", "s2", "s1"]


def test_manifest_without_patient_column(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    m = _manifest(
        tmp_path / "m.csv", [{"path": "a.png", "label": "x"}, {"path": "b.png", "label": "y"}]
    )
    index = scan(m)
    assert not index.has_patient_ids
    assert index.records[0].patient is None


def test_manifest_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    rows = [
        {"path": _png(tmp_path / f"{i}.png").name, "label": str(lab)}
        for i, lab in enumerate([2, 10, 1])
    ]
    assert scan(_manifest(tmp_path / "m.csv", rows)).class_names == ("1", "2", "10")


def test_manifest_missing_file_names_manifest_and_file(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    m = _manifest(
        tmp_path / "m.csv",
        [{"path": "a.png", "label": "x"}, {"path": "gone.png", "label": "y"}],
    )
    with pytest.raises(
        DataError, match=r"m\.csv: 1 listed file\(s\) do not exist \(first: gone\.png\)"
    ):
        scan(m)


def test_manifest_unknown_split(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    m = _manifest(
        tmp_path / "m.csv",
        [
            {"path": "a.png", "label": "x", "split": "train"},
            {"path": "b.png", "label": "y", "split": "dev-set"},
        ],
    )
    with pytest.raises(DataError, match=r"m\.csv, row 3: unknown split 'dev-set'"):
        scan(m)


def test_manifest_split_aliases_and_partial_split(tmp_path: Path) -> None:
    for n in "abc":
        _png(tmp_path / f"{n}.png")
    rows = [
        {"path": "a.png", "label": "x", "split": "Training"},
        {"path": "b.png", "label": "y", "split": "val"},
        {"path": "c.png", "label": "y", "split": "testing"},
    ]
    index = scan(_manifest(tmp_path / "m.csv", rows))
    assert [r.split for r in index.records] == ["train", "holdout", "test"]
    rows[1]["split"] = ""
    with pytest.raises(DataError, match="empty split while other rows have one"):
        scan(_manifest(tmp_path / "m2.csv", rows))


def test_manifest_patient_in_two_splits_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    rows = [
        {"path": "a.png", "label": "x", "patient": "p1", "split": "train"},
        {"path": "b.png", "label": "y", "patient": "p1", "split": "test"},
    ]
    with pytest.raises(DataError, match=r"patient 'p1'.*more than one split"):
        scan(_manifest(tmp_path / "m.csv", rows))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"file,class\na.png,x\n", r"missing column\(s\) \['path', 'label'\]"),
        (b"path,label\n", "no rows"),
        (b"\xff\xfe\x00garbage\x80\x81", "cannot read the CSV manifest"),
        (b"path,label\na.png,x\na.png,y\n", "listed more than once"),
        (b"path,label\na.png,x\n,y\n", "empty path or label"),
        (b"path,label\na.png,x\n", "at least two classes"),
    ],
)
def test_manifest_bad_csv(tmp_path: Path, content: bytes, match: str) -> None:
    _png(tmp_path / "a.png")
    m = tmp_path / "bad.csv"
    m.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        scan(m)
    assert "bad.csv" in str(info.value)


# --------------------------------------------------------------------------------------------
# split_by_patient


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_without_split_column_is_patient_level(seed: int) -> None:
    records = _records(40)
    out = split_by_patient(records, holdout_fraction=0.2, test_fraction=0.2, seed=seed)
    assert set(out) == {"train", "holdout", "test"}
    pats = {k: _patients(v) for k, v in out.items()}
    assert not pats["train"] & pats["holdout"]
    assert not pats["train"] & pats["test"]
    assert not pats["holdout"] & pats["test"]
    assert sum(len(v) for v in out.values()) == len(records)
    assert pats["test"] and pats["holdout"] and pats["train"]
    again = split_by_patient(records, holdout_fraction=0.2, test_fraction=0.2, seed=seed)
    assert again == out


def _split_of(out: dict[str, list[Record]]) -> dict[str, str]:
    return {r.patient_key: split for split, recs in out.items() for r in recs}


@pytest.mark.parametrize("layout", ["none", "train-test"])
def test_one_patient_more_or_less_moves_no_other_patient(layout: str) -> None:
    """The neighbouring-dataset property the DP accounting rests on.

    Goes red for any split whose draw depends on the other patients (a shuffle, exact
    counts, stratification): removing one patient must leave every other patient where it was.
    """
    split = None if layout == "none" else (lambda p: "test" if p % 5 == 0 else "train")
    records = _records(60, split=split)
    full = _split_of(split_by_patient(records, seed=7))
    for gone in {r.patient_key for r in records}:
        fewer = _split_of(split_by_patient([r for r in records if r.patient_key != gone],
                                           seed=7))
        assert fewer == {k: v for k, v in full.items() if k != gone}, gone


def test_split_fractions_hold_on_average() -> None:
    records = [Record(path=Path(f"/x/{i}.png"), label=i % 2) for i in range(4000)]
    out = split_by_patient(records, holdout_fraction=0.15, test_fraction=0.25, seed=3)
    sizes = {k: len(v) / len(records) for k, v in out.items()}
    # Binomial sd at n=4000 is ~0.007; 4 sd bounds.
    assert abs(sizes["test"] - 0.25) < 0.03
    assert abs(sizes["holdout"] - 0.15) < 0.03


def test_split_seeds_differ() -> None:
    records = _records(40)
    a = split_by_patient(records, seed=0)["test"]
    b = split_by_patient(records, seed=1)["test"]
    assert _patients(a) != _patients(b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_holdout_carved_from_train_only(seed: int) -> None:
    records = _records(30, split=lambda p: "test" if p >= 24 else "train")
    out = split_by_patient(records, holdout_fraction=0.2, test_fraction=0.2, seed=seed)
    assert out["test"] == [r for r in records if r.split == "test"]  # given split kept as is
    given_train = _patients(r for r in records if r.split == "train")
    assert _patients(out["holdout"]) <= given_train
    assert out["holdout"]
    assert not _patients(out["holdout"]) & _patients(out["train"])


def test_holdout_carved_at_the_rate_of_all_patients() -> None:
    """With test given, holdout is drawn at holdout / (1 - test) of train: ~20 % of all."""
    records = [Record(path=Path(f"/x/{i}.png"), label=i % 2,
                      split="test" if i % 5 == 0 else "train") for i in range(5000)]
    out = split_by_patient(records, holdout_fraction=0.2, test_fraction=0.2, seed=0)
    assert abs(len(out["holdout"]) / len(records) - 0.2) < 0.025


def test_full_split_column_respected() -> None:
    records = _records(9, split=lambda p: ("train", "holdout", "test")[p % 3])
    out = split_by_patient(records, holdout_fraction=0.0, seed=0)
    for split in ("train", "holdout", "test"):
        assert out[split] == [r for r in records if r.split == split]


def test_whether_a_split_is_carved_does_not_depend_on_which_splits_are_empty() -> None:
    """With a split column, test is never carved, even when the given test is empty: removing
    the only given test patient must not send train patients to test."""
    records = _records(40, split=lambda p: "test" if p == 0 else "train")
    full = _split_of(split_by_patient(records, seed=2))
    fewer = _split_of(split_by_patient([r for r in records if r.patient != "p0"], seed=2))
    assert fewer == {k: v for k, v in full.items() if k != "p0"}
    assert "test" not in fewer.values()
    # A given holdout is kept, and train patients are still carved into holdout per patient.
    with_holdout = _records(40, split=lambda p: "holdout" if p == 0 else "train")
    carved = _split_of(split_by_patient(with_holdout, seed=2))
    alone = _split_of(split_by_patient([r for r in with_holdout if r.patient != "p0"], seed=2))
    assert carved["p0"] == "holdout" and alone == {k: v for k, v in carved.items() if k != "p0"}


def test_an_image_without_a_patient_id_splits_the_same_wherever_the_data_root_is() -> None:
    here = [Record(path=Path(f"/mnt/a/data/c{i % 2}/{i}.png"), label=i % 2) for i in range(50)]
    there = [Record(path=Path(f"/srv/copy/c{i % 2}/{i}.png"), label=i % 2) for i in range(50)]
    a = split_by_patient(here, seed=1)
    b = split_by_patient(there, seed=1)
    assert {k: [r.path.name for r in v] for k, v in a.items()} == {
        k: [r.path.name for r in v] for k, v in b.items()}


def test_records_without_patient_are_own_patients() -> None:
    records = [Record(path=Path(f"/x/{i}.png"), label=i % 2) for i in range(20)]
    out = split_by_patient(records, holdout_fraction=0.25, test_fraction=0.25, seed=0)
    keys = _split_of(out)
    assert len(keys) == 20 and sum(len(v) for v in out.values()) == 20


def test_split_that_leaves_no_train_patient_is_an_error() -> None:
    records = _records(1)
    seeds = [s for s in range(200)
             if patient_draw(records[0].patient_key, s) < 0.3]  # lands in test or holdout
    with pytest.raises(DataError, match="no training patient"):
        split_by_patient(records, seed=seeds[0])


def test_split_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must be < 1"):
        split_by_patient(_records(5), holdout_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_by_patient(_records(5), test_fraction=-0.1)
    with pytest.raises(DataError, match="no train split"):
        split_by_patient(_records(5, split=lambda p: "test"))


# --------------------------------------------------------------------------------------------
# partition


def _check_partition(records, sites) -> None:
    flat = [r for s in sites for r in s]
    assert sorted(map(str, (r.path for r in flat))) == sorted(str(r.path) for r in records)
    owners: dict[str, set[int]] = {}
    for i, s in enumerate(sites):
        for r in s:
            owners.setdefault(r.patient_key, set()).add(i)
    assert all(len(v) == 1 for v in owners.values()), "a patient is at two sites"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partition_iid(seed: int) -> None:
    records = _records(60)
    sites = partition(records, 3, "iid", seed=seed)
    _check_partition(records, sites)
    assert all(30 <= len(s) <= 90 for s in sites)  # 180 images; multinomial, not exact
    assert partition(records, 3, "iid", seed=seed) == sites
    # Per patient: one patient fewer moves no other patient to another site.
    owner = {r.patient_key: i for i, s in enumerate(sites) for r in s}
    fewer = partition([r for r in records if r.patient != "p7"], 3, "iid", seed=seed)
    assert {r.patient_key: i for i, s in enumerate(fewer) for r in s} == {
        k: v for k, v in owner.items() if k != "p7"}


def _label_skew(sites, n_classes: int = 3) -> float:
    """Mean total-variation distance between each site's label mix and the uniform one."""
    tv = []
    for s in sites:
        hist = np.bincount([r.label for r in s], minlength=n_classes) / len(s)
        tv.append(0.5 * np.abs(hist - 1 / n_classes).sum())
    return float(np.mean(tv))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partition_dirichlet_skews_labels(seed: int) -> None:
    records = _records(90)
    skewed = partition(records, 3, "dirichlet:0.2", seed=seed)
    _check_partition(records, skewed)
    assert min(len(s) for s in skewed) >= 10
    assert _label_skew(skewed) > _label_skew(partition(records, 3, "iid", seed=seed)) + 0.1


def test_partition_by_site_column() -> None:
    records = _records(20, site=lambda p: f"site-{(p * 7) % 11 % 2 + 1}")
    sites = partition(records, 2, "site")
    _check_partition(records, sites)
    assert [{r.site for r in s} for s in sites] == [{"site-1"}, {"site-2"}]
    with pytest.raises(DataError, match="names 2 site"):
        partition(records, 3, "site")
    with pytest.raises(DataError, match="have no site"):
        partition(_records(20), 2, "site")


@pytest.mark.parametrize(
    "scheme",
    ["", "random", "dirichlet", "dirichlet:", "dirichlet:abc", "dirichlet:0", "dirichlet:-1"],
)
def test_partition_bad_scheme(scheme: str) -> None:
    with pytest.raises(ValueError, match="scheme"):
        partition(_records(30), 3, scheme)


def test_partition_too_many_sites() -> None:
    with pytest.raises(DataError, match="fewer sites"):
        partition(_records(4), 5, "iid")
    with pytest.raises(DataError, match="larger alpha or fewer sites"):
        partition(_records(12, per_patient=1), 4, "dirichlet:0.01")
    with pytest.raises(ValueError, match="n_sites"):
        partition(_records(4), 0, "iid")


# --------------------------------------------------------------------------------------------
# pixels


def test_load_images_modes(tmp_path: Path) -> None:
    gray = _png(tmp_path / "gray.png", value=200)
    rgb = _png(tmp_path / "rgb.png", value=200, mode="RGB")
    arr16 = np.linspace(1000, 4000, 144, dtype=np.uint16).reshape(12, 12)
    Image.fromarray(arr16).save(tmp_path / "sixteen.png")
    rgba = np.zeros((12, 12, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:6, :, 3] = 0  # transparent top half -> black
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    wide = _png(tmp_path / "wide.png", value=255, size=(24, 12))
    recs = [
        Record(path=p, label=i % 2)
        for i, p in enumerate([gray, rgb, tmp_path / "sixteen.png", tmp_path / "rgba.png", wide])
    ]
    x, y = load_images(recs, 8)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 0, 1, 0] and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0], x[1])  # RGB-encoded gray == gray
    assert x[0, 0, 4, 4].item() == pytest.approx(200 / 127.5 - 1, abs=1e-3)
    assert x[2].min().item() < -0.8 and x[2].max().item() > 0.8  # 16-bit: own min..max
    assert x[3, 0, 0].mean() == pytest.approx(-1, abs=1e-3)  # transparent -> black
    assert x[3, 0, -1].mean() > 0
    assert x[4, 0, 0].mean() == pytest.approx(-1, abs=1e-3)  # padded to square with black
    assert x[4, 0, 4].mean() > 0.9
    empty_x, empty_y = load_images([], 8)
    assert empty_x.shape == (0, 1, 8, 8) and empty_y.shape == (0,)


def test_load_images_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        load_images([Record(path=bad, label=0)], 8)


def test_image_set_validates() -> None:
    with pytest.raises(ValueError, match=r"\[N,1,H,W\]"):
        ImageSet(torch.zeros(2, 8, 8), torch.zeros(2, dtype=torch.int64), ("a", "b"))
    with pytest.raises(ValueError, match="patient ids"):
        ImageSet(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64), ("a",))


# --------------------------------------------------------------------------------------------
# load_site


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, n_patients=36, slices_per_patient=2, n_sites=3, image_size=16, seed=0)
    return out


@pytest.mark.parametrize("scheme", ["iid", "site", "dirichlet:1.0"])
def test_load_site_disjoint_and_consistent(demo_dir: Path, scheme: str) -> None:
    kw = {"n_sites": 3, "scheme": scheme, "image_size": 16, "seed": 4}
    sites = [load_site(demo_dir, site_index=i, **kw) for i in range(3)]
    all_sites = load_all_sites(demo_dir, **kw)
    seen: dict[str, int] = {}
    total = 0
    for i, (one, ref) in enumerate(zip(sites, all_sites, strict=True)):
        assert one.site_id == ref.site_id == (f"site-{i}")
        assert one.has_patient_ids
        assert one.class_names == ("cyst", "edema", "normal", "tumor")
        for split in ("train", "holdout", "test"):
            a, b = getattr(one, split), getattr(ref, split)
            torch.testing.assert_close(a.images, b.images)
            assert a.patients == b.patients
            assert a.images.shape[1:] == (1, 16, 16)
            total += len(a)
            for p in set(a.patients):  # a patient lives in one split of one site
                assert seen.setdefault(p, i * 10 + ("train", "holdout", "test").index(split)) == (
                    i * 10 + ("train", "holdout", "test").index(split)
                )
        assert len(one.train) > 0  # holdout and test are binomial: a 12-patient site may lack one
    assert total == 72


def test_load_site_bad_index(demo_dir: Path) -> None:
    with pytest.raises(ValueError, match="site_index"):
        load_site(demo_dir, site_index=3, n_sites=3, scheme="iid", image_size=16)


def test_a_sites_split_seed_does_not_depend_on_its_share() -> None:
    """The path every site takes (load_site -> _site_splits): the seed mixes in the site, never
    anything about the data, so one patient fewer still moves no other patient."""
    from ldm_core.data import _site_splits

    records = _records(50)
    kw = {"seed": 3, "holdout_fraction": 0.15, "test_fraction": 0.15}
    full = _split_of(_site_splits(records, 1, **kw))
    for gone in ("p0", "p17", "p49"):
        fewer = _split_of(_site_splits([r for r in records if r.patient != gone], 1, **kw))
        assert fewer == {k: v for k, v in full.items() if k != gone}


def test_volumes_load_as_5d_sets_with_aligned_masks_and_a_mix_is_refused(
        tmp_path: Path) -> None:
    """A manifest of NIfTI volumes (demo3d) loads through the same site split as images:
    [N, 1, S, S, S] in [-1, 1], masks alongside; volumes and 2D images never mix."""
    from ldm_core.data import holds_volumes, load_images, load_site, scan
    from ldm_core.phantoms3d import generate_demo3d

    manifest = generate_demo3d(tmp_path / "d3", n_patients=45, n_sites=3, size=16, seed=0)
    assert holds_volumes(manifest)
    site = load_site(manifest, site_index=0, n_sites=3, scheme="site", image_size=16,
                     masks=True)
    x, m = site.train.images, site.train.masks
    assert x.ndim == 5 and x.shape[1:] == (1, 16, 16, 16) and m is not None
    assert m.shape == x.shape and set(m.unique().tolist()) <= {0.0, 1.0}
    assert -1.0 <= float(x.min()) < 0 < float(x.max()) <= 1.0
    assert len(site.train) + len(site.holdout) + len(site.test) == 15
    # Class folders of volumes scan like class folders of images.
    tree = tmp_path / "tree"
    for name in ("a", "b"):
        (tree / name).mkdir(parents=True)
        for i in range(2):
            (tree / name / f"{i}.nii.gz").write_bytes(
                (tmp_path / "d3" / scan(manifest).records[i].path.relative_to(
                    tmp_path / "d3")).read_bytes())
    assert load_images(scan(tree).records, 16)[0].shape == (4, 1, 16, 16, 16)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tree / "a" / "2.png")
    with pytest.raises(DataError, match="is a volume but .*2.png is a 2D image"):
        load_images(scan(tree).records, 16)
