"""Time of flight (issue 32): STIR 6.4's TOF geometry, Interfile layout, TOF projector and TOF OSEM.

Against STIR 6.4 itself (``../shared/stir-reference/d690_tof_2d``, GE Discovery 690, 11 TOF bins of mash 5) and
closed forms.  Tolerances are about 3x what is reached on a 2-core CPU (figures in each docstring).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.special import erf

from sirf_ddip.data import ProjData
from sirf_ddip.errors import ConfigError, GeometryError, GeometryMismatchError, InputFileError, InputFileWarning
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.geometry.scanner import get_scanner
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io import read_image, read_projdata, write_projdata
from sirf_ddip.physics.model import EngineLogLikelihood
from sirf_ddip.physics.projector import Projector
from sirf_ddip.physics.tof import TOFProjector, point_tof_coordinate, tof_kernel_weights

CASE = "d690_tof_2d"


def _case():
    from conftest import stir_case_dir
    return stir_case_dir(CASE)


@pytest.fixture(scope="module")
def d690():
    """STIR's d690_tof_2d data, our TOF projector on its geometry and grid, and our forward projection."""
    from conftest import stir_case_dir
    d = stir_case_dir(CASE)
    fw = read_projdata(d / "forward.hs")
    ph = read_image(d / "phantom.hv")
    P = Projector(fw.geometry, ph.grid)
    return dict(dir=d, fw=fw, ph=ph, P=P, y=P.forward_numpy(ph.array), info=json.loads((d / "case.json").read_text()))


def _small_tof_geometry(rings=3, mash=11):
    """A small 3-D TOF geometry (oblique segments, mirrored pairs): D690 rings, 5 TOF bins."""
    sc = get_scanner("GE Discovery 690").with_rings(rings)
    return SinogramGeometry(sc, span=1, max_ring_diff=rings - 1, view_mashing=8, num_tangential=61,
                            tof_mash_factor=mash)


# ------------------------------------------------------------------------------------------------ geometry
def test_tof_geometry_matches_stir_bins():
    """TOF bins, edges (float32, as STIR; within 1.6e-5 mm of STIR's listing), Δt, σ of STIR 6.4's D690."""
    d = _case()
    tof = json.loads((d / "case.json").read_text())["tof"]
    g = read_projdata(d / "forward.hs").geometry
    assert g.is_tof and g.num_tof_bins == tof["num_tof_bins"] == 11 and g.tof_mash_factor == 5
    assert list(g.timing_pos_nums()) == [b["timing_pos_num"] for b in tof["bins"]]
    edges = np.array([[b["low_mm"], b["high_mm"]] for b in tof["bins"]])
    np.testing.assert_allclose(g.tof_bin_edges_mm(), edges, atol=5e-5, rtol=0)
    np.testing.assert_allclose(g.tof_delta_time_ps(), [b["delta_time_ps"] for b in tof["bins"]], atol=1e-6)
    assert g.tof_sigma_mm == pytest.approx(tof["gaussian_sigma_mm"], abs=1e-5)
    assert g.shape == (11, 1, 288, 201) and g.sinogram_shape == (1, 288, 201)
    assert not g.non_tof().is_tof and g.non_tof().shape == (1, 288, 201)


def test_tof_mash_factor_rules():
    sc = get_scanner("GE Discovery 690").with_rings(1)
    assert SinogramGeometry(sc, tof_mash_factor=1).num_tof_bins == 55
    assert SinogramGeometry(sc, tof_mash_factor=55).num_tof_bins == 1
    with pytest.raises(GeometryError, match="does not divide the 55"):
        SinogramGeometry(sc, tof_mash_factor=2)  # STIR would silently drop one position
    vision = get_scanner("Siemens Vision 600").with_rings(1)
    assert SinogramGeometry(vision, tof_mash_factor=8).num_tof_bins == 33  # Siemens' 33 bins
    with pytest.raises(GeometryError, match="odd"):
        SinogramGeometry(vision, tof_mash_factor=2)  # 132 bins: STIR needs a central bin
    with pytest.raises(GeometryError, match="no TOF parameters"):
        SinogramGeometry("Siemens mMR", tof_mash_factor=1)
    with pytest.raises(GeometryError, match="larger than"):
        SinogramGeometry(sc, tof_mash_factor=56)


