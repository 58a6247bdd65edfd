"""What the DDIP prior sees: its weights, its in-plane grid, the MR on that grid, and the planes it runs on.

The prior was trained on 3-plane slabs through the head, on its own in-plane grid, conditioned on an MR scaled
its way. This module makes those inputs from the reconstructor's (a PET grid, a backend MR image, the data's
sensitivity) and checks them with named errors; :class:`~sirf_ddip.recon.ddip.DDIPReconstructor` calls it at
``set_up`` and after the warm start.

Planes without the subject (``prior_planes = "anatomy"``): planes where the MR (or, for a prior without MR, the
smoothed warm start) shows no subject are not given to the network; only slabs holding at least one subject plane
run, and the other planes are reconstructed from the data alone (:class:`PlaneSplit`).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataValueError, GeometryMismatchError, InputFileError

#: ``prior_planes = "anatomy"``: a plane shows the subject when at least ``ANATOMY_MIN_FRACTION`` of its voxels inside
#: the FOV exceed ``ANATOMY_LEVEL`` × the reference level (the scaler's 99th percentile) of the MR (or warm start).
ANATOMY_LEVEL = 0.1
ANATOMY_MIN_FRACTION = 0.005


def load_bundle(src: Any, device: torch.device):
    """The prior's weights: a path (``.safetensors`` or folder), a ``PriorBundle``, or None (the shipped one)."""
    from ..prior import weights as W

    if src is None:
        return W.load_default(device=device)
    if isinstance(src, (str, os.PathLike)):
        return W.load_prior(src, device=device)
    if hasattr(src, "network") and hasattr(src, "schedule") and hasattr(src, "pet_scaling"):
        return src
    raise TypeError(f"set_prior: expected a weights path, a PriorBundle or None, got {type(src).__name__}")


def check_same_grid(template: Any, image: Any, what: str) -> None:
    """:class:`GeometryMismatchError` when ``image`` has a grid other than ``template``'s (both optional)."""
    tgrid = getattr(template, "grid", None)
    grid = getattr(image, "grid", None)
    if tgrid is not None and grid is not None and hasattr(tgrid, "matches") and not tgrid.matches(grid):
        raise GeometryMismatchError(
            f"{what} grid (shape {grid.shape}, voxel {grid.voxel_size} mm, origin {grid.origin} mm) differs "
            f"from the PET image grid (shape {tgrid.shape}, voxel {tgrid.voxel_size} mm, origin {tgrid.origin} "
            f"mm); resample the {what} onto the PET grid")


def prior_grid_for(pet_grid: Any, bundle: Any, mode: str, fov_radius_mm: float | None):
    """The :class:`~sirf_ddip.prior.grid.PriorGrid` between ``pet_grid`` and the prior's (None: the same grid)."""
    from ..prior.grid import PriorGrid

    if pet_grid is None:
        return None
    pg = PriorGrid.from_bundle(pet_grid, bundle, mode=mode, fov_radius_mm=fov_radius_mm)
    return None if pg.is_identity else pg


def condition_on_mr(data_step: Any, mr_input: Any, bundle: Any, prior_grid: Any, pet_grid: Any, template: Any,
                    use_mr: bool, device: torch.device):
    """The MR for an MR-conditioned prior: ``(mr_input on the PET grid, fitted MR scaler, MR in network units)``.

    For a prior without MR: ``(mr_input, None, None)`` (with a warning when an MR was given).

    Raises
    ------
    ConfigError
        An MR-conditioned prior with ``use_mr`` false or without an MR.
    GeometryMismatchError, DataValueError, InputFileError
        An MR of another grid or shape, with NaN/Inf, or a prior without MR scaling.
    """
    from ..prior.grid import mr_on_pet_grid

    if not bool(getattr(bundle.network, "uses_mr", False)):
        if mr_input is not None and use_mr:
            warnings.warn("DDIP: the prior is not MR-conditioned; the MR image is ignored", stacklevel=3)
        return mr_input, None, None
    if not use_mr:
        raise ConfigError("DDIP config: key 'use_mr' is false but the prior is MR-conditioned; give an MR "
                          "(--mr) or use a prior trained without MR")
    if mr_input is None:
        raise ConfigError("the prior is MR-conditioned but no MR image was given "
                          "(set_anatomical_image(mr) / --mr MR.hv)")
    if pet_grid is not None and hasattr(mr_input, "grid") and hasattr(mr_input, "array"):
        mr_input = mr_on_pet_grid(mr_input, pet_grid)
    check_same_grid(template, mr_input, "MR")
    mr = data_step.to_tensor(mr_input)
    if tuple(mr.shape) != tuple(data_step.image_shape):
        raise GeometryMismatchError(f"MR image shape {tuple(mr.shape)} != PET image shape "
                                    f"{tuple(data_step.image_shape)}; resample the MR onto the PET grid")
    if not bool(torch.isfinite(mr).all()):
        raise DataValueError("MR image contains NaN or Inf values")
    if bundle.mr_scaling is None:
        raise InputFileError(getattr(bundle, "path", "prior"), "MR-conditioned prior without MR scaling",
                             key="mr_scaling")
    try:
        scaler = bundle.mr_scaling.fit(mr.detach().cpu().numpy())
    except ValueError as exc:
        raise DataValueError(f"MR image: {exc}") from None
    mr_p = mr if prior_grid is None else prior_grid.to_prior(mr)
    return mr_input, scaler, scaler.to_net(mr_p.to(device, torch.float32))


