"""ImageGrid: the voxel grid of a STIR image, in STIR's gantry coordinates.

Conventions (those of STIR Interfile images)
--------------------------------------------
- Arrays are indexed ``[z, y, x]``.
- ``voxel_size`` is ``(vz, vy, vx)`` in mm.
- ``origin`` is the *first pixel offset* ``(oz, oy, ox)`` in mm: the physical coordinate of voxel
  ``[0, 0, 0]``'s centre, exactly the Interfile keys ``first pixel offset (mm) [3], [2], [1]``.
- Transaxially the scanner axis passes through x = y = 0. Axially, as in STIR's projectors, the
  image's index centre ``(nz - 1) / 2`` is aligned with the scanner's axial centre; a non-zero ``origin[0]``
  shifts the image axially relative to that default (see :meth:`axial_shift_mm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import GeometryError, GeometryMismatchError


@dataclass(frozen=True)
class ImageGrid:
    """Shape, voxel size and first-voxel offset of an image (all in ``(z, y, x)`` order, mm).

    Parameters
    ----------
    shape : (nz, ny, nx)
    voxel_size : (vz, vy, vx) in mm
    origin : (oz, oy, ox) in mm, the centre of voxel [0, 0, 0]. If None, the STIR default for the
        shape is used: ``oz = 0`` and transaxially ``-(n // 2) * v`` (STIR's index ``-n//2 .. ``).

    Raises
    ------
    GeometryError
        A shape that is not 3 positive integers, a voxel size that is not 3 positive numbers, a non-finite origin.
    """

    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float] | None = field(default=None)

    def __post_init__(self):
        try:
            shape = tuple(int(s) for s in self.shape)
            vs = tuple(float(v) for v in self.voxel_size)
        except (TypeError, ValueError):
            raise GeometryError(f"ImageGrid: shape must be 3 positive ints and voxel_size 3 numbers (mm), got "
                                f"{self.shape!r}, {self.voxel_size!r}") from None
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise GeometryError(f"ImageGrid: shape must be 3 positive ints (z, y, x), got {self.shape}")
        if len(vs) != 3 or any(not np.isfinite(v) or v <= 0 for v in vs):
            raise GeometryError(f"ImageGrid: voxel_size must be 3 positive numbers (z, y, x) in mm, got {self.voxel_size}")
        if self.origin is None:
            org = (0.0, -(shape[1] // 2) * vs[1], -(shape[2] // 2) * vs[2])
        else:
            try:
                org = tuple(float(o) for o in self.origin)
            except (TypeError, ValueError):
                org = ()
            if len(org) != 3 or not all(np.isfinite(org)):
                raise GeometryError(f"ImageGrid: origin must be 3 finite numbers (z, y, x) in mm, got {self.origin}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "voxel_size", vs)
        object.__setattr__(self, "origin", org)

    # ------------------------------------------------------------------ coordinates
    def coords(self, axis: int) -> np.ndarray:
        """Physical centre coordinates (mm, STIR gantry frame) along ``axis`` (0=z, 1=y, 2=x)."""
        return self.origin[axis] + self.voxel_size[axis] * np.arange(self.shape[axis])

    def axial_centre_mm(self) -> float:
        """z coordinate (image frame) of the image's axial index centre."""
        return self.origin[0] + 0.5 * (self.shape[0] - 1) * self.voxel_size[0]

    def axial_shift_mm(self) -> float:
        """Axial shift of this image relative to STIR's default placement (origin z = 0): ``origin[0]``."""
        return self.origin[0]

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    # ------------------------------------------------------------------ comparison
    def matches(self, other: "ImageGrid", rtol: float = 1e-4, atol_mm: float = 1e-3) -> bool:
        """True if shape equal and voxel sizes / origins agree within tolerance."""
        return (self.shape == other.shape
                and np.allclose(self.voxel_size, other.voxel_size, rtol=rtol, atol=atol_mm)
                and np.allclose(self.origin, other.origin, rtol=rtol, atol=atol_mm))

    def check_matches(self, other: "ImageGrid", what: str = "image", other_what: str = "template") -> None:
        """Raise :class:`GeometryMismatchError` naming both items if grids differ."""
        if not self.matches(other):
            raise GeometryMismatchError(
                f"{what} grid {self.describe()} does not match {other_what} grid {other.describe()}")

    def describe(self) -> str:
        return (f"shape(z,y,x)={self.shape}, voxel(mm)=({self.voxel_size[0]:.4g}, {self.voxel_size[1]:.4g}, "
                f"{self.voxel_size[2]:.4g}), origin(mm)=({self.origin[0]:.4g}, {self.origin[1]:.4g}, {self.origin[2]:.4g})")

    def with_shape(self, shape: Sequence[int]) -> "ImageGrid":
        """Same voxel size, new shape, STIR-default origin."""
        return ImageGrid(tuple(shape), self.voxel_size)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "voxel_size": list(self.voxel_size), "origin": list(self.origin)}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageGrid":
        return cls(tuple(d["shape"]), tuple(d["voxel_size"]), tuple(d["origin"]) if d.get("origin") is not None else None)
