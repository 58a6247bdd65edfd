"""Siemens PETLINK 32-bit TOF listmode (STIR 6.4 ``CListEventECAT8_32bit``) histogrammed into TOF sinograms.

Truths are closed forms of the format (UCL/STIR ``src/listmode_buildblock/CListRecordECAT8_32bit.cxx``,
``src/IO/stir_ecat_common.cxx``): an event word's 30-bit offset is ``((s * R**2 + z) * V + v) * T + i`` with
``s`` the Siemens TOF bin (timing position ``0, +1, -1, +2, -2, ...``), ``z`` the span-1 sinogram in the ECAT
segment order ``0, -1, +1, ...``, ``v`` the view and ``i`` the tangential index from ``-(T // 2)``. The sinogram,
view and tangential position of an event on a span-1 template of its own scanner are those of its offset; its
TOF bin on a template with TOF mashing ``f`` is ``round(k / f)``. STIR's recon_test_pack has no TOF listmode of
the mCT or Vision (its one listmode sample is a non-TOF mMR file), so no STIR histogram is compared here.
"""

from __future__ import annotations

import numpy as np
import pytest

from sirf_ddip.errors import GeometryMismatchError, InputFileError, InputFileWarning, UnsupportedDataError
from sirf_ddip.geometry import scanner as scanner_module
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io.siemens_listmode import (ecat_segment_sequence, read_listmode_header,
                                           siemens_timing_pos_sequence)
from sirf_ddip.physics.histogram import ListmodeHistogrammer

# a small TOF scanner under a Siemens-style name (the listmode header names its scanner; STIR knows only its
# table's): 4 rings, 24 crystals (12 views), 11 tangential positions, 15 unmashed TOF bins
RINGS, DETS, TANG, NTOF = 4, 24, 11, 15
VIEWS = DETS // 2


@pytest.fixture
def small_tof_scanner(monkeypatch):
    sc = scanner_module._p("Test TOF 4-ring", RINGS, TANG, TANG, DETS, 100.0, 5.0, 4.0, 2.0, 0.0,
                           tof=(NTOF, 40.0, 250.0))
    monkeypatch.setattr(scanner_module, "_PRESETS", scanner_module._PRESETS + [(("Test TOF 4-ring", "T4"), sc)])
    return sc


def _write_lm(folder, words, *, system="T4", rings=RINGS, views=VIEWS, tang=TANG, mrd=RINGS - 1, ntof=NTOF,
              mash="1", name="t"):
    table = [rings - abs(d) for d in ecat_segment_sequence(mrd)]
    np.asarray(words, dtype="<u4").tofile(folder / f"{name}.l")
    hdr = folder / f"{name}.l.hdr"
    lines = ["!INTERFILE :=", f"!originating system :={system}", "!data offset in bytes :=0",
             f"name of data file:={name}.l", "data format :=CoincidenceList", f"number of rings :={rings}",
             f"%number of TOF time bins:={ntof}", f"%total listmode word counts :={len(words)}",
             "%LM event and tag words format (bits) :=32", "%axial compression :=1",
             f"%maximum ring difference :={mrd}", f"%number of projections :={tang}", f"%number of views :={views}",
             f"%number of segments :={len(table)}", "%segment table :={" + ",".join(map(str, table)) + "}"]
    if mash is not None:
        lines.append(f"%TOF mashing factor :={mash}")
    hdr.write_text("\n".join(lines) + "\n")
    return hdr


def _ecat_sinogram(d: int, a: int, rings: int = RINGS) -> int:
    """Span-1 sinogram index of (ring difference d, axial position a) in the ECAT order 0, -1, +1, ..."""
    z = 0
    for seg in ecat_segment_sequence(rings - 1):
        if seg == d:
            return z + a
        z += rings - abs(seg)
    raise ValueError(d)


def _memory_sinogram(d: int, a: int, rings: int = RINGS) -> int:
    """Sinogram index of (d, a) in our memory order (segments 0, +1, -1, +2, ...; span 1, all differences)."""
    order = [0] + [s for k in range(1, rings) for s in (k, -k)]
    z = 0
    for seg in order:
        if seg == d:
            return z + a
        z += rings - abs(seg)
    raise ValueError(d)