# ------------------------------------------------------------------------------------------------ Interfile
@pytest.mark.parametrize("name", ["forward", "prompts", "mult_factors", "mult_factors_nontof"])
def test_interfile_round_trip_is_bit_exact_with_stir(tmp_path, name):
    """Read STIR 6.4's TOF (and non-TOF) files and write them back: the same header, line by line (except the
    data file's name), and the same bytes."""
    d = _case()
    pd = read_projdata(d / f"{name}.hs")
    out = write_projdata(tmp_path / "x.hs", pd)
    ours = out.read_text().splitlines()
    stirs = (d / f"{name}.hs").read_text().splitlines()
    assert len(ours) == len(stirs)
    for a, b in zip(ours, stirs):
        if not a.startswith("name of data file"):
            assert a == b
    assert (tmp_path / "x.s").read_bytes() == (d / f"{name}.s").read_bytes()


def test_interfile_tof_round_trip_3d(tmp_path, rng):
    """A 3-D TOF sinogram (5 segments, 5 TOF bins) survives write + read; the file holds one complete non-TOF
    block per TOF bin, timing position slowest, and each block is what the non-TOF writer writes."""
    g = _small_tof_geometry()
    arr = rng.random(g.shape).astype(np.float32)
    write_projdata(tmp_path / "t.hs", ProjData(arr, g))
    back = read_projdata(tmp_path / "t.hs")
    assert back.geometry.matches(g) and back.geometry.num_tof_bins == 5
    np.testing.assert_array_equal(back.array, arr)
    write_projdata(tmp_path / "b2.hs", ProjData(arr[2], g.non_tof()))
    blk = (tmp_path / "b2.s").read_bytes()
    assert (tmp_path / "t.s").read_bytes()[2 * len(blk):3 * len(blk)] == blk
    txt = (tmp_path / "t.hs").read_text()
    assert "matrix axis label [5] := timing positions" in txt and "TOF mashing factor := 11" in txt


def _tof_header(tmp_path, old, new, name="bad.hs"):
    g = _small_tof_geometry(rings=1)
    write_projdata(tmp_path / "ok.hs", ProjData(np.ones(g.shape, np.float32), g))
    txt = (tmp_path / "ok.hs").read_text()
    assert old in txt
    p = tmp_path / name
    p.write_text(txt.replace(old, new))
    return p


@pytest.mark.parametrize("old,new,key,msg", [
    ("!matrix size [5] := 5", "!matrix size [5] := 7", "matrix size [5]", "7 TOF bins in the data"),
    ("TOF mashing factor := 11", "TOF mashing factor := 2", "TOF mashing factor", "does not divide the scanner's 55"),
    ("Maximum number of (unmashed) TOF time bins := 55", "Maximum number of (unmashed) TOF time bins := 0",
     "Maximum number of (unmashed) TOF time bins", "no TOF parameters"),
    ("matrix axis label [5] := timing positions", "matrix axis label [5] := energy", "matrix axis label [5]",
     "timing positions"),
])
def test_bad_tof_headers_are_one_line_errors(tmp_path, old, new, key, msg):
    """TOF bins that disagree with the scanner, a mashing factor that does not divide its TOF bins, TOF data on a
    scanner without TOF keys: named one-line errors (never a silent non-TOF read)."""
    p = _tof_header(tmp_path, old, new)
    with pytest.warns(InputFileWarning, match="for STIR's GE Discovery 690") if "Maximum number" in old else _nothing():
        with pytest.raises(InputFileError) as exc:
            read_projdata(p)
    s = str(exc.value)
    assert "\n" not in s and "bad.hs" in s and key.lower() in s.lower() and msg in s, s


