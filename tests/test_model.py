"""Acquisition model, STIR-style Poisson likelihood and EngineLogLikelihood on a dense random projector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sirf_ddip.data import Image, ProjData
from sirf_ddip.errors import DataValueError, GeometryMismatchError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.physics.likelihood import MAX_QUOTIENT, stir_log_likelihood, stir_quotient
from sirf_ddip.physics.model import AcquisitionModel, EngineLogLikelihood, build_additive
from sirf_ddip.recon.em import em_update

from toy_physics import DenseProjector, tiny_geometry

GRID = ImageGrid((3, 4, 4), (2.0, 4.0, 4.0))


def make_problem(seed=0, with_factors=True, dtype=torch.float64):
    geo = tiny_geometry()
    proj = DenseProjector(geo, GRID, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    x_true = rng.uniform(0.5, 2.0, GRID.shape)
    m = rng.uniform(0.3, 1.0, geo.shape) if with_factors else None
    a = rng.uniform(0.05, 0.3, geo.shape) if with_factors else None
    mean = proj.forward(torch.as_tensor(x_true)).numpy()
    if with_factors:
        mean = m * (mean + a)
    y = rng.poisson(mean).astype(np.float32)
    prompts = ProjData(y, geo, {"source": "prompts_test.hs"})
    mult = ProjData(m.astype(np.float32), geo, {"source": "mult_test.hs"}) if with_factors else None
    add = ProjData(a.astype(np.float32), geo, {"source": "add_test.hs"}) if with_factors else None
    ds = EngineLogLikelihood(prompts, mult, add, grid=GRID, projector=proj, dtype=dtype)
    return ds, proj, prompts, mult, add, x_true


def test_acquisition_model_forward_backward_adjoint():
    ds, proj, prompts, mult, add, _ = make_problem()
    am = AcquisitionModel(proj, mult, add)
    x = torch.rand(GRID.shape, dtype=torch.float64)
    y = torch.rand(prompts.geometry.shape, dtype=torch.float64)
    m = torch.as_tensor(mult.array, dtype=torch.float64)
    a = torch.as_tensor(add.array, dtype=torch.float64)
    expect = m * (proj.forward(x) + a)
    assert torch.allclose(am.forward(x), expect)
    # backward is the adjoint of the linear part m ⊙ A
    lhs = float((am.linear_forward(x) * y).sum())
    rhs = float((x * am.backward(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10)
    # subsets slice m and a by the geometry's views
    views = prompts.geometry.subset_views(2, 1)
    sub = am.forward(x, subset=1, num_subsets=2)
    assert torch.allclose(sub, expect[:, views, :])


def test_sensitivity_is_At_m_and_subsets_sum_to_full():
    ds, proj, prompts, mult, _, _ = make_problem()
    m = torch.as_tensor(mult.array, dtype=torch.float64)
    sens = ds.sensitivity()
    assert torch.allclose(sens, proj.adjoint(m))
    ds.set_num_subsets(2)
    total = ds.sensitivity(0) + ds.sensitivity(1)
    assert torch.allclose(total, sens, rtol=1e-12)
    assert ds.sensitivity(1) is ds.sensitivity(1)  # cached


def test_gradient_matches_finite_differences():
    ds, *_ = make_problem(seed=3)
    x = torch.as_tensor(np.random.default_rng(1).uniform(0.5, 1.5, GRID.shape))
    g = ds.gradient(x)
    h = 1e-5
    for idx in [(0, 0, 0), (1, 2, 3), (2, 3, 1)]:
        e = torch.zeros_like(x)
        e[idx] = h
        fd = (ds.value(x + e) - ds.value(x - e)) / (2 * h)
        assert float(g[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-6)


def test_em_increases_likelihood_monotonically():
    ds, *_ = make_problem(seed=5)
    x = torch.ones(GRID.shape, dtype=torch.float64)
    vals = [ds.value(x)]
    for _ in range(15):
        x = em_update(ds, x)
        vals.append(ds.value(x))
    diffs = np.diff(vals)
    assert np.all(diffs >= -1e-9 * abs(vals[-1])), diffs
    assert vals[-1] > vals[0] + 1.0


def test_randoms_scatter_build_additive():
    ds, proj, prompts, mult, add, _ = make_problem()
    m = mult.array.astype(np.float64)
    r = 0.5 * add.array * m
    s = 0.5 * add.array * m
    ds2 = EngineLogLikelihood(prompts, mult, randoms=r, scatter=s, grid=GRID, projector=proj, dtype=torch.float64)
    assert torch.allclose(ds2.additive, torch.as_tensor(add.array, dtype=torch.float64), rtol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        EngineLogLikelihood(prompts, mult, add, randoms=r, grid=GRID, projector=proj)
    mm = torch.tensor([[[0.0, 1.0]]])
    with pytest.raises(DataValueError, match="undefined"):
        build_additive(mm, torch.tensor([[[1.0, 1.0]]]), None)


def test_validation_errors_name_files():
    ds, proj, prompts, mult, add, _ = make_problem()
    bad = prompts.copy()
    bad.array[0, 0, 0] = np.nan
    with pytest.raises(DataValueError, match="prompts_test.hs.*NaN"):
        EngineLogLikelihood(bad, mult, add, grid=GRID, projector=proj)
    bad.array[0, 0, 0] = -1
    with pytest.raises(DataValueError, match="prompts_test.hs.*negative"):
        EngineLogLikelihood(bad, mult, add, grid=GRID, projector=proj)
    badm = mult.copy()
    badm.array[1, 1, 1] = -0.5
    with pytest.raises(DataValueError, match="mult_test.hs"):
        EngineLogLikelihood(prompts, badm, add, grid=GRID, projector=proj)
    bada = add.copy()
    bada.array[1, 1, 1] = np.inf
    with pytest.raises(DataValueError, match="add_test.hs"):
        EngineLogLikelihood(prompts, mult, bada, grid=GRID, projector=proj)
    other = tiny_geometry(num_tang=4)
    wrong = ProjData(np.ones(other.shape, np.float32), other, {"source": "other.hs"})
    with pytest.raises(GeometryMismatchError, match="other.hs.*prompts_test.hs"):
        EngineLogLikelihood(prompts, wrong, grid=GRID, projector=proj)
    with pytest.raises(GeometryMismatchError):
        ds.set_prompts(wrong)


def test_stir_quotient_rules():
    y = torch.tensor([[[0.0, 5.0, 3.0, 2.0]]])
    d = torch.tensor([[[0.0, 0.0, 1e-6, 2.0]]])
    q = stir_quotient(y, d)
    assert q.tolist() == [[[0.0, MAX_QUOTIENT, MAX_QUOTIENT, 1.0]]]
    # per-viewgram small value: 1e-7 is "zero" next to a max of 1e3
    y2 = torch.tensor([[[1e-7, 1e3]]])
    q2 = stir_quotient(y2, torch.tensor([[[1.0, 1.0]]]))
    assert q2.tolist() == [[[0.0, 1e3]]]
    ll = stir_log_likelihood(torch.tensor([[[0.0, 2.0]]]), torch.tensor([[[0.5, 0.0]]]))
    assert ll == pytest.approx(-0.5 + 2.0 * np.log(2.0 / MAX_QUOTIENT) - 2.0 / MAX_QUOTIENT)


def test_to_from_tensor_and_set_prompts():
    ds, proj, prompts, *_ = make_problem()
    img = Image(np.arange(GRID.num_voxels, dtype=np.float32).reshape(GRID.shape), GRID)
    t = ds.to_tensor(img)
    back = ds.from_tensor(t, img)
    assert np.array_equal(back.array, img.array) and back.grid == GRID
    with pytest.raises(GeometryMismatchError):
        ds.to_tensor(Image(np.zeros((3, 4, 4), np.float32), ImageGrid((3, 4, 4), (2.0, 3.0, 3.0))))
    x = torch.ones(GRID.shape, dtype=torch.float64)
    ll0 = ds.value(x)
    ds.set_prompts(prompts.with_array(prompts.array * 2))
    assert ds.value(x) != ll0
