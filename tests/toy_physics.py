"""Toy physics for unit tests: a tiny sinogram geometry, a dense-matrix projector and a dense Poisson likelihood.

One module instead of per-test copies. Both classes implement the real interfaces
(:class:`sirf_ddip.physics.operator.LinearOperator`, :class:`sirf_ddip.physics.likelihood.PoissonLogLikelihood`),
so what is tested against them is the code path the engine uses.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.geometry.scanner import Scanner
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.physics.likelihood import PoissonLogLikelihood
from sirf_ddip.physics.operator import LinearOperator
from sirf_ddip.physics.subsets import ViewSubsets, validate_num_subsets

__all__ = ["tiny_geometry", "DenseProjector", "DenseLikelihood", "dense_problem"]


def tiny_geometry(num_rings: int = 2, detectors: int = 16, num_tang: int = 6) -> SinogramGeometry:
    """2 rings, 16 detectors: 3 segments (4 sinograms), 8 views, ``num_tang`` tangential bins."""
    sc = Scanner("tiny test scanner", num_rings, detectors, 60.0, 5.0, 4.0, 4.0, 0.0, num_tang, num_tang)
    return SinogramGeometry(sc, span=1, num_tangential=num_tang)


class DenseProjector(LinearOperator):
    """A random dense non-negative matrix with the engine projector's interface (view subsets included)."""

    def __init__(self, geometry: SinogramGeometry, grid: ImageGrid, seed: int = 0, dtype=torch.float64,
                 density: float = 0.5, device="cpu"):
        self.geometry = geometry
        self.grid = grid
        self.device = torch.device(device)
        self.dtype = dtype
        g = torch.Generator().manual_seed(seed)
        nb = int(np.prod(geometry.shape))
        nv = grid.num_voxels
        A = torch.rand(nb, nv, generator=g, dtype=torch.float64)
        A = A * (torch.rand(nb, nv, generator=g, dtype=torch.float64) < density)
        self.A = A.to(dtype=dtype, device=self.device)
        self._subsets: dict[int, ViewSubsets] = {}

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.grid.shape)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return tuple(self.geometry.shape)

    def _views(self, subset, num_subsets):
        if subset is None:
            return None
        S = int(num_subsets)
        if S not in self._subsets:
            self._subsets[S] = ViewSubsets(self.geometry, S, self.grid)
        return self._subsets[S].views_tensor(subset, self.device)

    def forward(self, x, subset=None, num_subsets=None):
        y = (self.A @ x.reshape(-1).to(self.dtype)).reshape(self.geometry.shape)
        v = self._views(subset, num_subsets)
        return y if v is None else y[:, v, :]

    def adjoint(self, y, subset=None, num_subsets=None):
        v = self._views(subset, num_subsets)
        if v is None:
            full = y.to(self.dtype)
        else:
            full = torch.zeros(self.geometry.shape, dtype=self.dtype, device=self.device)
            full[:, v, :] = y.to(self.dtype)
        return (self.A.T @ full.reshape(-1)).reshape(self.grid.shape)

    def dense(self) -> torch.Tensor:
        """The matrix itself (rows: sinogram bins in memory order; columns: voxels)."""
        return self.A


class DenseLikelihood(PoissonLogLikelihood):
    """``y ~ Poisson(m ⊙ (A x + a))`` with a dense ``A``; subset ``s`` of ``S`` = bins ``i`` with ``i mod S = s``.

    Plain Poisson (no STIR truncation): the EM numerator is ``Aᵀ m (y / ŷ)`` with 0 where ``ŷ = 0``.
    Images cross the interface as tensors; :meth:`from_tensor` returns a tensor copy.
    """

    def __init__(self, A, y, m=None, a=None, shape: Sequence[int] = (1, 4, 4), voxel_size=(2.0, 2.0, 2.0),
                 dtype=torch.float64):
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.A = torch.as_tensor(A, dtype=dtype)
        nb = self.A.shape[0]
        self.y = torch.as_tensor(y, dtype=dtype).reshape(nb)
        self.m = torch.ones(nb, dtype=dtype) if m is None else torch.as_tensor(m, dtype=dtype).reshape(nb)
        self.a = torch.zeros(nb, dtype=dtype) if a is None else torch.as_tensor(a, dtype=dtype).reshape(nb)
        self.image_shape = tuple(int(n) for n in shape)
        self.grid = ImageGrid(self.image_shape, voxel_size)
        self._S = 1
        self._sens: dict[tuple[int, int | None], torch.Tensor] = {}
        self.calls = {"forward": 0, "backward": 0}

    # subsets
    @property
    def num_subsets(self) -> int:
        return self._S

    def set_num_subsets(self, n: int) -> None:
        self._S = validate_num_subsets(n)

    def rows(self, subset: int | None) -> torch.Tensor:
        idx = torch.arange(self.A.shape[0])
        if subset is None or self._S == 1:
            return idx
        if not 0 <= int(subset) < self._S:
            raise ValueError(f"subset {subset} out of range 0..{self._S - 1}")
        return idx[idx % self._S == int(subset)]

    # model
    def forward(self, x, subset=None):
        self.calls["forward"] += 1
        r = self.rows(subset)
        return self.m[r] * (self.A[r] @ x.reshape(-1).to(self.dtype) + self.a[r])

    def backward(self, y, subset=None):
        self.calls["backward"] += 1
        r = self.rows(subset)
        return (self.A[r].T @ (self.m[r] * y.to(self.dtype))).reshape(self.image_shape)

    def sensitivity(self, subset=None):
        key = (self._S, None if self._S == 1 else subset)
        if key not in self._sens:
            r = self.rows(subset)
            self._sens[key] = (self.A[r].T @ self.m[r]).reshape(self.image_shape)
        return self._sens[key]

    def backprojected_ratio(self, x, subset=None):
        r = self.rows(subset)
        yb = self.forward(x, subset)
        return self.backward(torch.where(yb > 0, self.y[r] / torch.where(yb > 0, yb, 1.0), 0.0), subset)

    def value(self, x, subset=None):
        r = self.rows(subset)
        yb = self.forward(x, subset)
        return float((self.y[r] * torch.log(yb) - yb).sum())

    # conversion
    def to_tensor(self, image: Any) -> torch.Tensor:
        if hasattr(image, "array"):
            image = image.array
        t = image.detach() if torch.is_tensor(image) else torch.as_tensor(np.asarray(image))
        if tuple(t.shape) != self.image_shape:
            raise ValueError(f"image shape {tuple(t.shape)} != {self.image_shape}")
        return t.to(self.dtype).clone()

    def from_tensor(self, tensor, template=None):
        return tensor.detach().clone()


def dense_problem(shape=(3, 5, 5), n_bins=120, counts=50.0, seed=0, truth=None, density=0.3,
                  background=0.1) -> tuple[DenseLikelihood, np.ndarray]:
    """A random sparse-ish dense problem with mean ``counts`` per bin and its ground truth."""
    rng = np.random.default_rng(seed)
    nv = int(np.prod(shape))
    A = rng.uniform(0, 1, (n_bins, nv)) * (rng.uniform(0, 1, (n_bins, nv)) < density)
    if truth is None:
        truth = rng.uniform(0.5, 2.0, shape)
    m = rng.uniform(0.5, 1.0, n_bins)
    a = np.full(n_bins, background)
    scale = counts / (m * (A @ truth.reshape(-1) + a)).mean()
    y = rng.poisson(scale * m * (A @ truth.reshape(-1) + a)).astype(float)
    return DenseLikelihood(A * scale, y, m, a * scale, shape), truth
