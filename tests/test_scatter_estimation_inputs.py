"""The scatter estimation loop's own input checks (library and ``sirf-ddip prepare``): the energy window read from a
real header, a μ-map that does not cover the field of view, OSEM subsets that do not split the views, and
``prepare``'s one-line errors (μ in HU / mm⁻¹, a short μ-map, no tail bins, a ``--scatter`` of another geometry)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED
from sirf_ddip.cli import main
from sirf_ddip.data import Image, ProjData
from sirf_ddip.errors import ConfigError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.geometry.scanner import Scanner
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io import read_projdata, write_image, write_projdata
from sirf_ddip.recon.scatter_estimation import (ScatterEstimationSettings, ScatterEstimator, estimate_scatter,
                                                mu_covering_reconstruction, stir_zoomed_image_grid)

MMR = SHARED / "real-mmr"


def _tiny_geometry(detectors=168):
    """4 rings, ``detectors`` per ring (168: 84 views, STIR's 21 OSEM subsets balance), 80 bins, mMR energy keys."""
    sc = Scanner("unknown", 4, detectors, 150.0, 7.0, 8.0, np.pi * 157.0 / detectors, 0.0, 80, 80,
                 {"energy_resolution": 0.145, "reference_energy_kev": 511.0})
    return SinogramGeometry(sc, span=1, max_ring_diff=1, num_tangential=80)


def _cylinder_mu(grid, radius=50.0):
    z, y, x = np.meshgrid(np.arange(grid.shape[0]), grid.coords(1), grid.coords(2), indexing="ij")
    return np.where((x - 10) ** 2 + (y + 5) ** 2 < radius ** 2, 0.096, 0.0).astype(np.float32)


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------ (a) energy window
def test_scatter_estimator_reads_the_energy_window_of_a_real_header(tmp_path):
    geom = _tiny_geometry()
    write_projdata(tmp_path / "p.hs", ProjData(np.ones(geom.shape, np.float32), geom,
                                               {"energy_window_kev": (425.0, 650.0)}))
    text = (tmp_path / "p.hs").read_text()
    assert "energy window lower level[1] := 425" in text and "energy window upper level[1] := 650" in text
    prompts = read_projdata(tmp_path / "p.hs")
    grid = geom.default_image_grid(xy=64)
    est = ScatterEstimator()
    est.set_input(prompts)
    est.set_attenuation_image(Image(_cylinder_mu(grid), grid))
    est.set_up()
    assert est.get_energy_window() == (425.0, 650.0)
    # a header without the keys: set_up names them
    (tmp_path / "q.hs").write_text(text.replace("energy window lower level[1] := 425\n", ""))
    (tmp_path / "q.s").write_bytes((tmp_path / "p.s").read_bytes())
    est.set_input(read_projdata(tmp_path / "q.hs"))
    est._window = None
    with pytest.raises(ConfigError) as exc:
        est.set_up()
    assert "energy window lower level[1]" in _one_line(exc)
    # the window set explicitly wins over the header's
    est.set_input(prompts)
    est.set_energy_window(430, 610)
    est.set_up()
    assert est.get_energy_window() == (430.0, 610.0)


# ------------------------------------------------------------------------------------ (b) μ cover
def test_mu_map_is_padded_transaxially_and_must_span_the_axial_fov():
    geom = _tiny_geometry()
    rec = stir_zoomed_image_grid(geom, 0.2)
    tight = ImageGrid((7, 31, 31), (3.5, 4.0, 4.0), (0.0, -60.0, -60.0))   # 124 mm wide; the FOV is ~314 mm
    z, y, x = np.meshgrid(np.arange(7), tight.coords(1), tight.coords(2), indexing="ij")
    arr = np.where(x ** 2 + y ** 2 < 50 ** 2, 0.096, 0.0).astype(np.float32)
    padded = mu_covering_reconstruction(Image(arr, tight), geom, 0.2)
    g = padded.grid
    assert g.voxel_size == tight.voxel_size and g.shape[0] == 7
    for a in (1, 2):                                         # it covers the reconstruction transaxially
        half = rec.shape[a] * rec.voxel_size[a] / 2
        assert g.origin[a] - g.voxel_size[a] / 2 <= -half + 1e-6
        assert g.origin[a] + (g.shape[a] - 0.5) * g.voxel_size[a] >= half - 1e-6
    # same values where the tight map was, 0 (STIR's vacuum) elsewhere
    oy = int(round((tight.origin[1] - g.origin[1]) / 4.0))
    ox = int(round((tight.origin[2] - g.origin[2]) / 4.0))
    np.testing.assert_array_equal(padded.array[:, oy:oy + 31, ox:ox + 31], arr)
    assert float(padded.array.sum()) == pytest.approx(float(arr.sum()))
    # a map that already covers it is returned as it is
    assert mu_covering_reconstruction(padded, geom, 0.2) is padded
    # axially: 4 rings of 7 mm = 28 mm; a 5-plane, 17.5 mm map leaves the end planes without μ
    short = Image(arr[:5], ImageGrid((5, 31, 31), (3.5, 4.0, 4.0), (0.0, -60.0, -60.0)))
    with pytest.raises(ConfigError) as exc:
        mu_covering_reconstruction(short, geom, 0.2)
    msg = _one_line(exc)
    assert "does not cover the axial field of view" in msg and "z from -8.8 to 8.8 mm" in msg


def test_estimate_scatter_refuses_a_short_mu_map_and_unbalanced_subsets():
    geom = _tiny_geometry()
    grid = geom.default_image_grid(xy=64)
    mu = _cylinder_mu(grid)
    prompts = ProjData(np.ones(geom.shape, np.float32), geom, {})
    short = Image(mu[:4], ImageGrid((4,) + grid.shape[1:], grid.voxel_size, grid.origin))
    with pytest.raises(ConfigError) as exc:
        estimate_scatter(prompts, short, (430.0, 610.0), efficiencies=np.ones(geom.shape, np.float32))
    assert "does not cover the axial field of view" in _one_line(exc)
    # (c) 21 subsets on 88 views (176 detectors): STIR's OSMAPOSL refuses; named, before any work
    g88 = _tiny_geometry(176)
    p88 = ProjData(np.ones(g88.shape, np.float32), g88, {})
    with pytest.raises(ConfigError) as exc:
        estimate_scatter(p88, Image(mu, g88.default_image_grid(xy=64)), (430.0, 610.0),
                         efficiencies=np.ones(g88.shape, np.float32))
    msg = _one_line(exc)
    assert "osem_num_subsets = 21" in msg and "88 views" in msg
    # the SIRF surface names its setter
    est = ScatterEstimator(ScatterEstimationSettings(osem_num_subsets=5, osem_num_subiterations=5))
    est.set_input(prompts)
    est.set_attenuation_image(Image(mu, grid))
    est.set_asm(np.ones(geom.shape, np.float32))
    est.set_energy_window(430, 610)
    est.set_up()
    with pytest.raises(ConfigError) as exc:
        est.process()
    assert "set_OSEM_num_subsets" in _one_line(exc) and "osem_num_subsets = 5" in str(exc.value)


@pytest.mark.slow
def test_estimate_scatter_pads_a_tight_mu_map_as_the_cli_does():
    """The library pads a μ-map cut close to the object (the result equals that of the map padded beforehand)."""
    geom = _tiny_geometry()
    grid = geom.default_image_grid(xy=64)
    mu = _cylinder_mu(grid)
    _, ky, kx = np.nonzero(mu)
    y0, y1, x0, x1 = ky.min() - 1, ky.max() + 2, kx.min() - 1, kx.max() + 2
    tight_grid = ImageGrid((grid.shape[0], y1 - y0, x1 - x0), grid.voxel_size,
                           (grid.origin[0], grid.origin[1] + y0 * grid.voxel_size[1],
                            grid.origin[2] + x0 * grid.voxel_size[2]))
    tight = Image(np.ascontiguousarray(mu[:, y0:y1, x0:x1]), tight_grid)
    assert float(tight.array.sum()) == pytest.approx(float(mu.sum()))   # the cylinder lies inside the cut
    rng = np.random.default_rng(1)
    prompts = ProjData(rng.poisson(4.0, geom.shape).astype(np.float32), geom, {})
    st = ScatterEstimationSettings(num_iterations=1, osem_num_subsets=7, osem_num_subiterations=2)
    kw = dict(efficiencies=np.ones(geom.shape, np.float32), settings=st)
    a = estimate_scatter(prompts, tight, (430.0, 610.0), **kw)
    b = estimate_scatter(prompts, mu_covering_reconstruction(tight, geom, st.zoom), (430.0, 610.0), **kw)
    np.testing.assert_array_equal(a.scatter.array, b.scatter.array)
    assert float(a.scatter.array.sum()) > 0


# ------------------------------------------------------------------------------------ (d) prepare's errors
@pytest.fixture
def case(tmp_path, material):
    """A small mMR study (segment 0 of span 11, 252 views, 41 bins) with an energy window in the prompts' header."""
    geom = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=5, num_tangential=41)
    rng = np.random.default_rng(3)
    meta = {"energy_window_kev": (430.0, 610.0)}
    write_projdata(tmp_path / "p.hs", ProjData(rng.poisson(5.0, geom.shape).astype(np.float32), geom, meta))
    write_projdata(tmp_path / "r.hs", ProjData(np.full(geom.shape, 0.5, np.float32), geom))
    return tmp_path, geom


