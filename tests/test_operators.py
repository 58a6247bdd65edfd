"""Every linear operator: adjointness and norm against an independent dense SVD; composition and subsets.

Operators: the engine projector (CPU; CUDA when present) in float64 and float32, one of its view subsets,
the multiplicative-factor operator, and the composition ``M @ A`` (the linear part of the acquisition model).
The reference norm is the largest singular value of the operator's matrix, built column by column from
``forward`` applied to unit vectors and decomposed with ``torch.linalg.matrix_norm(·, 2)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sirf_ddip.errors import GeometryMismatchError
from sirf_ddip.physics.model import SubsetOperator
from sirf_ddip.physics.operator import ComposedOperator, LinearOperator, MultiplicativeFactors
from sirf_ddip.physics.projector import Projector
from sirf_ddip.physics.subsets import ViewSubsets, subset_of_iteration
from toy_physics import DenseProjector, tiny_geometry

GEOM = tiny_geometry()
GRID = GEOM.default_image_grid()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _factors(shape, dtype, device, seed=3) -> torch.Tensor:
    """Random factors in [0.2, 1.2) with one peak of 2 (a spectral gap, so power iteration converges fast)."""
    g = torch.Generator().manual_seed(seed)
    m = 0.2 + torch.rand(shape, generator=g, dtype=torch.float64)
    m.view(-1)[len(m.view(-1)) // 3] = 2.0
    return m.to(device=device, dtype=dtype)


def _operator(name: str, device: str, dtype: torch.dtype) -> LinearOperator:
    P = Projector(GEOM, GRID, device=device, dtype=dtype, cache=False)
    if name == "projector":
        return P
    if name == "projector_subset":
        return SubsetOperator(P, ViewSubsets(GEOM, 2, GRID), 1)
    if name == "factors":
        return MultiplicativeFactors(_factors(GEOM.shape, dtype, device))
    if name == "factors_after_projector":
        return MultiplicativeFactors(_factors(GEOM.shape, dtype, device)) @ P
    if name == "dense_after_dense_adjoint":  # a composition whose shapes change twice
        D = DenseProjector(GEOM, GRID, seed=1, dtype=dtype, device=device)
        return _Adjoint(D) @ MultiplicativeFactors(_factors(GEOM.shape, dtype, device)) @ P
    raise KeyError(name)


class _Adjoint(LinearOperator):
    """Aᵀ as an operator (to build a composition image → sinogram → image)."""

    def __init__(self, op):
        self.op, self.device, self.dtype = op, op.device, op.dtype

    @property
    def in_shape(self):
        return self.op.out_shape

    @property
    def out_shape(self):
        return self.op.in_shape

    def forward(self, x):
        return self.op.adjoint(x)

    def adjoint(self, y):
        return self.op.forward(y)


def dense_matrix(op: LinearOperator) -> torch.Tensor:
    """The matrix of ``op`` (float64, CPU), column ``j`` = ``op(e_j)``."""
    n = int(np.prod(op.in_shape))
    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=op.dtype, device=op.device)
        e[j] = 1
        cols.append(op.forward(e.reshape(op.in_shape)).reshape(-1).double().cpu())
    return torch.stack(cols, dim=1)


NAMES = ["projector", "projector_subset", "factors", "factors_after_projector", "dense_after_dense_adjoint"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_adjointness_and_norm_against_dense_svd(name, device):
    op = _operator(name, device, torch.float64)
    A = dense_matrix(op)
    assert tuple(op.forward(torch.zeros(op.in_shape, dtype=op.dtype, device=device)).shape) == tuple(op.out_shape)
    # adjoint: the transpose of the very same matrix, column by column
    m = int(np.prod(op.out_shape))
    g = torch.Generator().manual_seed(0)
    Y = torch.rand(m, 3, generator=g, dtype=torch.float64)
    ATy = torch.stack([op.adjoint(Y[:, k].reshape(op.out_shape).to(device)).reshape(-1).cpu() for k in range(3)], 1)
    torch.testing.assert_close(ATy, A.T @ Y, rtol=1e-12, atol=1e-12)
    assert op.adjointness_test(num_trials=3) < 1e-13
    # norm: power iteration vs the largest singular value
    ref = float(torch.linalg.matrix_norm(A, 2))
    assert op.norm(num_iter=60) == pytest.approx(ref, rel=1e-6)
    assert op(torch.ones(op.in_shape, dtype=op.dtype, device=device)).shape == op.forward(
        torch.ones(op.in_shape, dtype=op.dtype, device=device)).shape


@pytest.mark.parametrize("device", DEVICES)
def test_float32_projector_adjoint_and_norm_match_float64(device):
    p32 = _operator("projector", device, torch.float32)
    p64 = _operator("projector", device, torch.float64)
    assert p32.adjointness_test() < 3e-6          # float32 rounding, ~1e-7 achieved
    assert p32.norm(num_iter=40) == pytest.approx(p64.norm(num_iter=40), rel=3e-6)


def test_factors_norm_is_max_abs_and_self_adjoint():
    m = _factors((2, 3, 4), torch.float64, "cpu")
    M = MultiplicativeFactors(m)
    y = torch.rand(2, 3, 4, dtype=torch.float64)
    assert torch.equal(M.forward(y), M.adjoint(y))
    assert M.norm(num_iter=60) == pytest.approx(2.0, rel=1e-9)
    with pytest.raises(GeometryMismatchError, match=r"shape \(2, 3\) != factors shape \(2, 3, 4\)"):
        M.forward(torch.ones(2, 3))


def test_composition_order_shapes_and_flattening():
    P = _operator("projector", "cpu", torch.float64)
    m = _factors(GEOM.shape, torch.float64, "cpu")
    MA = MultiplicativeFactors(m) @ P
    x = torch.rand(GRID.shape, dtype=torch.float64)
    torch.testing.assert_close(MA(x), m * P.forward(x), rtol=0, atol=0)
    y = torch.rand(GEOM.shape, dtype=torch.float64)
    torch.testing.assert_close(MA.adjoint(y), P.adjoint(m * y), rtol=0, atol=0)
    assert MA.in_shape == tuple(GRID.shape) and MA.out_shape == tuple(GEOM.shape)
    nested = MultiplicativeFactors(m) @ MA
    assert isinstance(nested, ComposedOperator) and len(nested.operators) == 3
    with pytest.raises(GeometryMismatchError, match="cannot compose"):
        P @ MultiplicativeFactors(m)  # a sinogram is not an image


def test_view_subsets_partition_and_iteration_order():
    vs = ViewSubsets(GEOM, 2, GRID)
    parts = [vs.views(s) for s in range(2)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(GEOM.num_views))
    for s in range(2):
        np.testing.assert_array_equal(parts[s], GEOM.subset_views(2, s, grid=GRID))
    np.testing.assert_array_equal(vs.views(None), np.arange(GEOM.num_views))
    assert [vs.of_iteration(k) for k in range(5)] == [0, 1, 0, 1, 0]
    assert subset_of_iteration(7, 1) is None
    y = torch.arange(float(np.prod(GEOM.shape))).reshape(GEOM.shape)
    torch.testing.assert_close(vs.restrict(y, 1), y[:, parts[1], :])
    with pytest.raises(ValueError, match=r"subset 2 out of range 0\.\.1"):
        vs.views(2)
    with pytest.raises(ValueError, match="num_subsets must be >= 1, got 0"):
        ViewSubsets(GEOM, 0)
    with pytest.raises(ValueError, match="unbalanced"):
        ViewSubsets(GEOM, 3, GRID)  # 8 views do not split into 3 balanced STIR subsets