def test_scanner_tof_keys_differing_from_stirs_preset_warn_or_refuse_when_strict(tmp_path):
    """A header's TOF resolution that differs from STIR's preset is used with a warning (as STIR); strict refuses."""
    from sirf_ddip.utils.leniency import strict_inputs
    p = _tof_header(tmp_path, "TOF timing resolution (ps)                 := 550",
                    "TOF timing resolution (ps)                 := 500")
    with pytest.warns(InputFileWarning, match="TOF timing resolution.*500 in the header but 550"):
        g = read_projdata(p).geometry
    assert g.scanner.timing_resolution_ps == 500 and g.tof_sigma_mm == pytest.approx(500 * 0.1498962 / 2.355, rel=1e-5)
    with strict_inputs(), pytest.raises(InputFileError, match="TOF timing resolution"):
        read_projdata(p)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------------------------ kernel
def test_tof_kernel_closed_forms():
    """Σ_k w_k(d) = 1 inside the bins' range (the Gaussian's integral); a bin centred on d holds
    erf(w / (2 √2 σ)); numpy and torch agree; the 4 √2 σ cut-off is STIR's."""
    g = _small_tof_geometry(rings=1, mash=5)
    e, sig = g.tof_bin_edges_mm(), g.tof_sigma_mm
    d = np.linspace(-150, 150, 301)
    w = tof_kernel_weights(d, e, sig)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-7)
    wc = tof_kernel_weights(np.array([0.0]), e, sig)[0, 5]
    assert wc == pytest.approx(erf(g.tof_bin_width_mm / (2 * math.sqrt(2) * sig)), abs=1e-7)
    wt = tof_kernel_weights(torch.as_tensor(d, dtype=torch.float64), e, sig).numpy()
    np.testing.assert_allclose(wt, w, atol=1e-12)
    far = (e[0, 0] - 4 * math.sqrt(2) * sig) - 1.0  # both edges of bin 0 beyond the cut-off
    assert tof_kernel_weights(np.array([far]), e, sig)[0, 0] == 0.0


# ------------------------------------------------------------------------------------------------ projector
def test_forward_matches_stir(d690):
    """Forward projection vs STIR 6.4: relative L2 2.2e-5 (all TOF bins), per TOF bin ≤ 6.6e-5."""
    y, ref = d690["y"], d690["fw"].array
    assert isinstance(d690["P"], TOFProjector)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 7e-5
    for k in range(11):
        nrm = np.linalg.norm(ref[k])
        if nrm > 0:
            assert np.linalg.norm(y[k] - ref[k]) / nrm < 2e-4, k
        else:
            assert np.abs(y[k]).max() == 0, k


def test_tof_sum_equals_non_tof(d690):
    """Σ_TOF of the TOF projection equals our non-TOF projection (max diff 1.4e-6 of the max) and STIR's
    non-TOF projection (rel. L2 2e-5)."""
    P, y, ph = d690["P"], d690["y"], d690["ph"]
    yn = Projector(d690["fw"].geometry.non_tof(), ph.grid).forward_numpy(ph.array)
    assert np.abs(y.sum(0) - yn).max() / yn.max() < 1e-5
    ref = read_projdata(d690["dir"] / "forward_nontof.hs").array
    assert np.linalg.norm(y.sum(0) - ref) / np.linalg.norm(ref) < 1e-4
    np.testing.assert_allclose(P.forward_non_tof(ph.array).numpy(), yn, rtol=0, atol=0)


