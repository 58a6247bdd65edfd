"""A tiny dense random-matrix projector with the engine Projector's interface (for unit tests)."""

from __future__ import annotations

import numpy as np
import torch

from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.geometry.scanner import Scanner
from sirf_ddip.geometry.sinogram import SinogramGeometry


def tiny_geometry(num_rings: int = 2, detectors: int = 16, num_tang: int = 6) -> SinogramGeometry:
    """2 rings, 16 detectors: 3 segments (4 sinograms), 8 views, ``num_tang`` tangential bins."""
    sc = Scanner("tiny test scanner", num_rings, detectors, 60.0, 5.0, 4.0, 4.0, 0.0, num_tang, num_tang)
    return SinogramGeometry(sc, span=1, num_tangential=num_tang)


class DenseProjector:
    """``forward(x, subset, num_subsets)`` / ``adjoint(y, subset, num_subsets)`` through a dense matrix."""

    def __init__(self, geometry, grid: ImageGrid, seed: int = 0, dtype=torch.float64, density: float = 0.5,
                 device="cpu"):
        self.geometry = geometry
        self.grid = grid
        self.device = torch.device(device)
        self.dtype = dtype
        g = torch.Generator().manual_seed(seed)
        nb = int(np.prod(geometry.shape))
        nv = grid.num_voxels
        A = torch.rand(nb, nv, generator=g, dtype=torch.float64)
        A = A * (torch.rand(nb, nv, generator=g, dtype=torch.float64) < density)
        self.A = A.to(dtype)

    def _views(self, subset, num_subsets):
        if subset is None:
            return None
        return torch.as_tensor(self.geometry.subset_views(num_subsets, subset, grid=self.grid), dtype=torch.long)

    def forward(self, x, subset=None, num_subsets=None):
        y = (self.A @ x.reshape(-1).to(self.dtype)).reshape(self.geometry.shape)
        v = self._views(subset, num_subsets)
        return y if v is None else y[:, v, :]

    def adjoint(self, y, subset=None, num_subsets=None):
        v = self._views(subset, num_subsets)
        full = torch.zeros(self.geometry.shape, dtype=self.dtype)
        if v is None:
            full = y.to(self.dtype)
        else:
            full[:, v, :] = y.to(self.dtype)
        return (self.A.T @ full.reshape(-1)).reshape(self.grid.shape)
