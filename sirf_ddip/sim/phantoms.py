"""Random brain subjects from the MNI152 2009 templates: PET activity, T1-like MR, tissue masks, μ-map.

Anatomy source
--------------
nilearn ships (inside the wheel, so no download) the ICBM 2009a nonlinear *symmetric* MNI152 templates at 1 mm:
the skull-stripped T1 and the probabilistic grey- and white-matter maps (``load_mni152_template`` /
``load_mni152_gm_template`` / ``load_mni152_wm_template`` with ``resolution=1``; each is the bundled uint8 file
divided by its maximum). They are read, never copied into this repository (their licence is the MNI's, not ours).
Where nilearn is not installed, :func:`save_template_cache` on another machine writes an ``.npz`` that
:func:`load_templates` reads instead (also found through ``$SIRF_DDIP_TEMPLATE_CACHE``).

References
----------
V. S. Fonov, A. C. Evans, R. C. McKinstry, C. R. Almli, D. L. Collins. Unbiased nonlinear average
age-appropriate brain templates from birth to adulthood. NeuroImage 47 (2009) S102.
V. Fonov, A. C. Evans, K. Botteron, C. R. Almli, R. C. McKinstry, D. L. Collins. Unbiased average
age-appropriate atlases for pediatric studies. NeuroImage 54 (2011) 313-327.

How a subject is made (:func:`make_subject`)
---------------------------------------------
One resampling pass from template space: for every voxel centre ``r`` of the target grid (STIR gantry mm,
relative to the FOV centre), the template position is ``m = P · diag(1/s) · Rᵀ (r − t) + c + u(r)`` with

- ``t, R, s``: pose shift, rotation ``R = Rz(roll) Ry(yaw) Rx(pitch)`` and per-axis head scale;
- ``P``: STIR → MNI axes, ``x_MNI = −x``, ``y_MNI = −y``, ``z_MNI = z`` (head-first supine: patient left towards
  +x, posterior towards +y, which points down in STIR, superior towards +z);
- ``c``: the MNI point placed at the FOV centre (:data:`HEAD_CENTRE_MNI`, the centre of the head with scalp);
- ``u``: a smooth random displacement field (cubic B-spline-like interpolation of a coarse random lattice,
  ~24 mm spacing, amplitude of a few mm).

The T1, GM and WM maps (lightly pre-smoothed against aliasing) and a signed distance to the brain surface are
read at ``m`` with ``scipy.ndimage.map_coordinates`` (trilinear). Tissue fractions follow: brain from the signed
distance (partial volume over one voxel), GM and WM from the probabilistic maps (sharpened, see
:data:`TISSUE_SHARPENING`), CSF = brain − GM − WM, and with
``rim=True`` shells outside the brain (extra-cerebral CSF, skull, scalp) of per-subject thickness. Activity is the
fraction-weighted sum of per-tissue uptakes (:data:`TRACERS`, varied per subject), times a smooth ±8 % regional
modulation, plus optional spherical lesions. The MR is the deformed T1 (plus dark skull, bright scalp fat), a
smooth multiplicative bias field and Rician noise. The μ-map (cm⁻¹) is water (0.096) for soft tissue and brain,
bone (0.15) for the skull.

Subjects, seeds and splits
--------------------------
``(seed, split)`` fully determines the subject; ``split="train"`` and ``split="test"`` draw from different
``numpy.random.SeedSequence`` entropy (``[split_code, seed]``), so their streams are disjoint. Anatomy and pose
do not depend on the tracer: the same ``(seed, split)`` is the same head scanned with another tracer.
Poses (:data:`POSES`): ``"train"`` (default for the training split) draws pitch within ±10°, yaw and roll
within ±5°; ``"tilted"`` (default for the test split) draws pitch 14°–20° (chin down, as in a head holder), a
pose that training never sees; ``"neutral"`` has no rotation, shift or scale change.
"""

from __future__ import annotations

import functools
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..data import Image
from ..errors import ConfigError, InputFileError
from ..geometry.image import ImageGrid
from .departures import apply_departures, resolve_spec

__all__ = [
    "TRACERS", "POSES", "SPLITS", "HEAD_CENTRE_MNI", "MMR_VOXEL_SIZE_MM", "MU_WATER_PER_CM", "MU_BONE_PER_CM",
    "Subject", "load_templates", "save_template_cache", "mmr_brain_grid", "make_subject", "subject_rng",
]

