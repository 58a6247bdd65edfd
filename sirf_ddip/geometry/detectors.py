"""Detector pairs of a cylindrical scanner and the sinogram bins they fall in (STIR's conventions).

A detector is ``(ring, crystal)`` with ``ring`` in ``0 .. num_rings - 1`` and ``crystal`` in
``0 .. detectors_per_ring - 1``. The mapping follows STIR's ``ProjDataInfoCylindricalNoArcCorr``
(UCL/STIR ``src/buildblock/ProjDataInfoCylindricalNoArcCorr.cxx``,
``initialise_uncompressed_view_tangpos_to_det1det2`` and ``initialise_det1det2_to_uncompressed_view_tangpos``;
``src/include/stir/ProjDataInfoCylindricalNoArcCorr.inl``, ``get_bin_for_det_pair``) and
``ProjDataInfoCylindrical`` (``initialise_ring_diff_arrays``, ``get_segment_axial_pos_num_for_ring_pair``):

- uncompressed view ``v`` and tangential position ``t`` -> crystals
  ``c1 = (v + (t >> 1)) mod N``, ``c2 = (v - ((t + 1) >> 1) + N/2) mod N`` (``>>`` rounds towards -inf);
- crystals -> ``t = (c1 - c2 + 3N/2) mod N``, ``v = (c1 - (t >> 1)) mod N``, then folded into
  ``0 <= v < N/2``, ``-N/2 <= t < N/2``; folding by the ``(-t, v + N/2)`` symmetry swaps the two detectors,
  and so the rings;
- rings ``(r1, r2)`` (after that swap) -> the segment holding ``r2 - r1`` and axial position
  ``(r1 + r2 - offset_k) * inc_k / 2`` (C integer division), ``offset_k = (N_rings - 1) - (n_k - 1) / inc_k``,
  ``inc_k = 2`` when the segment combines several ring differences, else 1;
- with view mashing ``M`` the view is ``v // M``.

Bins are returned as flat indices into one of two layouts of the same geometry:

- ``"sinogram"``: segments ascending, then axial position, view, tangential position (the storage order
  whose index separates into a sinogram part and a (view, tangential) part; used while histogramming);
- ``"memory"``: :class:`~sirf_ddip.geometry.sinogram.SinogramGeometry` memory order (segments ``0, +1, -1,
  ...``), then view, tangential position (``ProjData.array`` flattened).
"""

from __future__ import annotations

import numpy as np

from .sinogram import SinogramGeometry

__all__ = ["crystals_for_view_tangential", "view_tangential_for_crystals", "DetectorPairBinner"]


