"""Nothing silently wrong on the listmode export paths (issues 35.1 and 36): ``listmode`` and ``randoms``.

Truths: STIR's own mMR listmode fragment (``tests/data/stir_recon_test_pack``, from STIR's ``recon_test_pack``)
decoded word by word from the PETLINK bit layout, and STIR's projection-data round trip (on a span-1 template of
the listmode's own views and tangential positions, every event lands in the bin its offset names: segment =
ring difference, axial position, view, tangential position); the behaviour STIR documents in its sources
(``KeyParser::set_variable``: a key given twice takes its last value; ``InterfileListmodeHeaderSiemens``
ignores ``%total listmode word counts``; ``CListEventECAT8_32bit`` decodes with the scanner's span-1 layout,
never reading ``%segment table``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sirf_ddip.cli import main
from sirf_ddip.errors import InputFileError, InputFileWarning, UnsupportedDataError
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io import read_projdata
from sirf_ddip.io.header import InterfileHeader
from sirf_ddip.io.siemens_listmode import OFFSET_MASK, TIME_MASK, ecat_segment_sequence, read_listmode_header
from sirf_ddip.io.template import read_template_geometry
from sirf_ddip.physics.histogram import ListmodeHistogrammer
from sirf_ddip.utils.leniency import strict_inputs

from test_listmode import _event, _template, _write_lm
from test_reliability_outputs import _FullDisk as _FullDiskSmall, _digest

REPO = Path(__file__).resolve().parents[1]
PACK = Path(__file__).resolve().parent / "data" / "stir_recon_test_pack"
FRAGMENT = PACK / "PET_ACQ_small.l.hdr.STIR"
MMR_SPAN11 = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=60)


def _err(capsys) -> str:
    return "\n".join(ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("note:"))


def _fragment_words() -> np.ndarray:
    return np.fromfile(PACK / "small_listmode_file.l", dtype="<u4")


def _patched_fragment(folder: Path) -> Path:
    """The fragment's header with the two keys set by hand to what the file is (span-1 table, its length)."""
    table = [64 - abs(d) for d in ecat_segment_sequence(60)]
    text = FRAGMENT.read_text()
    text = text.replace("%number of segments :=11", f"%number of segments :={len(table)}")
    text = text.replace("%segment table :={127,115, 115, 93, 93 ,71, 71, 49, 49, 27, 27}",
                        "%segment table :={" + ",".join(map(str, table)) + "}")
    text = text.replace("%total listmode word counts:=331257106", "%total listmode word counts:=254816")
    text = text.replace("name of data file := small_listmode_file.l",
                        f"name of data file := {PACK / 'small_listmode_file.l'}")
    out = folder / "patched.l.hdr"
    out.write_text(text)
    return out


# ----------------------------------------------------------------- issue 35.1: STIR's real mMR fragment
def test_stir_fragment_reads_with_two_warnings_and_equals_the_patched_header(tmp_path):
    with pytest.warns(InputFileWarning) as rec:
        header = read_listmode_header(FRAGMENT)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2
    assert "'%segment table'" in msgs[0] and "{127,115,115,93,93,...} (11 segments)" in msgs[0] \
        and "{64,63,63,62,62,...}, 121 segments" in msgs[0]
    assert ("'%total listmode word counts'" in msgs[1] and "254816 words" in msgs[1] and "331257106" in msgs[1]
            and "cover 0 s to 0.612 s" in msgs[1])  # STIR's test pack: "contains only 612 ms of data"
    assert header.num_words == 254816 and header.num_sinograms == 4084
    got = ListmodeHistogrammer(header, MMR_SPAN11).histogram(events="prompts")
    words = _fragment_words()
    prompts = int(np.count_nonzero((words >> 30) == 1))  # bit 31 = 0 (event), bit 30 = 1 (prompt)
    # every ring difference of the listmode (|d| <= 60) is in the span-11 template: each prompt is counted once
    assert got.stats["counted"] == prompts == 218881
    with np.testing.assert_no_warnings():
        ref = ListmodeHistogrammer(read_listmode_header(_patched_fragment(tmp_path)), MMR_SPAN11).histogram()
    assert np.array_equal(got.data, ref.data)  # every bin


