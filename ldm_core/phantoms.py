"""Procedural demo data: axial "brain MRI" phantoms with lesions, patients and sites.

Why: the project must run end to end (and in CI) without any real patient data. The phantoms are
built to exercise what real data exercises: several slices per patient (so patient-level splits
matter), several acquisition sites that differ in intensity, bias field, noise and blur (so the
federation is really heterogeneous), mildly different label mixes per site, and lesions that are
clear at the demo's 32 px but now and then small and faint (so a classifier does very well but
not perfectly; ``benchmarks/demo_difficulty.py`` checks that a SmallCNN lands at macro AUC
0.95-0.999 there).

Anatomy (T1-like contrast): scalp, dark skull, CSF rim, folded grey/white matter, lateral
ventricles, interhemispheric fissure, deep grey nuclei on lower slices, smooth tissue texture.
Classes: ``normal``; ``tumor`` (ring-enhancing mass, necrotic core, faint oedema halo); ``cyst``
(sharp, round, CSF-dark); ``edema`` (large, soft-edged darkening). A patient has one lesion, seen
on all of the patient's slices with a cross-section that shrinks away from its centre.

Everything is vectorised numpy over a batch of slices and driven by one ``numpy.random.Generator``
seeded from ``seed``, so the same seed gives bit-identical images.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "CLASS_NAMES", "DEMO_LESIONS", "LESIONS_3D", "LesionKnobs", "class_probs", "generate_demo",
    "render_demo", "render_demo_pairs",
]

#: Demo classes, alphabetical so that their ids match what ``ldm_core.data.scan`` assigns.
CLASS_NAMES: tuple[str, ...] = ("cyst", "edema", "normal", "tumor")
_CYST, _EDEMA, _NORMAL, _TUMOR = range(4)
_BASE_CLASS_PROBS = np.array([0.22, 0.22, 0.32, 0.24])
_CHUNK = 256  # slices per vectorised batch: bounds memory at large image sizes


@dataclass(frozen=True)
class LesionKnobs:
    """How visible a patient's lesion is. Size: radius as a fraction of the half field of
    view (log-uniform); contrast: blend weight towards the lesion intensity (uniform); a
    ``hard_fraction`` of patients gets the small, faint ranges. Changing the ranges does not
    change how many random numbers are drawn, so healthy anatomy stays bit-identical."""

    hard_fraction: float
    clear_size: tuple[float, float]
    hard_size: tuple[float, float]
    clear_contrast: tuple[float, float]
    hard_contrast: tuple[float, float]


#: The 2D demo's lesions: clearly separable at the demo's 32 px (a real-trained SmallCNN with
#: the evaluation's recipe: macro AUC 0.99, ``benchmarks/demo_difficulty.py``), because the
#: demo exists to show that a DP generator learns each class's defining feature; a task a
#: real-trained classifier itself half fails (the knobs before: AUC 0.91-0.96 at 32 px, most
#: lesions 3-5 px across) measures the judge as much as the generator. TSTR stays honest on
#: an easy task: a synthetic set without the class features scores AUC ~0.5 whatever TRTR is.
DEMO_LESIONS = LesionKnobs(hard_fraction=0.05, clear_size=(0.26, 0.42), hard_size=(0.12, 0.2),
                           clear_contrast=(0.85, 1.0), hard_contrast=(0.4, 0.7))
#: The 3D demo keeps the knobs it was tuned and measured with (docs/benchmarks.md section 12):
#: at 32^3 a lesion spans several slices, so these are already clear to the 3D judge.
LESIONS_3D = LesionKnobs(hard_fraction=0.15, clear_size=(0.17, 0.33), hard_size=(0.06, 0.13),
                         clear_contrast=(0.7, 1.0), hard_contrast=(0.2, 0.5))


def _col(a: np.ndarray) -> np.ndarray:
    """[N] -> [N, 1, 1] for broadcasting against [N, H, W] grids."""
    return np.asarray(a, dtype=np.float32)[:, None, None]


def _edge(d: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """Anti-aliased step: 1 where d >> 0, 0 where d << 0, linear over ``width``."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _gauss_matrix(size: int, sigma_px: np.ndarray) -> np.ndarray:
    """Row-normalised 1D Gaussian smoothing matrices [..., size, size] (sigma ~0: identity).

    Separable blurs as two small matmuls are exact at the borders (no wrap-around) and, at these
    image sizes, much faster than FFTs.
    """
    sig = np.maximum(np.asarray(sigma_px, dtype=np.float32), 1e-3)[..., None, None]
    idx = np.arange(size, dtype=np.float32)
    g = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sig) ** 2)
    return g / g.sum(axis=-1, keepdims=True)


