"""The prior's in-plane grid beside the PET grid: the score network sees its training grid, the data step the PET's.

The shipped priors were trained on 2.5D slabs of 3 planes of ``128 × 128`` voxels of 2.08626 mm (the weights card,
``training.data.grid``; :func:`sirf_ddip.prior.weights.training_grid_yx`). A clinical PET image has another in-plane
size (the mMR's 344 × 344 or STIR's 285 × 285 for span 11) and possibly another voxel size. :class:`PriorGrid`
maps a PET volume ``[..., H, W]`` onto the prior's in-plane grid ``[..., Ny, Nx]`` and back; the planes are
untouched, so any number of planes works (the 3-plane slabs slide over them; a volume of fewer than 3 planes is
edge-replicated by the one padding helper of :mod:`sirf_ddip.prior.slabs`). The HQS data step (EM, projector)
always stays on the PET grid; only the network's state (``x_t``, ``x̂0``, the MR in network units) lives on the
prior grid.

Modes
-----
``"pad_crop"``
    Keep the PET voxels. The prior grid is a window of ``Ny × Nx`` PET voxels centred on the scanner axis
    (``x = y = 0``; STIR's convention for the window's own centre voxel, index ``N // 2``), zero-padded where the PET
    image is smaller. The round trip is exact inside the window. Right when the PET voxel is (close to) the
    prior's.
``"resample"``
    Resample in-plane to the prior's voxel size and training size (a window of ``Ny · vy × Nx · vx`` mm centred on
    the axis) and back, by first-order *conservative* remapping: each target voxel takes the area-weighted mean of
    the source voxels it overlaps (separable overlap matrices, :func:`overlap_matrix`). Both directions therefore
    preserve **total activity** (Σ value × voxel area) of whatever lies inside the window, and a uniform
    concentration stays that concentration. Mass preservation is the property the DDIP loop needs: the image the
    prior returns is forward-projected by the data step, and a resampling that changed the total activity would
    bias every HQS fusion step by that factor; conservative remapping also keeps concentrations (what the PET
    scaler and the network work in) for smooth images, and it does not alias when it downsamples (linear
    interpolation would). A round trip smooths by at most one voxel of the coarser grid.

Field of view
-------------
The prior represents only its window (267 mm for the shipped priors). ``fov_radius_mm`` is the radius of the disc
about the scanner axis that the prior must cover (for a brain: the head, e.g. from the MR or μ-map support via
:func:`support_radius_mm`); :class:`PriorGrid` refuses with :class:`PriorGridError` when it does not fit, and
:meth:`PriorGrid.check_fits` does the same for a mask. What lies outside the window never reaches the network:
:meth:`PriorGrid.from_prior` gives 0 there, or the ``outside`` image (e.g. the current HQS image, which makes the
prior the identity outside its window so that the HQS step is plain EM there).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, GeometryMismatchError
from ..geometry.image import ImageGrid

__all__ = ["PriorGrid", "PriorGridError", "GridResampledWarning", "MODES", "overlap_matrix", "mr_on_pet_grid",
           "support_radius_mm"]

log = logging.getLogger("sirf_ddip")

#: The two documented ways of putting a PET volume on the prior's grid.
MODES = ("pad_crop", "resample")


class PriorGridError(GeometryMismatchError):
    """The region the prior must cover does not fit in the prior's in-plane window."""


class GridResampledWarning(UserWarning):
    """An image was resampled onto another grid (e.g. the MR onto the PET grid)."""


def overlap_matrix(src_first: float, src_voxel: float, src_n: int, dst_first: float, dst_voxel: float,
                   dst_n: int) -> np.ndarray:
    """Overlap lengths of 1D voxels: ``M[i, j]`` = length (mm) of ``dst`` voxel ``i`` ∩ ``src`` voxel ``j``.

    Parameters
    ----------
    src_first, dst_first : float
        Centre (mm) of voxel 0.
    src_voxel, dst_voxel : float
        Voxel size (mm).
    src_n, dst_n : int
        Number of voxels.

    Returns
    -------
    ndarray [dst_n, src_n], float64
    """
    s_lo = src_first + src_voxel * (np.arange(src_n) - 0.5)
    d_lo = dst_first + dst_voxel * (np.arange(dst_n) - 0.5)
    lo = np.maximum(d_lo[:, None], s_lo[None, :])
    hi = np.minimum(d_lo[:, None] + dst_voxel, s_lo[None, :] + src_voxel)
    return np.clip(hi - lo, 0.0, None)


