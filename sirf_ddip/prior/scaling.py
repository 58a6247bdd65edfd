"""Explicit, reversible normalisation between image units and network units.

PET (activity, any unit: Bq/ml, kBq/ml, counts/voxel) and MR (arbitrary T1-weighted intensity) are each mapped
affinely to the network range ``[lo, hi]`` (default ``[-1, 1]``)::

    net = lo + (hi - lo) * value / scale          value = (net - lo) * scale / (hi - lo)

so that zero activity maps to ``lo`` (= −1, the background of the training images) and the *reference level*
``scale`` maps to ``hi`` (= +1). Both maps are affine and exact inverses of each other (up to floating-point
rounding).

How ``scale`` is fitted per image (``method = "percentile"``)
------------------------------------------------------------
1. Smooth the image with a Gaussian of ``smooth_sigma_vox`` voxels (noise-robust; a noisy low-dose image and its
   clean version then give nearly the same scale).
2. Head mask: smoothed value > ``mask_fraction`` × the smoothed image's maximum.
3. ``scale`` = the ``percentile``-th percentile of the smoothed values inside that mask.

Values above the reference level are *not* clipped: a hot lesion maps to net > 1. The fitted scaler's
:meth:`to_dict` records the method *and* the fitted ``scale``; the weights card stores the unfitted spec
(method and parameters) so that pretraining and reconstruction normalise the same way.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

_DEFAULTS = {
    "pet": {"method": "percentile", "percentile": 99.0, "smooth_sigma_vox": 1.0, "mask_fraction": 0.1,
            "range": [-1.0, 1.0]},
    "mr": {"method": "percentile", "percentile": 99.0, "smooth_sigma_vox": 1.0, "mask_fraction": 0.1,
           "range": [-1.0, 1.0]},
}


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


class Scaler:
    """Affine map ``value ⇄ net`` with a per-image ``scale`` (see the module docstring).

    Parameters
    ----------
    spec : dict, optional
        ``method`` ("percentile" or "fixed"), ``percentile``, ``smooth_sigma_vox``, ``mask_fraction``, ``range``
        and, once fitted (or for "fixed"), ``scale``.
    """

    kind = "generic"

    def __init__(self, spec: dict[str, Any] | None = None):
        base = copy.deepcopy(_DEFAULTS.get(self.kind, _DEFAULTS["pet"]))
        spec = dict(spec or {})
        spec.pop("kind", None)
        unknown = sorted(set(spec) - set(base) - {"scale"})
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown spec key(s) {unknown}; known: "
                             f"{sorted(set(base) | {'scale'})}")
        base.update(spec)
        if base["method"] not in ("percentile", "fixed"):
            raise ValueError(f"{type(self).__name__}: unknown method {base['method']!r} (percentile, fixed)")
        lo, hi = (float(v) for v in base["range"])
        if not hi > lo:
            raise ValueError(f"{type(self).__name__}: range must be [lo, hi] with hi > lo, got {base['range']}")
        base["range"] = [lo, hi]
        self.spec = base
        self.scale: float | None = float(base["scale"]) if base.get("scale") is not None else None
        if self.scale is not None and not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"{type(self).__name__}: scale must be finite and > 0, got {self.scale}")

    # ------------------------------------------------------------------ fitting
    def fit(self, image, mask: np.ndarray | None = None) -> "Scaler":
        """Return a copy fitted to ``image`` (array ``[z, y, x]`` or ``[y, x]``; numpy or torch).

        ``mask`` (bool, same shape) replaces the automatic head mask when given.

        Raises
        ------
        ValueError
            If the image has no positive values (nothing to normalise to) or is not finite.
        """
        arr = _to_numpy(image).astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{type(self).__name__}.fit: image contains NaN or Inf")
        new = type(self)(self.spec_unfitted())
        if self.spec["method"] == "fixed":
            if self.scale is None:
                raise ValueError(f"{type(self).__name__}: method 'fixed' needs a 'scale'")
            new.scale = self.scale
            return new
        sm = self.smoothed(arr)
        user_mask = mask is not None
        if mask is None:
            mask = self.head_mask(arr, smoothed=sm)
        vals = sm[np.asarray(mask, dtype=bool)]
        if vals.size == 0:
            raise ValueError(f"{type(self).__name__}.fit: the given mask is empty" if user_mask else
                             f"{type(self).__name__}.fit: image has no positive signal to normalise (empty head mask)")
        s = float(np.percentile(vals, float(self.spec["percentile"])))
        if not (np.isfinite(s) and s > 0):
            raise ValueError(f"{type(self).__name__}.fit: image has no positive signal to normalise "
                             f"(reference level {s})")
        new.scale = s
        return new

    def smoothed(self, arr: np.ndarray) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        sig = float(self.spec["smooth_sigma_vox"])
        return gaussian_filter(arr, sig, mode="nearest") if sig > 0 else arr

    def head_mask(self, image, smoothed: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask: smoothed image > ``mask_fraction`` × its maximum."""
        arr = _to_numpy(image).astype(np.float64)
        sm = self.smoothed(arr) if smoothed is None else smoothed
        mx = float(sm.max())
        if not mx > 0:
            return np.zeros(arr.shape, dtype=bool)
        return sm > float(self.spec["mask_fraction"]) * mx

    # ------------------------------------------------------------------ maps
    def _need_fit(self) -> float:
        if self.scale is None:
            raise RuntimeError(f"{type(self).__name__}: not fitted; call .fit(image) first (or give 'scale')")
        return self.scale

    @property
    def lo(self) -> float:
        return self.spec["range"][0]

    @property
    def hi(self) -> float:
        return self.spec["range"][1]

    @property
    def gain(self) -> float:
        """d(net)/d(value) = (hi − lo) / scale."""
        return (self.hi - self.lo) / self._need_fit()

    def to_net(self, value):
        """Image units → network units (numpy or torch, dtype preserved)."""
        s = self._need_fit()
        return self.lo + value * ((self.hi - self.lo) / s)

    def from_net(self, net):
        """Network units → image units (exact inverse of :meth:`to_net`)."""
        s = self._need_fit()
        return (net - self.lo) * (s / (self.hi - self.lo))

    # ------------------------------------------------------------------ (de)serialisation
    def spec_unfitted(self) -> dict[str, Any]:
        d = copy.deepcopy(self.spec)
        d.pop("scale", None)
        if self.spec["method"] == "fixed":
            d["scale"] = self.scale
        return d

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, **copy.deepcopy(self.spec)}
        d["scale"] = self.scale
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Scaler":
        d = dict(d or {})
        kind = d.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"{cls.__name__}: spec is for kind {kind!r}, not {cls.kind!r}")
        return cls(d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, spec={self.spec_unfitted()})"


class PETScaler(Scaler):
    """PET activity ⇄ network units (zero activity → −1, the robust 99th percentile in the head → +1)."""

    kind = "pet"


class MRScaler(Scaler):
    """MR (T1-weighted) intensity ⇄ network units (zero → −1, robust 99th percentile in the head → +1)."""

    kind = "mr"


def default_pet_spec() -> dict[str, Any]:
    return {"kind": "pet", **copy.deepcopy(_DEFAULTS["pet"])}


def default_mr_spec() -> dict[str, Any]:
    return {"kind": "mr", **copy.deepcopy(_DEFAULTS["mr"])}