def crystals_for_view_tangential(view: np.ndarray, tang: np.ndarray, num_detectors: int
                                 ) -> tuple[np.ndarray, np.ndarray]:
    """Crystals ``(c1, c2)`` of uncompressed view ``view`` and tangential position ``tang`` (STIR's table)."""
    view = np.asarray(view, dtype=np.int64)
    tang = np.asarray(tang, dtype=np.int64)
    n = int(num_detectors)
    c1 = (view + (tang >> 1) + n) % n
    c2 = (view - ((tang + 1) >> 1) + n // 2) % n
    return c1, c2


def view_tangential_for_crystals(c1: np.ndarray, c2: np.ndarray, num_detectors: int
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uncompressed ``(view, tang, keep)`` of the crystal pair ``(c1, c2)``.

    ``keep`` is True where the detector order is kept (STIR's ``swap_detectors == 0``); where it is False the
    two detectors (and so their rings) swap roles. Pairs with ``c1 == c2`` are not LORs; their output is
    meaningless and must be masked by the caller.
    """
    c1 = np.asarray(c1, dtype=np.int64)
    c2 = np.asarray(c2, dtype=np.int64)
    n = int(num_detectors)
    half = n // 2
    t = (c1 - c2 + 3 * half) % n
    v = (c1 - (t >> 1) + n) % n
    low = v < half
    big = t >= half
    t_out = np.where(low, np.where(big, n - t, t), np.where(big, t - n, -t))
    v_out = np.where(low, v, v - half)
    swap = np.where(low, big, ~big)
    return v_out, t_out, ~swap


class DetectorPairBinner:
    """Lookup tables from detector pairs to the bins of a sinogram geometry.

    Parameters
    ----------
    geometry : SinogramGeometry
        Target geometry (any span, segment range, view mashing, number of tangential positions).
    """

    def __init__(self, geometry: SinogramGeometry):
        self.geometry = geometry
        sc = geometry.scanner
        self.num_rings = sc.num_rings
        self.num_detectors = sc.detectors_per_ring
        nr = self.num_rings
        segs = geometry.segments  # ascending
        # ring difference -> ascending segment index (-1: not in the geometry)
        seg_of_diff = np.full(2 * nr - 1, -1, dtype=np.int64)
        for i, sg in enumerate(segs):
            for d in range(sg.min_ring_diff, sg.max_ring_diff + 1):
                if -(nr - 1) <= d <= nr - 1 and seg_of_diff[d + nr - 1] < 0:
                    seg_of_diff[d + nr - 1] = i
        r1, r2 = np.meshgrid(np.arange(nr), np.arange(nr), indexing="ij")
        si = seg_of_diff[(r2 - r1) + nr - 1]
        nax = np.array([sg.num_axial for sg in segs], dtype=np.int64)
        inc = np.array([sg.axial_poss_per_ring_inc for sg in segs], dtype=np.int64)
        # STIR: ax_pos_num_offset = round((N-1) - 2 m_offset / ring_spacing), m_offset = (n-1) sampling / 2
        offset = np.rint((nr - 1) - (nax - 1) / inc).astype(np.int64)
        ok = si >= 0
        sic = np.where(ok, si, 0)
        num = (r1 + r2 - offset[sic]) * inc[sic]
        ax = np.sign(num) * (np.abs(num) // 2)  # C++ integer division truncates towards zero
        ok &= (ax >= 0) & (ax < nax[sic])
        file_start = np.concatenate([[0], np.cumsum(nax)[:-1]])
        mem_start = np.array([geometry.segment_offset(sg.number) for sg in segs], dtype=np.int64)
        #: (ring1, ring2) -> sinogram index in "sinogram" (segments ascending) order, -1 outside the geometry
        self.ring_pair_sinogram = np.where(ok, file_start[sic] + ax, -1)
        #: (ring1, ring2) -> sinogram index in memory order, -1 outside the geometry
        self.ring_pair_memory = np.where(ok, mem_start[sic] + ax, -1)
        self.num_sinograms = int(nax.sum())
        self.num_views = geometry.num_views
        self.num_tangential = geometry.num_tangential
        self.min_tangential = geometry.min_tangential_pos
        self.view_mashing = geometry.view_mashing
        self.size = self.num_sinograms * self.num_views * self.num_tangential

    # ------------------------------------------------------------------ transaxial part
    def view_tangential_index(self, c1: np.ndarray, c2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(view * num_tangential + tangential index, keep)`` of crystal pairs; index -1 when outside the
        tangential range of the geometry (or ``c1 == c2``)."""
        v, t, keep = view_tangential_for_crystals(c1, c2, self.num_detectors)
        ti = t - self.min_tangential
        ok = (ti >= 0) & (ti < self.num_tangential) & (np.asarray(c1) != np.asarray(c2))
        vt = (v // self.view_mashing) * self.num_tangential + ti
        return np.where(ok, vt, -1), keep

    # ------------------------------------------------------------------ whole bins
    def bin_index(self, ring1: np.ndarray, c1: np.ndarray, ring2: np.ndarray, c2: np.ndarray,
                  order: str = "memory") -> np.ndarray:
        """Flat bin index (``order`` "memory" or "sinogram", see module doc) of each detector pair; -1 for
        pairs outside the geometry (ring difference not stored, axial or tangential position out of range)."""
        ring1 = np.asarray(ring1, dtype=np.int64)
        ring2 = np.asarray(ring2, dtype=np.int64)
        vt, keep = self.view_tangential_index(c1, c2)
        ra = np.where(keep, ring1, ring2)
        rb = np.where(keep, ring2, ring1)
        table = self.ring_pair_memory if order == "memory" else self.ring_pair_sinogram
        if order not in ("memory", "sinogram"):
            raise ValueError(f"order must be 'memory' or 'sinogram', got {order!r}")
        sino = table[ra, rb]
        ok = (sino >= 0) & (vt >= 0)
        return np.where(ok, sino * (self.num_views * self.num_tangential) + vt, -1)

    def detector_pairs_of_view(self, view: int) -> tuple[np.ndarray, np.ndarray]:
        """Crystals ``(c1, c2)`` of every uncompressed view of mashed view ``view`` at every tangential
        position, shaped ``(view_mashing, num_tangential)`` (STIR ``get_all_det_pos_pairs_for_bin``)."""
        m = self.view_mashing
        v = np.arange(view * m, (view + 1) * m)[:, None]
        t = (np.arange(self.num_tangential) + self.min_tangential)[None, :]
        return crystals_for_view_tangential(v, t, self.num_detectors)

    def ring_pairs_of_sinograms(self, order: str = "memory") -> list[list[tuple[int, int]]]:
        """The ring pairs ``(ring1, ring2)`` combined in each sinogram (``order`` as in :meth:`bin_index`)."""
        table = self.ring_pair_memory if order == "memory" else self.ring_pair_sinogram
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.num_sinograms)]
        for a, b in zip(*np.nonzero(table >= 0)):
            out[int(table[a, b])].append((int(a), int(b)))
        return out
