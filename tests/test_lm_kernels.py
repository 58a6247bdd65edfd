"""The compiled histogram kernels: every way of sharing the work between threads (decode/add pipeline,
private sinograms, split bin ranges), chunk and block boundaries, gives exactly the counts of an independent
numpy decode."""

from __future__ import annotations

import numpy as np
import pytest

import sirf_ddip.physics.histogram as hm
from sirf_ddip.geometry.detectors import DetectorPairBinner
from sirf_ddip.geometry.sinogram import SinogramGeometry
from sirf_ddip.io.siemens_listmode import read_listmode_header
from test_listmode import _write_lm


def _words(seed: int = 1, n_ms: int = 40, per_ms: int = 500) -> np.ndarray:
    """Random span-1 offsets (mMR, max ring diff 60), 60 % prompts, a time tag per ms, some other tags."""
    rng = np.random.default_rng(seed)
    nmax = sum(64 - abs(d) for d in [0] + [s for k in range(1, 61) for s in (-k, k)]) * 252 * 344
    ev = rng.integers(0, nmax, size=(n_ms, per_ms), dtype=np.uint32)
    ev |= (rng.random((n_ms, per_ms)) < 0.6).astype(np.uint32) << np.uint32(30)
    ev[:, 7] = (1 << 31) | (1 << 29) | 5  # a non-time tag: ignored
    tags = ((1 << 31) | np.arange(n_ms, dtype=np.uint32))[:, None]
    return np.concatenate([tags, ev], axis=1).reshape(-1)


def _expected(header, geo, words, events, lo_ms, hi_ms) -> np.ndarray:
    """Independent truth: numpy decode of the records between the tags, binned with ``bin_index``."""
    is_tag = (words >> 29) == 4
    t = np.where(is_tag, words & ((1 << 29) - 1), 0)
    tag_pos = np.flatnonzero(is_tag)
    lo = 0 if lo_ms <= 0 else tag_pos[np.flatnonzero(t[tag_pos] >= lo_ms)[0]] + 1
    later = tag_pos[(tag_pos >= lo) & (t[tag_pos] >= hi_ms)] if hi_ms is not None else []
    hi = later[0] if len(later) else words.size
    w = words[lo:hi]
    w = w[(w >> 31) == 0]
    prompt = (w >> 30) == 1
    b = DetectorPairBinner(geo)
    r1, c1, r2, c2 = header.decode_offsets(w & ((1 << 30) - 1))
    flat = b.bin_index(r1, c1, r2, c2, order="memory")
    weight = {"prompts": prompt * 1, "delayeds": ~prompt * 1, "trues": np.where(prompt, 1, -1)}[events]
    keep = flat >= 0
    return np.bincount(flat[keep], weights=weight[keep], minlength=b.size).reshape(geo.shape)


@pytest.mark.slow
@pytest.mark.parametrize("span,mrd", [(11, 16), (1, 2)])
def test_all_thread_layouts_give_identical_exact_counts(tmp_path, monkeypatch, span, mrd):
    words = _words()
    header = read_listmode_header(_write_lm(tmp_path, words))
    geo = SinogramGeometry("Siemens mMR", span=span, max_ring_diff=mrd)
    hist = hm.ListmodeHistogrammer(header, geo)
    for events, (start, end) in [("prompts", (None, None)), ("trues", (0.0105, 0.031)), ("delayeds", (0, 0.02))]:
        expect = _expected(header, geo, words, events, 1000 * (start or 0), None if end is None else 1000 * end)
        runs = [dict(threads=1), dict(threads=2), dict(threads=3, chunk_words=4099)]
        for private_bytes in (1 << 30, 0):  # private sinograms / split bin ranges
            monkeypatch.setattr(hm, "PRIVATE_SINOGRAM_BYTES", private_bytes)
            for kw in runs:
                h = hist.histogram(start, end, events, **kw)
                got = h.to_projdata().array
                assert np.array_equal(got, expect), (events, private_bytes, kw)
                assert h.stats["private_sinograms"] == (kw["threads"] if private_bytes and kw["threads"] > 2 else 1)