def support_radius_mm(mask: Any, grid: ImageGrid) -> float:
    """Radius (mm) about the scanner axis of the smallest disc holding every ``True`` voxel of ``mask``.

    Parameters
    ----------
    mask : bool array or tensor [..., H, W] on ``grid``'s in-plane shape
    grid : ImageGrid

    Returns
    -------
    float
        Distance of the farthest voxel *corner*, so the disc holds the voxels whole; 0 for an empty mask.
    """
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    m = m.astype(bool)
    if m.ndim > 2:
        m = m.reshape(-1, *m.shape[-2:]).any(axis=0)
    if not m.any():
        return 0.0
    jy, ix = np.nonzero(m)
    y = np.abs(grid.coords(1)[jy]) + 0.5 * grid.voxel_size[1]
    x = np.abs(grid.coords(2)[ix]) + 0.5 * grid.voxel_size[2]
    return float(np.sqrt(y * y + x * x).max())


@dataclass(frozen=True)
class _Axis:
    """One in-plane axis of the map: ``n`` PET voxels of ``v`` mm from ``first``, ``N`` prior voxels of ``V`` mm
    from ``First`` (voxel-0 centres, mm)."""

    n: int
    v: float
    first: float
    N: int
    V: float
    First: float
    start: int  # pad_crop: PET index of prior voxel 0 (may be negative or past the end)

    @property
    def window(self) -> tuple[float, float]:
        """The prior window's extent (mm)."""
        return self.First - 0.5 * self.V, self.First + (self.N - 0.5) * self.V