def test_point_source_tof_profile(d690):
    """One hot voxel: TOF projection vs STIR's (rel. L2 4.6e-4); in every view the TOF peak is STIR's bin and
    round(d / w) with d = x sin φ − y cos φ (STIR's sign), and the peak tangential bin's TOF centroid is
    within 0.15 mm of d (STIR's own: 0.09 mm)."""
    d = d690["dir"]
    P, g = d690["P"], d690["fw"].geometry
    pt = read_image(d / "point.hv")
    y = P.forward_numpy(pt.array)
    ref = read_projdata(d / "point_fwd.hs").array
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1.5e-3
    x_mm, y_mm, _ = d690["info"]["point_physical_mm_xyz"]
    dd = point_tof_coordinate(g, x_mm, y_mm)
    ours = y[:, 0].sum(-1).argmax(0) + g.min_timing_pos_num
    stirs = ref[:, 0].sum(-1).argmax(0) + g.min_timing_pos_num
    np.testing.assert_array_equal(ours, stirs)
    np.testing.assert_array_equal(ours, np.round(dd / g.tof_bin_width_mm))
    t_pk = y[:, 0].sum(0).argmax(-1)
    prof = y[:, 0, np.arange(g.num_views), t_pk]  # (tof, view)
    centroid = (g.timing_pos_nums()[:, None] * g.tof_bin_width_mm * prof).sum(0) / prof.sum(0)
    ref_prof = ref[:, 0, np.arange(g.num_views), t_pk]
    ref_centroid = (g.timing_pos_nums()[:, None] * g.tof_bin_width_mm * ref_prof).sum(0) / ref_prof.sum(0)
    assert np.abs(centroid - ref_centroid).max() < 0.05
    assert np.abs(centroid - dd).max() < 0.3


def test_back_projection_matches_stir(d690):
    """Aᵀ1 of a TOF sinogram of ones vs STIR's ``ones_bp.hv``: relative L2 1.0e-4.  Aᵀ1 does not see the TOF
    kernel, so also the TOF-resolved transpose against STIR's forward projections:
    ⟨point, Aᵀ(STIR A phantom)⟩ = ⟨STIR A point, STIR A phantom⟩ (2.0e-5) and
    ⟨phantom, Aᵀ(STIR A point)⟩ likewise (7.3e-6)."""
    P, g, d = d690["P"], d690["fw"].geometry, d690["dir"]
    b = P.adjoint_numpy(np.ones(g.shape, np.float32))
    ref = read_image(d / "ones_bp.hv").array
    assert np.linalg.norm(b - ref) / np.linalg.norm(ref) < 3e-4
    pt = read_image(d / "point.hv").array.astype(np.float64)
    ph = d690["ph"].array.astype(np.float64)
    fw, pf = d690["fw"].array, read_projdata(d / "point_fwd.hs").array
    stir = float((pf.astype(np.float64) * fw).sum())
    assert float((pt * P.adjoint_numpy(fw)).sum()) / stir == pytest.approx(1.0, abs=6e-5)
    assert float((ph * P.adjoint_numpy(pf)).sum()) / stir == pytest.approx(1.0, abs=3e-5)


def test_small_3d_tof_projector_closed_forms():
    """3-D TOF (oblique, z-mirrored segments): adjoint ⟨Ax, y⟩ = ⟨x, Aᵀy⟩ (3e-8), TOF sum = non-TOF (1e-5), torch
    kernel = numba kernel, subsets = their views, and an off-centre point's TOF centroid in an oblique segment
    follows d = (x sin φ − y cos φ − (z − m) tan θ) / √(1 + tan²θ)."""
    g = _small_tof_geometry()
    grid = ImageGrid((5, 40, 40), (3.27, 4.0, 4.0))
    P = Projector(g, grid)
    Pt = Projector(g, grid, kernel="torch")
    assert isinstance(P, TOFProjector) and P.kernel == "numba"
    assert P.adjointness_test(2) < 1e-6
    rng = np.random.default_rng(0)
    x = rng.random(grid.shape).astype(np.float32)
    y = P.forward_numpy(x)
    yn = Projector(g.non_tof(), grid).forward_numpy(x)
    assert np.abs(y.sum(0) - yn).max() / yn.max() < 1e-5
    np.testing.assert_allclose(Pt.forward_numpy(x), y, atol=1e-5 * y.max())
    yy = rng.random(g.shape).astype(np.float32)
    b = P.adjoint_numpy(yy)
    np.testing.assert_allclose(Pt.adjoint_numpy(yy), b, atol=1e-5 * b.max())
    views = g.subset_views(4, 1)
    np.testing.assert_array_equal(views, np.arange(1, g.num_views, 4))  # STIR: no rotational symmetries with TOF
    np.testing.assert_allclose(P.forward_numpy(x, 1, 4), y[:, :, views], rtol=0, atol=1e-6 * y.max())


