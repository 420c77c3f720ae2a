"""NIfTI and DICOM volumes: orientation to RAS, resampling to the spec's spacing, crop/pad,
the affine kept for writing back, and a clear error for every malformed input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldm_core.data import DataError
from ldm_core.volumes import VolumeSpec, load_volume, load_volume_pair, write_nifti


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine @ np.append(ijk, 1.0))[:3]


def _blob_volume(shape: tuple[int, int, int], at: tuple[int, int, int]) -> np.ndarray:
    data = np.random.default_rng(0).uniform(0, 10, shape).astype(np.float32)
    i, j, k = at
    data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = 1000.0
    return data


def _centroid(array: np.ndarray) -> np.ndarray:
    hot = np.argwhere(array > 0.9)
    return hot.mean(axis=0)


def test_nifti_with_a_flipped_anisotropic_affine_lands_in_ras_at_the_same_place(
        tmp_path: Path) -> None:
    # LPS-like voxel axes (x and y flipped), 2 mm along the first axis, shifted origin.
    affine = np.array([[-2.0, 0, 0, 30.0], [0, -1.0, 0, 12.0], [0, 0, 1.0, -5.0], [0, 0, 0, 1]])
    data = _blob_volume((10, 20, 16), (3, 14, 6))
    path = tmp_path / "vol.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(str(path))
    blob_mm = _world(affine, np.array([3, 14, 6]))

    vol = load_volume(path, VolumeSpec(shape=(24, 24, 24), spacing=(1.0, 1.0, 1.0)))
    assert vol.array.shape == (24, 24, 24) and vol.array.dtype == np.float32
    assert vol.array.min() >= -1.0 and vol.array.max() <= 1.0
    # RAS: the output grid's axes point +x, +y, +z with the requested 1 mm spacing.
    assert np.allclose(np.diag(vol.affine)[:3], [1.0, 1.0, 1.0], atol=1e-4)
    got_mm = _world(vol.affine, _centroid(vol.array))
    assert np.linalg.norm(got_mm - blob_mm) < 1.0  # within a voxel after resampling


def test_written_nifti_round_trips_array_and_affine(tmp_path: Path) -> None:
    affine = np.array([[0.0, 0, 1.5, -10], [1.2, 0, 0, 4], [0, 0.8, 0, 2], [0, 0, 0, 1]])
    arr = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    path = write_nifti(arr, affine, tmp_path / "syn.nii.gz")
    back = nib.load(str(path))
    assert np.array_equal(np.asarray(back.get_fdata(dtype=np.float32)), arr)
    assert np.allclose(back.affine, affine)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary name is gone


@pytest.mark.parametrize("shape, msg", [((8, 8), "3 spatial dimensions"),
                                        ((8, 8, 8, 2), "3 spatial dimensions")])
def test_wrong_dimensionality_is_refused(tmp_path: Path, shape: tuple[int, ...],
                                         msg: str) -> None:
    path = tmp_path / "bad.nii"
    nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)).to_filename(str(path))
    with pytest.raises(DataError, match=f"bad.nii.*{msg}"):
        load_volume(path, VolumeSpec(shape=(8, 8, 8)))


def test_non_finite_voxels_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    data = np.ones((6, 6, 6), np.float32)
    data[2, 2, 2] = np.nan
    nib.Nifti1Image(data, np.eye(4)).to_filename(str(tmp_path / "nan.nii"))
    with pytest.raises(DataError, match="nan.nii: 1 non-finite"):
        load_volume(tmp_path / "nan.nii", VolumeSpec(shape=(6, 6, 6)))
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="junk.nii.gz: cannot read NIfTI"):
        load_volume(tmp_path / "junk.nii.gz", VolumeSpec(shape=(6, 6, 6)))
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a volume"):
        load_volume(tmp_path / "x.png", VolumeSpec(shape=(6, 6, 6)))


def test_a_mask_on_another_grid_is_refused_and_a_matching_one_stays_aligned(
        tmp_path: Path) -> None:
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    data = _blob_volume((16, 16, 8), (5, 9, 4))
    mask = (data > 500).astype(np.uint8)
    nib.Nifti1Image(data, affine).to_filename(str(tmp_path / "img.nii.gz"))
    nib.Nifti1Image(mask, affine).to_filename(str(tmp_path / "mask.nii.gz"))
    shifted = affine.copy()
    shifted[0, 3] = 4.0
    nib.Nifti1Image(mask, shifted).to_filename(str(tmp_path / "moved.nii.gz"))
    spec = VolumeSpec(shape=(16, 16, 16))
    img, m = load_volume_pair(tmp_path / "img.nii.gz", tmp_path / "mask.nii.gz", spec)
    assert set(np.unique(m.array)) == {0.0, 1.0} and np.allclose(img.affine, m.affine)
    assert np.allclose(_centroid(img.array), _centroid(m.array), atol=0.5)
    with pytest.raises(DataError, match="moved.nii.gz: mask grid .* differs from its image"):
        load_volume_pair(tmp_path / "img.nii.gz", tmp_path / "moved.nii.gz", spec)


def _write_series(folder: Path, volume: np.ndarray, *, spacing: float = 2.0,
                  skip: int | None = None) -> None:
    """One axial series, slice k at z = k * spacing (LPS), written with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir()
    series = generate_uid()
    for k in range(volume.shape[2]):
        if k == skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "MR"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = spacing
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.uint16)).tobytes()
        # write in reverse order of position: the reader must sort by geometry, not file name
        ds.save_as(str(folder / f"{volume.shape[2] - k:03d}.dcm"), enforce_file_format=True)