def _word(s, d, a, v, i, prompt=True, rings=RINGS, views=VIEWS, tang=TANG):
    z = _ecat_sinogram(d, a, rings)
    off = ((s * rings ** 2 + z) * views + v) * tang + i + tang // 2
    assert off < 1 << 30
    return (int(prompt) << 30) | off


def _random_events(rng, n):
    d = rng.integers(-(RINGS - 1), RINGS, n)
    a = np.array([rng.integers(0, RINGS - abs(x)) for x in d])
    return d, a, rng.integers(0, VIEWS, n), rng.integers(-(TANG // 2), TANG // 2 + 1, n), rng.integers(0, NTOF, n)


def test_timing_pos_sequence_is_stirs():
    assert siemens_timing_pos_sequence(7).tolist() == [0, 1, -1, 2, -2, 3, -3]
    assert siemens_timing_pos_sequence(1).tolist() == [0]


@pytest.mark.parametrize("mash", [1, 3, 5, 15])
def test_tof_histogram_equals_the_closed_form_in_every_bin(tmp_path, small_tof_scanner, mash):
    rng = np.random.default_rng(mash)
    d, a, v, i, s = _random_events(rng, 2000)
    prompt = rng.random(d.size) < 0.8
    words = [1 << 31] + [_word(*e) for e in zip(s, d, a, v, i, prompt)] + [(1 << 31) | 5]
    hdr = read_listmode_header(_write_lm(tmp_path, words))
    assert hdr.is_tof and hdr.num_tof_bins == NTOF and hdr.tof_block_sinograms == RINGS ** 2
    geo = SinogramGeometry(small_tof_scanner, span=1, tof_mash_factor=mash)
    nt = NTOF // mash
    assert geo.num_tof_bins == nt
    hist = ListmodeHistogrammer(hdr, geo)
    sino = np.array([_memory_sinogram(dd, aa) for dd, aa in zip(d, a)])
    k = ((s + 1) // 2) * np.where(s % 2 == 1, 1, -1)  # Siemens TOF bin 0, 1, 2, 3, ... -> 0, +1, -1, +2, ...
    j = np.sign(k) * np.floor(np.abs(k) / mash + 0.5).astype(int)  # STIR round(k / f), half away from zero
    for events, sel, w in (("prompts", prompt, 1), ("delayeds", ~prompt, 1), ("trues", None, None)):
        got = hist.histogram(events=events).to_projdata().array
        assert got.shape == (nt, RINGS * RINGS, VIEWS, TANG)
        expect = np.zeros(got.shape, np.float64)
        wt = np.where(prompt, 1.0, -1.0) if w is None else sel.astype(np.float64)
        np.add.at(expect, (j + nt // 2, sino, v, i + TANG // 2), wt)
        assert np.array_equal(got, expect), f"{events}, mash {mash}: {np.count_nonzero(got != expect)} bins differ"


def test_tof_sum_equals_the_non_tof_histogram_of_the_same_file(tmp_path, small_tof_scanner):
    rng = np.random.default_rng(7)
    d, a, v, i, s = _random_events(rng, 3000)
    words = [1 << 31] + [_word(*e) for e in zip(s, d, a, v, i)] + [(1 << 31) | 9]
    hdr = read_listmode_header(_write_lm(tmp_path, words))
    tof = ListmodeHistogrammer(hdr, SinogramGeometry(small_tof_scanner, span=3, tof_mash_factor=3)).histogram()
    non_tof_geo = SinogramGeometry(small_tof_scanner, span=3)
    non = ListmodeHistogrammer(hdr, non_tof_geo).histogram()
    assert tof.data.size == 5 * non.data.size and non.stats["counted"] == 3000
    assert np.array_equal(tof.to_projdata().array.sum(axis=0), non.to_projdata().array)
    # a non-TOF listmode of the same events (TOF bits cleared) histograms to the same non-TOF sinogram
    flat = [_word(0, *e[1:]) for e in zip(s, d, a, v, i)]
    hdr0 = read_listmode_header(_write_lm(tmp_path, [1 << 31] + flat + [(1 << 31) | 9], ntof=1, name="n"))
    assert not hdr0.is_tof
    assert np.array_equal(ListmodeHistogrammer(hdr0, non_tof_geo).histogram().data, non.data)


def test_tof_listmode_writes_a_stir_tof_sinogram(tmp_path, small_tof_scanner):
    from sirf_ddip.cli import main
    from sirf_ddip.io import read_projdata

    words = [1 << 31, _word(1, 0, 2, 3, -4), _word(2, 1, 0, 11, 5), _word(4, -2, 1, 0, 0), (1 << 31) | 3]
    lm = _write_lm(tmp_path, words)
    geo = SinogramGeometry(small_tof_scanner, span=1, tof_mash_factor=3)
    tmpl = tmp_path / "tmpl.hs"
    tmpl.write_text("\n".join(geo.header_lines(data_file="tmpl.s")) + "\n")
    out = tmp_path / "o" / "p.hs"
    assert main(["listmode", str(lm), "--template", str(tmpl), "--out", str(out), "--no-progress"]) == 0
    got = read_projdata(out)
    assert got.geometry.is_tof and got.geometry.num_tof_bins == 5
    expect = np.zeros(geo.shape, np.float32)
    # Siemens TOF bins 1, 2, 4 are timing positions +1, -1, -2: mashed by 3 -> 0, 0, -1
    expect[2, _memory_sinogram(0, 2), 3, -4 + 5] = 1
    expect[2, _memory_sinogram(1, 0), 11, 5 + 5] = 1
    expect[1, _memory_sinogram(-2, 1), 0, 5] = 1
    assert np.array_equal(got.array, expect)


# ------------------------------------------------------------------------------------------- bad input
def test_a_tof_template_for_non_tof_listmode_is_refused(tmp_path, small_tof_scanner):
    hdr = read_listmode_header(_write_lm(tmp_path, [1 << 31, _word(0, 0, 0, 0, 0)], ntof=1))
    with pytest.raises(GeometryMismatchError, match="no TOF information"):
        ListmodeHistogrammer(hdr, SinogramGeometry(small_tof_scanner, span=1, tof_mash_factor=1))


def test_tof_bits_out_of_range_are_a_named_error(tmp_path, small_tof_scanner):
    from sirf_ddip.errors import DataValueError

    bad = (1 << 30) | (NTOF * RINGS ** 2 * VIEWS * TANG + 3)  # Siemens TOF bin 15 of 0..14
    hdr = read_listmode_header(_write_lm(tmp_path, [1 << 31, _word(0, 0, 0, 0, 0), bad]))
    for geo in (SinogramGeometry(small_tof_scanner, span=1, tof_mash_factor=1),
                SinogramGeometry(small_tof_scanner, span=1)):
        with pytest.raises(DataValueError, match=r"1 events have offsets beyond .* in each of 15 TOF bins"):
            ListmodeHistogrammer(hdr, geo).histogram()


def test_header_tof_keys_disagreeing_with_the_scanner(tmp_path, small_tof_scanner):
    words = [1 << 31, _word(3, 0, 0, 0, 0)]
    with pytest.warns(InputFileWarning, match=r"%number of TOF time bins.*13 TOF bins, but .* has 15; decoding"):
        h = read_listmode_header(_write_lm(tmp_path, words, ntof=13))
    assert h.num_tof_bins == 15
    with pytest.raises(InputFileError, match="13 TOF bins, but"):
        read_listmode_header(_write_lm(tmp_path, words, ntof=13), strict=True)
    with pytest.raises(InputFileError, match="TOF mashing factor 4 must divide the 15"):
        read_listmode_header(_write_lm(tmp_path, words, mash="4"))
    with pytest.raises(UnsupportedDataError, match="TOF mashing factor 3: STIR 6.4 decodes"):
        read_listmode_header(_write_lm(tmp_path, words, ntof=5, mash="3"))
    with pytest.warns(InputFileWarning, match="%TOF mashing factor.*not set; using STIR's default 1"):
        assert read_listmode_header(_write_lm(tmp_path, words, mash=None)).tof_mash_factor == 1
    with pytest.raises(UnsupportedDataError, match="no TOF parameters"):
        read_listmode_header(_write_lm(tmp_path, words, system="2008", rings=64, views=252, tang=344, mrd=60,
                                       ntof=13))


def test_template_of_other_tof_bins_is_refused(tmp_path, small_tof_scanner):
    from dataclasses import replace

    hdr = read_listmode_header(_write_lm(tmp_path, [1 << 31, _word(0, 0, 0, 0, 0)]))
    other = replace(small_tof_scanner, max_num_timing_poss=9)
    with pytest.raises(GeometryMismatchError, match="15 TOF bins of 40 ps but template .* has 9"):
        ListmodeHistogrammer(hdr, SinogramGeometry(other, span=1, tof_mash_factor=3))


def test_mct_tof_listmode_reaches_three_tof_bins(tmp_path):
    """The mCT's span-1 TOF offset space (400 x 336 x 55**2 bins per TOF bin) is larger than 30 bits reach: a
    warning says so (STIR reads on); the reachable TOF bins 0, 1, 2 are timing positions 0, +1, -1."""
    def w(s, v, i):  # direct sinogram 7 (ring 7), 13 TOF bins
        return (1 << 30) | (((s * 55 ** 2 + 7) * 336 + v) * 400 + i + 200)

    lm = _write_lm(tmp_path, [1 << 31, w(0, 5, 0), w(1, 5, 0), w(2, 5, 0), w(2, 100, -3)], system="mCT",
                   rings=55, views=336, tang=400, mrd=0, ntof=13)
    with pytest.warns(InputFileWarning, match="reach only the first 3 of the 13 Siemens TOF bins"):
        hdr = read_listmode_header(lm)
    with pytest.raises(InputFileError, match="cannot be addressed"):
        read_listmode_header(lm, strict=True)
    geo = SinogramGeometry("Siemens mCT", span=1, max_ring_diff=0, num_tangential=41, tof_mash_factor=1)
    got = ListmodeHistogrammer(hdr, geo).histogram().to_projdata().array
    assert got.shape == (13, 55, 336, 41) and got.sum() == 4
    assert got[6, 7, 5, 20] == 1 and got[7, 7, 5, 20] == 1 and got[5, 7, 5, 20] == 1 and got[5, 7, 100, 17] == 1


def test_fan_sums_of_tof_listmode_are_those_of_its_detector_pairs(tmp_path, small_tof_scanner):
    """The randoms' fan sums decode TOF offsets (TOF bins summed): equal to the fan sums of the events' detector
    pairs from :meth:`decode_offsets`, and to those of the same events written without TOF bits."""
    from sirf_ddip.physics.randoms import fan_parameters, fan_sums_from_detector_pairs, fan_sums_from_listmode

    rng = np.random.default_rng(3)
    d, a, v, i, s = _random_events(rng, 1500)
    words = np.array([_word(*e, prompt=False) for e in zip(s, d, a, v, i)], dtype=np.uint32)
    hdr = read_listmode_header(_write_lm(tmp_path, np.r_[1 << 31, words, (1 << 31) | 4]))
    got = fan_sums_from_listmode(hdr, delayed=True)
    mrd, half = fan_parameters(small_tof_scanner)
    r1, c1, r2, c2 = hdr.decode_offsets(words & ((1 << 30) - 1))
    ref, used = fan_sums_from_detector_pairs(r1, c1, r2, c2, RINGS, DETS, mrd, half)
    assert got.num_events == used > 1000 and np.array_equal(got.values, ref)
    assert np.array_equal(hdr.decode_timing_pos(words & ((1 << 30) - 1)),
                          ((s + 1) // 2) * np.where(s % 2 == 1, 1, -1))
    flat = np.array([_word(0, *e[1:], prompt=False) for e in zip(s, d, a, v, i)], dtype=np.uint32)
    hdr0 = read_listmode_header(_write_lm(tmp_path, np.r_[1 << 31, flat, (1 << 31) | 4], ntof=1, name="n"))
    assert np.array_equal(hdr0.decode_offsets(flat & ((1 << 30) - 1))[1], c1)