def _interp_matrix(size: int, m: int) -> np.ndarray:
    """Linear interpolation matrix [size, m] from an m-cell grid to a size-cell grid."""
    pos = np.clip((np.arange(size) + 0.5) * m / size - 0.5, 0, m - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, m - 1)
    w = (pos - lo).astype(np.float32)
    a = np.zeros((size, m), dtype=np.float32)
    a[np.arange(size), lo] += 1.0 - w
    a[np.arange(size), hi] += w
    return a


def _smooth_noise(rng: np.random.Generator, n: int, size: int, sigma_frac: float) -> np.ndarray:
    """Unit-variance Gaussian random field [n, size, size] with correlation ~ sigma_frac*size.

    Drawn on a coarse grid (>= 2 coarse pixels per sigma) and interpolated up: same look, far
    fewer random numbers for the smooth fields.
    """
    m = int(min(size, max(8, np.ceil(2.0 / sigma_frac))))
    mat = _interp_matrix(size, m) @ _gauss_matrix(m, np.float32(sigma_frac * m))
    white = rng.standard_normal((n, m, m), dtype=np.float32)
    field = mat @ white @ mat.T
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-6
    return field


def _blur(img: np.ndarray, sigma_px: np.ndarray) -> np.ndarray:
    """Gaussian blur with a per-image sigma in pixels (separable, renormalised at borders)."""
    g = _gauss_matrix(img.shape[-1], sigma_px)
    return g @ img @ np.swapaxes(g, -1, -2)


def class_probs(rare: tuple[str, float] | None = None) -> np.ndarray:
    """The demo's class mix; ``rare=(name, fraction)`` makes one class that rare on average.

    Why a rare class: augmenting an under-represented class is one of the uses the demo must be
    able to show (`fedldm augment`), and the default mix is nearly balanced.
    """
    if rare is None:
        return _BASE_CLASS_PROBS
    name, fraction = rare
    if name not in CLASS_NAMES:
        raise ValueError(f"phantoms: rare class {name!r} is not one of {list(CLASS_NAMES)}")
    if not 0.0 < fraction < _BASE_CLASS_PROBS[CLASS_NAMES.index(name)]:
        raise ValueError(f"phantoms: rare fraction {fraction} must lie in (0, "
                         f"{_BASE_CLASS_PROBS[CLASS_NAMES.index(name)]}) for {name!r} (its "
                         "default share): rarer than by default")
    k = CLASS_NAMES.index(name)
    others = np.delete(np.arange(len(CLASS_NAMES)), k)
    probs = _BASE_CLASS_PROBS.copy()
    probs[others] *= (1.0 - fraction) / probs[others].sum()
    probs[k] = fraction
    return probs


def _site_params(rng: np.random.Generator, n_sites: int,
                 probs: np.ndarray = _BASE_CLASS_PROBS) -> dict[str, np.ndarray]:
    """Per-site acquisition settings: the source of between-site heterogeneity."""
    return {
        "gamma": rng.uniform(0.75, 1.35, n_sites),
        "gain": rng.uniform(0.8, 1.1, n_sites),
        "offset": rng.uniform(0.0, 0.06, n_sites),
        "noise": rng.uniform(0.02, 0.05, n_sites),
        "blur": rng.uniform(0.0, 1.1, n_sites),  # in pixels at 64 px
        "bias_x": rng.uniform(-0.35, 0.35, n_sites),
        "bias_y": rng.uniform(-0.35, 0.35, n_sites),
        "bias_r": rng.uniform(-0.3, 0.1, n_sites),
        "class_probs": np.stack([rng.dirichlet(probs * 40.0) for _ in range(n_sites)]),
    }


