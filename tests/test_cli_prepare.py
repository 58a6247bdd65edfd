"""``sirf-ddip norm``, ``attenuation`` and ``prepare`` on the real mMR norm and μ-map, on a small template."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sirf_ddip.cli import main
from sirf_ddip.data import ProjData
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io import read_projdata, write_projdata
from sirf_ddip.io.mumap import read_mu_map
from sirf_ddip.io.siemens_norm import read_ecat8_norm
from sirf_ddip.physics.attenuation import attenuation_factors
from sirf_ddip.physics.normalisation import ecat8_efficiencies

from conftest import SHARED

MMR = SHARED / "real-mmr"


@pytest.fixture
def small(tmp_path):
    """A small mMR template (segment 0 of span 11, all 252 views: mashing would fill the gaps, 41 bins), with
    no data file."""
    geom = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=5, num_tangential=41)
    t = tmp_path / "t.hs"
    t.write_text("\n".join(geom.header_lines()) + "\n")
    return geom, t


def test_norm_command(tmp_path, material, small, capsys):
    geom, t = small
    out = tmp_path / "eff.hs"
    assert main(["norm", str(MMR / "norm.n.hdr"), "--template", str(t), "--out", str(out)]) == 0
    eff = read_projdata(out)
    np.testing.assert_array_equal(eff.array, ecat8_efficiencies(read_ecat8_norm(MMR / "norm.n.hdr"), geom))
    assert (tmp_path / "eff_run_record.json").is_file()
    assert "detector gaps" in capsys.readouterr().err
    # refuses to overwrite; a norm of another scanner is a one-line error naming the key
    assert main(["norm", str(MMR / "norm.n.hdr"), "--template", str(t), "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    bad = tmp_path / "mct.n.hdr"
    bad.write_text((MMR / "norm.n.hdr").read_text(encoding="latin-1").replace(":=2008", ":=1104").replace(
        "!name of data file:=norm.n", f"!name of data file:={MMR / 'norm.n'}"), encoding="latin-1")
    assert main(["norm", str(bad), "--template", str(t), "--out", str(tmp_path / "x.hs")]) == 2
    err = capsys.readouterr().err
    assert "originating system" in err and "1104" in err and not (tmp_path / "x.hs").exists()


def test_attenuation_command(tmp_path, material, small, capsys):
    geom, t = small
    out = tmp_path / "att.hs"
    assert main(["attenuation", str(MMR / "mu_map.hv"), "--template", str(t), "--out", str(out)]) == 0
    att = read_projdata(out).array
    np.testing.assert_array_equal(att, attenuation_factors(read_mu_map(MMR / "mu_map.hv"), geom).array)
    assert att.max() <= 1.0 and att.min() > 0.05
    assert main(["attenuation", str(MMR / "mu_map.hv"), "--template", str(t), "--out", str(tmp_path / "a2.hs"),
                 "--mu-units", "mm-1"]) == 2
    err = capsys.readouterr().err
    assert "look like cm-1" in err and not (tmp_path / "a2.hs").exists() and not (tmp_path / "a2.s").exists()


@pytest.mark.slow
def test_prepare_command(tmp_path, material, small, capsys):
    geom, t = small
    rng = np.random.default_rng(3)
    prompts = rng.poisson(5.0, geom.shape).astype(np.float32)
    randoms = np.full(geom.shape, 0.5, np.float32)
    scatter = np.full(geom.shape, 0.25, np.float32)
    for name, a in (("p.hs", prompts), ("r.hs", randoms), ("s.hs", scatter)):
        write_projdata(tmp_path / name, ProjData(a, geom))
    out = tmp_path / "study"
    argv = ["prepare", "--prompts", str(tmp_path / "p.hs"), "--norm", str(MMR / "norm.n.hdr"),
            "--mu", str(MMR / "mu_map.hv"), "--randoms", str(tmp_path / "r.hs"), "--out-dir", str(out)]
    assert main(argv + ["--no-scatter"]) == 0
    err = capsys.readouterr().err
    assert "NO SCATTER estimate was given" in err
    eff = ecat8_efficiencies(read_ecat8_norm(MMR / "norm.n.hdr"), geom)
    att = attenuation_factors(read_mu_map(MMR / "mu_map.hv"), geom).array
    mult = read_projdata(out / "mult_factors.hs").array
    np.testing.assert_array_equal(mult, eff * att)
    add = read_projdata(out / "additive_term.hs").array
    gaps = mult == 0
    assert gaps.mean() > 0.05
    np.testing.assert_allclose(add[~gaps], 0.5 / mult[~gaps], rtol=1e-6)
    assert np.all(add[gaps] == 0)
    np.testing.assert_array_equal(read_projdata(out / "prompts.hs").array, prompts)
    rec = json.loads((out / "prepare_record.json").read_text())
    assert any("NO SCATTER" in n for n in rec["config"]["notes"]) and rec["config"]["norm_scanner"] == "Siemens mMR"
    assert (out / "prepare.png").stat().st_size > 10_000
    # with a scatter estimate: (randoms + scatter) / mult, and no "no scatter" note
    out2 = tmp_path / "study2"
    assert main(argv[:-1] + [str(out2), "--scatter", str(tmp_path / "s.hs"), "--no-png"]) == 0
    assert "NO SCATTER" not in capsys.readouterr().err
    add2 = read_projdata(out2 / "additive_term.hs").array
    np.testing.assert_allclose(add2[~gaps], 0.75 / mult[~gaps], rtol=1e-6)
    # a bad μ-map fails before anything is written: not even the output folder is created
    out3 = tmp_path / "study3"
    assert main(argv[:-1] + [str(out3), "--mu-units", "1e-4cm-1", "--no-scatter"]) == 2
    assert not out3.exists()


def test_prepare_from_listmode(tmp_path, material, small, capsys):
    """``prepare --listmode``: prompts equal the histogrammer's, the additive term is the randoms estimate / mult."""
    from sirf_ddip.physics.histogram import histogram_listmode
    from sirf_ddip.physics.randoms import estimate_randoms

    lm = MMR / "listmode" / "synthetic.l.hdr"
    if not (MMR / "listmode" / "synthetic.l").is_file():
        pytest.skip(f"synthetic mMR listmode not found next to {lm}")
    geom, t = small
    out = tmp_path / "study"
    assert main(["prepare", "--listmode", str(lm), "--template", str(t), "--start", "0", "--end", "15",
                 "--norm", str(MMR / "norm.n.hdr"), "--mu", str(MMR / "mu_map.hv"), "--out-dir", str(out),
                 "--no-png", "--no-scatter"]) == 0
    assert "NO SCATTER" in capsys.readouterr().err
    prompts = read_projdata(out / "prompts.hs").array
    want = histogram_listmode(lm, geom, start=0, end=15, events="prompts").to_projdata().array
    np.testing.assert_array_equal(prompts, want)
    assert 0 < prompts.sum() < histogram_listmode(lm, geom, events="prompts").to_projdata().array.sum()
    randoms = estimate_randoms(lm, geom, start=0, end=15)[0].array
    mult = read_projdata(out / "mult_factors.hs").array
    add = read_projdata(out / "additive_term.hs").array
    ok = mult > 0
    np.testing.assert_allclose(add[ok], randoms[ok] / mult[ok], rtol=1e-5)
    assert np.all(add[~ok] == 0)
