"""Demo phantoms: determinism, structure (patients, sites, labels), and the written dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_core.data import scan
from ldm_core.phantoms import (
    CLASS_NAMES,
    class_probs,
    generate_demo,
    render_demo,
    render_demo_pairs,
)

TINY = {"n_patients": 12, "slices_per_patient": 2, "n_sites": 3, "image_size": 16}


def test_render_is_deterministic_from_seed() -> None:
    a = render_demo(**TINY, seed=5)
    b = render_demo(**TINY, seed=5)
    c = render_demo(**TINY, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:] == b[2:]
    assert not np.array_equal(a[0], c[0])


def test_render_shapes_and_structure() -> None:
    images, labels, patients, sites, class_names = render_demo(**TINY, seed=0)
    n = TINY["n_patients"] * TINY["slices_per_patient"]
    assert images.shape == (n, 16, 16) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert class_names == CLASS_NAMES == tuple(sorted(CLASS_NAMES))
    assert labels.min() >= 0 and labels.max() < len(class_names)
    assert len(patients) == len(sites) == n
    assert set(sites) == {"site-0", "site-1", "site-2"}
    assert len(set(patients)) == TINY["n_patients"]
    for pid in set(patients):  # a patient has one label and one site
        idx = [i for i, p in enumerate(patients) if p == pid]
        assert len(idx) == TINY["slices_per_patient"]
        assert len({int(labels[i]) for i in idx}) == 1
        assert len({sites[i] for i in idx}) == 1
    # background dark, head bright: it is an image of something
    assert images[:, 0, 0].mean() < 40 and images[:, 8, 8].mean() > 40


def test_slices_of_a_patient_differ() -> None:
    images, *_ = render_demo(**TINY, seed=0)
    assert not np.array_equal(images[0], images[1])


def test_all_classes_occur_with_enough_patients() -> None:
    _, labels, *_ = render_demo(n_patients=40, slices_per_patient=1, image_size=16, seed=0)
    assert set(labels.tolist()) == set(range(len(CLASS_NAMES)))


def test_a_rare_class_is_rare_and_the_default_mix_is_unchanged() -> None:
    probs = class_probs(("tumor", 0.03))
    assert probs[CLASS_NAMES.index("tumor")] == 0.03 and abs(probs.sum() - 1) < 1e-12
    default = class_probs()
    others = [i for i, n in enumerate(CLASS_NAMES) if n != "tumor"]
    np.testing.assert_allclose(probs[others] / probs[others].sum(),
                               default[others] / default[others].sum())
    kw = {"n_patients": 3000, "slices_per_patient": 1, "image_size": 16, "seed": 0}
    _, labels, *_ = render_demo(**kw, rare=("tumor", 0.03))
    share = float((labels == CLASS_NAMES.index("tumor")).mean())
    assert 0.015 < share < 0.05, share  # the sites' mixes scatter around 3 %
    _, plain, *_ = render_demo(**kw)
    assert float((plain == CLASS_NAMES.index("tumor")).mean()) > 0.18
    np.testing.assert_array_equal(plain, render_demo(**kw, rare=None)[1])
    with pytest.raises(ValueError, match="not one of"):
        class_probs(("tumour", 0.03))
    with pytest.raises(ValueError, match="rarer than by default"):
        class_probs(("tumor", 0.5))


@pytest.mark.parametrize(
    "kwargs",
    [{"n_patients": 0}, {"n_sites": 0}, {"image_size": 8}, {"n_patients": 2, "n_sites": 3}],
)
def test_bad_arguments_raise(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="phantoms"):
        render_demo(**{**TINY, **kwargs})


def test_generate_writes_tree_and_manifest(tmp_path: Path) -> None:
    manifest = generate_demo(tmp_path / "demo", **TINY, seed=1)
    assert manifest == tmp_path / "demo" / "manifest.csv"
    header = manifest.read_text().splitlines()[0]
    assert header == "path,label,mask,patient,site"
    index = scan(tmp_path / "demo")  # the folder with manifest.csv
    images, labels, patients, sites, class_names = render_demo(**TINY, seed=1)
    assert index.layout == "manifest" and index.has_patient_ids
    assert len(index.records) == len(labels)
    present = tuple(sorted({class_names[i] for i in labels}))
    assert index.class_names == present
    first = index.records[0]
    assert first.path.parent.name == index.class_names[first.label]
    assert first.patient in patients and first.site in sites
    # pixels round-trip exactly through the PNGs
    by_name = {f"{patients[i]}_{i % 2}.png": images[i] for i in range(len(labels))}
    for r in index.records[:5]:
        np.testing.assert_array_equal(np.asarray(Image.open(r.path)), by_name[r.path.name])


def test_demo_lesions_are_clear_at_32_px_and_healthy_slices_do_not_depend_on_them() -> None:
    """The demo's classes must be visible at the resolution it runs at: most lesions cover
    well over 5% of a 32 px slice (the knobs before 2026-12-08 gave a median near 45 px, a
    task a real-trained classifier half failed). The knobs only move the lesion ranges, so a
    normal slice is the same whatever they are."""
    from ldm_core.phantoms import LESIONS_3D, _patient_params

    _, masks, labels, *_ = render_demo_pairs(n_patients=200, slices_per_patient=1,
                                             image_size=32, seed=3)
    area = (masks > 0).reshape(len(masks), -1).sum(axis=1)
    sick = labels != CLASS_NAMES.index("normal")
    assert np.median(area[sick]) >= 64, np.median(area[sick])
    assert area[~sick].max() == 0

    site_p = {"class_probs": np.tile(class_probs(), (3, 1))}
    a = _patient_params(np.random.default_rng(0), 50, 3, site_p)
    b = _patient_params(np.random.default_rng(0), 50, 3, site_p, LESIONS_3D)
    assert np.array_equal(a["label"], b["label"]) and np.array_equal(a["vent"], b["vent"])
    assert np.median(a["l_size"]) > 1.2 * np.median(b["l_size"])


def test_the_3d_demo_keeps_the_lesions_its_results_were_measured_with() -> None:
    from ldm_core.phantoms import LESIONS_3D

    assert LESIONS_3D.hard_fraction == 0.15
    assert LESIONS_3D.clear_size == (0.17, 0.33) and LESIONS_3D.hard_size == (0.06, 0.13)
    assert LESIONS_3D.clear_contrast == (0.7, 1.0) and LESIONS_3D.hard_contrast == (0.2, 0.5)