def test_dicom_series_written_here_reads_back_in_ras(tmp_path: Path) -> None:
    vol = np.random.default_rng(2).integers(0, 50, (12, 10, 6)).astype(np.float32)
    vol[4:7, 2:5, 2:4] = 2000
    _write_series(tmp_path / "series", vol)
    from ldm_core.volumes import read_dicom_series

    data, affine = read_dicom_series(tmp_path / "series")
    assert data.shape == (12, 10, 6)
    assert np.array_equal(data, vol)
    # LPS (1, 0, 0) voxel axes -> RAS flips x and y; z steps 2 mm.
    assert np.allclose(affine[:3, :3], np.diag([-1.0, -1.0, 2.0]))
    out = load_volume(tmp_path / "series", VolumeSpec(shape=(12, 10, 12)))
    want_mm = _world(affine, np.array([5.0, 3.0, 2.5]))
    assert np.linalg.norm(_world(out.affine, _centroid(out.array)) - want_mm) < 1.0


def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path: Path) -> None:
    _write_series(tmp_path / "gappy", np.ones((8, 8, 6), np.float32), skip=3)
    with pytest.raises(DataError, match="gappy: missing slice"):
        load_volume(tmp_path / "gappy", VolumeSpec(shape=(8, 8, 8)))


def test_demo3d_volumes_carry_aligned_lesion_masks_and_read_back(tmp_path: Path) -> None:
    from ldm_core.phantoms import CLASS_NAMES
    from ldm_core.phantoms3d import HEAD_EXTENT_MM, generate_demo3d, render_demo3d

    volumes, masks, labels, _, _ = render_demo3d(n_patients=6, size=16, seed=0)
    assert volumes.shape == masks.shape == (6, 16, 16, 16)
    normal = labels == CLASS_NAMES.index("normal")
    assert not masks[normal].any() and all(masks[i].any() for i in np.flatnonzero(~normal))
    for i in np.flatnonzero(~normal):  # a blob, not a tube through the head
        assert (masks[i].reshape(16, -1).max(1) > 0).sum() < 16
    manifest = generate_demo3d(tmp_path, n_patients=6, size=16, seed=0)
    rows = manifest.read_text().splitlines()
    assert rows[0] == "path,label,mask,patient,site" and len(rows) == 7
    rel, _, mask_rel, *_ = rows[1].split(",")
    spec = VolumeSpec(shape=(16, 16, 16), spacing=(HEAD_EXTENT_MM / 16,) * 3)
    img, m = load_volume_pair(tmp_path / rel, tmp_path / mask_rel, spec)
    # Written [D, H, W] with the demo affine, read back in RAS: x = -W, y = -H, z = D.
    raw = volumes[0].transpose(2, 1, 0)[::-1, ::-1, :].astype(np.float64)
    lo, hi = np.percentile(raw, spec.percentiles)
    want = (np.clip(raw, lo, hi) - lo) / (hi - lo) * 2 - 1  # the loader's intensity scaling
    assert np.abs(img.array - want).max() < 1e-4
    assert np.array_equal(m.array > 0, masks[0].transpose(2, 1, 0)[::-1, ::-1, :] > 0)


