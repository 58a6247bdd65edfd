"""Detection efficiencies from a Siemens component-based (ECAT8) normalisation, as STIR computes them.

This follows STIR's ``BinNormalisationFromECAT8`` (UCL/STIR ``src/recon_buildblock/BinNormalisationFromECAT8.cxx``,
``get_uncalibrated_bin_efficiency``, ``read_norm_data``, ``construct_sino_lookup_table``):

- the efficiency of a bin of any span / segment range / view mashing is the **sum** over the span-1 LORs it
  combines (the mashed views ``v * mash .. v * mash + mash - 1`` and the ring pairs ``(r1, r2)`` of its segment and
  axial position, ``r2 - r1`` the ring difference) of
  ``eps[r1, d1] * eps[r2, d2] * geo[r1 + r2, t] / axial[sino(r1, r2)]``, each view's sum times
  ``interference[t, view % crystals_per_block]``; ``d1, d2`` are the detectors of the span-1 view and
  tangential position (``ProjDataInfoCylindricalNoArcCorr::initialise_uncompressed_view_tangpos_to_det1det2``:
  ``d1 = (v + (t >> 1)) mod n``, ``d2 = (v - ((t + 1) >> 1) + n / 2) mod n``);
- mMR only: the stored crystal efficiencies are shifted by one crystal (``eps[r, c] = stored[r, c - 1]``) and
  the virtual crystals (the gaps between blocks, crystal 0 of every 9) get efficiency 0 (``use_gaps``);
- ``axial[sino(r1, r2)]`` is the axial effect of the Siemens span-11 sinogram (segments ``0, -1, +1, ...``)
  that holds ring pair ``(r1, r2)``, 1 for ring differences beyond the norm's maximum;
- with view mashing STIR's running sum gives the ``i``-th mashed view the weight ``mash - i`` (its
  ``view_efficiency`` is not reset per view); ``stir_mashing=True`` (the default) reproduces that, ``False``
  gives every view weight 1;
- the calibration factor is 1 (STIR sets 1; ``post_processing``), so these are "uncalibrated" efficiencies.

Dead time: STIR's ECAT8 class has a ``use_dead_time`` member but no key to switch it on and never reads the
dead-time parameters of the ``.n`` (that code is ``#if 0``), so STIR's ECAT8 efficiencies never include dead
time; neither do ours (:class:`NormComponents` has no dead-time switch, and the issue's "where STIR uses them"
is nowhere for ECAT8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import GeometryMismatchError
from ..geometry.sinogram import SinogramGeometry, span_segments
from ..io.siemens_norm import ECAT8Norm

__all__ = ["NormComponents", "ecat8_efficiencies", "mmr_crystal_efficiencies", "ring_pairs"]

#: STIR ``Scanner::get_num_virtual_transaxial_crystals_per_block`` / ``..._axial_...`` (Scanner.cxx)
_VIRTUAL_TRANSAXIAL = {"Siemens mMR": 1, "Siemens mCT": 1, "Siemens Vision 600": 1}
_VIRTUAL_AXIAL = {"Siemens mCT": 1}


@dataclass(frozen=True)
class NormComponents:
    """Which factors enter the efficiencies (STIR's ``use_*`` keys of ``Bin Normalisation From ECAT8``).

    All default to True, as in STIR.
    """

    geometric: bool = True
    crystal_interference: bool = True
    detector_efficiencies: bool = True
    axial_effects: bool = True
    gaps: bool = True

    @classmethod
    def from_names(cls, off: Sequence[str] = ()) -> "NormComponents":
        """Defaults with the named components switched off (names as the fields)."""
        names = set(off)
        bad = names - set(cls.__dataclass_fields__)
        if bad:
            raise ValueError(f"unknown normalisation component(s) {sorted(bad)}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**{k: k not in names for k in cls.__dataclass_fields__})


def ring_pairs(num_rings: int, min_rd: int, max_rd: int, num_axial: int, axial: int) -> list[tuple[int, int]]:
    """Ring pairs ``(r1, r2)``, ``r2 - r1`` in ``[min_rd, max_rd]``, of one axial position of a segment.

    STIR: ``ring1 + ring2 = (2 a - (num_axial - 1)) / (2 if min_rd != max_rd else 1) + num_rings - 1``
    (``calc_ring1_plus_ring2``); ring differences of the parity of ``ring1 + ring2``.
    """
    num = 2 * axial - (num_axial - 1)
    r12 = (num // 2 if min_rd != max_rd else num) + num_rings - 1
    out = []
    for rd in range(min_rd, max_rd + 1):
        if (r12 - rd) % 2:
            continue
        r1, r2 = (r12 - rd) // 2, (r12 + rd) // 2
        if 0 <= r1 < num_rings and 0 <= r2 < num_rings:
            out.append((r1, r2))
    return out


def mmr_crystal_efficiencies(norm: ECAT8Norm, gaps: bool = True) -> np.ndarray:
    """Crystal efficiencies ``[ring, crystal]`` as STIR uses them: mMR one-crystal shift, then gaps at 0."""
    eff = np.array(norm.efficiencies, dtype=np.float64)
    name = norm.scanner.name
    if name == "Siemens mMR":
        eff = np.roll(eff, 1, axis=1)  # eff[r, c] = stored[r, c - 1], stored[r, last] -> eff[r, 0]
    if gaps:
        ncb = int(norm.scanner.extra.get("num_transaxial_crystals_per_block", 0))
        vt = _VIRTUAL_TRANSAXIAL.get(name, 0)
        if vt and ncb:
            for inc in range(vt):
                eff[:, inc::ncb] = 0.0
        ncab = int(norm.scanner.extra.get("num_axial_crystals_per_block", 0))
        va = _VIRTUAL_AXIAL.get(name, 0)
        if va and ncab:
            for r in range(ncab - va, norm.scanner.num_rings, ncab):
                eff[r:r + va] = 0.0
    return eff


def _axial_lookup(norm: ECAT8Norm) -> np.ndarray:
    """``idx[r1, r2]``: Siemens sinogram of ring pair (r1, r2) in the norm's span, -1 if none."""
    n = norm.scanner.num_rings
    segs = span_segments(n, norm.axial_compression, norm.max_ring_diff)  # ascending
    K = len(segs) // 2
    order = [0] + [s for k in range(1, K + 1) for s in (-k, k)]  # ECAT: 0, -1, +1, ...
    idx = np.full((n, n), -1, dtype=np.int64)
    z = 0
    for k in order:
        a, b, na = segs[k + K]
        for ax in range(na):
            for r1, r2 in ring_pairs(n, a, b, na, ax):
                idx[r1, r2] = z
            z += 1
    return idx


def _check_scanner(norm: ECAT8Norm, geometry: SinogramGeometry) -> None:
    a, b = norm.scanner, geometry.scanner
    if (a.num_rings != b.num_rings or a.detectors_per_ring != b.detectors_per_ring
            or abs(a.effective_radius_mm - b.effective_radius_mm) > 0.05
            or abs(a.ring_spacing_mm - b.ring_spacing_mm) > 0.05):
        raise GeometryMismatchError(
            f"normalisation {norm.path} is for the {a.name} ({a.num_rings} rings, {a.detectors_per_ring} detectors per "
            f"ring), the sinogram template is for the {b.name} ({b.num_rings} rings, {b.detectors_per_ring} detectors)")
    nbins = norm.geometric.shape[1]
    tmin = geometry.min_tangential_pos
    if tmin < -(nbins // 2) or tmin + geometry.num_tangential - 1 > nbins - 1 - nbins // 2:
        raise GeometryMismatchError(f"template has {geometry.num_tangential} tangential positions, the normalisation "
                                    f"{norm.path} only {nbins}")
    if geometry.scanner.detectors_per_ring % (2 * geometry.num_views):
        raise GeometryMismatchError(f"{geometry.num_views} views are not an integer view mashing of "
                                    f"{geometry.scanner.detectors_per_ring // 2}")


def ecat8_efficiencies(norm: ECAT8Norm, geometry: SinogramGeometry, components: NormComponents = NormComponents(),
                       views: Sequence[int] | None = None, stir_mashing: bool = True) -> np.ndarray:
    """Detection efficiencies (1 / normalisation factors) on ``geometry``, STIR's ``BinNormalisationFromECAT8``.

    Parameters
    ----------
    norm : ECAT8Norm
        From :func:`sirf_ddip.io.siemens_norm.read_ecat8_norm`.
    geometry : SinogramGeometry
        Any span, segment range, view mashing and number of tangential positions of the norm's scanner.
    components : NormComponents
        Which factors to include (STIR's defaults: all).
    views : sequence of int, optional
        Compute only these views (of ``geometry``); the result then has ``len(views)`` views.
    stir_mashing : bool
        Reproduce STIR's weights ``mash - i`` of mashed views (see the module docstring).

    Returns
    -------
    ndarray, float32, shape ``(n_sinograms, n_views or len(views), n_tangential)`` in memory order.

    Raises
    ------
    GeometryMismatchError
        If ``geometry`` is not of the norm's scanner or has more tangential positions than the norm.
    """
    _check_scanner(norm, geometry)
    sc = geometry.scanner
    ndet, nrings = sc.detectors_per_ring, sc.num_rings
    mash = ndet // 2 // geometry.num_views
    sel = np.arange(geometry.num_views) if views is None else np.asarray(views, dtype=np.int64)
    if sel.size and (sel.min() < 0 or sel.max() >= geometry.num_views):
        raise ValueError(f"views {sel.tolist()} outside 0..{geometry.num_views - 1}")
    t = geometry.tangential_positions()
    nbins = norm.geometric.shape[1]
    tcol = t + nbins // 2
    uv = (sel[:, None] * mash + np.arange(mash)[None, :]).reshape(-1)  # uncompressed views, (sel, i) order
    d1 = (uv[:, None] + (t[None, :] >> 1) + ndet) % ndet
    d2 = (uv[:, None] - ((t[None, :] + 1) >> 1) + ndet // 2) % ndet
    if components.detector_efficiencies:
        eff = mmr_crystal_efficiencies(norm, gaps=components.gaps)
        e1 = eff[:, d1]  # (rings, uv, t)
        e2 = eff[:, d2]
    geo = norm.geometric[:, tcol].astype(np.float64) if components.geometric else None
    lookup = _axial_lookup(norm) if components.axial_effects else None
    axial = norm.axial.astype(np.float64)
    if components.crystal_interference:
        ncb = norm.interference.shape[1]
        ci = norm.interference[tcol][:, uv % ncb].T.astype(np.float64)  # (uv, t)
    else:
        ci = np.ones((uv.size, t.size))
    w = (mash - np.arange(mash)).astype(np.float64) if stir_mashing else np.ones(mash)
    wci = (ci.reshape(sel.size, mash, t.size) * w[None, :, None])
    out = np.zeros((geometry.num_sinograms, sel.size, t.size), dtype=np.float32)
    acc = np.empty((uv.size, t.size), dtype=np.float64)
    for seg in geometry.segments:
        off = geometry.segment_offset(seg.number)
        for ax in range(seg.num_axial):
            acc.fill(0.0)
            for r1, r2 in ring_pairs(nrings, seg.min_ring_diff, seg.max_ring_diff, seg.num_axial, ax):
                if components.detector_efficiencies:
                    term = e1[r1] * e2[r2]
                else:
                    term = np.ones_like(acc)
                if geo is not None:
                    term = term * geo[r1 + r2][None, :]
                if lookup is not None and lookup[r1, r2] >= 0:
                    term = term / axial[lookup[r1, r2]]
                acc += term
            out[off + ax] = (acc.reshape(sel.size, mash, t.size) * wci).sum(axis=1)
    return out
