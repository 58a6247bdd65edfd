"""Non-TOF sinograms of TOF-capable scanners load (issue 10's bug): the scanner block's TOF keys are
scanner properties, not data properties.  TOF data (a timing axis) are tested in ``test_tof.py``."""

from __future__ import annotations

import numpy as np
import pytest

from sirf_ddip.data import ProjData
from sirf_ddip.errors import InputFileWarning
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io import read_projdata, write_projdata

# What STIR 6 writes in the Scanner block of these scanners (InterfileHeader.cxx / Scanner.cxx presets).
TOF_SCANNER_KEYS = {
    "Siemens mCT": ("  Maximum number of (unmashed) TOF time bins := 55\n"
                    "  Size of unmashed TOF time bins (ps) := 78.125\n"
                    "  TOF timing resolution (ps) := 580\n"),
    "GE Discovery 690": ("  Maximum number of (unmashed) TOF time bins := 55\n"
                         "  Size of unmashed TOF time bins (ps) := 89.0\n"
                         "  TOF timing resolution (ps) := 550\n"),
}


@pytest.mark.parametrize("scanner", sorted(TOF_SCANNER_KEYS))
def test_non_tof_sinogram_of_tof_scanner_loads(tmp_path, rng, scanner):
    geo = SinogramGeometry(scanner, span=11, max_ring_diff=5, view_mashing=8, num_tangential=7)
    arr = rng.random(geo.shape).astype(np.float32)
    write_projdata(tmp_path / "p.hs", ProjData(arr, geo))
    txt = (tmp_path / "p.hs").read_text()
    txt = "\n".join(ln for ln in txt.splitlines() if "TOF" not in ln) + "\n"  # the preset's keys, replaced below
    txt = txt.replace("End scanner parameters:=", TOF_SCANNER_KEYS[scanner] + "End scanner parameters:=")
    assert "Maximum number of (unmashed) TOF time bins := 55" in txt
    (tmp_path / "p.hs").write_text(txt)
    if scanner == "Siemens mCT":  # these keys are not STIR 6.4's mCT preset (13 bins of 312 ps, 555 ps): warned
        with pytest.warns(InputFileWarning, match="for STIR's Siemens mCT"):
            back = read_projdata(tmp_path / "p.hs")
    else:
        back = read_projdata(tmp_path / "p.hs")
    assert not back.geometry.is_tof
    assert back.geometry.matches(geo)
    np.testing.assert_array_equal(back.array, arr)

