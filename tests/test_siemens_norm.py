"""Siemens ECAT8 normalisation: the real mMR norm.n against STIR 6.4's efficiencies, span/mashing/segment
consistency, component switches, and bad input (another scanner, software version, layout, truncated file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sirf_ddip.errors import GeometryMismatchError, InputFileError, UnsupportedDataError
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io.header import InterfileHeader
from sirf_ddip.io.siemens_norm import read_ecat8_norm
from sirf_ddip.physics.normalisation import NormComponents, ecat8_efficiencies, ring_pairs

from conftest import SHARED, real_mmr
from sirf_ddip.io.sinogram_header import geometry_from_header

MMR = SHARED / "real-mmr"



@pytest.fixture(scope="module")
def norm():
    real_mmr("norm.n.hdr", "norm.n")
    return read_ecat8_norm(MMR / "norm.n.hdr")


def _geom(name: str) -> SinogramGeometry:
    real_mmr(f"templates/{name}")
    return geometry_from_header(InterfileHeader.read(MMR / "templates" / name))


def _stir_reference(geom: SinogramGeometry, npz: Path) -> tuple[np.ndarray, np.ndarray]:
    ref = np.load(npz)
    views = ref["views"]
    R = np.zeros((geom.num_sinograms, len(views), geom.num_tangential), np.float32)
    for i, sg in enumerate(geom.segments):  # segN: N-th segment in file (ascending) order
        R[geom.segment_slice(sg.number)] = ref[f"seg{i}"]
    return views, R


def test_real_norm_matches_stir_span11(norm):
    real_mmr("norm_efficiencies_shared_views.npz")
    geom = _geom("template_span11.hs")
    views, R = _stir_reference(geom, MMR / "norm_efficiencies_shared_views.npz")
    eff = ecat8_efficiencies(norm, geom, views=views)
    rel = np.linalg.norm(eff - R) / np.linalg.norm(R)
    assert rel < 2e-7  # achieved 5.8e-8 (float32 rounding); acceptance 1e-4
    np.testing.assert_array_equal(eff == 0, R == 0)  # the detector gaps, in the same bins
    assert 0.19 < np.mean(R == 0) < 0.22


def test_segment_range_and_span1_sums(norm):
    views = [0, 100]
    full = _geom("template_span11.hs")
    e11 = ecat8_efficiencies(norm, full, views=views)
    # segments -2..2 of span 11 (built here: the shared template_seg2.hs lists the ring differences of
    # segments -3..1 with the axial sizes of -2..2)
    table = [(s.min_ring_diff, s.max_ring_diff, s.num_axial) for s in full.segments]
    seg2 = SinogramGeometry(full.scanner, segments=table[3:8])
    e2 = ecat8_efficiencies(norm, seg2, views=views)
    by_rd = {(s.min_ring_diff, s.max_ring_diff): s.number for s in full.segments}
    for s in seg2.segments:  # matched by ring differences (this template's segments are not symmetric)
        np.testing.assert_array_equal(e2[seg2.segment_slice(s.number)],
                                      e11[full.segment_slice(by_rd[(s.min_ring_diff, s.max_ring_diff)])])
    # a span-11 bin is the sum of the span-1 bins of its ring pairs (STIR sums, it does not average)
    span1 = SinogramGeometry(full.scanner, span=1, max_ring_diff=60)
    e1 = ecat8_efficiencies(norm, span1, views=views)
    sg = full.segment(1)
    n = full.scanner.num_rings
    for ax in (0, sg.num_axial // 2, sg.num_axial - 1):
        acc = 0
        for r1, r2 in ring_pairs(n, sg.min_ring_diff, sg.max_ring_diff, sg.num_axial, ax):
            s1 = span1.segment(r2 - r1)
            acc = acc + e1[span1.segment_offset(r2 - r1) + (r1 if r2 - r1 >= 0 else r2)]
            assert s1.min_ring_diff == r2 - r1
        np.testing.assert_allclose(e11[full.segment_offset(1) + ax], acc, rtol=2e-6)


def test_view_mashing_weights(norm):
    full = _geom("template_span11.hs")
    mash = _geom("template_mash2.hs")
    v = np.array([0, 5, 125])
    e = ecat8_efficiencies(norm, full, views=np.concatenate([2 * v, 2 * v + 1]))
    even, odd = e[:, :3], e[:, 3:]
    np.testing.assert_allclose(ecat8_efficiencies(norm, mash, views=v), 2 * even + odd, rtol=2e-6)  # STIR's
    np.testing.assert_allclose(ecat8_efficiencies(norm, mash, views=v, stir_mashing=False), even + odd, rtol=2e-6)


def test_components_off_counts_lors(norm):
    geom = SinogramGeometry(norm.scanner, span=11, max_ring_diff=16, view_mashing=2, num_tangential=11)
    off = NormComponents(geometric=False, crystal_interference=False, detector_efficiencies=False,
                         axial_effects=False)
    eff = ecat8_efficiencies(norm, geom, off, views=[0, 7], stir_mashing=False)
    pairs = geom.sinogram_table()["num_ring_pairs"]
    np.testing.assert_array_equal(eff, np.broadcast_to(2.0 * pairs[:, None, None], eff.shape))
    # crystal efficiencies alone: gaps are exact zeros, and switching gaps off removes them
    only_eff = NormComponents(geometric=False, crystal_interference=False, axial_effects=False)
    with_gaps = ecat8_efficiencies(norm, geom, only_eff, views=[0])
    no_gaps = ecat8_efficiencies(norm, geom, NormComponents(geometric=False, crystal_interference=False,
                                                            axial_effects=False, gaps=False), views=[0])
    assert np.mean(with_gaps == 0) > 0.05 and np.all(no_gaps > 0)
    with pytest.raises(ValueError, match="unknown normalisation component"):
        NormComponents.from_names(["dead_time"])


def _bad_header(tmp_path: Path, old: str, new: str) -> Path:
    real_mmr("norm.n.hdr", "norm.n")
    txt = (MMR / "norm.n.hdr").read_text(encoding="latin-1")
    assert old in txt
    txt = txt.replace(old, new).replace("!name of data file:=norm.n", f"!name of data file:={MMR / 'norm.n'}")
    p = tmp_path / "bad.n.hdr"
    p.write_text(txt, encoding="latin-1")
    return p


def test_norm_of_another_scanner_or_version(tmp_path, norm):
    p = _bad_header(tmp_path, "!originating system:=2008", "!originating system:=1104")
    with pytest.raises(UnsupportedDataError, match=r"bad.n.hdr.*originating system.*'1104' is not supported"):
        read_ecat8_norm(p)
    p = _bad_header(tmp_path, "%SMS-MI version number:=3.4", "%SMS-MI version number:=4.1")
    with pytest.raises(UnsupportedDataError, match=r"SMS-MI version number.*4.1.*not supported"):
        read_ecat8_norm(p)
    p = _bad_header(tmp_path, "%matrix size [3]:={504,64}", "%matrix size [3]:={672,55}")
    with pytest.raises(InputFileError, match=r"matrix size \[3\].*\[672, 55\].*needs \[504, 64\]"):
        read_ecat8_norm(p)
    p = _bad_header(tmp_path, "data offset in bytes [3]:=187136", "data offset in bytes [3]:=187140")
    with pytest.raises(InputFileError, match=r"data offset in bytes \[3\]"):
        read_ecat8_norm(p)
    p = _bad_header(tmp_path, "normalization header", "sinogram subheader")
    with pytest.raises(InputFileError, match="not a Siemens normalisation header"):
        read_ecat8_norm(p)
    # a template of another scanner
    mct = SinogramGeometry("Siemens mCT", span=11, max_ring_diff=5, view_mashing=8, num_tangential=9)
    with pytest.raises(GeometryMismatchError, match="Siemens mMR.*Siemens mCT"):
        ecat8_efficiencies(norm, mct)


def test_truncated_norm_file(tmp_path):
    real_mmr("norm.n.hdr", "norm.n")
    data = (MMR / "norm.n").read_bytes()
    (tmp_path / "short.n").write_bytes(data[:300000])
    txt = (MMR / "norm.n.hdr").read_text(encoding="latin-1").replace("!name of data file:=norm.n",
                                                                       "!name of data file:=short.n")
    (tmp_path / "short.n.hdr").write_text(txt, encoding="latin-1")
    with pytest.raises(InputFileError, match=r"short.n.*too short.*need 323404 bytes, found 300000"):
        read_ecat8_norm(tmp_path / "short.n.hdr")