def _patient_params(
    rng: np.random.Generator, n_patients: int, n_sites: int, site_p: dict[str, np.ndarray],
    lesions: LesionKnobs = DEMO_LESIONS,
) -> dict[str, np.ndarray]:
    """Per-patient anatomy, label and lesion; shared by all of the patient's slices."""
    sites = rng.permutation(np.arange(n_patients) % n_sites)
    u = rng.random(n_patients)
    cum = np.cumsum(site_p["class_probs"][sites], axis=1)
    labels = (u[:, None] > cum).sum(axis=1).clip(0, len(CLASS_NAMES) - 1)
    hard = rng.random(n_patients) < lesions.hard_fraction
    p: dict[str, np.ndarray] = {
        "site": sites,
        "label": labels,
        "ax": rng.uniform(0.66, 0.76, n_patients),  # head half-width (left-right)
        "ay": rng.uniform(0.80, 0.90, n_patients),  # head half-length (front-back)
        "cx": rng.uniform(-0.04, 0.04, n_patients),
        "cy": rng.uniform(-0.04, 0.04, n_patients),
        "rot": rng.uniform(-0.15, 0.15, n_patients),
        "z0": rng.uniform(-0.25, 0.3, n_patients),  # slab centre (slice level)
        "vent": rng.uniform(0.7, 1.4, n_patients),  # ventricle size (atrophy)
        "gm": rng.uniform(0.40, 0.48, n_patients),
        "wm": rng.uniform(0.66, 0.76, n_patients),
        "cortex": rng.uniform(0.16, 0.24, n_patients),  # cortical band thickness (rho units)
        # lesion: polar position inside the brain (head coordinates), size, contrast, shape
        "l_r": np.sqrt(rng.uniform(0.04, 0.5, n_patients)),
        "l_t": rng.uniform(0, 2 * np.pi, n_patients),
        "l_size": np.where(
            hard,
            np.exp(rng.uniform(*np.log(lesions.hard_size), n_patients)),
            np.exp(rng.uniform(*np.log(lesions.clear_size), n_patients)),
        ),
        "l_contrast": np.where(
            hard,
            rng.uniform(*lesions.hard_contrast, n_patients),
            rng.uniform(*lesions.clear_contrast, n_patients),
        ),
        "l_irreg": rng.uniform(0.0, 0.25, n_patients),
        "l_phase": rng.uniform(0, 2 * np.pi, (n_patients, 2)),
    }
    return p


