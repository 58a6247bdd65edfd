"""Bad TOF input through the command line (issue 32, item 5): every case is one named line on stderr that names
the file and the key, exit status 2, and no output written; never a silent collapse to non-TOF.

Library-level checks of the same inputs live in ``test_tof.py`` (headers, factor shapes) and
``test_siemens_tof_listmode.py`` (listmode headers and templates); here the commands ``osem``, ``recon``,
``listmode``, ``simulate`` and ``prepare`` are run on them. The truths are STIR 6.4's rules
(``InterfileHeader.cxx`` ``InterfilePDFSHeader::post_processing``: the data's TOF bins must be the scanner's
unmashed bins over the mashing factor; a 4-D header is non-TOF data) and the project's (a non-TOF
multiplicative factor is broadcast over the TOF bins, an additive term must be per TOF bin).
"""

from __future__ import annotations

import numpy as np
import pytest

from sirf_ddip.cli import main
from sirf_ddip.data import Image, ProjData
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.geometry.scanner import get_scanner
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io import write_image, write_projdata

# D690 (55 unmashed TOF bins): 1 ring, 36 views, 31 tangential positions; TOF mashing 11 -> 5 bins
D690 = get_scanner("GE Discovery 690").with_rings(1)


def _geo(mash: int) -> SinogramGeometry:
    return SinogramGeometry(D690, span=1, max_ring_diff=0, view_mashing=8, num_tangential=31, tof_mash_factor=mash)


@pytest.fixture(scope="module")
def tof_files(tmp_path_factory):
    """Good TOF prompts (5 bins), a non-TOF mult, a TOF additive term and an image; then the bad variants."""
    d = tmp_path_factory.mktemp("tofbad")
    rng = np.random.default_rng(3)
    g, g11 = _geo(11), _geo(5)
    nt = g.non_tof()
    write_projdata(d / "prompts.hs", ProjData(rng.poisson(2.0, g.shape).astype(np.float32), g))
    write_projdata(d / "mult.hs", ProjData(np.full(nt.shape, 2.0, np.float32), nt))
    write_projdata(d / "add.hs", ProjData(np.full(g.shape, 0.1, np.float32), g))
    grid = ImageGrid((1, 16, 16), (3.27, 8.0, 8.0))
    write_image(d / "init.hv", Image(np.ones(grid.shape, np.float32), grid))
    write_image(d / "mr.hv", Image(np.ones(grid.shape, np.float32), grid))
    # factors of the wrong shape: non-TOF on 18 views; TOF on 11 bins (mashing 5) for 5-bin prompts; a
    # non-TOF additive term
    w = SinogramGeometry(D690, span=1, max_ring_diff=0, view_mashing=16, num_tangential=31)
    write_projdata(d / "mult_18views.hs", ProjData(np.ones(w.shape, np.float32), w))
    write_projdata(d / "mult_11bins.hs", ProjData(np.ones(g11.shape, np.float32), g11))
    write_projdata(d / "add_11bins.hs", ProjData(np.full(g11.shape, 0.1, np.float32), g11))
    write_projdata(d / "add_nontof.hs", ProjData(np.full(nt.shape, 0.1, np.float32), nt))
    txt = (d / "prompts.hs").read_text()
    for name, old, new in [("bins7", "!matrix size [5] := 5", "!matrix size [5] := 7"),
                           ("mash2", "TOF mashing factor := 11", "TOF mashing factor := 2"),
                           ("mash5", "TOF mashing factor := 11", "TOF mashing factor := 5")]:
        assert old in txt
        (d / f"prompts_{name}.hs").write_text(txt.replace(old, new))  # same data file prompts.s
    # a 4-D header with a TOF mashing factor: STIR 6.4 reads non-TOF data; we warn (strict: refuse)
    mtxt = (d / "mult.hs").read_text()
    assert "number of dimensions := 4" in mtxt
    (d / "mult_4d_mash.hs").write_text(mtxt.replace("number of dimensions := 4",
                                                    "number of dimensions := 4\nTOF mashing factor := 11"))
    return d


