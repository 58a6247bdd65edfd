"""Siemens PETLINK listmode histogramming against STIR 6.4's ``lm_to_projdata`` and closed forms.

Truths: STIR's histograms of ``../shared/real-mmr/listmode/synthetic.l`` (exact integer counts per bin), an
independent numpy decoding of the same file's time tags and event words, and small listmode files written
here with events whose bins follow from the format's definition.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED
from sirf_ddip.errors import (DataValueError, GeometryMismatchError, InputFileError, InputFileWarning,
                              UnsupportedDataError)
from sirf_ddip.geometry.detectors import (DetectorPairBinner, crystals_for_view_tangential,
                                          view_tangential_for_crystals)
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io.siemens_listmode import ecat_segment_sequence, read_listmode_header
from sirf_ddip.io.template import read_template_geometry
from sirf_ddip.physics.histogram import ListmodeHistogrammer

LM = SHARED / "real-mmr" / "listmode"
TEMPLATES = SHARED / "real-mmr" / "templates"


def _need_shared():
    if not (LM / "synthetic.l").is_file():
        pytest.skip(f"real-mmr listmode material not found at {LM} (set SIRF_DDIP_SHARED)")


def _stir(name: str) -> np.ndarray:
    ref = np.load(LM / f"stir_span11_all_{name}.npz")
    full = np.zeros(int(ref["size"]), dtype=np.float32)
    full[ref["index"]] = ref["count"]
    return full


def _segments_view_order(flat: np.ndarray, geo: SinogramGeometry) -> dict[int, np.ndarray]:
    """File-order flat data -> {segment: (view, axial, tang)}."""
    out, pos = {}, 0
    for sg in geo.segments:
        n = geo.num_views * sg.num_axial * geo.num_tangential
        out[sg.number] = flat[pos:pos + n].reshape(geo.num_views, sg.num_axial, geo.num_tangential)
        pos += n
    return out


@pytest.fixture(scope="module")
def shared_header():
    _need_shared()
    return read_listmode_header(LM / "synthetic.l.hdr")


@pytest.fixture(scope="module")
def span11(shared_header):
    geo = read_template_geometry(LM / "template_span11.hs")
    return geo, ListmodeHistogrammer(shared_header, geo)


# ----------------------------------------------------------------------------------------------- STIR
@pytest.mark.slow
@pytest.mark.parametrize("events,name", [("prompts", "p1d0"), ("delayeds", "p0d1")])
def test_span11_equals_stir_lm_to_projdata(span11, events, name):
    geo, hist = span11
    h = hist.histogram(0, 30, events)
    ref = _stir(name)
    assert h.data.dtype == np.float32 and h.data.size == ref.size
    assert np.array_equal(h.data, ref), f"{np.count_nonzero(h.data != ref)} bins differ from STIR"
    assert h.stats["counted"] == {"prompts": 1050208, "delayeds": 450006}[events]


@pytest.mark.slow
def test_trues_are_prompts_minus_delayeds(span11):
    geo, hist = span11
    h = hist.histogram(None, None, "trues")
    assert np.array_equal(h.data, _stir("p1d0") - _stir("p0d1"))


def _axial_offset(sg) -> int:
    """STIR's ring1 + ring2 of axial position 0 (``ax_pos_num_offset``), 64 rings."""
    inc = 2 if sg.min_ring_diff != sg.max_ring_diff else 1
    return round(63 - (sg.num_axial - 1) / inc)


@pytest.mark.slow
def test_fewer_segments_and_view_mashing_match_stir(shared_header):
    full = read_template_geometry(LM / "template_span11.hs")
    ref = _segments_view_order(_stir("p1d0"), full)
    by_diffs = {(sg.min_ring_diff, sg.max_ring_diff): sg for sg in full.segments}
    # the shared seg2 template keeps 5 segments (numbered -2..2 by position, as STIR does) whose ring
    # differences are -38..16 with the axial sizes of span-11 segments -2..2: each must hold STIR's span-11
    # counts of the same ring differences, shifted to its own axial positions (ring1 + ring2 - offset)
    seg2 = read_template_geometry(TEMPLATES / "template_seg2.hs")
    h = _segments_view_order(ListmodeHistogrammer(shared_header, seg2).histogram(0, 30).data, seg2)
    assert sorted(h) == [-2, -1, 0, 1, 2]
    for sg in seg2.segments:
        f = by_diffs[(sg.min_ring_diff, sg.max_ring_diff)]
        shift = _axial_offset(f) - _axial_offset(sg)
        expect = np.zeros_like(h[sg.number])
        a = np.arange(f.num_axial) + shift
        keep = (a >= 0) & (a < sg.num_axial)
        expect[:, a[keep], :] = ref[f.number][:, keep, :]
        assert np.array_equal(h[sg.number], expect), sg
    mash = read_template_geometry(TEMPLATES / "template_mash2.hs")
    assert mash.view_mashing == 2
    h = _segments_view_order(ListmodeHistogrammer(shared_header, mash).histogram(0, 30).data, mash)
    for k in h:  # STIR: view = uncompressed view // mashing factor
        assert np.array_equal(h[k], ref[k][0::2] + ref[k][1::2])