def _prepare(d, mu, *extra):
    return ["prepare", "--prompts", str(d / "p.hs"), "--norm", str(MMR / "norm.n.hdr"), "--mu", str(mu),
            "--randoms", str(d / "r.hs"), "--out-dir", str(d / "study"), "--no-png", *extra]


def _refused(argv, d, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (d / "study").exists()                         # nothing written, not even the folder
    return err


def _mu_variant(d, name, transform, nz=None):
    from sirf_ddip.io.mumap import read_mu_map

    mu = read_mu_map(MMR / "mu_map.hv")
    arr = transform(np.asarray(mu.array, np.float32))
    grid = mu.grid if nz is None else ImageGrid((nz,) + mu.grid.shape[1:], mu.grid.voxel_size, mu.grid.origin)
    write_image(d / f"{name}.hv", Image(np.ascontiguousarray(arr, dtype=np.float32), grid))
    return d / f"{name}.hv"


def test_prepare_refuses_mu_in_hounsfield_units_or_per_mm(case, capsys):
    d, _ = case
    hu = _mu_variant(d, "mu_hu", lambda a: np.where(a > 0.05, 0.0, -1000.0))
    _refused(_prepare(d, hu), d, capsys, str(hu), "Hounsfield")
    mm = _mu_variant(d, "mu_mm", lambda a: a / 10)
    _refused(_prepare(d, mm), d, capsys, str(mm), "mm-1")


def test_prepare_refuses_a_mu_map_short_of_the_axial_fov(case, capsys):
    d, _ = case
    short = _mu_variant(d, "mu_short", lambda a: a[32:95], nz=63)     # 128 mm of the 258 mm axial FOV
    _refused(_prepare(d, short), d, capsys, str(short), "matrix size [3]", "does not cover the axial field of view")
    # with --no-scatter the estimate does not need it (the attenuation factors are STIR's: 0 outside the map)
    assert main(_prepare(d, short, "--no-scatter")) == 0


def test_prepare_refuses_a_mu_map_without_tail_bins(case, capsys):
    from sirf_ddip.io.mumap import read_mu_map

    d, _ = case
    g = read_mu_map(MMR / "mu_map.hv").grid
    z, y, x = np.meshgrid(np.arange(g.shape[0]), g.coords(1), g.coords(2), indexing="ij")
    full = _mu_variant(d, "mu_full", lambda a: np.where(x ** 2 + y ** 2 < 290.0 ** 2, 0.096, 0.0))
    _refused(_prepare(d, full), d, capsys, str(full), "tail mask keeps no bin", "ACF threshold")


def test_prepare_refuses_a_scatter_file_of_another_geometry(case, capsys):
    d, geom = case
    other = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=5, num_tangential=45)
    write_projdata(d / "s.hs", ProjData(np.ones(other.shape, np.float32), other))
    _refused(_prepare(d, MMR / "mu_map.hv", "--scatter", str(d / "s.hs")), d, capsys, str(d / "s.hs"))
