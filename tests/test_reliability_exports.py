"""Nothing silently wrong on the norm / attenuation / prepare export paths (issue 36).

Truths: the real mMR norm and μ-map (``../shared/real-mmr``) with one thing changed at a time; STIR's
``BinNormalisationFromECAT8`` (``get_uncalibrated_bin_efficiency`` multiplies components 1-3 and divides by the
axial effect, so a zero axial effect is an infinite efficiency; ``read_norm_data`` reads the four components at
their offsets and never looks further, so trailing bytes and components 5-8 are ignored); the scanner's field of
view (the cylinder the sinogram's bins reach). Each case: exit 2 with a one-line error naming the file and the
key, or exit 0 with a warning kept in the run record; never NaN/Inf written, never an input or old output lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sirf_ddip.cli import main
from sirf_ddip.data import ProjData
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io import read_projdata, write_projdata
from sirf_ddip.io.mumap import read_mu_map
from sirf_ddip.io.nifti import write_nifti
from sirf_ddip.io.siemens_norm import read_ecat8_norm
from sirf_ddip.physics.normalisation import ecat8_efficiencies

from conftest import SHARED
from test_reliability_outputs import _FullDisk, _digest

MMR = SHARED / "real-mmr"
#: float32 offsets of the real norm's eight components (the header's ``data offset in bytes [i]`` / 4)
_OFF = [0, 43688, 46784, 79040, 79877, 79941, 80005, 80014, 80851]


@pytest.fixture
def tmpl(tmp_path):
    """A small mMR template (segment 0 of span 11, view mashing 4, 41 bins), header only."""
    geom = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=5, num_tangential=41, view_mashing=4)
    t = tmp_path / "t.hs"
    t.write_text("\n".join(geom.header_lines()) + "\n")
    return geom, t


def _err(capsys) -> str:
    return "\n".join(ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("note:"))


def _norm(tmp_path: Path, change=None, tail: bytes = b"", name: str = "n") -> Path:
    """A copy of the real norm whose components (a list of 8 float32 arrays) ``change`` edits in place."""
    flat = np.fromfile(MMR / "norm.n", dtype="<f4")
    parts = [flat[a:b].copy() for a, b in zip(_OFF[:-1], _OFF[1:])]
    if change is not None:
        change(parts)
    (tmp_path / f"{name}.n").write_bytes(np.concatenate(parts).astype("<f4").tobytes() + tail)
    txt = (MMR / "norm.n.hdr").read_text(encoding="latin-1").replace("!name of data file:=norm.n",
                                                                       f"!name of data file:={name}.n")
    hdr = tmp_path / f"{name}.n.hdr"
    hdr.write_text(txt, encoding="latin-1")
    return hdr


def _set(parts, i, index, value):
    parts[i - 1][index] = value


# --------------------------------------------------------------------------------------------------- norm
@pytest.mark.parametrize("change, key, text", [
    (lambda p: _set(p, 4, 5, 0.0), "data offset in bytes [4]",
     "component 4 (axial effects) is 0 for 1 of 837 sinograms (first: 5); STIR divides by it"),
    (lambda p: p[2].fill(0.0), "data offset in bytes [3]", "component 3 (crystal efficiencies) is all zero"),
    (lambda p: p[3].fill(0.0), "data offset in bytes [4]", "component 4 (axial effects) is all zero"),
    (lambda p: p[3].__imul__(np.float32(1e-30)), "data offset in bytes [4]",
     "component 4 (axial effects) has a median value of 9.894e-31, outside 0.001..1000"),
    (lambda p: _set(p, 4, 7, 1e-30), "data offset in bytes [4]",
     "component 4 (axial effects) is 1e-30 for sinogram 7, less than 1/1000 of its median 0.9894"),
    (lambda p: _set(p, 1, 100, 1e30), "data offset in bytes [1]",
     "component 1 (geometric effects) has a value of 1e+30 at index 100, more than 1000 x its median"),
    (lambda p: _set(p, 2, 3, np.inf), "data offset in bytes [2]",
     "component 2 (crystal interference) has 1 NaN/Inf value(s) of 3096"),
])
def test_norm_components_that_give_nan_inf_or_absurd_efficiencies_are_named(tmp_path, capsys, material, tmpl,
                                                                             change, key, text):
    _, t = tmpl
    hdr = _norm(tmp_path, change)
    assert main(["norm", str(hdr), "--template", str(t), "--out", str(tmp_path / "e.hs")]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and "sirf-ddip norm: error:" in err
    assert f"n.n [key '{key}']: {text}" in err
    assert not (tmp_path / "e.hs").exists() and not (tmp_path / "e.s").exists()


def test_a_zero_crystal_efficiency_is_a_dead_crystal_not_an_error(tmp_path, capsys, material, tmpl):
    """STIR multiplies by the crystal efficiencies: a zero one gives its LORs efficiency 0 (as a gap), finite."""
    geom, t = tmpl
    hdr = _norm(tmp_path, lambda p: _set(p, 3, 504 * 2 + 10, 0.0))
    assert main(["norm", str(hdr), "--template", str(t), "--out", str(tmp_path / "e.hs")]) == 0
    eff = read_projdata(tmp_path / "e.hs").array
    real = ecat8_efficiencies(read_ecat8_norm(MMR / "norm.n.hdr"), geom)
    lower = eff < real  # the bins whose mashed views hold a LOR of that crystal lose that LOR's term
    assert np.all(np.isfinite(eff)) and np.all(eff <= real) and 0 < lower.mean() < 0.05


@pytest.mark.parametrize("case", ["trailing", "nan6"])
def test_what_stir_ignores_is_warned_recorded_and_refused_with_strict(tmp_path, capsys, material, tmpl, case):
    geom, t = tmpl
    if case == "trailing":
        hdr = _norm(tmp_path, tail=b"\0" * 12)
        want = ("n.n [key '!name of data file']: data file longer than its header describes: its 8 components end "
                "at byte 323404, the file has 323416 bytes (12 trailing bytes")
        strict = "8 components need exactly 323404 bytes, found 323416"
    else:
        hdr = _norm(tmp_path, lambda p: (_set(p, 6, 3, np.nan), _set(p, 6, 4, np.inf)))
        want = ("n.n [key 'data offset in bytes [6]']: component 6 (non-paralyzing ring DT parameters) has 2 NaN/Inf "
                "value(s) of 64; STIR does not use this component")
        strict = "component 6 (non-paralyzing ring DT parameters) has 2 NaN/Inf value(s) of 64"
    out = tmp_path / "e.hs"
    assert main(["norm", str(hdr), "--template", str(t), "--out", str(out)]) == 0
    err = _err(capsys)
    assert "sirf-ddip norm: warning:" in err and want in err and "1 warning(s), see the run record" in err
    np.testing.assert_array_equal(read_projdata(out).array,
                                  ecat8_efficiencies(read_ecat8_norm(MMR / "norm.n.hdr"), geom))
    record = json.loads((tmp_path / "e_run_record.json").read_text())
    assert len(record["warnings"]) == 1 and want in record["warnings"][0]
    assert main(["norm", str(hdr), "--template", str(t), "--out", str(tmp_path / "s.hs"), "--strict"]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and "sirf-ddip norm: error:" in err and strict in err
    assert not (tmp_path / "s.hs").exists()


# ------------------------------------------------------------------------------------------- attenuation
def _siemens_mu(tmp_path: Path, mu, xo="0", vx=None, name="m") -> Path:
    nz, ny, nx = mu.grid.shape
    vz, vy, vx0 = mu.grid.voxel_size
    hdr = ("!INTERFILE:=\n!originating system:=2008\n%SMS-MI header name space:=image subheader\n"
           f"!name of data file:={MMR / 'mu_map.v'}\nimage data byte order:=LITTLEENDIAN\n%patient orientation:=HFS\n"
           "number format:=float\n!number of bytes per pixel:=4\nnumber of dimensions:=3\n"
           f"matrix size[1]:={nx}\nmatrix size[2]:={ny}\nmatrix size[3]:={nz}\n"
           f"scale factor (mm/pixel) [1]:={vx if vx is not None else vx0}\nscale factor (mm/pixel) [2]:={vy}\n"
           f"scale factor (mm/pixel) [3]:={vz}\n%x-offset (mm):={xo}\n%y-offset (mm):=0\nquantification units:=1/cm\n")
    p = tmp_path / f"{name}.v.hdr"
    p.write_text(hdr)
    return p


@pytest.mark.parametrize("where", ["x-offset", "nifti-corner"])
def test_a_mu_map_outside_the_field_of_view_is_refused(tmp_path, capsys, material, tmpl, where):
    _, t = tmpl
    mu = read_mu_map(MMR / "mu_map.hv")
    if where == "x-offset":
        path, pct = _siemens_mu(tmp_path, mu, xo="5000"), "only 0 %"
    else:  # the affine's origin at the image's corner: the body is moved by half the image
        from sirf_ddip.data import Image
        from sirf_ddip.geometry.image import ImageGrid

        g = mu.grid
        path, pct = tmp_path / "m.nii.gz", "only 0.106 %"
        write_nifti(path, Image(mu.array, ImageGrid(g.shape, g.voxel_size, (g.origin[0], 0.0, 0.0))))
    assert main(["attenuation", str(path), "--template", str(t), "--out", str(tmp_path / "a.hs")]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and f"sirf-ddip attenuation: error: {path}: {pct} of the μ-map's attenuation " \
        "lies in the field of view of the Siemens mMR" in err and "check the image position" in err
    assert not (tmp_path / "a.hs").exists()


def test_a_mu_map_partly_outside_the_field_of_view_is_warned_and_recorded(tmp_path, capsys, material, tmpl):
    _, t = tmpl
    mu = read_mu_map(MMR / "mu_map.hv")
    path = _siemens_mu(tmp_path, mu, xo="300")
    assert main(["attenuation", str(path), "--template", str(t), "--out", str(tmp_path / "a.hs")]) == 0
    err = _err(capsys)
    assert "sirf-ddip attenuation: warning:" in err and "only 32.6 % of the μ-map's attenuation lies in the " \
        "field of view" in err
    record = json.loads((tmp_path / "a_run_record.json").read_text())
    assert len(record["warnings"]) == 1 and "32.6 %" in record["warnings"][0]
    assert record["config"]["mu_fraction_in_fov"] == pytest.approx(0.3257, abs=1e-3)
    att = read_projdata(tmp_path / "a.hs").array
    assert np.all(np.isfinite(att)) and att.max() <= 1 and att.min() < 0.99  # the template's 41 bins: r < 42 mm


@pytest.mark.parametrize("key, value, text", [
    ("%x-offset (mm)", "nan", "[key '%x-offset (mm)']: expected a finite number, got 'nan'"),
    ("scale factor (mm/pixel) [1]", "inf",
     "[key 'scale factor (mm/pixel) [1]']: voxel size must be a finite positive number of mm, got inf"),
    ("%image slope", "inf", "[key '%image slope']: expected a finite number, got 'inf'"),
])
def test_non_finite_mu_map_keys_are_named(tmp_path, capsys, material, tmpl, key, value, text):
    _, t = tmpl
    mu = read_mu_map(MMR / "mu_map.hv")
    path = _siemens_mu(tmp_path, mu)
    lines = [ln for ln in path.read_text().splitlines() if not ln.replace(" ", "").startswith(key.replace(" ", ""))]
    path.write_text("\n".join(lines + [f"{key}:={value}"]) + "\n")
    assert main(["attenuation", str(path), "--template", str(t), "--out", str(tmp_path / "a.hs")]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and f"sirf-ddip attenuation: error: {path} {text}" in err


# ------------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("cmd", ["norm", "attenuation", "listmode", "randoms"])
def test_out_equal_to_an_input_is_refused_even_with_overwrite(tmp_path, capsys, material, tmpl, cmd):
    _, t = tmpl
    src = {"norm": str(MMR / "norm.n.hdr"), "attenuation": str(MMR / "mu_map.hv"),
           "listmode": str(MMR / "sample_mMR_listmode.l.hdr"), "randoms": str(MMR / "sample_mMR_listmode.l.hdr")}
    before = _digest(tmp_path)
    extra = ["--no-progress"] if cmd in ("listmode", "randoms") else []
    assert main([cmd, src[cmd], "--template", str(t), "--out", str(t), "--overwrite"] + extra) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and f"{t}: is also an input ({t})" in err
    assert _digest(tmp_path) == before


def test_out_equal_to_the_templates_data_file_is_refused(tmp_path, capsys, material, tmpl):
    geom, _ = tmpl
    write_projdata(tmp_path / "p.hs", ProjData(np.ones(geom.shape, np.float32), geom))
    before = _digest(tmp_path)
    assert main(["norm", str(MMR / "norm.n.hdr"), "--template", str(tmp_path / "p.hs"), "--out",
                 str(tmp_path / "p.hs"), "--overwrite"]) == 2
    assert "is also an input" in _err(capsys) and _digest(tmp_path) == before
    (tmp_path / "q.hs").write_text((tmp_path / "p.hs").read_text())  # q.hs names p.s as its data file
    assert main(["norm", str(MMR / "norm.n.hdr"), "--template", str(tmp_path / "q.hs"), "--out",
                 str(tmp_path / "p.hs"), "--overwrite"]) == 2
    assert f"p.s: is also an input ({tmp_path / 'p.s'} (the data file of {tmp_path / 'q.hs'}))" in _err(capsys)


@pytest.mark.parametrize("cmd", ["norm", "listmode"])
def test_a_dangling_link_at_out_is_not_replaced_without_overwrite(tmp_path, capsys, material, tmpl, cmd):
    _, t = tmpl
    out = tmp_path / "e.hs"
    os.symlink(tmp_path / "nowhere.hs", out)
    if cmd == "norm":
        argv = ["norm", str(MMR / "norm.n.hdr"), "--template", str(t), "--out", str(out)]
    else:  # the check every other writer shares (forward, backward, osem, listmode, randoms)
        from test_reliability_listmode import _small

        lm, t1 = _small(tmp_path)
        argv = ["listmode", str(lm), "--template", str(t1), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and f"{out}: output exists; refusing to overwrite" in err
    assert out.is_symlink() and not out.exists()
    assert main(argv + ["--overwrite"]) == 0  # the link itself is replaced, not a file elsewhere
    assert not out.is_symlink() and out.is_file() and not (tmp_path / "nowhere.hs").exists()


def test_norm_on_a_full_disk_keeps_the_old_set(tmp_path, capsys, monkeypatch, material, tmpl):
    import sirf_ddip.cli.prepare as P

    _, t = tmpl
    argv = ["norm", str(MMR / "norm.n.hdr"), "--template", str(t), "--out", str(tmp_path / "e.hs")]
    assert main(argv) == 0
    capsys.readouterr()
    before = _digest(tmp_path)
    monkeypatch.setattr(P, "open", lambda p, mode="r", *a, **k: _FullDisk(p, "w") if "w" in mode
                        else open(p, mode, *a, **k), raising=False)
    assert main(argv + ["--overwrite", "--no", "gaps"]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and "e.s: cannot write (No space left on device" in err
    assert _digest(tmp_path) == before


# ------------------------------------------------------------------------------------------------ prepare
def _prepare_inputs(tmp_path: Path, geom) -> list[str]:
    rng = np.random.default_rng(3)
    write_projdata(tmp_path / "p.hs", ProjData(rng.poisson(5.0, geom.shape).astype(np.float32), geom))
    write_projdata(tmp_path / "r.hs", ProjData(np.full(geom.shape, 0.5, np.float32), geom))
    return ["prepare", "--prompts", str(tmp_path / "p.hs"), "--norm", str(MMR / "norm.n.hdr"),
            "--mu", str(MMR / "mu_map.hv"), "--randoms", str(tmp_path / "r.hs"), "--no-scatter"]


def test_prepare_refuses_its_own_input_as_output(tmp_path, capsys, material, tmpl):
    geom, _ = tmpl
    argv = _prepare_inputs(tmp_path, geom)
    out = tmp_path / "out"
    assert main(argv + ["--out-dir", str(out), "--no-png"]) == 0
    capsys.readouterr()
    (out / "r.hs").write_text((tmp_path / "r.hs").read_text())  # a randoms header beside the outputs
    os.replace(tmp_path / "r.s", out / "r.s")
    before = _digest(out)
    for randoms, bad in ((out / "additive_term.hs", out / "additive_term.s"), (out / "r.hs", None)):
        args = list(argv)
        args[args.index("--randoms") + 1] = str(randoms)
        if bad is None:  # r.hs's data file is renamed to prompts.s: the output prompts.s would replace it
            (out / "r.hs").write_text((out / "r.hs").read_text().replace(":= r.s", ":= prompts.s"))
            os.replace(out / "r.s", out / "prompts.s")
            before = _digest(out)
            bad = out / "prompts.s"
        assert main(args + ["--out-dir", str(out), "--overwrite", "--no-png"]) == 2
        err = _err(capsys)
        assert err.count("\n") == 0 and f"sirf-ddip prepare: error: --out-dir {bad}: is also an input" in err
        assert _digest(out) == before


def test_prepare_out_dir_that_is_a_file_and_argument_errors_leave_nothing(tmp_path, capsys, material, tmpl):
    geom, t = tmpl
    argv = _prepare_inputs(tmp_path, geom)
    (tmp_path / "f").write_text("x")
    for out, text in ((tmp_path / "f", "--out-dir {}: is a file, not a folder"),
                      (tmp_path / "f" / "sub", "--out-dir {}: cannot be created: " + str(tmp_path / "f") + " is a file")):
        assert main(argv + ["--out-dir", str(out)]) == 2
        err = _err(capsys)
        assert err.count("\n") == 0 and text.format(out) in err
    new = tmp_path / "new" / "deeper"
    for extra, text in ((["--start", "1"], "--start/--end apply to --listmode only"),
                        (["--template", str(tmp_path / "missing.hs")], "missing.hs")):
        assert main(argv + extra + ["--out-dir", str(new)]) == 2
        assert text in _err(capsys)
        assert not (tmp_path / "new").exists()
    lm = ["prepare", "--listmode", str(MMR / "sample_mMR_listmode.l.hdr"), "--norm", str(MMR / "norm.n.hdr"),
          "--mu", str(MMR / "mu_map.hv"), "--out-dir", str(new)]
    for extra, text in (([], "--listmode needs --template"), (["--template", str(t), "--end", "nan"],
                                                             "--end must be a finite number")):
        assert main(lm + extra) == 2
        assert text in _err(capsys) and not (tmp_path / "new").exists()


@pytest.mark.parametrize("fail_on", ["additive_term.s", "prepare_record.json"])
def test_prepare_on_a_full_disk_keeps_the_complete_old_set(tmp_path, capsys, monkeypatch, material, tmpl, fail_on):
    import sirf_ddip.cli.prepare as P

    geom, _ = tmpl
    argv = _prepare_inputs(tmp_path, geom) + ["--out-dir", str(tmp_path / "out"), "--no-png"]
    assert main(argv) == 0
    capsys.readouterr()
    before = _digest(tmp_path / "out")
    write_projdata(tmp_path / "r.hs", ProjData(np.full(geom.shape, 0.25, np.float32), geom), overwrite=True)

    def full(p, mode="r", *a, **k):  # one file of the set cannot be written; the others can
        if "w" in mode and str(p).endswith(fail_on):
            return _FullDisk(p, "w")
        return open(p, mode, *a, **k)

    monkeypatch.setattr(P, "open", full, raising=False)
    assert main(argv + ["--overwrite"]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and f"{fail_on}: cannot write (No space left on device" in err
    assert _digest(tmp_path / "out") == before  # the old set, byte for byte, and no temporary file
    monkeypatch.undo()
    assert main(argv + ["--overwrite"]) == 0  # with room, the new set replaces the old one as a whole
    add = read_projdata(tmp_path / "out" / "additive_term.hs").array
    mult = read_projdata(tmp_path / "out" / "mult_factors.hs").array
    np.testing.assert_allclose(add[mult > 0], 0.25 / mult[mult > 0], rtol=1e-6)
    assert np.all(np.isfinite(mult)) and np.all(np.isfinite(add))


def test_prepare_never_writes_nan_inf_mult_factors(tmp_path, capsys, material, tmpl):
    geom, _ = tmpl
    argv = _prepare_inputs(tmp_path, geom)
    argv[argv.index("--norm") + 1] = str(_norm(tmp_path, lambda p: _set(p, 4, 0, 0.0)))
    assert main(argv + ["--out-dir", str(tmp_path / "out")]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and "component 4 (axial effects) is 0" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- templates
def _edit_ring_diffs(src: Path, dst: Path, mins: str, maxs: str) -> Path:
    out = []
    for ln in src.read_text().splitlines():
        if ln.startswith("minimum ring difference per segment"):
            ln = f"minimum ring difference per segment := {mins}"
        elif ln.startswith("maximum ring difference per segment"):
            ln = f"maximum ring difference per segment := {maxs}"
        out.append(ln)
    dst.write_text("\n".join(out) + "\n")
    return dst


def test_a_template_with_min_ring_difference_above_max_is_swapped_with_a_warning_as_stir(tmp_path, capsys, material):
    """STIR's ``ProjDataInfoCylindrical`` warns "min_ring_difference ... is larger than max_ring_difference ...
    Swapping them around" and swaps them; so do we (``--strict`` refuses)."""
    from sirf_ddip.errors import InputFileError, InputFileWarning
    from sirf_ddip.io.template import read_template_geometry
    from sirf_ddip.utils.leniency import strict_inputs

    geom = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=16, num_tangential=41, view_mashing=4)
    good = tmp_path / "good.hs"
    good.write_text("\n".join(geom.header_lines()) + "\n")
    bad = _edit_ring_diffs(good, tmp_path / "bad.hs", "{-16,-5,6}", "{-6,5,16}")
    assert read_template_geometry(bad).matches(geom)  # the edit is a no-op: the file as written
    bad = _edit_ring_diffs(good, tmp_path / "bad.hs", "{-6,-5,16}", "{-16,5,6}")
    with pytest.warns(InputFileWarning) as rec:
        got = read_template_geometry(bad)
    msgs = [str(w.message) for w in rec if isinstance(w.message, InputFileWarning)]
    assert len(msgs) == 2  # segments -1 and +1
    assert msgs[0].startswith(f"{bad} [key 'minimum ring difference per segment']: segment -1: minimum ring "
                              "difference -6 is larger than the maximum -16") and "swapped, as STIR does" in msgs[0]
    assert "segment 1: minimum ring difference 16 is larger than the maximum 6" in msgs[1]
    assert got.matches(geom)
    with strict_inputs(), pytest.raises(InputFileError, match="segment -1: minimum ring difference -6 is larger"):
        read_template_geometry(bad)
    out = tmp_path / "e.hs"
    assert main(["norm", str(MMR / "norm.n.hdr"), "--template", str(bad), "--out", str(out)]) == 0
    assert "sirf-ddip norm: warning:" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "e_run_record.json").read_text())["warnings"]) == 2
    np.testing.assert_array_equal(read_projdata(out).array,
                                  ecat8_efficiencies(read_ecat8_norm(MMR / "norm.n.hdr"), geom))


def test_a_template_ring_difference_beyond_the_scanner_is_refused(tmp_path, capsys, material):
    geom = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=16, num_tangential=41, view_mashing=4)
    good = tmp_path / "good.hs"
    good.write_text("\n".join(geom.header_lines()) + "\n")
    bad = _edit_ring_diffs(good, tmp_path / "bad.hs", "{-70,-5,6}", "{-6,5,70}")
    for cmd, src in (("norm", MMR / "norm.n.hdr"), ("attenuation", MMR / "mu_map.hv")):
        assert main([cmd, str(src), "--template", str(bad), "--out", str(tmp_path / "o.hs")]) == 2
        err = _err(capsys)
        assert err.count("\n") == 0 and "bad.hs [key 'minimum ring difference per segment']: segment -1 holds ring " \
            "differences -70..-6, impossible on a scanner with 64 ring(s)" in err
        assert not (tmp_path / "o.hs").exists()
