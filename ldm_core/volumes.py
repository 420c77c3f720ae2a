"""3D volumes: NIfTI files and DICOM series to fixed-shape, RAS-oriented, resampled arrays.

Why one place: medical volumes arrive with their own voxel order, orientation and spacing, and a
model needs one grid. Every volume (and its mask) goes through the same steps, with MONAI
transforms that track the affine: reorient to RAS, resample to `VolumeSpec.spacing` (mm),
clip intensities to percentiles and scale to [-1, 1] (images only), then crop or pad to
`VolumeSpec.shape` around the centre. The output keeps its affine, so a synthetic volume can be
written back as NIfTI that viewers place correctly, and the share of the scan's tissue (or
lesion) the crop cut away (`Volume.cut`), so a too-small field of view is reported, not silent.

Refused with a `DataError` naming the file: unreadable files, not three spatial dimensions
(a 4D file with one frame is accepted), non-finite voxels, a DICOM folder holding several series
or a series with missing slices (uneven positions along the slice normal), and a mask whose
grid (shape or affine) differs from its image's.

``ldm_core.data`` reads a volume wherever it would read an image (a NIfTI path or a DICOM
series folder in a class folder or a manifest row) with ``spacing=None``: the whole field of
view fitted to the run's grid, as the 2D loader fits a slice to its square.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_core.data import DataError

__all__ = ["NIFTI_SUFFIXES", "Volume", "VolumeSpec", "display_view", "grid_affine",
           "is_volume_path",
           "load_volume", "load_volume_pair", "read_dicom_series", "read_nifti", "read_volume",
           "write_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Slice positions further apart than this many times the median step mean a missing slice.
_GAP_TOLERANCE = 1.5
_AFFINE_ATOL_MM = 1e-3


@dataclass(frozen=True)
class VolumeSpec:
    """The grid every volume is brought to: shape (voxels), spacing (mm), intensity percentiles."""

    shape: tuple[int, int, int]
    # None = fit the field of view: isotropic voxels of the volume's largest extent divided by
    # the largest grid size, so the whole scan fits the grid (what the 2D loader does by
    # padding to square and resizing).
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise ValueError(f"VolumeSpec.shape must be 3 positive sizes, got {self.shape}")
        if self.spacing is not None and (len(self.spacing) != 3
                                         or any(not float(s) > 0 for s in self.spacing)):
            raise ValueError(f"VolumeSpec.spacing must be 3 positive mm values, got "
                             f"{self.spacing}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"VolumeSpec.percentiles must satisfy 0 <= low < high <= 100, got "
                             f"{self.percentiles}")


@dataclass(frozen=True)
class Volume:
    """A volume on the spec's grid: ``array`` [D, H, W] float32 (images in [-1, 1], masks in
    {0, 1}) and the 4x4 RAS ``affine`` of that grid (voxel index -> mm)."""

    array: np.ndarray
    affine: np.ndarray
    # The share of the scan's foreground (images: tissue above a tenth of the intensity range;
    # masks: lesion voxels) outside the grid's field of view, so cropped away. Always 0 with a
    # fitted field of view; with a fixed voxel size a scan larger than the grid loses its edges,
    # and the site should know before a lesion at the edge silently disappears.
    cut: float = 0.0


def is_volume_path(path: Path) -> bool:
    """A NIfTI file or a folder (a DICOM series)."""
    return path.is_dir() or path.name.lower().endswith(NIFTI_SUFFIXES)


def _check_finite(data: np.ndarray, path: Path) -> None:
    bad = int(np.size(data) - np.isfinite(data).sum())
    if bad:
        raise DataError(f"{path}: {bad} non-finite voxel(s) (NaN or inf); fix or remove the "
                        "volume.")


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels [X, Y, Z] float32 in file order and the file's 4x4 affine."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds; all mean "unreadable"
        raise DataError(f"{path}: cannot read NIfTI ({exc}); replace or remove the file.") \
            from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a volume needs 3 spatial dimensions, this file has shape "
                        f"{data.shape}; 2D slices go in as PNG images, 4D series must be split "
                        "into one file per volume.")
    _check_finite(data, path)
    return data, affine


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM series (every file in `folder`) as voxels [X, Y, Z] and its RAS affine.

    Slices are ordered along the slice normal by ImagePositionPatient; positions must step
    evenly (a missing slice would silently stretch the anatomy).
    """
    import pydicom

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: empty folder; a DICOM series folder holds one file per "
                        "slice.")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
            raise DataError(f"{f}: cannot read DICOM ({exc}); a series folder must hold only "
                            "the series' slices.") from exc
        slices.append((ds, pixels))
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds, _ in slices}
    if len(series) > 1:
        raise DataError(f"{folder}: {len(series)} DICOM series in one folder; put each series "
                        "in its own folder.")
    try:
        row_dir, col_dir = (np.asarray(slices[0][0].ImageOrientationPatient[:3], float),
                            np.asarray(slices[0][0].ImageOrientationPatient[3:], float))
        dr, dc = (float(v) for v in slices[0][0].PixelSpacing)
        positions = [np.asarray(ds.ImagePositionPatient, float) for ds, _ in slices]
    except (AttributeError, ValueError, TypeError) as exc:
        raise DataError(f"{folder}: DICOM geometry missing ({exc}); ImageOrientationPatient, "
                        "ImagePositionPatient and PixelSpacing are needed.") from exc
    normal = np.cross(row_dir, col_dir)
    order = np.argsort([p @ normal for p in positions])
    along = np.array([positions[i] @ normal for i in order])
    shapes = {slices[i][1].shape for i in order}
    if len(shapes) != 1:
        raise DataError(f"{folder}: slices of different sizes {sorted(shapes)}.")
    if len(slices) > 1:
        steps = np.diff(along)
        step = float(np.median(steps))
        if step <= 0 or np.any(steps <= 1e-6):
            raise DataError(f"{folder}: two slices share a position; the folder holds "
                            "duplicates or more than one series.")
        if np.any(steps > _GAP_TOLERANCE * step):
            gap = int(np.argmax(steps))
            raise DataError(f"{folder}: missing slice(s) in the series (a gap of "
                            f"{steps[gap]:.2f} mm after slice {gap + 1} where the step is "
                            f"{step:.2f} mm); re-export the complete series.")
    else:
        step = float(getattr(slices[0][0], "SliceThickness", 1.0) or 1.0)
    # pixel_array is [rows, cols]: rows advance along col_dir, columns along row_dir.
    vol = np.stack([slices[i][1].T for i in order], axis=-1)  # [cols, rows, slices]
    slope = float(getattr(slices[0][0], "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(slices[0][0], "RescaleIntercept", 0.0) or 0.0)
    vol = vol * slope + intercept
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[order[0]]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM is LPS, NIfTI/RAS flips x and y
    _check_finite(vol, folder)
    return vol.astype(np.float32), ras


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The raw array and affine of a NIfTI file or a DICOM series folder (no regridding)."""
    if path.is_dir():
        return read_dicom_series(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti(path)
    raise DataError(f"{path}: not a volume; use a NIfTI file (.nii, .nii.gz) or a folder "
                    "holding one DICOM series.")


def _fit_spacing(shape: tuple[int, ...], affine: np.ndarray, spec: VolumeSpec
                 ) -> tuple[float, float, float]:
    """Isotropic spacing (mm) at which the volume's largest extent spans the largest grid size."""
    voxel_mm = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    extent = float(max(v * n for v, n in zip(voxel_mm, shape, strict=True)))
    s = extent / max(spec.shape)
    return (s, s, s)


# Image voxels above this share of the clipped intensity range count as tissue for `Volume.cut`.
_TISSUE_LEVEL = 0.1


def _outside_share(fg: np.ndarray, src_affine: np.ndarray, out_affine: np.ndarray,
                   shape: tuple[int, int, int]) -> float:
    """Share of the foreground voxels (`fg`, on the source grid `src_affine`) whose centres
    land outside the output grid (`out_affine`, `shape`): what the resampling and crops cut.

    Measured through the output affine, not assumed: MONAI's `Spacing` starts its grid at the
    first source voxel and `ResizeWithPadOrCrop` crops from the floor, so the kept box can sit
    a voxel or more off the scan's centre."""
    total = int(fg.sum())
    if total == 0:
        return 0.0
    to_out = np.linalg.inv(out_affine) @ src_affine
    hi = np.asarray(shape, dtype=np.float64) - 0.5
    kept = 0
    for i0 in range(0, fg.shape[0], 16):  # slabs: bounded memory for a large scan
        ijk = np.argwhere(fg[i0:i0 + 16]).astype(np.float64)
        ijk[:, 0] += i0
        out = ijk @ to_out[:3, :3].T + to_out[:3, 3]
        kept += int(np.all((out >= -0.5) & (out < hi), axis=1).sum())
    return 1.0 - kept / total


def _to_grid(data: np.ndarray, affine: np.ndarray, spec: VolumeSpec, *, mask: bool
             ) -> tuple[torch.Tensor, np.ndarray, float]:
    from monai.data import MetaTensor
    from monai.transforms import CenterSpatialCrop, Orientation, ResizeWithPadOrCrop, Spacing

    x = MetaTensor(torch.from_numpy(np.ascontiguousarray(data))[None], affine=torch.as_tensor(
        affine, dtype=torch.float64))
    x = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)
    source: tuple[np.ndarray, np.ndarray] | None = None  # foreground and its grid, for the cut
    if spec.spacing is not None:
        # Crop to the grid's field of view (plus a voxel each side for the interpolation)
        # before resampling, not after: resampling a 256 mm scan to 0.1 mm voxels first would
        # build a 2560^3 array, a way for a bad `model.voxel_mm` to exhaust a site's memory.
        src_affine = np.asarray(x.affine, dtype=np.float64)
        voxel = np.linalg.norm(src_affine[:3, :3], axis=0)
        source = (x.as_tensor()[0].numpy() > (0.5 if mask else 2.0 * _TISSUE_LEVEL), src_affine)
        need = np.ceil(np.asarray(spec.shape) * np.asarray(spec.spacing) / voxel).astype(int)
        keep = np.minimum(np.asarray(x.shape[1:]), need + 2)
        if (keep < np.asarray(x.shape[1:])).any():
            x = CenterSpatialCrop(roi_size=tuple(int(k) for k in keep))(x)
    x = Spacing(pixdim=spec.spacing or _fit_spacing(data.shape, affine, spec),
                mode="nearest" if mask else "bilinear")(x)
    x = ResizeWithPadOrCrop(spatial_size=spec.shape, mode="constant")(x)
    out_affine = np.asarray(x.affine, dtype=np.float64)
    # Only a fixed voxel size crops anatomy (a fitted field of view holds the whole scan).
    cut = 0.0 if source is None else _outside_share(*source, out_affine, spec.shape)
    return x.as_tensor()[0], out_affine, cut


def load_volume(path: str | os.PathLike[str], spec: VolumeSpec) -> Volume:
    """Read a NIfTI file or DICOM series folder and bring it to the spec's grid (module doc)."""
    path = Path(path)
    data, affine = read_volume(path)
    lo, hi = np.percentile(data, spec.percentiles)
    scaled = (np.clip(data, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0 if hi > lo else \
        np.full_like(data, -1.0)
    # Pad value -1 = the darkest intensity, like the 2D loader's black padding.
    grid, out_affine, cut = _to_grid(scaled + 1.0, affine, spec, mask=False)
    return Volume((grid.numpy() - 1.0).astype(np.float32), out_affine, cut)


def load_volume_pair(image: str | os.PathLike[str], mask: str | os.PathLike[str],
                     spec: VolumeSpec) -> tuple[Volume, Volume]:
    """An image and its lesion mask (non-zero = lesion) on the same grid; the mask must share
    the image's voxel grid on disk (shape and affine), or it would outline the wrong place."""
    image, mask = Path(image), Path(mask)
    img_data, img_affine = read_volume(image)
    m_data, m_affine = read_volume(mask)
    if m_data.shape != img_data.shape or not np.allclose(m_affine, img_affine,
                                                         atol=_AFFINE_ATOL_MM):
        raise DataError(f"{mask}: mask grid (shape {m_data.shape}, affine "
                        f"{np.round(m_affine, 3).tolist()}) differs from its image {image} "
                        f"(shape {img_data.shape}, affine {np.round(img_affine, 3).tolist()}); "
                        "a mask must be saved on its image's voxel grid.")
    vol = load_volume(image, spec)
    grid, affine, cut = _to_grid((m_data > 0).astype(np.float32), m_affine, spec, mask=True)
    return vol, Volume((grid.numpy() > 0.5).astype(np.float32), affine, cut)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a [D, H, W] volume with its affine as NIfTI, atomically (temp name, then rename)."""
    import nibabel as nib

    path = Path(path)
    if array.ndim != 3:
        raise ValueError(f"write_nifti: a volume is [D, H, W], got shape {array.shape}")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, np.float64)
                    ).to_filename(str(tmp))
    os.replace(tmp, path)
    return path


def display_view(x: torch.Tensor) -> torch.Tensor:
    """What a figure shows of a batch: images ``[N, C, H, W]`` as they are; cubic volumes
    ``[N, C, X, Y, Z]`` (RAS, as loaded) as their three orthogonal mid slices side by side,
    ``[N, C, S, 3S]``: axial, coronal, sagittal, each in radiological display (anterior or
    superior up, the patient's right on the viewer's left), as a 2D demo slice is drawn."""
    if x.ndim == 4:
        return x
    if x.ndim != 5 or len(set(x.shape[2:])) != 1:
        raise ValueError(f"display_view: expected images [N,C,H,W] or cubic volumes "
                         f"[N,C,S,S,S], got shape {tuple(x.shape)}")
    mid = x.shape[2] // 2
    views = (x[..., mid], x[:, :, :, mid, :], x[:, :, mid])  # axial, coronal, sagittal
    return torch.cat([v.transpose(-1, -2).flip(-1, -2) for v in views], dim=-1)


def grid_affine(size: int, spacing_mm: float = 1.0) -> np.ndarray:
    """The RAS affine of a run's cubic grid (what a synthetic volume is written with): axes in
    array order (the loaders reorient every volume to RAS), isotropic `spacing_mm`, centred on
    the origin. `spacing_mm` is the run's `model.voxel_mm`, or a nominal 1 mm where the loaders
    fitted each scan's field of view to the grid."""
    half = (size - 1) / 2 * spacing_mm
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = -half
    return affine
