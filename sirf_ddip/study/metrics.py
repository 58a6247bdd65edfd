"""Image-quality metrics of a reconstruction ``x`` against the ground truth ``t`` (numpy, 3D ``[z, y, x]``).

Every metric is a small function with its formula in the docstring.  Regions are boolean masks of the image's
shape (brain, grey matter GM, white matter WM, lesion).  All sums/means run over the voxels of the named mask
only; voxels outside it never enter a metric.  A metric that is undefined for the inputs (empty region, zero
reference contrast, zero mean) returns ``nan`` — never a made-up number; :func:`all_metrics` reports it as
``None`` so that ``metrics.json`` stays valid JSON.

The wall time of each method is measured by the study runner (``time_s``), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import DataValueError

__all__ = [
    "Regions", "psnr", "ssim", "nrmse", "mean_bias", "contrast_recovery", "noise_cov", "uniform_region",
    "all_metrics", "METRIC_LABELS",
]

#: human-readable label and unit of every metric key written by :func:`all_metrics`
METRIC_LABELS: dict[str, str] = {
    "psnr": "PSNR in brain (dB)",
    "ssim": "SSIM in brain",
    "nrmse": "NRMSE in brain",
    "gm_bias": "GM mean bias (%)",
    "wm_bias": "WM mean bias (%)",
    "gm_wm_cr": "GM/WM contrast recovery",
    "lesion_bias": "lesion mean bias (%)",
    "noise": "noise: CoV in eroded WM (%)",
    "noise_truth": "CoV of truth in same region (%)",
    "time_s": "wall time (s)",
}


def _as_arrays(x, t, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    m = np.asarray(mask).astype(bool)
    if x.shape != t.shape or m.shape != t.shape:
        raise DataValueError(f"metrics: shapes differ: image {x.shape}, truth {t.shape}, mask {m.shape}")
    if not np.all(np.isfinite(x[m])):
        raise DataValueError("metrics: the reconstruction has NaN/Inf values inside the mask")
    return x, t, m


def _region_mean(a: np.ndarray, mask: np.ndarray) -> float:
    m = np.asarray(mask).astype(bool)
    if a.shape != m.shape:
        raise DataValueError(f"metrics: image shape {a.shape} != mask shape {m.shape}")
    if not m.any():
        return math.nan
    return float(np.asarray(a, dtype=np.float64)[m].mean())


def psnr(x, t, brain) -> float:
    r"""Peak signal-to-noise ratio in the brain (dB).

    .. math:: \mathrm{PSNR} = 10 \log_{10} \frac{P^2}{\mathrm{MSE}},\quad
              P = \max_{j\in B} t_j,\quad \mathrm{MSE} = \frac{1}{|B|}\sum_{j\in B}(x_j - t_j)^2

    with ``B`` the brain mask. ``inf`` when ``x == t`` in ``B``; ``nan`` for an empty mask.
    """
    x, t, m = _as_arrays(x, t, brain)
    if not m.any():
        return math.nan
    peak = float(t[m].max())
    mse = float(np.mean((x[m] - t[m]) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def ssim(x, t, brain, win_size: int = 7, data_range: float | None = None) -> float:
    r"""Structural similarity (3D), averaged over the brain mask.

    Uses :func:`skimage.metrics.structural_similarity` on the whole 3D volumes (``x`` tested, ``t`` reference)
    with a uniform ``win_size``³ window, ``data_range = max_B t − min_B t`` (the truth's range in the brain
    ``B``) and the default constants :math:`K_1=0.01, K_2=0.03`; the local SSIM map
    :math:`\frac{(2\mu_x\mu_t + C_1)(2\sigma_{xt}+C_2)}{(\mu_x^2+\mu_t^2+C_1)(\sigma_x^2+\sigma_t^2+C_2)}`
    is then averaged over the voxels of ``B`` only.  The mask thus selects where SSIM is *averaged*; the
    local windows near the brain edge still see the voxels just outside it (as a reader's eye would).
    When an axis is shorter than ``win_size`` the window shrinks to the largest odd size that fits (≥ 3).
    ``data_range`` may be given explicitly (e.g. when the mask is a small sub-region).
    """
    from skimage.metrics import structural_similarity

    x, t, m = _as_arrays(x, t, brain)
    if not m.any():
        return math.nan
    win = min(int(win_size), min(t.shape))
    if win % 2 == 0:
        win -= 1
    if win < 3:
        raise DataValueError(f"ssim: image shape {t.shape} too small for a 3-voxel window")
    if data_range is None:
        data_range = float(t[m].max() - t[m].min())
    if data_range <= 0:
        return math.nan
    _, smap = structural_similarity(x, t, win_size=win, data_range=data_range, full=True,
                                    gaussian_weights=False, channel_axis=None)
    return float(smap[m].mean())


def nrmse(x, t, brain) -> float:
    r"""Normalised root-mean-square error in the brain: :math:`\|x-t\|_B / \|t\|_B` (L2 norms over ``B``)."""
    x, t, m = _as_arrays(x, t, brain)
    den = float(np.sqrt(np.sum(t[m] ** 2)))
    if not m.any() or den == 0.0:
        return math.nan
    return float(np.sqrt(np.sum((x[m] - t[m]) ** 2))) / den


def mean_bias(x, t, region) -> float:
    r"""Mean bias in a region (%): :math:`100\,(\bar x_R - \bar t_R)/\bar t_R` with :math:`\bar a_R` the mean over ``R``."""
    x, t, m = _as_arrays(x, t, region)
    tm = _region_mean(t, m)
    if not np.isfinite(tm) or tm == 0.0:
        return math.nan
    return 100.0 * (_region_mean(x, m) - tm) / tm


def contrast_recovery(x, t, gm, wm) -> float:
    r"""GM/WM contrast recovery: :math:`\mathrm{CR} = (\bar x_{GM}/\bar x_{WM} - 1)/(\bar t_{GM}/\bar t_{WM} - 1)`.

    1 is perfect; < 1 means lost contrast.  ``nan`` when the truth has no GM/WM contrast
    (:math:`|\bar t_{GM}/\bar t_{WM}-1| < 10^{-6}`) or a region is empty.  Valid for either sign of the
    contrast (FDG: GM hotter; amyloid-negative: WM hotter).
    """
    xg, xw = _region_mean(np.asarray(x, np.float64), gm), _region_mean(np.asarray(x, np.float64), wm)
    tg, tw = _region_mean(np.asarray(t, np.float64), gm), _region_mean(np.asarray(t, np.float64), wm)
    if not all(np.isfinite(v) for v in (xg, xw, tg, tw)) or xw == 0.0 or tw == 0.0:
        return math.nan
    ref = tg / tw - 1.0
    if abs(ref) < 1e-6:
        return math.nan
    return (xg / xw - 1.0) / ref


def uniform_region(wm, erosion: int = 1) -> np.ndarray:
    """A uniform white-matter region: ``wm`` eroded ``erosion`` times by the 3D 6-connected cross.

    Erosion keeps the region away from partial-volume edges so that the spread of values measures noise, not
    anatomy.  The image border counts as outside.
    """
    from scipy import ndimage

    m = np.asarray(wm).astype(bool)
    if erosion <= 0:
        return m.copy()
    st = ndimage.generate_binary_structure(3, 1)
    return ndimage.binary_erosion(m, structure=st, iterations=int(erosion), border_value=0)


def noise_cov(x, region) -> float:
    r"""Noise as the coefficient of variation in a uniform region (%): :math:`100\,\sigma_R(x)/\bar x_R`.

    ``σ`` is the population standard deviation (``ddof=0``) over the voxels of ``R`` (use
    :func:`uniform_region` for an eroded WM mask).  ``nan`` for fewer than 2 voxels or a zero mean.
    """
    m = np.asarray(region).astype(bool)
    a = np.asarray(x, dtype=np.float64)
    if a.shape != m.shape:
        raise DataValueError(f"noise_cov: image shape {a.shape} != mask shape {m.shape}")
    if m.sum() < 2:
        return math.nan
    mu = float(a[m].mean())
    if mu == 0.0:
        return math.nan
    return 100.0 * float(a[m].std()) / mu


@dataclass
class Regions:
    """The masks a study case provides (boolean arrays of the image shape).

    ``lesion`` may be ``None`` (no lesion in the case: lesion bias is then ``None``).
    ``wm_erosion`` is the number of erosions giving the noise region (see :func:`uniform_region`).
    """

    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    lesion: np.ndarray | None = None
    wm_erosion: int = 1

    def __post_init__(self):
        for name in ("brain", "gm", "wm", "lesion"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, np.asarray(v) > 0.5 if np.asarray(v).dtype != bool else np.asarray(v))
        if not self.brain.any():
            raise DataValueError("Regions: the brain mask is empty")

    @property
    def noise_region(self) -> np.ndarray:
        return uniform_region(self.wm, self.wm_erosion)


def _clean(v: float) -> float | None:
    return None if (v is None or not np.isfinite(v)) else float(v)


def all_metrics(x, t, regions: Regions, extra: Mapping[str, float] | None = None) -> dict[str, float | None]:
    """All metrics of :data:`METRIC_LABELS` (except ``time_s``, added by the runner) as a JSON-ready dict.

    Undefined values (see each function) are ``None``; ``psnr`` of a perfect image is ``None`` too (infinite).
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    nr = regions.noise_region
    out = {
        "psnr": psnr(x, t, regions.brain),
        "ssim": ssim(x, t, regions.brain),
        "nrmse": nrmse(x, t, regions.brain),
        "gm_bias": mean_bias(x, t, regions.gm),
        "wm_bias": mean_bias(x, t, regions.wm),
        "gm_wm_cr": contrast_recovery(x, t, regions.gm, regions.wm),
        "lesion_bias": (mean_bias(x, t, regions.lesion)
                        if regions.lesion is not None and regions.lesion.any() else math.nan),
        "noise": noise_cov(x, nr),
        "noise_truth": noise_cov(t, nr),
    }
    res = {k: _clean(v) for k, v in out.items()}
    if extra:
        res.update({k: _clean(v) for k, v in extra.items()})
    return res