def test_fitted_grid_and_display_view_show_the_demo_slice_as_the_2d_demo_draws_it(
        tmp_path: Path) -> None:
    """`spacing=None` fits the whole head to the grid (here: the demo's own spacing), and the
    figure's axial view of the RAS volume is the slice as rendered: anterior up, the patient's
    right on the viewer's left."""
    import torch

    from ldm_core.phantoms3d import HEAD_EXTENT_MM, generate_demo3d, render_demo3d
    from ldm_core.volumes import display_view

    volumes, *_ = render_demo3d(n_patients=3, size=16, seed=0)
    manifest = generate_demo3d(tmp_path, n_patients=3, size=16, seed=0)
    rel = manifest.read_text().splitlines()[1].split(",")[0]
    fitted = load_volume(tmp_path / rel, VolumeSpec(shape=(16, 16, 16), spacing=None))
    fixed = load_volume(tmp_path / rel, VolumeSpec(shape=(16, 16, 16),
                                                   spacing=(HEAD_EXTENT_MM / 16,) * 3))
    assert np.allclose(fitted.array, fixed.array, atol=1e-5)
    view = display_view(torch.from_numpy(fitted.array)[None, None])
    assert view.shape == (1, 1, 16, 48)
    raw = volumes[0].astype(np.float64)
    lo, hi = np.percentile(raw, (0.5, 99.5))
    axial = (np.clip(raw[8], lo, hi) - lo) / (hi - lo) * 2 - 1  # slice z = 8, [H, W]
    assert np.abs(view[0, 0, :, :16].numpy() - axial).max() < 1e-4
    with pytest.raises(ValueError, match="cubic volumes"):
        display_view(torch.zeros(1, 1, 4, 4, 5))


def test_a_volume_on_the_grid_affine_reads_back_unchanged(tmp_path: Path) -> None:
    from ldm_core.volumes import grid_affine

    rng = np.random.default_rng(0)
    vol = rng.uniform(-1, 1, (8, 8, 8)).astype(np.float32)
    write_nifti(vol, grid_affine(8), tmp_path / "v.nii.gz")
    back = load_volume(tmp_path / "v.nii.gz", VolumeSpec(shape=(8, 8, 8), spacing=None,
                                                         percentiles=(0, 100)))
    want = (vol - vol.min()) / (vol.max() - vol.min()) * 2 - 1  # percentiles 0-100: min-max
    assert np.allclose(back.array, want, atol=1e-5)
    assert np.allclose(back.affine, grid_affine(8))


def _cube_scan(path: Path, fov_voxels: int, voxel: float = 1.0, cube_mm: float = 8.0) -> Path:
    """A scan of `fov_voxels` voxels of `voxel` mm a side with a bright cube of `cube_mm`
    at its centre: the same anatomy seen through different fields of view."""
    c = (np.arange(fov_voxels) - (fov_voxels - 1) / 2) * voxel
    inside = np.abs(c) < cube_mm / 2
    data = np.zeros((fov_voxels,) * 3, np.float32)
    data[np.ix_(inside, inside, inside)] = 100.0
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -(fov_voxels - 1) / 2 * voxel
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(data, affine, path)


def _cube_side(array: np.ndarray) -> float:
    """The bright cube's side in voxels (its volume's cube root)."""
    return float((array > 0.0).sum()) ** (1 / 3)


