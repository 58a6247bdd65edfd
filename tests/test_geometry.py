"""Scanner / sinogram geometry against STIR's own numbers (stir_geometry.json) and STIR's span rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import stir_case_dir
from sirf_ddip.errors import InputFileError, UnsupportedDataError
from sirf_ddip.geometry import ImageGrid, Scanner, SinogramGeometry, get_scanner, scanner_names, span_segments
from sirf_ddip.io.header import InterfileHeader
from sirf_ddip.io.sinogram_header import geometry_from_header, scanner_from_header


# ---------------------------------------------------------------------- scanner presets
@pytest.mark.parametrize("alias,name,rings,dets,radius", [
    ("mMR", "Siemens mMR", 64, 504, 335.0),
    ("SIEMENS MMR", "Siemens mMR", 64, 504, 335.0),
    ("mct", "Siemens mCT", 55, 672, 428.0),
    ("Vision 600", "Siemens Vision 600", 80, 760, 417.0),
    ("discovery 690", "GE Discovery 690", 24, 576, 414.5),
    ("Discovery MI", "GE Discovery MI 4 rings", 36, 544, 380.5),
])
def test_presets(alias, name, rings, dets, radius):
    sc = get_scanner(alias)
    assert sc.name == name and sc.num_rings == rings and sc.detectors_per_ring == dets
    assert sc.effective_radius_mm == pytest.approx(radius)
    assert name in scanner_names()


def test_unknown_scanner_lists_names():
    with pytest.raises(KeyError) as exc:
        get_scanner("Nonexistent 3000")
    assert "Siemens mMR" in str(exc.value) and "GE Discovery 690" in str(exc.value)


def test_scanner_header_roundtrip():
    sc = get_scanner("Discovery 690")
    hdr = InterfileHeader.parse("!INTERFILE :=\n" + "\n".join(sc.header_lines()) + "\n!END OF INTERFILE :=\n")
    back = scanner_from_header(hdr)
    assert back == sc
    assert back.view_offset_deg == pytest.approx(-5.021)
    assert back.extra["num_transaxial_crystals_per_block"] == 9


# ---------------------------------------------------------------------- STIR reference geometry
def test_reproduces_stir_geometry_json(stir_case):
    ref = json.loads((stir_case / "stir_geometry.json").read_text())
    g = geometry_from_header(InterfileHeader.read(stir_case / "forward.hs"))
    assert g.scanner.effective_radius_mm == pytest.approx(ref["effective_ring_radius_mm"])
    assert g.scanner.ring_spacing_mm == pytest.approx(ref["ring_spacing_mm"])
    assert g.view_mashing == ref["view_mashing_factor"]
    t = g.tangential_positions()
    assert [t[0], t[-1]] == ref["tangential_pos_range"]
    np.testing.assert_allclose(g.phi(), ref["phi_rad"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g.s(), ref["s_mm"], rtol=1e-6, atol=1e-4)
    assert [s.number for s in g.segments] == [r["segment"] for r in ref["segments"]]
    for sg, r in zip(g.segments, ref["segments"]):
        assert (sg.min_ring_diff, sg.max_ring_diff) == (r["min_ring_diff"], r["max_ring_diff"])
        assert g.tantheta(sg.number) == pytest.approx(r["tantheta"], rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(sg.m_mm, r["m_mm"], atol=1e-5)
        assert list(sg.num_ring_pairs) == r["num_ring_pairs"]


def test_from_header_shape_and_order():
    d = stir_case_dir("mmr_3d6")
    g = geometry_from_header(InterfileHeader.read(d / "forward.hs"))
    assert g.shape == (36, 252, 128) and g.storage == "view"
    assert g.segment_sequence == [0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5]
    tab = g.sinogram_table()
    assert list(tab["segment"][:8]) == [0, 0, 0, 0, 0, 0, 1, 1]
    assert tab["segment"][11] == -1 and tab["axial"][11] == 0
    f2m = g.file_to_memory_index()
    assert sorted(f2m.tolist()) == list(range(36))
    # file order starts with segment -5 (one sinogram), which is the last in memory order
    assert f2m[0] == 35 and f2m[15] == 0
    np.testing.assert_array_equal(g.memory_to_file_index()[f2m], np.arange(36))


# ---------------------------------------------------------------------- span / segments
def test_mmr_span11_layout():
    g = SinogramGeometry("mMR", span=11, max_ring_diff=60)
    assert g.num_segments == 11 and g.num_sinograms == 837
    tab = [(s.min_ring_diff, s.max_ring_diff, s.num_axial) for s in g.segments]
    assert tab[5] == (-5, 5, 127)
    assert tab[6:] == [(6, 16, 115), (17, 27, 93), (28, 38, 71), (39, 49, 49), (50, 60, 27)]
    assert tab[:5] == [(-60, -50, 27), (-49, -39, 49), (-38, -28, 71), (-27, -17, 93), (-16, -6, 115)]
    seg1 = g.segment(1)
    assert seg1.axial_sampling_mm == pytest.approx(4.0625 / 2)
    assert g.tantheta(1) == pytest.approx(11 * 4.0625 / (2 * 335.0))
    # m is centred and spaced by half a ring
    np.testing.assert_allclose(np.diff(seg1.m_mm), 4.0625 / 2)
    assert seg1.m_mm[0] == pytest.approx(-seg1.m_mm[-1])


def test_span3_ring_pairs_and_clipping():
    sc = get_scanner("mMR").with_rings(6)
    segs = span_segments(6, 3, 4)
    assert segs == [(-4, -2, 7), (-1, 1, 11), (2, 4, 7)]
    g = SinogramGeometry(sc, span=3, max_ring_diff=4)
    assert list(g.segment(0).num_ring_pairs) == [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1]
    # segment 1 (ring diffs 2..4): r1+r2 from 2 to 8
    assert list(g.segment(1).num_ring_pairs) == [1, 1, 2, 1, 2, 1, 1]
    assert sum(g.segment(1).num_ring_pairs) == 4 + 3 + 2  # (6-2)+(6-3)+(6-4) ring pairs
    # last segment clipped at max ring difference (STIR keeps fewer ring differences there)
    assert span_segments(64, 11, 55)[-1][:2] == (50, 55)
    with pytest.raises(ValueError):
        span_segments(6, 2, 4)


def test_view_mashing_and_offset():
    g = SinogramGeometry("mMR", span=11, max_ring_diff=60, view_mashing=2)
    assert g.num_views == 126 and g.view_mashing == 2
    assert g.phi()[0] == pytest.approx(math.pi / 252 * 0.5)
    assert g.phi()[1] - g.phi()[0] == pytest.approx(math.pi / 126)
    g2 = SinogramGeometry("Discovery 690", span=1, max_ring_diff=3)
    assert g2.phi()[0] == pytest.approx(math.radians(-5.021))
    assert g2.num_views == 288 and g2.num_tangential == 381


def test_subsets_follow_stir_symmetries():
    g = SinogramGeometry("mMR", span=11, max_ring_diff=60)
    allv = np.concatenate([g.subset_views(7, s) for s in range(7)])
    assert sorted(allv.tolist()) == list(range(252))
    s1 = g.subset_views(7, 1)
    assert len(s1) == 36
    # basic views 1, 8, ... and their 90/180-degree partners 126-v, 126+v, 252-v
    assert {1, 8, 125, 127, 251}.issubset(set(s1.tolist()))
    np.testing.assert_array_equal(g.subset_views(7, 1, symmetries=False), np.arange(1, 252, 7))
    with pytest.raises(ValueError, match="unbalanced"):
        g.subset_views(5, 0)
    with pytest.raises(ValueError):
        g.subset_views(7, 7)


def test_default_image_grid():
    g = SinogramGeometry("mMR", span=11, max_ring_diff=60)
    grid = g.default_image_grid()
    assert grid.shape == (127, 344, 344)
    assert grid.voxel_size == pytest.approx((4.0625 / 2, 2.08626, 2.08626))
    assert g.default_image_grid(xy=128).origin[2] == pytest.approx(-64 * 2.08626)


# ---------------------------------------------------------------------- headers
def test_header_roundtrip_both_storages(tmp_path):
    g = SinogramGeometry(get_scanner("mMR").with_rings(4), span=3, max_ring_diff=3, view_mashing=4,
                         num_tangential=101)
    for storage in ("view", "sinogram"):
        text = "\n".join(g.header_lines(data_file="x.s", storage=storage)) + "\n"
        p = tmp_path / f"g_{storage}.hs"
        p.write_text(text)
        back = geometry_from_header(InterfileHeader.read(p))
        assert back.matches(g) and back.storage == storage
        assert InterfileHeader.read(p).get("name of data file") == "x.s"
    assert "name of data file" not in "\n".join(g.header_lines())


def _hs(extra: str, dims: int = 4) -> str:
    return ("!INTERFILE :=\n!imaging modality := PT\nname of data file := x.s\noriginating system := Siemens mMR\n"
            f"number of dimensions := {dims}\n"
            "matrix axis label [4] := segment\n!matrix size [4] := 1\n"
            "matrix axis label [3] := view\n!matrix size [3] := 252\n"
            "matrix axis label [2] := axial coordinate\n!matrix size [2] := { 1}\n"
            "matrix axis label [1] := tangential coordinate\n!matrix size [1] := 344\n"
            + extra + "!END OF INTERFILE :=\n")


def test_tof_header_on_scanner_without_tof_is_refused(tmp_path):
    p = tmp_path / "tof.hs"
    p.write_text(_hs("matrix axis label [5] := timing positions\n!matrix size [5] := 33\n%TOF mashing factor := 1\n"
                     "minimum ring difference per segment := {0}\nmaximum ring difference per segment := {0}\n"
                     "number of rings := 1\n", dims=5))
    with pytest.raises(InputFileError, match="tof.hs.*TOF data.*no TOF parameters"):
        geometry_from_header(InterfileHeader.read(p))


def test_missing_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.hs"
    p.write_text(_hs("maximum ring difference per segment := {0}\n"))
    with pytest.raises(InputFileError) as exc:
        geometry_from_header(InterfileHeader.read(p))
    assert "minimum ring difference per segment" in str(exc.value) and "bad.hs" in str(exc.value)