# ----------------------------------------------------------------------------------------------- constants
#: mMR image voxel (z, y, x) in mm: ring spacing / 2 axially, STIR's 2.08626 mm transaxially (zoom 1, 344 bins).
MMR_VOXEL_SIZE_MM: tuple[float, float, float] = (2.03125, 2.08626, 2.08626)
#: Default number of planes of :func:`mmr_brain_grid`: 90 × 2.03125 mm = 182.8 mm covers a head with scalp.
MMR_BRAIN_PLANES = 90
#: Exponent applied to the template's GM/WM/CSF probabilities before renormalising: the MNI152 maps are averages
#: over 152 brains and blurrier than one subject's anatomy; 2 gives FDG GM/WM ROI ratios of ~2.6 at 2 mm voxels
#: for a 4:1 pure-tissue uptake ratio, as in clinical FDG images.
TISSUE_SHARPENING = 2.0
#: Linear attenuation coefficients at 511 keV (cm⁻¹).
MU_WATER_PER_CM = 0.096
MU_BONE_PER_CM = 0.15
#: MNI point (mm) placed at the FOV centre: the centre of the head (brain bounding box x −72..72, y −107..73,
#: z −72..82, plus ~14 mm scalp).
HEAD_CENTRE_MNI: tuple[float, float, float] = (0.0, -17.0, 10.0)

#: Tracer uptakes at scan time in kBq/mL (typical adult injections, decay-corrected to the scan), per tissue.
#: ``lesion_hot`` / ``lesion_cold``: ranges of the lesion/background multiplier; ``lesion_kinds``: allowed kinds.
#:
#: - ``fdg``: [18F]FDG, 370 MBq, scan 30-60 min p.i.: cortical GM SUV ≈ 8 (≈ 28 kBq/mL), GM/WM ≈ 4.
#: - ``amyloid-negative``: [18F]florbetapir / flutemetamol, 50-70 min p.i., amyloid-negative: non-specific white
#:   matter binding above grey matter (WM 1.0 : GM 0.6), WM ≈ 8 kBq/mL.
#: - ``amyloid-positive``: the same tracer with cortical plaque binding: GM ≈ WM (GM/WM ≈ 1.05).
TRACERS: dict[str, dict[str, Any]] = {
    "fdg": {"gm": 28.0, "wm": 7.0, "csf": 1.0, "csf_rim": 1.0, "skull": 2.0, "scalp": 4.0,
            "lesion_kinds": ("hot",), "lesion_hot": (1.6, 3.0), "lesion_cold": (0.2, 0.5)},
    "amyloid-negative": {"gm": 4.8, "wm": 8.0, "csf": 0.6, "csf_rim": 0.6, "skull": 1.2, "scalp": 2.0,
                         "lesion_kinds": ("hot", "cold"), "lesion_hot": (1.5, 2.5), "lesion_cold": (0.2, 0.5)},
    "amyloid-positive": {"gm": 8.4, "wm": 8.0, "csf": 0.6, "csf_rim": 0.6, "skull": 1.2, "scalp": 2.0,
                         "lesion_kinds": ("hot", "cold"), "lesion_hot": (1.5, 2.5), "lesion_cold": (0.2, 0.5)},
}

#: Pose distributions: uniform ranges (deg) of pitch (about x, + = chin down), yaw (about y), roll (about z);
#: shift SD (mm) transaxially and axial shift range (mm); SD of the global head scale.
POSES: dict[str, dict[str, Any]] = {
    "neutral": {"pitch": (0.0, 0.0), "yaw": (0.0, 0.0), "roll": (0.0, 0.0), "shift_xy_sd": 0.0,
                "shift_z": (0.0, 0.0), "scale_sd": 0.0},
    "train": {"pitch": (-10.0, 10.0), "yaw": (-5.0, 5.0), "roll": (-5.0, 5.0), "shift_xy_sd": 4.0,
              "shift_z": (-5.0, 5.0), "scale_sd": 0.05},
    "tilted": {"pitch": (14.0, 20.0), "yaw": (-5.0, 5.0), "roll": (-5.0, 5.0), "shift_xy_sd": 4.0,
               "shift_z": (-5.0, 5.0), "scale_sd": 0.05},
}
#: Split → SeedSequence code and default pose.
SPLITS: dict[str, tuple[int, str]] = {"train": (0x5452, "train"), "test": (0x5445, "tilted")}

_TEMPLATE_KEYS = ("t1", "gm", "wm")
_MEM: dict[str, dict] = {}
_PREPARED: dict[tuple, dict] = {}