def test_point_tof_centroid_in_oblique_and_mirrored_segments():
    """With unmashed 13.3 mm TOF bins (mash 1), an off-centre point's TOF centroid follows STIR's sign and
    d = (x sin φ − y cos φ − (z − m) tan θ) / √(1 + tan²θ) in the oblique segment +2 and its z-mirrored partner −2
    (within 0.6 mm; reached 0.05 mm)."""
    g = _small_tof_geometry(mash=1)
    grid = ImageGrid((5, 40, 40), (3.27, 4.0, 4.0))
    P = Projector(g, grid)
    pt = np.zeros(grid.shape, np.float32)
    iz, iy, ix = 3, int(round((-20 - grid.origin[1]) / 4.0)), int(round((40 - grid.origin[2]) / 4.0))
    pt[iz, iy, ix] = 1.0
    X, Y, Z = grid.origin[2] + ix * 4.0, grid.origin[1] + iy * 4.0, (iz - 2) * 3.27
    yp = P.forward_numpy(pt)
    for seg in (2, -2):
        prof = yp[:, g.segment_offset(seg)]  # (tof, view, tang); one axial position
        t_pk = prof.sum(0).argmax(-1)
        pv = prof[:, np.arange(g.num_views), t_pk]
        hit = pv.sum(0) > 0  # views whose oblique tube reaches the point's plane
        assert hit.sum() >= 4
        centroid = (g.timing_pos_nums()[:, None] * g.tof_bin_width_mm * pv).sum(0)[hit] / pv.sum(0)[hit]
        dd = np.array([point_tof_coordinate(g, X, Y, Z, segment=seg, tang=t)[v] for v, t in enumerate(t_pk)])[hit]
        assert np.abs(dd).max() > 10  # the test means something: the point is away from the mid-points
        assert np.abs(centroid - dd).max() < 0.6, seg


