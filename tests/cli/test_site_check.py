"""`fedldm site check` decodes every image and reports every problem in one pass."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from ldm_core.phantoms import generate_demo


def _manifest(tmp_path: Path, extra: list[tuple[str, str, str]]) -> Path:
    """The tiny demo set plus `extra` rows (path, label, patient)."""
    data = tmp_path / "data"
    generate_demo(data, n_patients=12, slices_per_patient=2, n_sites=2, image_size=16, seed=0)
    with open(data / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [(r["path"], r["label"], r["patient"]) for r in csv.DictReader(f)]
    with open(data / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("path", "label", "patient"))
        w.writerows(rows + extra)
    return data


def _image(path: Path, width: int, height: int) -> str:
    Image.fromarray(np.full((height, width), 90, dtype=np.uint8)).save(path)
    return path.name


def test_warnings_for_sizes_patient_ids_and_labels(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = _manifest(tmp_path, [])
    extra = [(_image(data / "tiny.png", 8, 8), "normal", "p9000"),
             (_image(data / "wide.png", 4100, 16), "tumor", "p9001"),
             (_image(data / "noid.png", 16, 16), "normal", ""),
             (_image(data / "twice-a.png", 16, 16), "normal", "p9002"),
             (_image(data / "twice-b.png", 16, 16), "tumor", "p9002")]
    data = _manifest(tmp_path, extra)
    assert main(["site", "check", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) smaller than 16 px a side" in out and "tiny.png (8x8)" in out
    assert "1 image(s) larger than 4096 px a side" in out and "wide.png (4100x16)" in out
    assert "1 image(s) with an empty patient id" in out and "noid.png" in out
    assert "1 patient(s) have images under several labels" in out and "'p9002'" in out
    assert f"decoded {24 + len(extra)}" in out
    assert "ok        the data can be used (see warnings)" in out


def test_every_unreadable_image_is_listed_at_once(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = _manifest(tmp_path, [])
    (data / "empty.png").write_bytes(b"")
    jpeg = data / "cut.jpg"
    Image.fromarray(np.full((64, 64), 90, dtype=np.uint8)).save(jpeg, format="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:100])
    png = data / "half.png"
    _image(png, 64, 64)
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])  # valid header, cut data
    data = _manifest(tmp_path, [("empty.png", "normal", "p9000"), ("cut.jpg", "tumor", "p9001"),
                                ("half.png", "tumor", "p9002")])
    for p, n in (("empty.png", 0), ("cut.jpg", 100)):
        assert (data / p).stat().st_size == n
    assert main(["site", "check", "--data", str(data)]) == 2
    captured = capsys.readouterr()
    for name in ("empty.png", "cut.jpg", "half.png"):
        assert f"error     unreadable image: {data / name}" in captured.out, name
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedldm site check: ")
    assert "3 image(s) cannot be decoded" in err[0] and "Traceback" not in captured.err


def test_site_check_decodes_volumes_and_names_a_broken_one(tmp_path: Path) -> None:
    """`fedldm site check` reads a NIfTI volume whole, as it decodes an image."""
    from cli.site import decode_image
    from ldm_core.volumes import grid_affine, write_nifti

    good = write_nifti(np.zeros((8, 8, 8), np.float32), grid_affine(8), tmp_path / "v.nii.gz")
    info = decode_image(good)
    assert info.error is None and (info.width, info.height) == (8, 8)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(good.read_bytes()[:40])
    assert decode_image(bad).error