@pytest.mark.slow
def test_symmetric_segment_range_matches_stir(shared_header):
    full = read_template_geometry(LM / "template_span11.hs")
    ref = _segments_view_order(_stir("p0d1"), full)
    geo = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=27)  # segments -2..2
    h = _segments_view_order(ListmodeHistogrammer(shared_header, geo).histogram(0, 30, "delayeds").data, geo)
    assert sorted(h) == [-2, -1, 0, 1, 2]
    for k in h:
        assert np.array_equal(h[k], ref[k])


@pytest.mark.slow
def test_span1_sums_to_stir_span11(shared_header):
    """Span 1 (ring differences -5..5, all of span-11 segment 0) combined as STIR's span 11 does: segment 0,
    axial position r1 + r2 holds ring pairs with |r2 - r1| <= 5; span-1 segment d, axial position
    min(r1, r2)."""
    geo1 = SinogramGeometry("Siemens mMR", span=1, max_ring_diff=5)
    h1 = _segments_view_order(ListmodeHistogrammer(shared_header, geo1).histogram(0, 30).data, geo1)
    full = read_template_geometry(LM / "template_span11.hs")
    ref0 = _segments_view_order(_stir("p1d0"), full)[0]
    combined = np.zeros_like(ref0)
    for d in range(-5, 6):
        for a in range(64 - abs(d)):
            r1, r2 = (a, a + d) if d >= 0 else (a - d, a)
            combined[:, r1 + r2, :] += h1[d][:, a, :]
    assert np.array_equal(combined, ref0)


@pytest.mark.slow
def test_time_frames_follow_the_time_tags(span11, shared_header):
    geo, hist = span11
    words = np.fromfile(shared_header.data_path, dtype="<u4")
    tag = np.flatnonzero((words >> 29) == 4)
    t_ms = words[tag] & ((1 << 29) - 1)
    total = np.zeros(geo.num_sinograms * geo.num_views * geo.num_tangential, dtype=np.float64)
    for start, end in [(0, 10), (10, 17.5), (17.5, 30)]:
        h = hist.histogram(start, end, "prompts")
        # independent: records after the first tag >= start, before the first later tag >= end
        lo = 0 if start == 0 else tag[np.flatnonzero(t_ms >= 1000 * start)[0]] + 1
        hi = tag[np.flatnonzero(t_ms >= 1000 * end)[0]] if end < 29.999 else words.size
        w = words[lo:hi]
        assert h.stats["counted"] == np.count_nonzero((w >> 30) == 1)
        assert h.stats["first_time_tag_s"] >= start and h.stats["last_time_tag_s"] < end
        total += h.data
    assert np.array_equal(total, _stir("p1d0"))


# ------------------------------------------------------------------------------------- small files
def _write_lm(folder, words, *, system="2008", mrd=60, ntof=1, bits=32, extra="", nwords=None, name="t"):
    table = [64 - abs(d) for d in ecat_segment_sequence(mrd)]
    np.asarray(words, dtype="<u4").tofile(folder / f"{name}.l")
    hdr = folder / f"{name}.l.hdr"
    hdr.write_text("\n".join([
        "!INTERFILE :=", f"!originating system :={system}", "!data offset in bytes :=0",
        f"name of data file:={name}.l", "data format :=CoincidenceList", "number of rings :=64",
        f"%number of TOF time bins:={ntof}", f"%total listmode word counts :={nwords or len(words)}",
        f"%LM event and tag words format (bits) :={bits}", "%axial compression :=1",
        f"%maximum ring difference :={mrd}", "%number of projections :=344", "%number of views :=252",
        f"%number of segments :={len(table)}", "%segment table :={" + ",".join(map(str, table)) + "}", extra, ""]))
    return hdr