# ------------------------------------------------------------------------------------------------ likelihood
def test_tof_likelihood_factor_shapes(rng):
    """Non-TOF multiplicative factors broadcast over the TOF bins (never copied); additive terms must be per TOF
    bin; wrong shapes are one-line errors naming what is wrong."""
    g = _small_tof_geometry(rings=1)
    grid = ImageGrid((1, 40, 40), (3.27, 4.0, 4.0))
    y = ProjData(rng.poisson(1.0, g.shape).astype(np.float32), g)
    m3 = ProjData(rng.uniform(0.5, 1.5, g.sinogram_shape).astype(np.float32), g.non_tof())
    m4 = ProjData(np.broadcast_to(m3.array, g.shape).copy(), g)
    a = ProjData(np.full(g.shape, 0.1, np.float32), g)
    L3 = EngineLogLikelihood(y, m3, a, grid=grid, num_subsets=2)
    L4 = EngineLogLikelihood(y, m4, a, grid=grid, num_subsets=2)
    assert tuple(L3.mult.shape) == g.sinogram_shape  # kept once, not per TOF bin
    x = torch.rand(grid.shape)
    for s in (None, 0, 1):
        torch.testing.assert_close(L3.forward(x, s), L4.forward(x, s))
        torch.testing.assert_close(L3.backprojected_ratio(x, s), L4.backprojected_ratio(x, s), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(L3.sensitivity(s), L4.sensitivity(s), rtol=1e-5, atol=1e-5)
    assert L3.value(x) == pytest.approx(L4.value(x), rel=1e-6)
    with pytest.raises(GeometryMismatchError, match="non-TOF.*give them per TOF bin") as exc:
        EngineLogLikelihood(y, m3, ProjData(np.ones(g.sinogram_shape, np.float32), g.non_tof()), grid=grid)
    assert "\n" not in str(exc.value)
    with pytest.raises(GeometryMismatchError, match="shape"):
        EngineLogLikelihood(y, np.ones((3,) + g.sinogram_shape, np.float32), grid=grid)
    with pytest.raises(GeometryMismatchError, match="TOF data .* non-TOF"):
        EngineLogLikelihood(ProjData(y.array[0], g.non_tof()), m4, grid=grid)


@pytest.mark.slow
def test_tof_osem_matches_stir():
    """STIR 6.4 OSMAPOSL, 2 iterations x 8 subsets on TOF data: sensitivity rel. L2 1.1e-4, image rel. L2 1.2e-3,
    ROI means within 3.2e-6 (TOF norm and non-TOF norm alike)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_osem import _rois

    from sirf_ddip.recon.osem import OSEMReconstructor
    d = _case()
    ref = read_image(d / "osem_2it8ss_16.hv").array
    rois = _rois(read_image(d / "phantom.hv").array)
    for norm in ("mult_factors.hs", "mult_factors_nontof.hs"):
        ds = EngineLogLikelihood.from_files(d / "prompts.hs", d / norm, d / "additive_term.hs",
                                            image_template=d / "init.hv", device="cpu")
        sref = read_image(d / ("sensitivity.hv" if norm == "mult_factors.hs" else "sensitivity_nontof.hv")).array
        sens = ds.sensitivity().numpy()
        assert np.linalg.norm(sens - sref) / np.linalg.norm(sref) < 4e-4
        recon = OSEMReconstructor(ds, num_subsets=8, num_iterations=2)
        recon.reconstruct(read_image(d / "init.hv"))
        out = recon.get_output().array
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 4e-3
        for name, roi in rois.items():
            assert out[roi].mean() == pytest.approx(ref[roi].mean(), rel=1e-5), (norm, name)


# ------------------------------------------------------------------------------------------------ DDIP
@pytest.mark.slow
def test_ddip_on_tof_data():
    """DDIP's data step on TOF data is the TOF EM update: with β = 0 and no fine-tuning DDIP is plain OSEM on the
    TOF likelihood (to float precision), and a fine-tuned run gives a finite image that fits the TOF data."""
    from test_ddip_support import make_ddip, tiny_bundle

    from sirf_ddip.recon.em import em_update
    torch.set_num_threads(1)
    g = _small_tof_geometry(rings=1)
    grid = ImageGrid((1, 16, 16), (3.27, 8.0, 8.0))
    rng = np.random.default_rng(5)
    truth = np.zeros(grid.shape, np.float32)
    truth[0, 4:12, 3:13] = 1.0
    truth[0, 6:9, 8:11] = 3.0
    P = Projector(g, grid)
    ybar = P.forward_numpy(truth) * 20.0 + 0.05
    y = ProjData(rng.poisson(ybar).astype(np.float32), g)
    ds = EngineLogLikelihood(y, ProjData(np.full(g.sinogram_shape, 20.0, np.float32), g.non_tof()),
                             ProjData(np.full(g.shape, 0.05 / 20.0, np.float32), g), grid=grid)
    ds.mr = torch.as_tensor(truth * 100.0, dtype=torch.float64)
    ds.grid = None  # the tiny test prior runs on the PET grid itself (no padding to the prior's training grid)
    fast = dict(t_start=30, num_steps=3, n_init=4, num_em=2, num_finetune=2, device="cpu", seed=3)
    r = make_ddip(ds, tiny_bundle(), fast, finetune=False, beta=0.0, beta_final=None, num_subsets=2,
                  em_start="previous")
    r.process(progress=False)
    x = torch.ones(grid.shape)
    for k in range(4 + 3 * 2 * 2):
        x = em_update(ds, x, k % 2)
    torch.testing.assert_close(r._x_img.float(), x, rtol=1e-4, atol=1e-5)
    r2 = make_ddip(ds, tiny_bundle(), fast, num_subsets=2)
    r2.process(progress=False)
    out = r2.x.float().reshape(grid.shape)
    assert torch.isfinite(out).all()
    assert ds.value(out) > ds.value(torch.ones(grid.shape))


# ------------------------------------------------------------------------------------------------ listmode
def test_petsird_tof_listmode_histograms_into_tof_bins(tmp_path):
    """A TOF sinogram written as PETSIRD events (each count at an unmashed TOF position inside its mashed bin,
    half of the events with the detectors listed the other way round, i.e. the opposite TOF sign) histograms
    back exactly into the TOF bins (STIR: d > 0 towards the bin's detector 1); summed over TOF it is the
    non-TOF histogram; a file whose TOF bins are not the scanner's is a one-line error."""
    pytest.importorskip("petsird")
    from test_petsird import _events_from_sinogram

    from sirf_ddip.io.petsird_listmode import write_petsird_cylinder
    from sirf_ddip.physics.histogram import histogram_petsird
    sc = get_scanner("GE Discovery 690").with_rings(2)
    g = SinogramGeometry(sc, span=1, max_ring_diff=1, view_mashing=4, num_tangential=91, tof_mash_factor=5)
    rng = np.random.default_rng(2)
    truth = np.zeros(g.shape, np.float32)
    np.add.at(truth.reshape(-1), rng.integers(0, truth.size, 400), 1)
    half_u = (sc.max_num_timing_poss - 1) // 2
    rows = []
    for k in range(g.num_tof_bins):
        ev = _events_from_sinogram(truth[k], g.non_tof())
        u = k * g.tof_mash_factor - half_u + rng.integers(0, g.tof_mash_factor, len(ev))  # towards STIR's det 1
        flip = rng.random(len(ev)) < 0.5
        ev = np.where(flip[:, None], ev[:, [2, 3, 0, 1]], ev)
        rows.append(np.column_stack([ev, np.where(flip, -u, u)]))
    ev = np.concatenate(rows)
    path = write_petsird_cylinder(tmp_path / "tof.petsird", sc, [(0, 1000, ev, ev[:0])], tof=True)
    h = histogram_petsird(path, g)
    assert not h.stats["tof_bins_summed"]
    got = h.to_projdata().array
    np.testing.assert_array_equal(got, truth)
    np.testing.assert_array_equal(histogram_petsird(path, g.non_tof()).to_projdata().array, truth.sum(0))
    out = h.write(tmp_path / "tof.hs")
    np.testing.assert_array_equal(read_projdata(out).array, truth)
    with pytest.raises(GeometryMismatchError, match="TOF bins") as exc:
        histogram_petsird(path, SinogramGeometry(replace(sc, max_num_timing_poss=53), span=1, max_ring_diff=1,
                                                 view_mashing=4, num_tangential=91, tof_mash_factor=1))
    assert "\n" not in str(exc.value)


def test_map_rdp_on_tof_data():
    """MAP-RDP runs on the TOF likelihood (STIR's d690_tof_2d data, non-TOF norm): its objective increases
    monotonically and matches log-likelihood − β RDP."""
    from sirf_ddip.recon.map_rdp import MAPRDPReconstructor
    d = _case()
    ds = EngineLogLikelihood.from_files(d / "prompts.hs", d / "mult_factors_nontof.hs", d / "additive_term.hs",
                                        image_template=d / "init.hv", device="cpu")
    init = torch.ones(ds.image_shape)
    rec = MAPRDPReconstructor(beta=0.05, epsilon=0.01)
    rec.set_objective_function(ds)
    rec.set_num_subiterations(8)
    rec.set_up(init)
    rec.set_current_estimate(init)
    rec.process(progress=False)
    h = np.array(rec.history)
    assert np.all(np.diff(h) >= -1e-6 * abs(h[0])) and h[-1] > h[0]
    assert rec.objective(rec.x) == pytest.approx(ds.value(rec.x) - 0.05 * rec.prior.value(rec.x), rel=1e-6)


def test_non_default_axial_grid_traces_each_segment():
    """An image of 3 planes on 3 rings (STIR's default has 5): STIR's TOF z (voxel z minus the ring centre) is
    not the ray tracer's, so segment −d is not +d mirrored; each segment is traced on its own and the TOF sum is
    still the non-TOF projection, and the projector stays adjoint."""
    from sirf_ddip.physics.tof import axial_tof_offset_mm
    g = _small_tof_geometry()
    grid = ImageGrid((3, 30, 30), (3.27, 4.0, 4.0))
    assert axial_tof_offset_mm(g, grid) == pytest.approx(-3.27)
    P = Projector(g, grid)
    assert not P.use_mirror and Projector(g, ImageGrid((5, 30, 30), (3.27, 4.0, 4.0))).use_mirror
    x = np.random.default_rng(1).random(grid.shape).astype(np.float32)
    y = P.forward_numpy(x)
    yn = Projector(g.non_tof(), grid).forward_numpy(x)
    assert np.abs(y.sum(0) - yn).max() / yn.max() < 1e-5
    assert P.adjointness_test(1) < 1e-6


# ------------------------------------------------------------------------------------------------ simulation
def test_simulate_tof_study(tmp_path):
    """``simulate`` with ``tof_mash_factor``: TOF prompts and additive term, a TOF-independent mult written once
    per LOR, and the files are the model: Σ m (A_TOF truth + a) = the expected prompts; summed over TOF bins,
    the trues are the non-TOF trues; a TOF mashing factor on a non-TOF scanner is a config error."""
    from sirf_ddip.sim import simulate as sim
    cfg = sim.SimulationConfig(scanner="GE Discovery 690", num_rings=1, max_ring_diff=0, view_mashing=8,
                               num_tangential=61, image_xy=32, tof_mash_factor=11, dose_fraction=0.5, seed=2,
                               write_nifti=False)
    out = sim.simulate_study(cfg, tmp_path / "s")
    case = json.loads((out / "case.json").read_text())
    y, m, a = (read_projdata(out / f"{n}.hs") for n in ("prompts", "mult_factors", "additive_term"))
    truth = read_image(out / "truth.hv")
    assert y.geometry.is_tof and y.array.shape == (5, 1, 36, 61) and case["tof_bins"] == 5
    assert not m.geometry.is_tof and m.array.shape == (1, 36, 61)
    assert a.array.shape == y.array.shape
    P = Projector(y.geometry, truth.grid)
    ax = P.forward_numpy(truth.array).astype(np.float64)
    expected = m.array[None].astype(np.float64) * (ax + a.array)
    assert expected.sum() == pytest.approx(case["expected_prompts"], rel=1e-5)
    assert y.array.sum() == case["total_prompts"]
    trues_nt = m.array.astype(np.float64) * Projector(y.geometry.non_tof(), truth.grid).forward_numpy(truth.array)
    assert float((m.array[None] * ax).sum()) == pytest.approx(float(trues_nt.sum()), rel=1e-5)
    with pytest.raises(ConfigError, match="tof_mash_factor"):
        sim.build_geometry(sim.SimulationConfig(scanner="Siemens mMR", tof_mash_factor=1))