def test_stir_fragment_on_stirs_seg2_template_equals_its_offsets(tmp_path):
    """STIR's test-pack template (span 1, segments -2..2) with the test pack's frame 0.1-0.5 s: each prompt
    offset ``((z * 252) + view) * 344 + tang`` lands in bin (ring difference of z, axial of z, view, tang)."""
    words = _fragment_words()
    tags = np.flatnonzero((words >> 29) == 0b100)
    t_ms = words[tags] & TIME_MASK
    lo = tags[np.flatnonzero(t_ms >= 100)[0]] + 1  # after the first tag >= start
    hi = tags[np.flatnonzero(t_ms >= 500)[0]]  # up to the first tag >= end
    w = words[lo:hi]
    off = (w[(w >> 30) == 1] & OFFSET_MASK).astype(np.int64)
    tang, view, z = off % 344, off // 344 % 252, off // (344 * 252)
    seq = ecat_segment_sequence(60)
    first = np.cumsum([0] + [64 - abs(d) for d in seq])
    k = np.searchsorted(first, z, side="right") - 1
    seg, axial = np.asarray(seq)[k], z - first[k]
    keep = np.abs(seg) <= 2
    sizes = {d: 64 - abs(d) for d in (-2, -1, 0, 1, 2)}
    start = {d: sum(252 * 344 * sizes[e] for e in (-2, -1, 0, 1, 2) if e < d) for d in sizes}
    # STIR file order: segment as listed, view, axial position, tangential position
    flat = (np.array([start[d] for d in seg[keep]]) + (view[keep] * np.array([sizes[d] for d in seg[keep]])
                                                       + axial[keep]) * 344 + tang[keep])
    expect = np.bincount(flat, minlength=sum(sizes.values()) * 252 * 344)
    geo = read_template_geometry(PACK / "Siemens_mMR_seg2.hs")
    with pytest.warns(InputFileWarning):
        hist = ListmodeHistogrammer(read_listmode_header(FRAGMENT), geo).histogram(0.1, 0.5)
    assert expect.sum() == hist.stats["counted"] == 8680
    assert np.array_equal(hist.data, expect)
    assert hist.duration_s == pytest.approx(0.4)


def test_cli_fragment_records_its_warnings_and_strict_refuses(tmp_path, capsys):
    out = tmp_path / "o.hs"
    tmpl = _template(tmp_path, MMR_SPAN11)
    assert main(["listmode", str(FRAGMENT), "--template", str(tmpl), "--out", str(out), "--no-progress"]) == 0
    err = _err(capsys)
    assert err.count("sirf-ddip listmode: warning:") == 2 and "2 warning(s)" in err
    record = json.loads((tmp_path / "o_run_record.json").read_text())
    assert len(record["warnings"]) == 2 and "'%segment table'" in record["warnings"][0]
    assert "'%total listmode word counts'" in record["warnings"][1]
    assert read_projdata(out).array.sum() == 218881
    assert "image duration (sec)[1] := 0.612" in out.read_text()
    before = _digest(tmp_path)
    assert main(["listmode", str(FRAGMENT), "--template", str(tmpl), "--out", str(tmp_path / "s.hs"),
                 "--strict"]) == 2
    err = _err(capsys)
    assert "error:" in err and "[key '%segment table']: segment table does not describe a span-1 sinogram" in err
    assert _digest(tmp_path) == before
    patched = _patched_fragment(tmp_path)
    patched.write_text(patched.read_text().replace(":=254816", ":=331257106"))
    assert main(["listmode", str(patched), "--template", str(tmpl), "--out", str(tmp_path / "s.hs"),
                 "--strict"]) == 2
    assert "listmode file is truncated: 254816 words, header says 331257106" in _err(capsys)
    assert not (tmp_path / "s.hs").exists()