def fov_of(data_step: Any, prior_grid: Any = None) -> torch.Tensor:
    """Where the output may be non-zero: the scanner's FOV (sensitivity > 0), or ``prior_grid``'s mask of it."""
    sens = data_step.sensitivity(None)
    return sens > 0 if prior_grid is None else prior_grid.fov_mask(sens)


def anatomy_planes(sens: np.ndarray, vol: np.ndarray, ref: float, what: str, smooth_vox: float = 0.0) -> torch.Tensor:
    """The planes (bool ``[Z]``, CPU) where ``vol`` shows the subject inside the FOV (``sens > 0``).

    A plane shows it when at least ``ANATOMY_MIN_FRACTION`` of its FOV voxels exceed ``ANATOMY_LEVEL × ref``;
    ``smooth_vox > 0`` smooths ``vol`` in-plane (inside the FOV) first. ``what`` names ``vol`` in the error.

    Raises
    ------
    DataValueError
        No plane shows the subject (an empty or misregistered MR).
    """
    Z = int(sens.shape[0])
    inside = sens > 0
    if smooth_vox > 0:
        from scipy.ndimage import gaussian_filter

        vol = gaussian_filter(np.where(inside, vol, 0.0), [0.0, smooth_vox, smooth_vox], mode="constant")
    above = ((vol > ANATOMY_LEVEL * ref) & inside).reshape(Z, -1).sum(axis=1)
    n_in = np.maximum(inside.reshape(Z, -1).sum(axis=1), 1)
    planes = torch.from_numpy(above >= ANATOMY_MIN_FRACTION * n_in)
    if not bool(planes.any()):
        raise DataValueError(f"DDIP: {what} shows no subject on any plane (no plane has "
                             f"{100 * ANATOMY_MIN_FRACTION:g} % of its FOV voxels above "
                             f"{100 * ANATOMY_LEVEL:g} % of its reference level {ref:.4g}); check the image and "
                             f"its registration, or set prior_planes: all")
    return planes


def choose_prior_planes(mode: str, sens: torch.Tensor, mr: torch.Tensor | None, mr_scale: float | None,
                        warm_start: torch.Tensor, pet_scale: float, smooth_vox: float) -> torch.Tensor:
    """The planes the prior runs on (bool ``[Z]``, CPU): ``"all"``, or (``"anatomy"``) where the MR (when the prior
    is MR-conditioned: ``mr`` on the PET grid, reference ``mr_scale``) or else the in-plane smoothed warm start
    (reference ``pet_scale``) shows the subject (:func:`anatomy_planes`)."""
    if mode == "all":
        return torch.ones(int(sens.shape[0]), dtype=torch.bool)
    as_np = lambda v: v.detach().to("cpu", torch.float64).numpy()   # noqa: E731
    if mr is not None:
        return anatomy_planes(as_np(sens), as_np(mr), float(mr_scale), "the MR")
    return anatomy_planes(as_np(sens), as_np(warm_start), float(pet_scale), "the warm start", smooth_vox)


def fit_pet_scaler(prior: Any, image: torch.Tensor, sens: torch.Tensor, fov_fraction: float, smooth_vox: float):
    """Fit ``prior``'s PET scaler on ``image`` where ``sens`` exceeds ``fov_fraction`` of its maximum, after
    in-plane Gaussian smoothing (σ ``smooth_vox`` voxels); returns it (:class:`DataValueError` if it cannot)."""
    from scipy.ndimage import gaussian_filter

    arr = image.detach().to("cpu", torch.float64).numpy()
    sens = sens.detach().to("cpu", torch.float64).numpy()
    arr = np.where(sens > fov_fraction * float(sens.max()), arr, 0.0)
    if smooth_vox > 0:
        arr = gaussian_filter(arr, [0.0, smooth_vox, smooth_vox], mode="constant")
    try:
        return prior.fit_pet(arr)
    except ValueError as exc:
        raise DataValueError(f"DDIP: cannot normalise the starting image for the prior: {exc}") from None