def _run(argv, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def _assert_named_error(rc, err, *needles):
    """Exit 2, the last stderr line is the one error line (any earlier lines are warnings) naming each needle."""
    assert rc == 2, err
    errors = [e for e in err if ": error: " in e]
    assert len(errors) == 1 and errors[0] == err[-1], err
    for n in needles:
        assert str(n) in errors[0], (n, errors[0])
    return errors[0]


def _osem(d, out, prompts="prompts.hs", mult="mult.hs", add="add.hs"):
    return ["osem", "--prompts", d / prompts, "--mult", d / mult, "--additive", d / add, "--init", d / "init.hv",
            "--iterations", "1", "--subsets", "2", "--out", out]


def _recon(d, out, prompts="prompts.hs", mult="mult.hs", add="add.hs"):
    return ["recon", "--prompts", d / prompts, "--mult", d / mult, "--additive", d / add, "--mr", d / "mr.hv",
            "--out", out, "--no-png", "--set", "num_steps=2"]


BAD_PROMPTS = [
    ("prompts_bins7.hs", "!matrix size [5]", "7 TOF bins in the data, but TOF mashing factor 11"),
    ("prompts_mash2.hs", "TOF mashing factor", "TOF mashing factor 2 does not divide the scanner's 55"),
    ("prompts_mash5.hs", "!matrix size [5]", "5 TOF bins in the data, but TOF mashing factor 5"),
]
BAD_FACTORS = [
    (dict(mult="mult_18views.hs"), "mult_18views.hs", "18 views, not 36"),
    (dict(mult="mult_11bins.hs"), "[key 'TOF mashing factor']", "11 TOF bins (TOF mashing factor 5) but prompts"),
    (dict(add="add_11bins.hs"), "[key 'TOF mashing factor']", "11 TOF bins (TOF mashing factor 5) but prompts"),
    (dict(add="add_nontof.hs"), "add_nontof.hs", "are non-TOF, shape (1, 36, 31), but prompts"),
]


@pytest.mark.parametrize("command", [_osem, _recon])
@pytest.mark.parametrize("prompts,key,msg", BAD_PROMPTS)
def test_tof_prompts_whose_bins_disagree_with_the_scanner(tof_files, tmp_path, capsys, command, prompts, key, msg):
    """Header TOF bins that are not the scanner's 55 over the mashing factor, a mashing factor that does not
    divide 55: ``osem`` and ``recon`` exit 2 naming the file and the key, and write nothing."""
    out = tmp_path / "x.hv"
    rc, err = _run(command(tof_files, out, prompts=prompts), capsys)
    _assert_named_error(rc, err, prompts, f"[key '{key}']", msg)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [_osem, _recon])
@pytest.mark.parametrize("files,where,msg", BAD_FACTORS)
def test_tof_data_with_factors_of_the_wrong_shape(tof_files, tmp_path, capsys, command, files, where, msg):
    """A non-TOF mult of another shape, TOF factors on other TOF bins than the prompts', a non-TOF additive
    term for TOF prompts: exit 2 naming the factor's file, the prompts and what differs; nothing written."""
    out = tmp_path / "x.hv"
    rc, err = _run(command(tof_files, out, **files), capsys)
    line = _assert_named_error(rc, err, next(iter(files.values())), where, msg, "prompts.hs")
    assert "TOF" in line or "views" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_good_tof_inputs_run(tof_files, tmp_path, capsys):
    """The control: the same files without the fault reconstruct (exit 0), so the failures above are the faults'."""
    rc, err = _run(_osem(tof_files, tmp_path / "x.hv"), capsys)
    assert rc == 0, err
    assert (tmp_path / "x.hv").exists()


