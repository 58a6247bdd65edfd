"""Randoms from delayeds: against SIRF 3.10 / STIR 6.4's ``estimate_randoms`` and closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED
from sirf_ddip.geometry.scanner import get_scanner
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io.siemens_listmode import read_listmode_header
from sirf_ddip.io.template import read_template_geometry
from sirf_ddip.physics.histogram import ListmodeHistogrammer
from sirf_ddip.physics.randoms import (estimate_randoms, fan_sums_from_detector_pairs, ml_singles_from_fan_sums,
                                       randoms_from_singles)

LM = SHARED / "real-mmr" / "listmode"


def _stir_loop(F, mrd, h, iters):
    """STIR's ``iterate_efficiencies`` (no model) written as its plain loops, for small arrays."""
    nr, n = F.shape
    nbins = sum((min(ra + mrd, nr - 1) - max(ra - mrd, 0) + 1) for ra in range(nr)) * n * (2 * h + 1)
    e = np.full((nr, n), np.sqrt(F.sum() / nbins))
    for _ in range(iters):
        for ra in range(nr):
            for a in range(n):
                if F[ra, a] == 0:
                    e[ra, a] = 0
                    continue
                den = 0.0
                for rb in range(max(ra - mrd, 0), min(ra + mrd, nr - 1) + 1):
                    for b in range(a + n // 2 - h, a + n // 2 + h + 1):
                        den += e[rb, b % n]
                e[ra, a] = F[ra, a] / den
    return e


def _fan_model(e, mrd, h):
    """STIR ``make_fan_sum_data``: e[ra, a] * sum of e over its fan."""
    nr, n = e.shape
    out = np.zeros_like(e)
    for ra in range(nr):
        band = e[max(ra - mrd, 0):min(ra + mrd, nr - 1) + 1].sum(0)
        for a in range(n):
            out[ra, a] = e[ra, a] * sum(band[b % n] for b in range(a + n // 2 - h, a + n // 2 + h + 1))
    return out


def test_in_place_update_equals_stir_loop(rng):
    F = rng.poisson(50.0, size=(6, 24)).astype(float)
    F[2, 5] = 0  # a dead crystal
    got = ml_singles_from_fan_sums(F, max_ring_diff=3, half_fan_size=5, num_iterations=3)
    assert np.allclose(got, _stir_loop(F, 3, 5, 3), rtol=1e-12, atol=0)
    assert got[2, 5] == 0


def test_ml_singles_reproduce_their_fan_sums(rng):
    e_true = rng.uniform(0.5, 1.5, size=(8, 32))
    F = _fan_model(e_true, 4, 7)
    e = ml_singles_from_fan_sums(F, max_ring_diff=4, half_fan_size=7, num_iterations=300)
    assert np.allclose(_fan_model(e, 4, 7), F, rtol=1e-6)
    assert np.allclose(e, e_true, rtol=1e-4)


def test_fan_sums_count_both_detectors_inside_the_fan():
    ring1, c1, ring2, c2 = (np.array(x) for x in ([0, 0, 1, 0], [0, 0, 5, 0], [1, 9, 1, 1], [16, 16, 21, 3]))
    out, used = fan_sums_from_detector_pairs(ring1, c1, ring2, c2, 12, 32, max_ring_diff=4, half_fan_size=7)
    # event 2 has ring difference 9 > 4, event 4 has crystals 3 apart (outside the fan of 15)
    assert used == 2
    assert out[0, 0] == 1 and out[1, 16] == 1 and out[1, 5] == 1 and out[1, 21] == 1 and out.sum() == 4


def test_uniform_singles_give_ring_pair_counts():
    sc = get_scanner("Siemens mMR").with_rings(8)
    geo = SinogramGeometry(sc, span=3, max_ring_diff=5, view_mashing=2, num_tangential=101)
    r = randoms_from_singles(np.full((8, 504), 0.5), geo).array
    pairs = geo.sinogram_table()["num_ring_pairs"]  # the geometry's own count, STIR-style
    assert np.allclose(r, 0.25 * 2 * pairs[:, None, None], rtol=1e-6)


@pytest.mark.slow
def test_randoms_match_sirf_estimate_randoms():
    if not (LM / "synthetic.l").is_file():
        pytest.skip(f"real-mmr listmode material not found at {LM}")
    geo = read_template_geometry(LM / "template_span11.hs")
    randoms, fans, _ = estimate_randoms(read_listmode_header(LM / "synthetic.l.hdr"), geo, 0, 30)
    assert fans.num_events == 450006  # every delayed of the file is inside the mMR fans
    ref = np.load(LM / "stir_randoms_span11_shared_views.npz")
    views = ref["views"]
    num = den = 0.0
    for i, sg in enumerate(geo.segments):
        ours = randoms.array[geo.segment_slice(sg.number)][:, views, :].astype(np.float64)
        theirs = ref[f"seg{i}"].astype(np.float64)
        num += ((ours - theirs) ** 2).sum()
        den += (theirs ** 2).sum()
    rel = np.sqrt(num / den)
    assert rel < 1e-5, rel  # achieved 3.4e-6 (acceptance: 1e-2)
    assert abs(randoms.array.sum(dtype=np.float64) - 448714) < 5  # SIRF's total (README)


def test_cli_randoms_equals_the_api(tmp_path):
    from test_listmode import _template, _write_lm

    from sirf_ddip.cli import main
    from sirf_ddip.io import read_projdata

    rng = np.random.default_rng(5)
    off = rng.integers(0, 4084 * 252 * 344, 3000).astype(np.uint32)  # delayeds all over the sinogram
    words = np.concatenate([[1 << 31], off, [(1 << 31) | 1000], off[:500] | (1 << 30)])
    lm = _write_lm(tmp_path, words)
    geo = SinogramGeometry("Siemens mMR", span=11, max_ring_diff=5)
    tmpl = _template(tmp_path, geo)
    out = tmp_path / "r.hs"
    assert main(["randoms", str(lm), "--template", str(tmpl), "--out", str(out), "--no-progress"]) == 0
    api, fans, _ = estimate_randoms(lm, geo)
    assert fans.num_events == 3000 and fans.values.sum() == 2 * fans.num_events  # the mMR's fans hold all
    got = read_projdata(out).array
    assert np.array_equal(got, api.array)
    # the ML fit keeps the delayeds' total in the bins of the template (503 delayeds there; achieved 492.7)
    delayeds = ListmodeHistogrammer(read_listmode_header(lm), geo).histogram(events="delayeds").stats["counted"]
    assert delayeds == 503 and abs(got.sum() / delayeds - 1) < 0.06