# ------------------------------------------------------------------------ issue 36: word counts, keys
@pytest.mark.parametrize("nwords", [0, 3])  # the file holds 6 words
def test_a_file_longer_than_its_word_count_is_read_to_its_end(tmp_path, nwords):
    words = [1 << 31, _event(3, 10, -5), (1 << 31) | 20, _event(5, 7, 1), _event(5, 7, 1), (1 << 31) | 40]
    hdr = _write_lm(tmp_path, words)
    hdr.write_text(hdr.read_text().replace("word counts :=6", f"word counts :={nwords}"))
    with pytest.warns(InputFileWarning, match=f"longer than its header says: 6 words.*says {nwords}.*all 6 words"):
        h = read_listmode_header(hdr)
    assert h.num_words == 6
    geo = SinogramGeometry("Siemens mMR", span=1, max_ring_diff=0)
    assert ListmodeHistogrammer(h, geo).histogram().stats["counted"] == 3
    with pytest.raises(InputFileError, match=f"6 words, more than the {nwords}"):
        read_listmode_header(hdr, strict=True)


def test_repeated_keys_take_the_last_value_as_stir(tmp_path):
    text = "!INTERFILE :=\n%axial compression := 11\nname of data file := a.l\n%axial compression := 1\n" \
           "!GENERAL DATA :=\n!GENERAL DATA :=\nx := { 1, 2 }\nx := {1,2}\n"
    with pytest.warns(InputFileWarning) as rec:
        h = InterfileHeader.parse(text, "h.hdr")
    assert h.get_int("%axial compression") == 1 and h.get("x") == "{1,2}"
    assert len(rec) == 1 and "[key '%axial compression']" in str(rec[0].message) \
        and "'11' and '1'; using the last, '1'" in str(rec[0].message)
    with strict_inputs(), pytest.raises(InputFileError, match=r"axial compression.*twice.*'11' and '1'$"):
        InterfileHeader.parse(text, "h.hdr")
    # on a listmode: 1 then 11 is span-11 listmode for STIR (refused); 11 then 1 is read, with the warning
    hdr = _write_lm(tmp_path, [1 << 31, _event(0, 0, 0)], extra="%axial compression :=11")
    with pytest.warns(InputFileWarning), pytest.raises(UnsupportedDataError, match="axial compression 11"):
        read_listmode_header(hdr)
    head, tail = hdr.read_text().rsplit("%axial compression :=11", 1)
    hdr.write_text(head.replace("%axial compression :=1\n", "%axial compression :=11\n", 1)
                   + "%axial compression :=1" + tail)
    with pytest.warns(InputFileWarning, match="'11' and '1'"):
        assert read_listmode_header(hdr).num_words == 2
    with pytest.raises(InputFileError, match="twice"):
        read_listmode_header(hdr, strict=True)


# ------------------------------------------------------------------------------- issue 36: time frames
def _small(tmp_path, words=None):
    words = words or [1 << 31, _event(3, 10, -5), (1 << 31) | 20, _event(5, 7, 1), (1 << 31) | 40, _event(7, 0, 0)]
    lm = _write_lm(tmp_path, words)
    tmpl = _template(tmp_path, SinogramGeometry("Siemens mMR", span=1, max_ring_diff=0))
    return lm, tmpl


@pytest.mark.parametrize("opt,value", [("--start", "nan"), ("--end", "inf"), ("--start=", "-inf"),
                                       ("--end", "nan"), ("--end", "0.005"), ("--start", "1"), ("--start", "0.05")])