def test_a_fixed_voxel_size_keeps_anatomy_the_same_size_across_fields_of_view(
        tmp_path: Path) -> None:
    """The same 8 mm cube in a 16 mm and a 32 mm scan (and a 2 mm-voxel scan): fitting each
    field of view to the grid draws it at two sizes; `model.voxel_mm` draws it 8 mm everywhere,
    cropping the larger scan around its centre and padding the smaller one."""
    from ldm_core.data import load_images, scan

    _cube_scan(tmp_path / "a" / "small.nii.gz", 16)
    _cube_scan(tmp_path / "a" / "large.nii.gz", 32)
    _cube_scan(tmp_path / "b" / "coarse.nii.gz", 12, voxel=2.0)
    records = sorted(scan(tmp_path).records, key=lambda r: r.path.name)
    names = [r.path.name for r in records]
    assert names == ["coarse.nii.gz", "large.nii.gz", "small.nii.gz"]

    fitted, _ = load_images(records, 16, progress=False)
    sides = {n: _cube_side(fitted[i, 0].numpy()) for i, n in enumerate(names)}
    assert sides["small.nii.gz"] == pytest.approx(8, abs=0.6)
    assert sides["large.nii.gz"] == pytest.approx(4, abs=0.6)  # a field of view twice as big

    fixed, _ = load_images(records, 16, progress=False, voxel_mm=1.0)
    assert fixed.shape == (3, 1, 16, 16, 16)
    for i, n in enumerate(names):
        # within a voxel: the 2 mm scan's edges are interpolated
        assert _cube_side(fixed[i, 0].numpy()) == pytest.approx(8, abs=1.1), n
    # at 2 mm voxels the grid spans 32 mm: the cube spans 4 voxels in every scan, and the
    # 16 mm scan is padded with the darkest value
    half, _ = load_images(records, 16, progress=False, voxel_mm=2.0)
    for i, n in enumerate(names):
        assert _cube_side(half[i, 0].numpy()) == pytest.approx(4, abs=1.1), n
    small = half[names.index("small.nii.gz"), 0]
    assert (small[:4] == -1.0).all() and (small[-4:] == -1.0).all()  # 16 mm padded to 32 mm


def test_a_voxel_size_for_2d_images_is_refused_naming_the_file(tmp_path: Path) -> None:
    from PIL import Image

    from ldm_core.data import load_images, scan

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("L", (8, 8), 100).save(tmp_path / c / "x.png")
    with pytest.raises(DataError, match=r"x\.png is a 2D image.*voxel_mm"):
        load_images(scan(tmp_path).records, 8, voxel_mm=1.0)


def test_a_fine_voxel_size_crops_before_it_resamples(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A 256 mm scan asked for at 0.25 mm voxels on a 16-voxel grid: resampling first would
    build a 1024^3 array; the crop to the grid's 4 mm field of view comes first, so the
    resampler never sees more than a few voxels a side, and the result is the scan's centre."""
    import monai.transforms

    seen: list[tuple[int, ...]] = []
    real = monai.transforms.Spacing

    class Recording(real):  # type: ignore[misc, valid-type]
        def __call__(self, img, *a, **k):  # type: ignore[no-untyped-def]
            out = super().__call__(img, *a, **k)
            seen.append(tuple(out.shape[1:]))
            return out

    monkeypatch.setattr(monai.transforms, "Spacing", Recording)
    # A 32 mm scan at 1 mm on a 16 mm grid: cropped to 18 voxels (a margin each side) before
    # resampling, and the result is exactly its centre, as cropping after would give.
    mid = _cube_scan(tmp_path / "mid.nii.gz", 32)
    cropped = load_volume(mid, VolumeSpec(shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0)))
    assert seen == [(18, 18, 18)]
    data, affine = nib.load(str(mid)).get_fdata(), nib.load(str(mid)).affine
    lo, hi = np.percentile(data, (0.5, 99.5))
    want = (np.clip(data, lo, hi) - lo) / (hi - lo) * 2 - 1
    assert np.allclose(cropped.array, want[8:24, 8:24, 8:24], atol=1e-5)
    assert np.allclose(cropped.affine[:3, 3], affine[:3, 3] + 8.0)
    # The 256 mm scan: the resampler never sees more than a few source voxels a side.
    seen.clear()
    path = _cube_scan(tmp_path / "big.nii.gz", 64, voxel=4.0, cube_mm=128.0)
    vol = load_volume(path, VolumeSpec(shape=(16, 16, 16), spacing=(0.25, 0.25, 0.25)))
    assert vol.array.shape == (16, 16, 16)
    assert seen and max(max(s) for s in seen) <= 16 + 8 * 4  # a few source voxels, not 1024
    assert (vol.array > 0.9).all()  # the grid's 4 mm sit inside the 128 mm cube