class PlaneSplit:
    """The planes the prior runs on and those the data set alone.

    Parameters
    ----------
    planes : bool tensor [Z] or None
        True where the prior runs (None: every plane).
    num_planes : int
    device : torch.device
        Where :attr:`data_mask` lives.
    source : str
        What chose the planes (for :meth:`summary`), e.g. ``"the MR"``.
    """

    def __init__(self, planes: torch.Tensor | None, num_planes: int, device, source: str = "the MR") -> None:
        Z = int(num_planes)
        planes = torch.ones(Z, dtype=torch.bool) if planes is None else torch.as_tensor(planes, dtype=torch.bool)
        if int(planes.numel()) != Z:
            raise DataValueError(f"DDIP: {int(planes.numel())} prior planes given for a {Z}-plane image")
        self.planes = planes.cpu()
        self.everywhere = bool(planes.all())
        #: bool [Z, 1, 1] on the device, True on the planes the data set alone (None: there are none)
        self.data_mask = None if self.everywhere else (~planes).to(device).reshape(-1, 1, 1)
        self.source = source

    def merge(self, data_value: torch.Tensor, prior_value: torch.Tensor) -> torch.Tensor:
        """``prior_value`` with the data planes taken from ``data_value``."""
        if self.data_mask is None:
            return prior_value
        return torch.where(self.data_mask, data_value, prior_value)

    def summary(self) -> str:
        """One line: which planes the prior runs on (for logs and the run record)."""
        p = self.planes.numpy()
        Z = int(p.size)
        if p.all():
            return f"the prior runs on all {Z} planes"
        idx = np.nonzero(p)[0]
        runs, start = [], int(idx[0])
        for a, b in zip(idx[:-1], idx[1:]):
            if b != a + 1:
                runs.append((start, int(a)))
                start = int(b)
        runs.append((start, int(idx[-1])))
        where = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)
        return (f"the prior runs on {int(p.sum())} of {Z} planes ({where}, 0-based); the other {Z - int(p.sum())} "
                f"show no subject in {self.source} and are reconstructed from the data alone")

    def log(self) -> None:
        """Log :meth:`summary` when some planes are the data's alone."""
        if not self.everywhere:
            logging.getLogger("sirf_ddip").info("DDIP: %s", self.summary())


class PriorPlanesMixin:
    """The PET scaler and the prior planes of :class:`~sirf_ddip.recon.ddip.DDIPReconstructor`, chosen on its warm
    start (its ``prior``, ``data_step``, ``config``, MR)."""

    def fit_pet_scaler(self, image: torch.Tensor):
        """Fit the prior's PET scaler on ``image`` (:func:`fit_pet_scaler`); returns it."""
        return fit_pet_scaler(self.prior, image, self.data_step.sensitivity(None), self.config.scale_fov_fraction,
                              self.config.scale_smooth_vox)

    def choose_prior_planes(self, warm_start: torch.Tensor) -> torch.Tensor:
        """The planes the prior runs on (``prior_planes``; :func:`choose_prior_planes`)."""
        mr = self.data_step.to_tensor(self._mr_input) if self._mr_net is not None else None
        return choose_prior_planes(self.config.prior_planes, self.data_step.sensitivity(None), mr,
                                   self.mr_scaler.scale if mr is not None else None, warm_start,
                                   float(self.pet_scaler.scale), self.config.scale_smooth_vox)

    def _use_prior_planes(self, planes: torch.Tensor | None) -> None:
        """Run the prior on ``planes`` (bool [Z]; None = all) and set the others from the data alone."""
        self._planes = PlaneSplit(planes, int(self.data_step.image_shape[0]), self.device,
                                  "the MR" if self._mr_net is not None else "the warm start")
        self.prior_planes = self._planes.planes
        self.prior.set_active_planes(None if self._planes.everywhere else self.prior_planes)
        self._planes.log()

    def prior_planes_summary(self) -> str:
        """One line: which planes the prior runs on (for logs and the run record)."""
        return "prior planes not chosen yet (after the warm start)" if self._planes is None else self._planes.summary()