def test_4d_header_with_a_tof_mashing_factor_warns_and_strict_refuses(tof_files, tmp_path, capsys):
    """STIR 6.4 reads a 4-D header as non-TOF even with ``TOF mashing factor := 11``: so do we, with a warning
    naming the file, the key and both readings; ``strict_inputs`` (``--strict``) refuses it."""
    from sirf_ddip.errors import InputFileError, InputFileWarning
    from sirf_ddip.io import read_projdata
    from sirf_ddip.utils.leniency import strict_inputs

    p = tof_files / "mult_4d_mash.hs"
    with pytest.warns(InputFileWarning, match=r"mult_4d_mash.hs \[key 'TOF mashing factor'\]: TOF mashing factor "
                                              r"11 in a 4-D header .* read as non-TOF data"):
        m = read_projdata(p)
    assert not m.geometry.is_tof and m.array.shape == (1, 36, 31)
    with strict_inputs(), pytest.raises(InputFileError, match=r"\[key 'TOF mashing factor'\]: TOF mashing factor "
                                                              r"11 in a 4-D header"):
        read_projdata(p)
    rc, err = _run(_osem(tof_files, tmp_path / "x.hv", mult="mult_4d_mash.hs"), capsys)
    assert rc == 0 and sum("warning" in e and "TOF mashing factor 11 in a 4-D header" in e for e in err) == 1, err


# ------------------------------------------------------------------------------------------- simulate
@pytest.mark.parametrize("scanner,mash,msg", [
    ("GE Discovery 690", 2, "TOF mashing factor 2 does not divide the 55 unmashed TOF bins"),
    ("Siemens Vision 600", 2, "STIR needs an odd"),
    ("Siemens mMR", 1, "has no TOF parameters"),
])
def test_simulate_refuses_a_tof_mashing_factor_the_scanner_cannot_take(tmp_path, capsys, scanner, mash, msg):
    cfg = tmp_path / "sim.yaml"
    cfg.write_text(f"scanner: {scanner}\nnum_rings: 1\nmax_ring_diff: 0\nview_mashing: 4\nimage_xy: 16\n")
    out = tmp_path / "out"
    rc, err = _run(["simulate", cfg, "--out", out, "--set", f"tof_mash_factor={mash}"], capsys)
    _assert_named_error(rc, err, "sim.yaml", f"--set tof_mash_factor={mash}", "key 'tof_mash_factor'", msg)
    assert not out.exists()


# ------------------------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("opt,file,msg", [
    ("--randoms", "add_nontof.hs", "non-TOF, the prompts 5 TOF bins (TOF mashing factor 11)"),
    ("--scatter", "add_11bins.hs", "11 TOF bins (TOF mashing factor 5), the prompts 5 TOF bins"),
])
def test_prepare_refuses_background_on_other_tof_bins(tof_files, tmp_path, capsys, opt, file, msg):
    """TOF prompts with non-TOF randoms, or scatter on other TOF bins: exit 2 before the norm is read."""
    out = tmp_path / "out"
    rc, err = _run(["prepare", "--prompts", tof_files / "prompts.hs", opt, tof_files / file, "--norm",
                    tmp_path / "absent.n.hdr", "--mu", tof_files / "init.hv", "--no-scatter" if opt == "--randoms"
                    else "--no-png", "--out-dir", out], capsys)
    _assert_named_error(rc, err, file, "[key 'TOF mashing factor']", msg)
    assert not out.exists() or not list(out.iterdir())


