"""The compiled (numba) scatter-point-to-detector line integrals equal the torch Siddon tracer's, and both give the
closed-form chord of a uniform ball."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sirf_ddip.physics import scatter as sc
from sirf_ddip.physics.scatter_kernels import point_detector_integrals_cpu


def _rays(rng, n_pts=40):
    """Scatter points in and near the image, detectors on a ring (some rays along the axes, some degenerate)."""
    pts = rng.uniform([-20, -40, -40], [20, 40, 40], (n_pts, 3))
    pts[0] = [0.0, 0.0, 0.0]                      # on a voxel centre, rays along y and x below
    pts[1] = [1.5, 2.0, 2.0]                      # on voxel boundaries (voxel sizes 3, 4, 4: index centre 0)
    pts[2] = [0.0, 200.0, 0.0]                    # outside the image
    psi = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    det = np.stack([np.repeat([-12.0, 0.0, 12.0], 24), np.tile(300 * np.sin(psi), 3), np.tile(300 * np.cos(psi), 3)], 1)
    det = np.concatenate([det, [[0.0, 0.0, 300.0], [0.0, 300.0, 0.0], [0.0, 0.0, 0.0]]])   # axis-parallel; = pts[0]
    return pts, det


@pytest.mark.parametrize("centre", [(0.0, 0.0, 0.0), (3.0, -5.0, 2.5)])
def test_numba_equals_torch_tracer(rng, centre):
    img = rng.uniform(0.0, 1.0, (9, 21, 23))
    vs = (3.0, 4.0, 4.0)
    pts, det = _rays(rng)
    points = sc.ScatterPoints(pts, np.ones(len(pts)), 1.0)
    a = sc.point_detector_integrals(img, vs, points, det, centre, method="numba").numpy()
    b = sc.point_detector_integrals(img, vs, points, det, centre, method="torch").numpy()
    assert a.shape == (len(pts), len(det)) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * b.max())      # achieved ~1e-14
    assert a[2, 6] == 0 and a[2, 30] == 0 and a[0, -1] == 0     # outside the image, away from it; start == stop
    assert a[2, 18] > 0                                            # outside, through the image
    assert a[0, :-1].min() > 0 and (a > 0).mean() > 0.5


def test_uniform_ball_chord_is_the_closed_form():
    # a fine uniform ball of radius 50 mm: the integral from its centre to any far detector is the radius
    n, v = 101, 1.0
    z, y, x = np.meshgrid(*(np.arange(n) - 50.0,) * 3, indexing="ij")
    ball = (x ** 2 + y ** 2 + z ** 2 <= 50.0 ** 2).astype(np.float64)
    psi = np.linspace(0, np.pi, 7)
    det = np.stack([40 * np.cos(psi), 300 * np.sin(psi), 300 * np.cos(psi)], 1)
    out = point_detector_integrals_cpu(ball, (v, v, v), np.zeros((1, 3)), det)
    # from the centre voxel's entry (full_start_voxel: + up to half a voxel's chord) to the sphere (+- 1 voxel)
    np.testing.assert_allclose(out[0], 50.0, atol=1.5)
    torch_out = sc.ray_integrals(torch.as_tensor(ball[None]), (v, v, v), torch.zeros(len(det), 3, dtype=torch.float64),
                                 torch.as_tensor(det))[0].numpy()
    np.testing.assert_allclose(out[0], torch_out, rtol=1e-10)


def test_numba_combine_equals_torch(rng):
    """The per-bin sum over scatter points (Klein-Nishina, energy window, solid angles, the unscattered pair's
    efficiency) of the numba kernel equals the torch version, on random integrals."""
    xy, ia, ib = sc.detector_positions(16, np.arange(-9, 10), 32, 300.0)
    ring_z = (np.arange(3) - 1.0) * 20.0
    det = sc.detector_grid(xy, ring_z)
    pts = sc.ScatterPoints(rng.uniform([-25, -80, -80], [25, 80, 80], (30, 3)), rng.uniform(0.01, 0.1, 30), 512.0)
    act = torch.as_tensor(rng.uniform(0, 50, (30, len(det))))
    mu = torch.as_tensor(rng.uniform(0, 2, (30, len(det))))
    pairs = np.array([[0, 0], [1, 1], [2, 2], [0, 1], [1, 0], [0, 2]])
    args = (act, mu, 4.0, pts, det, 32, ia, ib, pairs, 430.0, 610.0, 0.145, 511.0)
    a = sc.single_scatter_from_integrals(*args, method="numba").numpy()
    b = sc.single_scatter_from_integrals(*args, method="torch").numpy()
    assert a.shape == (16, 6, 19) and (a > 0).mean() > 0.5
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * b.max())      # achieved ~1e-15
    with pytest.raises(ValueError, match="method"):
        sc.single_scatter_from_integrals(*args, method="cuda")