def test_bad_frames_are_named_errors_and_write_nothing(tmp_path, capsys, opt, value):
    lm, tmpl = _small(tmp_path)
    before = _digest(tmp_path)
    for cmd in ("listmode", "randoms"):
        flag = [opt + value] if opt.endswith("=") else [opt, value]
        assert main([cmd, str(lm), "--template", str(tmpl), "--out", str(tmp_path / "o.hs"), *flag,
                     "--no-progress"]) == 2
        err = _err(capsys)
        assert err.count("\n") == 0 and f"sirf-ddip {cmd}: error:" in err, err
        if value in ("1", "0.05"):  # after the last time tag (40 ms)
            assert "after the end of listmode" in err and "last time tag is at 0.04 s" in err
        elif value == "0.005":
            assert "0.01 s or less" in err
        else:
            assert f"{opt.rstrip('=')} must be a finite number" in err
        assert _digest(tmp_path) == before


def test_a_frame_end_after_the_data_is_warned_and_the_real_duration_written(tmp_path, capsys):
    lm, tmpl = _small(tmp_path)
    out = tmp_path / "o.hs"
    assert main(["listmode", str(lm), "--template", str(tmpl), "--out", str(out), "--end", "1e300",
                 "--start", "0.01", "--no-progress"]) == 0
    err = _err(capsys)
    assert "warning:" in err and "frame end 1e+300 s is after the end of the data (last time tag 0.04 s)" in err
    text = out.read_text()
    assert "image relative start time (sec)[1] := 0.01" in text and "image duration (sec)[1] := 0.03" in text
    assert read_projdata(out).array.sum() == 2
    record = json.loads((tmp_path / "o_run_record.json").read_text())
    assert record["config"]["frame_written_s"] == [0.01, 0.04] and len(record["warnings"]) == 1
    # an end at the file's end (within one 1-ms tag interval) is no warning
    assert main(["listmode", str(lm), "--template", str(tmpl), "--out", str(out), "--end", "0.041",
                 "--overwrite", "--no-progress"]) == 0
    assert "warning" not in _err(capsys) and "image duration (sec)[1] := 0.041" in out.read_text()


def test_no_time_tags_no_events_and_an_empty_file_are_said(tmp_path, capsys):
    lm, tmpl = _small(tmp_path, [_event(3, 10, -5), _event(4, 10, -5)])
    assert main(["listmode", str(lm), "--template", str(tmpl), "--out", str(tmp_path / "a.hs"),
                 "--no-progress"]) == 0
    err = _err(capsys)
    assert "warning:" in err and "no time tags: all 2 records were counted" in err
    lm, tmpl = _small(tmp_path, [1 << 31, _event(3, 10, -5, prompt=False), (1 << 31) | 20])
    assert main(["listmode", str(lm), "--template", str(tmpl), "--out", str(tmp_path / "b.hs"),
                 "--no-progress"]) == 0
    assert "the frame holds no prompts (3 records in it): the sinogram is all zero" in _err(capsys)
    (tmp_path / "t.l").write_bytes(b"")
    assert main(["listmode", str(lm), "--template", str(tmpl), "--out", str(tmp_path / "c.hs"),
                 "--no-progress"]) == 2
    assert "t.l [key 'name of data file']: listmode file holds no events or time tags" in _err(capsys)
    assert not (tmp_path / "c.hs").exists()


def test_randoms_without_delayeds_is_a_named_error(tmp_path, capsys):
    lm, tmpl = _small(tmp_path)  # prompts only
    assert main(["randoms", str(lm), "--template", str(tmpl), "--out", str(tmp_path / "r.hs"),
                 "--no-progress"]) == 2
    err = _err(capsys)
    assert "sirf-ddip randoms: error:" in err and "no delayed coincidences" in err and "nothing written" in err
    assert not (tmp_path / "r.hs").exists() and not (tmp_path / "r_run_record.json").exists()


