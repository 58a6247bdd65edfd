"""In-memory containers of the built-in engine: an image on a grid, projection data on a sinogram geometry.

Layout of :class:`ProjData` arrays (the same as ``sirf.STIR.AcquisitionData.as_array()`` without the TOF axis):
``(n_sinograms, n_views, n_tangential)``, with sinograms ordered by segment in STIR's standard sequence
``0, +1, -1, +2, -2, ...`` and, within a segment, by axial position (ascending). Interfile files store segments
in ascending order (``-n .. +n``) and in either axis order; :mod:`sirf_ddip.io.interfile` converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry.image import ImageGrid


@dataclass
class Image:
    """Image values ``array[z, y, x]`` (float32) on ``grid``; ``meta`` keeps extra header info."""

    array: np.ndarray
    grid: ImageGrid
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if tuple(self.array.shape) != tuple(self.grid.shape):
            raise ValueError(f"Image: array shape {self.array.shape} != grid shape {self.grid.shape}")

    def copy(self) -> "Image":
        return Image(self.array.copy(), self.grid, dict(self.meta))

    def with_array(self, array) -> "Image":
        """A new Image on the same grid with other values."""
        return Image(np.asarray(array, dtype=np.float32).reshape(self.grid.shape), self.grid, dict(self.meta))


@dataclass
class ProjData:
    """Projection data ``array[sinogram, view, tangential]`` on ``geometry`` (a SinogramGeometry)."""

    array: np.ndarray
    geometry: Any  # sirf_ddip.geometry.sinogram.SinogramGeometry (kept loose to avoid an import cycle)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        expected = tuple(self.geometry.shape)
        if tuple(self.array.shape) != expected:
            raise ValueError(f"ProjData: array shape {self.array.shape} != geometry shape {expected}")

    def copy(self) -> "ProjData":
        return ProjData(self.array.copy(), self.geometry, dict(self.meta))

    def with_array(self, array) -> "ProjData":
        return ProjData(np.asarray(array, dtype=np.float32).reshape(self.geometry.shape), self.geometry, dict(self.meta))
