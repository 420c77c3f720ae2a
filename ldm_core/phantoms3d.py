"""3D demo phantoms: head volumes with lesions and lesion masks, per-site acquisition, as NIfTI.

The same procedural anatomy as the 2D demo (ldm_core.phantoms), rendered as a stack of slices
through the whole head for each patient: one patient's slices share their smooth random fields
(cortical folding, texture, bias field), so the anatomy is continuous across slices, while the
acquisition noise stays independent per voxel. Sites differ in acquisition exactly as in 2D.

Used by ``fedldm simulate --data demo3d`` (the sites' data) and, from another seed, by the
shipped 3D autoencoder priors (``ldm_core.pretrain.public_volumes``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldm_core.phantoms import (
    CLASS_NAMES,
    LESIONS_3D,
    _patient_params,
    _render_chunk,
    _site_params,
    _validate,
    class_probs,
    write_manifest,
)

__all__ = ["HEAD_EXTENT_MM", "demo3d_affine", "generate_demo3d", "render_demo3d"]

# The phantom head's field of view: slices and pixels span [-1, 1] in head units, this many mm.
HEAD_EXTENT_MM = 180.0
# Slice levels covered by a volume (head units; the 2D demo's slabs lie within).
_Z_RANGE = (-0.7, 0.98)


def demo3d_affine(size: int) -> np.ndarray:
    """The RAS affine of a demo volume [D, H, W]: D runs inferior -> superior, H anterior ->
    posterior (image rows go down), W right -> left (radiological display); isotropic voxels."""
    s = HEAD_EXTENT_MM / size
    half = HEAD_EXTENT_MM / 2 - s / 2
    return np.array([[0.0, 0.0, -s, half],
                     [0.0, -s, 0.0, half],
                     [s, 0.0, 0.0, -half],
                     [0.0, 0.0, 0.0, 1.0]])


def render_demo3d(*, n_patients: int = 60, n_sites: int = 3, size: int = 32, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...],
                             tuple[str, ...]]:
    """Volumes uint8 [P, D, H, W] (D = H = W = size), masks uint8 (255 = lesion), labels [P],
    patient ids and site ids; one volume per patient."""
    _validate(n_patients, 1, n_sites, size)
    rng = np.random.default_rng(seed)
    site_p = _site_params(rng, n_sites, class_probs())
    pat = _patient_params(rng, n_patients, n_sites, site_p, LESIONS_3D)
    z = np.linspace(*_Z_RANGE, size, dtype=np.float32)
    volumes = np.empty((n_patients, size, size, size), dtype=np.uint8)
    masks = np.empty_like(volumes)
    for i in range(n_patients):
        pp = {key: np.repeat(val[i:i + 1], size, axis=0) for key, val in pat.items()}
        img, mask = _render_chunk(rng, pp, z, site_p, size, shared_fields=True)
        volumes[i] = np.round(img * 255.0).astype(np.uint8)
        masks[i] = mask.astype(np.uint8) * 255
    labels = pat["label"].astype(np.int64)
    return (volumes, masks, labels, tuple(f"p{i:04d}" for i in range(n_patients)),
            tuple(f"site-{s}" for s in pat["site"]))


def generate_demo3d(out_dir: Path, *, n_patients: int = 60, n_sites: int = 3, size: int = 32,
                    seed: int = 0) -> Path:
    """Write ``<class>/<patient>.nii.gz``, ``masks/<class>/<patient>.nii.gz`` and
    ``manifest.csv`` (path,label,mask,patient,site); returns the manifest's path."""
    from ldm_core.volumes import write_nifti

    out_dir = Path(out_dir)
    volumes, masks, labels, patients, sites = render_demo3d(
        n_patients=n_patients, n_sites=n_sites, size=size, seed=seed)
    affine = demo3d_affine(size)
    rows = []
    for i in range(n_patients):
        name = CLASS_NAMES[labels[i]]
        rel = f"{name}/{patients[i]}.nii.gz"
        for sub, arr in (("", volumes[i]), ("masks/", masks[i])):
            (out_dir / sub / name).mkdir(parents=True, exist_ok=True)
            write_nifti(arr.astype(np.float32), affine, out_dir / sub / rel)
        rows.append((rel, name, f"masks/{rel}", patients[i], sites[i]))
    return write_manifest(out_dir, rows)
