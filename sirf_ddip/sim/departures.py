"""Where the PET departs from the MR: lesions, hypometabolic regions and smooth uptake variation (issue 30).

A prior trained only on subjects whose PET is a function of their MR learns ``PET = f(MR)`` and fills a cold
region with the uptake the MR predicts. :func:`apply_departures` modifies a phantom's *activity* only, after the
tissue model made it; the MR is made from the tissue model, so none of these is visible in the MR.

- **lesions**: hot and cold spheres of 3–30 mm diameter centred in cortical GM, deep GM or WM;
- **hypometabolism**: lobar/gyral GM regions 20–60 % below normal in the patterns of Alzheimer's disease
  (temporo-parietal, posterior cingulate/precuneus), fronto-temporal dementia (frontal, anterior temporal) and
  dementia with Lewy bodies (occipital and parietal); ellipsoids in MNI space with soft (≈ 6 mm) edges;
- **variation**: a smooth (≈ 20 mm) multiplicative log-normal field inside the brain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: MNI (x, y, z) centres and semi-axes (mm) of the hypometabolic regions of each pattern (both hemispheres
#: where x ≠ 0).
PATTERNS: dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float]]]] = {
    "ad": [((50.0, -55.0, 25.0), (22.0, 25.0, 20.0)),     # temporo-parietal
           ((0.0, -60.0, 35.0), (12.0, 20.0, 15.0))],     # posterior cingulate / precuneus
    "ftd": [((30.0, 40.0, 15.0), (25.0, 25.0, 25.0)),     # frontal
            ((42.0, 10.0, -30.0), (15.0, 20.0, 15.0))],   # anterior temporal
    "dlb": [((20.0, -85.0, 5.0), (20.0, 15.0, 20.0)),     # occipital
            ((35.0, -60.0, 45.0), (20.0, 20.0, 15.0))],   # parietal
}

#: default ranges; keys of ``spec`` override them
DEFAULTS: dict[str, Any] = {
    "num_lesions": (1, 4),               # drawn uniformly in [lo, hi]
    "lesion_diameter_mm": (3.0, 30.0),
    "lesion_hot": (1.3, 2.5),            # multiplier of the local activity
    "lesion_cold": (0.2, 0.7),
    "lesion_sites": ("cortical_gm", "deep_gm", "wm"),
    "hypometabolism": 0.5,               # probability that the subject has one pattern
    "patterns": ("ad", "ftd", "dlb"),
    "hypo_depth": (0.2, 0.6),            # fractional reduction of the GM uptake
    "bilateral": 0.7,                    # probability that a pattern is bilateral
    "variation_sd": (0.03, 0.10),        # SD of the log uptake field
    "variation_spacing_mm": 20.0,
}


def resolve_spec(spec: dict | bool | None) -> dict[str, Any] | None:
    """``True``: :data:`DEFAULTS`; a dict: DEFAULTS updated by it (unknown keys are errors); falsy: None."""
    if not spec:
        return None
    spec = {} if spec is True else dict(spec)
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"departures: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **spec}
    bad = set(out["patterns"]) - set(PATTERNS)
    if bad:
        raise ValueError(f"departures: unknown pattern(s) {sorted(bad)}; known: {sorted(PATTERNS)}")
    bad = set(out["lesion_sites"]) - set(DEFAULTS["lesion_sites"])
    if bad:
        raise ValueError(f"departures: unknown lesion site(s) {sorted(bad)}; known: {DEFAULTS['lesion_sites']}")
    return out


def site_masks(gm: np.ndarray, wm: np.ndarray, sd_mm: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate lesion-centre masks: cortical GM (within 15 mm of the brain surface), deep GM (deeper than
    25 mm: basal ganglia, thalamus) and WM (``sd_mm``: signed distance to the brain surface, < 0 inside)."""
    return {"cortical_gm": (gm >= 0.6) & (sd_mm > -15.0) & (sd_mm < -1.0),
            "deep_gm": (gm >= 0.5) & (sd_mm < -25.0),
            "wm": (wm >= 0.8)}


def region_weight(mni: np.ndarray, centre, axes, edge_mm: float = 6.0) -> np.ndarray:
    """Soft ellipsoid indicator (1 inside, 0 outside, a ≈ ``edge_mm`` ramp) at MNI points ``mni [3, ...]``."""
    r = np.sqrt(sum(((mni[i] - centre[i]) / axes[i]) ** 2 for i in range(3)))
    scale = float(np.mean(axes))
    return np.clip((1.0 - r) * scale / edge_mm + 0.5, 0.0, 1.0).astype(np.float32)