def _render_chunk(
    rng: np.random.Generator,
    pp: dict[str, np.ndarray],
    z: np.ndarray,
    site_p: dict[str, np.ndarray],
    size: int,
    shared_fields: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Render slices whose per-patient params ``pp`` are already gathered per slice.

    -> images [N,H,W] in [0, 1] and lesion masks [N,H,W] (bool; empty for normal slices).
    ``shared_fields``: the N slices are one patient's volume, so they share one draw of each
    smooth random field (folding, texture, bias) and the anatomy is continuous across them."""
    n = z.shape[0]

    def field(sigma_frac: float) -> np.ndarray:
        if shared_fields:
            return np.broadcast_to(_smooth_noise(rng, 1, size, sigma_frac), (n, size, size))
        return _smooth_noise(rng, n, size, sigma_frac)

    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    gy, gx = lin[None, :, None], lin[None, None, :]
    px = 2.0 / size  # one pixel in [-1, 1] units

    # Head frame: rotate/shift, shrink with distance from the mid slice level.
    # A volume (shared_fields) spans the whole head: an ellipsoid that closes at the crown.
    shrink = (np.sqrt(np.clip(1.0 - z**2, 0.02, 1.0)) if shared_fields
              else np.sqrt(np.clip(1.0 - 0.55 * z**2, 0.3, 1.0)))
    ax, ay = _col(pp["ax"] * shrink), _col(pp["ay"] * shrink)
    c, s = _col(np.cos(pp["rot"])), _col(np.sin(pp["rot"]))
    dx, dy = gx - _col(pp["cx"]), gy - _col(pp["cy"])
    u, v = c * dx + s * dy, -s * dx + c * dy  # u: left-right, v: front-back
    rho = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    aa = px / np.minimum(ax, ay)  # anti-aliasing width in rho units

    # Folding: a smooth random field bends the grey/white boundary into gyri; a weaker one
    # roughens the brain surface (sulcal CSF).
    folds = field(0.028)
    surface = field(0.05)
    head = _edge(1.0 - rho, aa)
    skull_in = _edge(0.92 - rho, aa)
    brain = _edge(0.855 - rho + 0.025 * surface - 0.03 * np.clip(folds, 0, None), aa)
    wm_edge = 0.86 - _col(pp["cortex"]) * (1.0 + 0.3 * _col(z))
    white = _edge(wm_edge - rho + 0.09 * folds, aa)

    scalp_int, skull_int, csf_int = 0.72, 0.1, 0.14
    img = head * scalp_int
    img = img + skull_in * (skull_int - scalp_int) * head
    img = img + brain * (csf_int - skull_int)
    gm, wm = _col(pp["gm"]), _col(pp["wm"])
    img = img + brain * (gm - csf_int) + white * brain * (wm - gm)

    # Interhemispheric fissure: thin CSF line on the midline, front and back.
    fissure = np.exp(-((u / (0.9 * px)) ** 2)) * _edge(np.abs(v) - 0.4 * ay, 2 * px) * brain
    img = img + fissure * (csf_int - img) * 0.8

    # Deep grey nuclei (thalami) near the centre on lower slices.
    deep = np.clip(0.9 - 2.0 * _col(z), 0.0, 1.0) * 0.8
    for side in (-1.0, 1.0):
        du, dv = (u - side * 0.15 * ax) / (0.11 * ax), (v - 0.14 * ay) / (0.15 * ay)
        d = np.sqrt(du**2 + dv**2)
        img = img - deep * _edge(1.0 - d, 0.25) * (wm - gm) * 0.8

    # Lateral ventricles: frontal horns close to the midline, bodies curving apart towards the
    # back; largest at mid-brain levels, absent high up.
    vz = _col(pp["vent"] * np.clip(1.0 - (z / 0.75) ** 2, 0.0, 1.0))
    vent = np.zeros_like(img)
    for side in (-1.0, 1.0):
        vu, vv = u - side * 0.09 * ax, v + 0.02 * ay
        ca, sa = np.cos(side * 0.22), np.sin(side * 0.22)
        ru, rv = ca * vu - sa * vv, sa * vu + ca * vv
        wid, length = 0.075 * ax * vz + 1e-3, 0.30 * ay * np.sqrt(vz) + 1e-3
        bow = 0.5 * (rv / length) ** 2  # banana curvature, bulging outwards
        taper = 1.0 - 0.35 * (rv / length)  # front horn fuller than the back
        d = np.sqrt(((ru - side * bow * wid) / (wid * taper)) ** 2 + (rv / length) ** 2)
        vent = np.maximum(vent, _edge(1.0 - d, px / wid) * (vz > 0.02))
    img = img + vent * (csf_int - img) * brain

    # Smooth tissue texture inside the brain.
    tex = field(0.05)
    img = img * (1.0 + 0.05 * tex * brain)

    img, mask = _add_lesions(img, pp, u, v, ax, ay, z, brain, white, px, closed=shared_fields)

    # Site acquisition: bias field, gamma/gain, blur, Rician noise.
    sites = pp["site"]
    bias = np.exp(
        _col(site_p["bias_x"][sites]) * gx
        + _col(site_p["bias_y"][sites]) * gy
        + _col(site_p["bias_r"][sites]) * (gx**2 + gy**2)
        + 0.08 * field(0.2)
    )
    img = np.clip(img * bias, 0.0, None)
    img = _col(site_p["gain"][sites]) * img ** _col(site_p["gamma"][sites])
    img = img + _col(site_p["offset"][sites]) * head
    img = _blur(img, site_p["blur"][sites] * size / 64.0)
    sigma = _col(site_p["noise"][sites])
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return np.clip(img, 0.0, 1.0), mask


def _add_lesions(
    img: np.ndarray,
    pp: dict[str, np.ndarray],
    u: np.ndarray,
    v: np.ndarray,
    ax: np.ndarray,
    ay: np.ndarray,
    z: np.ndarray,
    brain: np.ndarray,
    white: np.ndarray,
    px: float,
    closed: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the patient's lesion on each slice; its cross-section shrinks away from z0 (to
    nothing with ``closed``, a volume's lesion; 2D slabs keep a minimum size).

    Also returns the lesion mask: the painted region's core (inside the lesion boundary and
    the brain), what a segmentation label would outline; the tumour's oedema halo is not in
    it, the edema's soft centre is."""
    label = pp["label"]
    lu = _col(pp["l_r"] * np.cos(pp["l_t"])) * ax * 0.8
    lv = _col(pp["l_r"] * np.sin(pp["l_t"])) * ay * 0.8
    # A volume's lesion is a blob about as tall as it is wide; a 2D slab's is taller, so that
    # every slice of the slab shows it.
    dz = (z - pp["z0"]) / (1.2 * pp["l_size"] if closed else 2.5 * pp["l_size"] + 0.3)
    r = _col(pp["l_size"] * np.sqrt(np.clip(1.0 - dz**2, 1e-4 if closed else 0.3, 1.0)))
    du, dv = u - lu, v - lv
    ang = np.arctan2(dv, du)
    irreg = _col(pp["l_irreg"])
    ph0, ph1 = _col(pp["l_phase"][:, 0]), _col(pp["l_phase"][:, 1])
    wobble = 1.0 + irreg * (np.sin(2 * ang + ph0) + 0.6 * np.sin(3 * ang + ph1))
    d = np.sqrt(du**2 + dv**2) / (r * wobble)  # 1 on the lesion boundary
    a = _col(pp["l_contrast"]) * brain
    inside = _edge(1.0 - d, px / r)
    if closed:  # beyond the blob's top and bottom there is no lesion, not a one-pixel one
        inside = inside * _col(np.abs(dz) < 1.0)
    is_ = {k: _col(label == k) for k in (_CYST, _EDEMA, _TUMOR)}

    def blend(base: np.ndarray, weight: np.ndarray, target: float) -> np.ndarray:
        return base + weight * (target - base)

    # Tumour: enhancing rim brighter than anything else in the brain, necrotic core, oedema halo.
    rim = np.exp(-(((d - 0.78) / 0.2) ** 2))
    halo = np.exp(-((np.clip(d - 0.9, 0.0, None) / 0.5) ** 2)) * (d > 0.9)
    tumor = blend(img, a * 0.5 * halo, 0.45)
    tumor = blend(tumor, a * inside * (d < 0.6), 0.3)
    tumor = blend(tumor, a * rim, 0.98)
    # Cyst: sharp-edged, round, CSF-dark.
    cyst = blend(img, a * inside, 0.12)
    # Edema: large, soft-edged darkening (grey-matter-like), strongest in white matter.
    soft = np.exp(-((d / 1.2) ** 2)) * (0.6 + 0.4 * white)
    edema = blend(img, a * soft, 0.38)
    out = img
    for k, painted in ((_TUMOR, tumor), (_CYST, cyst), (_EDEMA, edema)):
        out = np.where(is_[k] > 0, painted, out)
    lesion = (is_[_TUMOR] + is_[_CYST] + is_[_EDEMA]) > 0
    mask = lesion & (inside > 0.5) & (brain > 0.5)
    return out, mask


def _validate(n_patients: int, slices_per_patient: int, n_sites: int, image_size: int) -> None:
    for name, value, low in (
        ("n_patients", n_patients, 1),
        ("slices_per_patient", slices_per_patient, 1),
        ("n_sites", n_sites, 1),
        ("image_size", image_size, 16),
    ):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"phantoms: {name} must be an integer >= {low}, got {value!r}.")
    if n_sites > n_patients:
        raise ValueError(
            f"phantoms: n_sites ({n_sites}) exceeds n_patients ({n_patients}); "
            "every site needs at least one patient."
        )