# ----------------------------------------------------------------------------------------------- templates
def load_templates(cache: str | Path | None = None) -> dict:
    """The MNI152 2009a templates at 1 mm: ``{"t1", "gm", "wm"}`` float32 ``[i, j, k]`` (MNI x, y, z), ``"affine"``.

    Parameters
    ----------
    cache : path, optional
        An ``.npz`` written by :func:`save_template_cache`. If None, nilearn's bundled files are read (offline);
        if nilearn is not importable, ``$SIRF_DDIP_TEMPLATE_CACHE`` is tried.

    Returns
    -------
    dict
        Read-only arrays (cached in memory per source), ``"affine"`` (4 × 4, voxel → MNI mm) and ``"source"``.
    """
    if cache is None:
        try:
            import nilearn.datasets  # noqa: F401
        except ImportError:
            env = os.environ.get("SIRF_DDIP_TEMPLATE_CACHE")
            if not env:
                raise ConfigError("brain phantoms need nilearn (bundled MNI152 templates) or a template cache: "
                                  "pass cache=... or set SIRF_DDIP_TEMPLATE_CACHE to an .npz written by "
                                  "sirf_ddip.sim.phantoms.save_template_cache") from None
            cache = env
    key = "nilearn" if cache is None else str(Path(cache).resolve())
    if key in _MEM:
        return _MEM[key]
    if cache is None:
        from nilearn import datasets

        imgs = {"t1": datasets.load_mni152_template(resolution=1),
                "gm": datasets.load_mni152_gm_template(resolution=1),
                "wm": datasets.load_mni152_wm_template(resolution=1)}
        out: dict[str, Any] = {k: np.asarray(v.get_fdata(dtype=np.float32), dtype=np.float32) for k, v in imgs.items()}
        out["affine"] = np.asarray(imgs["t1"].affine, dtype=np.float64)
        out["source"] = "nilearn MNI152 2009a (ICBM152 nlin sym 09a), 1 mm"
    else:
        path = Path(cache)
        if not path.is_file():
            raise InputFileError(path, "template cache not found (write one with save_template_cache)")
        out = {}
        try:
            with np.load(path, allow_pickle=False) as z:
                for k in _TEMPLATE_KEYS:
                    if k not in z:
                        raise InputFileError(path, "missing array in template cache", key=k)
                    a = z[k]
                    if a.dtype == np.uint8:
                        a = a.astype(np.float32) / np.float32(z[k + "_divisor"])
                    out[k] = np.asarray(a, dtype=np.float32)
                if "affine" not in z:
                    raise InputFileError(path, "missing array in template cache", key="affine")
                out["affine"] = np.asarray(z["affine"], dtype=np.float64)
                out["source"] = str(z["source"]) if "source" in z else f"template cache {path}"
        except (OSError, ValueError) as exc:
            raise InputFileError(path, f"cannot read template cache: {exc}") from None
    shapes = {k: out[k].shape for k in _TEMPLATE_KEYS}
    if len(set(shapes.values())) != 1 or out["affine"].shape != (4, 4):
        raise InputFileError(key, f"inconsistent template shapes {shapes} / affine {out['affine'].shape}")
    for k in _TEMPLATE_KEYS:
        out[k].flags.writeable = False
    _MEM[key] = out
    return out