def _event(ring: int, view: int, tang: int, prompt: bool = True) -> int:
    """Word of a direct (ring difference 0) LOR: segment 0 comes first, axial position = ring."""
    return (int(prompt) << 30) | ((ring * 252 + view) * 344 + tang + 172)


def test_small_file_direct_events_land_in_span11_segment0(tmp_path):
    words = [1 << 31, _event(3, 10, -5), _event(3, 10, -5), _event(0, 251, 171, prompt=False),
             (1 << 31) | 20, _event(63, 0, -172), (1 << 31) | (1 << 29) | 7,  # a non-time tag: ignored
             (1 << 31) | 40, _event(20, 100, 0),
             (1 << 30) | ((64 + 2) * 252 * 344 + 172)]  # segment -1 (ECAT order 0, -1, +1): not stored
    hdr = read_listmode_header(_write_lm(tmp_path, words))
    geo = SinogramGeometry("Siemens mMR", span=1, max_ring_diff=0)  # direct sinograms only
    hist = ListmodeHistogrammer(hdr, geo)
    p = hist.histogram(events="prompts").to_projdata().array
    expect = np.zeros_like(p)  # sinogram = ring, same view and tangential position
    expect[3, 10, 172 - 5] = 2
    expect[63, 0, 0] = 1
    expect[20, 100, 172] = 1
    assert np.array_equal(p, expect)
    d = hist.histogram(events="delayeds").to_projdata().array
    assert d.sum() == 1 and d[0, 251, 343] == 1
    # frame [20 ms, 40 ms): after the tag at 20 ms, before the tag at 40 ms
    f = hist.histogram(0.02, 0.04).to_projdata().array
    assert f.sum() == 1 and f[63, 0, 0] == 1
    # STIR ignores the frame end when it is <= 0.01 s (``end_time > 0.01``): all events after the start tag
    with pytest.warns(RuntimeWarning, match="0.005 s <= 0.01 s is ignored"):
        assert hist.histogram(0, 0.005).stats["counted"] == 4


def test_detector_tables_invert_each_other():
    v = np.repeat(np.arange(252), 344)
    t = np.tile(np.arange(344) - 172, 252)
    c1, c2 = crystals_for_view_tangential(v, t, 504)
    v2, t2, keep = view_tangential_for_crystals(c1, c2, 504)
    assert np.array_equal(v2, v) and np.array_equal(t2, t) and keep.all()
    v3, t3, keep3 = view_tangential_for_crystals(c2, c1, 504)  # swapped detectors: same LOR, rings swap
    assert np.array_equal(v3, v) and np.array_equal(t3, t) and not keep3.any()
    b = DetectorPairBinner(SinogramGeometry("Siemens mMR", span=11, max_ring_diff=60))
    # ring pairs per sinogram agree with the geometry's own count (STIR's get_num_ring_pairs...)
    counts = np.bincount(b.ring_pair_memory[b.ring_pair_memory >= 0], minlength=b.num_sinograms)
    assert np.array_equal(counts, b.geometry.sinogram_table()["num_ring_pairs"])


# ------------------------------------------------------------------------------------------ bad input
def test_other_scanner_template_is_refused(tmp_path):
    hdr = read_listmode_header(_write_lm(tmp_path, [1 << 31]))
    with pytest.raises(GeometryMismatchError, match="Siemens mCT"):
        ListmodeHistogrammer(hdr, SinogramGeometry("Siemens mCT", span=11))


@pytest.mark.parametrize("kw,key", [({"ntof": 13}, "TOF"), ({"bits": 64}, "64-bit"),
                                    ({"extra": "%compression :=on"}, "compressed"),
                                    ({"extra": "%compressor version :=2.1"}, "compressed")])
def test_unsupported_listmode_is_refused(tmp_path, kw, key):
    with pytest.raises(UnsupportedDataError, match=key):
        read_listmode_header(_write_lm(tmp_path, [1 << 31], **kw))