def render_demo(
    *,
    n_patients: int = 300,
    slices_per_patient: int = 4,
    n_sites: int = 3,
    image_size: int = 64,
    seed: int = 0,
    rare: tuple[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Render the demo set in memory (`render_demo_pairs` without the masks)."""
    images, _, labels, patients, sites, names = render_demo_pairs(
        n_patients=n_patients, slices_per_patient=slices_per_patient, n_sites=n_sites,
        image_size=image_size, seed=seed, rare=rare)
    return images, labels, patients, sites, names


def render_demo_pairs(
    *,
    n_patients: int = 300,
    slices_per_patient: int = 4,
    n_sites: int = 3,
    image_size: int = 64,
    seed: int = 0,
    rare: tuple[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...],
           tuple[str, ...]]:
    """Render the demo set and its lesion masks in memory.

    Returns ``(images, masks, labels, patients, sites, class_names)``: images uint8
    ``[N, H, W]``, masks uint8 ``[N, H, W]`` (255 = lesion, pixel-aligned; empty on normal
    slices and where a slice misses the lesion), with
    ``N = n_patients * slices_per_patient`` ordered patient-major, labels int64 ``[N]`` indexing
    ``class_names`` (alphabetical), and per-image patient ids (``p0000``...) and site ids
    (``site-0``...). ``rare=(class, fraction)`` makes that class rare (:func:`class_probs`).
    """
    _validate(n_patients, slices_per_patient, n_sites, image_size)
    probs = class_probs(rare)
    rng = np.random.default_rng(seed)
    site_p = _site_params(rng, n_sites, probs)
    pat = _patient_params(rng, n_patients, n_sites, site_p)

    # Slice levels: contiguous slab around each patient's z0, spacing jittered.
    k = np.arange(slices_per_patient) - (slices_per_patient - 1) / 2.0
    spacing = rng.uniform(0.08, 0.14, n_patients)
    z = pat["z0"][:, None] + spacing[:, None] * k[None, :]
    z = (z + rng.uniform(-0.02, 0.02, z.shape)).reshape(-1)
    owner = np.repeat(np.arange(n_patients), slices_per_patient)

    images = np.empty((owner.size, image_size, image_size), dtype=np.uint8)
    masks = np.empty_like(images)
    for start in range(0, owner.size, _CHUNK):
        sl = slice(start, start + _CHUNK)
        pp = {key: val[owner[sl]] for key, val in pat.items()}
        pp["rot"] = pp["rot"] + rng.uniform(-0.03, 0.03, owner[sl].size)  # head motion
        chunk, mask = _render_chunk(rng, pp, z[sl].astype(np.float32), site_p, image_size)
        images[sl] = np.round(chunk * 255.0).astype(np.uint8)
        masks[sl] = mask.astype(np.uint8) * 255

    labels = pat["label"][owner].astype(np.int64)
    patients = tuple(f"p{i:04d}" for i in owner)
    sites = tuple(f"site-{s}" for s in pat["site"][owner])
    return images, masks, labels, patients, sites, CLASS_NAMES


def generate_demo(
    out_dir: Path,
    *,
    n_patients: int = 300,
    slices_per_patient: int = 4,
    n_sites: int = 3,
    image_size: int = 64,
    seed: int = 0,
    rare: tuple[str, float] | None = None,
) -> Path:
    """Write the demo set as ``out_dir/<class>/<patient>_<slice>.png``, each lesion mask as
    ``out_dir/masks/<class>/<patient>_<slice>.png``, plus ``manifest.csv``.

    The manifest has columns ``path,label,mask,patient,site`` (paths relative to ``out_dir``), so
    ``ldm_core.data.scan(out_dir)`` picks it up with patient ids and sites. Returns the manifest
    path. Existing files with the same names are overwritten.
    """
    out_dir = Path(out_dir)
    images, masks, labels, patients, sites, class_names = render_demo_pairs(
        n_patients=n_patients,
        slices_per_patient=slices_per_patient,
        n_sites=n_sites,
        image_size=image_size,
        seed=seed,
        rare=rare,
    )
    for label in np.unique(labels):  # only classes that occur: empty folders fail scan()
        (out_dir / class_names[label]).mkdir(parents=True, exist_ok=True)
        (out_dir / "masks" / class_names[label]).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(images.shape[0]):
        rel = f"{class_names[labels[i]]}/{patients[i]}_{i % slices_per_patient}.png"
        Image.fromarray(images[i]).save(out_dir / rel, compress_level=1)
        Image.fromarray(masks[i]).save(out_dir / "masks" / rel, compress_level=1)
        rows.append((rel, class_names[labels[i]], f"masks/{rel}", patients[i], sites[i]))
    return write_manifest(out_dir, rows)


def write_manifest(out_dir: Path, rows: list[tuple[str, str, str, str, str]]) -> Path:
    """``out_dir/manifest.csv`` with columns path,label,mask,patient,site (the 2D and 3D
    demos' layout, read by ``ldm_core.data.scan``)."""
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "label", "mask", "patient", "site"))
        writer.writerows(rows)
    return manifest