def save_template_cache(path: str | Path, templates: dict | None = None, overwrite: bool = False) -> Path:
    """Write the templates (default: nilearn's) to an ``.npz`` that :func:`load_templates` reads without nilearn.

    Arrays that are exactly ``uint8 / divisor`` (nilearn's are) are stored losslessly as uint8 (~5 MB file).
    """
    from ..utils.provenance import check_output

    path = check_output(path, overwrite)
    t = templates if templates is not None else load_templates()
    arrays: dict[str, Any] = {"affine": np.asarray(t["affine"], dtype=np.float64), "source": np.array(str(t["source"]))}
    for k in _TEMPLATE_KEYS:
        a = np.asarray(t[k], dtype=np.float32)
        amax = float(a.max())
        if amax > 0:
            # nilearn divides the uint8 file by its maximum; find that maximum again (255 for these files)
            for divisor in (255.0, amax * 255.0):
                u = np.rint(a * np.float32(divisor))
                if u.min() >= 0 and u.max() <= 255:
                    u8 = u.astype(np.uint8)
                    if np.array_equal(u8.astype(np.float32) / np.float32(divisor), a):
                        arrays[k] = u8
                        arrays[k + "_divisor"] = np.float32(divisor)
                        break
        if k not in arrays:
            arrays[k] = a
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def _prepared(templates: dict, sigma_mm: float) -> dict:
    """Pre-smoothed T1/GM/WM and the signed distance to the brain surface (mm), cropped to the head."""
    key = (id(templates), round(float(sigma_mm), 2))
    if key in _PREPARED:
        return _PREPARED[key]
    aff = templates["affine"]
    vox = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    if not np.allclose(aff[:3, :3], np.diag(vox), atol=1e-6):
        raise InputFileError(templates.get("source", "templates"), "template affine must be diagonal (MNI 1 mm)")
    brain = templates["t1"] > 0
    margin = int(np.ceil(40.0 / vox.min()))
    nz = np.nonzero(brain)
    lo = [max(int(i.min()) - margin, 0) for i in nz]
    hi = [min(int(i.max()) + margin + 1, s) for i, s in zip(nz, brain.shape)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    b = brain[sl]
    sd = (ndimage.distance_transform_edt(~b, sampling=vox) - ndimage.distance_transform_edt(b, sampling=vox))
    # the voxel-centre distance is 0 just outside and -1 just inside; centre the surface between them
    sd = np.where(b, sd + 0.5 * vox.min(), sd - 0.5 * vox.min()).astype(np.float32)
    prep = {"sd": sd, "start": np.array(lo, dtype=np.float64), "vox": vox, "aff": aff}
    for k in _TEMPLATE_KEYS:
        a = np.asarray(templates[k][sl], dtype=np.float32)
        prep[k] = ndimage.gaussian_filter(a, sigma_mm / vox) if sigma_mm > 0 else a
    _PREPARED.clear()  # keep one prepared set in memory
    _PREPARED[key] = prep
    return prep


# ----------------------------------------------------------------------------------------------- grid
def mmr_brain_grid(nz: int | None = None, nxy: int = 128) -> ImageGrid:
    """A Siemens mMR image grid for a brain: ``nxy × nxy`` voxels of 2.08626 mm, ``nz`` planes of 2.03125 mm.

    Parameters
    ----------
    nz : int, optional
        Number of planes; default :data:`MMR_BRAIN_PLANES` (90, 182.8 mm: a head with scalp). The mMR's own is 127.
    nxy : int
        Transaxial size (128: a 267 mm FOV).
    """
    nz = MMR_BRAIN_PLANES if nz is None else int(nz)
    return ImageGrid((nz, int(nxy), int(nxy)), MMR_VOXEL_SIZE_MM)


# ----------------------------------------------------------------------------------------------- subject
@dataclass
class Subject:
    """A simulated subject on one grid.

    Attributes
    ----------
    activity : Image
        True activity concentration (kBq/mL).
    mr : Image
        T1-weighted-like MR (arbitrary units, white matter ≈ 0.8-1).
    masks : dict[str, numpy.ndarray]
        Boolean ``[z, y, x]`` masks: ``brain, gm, wm, csf, lesion`` (tissue fraction ≥ 0.5; GM, WM, CSF and
        lesions lie inside the brain) and ``head, skull, scalp``.
    meta : dict
        Everything that made it: seed, split, tracer, pose, scale, deformation amplitude, uptakes, lesions.
    mu_map : Image
        Linear attenuation coefficients at 511 keV (cm⁻¹).
    fractions : dict[str, numpy.ndarray]
        Float32 tissue fractions ``brain, gm, wm, csf, csf_rim, skull, scalp, lesion``.
    """

    activity: Image
    mr: Image
    masks: dict[str, np.ndarray]
    meta: dict[str, Any]
    mu_map: Image | None = None
    fractions: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def grid(self) -> ImageGrid:
        return self.activity.grid


def subject_rng(seed: int, split: str, stream: int) -> np.random.Generator:
    """Generator of one random stream (0 anatomy, 1 uptakes, 2 lesions, 3 MR, 4 departures) of subject ``(seed, split)``."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if int(seed) < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([SPLITS[split][0], int(seed), int(stream)]))


def _rotation(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """``Rz(roll) Ry(yaw) Rx(pitch)`` on (x, y, z) STIR vectors; angles in degrees."""
    a, b, c = np.deg2rad([pitch, yaw, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@functools.lru_cache(maxsize=64)
def _upsample_matrix(n_out: int, n_coarse: int) -> np.ndarray:
    """``(n_out, n_coarse)`` cubic-spline interpolation weights, lattice ends aligned with the grid ends."""
    eye = np.eye(n_coarse)
    w = np.stack([ndimage.zoom(eye[i], n_out / n_coarse, order=3, mode="nearest", grid_mode=False)[:n_out]
                  for i in range(n_coarse)], axis=1)
    w.flags.writeable = False
    return w


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], voxel: tuple[float, ...],
                  spacing_mm: float, n: int = 1) -> np.ndarray:
    """``n`` smooth random fields (unit SD at the lattice) on ``shape``: cubic upsampling of a coarse lattice.

    The upsampling is separable (three small matrix products), the same as ``ndimage.zoom(order=3)``.
    """
    coarse = tuple(max(int(np.ceil(s * v / spacing_mm)) + 1, 2) for s, v in zip(shape, voxel))
    lat = rng.standard_normal((n,) + coarse)
    wz, wy, wx = (_upsample_matrix(int(s), c) for s, c in zip(shape, coarse))
    out = np.einsum("nabc,za->nzbc", lat, wz)
    out = np.einsum("nzbc,yb->nzyc", out, wy)
    out = np.einsum("nzyc,xc->nzyx", out, wx, optimize=True)
    return out.astype(np.float32)


def _draw_pose(rng: np.random.Generator, pose: str) -> dict[str, float]:
    if pose not in POSES:
        raise ConfigError(f"pose must be one of {sorted(POSES)}, got {pose!r}")
    p = POSES[pose]
    out = {k: float(rng.uniform(*p[k])) for k in ("pitch", "yaw", "roll")}
    sx, sy = rng.standard_normal(2) * p["shift_xy_sd"]
    out.update(shift_x=float(np.clip(sx, -3 * p["shift_xy_sd"], 3 * p["shift_xy_sd"])),
               shift_y=float(np.clip(sy, -3 * p["shift_xy_sd"], 3 * p["shift_xy_sd"])),
               shift_z=float(rng.uniform(*p["shift_z"])))
    g = float(np.exp(np.clip(rng.standard_normal(), -2.5, 2.5) * p["scale_sd"]))
    aniso = np.exp(np.clip(rng.standard_normal(3), -2.5, 2.5) * 0.5 * p["scale_sd"])
    out.update(scale_x=float(g * aniso[0]), scale_y=float(g * aniso[1]), scale_z=float(g * aniso[2]))
    return out


def _shell(sd: np.ndarray, inner: float, outer: float, width: float) -> np.ndarray:
    """Fraction of a voxel lying between signed distances ``inner`` and ``outer`` (linear over ``width``)."""
    f_out = np.clip((outer - sd) / width + 0.5, 0.0, 1.0)
    f_in = np.clip((inner - sd) / width + 0.5, 0.0, 1.0)
    return (f_out - f_in).astype(np.float32)


def make_subject(grid: ImageGrid, tracer: str = "fdg", seed: int = 0, *, split: str = "train",
                 deform: bool = True, lesions: bool | None = None, pose: str | None = None, rim: bool = True,
                 axial_offset_mm: float = 0.0, templates: dict | None = None,
                 lesion_planes: tuple[int, int] | None = None, lesion_kinds: tuple[str, ...] | None = None,
                 num_lesions: int | None = None, departures: dict | bool | None = None,
                 departure_planes: tuple[int, int] | None = None) -> Subject:
    """A random subject resampled onto ``grid`` (one interpolation pass from template space).

    Parameters
    ----------
    grid : ImageGrid
        Target grid (STIR coordinates; the head centre :data:`HEAD_CENTRE_MNI` goes to the grid's centre).
    tracer : str
        A key of :data:`TRACERS`.
    seed : int
        With ``split``, fully determines the subject.
    split : {"train", "test"}
        Disjoint random streams; also the default pose (``"train"`` → ``"train"``, ``"test"`` → ``"tilted"``).
    deform : bool
        Apply the smooth random displacement field (amplitude 1.5-3.5 mm SD at ~24 mm lattice spacing).
    lesions : bool, optional
        True: 1-3 lesions; False: none; None: lesions in half of the subjects (drawn from the seed).
    pose : str, optional
        A key of :data:`POSES`; default from ``split``.
    rim : bool
        Add extra-cerebral CSF, skull and scalp shells (low uptake) around the brain.
    axial_offset_mm : float
        Superior shift (mm) of the MNI point placed at the grid centre: picks an axial slab when ``grid`` is thin.
    templates : dict, optional
        From :func:`load_templates` (default: nilearn's).
    lesion_planes : (start, stop), optional
        Plane index range where lesion centres may lie (e.g. the simulated slab of a whole-head grid).
    lesion_kinds : tuple of "hot"/"cold", optional
        Kinds to draw from instead of the tracer's ``lesion_kinds`` (e.g. cold lesions in FDG, for validating a
        prior on lesions the MR does not show). The random stream is consumed as without it, so the rest of the
        subject (anatomy, uptakes, MR, lesion sites and sizes) is unchanged; the kinds are drawn from their own
        stream seeded by ``seed``.
    num_lesions : int, optional
        Number of lesions instead of the drawn 1-3 (``>= 1``; the first lesions are those drawn without it).
    departures : dict or bool, optional
        PET that departs from the MR (:mod:`sirf_ddip.sim.departures`): True for the defaults, a dict to override
        them. Drawn from their own random stream and applied to the activity only: the MR (and everything
        else) is bit-identical to the subject without them. ``meta["departures"]`` records them and
        ``masks["departure"]`` / ``fractions["departure"]`` show where they are.
    departure_planes : (start, stop), optional
        Plane index range where the departures' lesion centres may lie.

    Returns
    -------
    Subject
    """
    if lesion_kinds is not None and (not lesion_kinds or set(lesion_kinds) - {"hot", "cold"}):
        raise ValueError(f"make_subject: lesion_kinds must be a non-empty subset of ('hot', 'cold'), got "
                         f"{lesion_kinds!r}")
    if tracer not in TRACERS:
        raise ConfigError(f"unknown tracer {tracer!r}; known: {', '.join(TRACERS)}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    pose = SPLITS[split][1] if pose is None else pose
    templates = load_templates() if templates is None else templates
    vz, vy, vx = grid.voxel_size
    shape = grid.shape
    prep = _prepared(templates, sigma_mm=0.35 * float(np.mean([vy, vx])))

    rng_a = subject_rng(seed, split, 0)
    rng_u = np.random.default_rng(np.random.SeedSequence([SPLITS[split][0], int(seed), 1, zlib.crc32(tracer.encode())]))
    rng_l = subject_rng(seed, split, 2)
    rng_m = subject_rng(seed, split, 3)

    # ---------------------------------------------------------------- geometry: r (STIR mm) -> template index
    p = _draw_pose(rng_a, pose)
    R = _rotation(p["pitch"], p["yaw"], p["roll"])
    s = np.array([p["scale_x"], p["scale_y"], p["scale_z"]])
    P = np.diag([-1.0, -1.0, 1.0])
    # m = P diag(1/s) R^T (r - t) + c ;  index = (m - aff_offset)/vox - start
    M = P @ np.diag(1.0 / s) @ R.T
    t = np.array([p["shift_x"], p["shift_y"], p["shift_z"]])
    c = np.array(HEAD_CENTRE_MNI, dtype=np.float64) + np.array([0.0, 0.0, float(axial_offset_mm)])
    vox_t, off_t = prep["vox"], prep["aff"][:3, 3]
    A = M / vox_t[:, None]
    b = (c - M @ t - off_t) / vox_t - prep["start"]
    z = (np.arange(shape[0]) - 0.5 * (shape[0] - 1)) * vz
    y = grid.coords(1)
    x = grid.coords(2)
    idx = [(A[i, 0] * x[None, None, :] + A[i, 1] * y[None, :, None] + A[i, 2] * z[:, None, None] + b[i])
           for i in range(3)]
    amp = 0.0
    if deform:
        amp = float(rng_a.uniform(1.5, 3.5))
        u = _smooth_field(rng_a, shape, (vz, vy, vx), spacing_mm=24.0, n=3)
        for i in range(3):
            idx[i] = idx[i] + u[i] * (amp / vox_t[i])
    tshape = np.array(prep["sd"].shape)
    inside = np.ones(shape, dtype=bool)
    for i in range(3):
        inside &= (idx[i] >= 0) & (idx[i] <= tshape[i] - 1)
    pts = np.stack([idx[i][inside] for i in range(3)]).astype(np.float32)

    def sample(name: str, outside: float) -> np.ndarray:
        out = np.full(shape, outside, dtype=np.float32)
        out[inside] = ndimage.map_coordinates(prep[name], pts, order=1, mode="nearest", output=np.float32)
        return out

    t1 = sample("t1", 0.0)
    gm = sample("gm", 0.0)
    wm = sample("wm", 0.0)
    sd = sample("sd", 1e3)  # template mm; scale to subject mm
    sd *= np.float32(np.mean(s))
    w = float(np.mean([vx, vy, vz]))  # partial-volume ramp width (mm)

    brain = np.clip(0.5 - sd / w, 0.0, 1.0).astype(np.float32)
    brain = np.maximum(brain, np.clip(gm + wm, 0.0, 1.0))
    # tissue fractions: the template's probabilities (an average over 152 brains) sharpened by an exponent
    # (TISSUE_SHARPENING), renormalised to the brain fraction; CSF is the rest of the brain
    csf_p = np.clip(1.0 - gm - wm, 0.0, 1.0)
    gm_s, wm_s, csf_s = gm ** TISSUE_SHARPENING, wm ** TISSUE_SHARPENING, csf_p ** TISSUE_SHARPENING
    tot = gm_s + wm_s + csf_s
    tot[tot <= 0] = 1.0
    gm = (gm_s / tot * brain).astype(np.float32)
    wm = (wm_s / tot * brain).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    th = {"csf_rim": 0.0, "skull": 0.0, "scalp": 0.0}
    if rim:
        th = {"csf_rim": float(rng_a.uniform(1.5, 3.0)), "skull": float(rng_a.uniform(5.0, 8.0)),
              "scalp": float(rng_a.uniform(4.0, 7.0))}
    e1 = th["csf_rim"]
    e2 = e1 + th["skull"]
    e3 = e2 + th["scalp"]
    if rim:
        csf_rim = np.minimum(_shell(sd, 0.0, e1, w), 1.0 - brain)
        skull = np.minimum(_shell(sd, e1, e2, w), 1.0 - brain - csf_rim)
        scalp = np.clip(np.minimum(_shell(sd, e2, e3, w), 1.0 - brain - csf_rim - skull), 0.0, 1.0)
    else:
        csf_rim = skull = scalp = np.zeros(shape, dtype=np.float32)

    # ---------------------------------------------------------------- uptakes (per subject) and activity
    tr = TRACERS[tracer]
    glob_scale = float(np.exp(np.clip(rng_u.standard_normal(), -2.5, 2.5) * 0.2))
    upt = {k: float(tr[k] * glob_scale * np.exp(np.clip(rng_u.standard_normal(), -2.5, 2.5) * 0.08))
           for k in ("gm", "wm", "csf", "csf_rim", "skull", "scalp")}
    mod_amp = 0.08
    mod = 1.0 + mod_amp * _smooth_field(rng_u, shape, (vz, vy, vx), spacing_mm=40.0, n=1)[0]
    activity = (upt["gm"] * gm + upt["wm"] * wm) * mod + upt["csf"] * csf
    activity += upt["csf_rim"] * csf_rim + upt["skull"] * skull + upt["scalp"] * scalp

    # ---------------------------------------------------------------- lesions
    lesion = np.zeros(shape, dtype=np.float32)
    lesion_list: list[dict] = []
    has_lesions = bool(rng_l.random() < 0.5) if lesions is None else bool(lesions)
    if has_lesions:
        cand = np.argwhere(brain > 0.95)
        if lesion_planes is not None:
            cand = cand[(cand[:, 0] >= lesion_planes[0]) & (cand[:, 0] < lesion_planes[1])]
        n_les = int(rng_l.integers(1, 4))
        rng_kind = np.random.default_rng([int(seed), 2, 7])
        if num_lesions is not None:
            if int(num_lesions) < 1:
                raise ValueError(f"make_subject: num_lesions must be >= 1, got {num_lesions}")
            n_les = int(num_lesions)
        zc = np.arange(shape[0]) * vz
        yc = np.arange(shape[1]) * vy
        xc = np.arange(shape[2]) * vx
        for _ in range(n_les):
            if cand.size == 0:
                break
            kind = str(rng_l.choice(tr["lesion_kinds"]))
            if lesion_kinds is not None:     # its own stream: the subject's other draws stay as without it
                kind = str(rng_kind.choice(tuple(lesion_kinds)))
            factor = float(rng_l.uniform(*tr["lesion_hot" if kind == "hot" else "lesion_cold"]))
            radius = float(rng_l.uniform(3.0, 8.0))
            ctr = cand[int(rng_l.integers(len(cand)))].astype(np.float64)
            ctr_mm = ctr * np.array([vz, vy, vx])
            lo = [max(int(np.floor((cm - radius - 2 * v) / v)), 0) for cm, v in zip(ctr_mm, (vz, vy, vx))]
            hi = [min(int(np.ceil((cm + radius + 2 * v) / v)) + 1, n) for cm, v, n in zip(ctr_mm, (vz, vy, vx), shape)]
            dz = zc[lo[0]:hi[0], None, None] - ctr_mm[0]
            dy = yc[None, lo[1]:hi[1], None] - ctr_mm[1]
            dx = xc[None, None, lo[2]:hi[2]] - ctr_mm[2]
            d = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2)
            f = np.clip((radius - d) / w + 0.5, 0.0, 1.0).astype(np.float32)
            f *= brain[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
            activity[box] *= 1.0 + (factor - 1.0) * f
            lesion[box] = np.maximum(lesion[box], f)
            centre_mm_stir = [float(grid.coords(2)[int(ctr[2])]), float(grid.coords(1)[int(ctr[1])]),
                              float(z[int(ctr[0])])]
            lesion_list.append({"kind": kind, "factor": factor, "radius_mm": radius,
                                "centre_index_zyx": [int(v) for v in ctr],
                                "centre_mm_xyz_from_fov_centre": centre_mm_stir})
    activity = np.clip(activity, 0.0, None).astype(np.float32)

    # ---------------------------------------------------------------- departures of the PET from the MR
    dep_spec = resolve_spec(departures)
    departure = np.zeros(shape, dtype=np.float32)
    dep_meta = None
    if dep_spec is not None:
        mni = np.stack([(idx[i] + prep["start"][i]) * vox_t[i] + off_t[i] for i in range(3)])
        activity, departure, dep_meta = apply_departures(
            activity, gm=gm, wm=wm, brain=brain, sd_mm=sd, mni=mni, voxel_mm=(vz, vy, vx),
            gm_activity=(upt["gm"] * gm * mod).astype(np.float32), rng=subject_rng(seed, split, 4),
            spec=dep_spec, smooth_field=_smooth_field, planes=departure_planes)

    # ---------------------------------------------------------------- MR (T1-like)
    gamma = float(rng_m.uniform(0.85, 1.15))
    mr = np.power(np.clip(t1, 0.0, None), gamma, dtype=np.float32)
    if rim:
        mr += 0.10 * csf_rim + 0.05 * skull + 0.55 * scalp
    bias_amp = float(rng_m.uniform(0.04, 0.10))
    bias = np.exp(bias_amp * _smooth_field(rng_m, shape, (vz, vy, vx), spacing_mm=80.0, n=1)[0])
    mr *= bias
    noise_sd = float(rng_m.uniform(0.01, 0.025))
    n1 = rng_m.standard_normal(shape, dtype=np.float32) * noise_sd
    n2 = rng_m.standard_normal(shape, dtype=np.float32) * noise_sd
    mr = np.sqrt((mr + n1) ** 2 + n2 ** 2).astype(np.float32)

    # ---------------------------------------------------------------- μ-map (cm^-1)
    mu = (MU_WATER_PER_CM * (brain + csf_rim + scalp) + MU_BONE_PER_CM * skull).astype(np.float32)

    fractions = {"brain": brain, "gm": gm.astype(np.float32), "wm": wm.astype(np.float32),
                 "csf": csf.astype(np.float32), "csf_rim": csf_rim, "skull": skull, "scalp": scalp,
                 "lesion": lesion, "departure": departure}
    bmask = brain >= 0.5
    masks = {"brain": bmask, "gm": (gm >= 0.5) & bmask, "wm": (wm >= 0.5) & bmask, "csf": (csf >= 0.5) & bmask,
             "lesion": (lesion >= 0.5) & bmask, "head": (brain + csf_rim + skull + scalp) >= 0.5,
             "skull": skull >= 0.5, "scalp": scalp >= 0.5, "departure": (departure >= 0.5) & bmask}
    meta = {"seed": int(seed), "split": split, "tracer": tracer, "pose_name": pose, "pose": p, "deform": bool(deform),
            "deform_amplitude_mm": amp, "rim": bool(rim), "rim_thickness_mm": th, "uptake_kBq_per_mL": upt,
            "global_uptake_scale": glob_scale, "regional_modulation_sd": mod_amp, "lesions": lesion_list,
            "axial_offset_mm": float(axial_offset_mm), "head_centre_mni_mm": list(map(float, c)),
            "departures": dep_meta, "mr": {"gamma": gamma, "bias_log_sd": bias_amp, "noise_sd": noise_sd},
            "units": {"activity": "kBq/mL", "mu_map": "cm^-1", "mr": "a.u."},
            "templates": str(templates.get("source", "?"))}
    return Subject(activity=Image(activity, grid, {"units": "kBq/mL"}), mr=Image(mr, grid, {"units": "a.u."}),
                   masks=masks, meta=meta, mu_map=Image(mu, grid, {"units": "cm^-1"}), fractions=fractions)