def test_prepare_refuses_a_bad_tof_header(tof_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(["prepare", "--prompts", tof_files / "prompts_mash2.hs", "--norm", tmp_path / "absent.n.hdr",
                    "--mu", tof_files / "init.hv", "--no-scatter", "--out-dir", out], capsys)
    _assert_named_error(rc, err, "prompts_mash2.hs", "[key 'TOF mashing factor']", "does not divide")
    assert not out.exists() or not list(out.iterdir())


# ------------------------------------------------------------------------------------------- listmode
def _template(tmp_path, geo, name="tmpl.hs", *edits):
    txt = "\n".join(geo.header_lines(data_file=name.replace(".hs", ".s"))) + "\n"
    for old, new in edits:
        assert old in txt, old
        txt = txt.replace(old, new)
    p = tmp_path / name
    p.write_text(txt)
    return p


def test_siemens_tof_listmode_bad_templates_and_headers(tmp_path, capsys, monkeypatch):
    """Siemens 32-bit TOF listmode through ``listmode``: a template whose TOF mashing does not divide the
    scanner's 15 bins, a template whose TOF bins disagree with its mashing, a template of another scanner's
    TOF bins, a listmode header whose TOF mashing does not divide: exit 2 naming the file and the key."""
    from test_siemens_tof_listmode import NTOF, RINGS, TANG, DETS, _word, _write_lm

    from sirf_ddip.geometry import scanner as scanner_module
    sc = scanner_module._p("Test TOF 4-ring", RINGS, TANG, TANG, DETS, 100.0, 5.0, 4.0, 2.0, 0.0,
                           tof=(NTOF, 40.0, 250.0))
    monkeypatch.setattr(scanner_module, "_PRESETS", scanner_module._PRESETS + [(("Test TOF 4-ring", "T4"), sc)])
    lm = _write_lm(tmp_path, [1 << 31, _word(1, 0, 2, 3, -4), (1 << 31) | 3])
    geo = SinogramGeometry(sc, span=1, tof_mash_factor=3)  # 5 TOF bins
    good = _template(tmp_path, geo)
    rc, err = _run(["listmode", lm, "--template", good, "--out", tmp_path / "good" / "p.hs", "--no-progress"], capsys)
    assert rc == 0 and (tmp_path / "good" / "p.hs").exists(), err  # the control: the faults below are the faults
    out = tmp_path / "o" / "p.hs"
    cases = [
        (_template(tmp_path, geo, "t_mash4.hs", ("TOF mashing factor := 3", "TOF mashing factor := 4")),
         "t_mash4.hs", "[key 'TOF mashing factor']", "TOF mashing factor 4 does not divide the scanner's 15"),
        (_template(tmp_path, geo, "t_bins7.hs", ("!matrix size [5] := 5", "!matrix size [5] := 7")),
         "t_bins7.hs", "[key '!matrix size [5]']", "7 TOF bins in the data, but TOF mashing factor 3"),
        (_template(tmp_path, geo, "t_max9.hs", ("Maximum number of (unmashed) TOF time bins := 15",
                                                "Maximum number of (unmashed) TOF time bins := 9"),
                   ("!matrix size [5] := 5", "!matrix size [5] := 3")),
         "t_max9.hs", "15 TOF bins of 40 ps", "has 9"),
    ]
    for tmpl, name, key, msg in cases:
        rc, err = _run(["listmode", lm, "--template", tmpl, "--out", out, "--no-progress"], capsys)
        _assert_named_error(rc, err, name, key, msg)
        assert not out.parent.exists() or not list(out.parent.iterdir())
    bad_lm = _write_lm(tmp_path, [1 << 31, _word(1, 0, 2, 3, -4)], mash="4", name="m4")
    rc, err = _run(["listmode", bad_lm, "--template", good, "--out", out, "--no-progress"], capsys)
    _assert_named_error(rc, err, "m4.l.hdr", "TOF mashing factor", "TOF mashing factor 4 must divide the 15")
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_petsird_tof_listmode_on_a_template_of_other_tof_bins(tmp_path, capsys):
    """A PETSIRD TOF file (the D690's 55 TOF bins) histogrammed on a template that says 53: exit 2 naming the
    template's TOF bins and the file's (after the template's one warning that 53 is not STIR's 55)."""
    pytest.importorskip("petsird")
    from sirf_ddip.io.petsird_listmode import write_petsird_cylinder

    sc = get_scanner("GE Discovery 690").with_rings(2)
    geo = SinogramGeometry(sc, span=1, max_ring_diff=1, view_mashing=4, num_tangential=91, tof_mash_factor=5)
    ev = np.array([[0, 0, 1, 288, 3], [1, 10, 1, 298, -7]])
    path = write_petsird_cylinder(tmp_path / "tof.petsird", sc, [(0, 1000, ev, ev[:0])], tof=True)
    good = tmp_path / "good" / "p.hs"
    rc, err = _run(["listmode", path, "--template", _template(tmp_path, geo), "--out", good, "--no-progress"], capsys)
    assert rc == 0 and good.exists(), err
    out = tmp_path / "o" / "p.hs"
    t53 = _template(tmp_path, SinogramGeometry(sc, span=1, max_ring_diff=1, view_mashing=4, num_tangential=91,
                                               tof_mash_factor=1), "t53.hs",
                    ("Maximum number of (unmashed) TOF time bins := 55",
                     "Maximum number of (unmashed) TOF time bins := 53"),
                    ("!matrix size [5] := 55", "!matrix size [5] := 53"))
    rc, err = _run(["listmode", path, "--template", t53, "--out", out, "--no-progress"], capsys)
    line = _assert_named_error(rc, err, "TOF bins")
    assert "53" in line and "55" in line, line
    assert any("warning" in e and "t53.hs" in e and "Maximum number of (unmashed) TOF time bins" in e for e in err)
    assert not out.parent.exists() or not list(out.parent.iterdir())
    # a non-TOF template sums the file's 55 TOF bins, and says so
    nt = _template(tmp_path, geo.non_tof(), "nt.hs")
    rc, err = _run(["listmode", path, "--template", nt, "--out", tmp_path / "nt" / "p.hs", "--no-progress"], capsys)
    assert rc == 0, err
    assert [e for e in err if "note:" in e and "has 55 TOF bins" in e and "nt.hs sums them" in e], err


def test_tof_listmode_into_a_non_tof_template_says_so(tmp_path, capsys, monkeypatch):
    """A non-TOF template sums a TOF listmode's bins (STIR's lm_to_projdata does the same): exit 0, the counts are
    kept, and one note names the file's TOF bins and the template, so the collapse to non-TOF is never silent;
    a non-TOF listmode gives no note."""
    from test_siemens_tof_listmode import NTOF, RINGS, TANG, DETS, _word, _write_lm

    from sirf_ddip.geometry import scanner as scanner_module
    from sirf_ddip.io import read_projdata
    sc = scanner_module._p("Test TOF 4-ring", RINGS, TANG, TANG, DETS, 100.0, 5.0, 4.0, 2.0, 0.0,
                           tof=(NTOF, 40.0, 250.0))
    monkeypatch.setattr(scanner_module, "_PRESETS", scanner_module._PRESETS + [(("Test TOF 4-ring", "T4"), sc)])
    tmpl = _template(tmp_path, SinogramGeometry(sc, span=1))
    for name, ntof, notes in (("tof", NTOF, 1), ("nontof", 1, 0)):
        k = (1, 4, 2) if ntof > 1 else (0, 0, 0)  # Siemens TOF bins of the three events
        words = [1 << 31, _word(k[0], 0, 2, 3, -4), _word(k[1], 0, 2, 3, -4), _word(k[2], 1, 0, 11, 5),
                 (1 << 31) | 3]
        lm = _write_lm(tmp_path, words, ntof=ntof, name=name)
        out = tmp_path / name / "p.hs"
        rc, err = _run(["listmode", lm, "--template", tmpl, "--out", out, "--no-progress"], capsys)
        assert rc == 0, err
        assert read_projdata(out).array.sum() == 3
        hits = [e for e in err if "note:" in e]
        assert len(hits) == notes, err
        if notes:
            assert f"{name}.l.hdr has {NTOF} TOF bins" in hits[0] and "tmpl.hs" in hits[0] and "sums them" in hits[0]