class PriorGrid:
    """Map volumes between the PET image grid and the prior's in-plane training grid.

    Parameters
    ----------
    pet_grid : ImageGrid
        The PET image grid (the data step's).
    prior_shape_yx : (Ny, Nx)
        The prior's in-plane training size (:func:`sirf_ddip.prior.weights.training_grid_yx`).
    prior_voxel_yx_mm : (vy, vx)
        The prior's in-plane training voxel size (mm); used by ``"resample"`` (``"pad_crop"`` keeps the PET voxels).
    mode : {"pad_crop", "resample"}
        See the module docstring.
    fov_radius_mm : float, optional
        Radius of the disc about the scanner axis that the prior must cover; ``None``: no check at construction
        (use :meth:`check_fits`).

    Raises
    ------
    ConfigError
        Unknown ``mode`` or a non-positive size.
    PriorGridError
        The ``fov_radius_mm`` disc does not fit in the prior's window (the message says whether ``"resample"``
        would fit it).
    """

    def __init__(self, pet_grid: ImageGrid, prior_shape_yx: Sequence[int] = (128, 128),
                 prior_voxel_yx_mm: Sequence[float] = (2.08626, 2.08626), mode: str = "pad_crop",
                 fov_radius_mm: float | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"prior grid: key 'mode' is {mode!r}; expected one of {', '.join(MODES)}")
        shape = tuple(int(s) for s in prior_shape_yx)
        vox = tuple(float(v) for v in prior_voxel_yx_mm)
        if len(shape) != 2 or min(shape) < 1 or len(vox) != 2 or not min(vox) > 0:
            raise ConfigError(f"prior grid: training size {prior_shape_yx} / voxel {prior_voxel_yx_mm} mm must be two "
                              "positive numbers (y, x)")
        self.pet_grid = pet_grid
        self.mode = mode
        self.training_shape_yx = shape
        self.training_voxel_yx_mm = vox
        self.axes = tuple(self._axis(ax, shape[ax - 1], vox[ax - 1], mode) for ax in (1, 2))
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if mode == "pad_crop":
            ratio = max(abs(pet_grid.voxel_size[ax] / vox[ax - 1] - 1.0) for ax in (1, 2))
            if ratio > 0.1:
                warnings.warn(f"prior grid: pad_crop keeps the PET's {pet_grid.voxel_size[1]:.4g} mm voxels, "
                              f"{100 * ratio:.0f} % off the prior's training voxel {vox[0]:.4g} mm; mode 'resample' "
                              "shows the network structures at their trained size", UserWarning, stacklevel=2)
        self.fov_radius_mm = None if fov_radius_mm is None else float(fov_radius_mm)
        if self.fov_radius_mm is not None:
            self._check_radius(self.fov_radius_mm, "the FOV (fov_radius_mm)")

    # ------------------------------------------------------------------ construction
    def _axis(self, ax: int, N: int, V: float, mode: str) -> _Axis:
        g = self.pet_grid
        n, v, first = g.shape[ax], g.voxel_size[ax], g.origin[ax]
        if mode == "pad_crop":
            centre = -first / v  # PET index (float) of the scanner axis
            start = int(math.floor(centre - N // 2 + 0.5))
            return _Axis(n, v, first, N, v, first + start * v, start)
        return _Axis(n, v, first, N, V, -(N // 2) * V, 0)  # STIR's default origin: voxel N // 2 on the axis

    @classmethod
    def from_card(cls, pet_grid: ImageGrid, card: dict[str, Any], mode: str = "pad_crop",
                  fov_radius_mm: float | None = None, path: Any = "<card>") -> "PriorGrid":
        """A :class:`PriorGrid` for the prior of this weights ``card`` (its ``training.data.grid``; defaults
        documented in :func:`sirf_ddip.prior.weights.training_grid_yx`)."""
        from .weights import training_grid_yx

        shape, vox, _ = training_grid_yx(card, path)
        return cls(pet_grid, shape, vox, mode, fov_radius_mm)

    @classmethod
    def from_bundle(cls, pet_grid: ImageGrid, bundle: Any, mode: str = "pad_crop",
                    fov_radius_mm: float | None = None) -> "PriorGrid":
        """A :class:`PriorGrid` for a loaded :class:`~sirf_ddip.prior.weights.PriorBundle`."""
        return cls.from_card(pet_grid, getattr(bundle, "card", {}) or {}, mode, fov_radius_mm,
                             getattr(bundle, "path", None) or "<prior>")

    # ------------------------------------------------------------------ grids
    @property
    def prior_grid(self) -> ImageGrid:
        """The grid the network sees: the PET planes, the prior's in-plane window."""
        g = self.pet_grid
        ay, ax = self.axes
        return ImageGrid((g.shape[0], ay.N, ax.N), (g.voxel_size[0], ay.V, ax.V), (g.origin[0], ay.First, ax.First))

    @property
    def prior_shape_yx(self) -> tuple[int, int]:
        return self.axes[0].N, self.axes[1].N

    @property
    def is_identity(self) -> bool:
        """True when the prior grid is the PET grid in-plane (both maps are the identity)."""
        return all(a.N == a.n and (a.start == 0 if self.mode == "pad_crop"
                                   else abs(a.V - a.v) <= 1e-6 * a.v and abs(a.First - a.first) <= 1e-6 * a.v)
                   for a in self.axes)

    def window_mm(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The prior window's in-plane extent ``((y_lo, y_hi), (x_lo, x_hi))`` in mm."""
        return self.axes[0].window, self.axes[1].window

    def inscribed_radius_mm(self, mode: str | None = None) -> float:
        """Radius of the largest disc about the axis inside the window of ``mode`` (default: this one's)."""
        axes = self.axes if mode in (None, self.mode) else \
            tuple(self._axis(ax, self.training_shape_yx[ax - 1], self.training_voxel_yx_mm[ax - 1], mode)
                  for ax in (1, 2))
        return float(min(min(-a.window[0], a.window[1]) for a in axes))

    def describe(self) -> str:
        (ylo, yhi), (xlo, xhi) = self.window_mm()
        return (f"prior grid ({self.mode}): PET in-plane {self.pet_grid.shape[1:]} x "
                f"{self.pet_grid.voxel_size[1]:.4g} mm -> {self.prior_shape_yx} x {self.axes[0].V:.4g} mm, window "
                f"y [{ylo:.1f}, {yhi:.1f}] x [{xlo:.1f}, {xhi:.1f}] mm")

    # ------------------------------------------------------------------ FOV
    def covered(self, device: torch.device | str | None = None) -> torch.Tensor:
        """PET voxels ``[H, W]`` (bool) that the prior grid represents whole (their values survive a round trip
        up to the remap's smoothing)."""
        parts = []
        for a in self.axes:
            if self.mode == "pad_crop":
                idx = np.arange(a.n)
                parts.append((idx >= a.start) & (idx < a.start + a.N))
            else:
                cov = overlap_matrix(a.first, a.v, a.n, a.First, a.V, a.N).sum(axis=0)
                parts.append(cov >= a.v * (1.0 - 1e-6))
        return torch.from_numpy(parts[0][:, None] & parts[1][None, :]).to(device)

    def fov_mask(self, sensitivity: torch.Tensor, fraction: float = 0.0) -> torch.Tensor:
        """Voxels of the PET grid inside the scanner's FOV and represented by the prior.

        Parameters
        ----------
        sensitivity : tensor [Z, H, W] (PET grid)
            The data step's sensitivity image (back projection of the multiplicative factors).
        fraction : float
            Keep voxels with ``sensitivity > fraction · max`` (0: non-zero sensitivity, the scanner's FOV).

        Returns
        -------
        bool tensor [Z, H, W] on ``sensitivity``'s device
        """
        self._check_shape(sensitivity, self.pet_grid.shape[1:], "sensitivity")
        thr = float(fraction) * float(sensitivity.max()) if fraction > 0 else 0.0
        return (sensitivity > thr) & self.covered(sensitivity.device)

    def check_fits(self, mask: Any, what: str = "the FOV mask") -> None:
        """Refuse (:class:`PriorGridError`) if any ``True`` voxel of ``mask [..., H, W]`` (PET grid) is not
        represented by the prior grid."""
        m = mask.detach().cpu() if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
        self._check_shape(m, self.pet_grid.shape[1:], what)
        m = m.bool()
        m2 = m.reshape(-1, *m.shape[-2:]).any(dim=0)
        outside = int((m2 & ~self.covered()).sum())
        if outside:
            self._refuse(support_radius_mm(m2, self.pet_grid), what, f"{outside} in-plane voxels lie outside it")

    def _check_radius(self, radius: float, what: str) -> None:
        if radius > self.inscribed_radius_mm() + 1e-6:
            self._refuse(radius, what, "")

    def _refuse(self, radius: float, what: str, detail: str) -> None:
        other = "resample" if self.mode == "pad_crop" else "pad_crop"
        r_here, r_other = self.inscribed_radius_mm(), self.inscribed_radius_mm(other)
        if radius <= r_other + 1e-6 and self.mode == "pad_crop":
            hint = (f"use mode 'resample' (the prior's {self.training_voxel_yx_mm[0]:.4g} mm voxels cover a radius "
                    f"of {r_other:.1f} mm)")
        else:
            hint = ("restrict the region to the object (e.g. fov_radius_mm from the head's MR or μ-map support), "
                    f"or use a prior trained on a larger field; mode '{other}' covers a radius of {r_other:.1f} mm")
        raise PriorGridError(f"{what} (radius {radius:.1f} mm about the scanner axis) does not fit in the prior's "
                             f"window ({self.describe()}; inscribed radius {r_here:.1f} mm)"
                             f"{'; ' + detail if detail else ''}: {hint}")

    # ------------------------------------------------------------------ maps
    @staticmethod
    def _check_shape(x: torch.Tensor, hw: Sequence[int], what: str) -> None:
        if x.dim() < 2 or tuple(x.shape[-2:]) != tuple(hw):
            raise GeometryMismatchError(f"prior grid: {what} has in-plane shape {tuple(x.shape[-2:])}, expected "
                                        f"{tuple(hw)}")

    def _matrices(self, device: torch.device, dtype: torch.dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            mats = []
            for a in self.axes:
                ov = overlap_matrix(a.first, a.v, a.n, a.First, a.V, a.N)  # [N, n]
                mats.append(torch.as_tensor(ov / a.V, dtype=dtype, device=device))    # PET -> prior
                mats.append(torch.as_tensor(ov.T / a.v, dtype=dtype, device=device))  # prior -> PET
            self._cache[key] = tuple(mats)
        return self._cache[key]

    def _pads(self, inverse: bool) -> tuple[int, int, int, int]:
        ay, ax = self.axes
        if not inverse:  # PET -> prior: F.pad (left, right, top, bottom); negative = crop
            return -ax.start, ax.start + ax.N - ax.n, -ay.start, ay.start + ay.N - ay.n
        return ax.start, ax.n - ax.start - ax.N, ay.start, ay.n - ay.start - ay.N

    def to_prior(self, vol: torch.Tensor) -> torch.Tensor:
        """PET grid ``[..., H, W]`` → prior grid ``[..., Ny, Nx]`` (same device and dtype; differentiable).

        ``"pad_crop"`` pads with 0 outside the PET image; ``"resample"`` remaps conservatively (0 outside).
        Apply it to images in physical units (activity, MR intensity), where 0 is the background, then scale.
        """
        self._check_shape(vol, self.pet_grid.shape[1:], "the PET-grid volume")
        if self.is_identity:
            return vol
        if self.mode == "pad_crop":
            return nn.functional.pad(vol, self._pads(False))
        my, _, mx, _ = self._matrices(vol.device, vol.dtype)
        return torch.matmul(torch.matmul(my, vol), mx.transpose(0, 1))

    def from_prior(self, vol: torch.Tensor, outside: torch.Tensor | None = None) -> torch.Tensor:
        """Prior grid ``[..., Ny, Nx]`` → PET grid ``[..., H, W]`` (same device and dtype; differentiable).

        Parameters
        ----------
        vol : tensor [..., Ny, Nx]
        outside : tensor [..., H, W], optional
            Values for the PET voxels the prior does not represent whole (:meth:`covered`); default 0.
        """
        self._check_shape(vol, self.prior_shape_yx, "the prior-grid volume")
        if self.is_identity:
            out = vol
        elif self.mode == "pad_crop":
            out = nn.functional.pad(vol, self._pads(True))
        else:
            _, my_t, _, mx_t = self._matrices(vol.device, vol.dtype)
            out = torch.matmul(torch.matmul(my_t, vol), mx_t.transpose(0, 1))
        if outside is not None:
            self._check_shape(outside, self.pet_grid.shape[1:], "the 'outside' image")
            out = torch.where(self.covered(out.device), out, outside.to(out.dtype))
        return out


def mr_on_pet_grid(mr_image: Any, pet_grid: ImageGrid, what: str = "MR") -> Any:
    """The MR on the PET grid: returned as is when the grids match, else resampled (trilinear, values kept) by
    :func:`sirf_ddip.io.mumap.resample_to_grid` with a one-line :class:`GridResampledWarning` (and an INFO log
    record on the ``sirf_ddip`` logger) naming both grids.

    Parameters
    ----------
    mr_image : sirf_ddip.data.Image
    pet_grid : ImageGrid
    what : str
        Name used in the message and errors.

    Raises
    ------
    GeometryMismatchError
        The MR does not overlap the PET grid.
    """
    from ..io.mumap import resample_to_grid

    src = getattr(mr_image, "grid", None)
    if src is None or not hasattr(mr_image, "array"):
        raise TypeError(f"mr_on_pet_grid: expected a sirf_ddip.data.Image, got {type(mr_image).__name__}")
    if src.matches(pet_grid):
        return mr_image
    out = resample_to_grid(mr_image, pet_grid, what=what)
    msg = f"{what} resampled onto the PET grid (trilinear): from {src.describe()} to {pet_grid.describe()}"
    log.info(msg)
    warnings.warn(msg, GridResampledWarning, stacklevel=2)
    return out