# ----------------------------------------------------------------------------------- issue 36: outputs
@pytest.mark.parametrize("blocker", ["o_run_record.json", "o_run_record_config.yaml", "o.s"])
def test_every_output_is_checked_before_the_inputs_are_read(tmp_path, capsys, blocker):
    lm, tmpl = _small(tmp_path)
    (tmp_path / blocker).mkdir()
    before = _digest(tmp_path)
    for cmd in ("listmode", "randoms"):  # the listmode does not exist: read first, the error would name it
        assert main([cmd, str(tmp_path / "missing.l.hdr"), "--template", str(tmpl), "--out",
                     str(tmp_path / "o.hs"), "--no-progress"]) == 2
        err = _err(capsys)
        assert blocker in err and "is a folder" in err and "missing" not in err
        assert _digest(tmp_path) == before and not (tmp_path / "o.hs").exists()


class _FullDisk(_FullDiskSmall):
    """A file whose writes stop after ``room`` bytes with ENOSPC (room for a header, not for the data)."""

    room = 1000


@pytest.mark.parametrize("cmd", ["listmode", "randoms"])
def test_a_full_disk_keeps_the_old_set_and_is_a_named_error(tmp_path, capsys, monkeypatch, cmd):
    import sirf_ddip.physics.histogram as H

    words = [1 << 31, _event(3, 10, -5), _event(5, 7, 1, prompt=False), (1 << 31) | 20, _event(7, 0, 0),
             _event(9, 100, 3, prompt=False)]
    lm, tmpl = _small(tmp_path, words)
    out = tmp_path / "o.hs"
    args = [cmd, str(lm), "--template", str(tmpl), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    before = _digest(tmp_path)
    monkeypatch.setattr(H, "open", lambda p, mode="r", *a, **k: _FullDisk(p, "w") if "w" in mode
                        else open(p, mode, *a, **k), raising=False)
    assert main(args + ["--overwrite", "--start", "0.01"]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and f"sirf-ddip {cmd}: error:" in err and "o.s: cannot write (No space" in err
    assert _digest(tmp_path) == before  # the old .hs, .s and run record, byte for byte; no temporary left


def test_a_real_file_size_limit_is_a_named_error(tmp_path):
    lm, tmpl = _small(tmp_path)

    def limit():  # RLIMIT_FSIZE: writes past it fail with EFBIG; the 22 MB sinogram cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "SIRF_DDIP_PROGRESS": "0", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SIRF_DDIP_DEBUG", None)
    before = _digest(tmp_path)
    p = subprocess.run([sys.executable, "-m", "sirf_ddip", "listmode", str(lm), "--template", str(tmpl), "--out",
                        str(tmp_path / "o.hs")], env=env, capture_output=True, text=True, timeout=300,
                       preexec_fn=limit)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "o.s: cannot write (File too large" in lines[0], p.stderr
    assert _digest(tmp_path) == before


def test_petsird_frames_follow_the_same_rules(tmp_path, capsys):
    pytest.importorskip("petsird")
    from sirf_ddip.geometry.scanner import get_scanner
    from sirf_ddip.io.petsird_listmode import write_petsird_cylinder

    sc = get_scanner("Siemens mMR").with_rings(2)
    ev = np.array([[0, 0, 1, 252], [1, 10, 1, 262]])
    path = write_petsird_cylinder(tmp_path / "e.petsird", sc, [(0, 5, ev, ev[:0]), (5, 10, ev[:1], ev[:0])])
    tmpl = _template(tmp_path, SinogramGeometry(sc, span=1, max_ring_diff=1))
    run = ["listmode", str(path), "--template", str(tmpl), "--no-progress"]
    assert main(run + ["--out", str(tmp_path / "a.hs"), "--start", "1"]) == 2
    assert "holds no time block of PETSIRD file" in _err(capsys) and not (tmp_path / "a.hs").exists()
    assert main(run + ["--out", str(tmp_path / "b.hs"), "--end", "1e300"]) == 0
    assert "frame end 1e+300 s is after the end of the data" in _err(capsys)
    assert "image duration (sec)[1] := 0.01\n" in (tmp_path / "b.hs").read_text()
    assert main(run + ["--out", str(tmp_path / "c.hs"), "--events", "delayeds"]) == 0
    assert "the frame holds no delayeds" in _err(capsys)
