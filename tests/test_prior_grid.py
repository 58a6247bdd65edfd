"""PriorGrid (the prior's in-plane grid beside the PET grid) and the MR onto the PET grid."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sirf_ddip.data import Image
from sirf_ddip.errors import GeometryMismatchError, InputFileError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.prior.grid import GridResampledWarning, PriorGrid, PriorGridError, mr_on_pet_grid, support_radius_mm
from sirf_ddip.prior.weights import DEFAULT_TRAINING_SHAPE_YX, DEFAULT_TRAINING_VOXEL_YX_MM, training_grid_yx

V_MMR = 2.08626  # mMR transaxial voxel (mm), the shipped priors' training voxel


def _blob(grid: ImageGrid, sigma: float = 20.0, centre=(10.0, -15.0), planes: int | None = None) -> torch.Tensor:
    """A Gaussian ``exp(-r²/2σ²)`` on ``grid`` in-plane (float64), ``planes`` copies."""
    yy, xx = torch.meshgrid(torch.from_numpy(grid.coords(1)), torch.from_numpy(grid.coords(2)), indexing="ij")
    g = torch.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma ** 2))
    return g.expand(grid.shape[0] if planes is None else planes, -1, -1).clone()


# ------------------------------------------------------------------------------------------------ pad_crop
@pytest.mark.parametrize("n", [285, 344])
def test_pad_crop_clinical_grids_to_128_and_back_exact(n):
    g = ImageGrid((3, n, n), (2.03125, V_MMR, V_MMR))   # STIR's default origin: voxel n // 2 on the axis
    pg = PriorGrid(g, (128, 128), (V_MMR, V_MMR), "pad_crop")
    # the window is STIR's default 128 grid: voxel 64 on the scanner axis
    assert pg.prior_grid.shape == (3, 128, 128)
    np.testing.assert_allclose(pg.prior_grid.origin[1:], (-64 * V_MMR, -64 * V_MMR), atol=1e-9)
    x = torch.rand(g.shape, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    u = pg.to_prior(x)
    s = n // 2 - 64  # PET index of prior voxel 0
    assert torch.equal(u, x[:, s:s + 128, s:s + 128])
    back = pg.from_prior(u)
    cov = pg.covered()
    assert int(cov.sum()) == 128 * 128
    assert torch.equal(back[:, cov], x[:, cov]) and float(back[:, ~cov].abs().max()) == 0.0
    # 'outside' keeps the given image where the prior has no voxels
    assert torch.equal(pg.from_prior(u, outside=x), x)


def test_pad_crop_pads_a_small_grid_and_crops_back():
    g = ImageGrid((2, 96, 80), (2.0, V_MMR, V_MMR))
    pg = PriorGrid(g, (128, 128), (V_MMR, V_MMR), "pad_crop")
    x = torch.rand(g.shape, generator=torch.Generator().manual_seed(1))
    u = pg.to_prior(x)
    assert u.shape == (2, 128, 128)
    assert torch.equal(u[:, 16:112, 24:104], x) and float(u.sum()) == pytest.approx(float(x.sum()), rel=1e-6)
    assert torch.equal(pg.from_prior(u), x)
    assert bool(pg.covered().all())


def test_identity_when_the_pet_grid_is_the_training_grid():
    g = ImageGrid((5, 128, 128), (2.03125, V_MMR, V_MMR))
    for mode in ("pad_crop", "resample"):
        pg = PriorGrid(g, (128, 128), (V_MMR, V_MMR), mode)
        assert pg.is_identity
        x = torch.rand(g.shape)
        assert pg.to_prior(x) is x and pg.from_prior(x) is x


# ------------------------------------------------------------------------------------------------ resample
@pytest.mark.parametrize("n,v", [(440, 1.65), (200, 2.6)])
def test_resample_round_trip_and_total_activity(n, v):
    """Conservative remapping: total activity kept both ways; a smooth image returns within 3x the measured
    1.36 % (of its maximum) for a σ = 20 mm blob."""
    g = ImageGrid((2, n, n), (2.0, v, v))
    pg = PriorGrid(g, (128, 128), (V_MMR, V_MMR), "resample")
    assert pg.prior_grid.voxel_size[1:] == (V_MMR, V_MMR)
    x = _blob(g)
    u = pg.to_prior(x)
    back = pg.from_prior(u)
    total = 2 * 2 * np.pi * 20.0 ** 2  # closed form: 2 planes of ∫ exp(-r²/2σ²) dA (the blob is inside the window)
    assert float(x.sum()) * v * v == pytest.approx(total, rel=1e-6)
    assert float(u.sum()) * V_MMR ** 2 == pytest.approx(float(x.sum()) * v * v, rel=1e-7)
    assert float(back.sum()) * v * v == pytest.approx(float(x.sum()) * v * v, rel=1e-7)
    assert float((back - x).abs().max()) < 0.041
    # a uniform concentration over the window stays that concentration (prior voxels wholly inside the PET grid)
    ones = torch.ones(g.shape, dtype=torch.float64)
    assert float((pg.to_prior(ones) - 1).abs().max()) < 1e-12
    cov = pg.covered()
    assert float((pg.from_prior(pg.to_prior(ones))[:, cov] - 1).abs().max()) < 1e-12


def test_resample_adjoint_by_autograd():
    """The two conservative maps are adjoint up to voxel areas: ∇ₓ⟨to_prior(x), u⟩ = from_prior(u)·v²/V²."""
    g = ImageGrid((1, 150, 150), (2.0, 1.65, 1.65))
    pg = PriorGrid(g, (128, 128), (V_MMR, V_MMR), "resample")
    x = torch.rand(g.shape, dtype=torch.float64, requires_grad=True)
    u = torch.rand((1, 128, 128), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (pg.to_prior(x) * u).sum().backward()
    want = pg.from_prior(u) * (1.65 ** 2 / V_MMR ** 2)
    assert float((x.grad - want).abs().max()) < 1e-12


# ------------------------------------------------------------------------------------------------ FOV
def test_fov_that_does_not_fit_is_refused_and_resample_suggested():
    g = ImageGrid((3, 440, 440), (2.0, 1.65, 1.65))
    # pad_crop keeps the 1.65 mm voxels: a window of 128 × 1.65 = 211 mm (inscribed radius 63.5 × 1.65 mm)
    with pytest.warns(UserWarning, match="21 % off the prior's training voxel"):
        pc = PriorGrid(g, (128, 128), (V_MMR, V_MMR), "pad_crop")
    assert pc.inscribed_radius_mm() == pytest.approx(63.5 * 1.65)
    with pytest.raises(PriorGridError, match="use mode 'resample'"), pytest.warns(UserWarning):
        PriorGrid(g, (128, 128), (V_MMR, V_MMR), "pad_crop", fov_radius_mm=120.0)
    PriorGrid(g, (128, 128), (V_MMR, V_MMR), "resample", fov_radius_mm=120.0)   # 132.5 mm: fits
    with pytest.raises(PriorGridError, match="restrict the region"):
        PriorGrid(g, (128, 128), (V_MMR, V_MMR), "resample", fov_radius_mm=140.0)
    # a mask: a disc of radius 110 mm is refused by pad_crop, accepted by resample
    yy, xx = np.meshgrid(g.coords(1), g.coords(2), indexing="ij")
    disc = np.hypot(yy, xx) < 110.0
    with pytest.raises(PriorGridError, match="in-plane voxels lie outside"):
        pc.check_fits(disc, "the head")
    PriorGrid(g, (128, 128), (V_MMR, V_MMR), "resample").check_fits(disc)
    assert support_radius_mm(disc, g) == pytest.approx(110.0, abs=1.65 * 1.5)


def test_fov_mask_is_sensitivity_support_inside_the_window():
    g = ImageGrid((2, 285, 285), (2.03125, V_MMR, V_MMR))
    pg = PriorGrid(g, (128, 128), (V_MMR, V_MMR), "pad_crop")
    yy, xx = np.meshgrid(g.coords(1), g.coords(2), indexing="ij")
    r = np.hypot(yy, xx)
    sens = torch.from_numpy(np.where(r < 100.0, 1.0 + r, 0.0)).expand(2, -1, -1)
    m = pg.fov_mask(sens)
    assert m.dtype == torch.bool and m.shape == (2, 285, 285)
    assert int(m[0].sum()) == int((r < 100.0).sum())           # the disc lies inside the 267 mm window
    big = torch.from_numpy(np.where(r < 200.0, 1.0, 0.0)).expand(2, -1, -1)
    assert int(pg.fov_mask(big)[0].sum()) == 128 * 128          # cut to the window
    assert int(pg.fov_mask(sens, fraction=0.5)[0].sum()) == int(((1.0 + r > 0.5 * (1.0 + r[r < 100].max()))
                                                                   & (r < 100.0)).sum())
    with pytest.raises(GeometryMismatchError):
        pg.fov_mask(sens[:, :100])


# ------------------------------------------------------------------------------------------------ planes
class _PlaneConv(nn.Module):
    """A stand-in 'network' whose ε of each plane depends on that plane only (the same 3 × 3 kernel per plane), so
    that every slab convention (sliding, edge replication of short volumes, averaging) gives the same volume."""

    slab = 3
    uses_mr = False
    spatial_multiple = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(9.0).reshape(1, 1, 3, 3) / 9.0)

    def forward(self, x, t, mr=None):
        b, s, h, w = x.shape
        return self.conv(x.reshape(b * s, 1, h, w)).reshape(b, s, h, w)


@pytest.mark.parametrize("planes", [1, 2, 7])
@pytest.mark.parametrize("mode", ["pad_crop", "resample"])
def test_any_number_of_planes_through_the_slab_path(planes, mode):
    from sirf_ddip.prior.slabs import predict_eps

    g = ImageGrid((planes, 60, 60), (2.0, 2.5, 2.5))
    v = 2.5 if mode == "pad_crop" else V_MMR   # pad_crop: a prior trained on the PET's voxel size
    pg = PriorGrid(g, (32, 32), (v, v), mode)
    x = torch.rand(g.shape, generator=torch.Generator().manual_seed(planes))
    u = pg.to_prior(x)
    assert u.shape == (planes, 32, 32)
    net = _PlaneConv()
    with torch.no_grad():
        eps = predict_eps(net, u, 10, batch_size=2)
        want = net.conv(u.unsqueeze(1)).squeeze(1)   # each plane on its own: the closed form of this network
    assert float((eps - want).abs().max()) < 1e-5
    out = pg.from_prior(eps)
    assert out.shape == g.shape
    if mode == "pad_crop":
        assert torch.equal(pg.from_prior(u)[:, pg.covered()], x[:, pg.covered()])


# ------------------------------------------------------------------------------------------------ MR
def test_mr_on_pet_grid_reproduces_a_linear_ramp_and_says_so():
    """Trilinear resampling reproduces a linear function exactly inside the source grid."""
    src = ImageGrid((20, 90, 90), (2.5, 3.0, 3.0))   # the MR: another shape and voxel, STIR-centred
    zc = (np.arange(20) - 9.5) * 2.5                  # axial positions in the projector's frame
    z, y, x = np.meshgrid(zc, src.coords(1), src.coords(2), indexing="ij")
    ramp = lambda z, y, x: 100.0 + 0.5 * z - 0.3 * y + 0.2 * x  # noqa: E731
    mr = Image(ramp(z, y, x).astype(np.float32), src, {"source": "test"})
    pet = ImageGrid((16, 100, 100), (2.03125, V_MMR, V_MMR))   # inside the MR's voxel-centre range
    with pytest.warns(GridResampledWarning, match=r"MR resampled onto the PET grid .*from shape\(z,y,x\)=\(20, 90, "
                                                  r"90\).* to shape\(z,y,x\)=\(16, 100, 100\)"):
        out = mr_on_pet_grid(mr, pet)
    assert out.grid.matches(pet)
    zp = (np.arange(16) - 7.5) * 2.03125
    Z, Y, X = np.meshgrid(zp, pet.coords(1), pet.coords(2), indexing="ij")
    np.testing.assert_allclose(out.array, ramp(Z, Y, X), atol=3e-4)
    # same grid: returned as is, no message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mr_on_pet_grid(out, pet) is out
    with pytest.raises(GeometryMismatchError, match="MR grid"):
        mr_on_pet_grid(mr, ImageGrid((16, 10, 10), (2.0, 2.0, 2.0), (0.0, 1000.0, 1000.0)))


# ------------------------------------------------------------------------------------------------ card
def test_training_grid_from_card_and_default():
    from sirf_ddip.prior.weights import read_card

    shape, vox, from_card = training_grid_yx(read_card("default"))
    assert (shape, vox, from_card) == ((128, 128), (V_MMR, V_MMR), True)
    assert training_grid_yx({"training": {}}) == (DEFAULT_TRAINING_SHAPE_YX, DEFAULT_TRAINING_VOXEL_YX_MM, False)
    bad = {"training": {"data": {"grid": {"shape": [90, 0, 128], "voxel_size": [2, 2, 2]}}}}
    with pytest.raises(InputFileError, match="training.data.grid"):
        training_grid_yx(bad, "x.card.json")
    pg = PriorGrid.from_card(ImageGrid((3, 344, 344), (2.03125, V_MMR, V_MMR)), read_card("default"), "resample")
    assert pg.prior_shape_yx == (128, 128)