def test_a_volume_reports_the_share_of_its_tissue_and_lesion_outside_the_grid(
        tmp_path: Path) -> None:
    """A 24 mm cube in a 32 mm scan on a 16 mm grid: the grid keeps its central 16 mm, so
    1 - (16/24)^3 of the cube is cut; an 8 mm cube fits (nothing cut), and so does anything with
    the field of view fitted. A lesion outside the grid is reported as the mask's cut."""
    big = _cube_scan(tmp_path / "big.nii.gz", 32, cube_mm=24.0)
    small = _cube_scan(tmp_path / "small.nii.gz", 32, cube_mm=8.0)
    spec = VolumeSpec(shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    assert load_volume(big, spec).cut == pytest.approx(1 - (16 / 24) ** 3, abs=1e-6)
    assert load_volume(small, spec).cut == 0.0
    assert load_volume(big, VolumeSpec(shape=(16, 16, 16), spacing=None)).cut == 0.0
    # a lesion 4 voxels wide, half of it beyond the grid's +8 mm edge along x
    lesion = np.zeros((32, 32, 32), np.float32)
    lesion[22:26, 14:18, 14:18] = 1.0  # voxel centres at +6.5..+9.5 mm
    mask = write_nifti(lesion, nib.load(str(small)).affine, tmp_path / "mask.nii.gz")
    image, m = load_volume_pair(small, mask, spec)
    assert image.cut == 0.0 and m.cut == pytest.approx(0.5)


def test_the_reported_cut_matches_what_lands_on_an_off_centre_grid(tmp_path: Path) -> None:
    """A 41-voxel 1 mm scan onto 8 voxels of 3 mm: MONAI's grid is not centred on the scan (it
    keeps about -15..+9 mm here, not +-12). A lesion slab three voxels wide, slid across the
    scan: wherever the cut says 1 the output mask is empty, wherever it says 0 the lesion is
    on the grid, and the 'all lost' positions are not symmetric about the centre."""
    n = 41
    affine = np.eye(4)
    affine[:3, 3] = -(n - 1) / 2
    image = write_nifti(np.random.default_rng(0).uniform(0, 10, (n,) * 3).astype(np.float32),
                        affine, tmp_path / "image.nii.gz")
    spec = VolumeSpec(shape=(8, 8, 8), spacing=(3.0, 3.0, 3.0))
    lost_at = []
    for start in range(n - 2):
        lesion = np.zeros((n,) * 3, np.float32)
        lesion[start:start + 3, 17:24, 17:24] = 1.0
        mask = write_nifti(lesion, affine, tmp_path / "mask.nii.gz")
        _, m = load_volume_pair(image, mask, spec)
        if m.cut == 1.0:
            assert m.array.sum() == 0, start
            lost_at.append(start + 1 - n // 2)  # the slab's centre, mm from the scan's centre
        elif m.cut == 0.0:
            assert m.array.sum() > 0, start
    near = min(lost_at, key=abs)
    assert lost_at and -near not in lost_at  # one side loses a lesion the other side keeps


def test_the_loader_warns_once_naming_the_worst_cropped_volume(tmp_path: Path) -> None:
    import warnings

    from ldm_core.data import DataWarning, load_images, scan

    _cube_scan(tmp_path / "a" / "fits.nii.gz", 32, cube_mm=8.0)
    _cube_scan(tmp_path / "b" / "cut.nii.gz", 32, cube_mm=24.0)
    records = scan(tmp_path).records
    with pytest.warns(DataWarning, match=r"16 x 1 mm = 16 mm a side.*1 of 2 volume\(s\) lose "
                      r"more than 1% of their tissue \(worst 70%: .*cut\.nii\.gz\).*voxel_mm"
                      ) as caught:
        load_images(records, 16, progress=False, voxel_mm=1.0)
    assert len([w for w in caught if issubclass(w.category, DataWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_images(records, 16, progress=False)  # fitted: nothing is cut, no warning
        load_images(records, 16, progress=False, voxel_mm=2.0)  # 32 mm: both fit