def apply_departures(activity: np.ndarray, *, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray,
                     sd_mm: np.ndarray, mni: np.ndarray, voxel_mm, gm_activity: np.ndarray,
                     rng: np.random.Generator, spec: dict, smooth_field,
                     planes: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Apply the departures of ``spec`` (:func:`resolve_spec`) to ``activity`` (returns a new array).

    Parameters
    ----------
    activity : [z, y, x] activity made by the tissue model (not modified)
    gm, wm, brain : tissue fractions
    sd_mm : signed distance to the brain surface (mm, < 0 inside)
    mni : [3, z, y, x] MNI coordinates (mm) of every voxel
    voxel_mm : (vz, vy, vx)
    gm_activity : the GM part of ``activity`` (what hypometabolism reduces)
    rng : the departures' own random stream
    smooth_field : ``(rng, shape, voxel, spacing_mm, n) -> [n, z, y, x]`` smooth unit-SD fields
    planes : (start, stop), optional
        Plane range of the lesion centres.

    Returns
    -------
    activity, departure_mask, meta
        The new activity, a float32 [z, y, x] weight (1 where the PET departs from the tissue model by a lesion or
        region) and a JSON-serialisable record of every departure.
    """
    shape = activity.shape
    vz, vy, vx = (float(v) for v in voxel_mm)
    out = activity.astype(np.float64).copy()
    where = np.zeros(shape, dtype=np.float32)
    meta: dict[str, Any] = {"lesions": [], "hypometabolism": None, "variation_sd": 0.0}

    # smooth within-tissue variation (multiplicative, brain only)
    vsd = float(rng.uniform(*spec["variation_sd"]))
    field = smooth_field(rng, shape, (vz, vy, vx), float(spec["variation_spacing_mm"]), 1)[0]
    out *= np.where(brain > 0, np.exp(vsd * field * brain), 1.0)
    meta["variation_sd"] = vsd

    # hypometabolism: a lobar pattern lowers the GM uptake
    if rng.random() < float(spec["hypometabolism"]) and spec["patterns"]:
        name = str(rng.choice(tuple(spec["patterns"])))
        depth = float(rng.uniform(*spec["hypo_depth"]))
        bilateral = bool(rng.random() < float(spec["bilateral"]))
        side = float(rng.choice([-1.0, 1.0]))
        wgt = np.zeros(shape, dtype=np.float32)
        for (cx, cy, cz), axes in PATTERNS[name]:
            sides = [1.0, -1.0] if (bilateral and cx != 0) else [side]
            for sgn in sides:
                wgt = np.maximum(wgt, region_weight(mni, (sgn * cx, cy, cz), axes))
        out -= depth * wgt * gm_activity * (out / np.maximum(activity, 1e-12))
        where = np.maximum(where, wgt)
        meta["hypometabolism"] = {"pattern": name, "depth": depth, "bilateral": bilateral,
                                  "side": None if bilateral else ("right" if side > 0 else "left")}

    # lesions: hot and cold spheres in cortical GM, deep GM and WM
    sites = site_masks(gm, wm, sd_mm)
    if planes is not None:
        keep = np.zeros(shape[0], dtype=bool)
        keep[max(int(planes[0]), 0):int(planes[1])] = True
        sites = {k: v & keep[:, None, None] for k, v in sites.items()}
    lo_n, hi_n = spec["num_lesions"]
    n_les = int(rng.integers(int(lo_n), int(hi_n) + 1))
    zc, yc, xc = (np.arange(n) * v for n, v in zip(shape, (vz, vy, vx)))
    w = float(np.mean([vz, vy, vx]))
    for _ in range(n_les):
        site = str(rng.choice(tuple(spec["lesion_sites"])))
        cand = np.argwhere(sites[site])
        kind = str(rng.choice(("hot", "cold")))
        factor = float(rng.uniform(*spec["lesion_hot" if kind == "hot" else "lesion_cold"]))
        diam = float(rng.uniform(*spec["lesion_diameter_mm"]))
        if cand.size == 0:
            continue
        ctr = cand[int(rng.integers(len(cand)))]
        cm = ctr * np.array([vz, vy, vx])
        d = np.sqrt((zc[:, None, None] - cm[0]) ** 2 + (yc[None, :, None] - cm[1]) ** 2
                    + (xc[None, None, :] - cm[2]) ** 2)
        f = (np.clip((0.5 * diam - d) / w + 0.5, 0.0, 1.0) * brain).astype(np.float32)
        out *= 1.0 + (factor - 1.0) * f
        where = np.maximum(where, f)
        meta["lesions"].append({"kind": kind, "site": site, "factor": factor, "diameter_mm": diam,
                                "centre_index_zyx": [int(v) for v in ctr]})
    return np.clip(out, 0.0, None).astype(np.float32), where, meta