def test_truncated_and_inconsistent_files_are_refused(tmp_path):
    with pytest.raises(InputFileError, match="truncated.*3 words, header says 10"):  # STIR reads on: strict only
        read_listmode_header(_write_lm(tmp_path, [1 << 31] * 3, nwords=10), strict=True)
    hdr = _write_lm(tmp_path, [1 << 31] * 3, name="odd")
    with open(tmp_path / "odd.l", "ab") as f:
        f.write(b"\x00\x01")
    with pytest.raises(InputFileError, match="not a whole number of 32-bit words"):
        read_listmode_header(hdr)
    bad = _write_lm(tmp_path, [1 << 31], name="seg")
    bad.write_text(bad.read_text().replace("%segment table :={64,63", "%segment table :={64,62"))
    with pytest.raises(InputFileError, match="segment table"):
        read_listmode_header(bad, strict=True)
    (tmp_path / "t.l").unlink()
    with pytest.raises(InputFileError, match="not found"):
        read_listmode_header(tmp_path / "t.l.hdr")
    corrupt = read_listmode_header(_write_lm(tmp_path, [1 << 31, (1 << 30) | (4084 * 252 * 344 + 5)], name="c"))
    with pytest.raises(DataValueError, match="beyond the span-1 sinogram"):
        ListmodeHistogrammer(corrupt, SinogramGeometry("Siemens mMR", span=11, max_ring_diff=60)).histogram()


# ------------------------------------------------------------------------------------------------ CLI
def _template(tmp_path, geo, name="tmpl"):
    """A STIR-style template: header only, its data file absent."""
    p = tmp_path / f"{name}.hs"
    p.write_text("\n".join(geo.header_lines(data_file=f"{name}.s")) + "\n")
    return p


def test_cli_listmode_writes_the_histogram_atomically(tmp_path, capsys):
    from sirf_ddip.cli import main
    from sirf_ddip.io import read_projdata

    words = [1 << 31, _event(3, 10, -5), _event(5, 7, 1, prompt=False), (1 << 31) | 20, _event(7, 0, 0)]
    lm = _write_lm(tmp_path, words)
    geo = SinogramGeometry("Siemens mMR", span=1, max_ring_diff=0)
    tmpl = _template(tmp_path, geo)
    out = tmp_path / "out" / "p.hs"
    assert main(["listmode", str(lm), "--template", str(tmpl), "--out", str(out), "--events", "trues",
                 "--no-progress"]) == 0
    got = read_projdata(out)
    expect = np.zeros(geo.shape, np.float32)
    expect[3, 10, 167], expect[5, 7, 173], expect[7, 0, 172] = 1, -1, 1
    assert got.geometry == geo and np.array_equal(got.array, expect)
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.hs", "p.s", "p_run_record.json",
                                                            "p_run_record_config.yaml"]
    before = out.read_bytes()
    assert main(["listmode", str(lm), "--template", str(tmpl), "--out", str(out), "--start", "0.02"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["listmode", str(lm), "--template", str(tmpl), "--out", str(out), "--start", "0.02",
                 "--overwrite", "--no-progress"]) == 0
    assert read_projdata(out).array.sum() == 1  # only the event after the 20 ms tag
    mct = _template(tmp_path, SinogramGeometry("Siemens mCT", span=11), "mct")
    assert main(["listmode", str(lm), "--template", str(mct), "--out", str(tmp_path / "m.hs")]) == 2
    err = capsys.readouterr().err
    assert "Siemens mCT" in err and "Traceback" not in err and not (tmp_path / "m.hs").exists()


def test_real_mmr_headers_parse_and_a_short_data_file_is_truncated(tmp_path):
    for name, words in (("list.l.hdr", 4891028), ("sample_mMR_listmode.l.hdr", 331257106)):
        src = SHARED / "real-mmr" / name
        if not src.is_file():
            pytest.skip(f"{src} not found")
        text = src.read_text(encoding="latin-1")
        data = next(ln.split(":=", 1)[1].strip() for ln in text.splitlines() if "name of data file" in ln)
        hdr = tmp_path / name
        hdr.write_text(text)
        np.zeros(1000, dtype="<u4").tofile(tmp_path / data)
        with pytest.raises(InputFileError, match=f"truncated: 1000 words, header says {words}"):
            read_listmode_header(hdr, strict=True)
        with pytest.warns(InputFileWarning, match=f"shorter than its header says: 1000 words.*says {words}.*no time"):
            assert read_listmode_header(hdr).num_words == 1000
