"""Non-arc-corrected cylindrical sinogram geometry, mirroring STIR's ``ProjDataInfoCylindricalNoArcCorr``.

Every formula follows STIR (UCL/STIR ``src/buildblock/ProjDataInfoCylindrical.cxx``,
``src/include/stir/ProjDataInfoCylindrical.inl``, ``ProjDataInfoCylindricalNoArcCorr.cxx``,
``ProjDataInfo.cxx``):

- views: ``phi(v) = v * pi / num_views + offset``, ``offset = intrinsic tilt`` plus, when views are mashed
  (``num_detectors != 2 * num_views`` and ``num_detectors % (2 * num_views) == 0``),
  ``pi / (num_detectors / 2) * (mash - 1) / 2``; ``mash = num_detectors / 2 / num_views``;
- tangential positions ``t = -(n // 2) .. -(n // 2) + n - 1`` and ``s(t) = R_eff * sin(t * pi / num_detectors)``;
- segment ``k`` holds ring differences ``ring2 - ring1`` in ``[min_k, max_k]``; its axial sampling is the
  ring spacing, halved when ``min_k != max_k``; ``m(a) = a * sampling - m_offset`` with ``m`` centred on the
  scanner (``m(first) = -m(last)``);
- ``tan(theta) = delta * ring_spacing / (2 * sqrt(R_eff^2 - s^2))`` with ``delta = (min_k + max_k) / 2``;
- span ``S`` (odd): segment 0 holds ``-(S-1)/2 .. (S-1)/2``, segment ``+-i`` the next ``S`` differences, the last
  one clipped at the maximum ring difference; axial positions ``N - |d|`` for a single ring difference and
  ``2N - 1 - 2 min|d|`` otherwise.

In memory (``shape``), sinograms are ordered as SIRF's ``AcquisitionData.as_array()``: segments
``0, +1, -1, +2, -2, ...``, axial position ascending within a segment.  Interfile files list segments
ascending; :meth:`file_to_memory_index` converts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import GeometryError, GeometryMismatchError
from .image import ImageGrid
from .scanner import Scanner, get_scanner

__all__ = ["Segment", "SinogramGeometry", "span_segments", "SPEED_OF_LIGHT_MM_PER_PS_DIV2"]

#: STIR's ``speed_of_light_in_mm_per_ps_div2`` (``stir/common.h``): a time difference of 1 ps is this many mm
#: of the emission point's offset from the LOR's mid-point
SPEED_OF_LIGHT_MM_PER_PS_DIV2 = 0.299792458 * 0.5


@dataclass(frozen=True)
class Segment:
    """One segment: ring differences ``ring2 - ring1`` in ``[min_ring_diff, max_ring_diff]``."""

    number: int
    min_ring_diff: int
    max_ring_diff: int
    num_axial: int
    axial_sampling_mm: float
    m_mm: tuple  # m per axial position (mm, scanner centre = 0)
    num_ring_pairs: tuple  # ring pairs combined in each axial position
    tantheta0: float  # tan(theta) at s = 0

    @property
    def average_ring_diff(self) -> float:
        return (self.min_ring_diff + self.max_ring_diff) / 2.0

    @property
    def axial_poss_per_ring_inc(self) -> int:
        return 2 if self.max_ring_diff != self.min_ring_diff else 1


def span_segments(num_rings: int, span: int, max_ring_diff: int) -> list[tuple[int, int, int]]:
    """STIR's (min ring diff, max ring diff, num axial positions) per segment, segments ascending.

    Follows ``ProjDataInfo::ProjDataInfoCTI`` (span must be odd, ``max_ring_diff >= (span-1)/2``).
    """
    if span < 1 or span % 2 != 1:
        raise ValueError(f"span must be a positive odd number (STIR), got {span}")
    if max_ring_diff < 0 or max_ring_diff > num_rings - 1:
        raise ValueError(f"max ring difference {max_ring_diff} outside 0..{num_rings - 1} for {num_rings} rings")
    half = (span - 1) // 2
    if max_ring_diff < half:
        raise ValueError(f"max ring difference {max_ring_diff} must be at least (span-1)/2 = {half} (STIR)")
    pos: list[tuple[int, int]] = [(-half, half)]
    lo = half + 1
    while lo <= max_ring_diff:
        pos.append((lo, min(lo + span - 1, max_ring_diff)))
        lo += span
    segs = []
    for (a, b) in reversed(pos[1:]):
        segs.append((-b, -a))
    segs.extend(pos)
    return [(a, b, _num_axial(num_rings, a, b)) for (a, b) in segs]


def _num_axial(num_rings: int, dmin: int, dmax: int) -> int:
    if dmin == dmax:
        return num_rings - abs(dmin)
    mind = 0 if dmin <= 0 <= dmax else min(abs(dmin), abs(dmax))
    return 2 * num_rings - 1 - 2 * mind


class SinogramGeometry:
    """Non-TOF, non-arc-corrected cylindrical projection-data geometry (STIR ProjDataInfoCylindricalNoArcCorr).

    Parameters
    ----------
    scanner : Scanner or str
    span : int
        Axial compression (odd). Ignored if ``segments`` is given.
    max_ring_diff : int, optional
        Maximum ring difference (default: ``num_rings - 1``).
    view_mashing : int
        Views are ``detectors_per_ring / 2 / view_mashing`` (ignored if ``num_views`` is given).
    num_tangential : int, optional
        Default: the scanner's maximum number of non-arc-corrected bins.
    num_views : int, optional
    segments : sequence of (min_ring_diff, max_ring_diff, num_axial), optional
        Explicit segment table (ascending segment numbers), e.g. from a header.
    storage : {"view", "sinogram"}
        Axis order of the Interfile data file (segment, view, axial, tang) or (segment, axial, view, tang).
    tof_mash_factor : int
        STIR's TOF mashing factor: 0 (default) for non-TOF data; ``f >= 1`` gives
        ``max_num_timing_poss / f`` TOF bins of ``f`` unmashed positions each (a TOF-ready scanner, see
        :attr:`Scanner.is_tof_ready`).  STIR needs an odd number of TOF bins; where ``f`` does not divide the
        scanner's unmashed positions STIR silently drops the left-over ones, which is refused here.

    Notes
    -----
    TOF data (:attr:`is_tof`) have :attr:`shape` ``(n_tof, n_sinograms, n_views, n_tangential)`` with the TOF
    bins ordered by ``timing_pos_num`` ascending (``-(n_tof // 2) .. n_tof // 2``), as SIRF's ``as_array()``;
    each TOF bin is a complete non-TOF sinogram (:meth:`non_tof`).  TOF bin ``k`` holds emissions whose
    signed distance ``d`` from the LOR's mid-point lies in ``[low_k, high_k]`` (:meth:`tof_bin_edges_mm`),
    ``d > 0`` towards STIR's ``a > 0`` end (see :mod:`sirf_ddip.physics.tof`).
    """

    def __init__(self, scanner: Scanner | str, span: int = 1, max_ring_diff: int | None = None,
                 view_mashing: int = 1, num_tangential: int | None = None, num_views: int | None = None,
                 segments: Sequence[tuple[int, int, int]] | None = None, storage: str = "view",
                 tof_mash_factor: int = 0):
        if isinstance(scanner, str):
            scanner = get_scanner(scanner)
        self.scanner: Scanner = scanner
        ndet = scanner.detectors_per_ring
        if num_views is None:
            if view_mashing < 1 or (ndet // 2) % view_mashing:
                raise ValueError(f"view mashing {view_mashing} must divide detectors_per_ring/2 = {ndet // 2}")
            num_views = ndet // 2 // view_mashing
        self.num_views = int(num_views)
        if self.num_views < 1:
            raise ValueError(f"num_views must be positive, got {num_views}")
        if ndet % (2 * self.num_views) == 0:
            self.view_mashing = ndet // 2 // self.num_views
        else:
            self.view_mashing = 1  # STIR warns and does not adjust the azimuthal offset
        self.num_tangential = int(num_tangential if num_tangential is not None
                                  else scanner.max_num_non_arc_corrected_bins)
        if self.num_tangential < 1:
            raise ValueError(f"num_tangential must be positive, got {self.num_tangential}")
        if storage not in ("view", "sinogram"):
            raise ValueError(f"storage must be 'view' or 'sinogram', got {storage!r}")
        self.storage = storage
        if segments is None:
            mrd = scanner.num_rings - 1 if max_ring_diff is None else int(max_ring_diff)
            segments = span_segments(scanner.num_rings, int(span), mrd)
            self.span = int(span)
        else:
            segments = [tuple(int(v) for v in s) for s in segments]
            widths = {b - a + 1 for (a, b, _) in segments}
            self.span = int(segments[len(segments) // 2][1] - segments[len(segments) // 2][0] + 1) \
                if len(widths) else 1
        if len(segments) % 2 != 1:
            raise ValueError(f"need an odd number of segments (-K..K), got {len(segments)}")
        self.max_ring_diff = max(max(abs(a), abs(b)) for (a, b, _) in segments)
        self._build_segments(segments)
        self._segment_table = [tuple(t) for t in segments]
        self._set_tof(tof_mash_factor)

    # ------------------------------------------------------------------ TOF (STIR 6 ProjDataInfo)
    def _set_tof(self, tof_mash_factor) -> None:
        """STIR's ``ProjDataInfo::set_tof_mash_factor``.

        Raises
        ------
        GeometryError
            TOF mashing on a scanner without TOF parameters, a mashing factor larger than the scanner's
            unmashed positions or not dividing them, or an even number of TOF bins (STIR refuses that).
        """
        f = int(tof_mash_factor or 0)
        sc = self.scanner
        if f < 0:
            raise GeometryError(f"TOF mashing factor must be >= 0 (0: non-TOF), got {f}")
        self.tof_mash_factor = f
        if f == 0:
            self.num_tof_bins = 1
            return
        if not sc.is_tof_ready:
            raise GeometryError(f"TOF mashing factor {f} given but scanner {sc.name!r} has no TOF parameters "
                                f"(Maximum number of (unmashed) TOF time bins := {sc.max_num_timing_poss}, "
                                f"Size of unmashed TOF time bins (ps) := {sc.size_timing_pos_ps:g}, "
                                f"TOF timing resolution (ps) := {sc.timing_resolution_ps:g})")
        n = sc.max_num_timing_poss
        if f > n:
            raise GeometryError(f"TOF mashing factor {f} is larger than the {n} unmashed TOF bins of {sc.name}")
        if n % f:
            raise GeometryError(f"TOF mashing factor {f} does not divide the {n} unmashed TOF bins of {sc.name} "
                                f"(STIR would drop {n % f} of them)")
        nb = n // f
        if nb % 2 == 0:
            raise GeometryError(f"TOF mashing factor {f} gives {nb} TOF bins for {sc.name}; STIR needs an odd "
                                "number (a central TOF bin)")
        self.num_tof_bins = nb

    @property
    def is_tof(self) -> bool:
        """True for TOF data (a TOF mashing factor >= 1)."""
        return self.tof_mash_factor > 0

    def tof_summary(self) -> str:
        """``"11 TOF bins (TOF mashing factor 5)"``, or ``"non-TOF"``: the TOF layout, for one-line errors."""
        return f"{self.num_tof_bins} TOF bins (TOF mashing factor {self.tof_mash_factor})" if self.is_tof else "non-TOF"

    @property
    def min_timing_pos_num(self) -> int:
        return -(self.num_tof_bins // 2) if self.is_tof else 0

    @property
    def max_timing_pos_num(self) -> int:
        return self.num_tof_bins // 2 if self.is_tof else 0

    def timing_pos_nums(self) -> np.ndarray:
        """STIR's ``timing_pos_num`` of each TOF bin in memory (and file) order."""
        return np.arange(self.min_timing_pos_num, self.max_timing_pos_num + 1)

    @property
    def tof_bin_width_mm(self) -> float:
        """Width of a (mashed) TOF bin along the LOR, ``c/2 * f * size_timing_pos`` (STIR, in float32)."""
        return float(np.float32(self.tof_mash_factor * self.scanner.size_timing_pos_ps * SPEED_OF_LIGHT_MM_PER_PS_DIV2))

    @property
    def tof_sigma_mm(self) -> float:
        """Standard deviation along the LOR of the Gaussian timing kernel: ``c/2 * FWHM / 2.355`` (STIR)."""
        fwhm = np.float32(self.scanner.timing_resolution_ps * SPEED_OF_LIGHT_MM_PER_PS_DIV2)
        return float(np.float32(fwhm / np.float32(2.355)))

    def tof_bin_edges_mm(self) -> np.ndarray:
        """``(n_tof, 2)`` lower and upper edges (mm along the LOR) of every TOF bin, computed in float32 as STIR's
        ``tof_bin_boundaries_mm`` (``k w -+ (((k + 1) w - (k - 1) w) / 2) / 2``)."""
        if not self.is_tof:
            raise GeometryError("non-TOF geometry has no TOF bins")
        w = np.float32(self.tof_bin_width_mm)
        k = self.timing_pos_nums()
        kk = (k.astype(np.float32) * w).astype(np.float32)
        samp = ((((k + 1).astype(np.float32) * w).astype(np.float32)
                 - ((k - 1).astype(np.float32) * w).astype(np.float32)) / np.float32(2)).astype(np.float32)
        half = (samp / np.float32(2)).astype(np.float32)
        return np.stack([kk - half, kk + half], axis=1).astype(np.float32)

    def tof_delta_time_ps(self) -> np.ndarray:
        """STIR's ``get_tof_delta_time`` per TOF bin: ``2 d / c`` at the bin centre (ps)."""
        k = self.timing_pos_nums()
        centre = (k.astype(np.float32) * np.float32(self.tof_bin_width_mm)).astype(np.float32)
        return centre.astype(np.float64) / SPEED_OF_LIGHT_MM_PER_PS_DIV2

    def non_tof(self) -> "SinogramGeometry":
        """The same geometry without TOF (one TOF bin: what a sum over TOF bins lives on)."""
        if not self.is_tof:
            return self
        g = SinogramGeometry(self.scanner, num_views=self.num_views, num_tangential=self.num_tangential,
                             segments=self._segment_table, storage=self.storage)
        g.span = self.span
        return g

    def with_tof_mash_factor(self, tof_mash_factor: int) -> "SinogramGeometry":
        """The same geometry with another TOF mashing factor (0: non-TOF)."""
        g = SinogramGeometry(self.scanner, num_views=self.num_views, num_tangential=self.num_tangential,
                             segments=self._segment_table, storage=self.storage, tof_mash_factor=tof_mash_factor)
        g.span = self.span
        return g

    # ------------------------------------------------------------------ construction helpers
    def _build_segments(self, table):
        sc = self.scanner
        K = len(table) // 2
        rs = sc.ring_spacing_mm
        R = sc.effective_radius_mm
        segs = []
        for i, (a, b, n) in enumerate(table):
            if a > b:
                a, b = b, a  # STIR swaps them (with a warning)
            number = i - K
            samp = rs / (2 if a != b else 1)
            m_offset = (n - 1) * samp / 2.0
            m = np.arange(n) * samp - m_offset
            # ring pairs: ring1 + ring2 = 2 m / rs + (N - 1)
            pairs = []
            for mm in m:
                r12 = 2.0 * mm / rs + (sc.num_rings - 1)
                r12i = int(round(r12))
                if abs(r12 - r12i) > 1e-3:
                    raise ValueError(f"segment {number}: axial positions do not fall between physical rings "
                                     f"(STIR refuses this); check the number of axial positions ({n})")
                cnt = 0
                for d in range(a, b + 1):
                    if (r12i - d) % 2:
                        continue
                    r1, r2 = (r12i - d) // 2, (r12i + d) // 2
                    if 0 <= r1 < sc.num_rings and 0 <= r2 < sc.num_rings:
                        cnt += 1
                pairs.append(cnt)
            delta = (a + b) / 2.0
            tt0 = 0.0 if abs(delta) < 1e-4 else delta * rs / (2 * R)
            segs.append(Segment(number, a, b, int(n), samp, tuple(float(x) for x in m), tuple(pairs), tt0))
        self.segments: list[Segment] = segs  # ascending segment number
        self._seg_by_num = {s.number: s for s in segs}
        seq = [0]
        for k in range(1, K + 1):
            seq += [k, -k]
        self.segment_sequence: list[int] = seq
        # memory offsets
        self._mem_offset = {}
        off = 0
        for k in seq:
            self._mem_offset[k] = off
            off += self._seg_by_num[k].num_axial
        self.num_sinograms = off

    # ------------------------------------------------------------------ basic properties
    @property
    def shape(self) -> tuple[int, ...]:
        """(n_sinograms, n_views, n_tangential) in STIR/SIRF memory order; TOF data have the TOF bins first,
        ``(n_tof, n_sinograms, n_views, n_tangential)``."""
        if self.is_tof:
            return (self.num_tof_bins, self.num_sinograms, self.num_views, self.num_tangential)
        return (self.num_sinograms, self.num_views, self.num_tangential)

    @property
    def sinogram_shape(self) -> tuple[int, int, int]:
        """(n_sinograms, n_views, n_tangential) of one TOF bin (the non-TOF shape)."""
        return (self.num_sinograms, self.num_views, self.num_tangential)

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def min_tangential_pos(self) -> int:
        return -(self.num_tangential // 2)

    def segment(self, number: int) -> Segment:
        try:
            return self._seg_by_num[number]
        except KeyError:
            raise KeyError(f"segment {number} not in geometry (segments {self.segments[0].number}.."
                           f"{self.segments[-1].number})") from None

    def tangential_positions(self) -> np.ndarray:
        return np.arange(self.num_tangential) + self.min_tangential_pos

    @property
    def azimuthal_offset_rad(self) -> float:
        """STIR's azimuthal angle offset: intrinsic tilt + view-mashing offset."""
        ndet = self.scanner.detectors_per_ring
        off = self.scanner.view_offset_rad
        if ndet > 2 and self.num_views * 2 != ndet and ndet % (2 * self.num_views) == 0:
            off += math.pi / (ndet / 2) * (self.view_mashing - 1) / 2.0
        return off

    def phi(self) -> np.ndarray:
        """Azimuthal angle (rad) per view."""
        return np.arange(self.num_views) * (math.pi / self.num_views) + self.azimuthal_offset_rad

    @property
    def angular_increment(self) -> float:
        return math.pi / self.scanner.detectors_per_ring

    def s(self) -> np.ndarray:
        """Signed distance (mm) from the scanner axis per tangential index: ``R_eff sin(t pi / n_det)``."""
        return self.scanner.effective_radius_mm * np.sin(self.tangential_positions() * self.angular_increment)

    def sampling_in_s(self) -> np.ndarray:
        """STIR's ``get_sampling_in_s`` per tangential index: ``(s(t+1) - s(t-1)) / 2``."""
        t = self.tangential_positions()
        R = self.scanner.effective_radius_mm
        d = self.angular_increment
        return R * (np.sin((t + 1) * d) - np.sin((t - 1) * d)) / 2.0

    def tantheta(self, segment: int, s: np.ndarray | float | None = None) -> np.ndarray | float:
        """``tan(theta)`` of a segment at transaxial distance ``s`` (mm; default 0), as STIR's ``get_tantheta``."""
        seg = self.segment(segment)
        if abs(seg.average_ring_diff) < 1e-4:
            return np.zeros_like(np.asarray(s, dtype=float)) if s is not None else 0.0
        R = self.scanner.effective_radius_mm
        ss = 0.0 if s is None else np.asarray(s, dtype=float)
        val = seg.average_ring_diff * self.scanner.ring_spacing_mm / (2 * np.sqrt(R * R - ss * ss))
        return float(val) if s is None else val

    def m(self, segment: int) -> np.ndarray:
        return np.asarray(self.segment(segment).m_mm)

    # ------------------------------------------------------------------ sinogram order
    def segment_offset(self, segment: int) -> int:
        """Index of the first sinogram of ``segment`` in memory order."""
        return self._mem_offset[segment]

    def segment_slice(self, segment: int) -> slice:
        o = self._mem_offset[segment]
        return slice(o, o + self.segment(segment).num_axial)

    def sinogram_table(self) -> dict[str, np.ndarray]:
        """Per sinogram (memory order): ``segment``, ``axial`` index, ``tantheta`` (s = 0), ``m_mm``,
        ``min_ring_diff``, ``max_ring_diff``, ``num_ring_pairs``."""
        cols: dict[str, list] = {k: [] for k in ("segment", "axial", "tantheta", "m_mm", "min_ring_diff",
                                                 "max_ring_diff", "num_ring_pairs")}
        for k in self.segment_sequence:
            sg = self.segment(k)
            for a in range(sg.num_axial):
                cols["segment"].append(k)
                cols["axial"].append(a)
                cols["tantheta"].append(sg.tantheta0)
                cols["m_mm"].append(sg.m_mm[a])
                cols["min_ring_diff"].append(sg.min_ring_diff)
                cols["max_ring_diff"].append(sg.max_ring_diff)
                cols["num_ring_pairs"].append(sg.num_ring_pairs[a])
        return {k: np.asarray(v) for k, v in cols.items()}

    def segment_file_order(self) -> list[int]:
        """Segment numbers in Interfile file order (ascending)."""
        return [s.number for s in self.segments]

    def file_to_memory_index(self) -> np.ndarray:
        """``idx[i]`` = memory sinogram index of the ``i``-th sinogram in file order (segments ascending).

        ``memory = np.empty(...); memory[idx] = file_sinograms`` and ``file_sinograms = memory[idx]``.
        """
        out = []
        for sg in self.segments:
            o = self._mem_offset[sg.number]
            out.extend(range(o, o + sg.num_axial))
        return np.asarray(out, dtype=np.int64)

    def memory_to_file_index(self) -> np.ndarray:
        """Inverse permutation of :meth:`file_to_memory_index`."""
        f2m = self.file_to_memory_index()
        inv = np.empty_like(f2m)
        inv[f2m] = np.arange(f2m.size)
        return inv

    # ------------------------------------------------------------------ subsets
    def _view_symmetries(self, grid: ImageGrid | None = None) -> tuple[bool, bool]:
        """(90-degree, 180-degree) view symmetries that STIR's ray-tracing matrix uses.

        ``DataSymmetriesForBins_PET_CartesianGrid``: 90-degree needs ``num_views % 4 == 0``, equal x/y voxel
        sizes and ``phi(0) == 0``; 180-degree needs ``num_views % 2 == 0``; both are off for images shifted
        transaxially.
        """
        n = self.num_views
        if self.is_tof:  # STIR disables the rotational symmetries for TOF data ("untested")
            return False, False
        s90 = n % 4 == 0
        s180 = n % 2 == 0
        if abs(self.phi()[0]) > 1e-4:
            s90 = False  # STIR disables only the 90-degree symmetry for a phi offset
        if grid is not None:
            if abs(grid.voxel_size[1] - grid.voxel_size[2]) > 2e-3:
                s90 = False
            default = ImageGrid(grid.shape, grid.voxel_size)
            if (abs(grid.origin[1] - default.origin[1]) > 0.01 or abs(grid.origin[2] - default.origin[2]) > 0.01):
                s90 = s180 = False
        return s90, s180

    def _related_views(self, v: int, s90: bool, s180: bool) -> list[int]:
        n = self.num_views
        if s90:
            cand = [v, n // 2 - v, n // 2 + v, n - v]
        elif s180:
            cand = [v, n - v]
        else:
            cand = [v]
        return sorted({c for c in cand if 0 <= c < n})

    def _basic_views(self, s90: bool, s180: bool) -> range:
        n = self.num_views
        if s90:
            return range(0, n // 4 + 1)
        if s180:
            return range(0, n // 2 + 1)
        return range(0, n)

    def subset_views(self, num_subsets: int, subset: int, symmetries: bool = True,
                     grid: ImageGrid | None = None) -> np.ndarray:
        """Views of OSEM subset ``subset`` of ``num_subsets``, as STIR's OSMAPOSL forms them.

        STIR loops over views ``v = subset, subset + S, ...``, keeps the *basic* ones of the projector's
        symmetries and processes each with all its symmetry-related views
        (``find_basic_vs_nums_in_subset``). With STIR's default ray-tracing symmetries (90 and 180 degrees),
        the related views of basic ``v <= num_views/4`` are ``v, n/2 - v, n/2 + v, n - v``. With
        ``symmetries=False`` the subset is simply ``v % S == subset``.

        Raises
        ------
        ValueError
            If ``num_subsets`` or ``subset`` is out of range, or if the subsets are unbalanced (different
            numbers of views), which STIR's OSMAPOSL refuses.
        """
        S, s = int(num_subsets), int(subset)
        if S < 1 or S > self.num_views:
            raise ValueError(f"number of subsets {S} must be in 1..{self.num_views} (number of views)")
        if not 0 <= s < S:
            raise ValueError(f"subset {s} out of range 0..{S - 1}")
        if S == 1:
            return np.arange(self.num_views)
        if not symmetries:
            views = np.arange(s, self.num_views, S)
            if self.num_views % S:
                raise ValueError(f"{S} subsets of {self.num_views} views are unbalanced "
                                 f"(views must be divisible by subsets)")
            return views
        s90, s180 = self._view_symmetries(grid)
        sizes = []
        result = None
        for ss in range(S):
            vs = set()
            for v in self._basic_views(s90, s180):
                if v % S == ss:
                    vs.update(self._related_views(v, s90, s180))
            sizes.append(len(vs))
            if ss == s:
                result = np.asarray(sorted(vs), dtype=np.int64)
        if len(set(sizes)) != 1:
            raise ValueError(
                f"{S} subsets of {self.num_views} views are unbalanced with STIR's projector symmetries "
                f"(views per subset: {sizes}); STIR's OSMAPOSL refuses this. Choose a number of subsets such that "
                f"every subset gets the same number of views (e.g. a divisor of num_views/4).")
        return result

    # ------------------------------------------------------------------ image
    def default_image_grid(self, xy: int | None = None, zoom: float = 1.0) -> ImageGrid:
        """STIR's default image for this geometry (as SIRF's ``create_uniform_image`` / STIR's
        ``VoxelsOnCartesianGrid(proj_data_info, zoom)``): z voxel = ring spacing / 2 with ``2 N - 1`` planes,
        xy voxel = default bin size / zoom, ``xy`` defaults to the number of tangential positions."""
        sc = self.scanner
        vxy = sc.default_bin_size_mm / zoom
        nxy = int(xy) if xy is not None else int(self.num_tangential)
        vz = sc.ring_spacing_mm / 2.0
        return ImageGrid((2 * sc.num_rings - 1, nxy, nxy), (vz, vxy, vxy))

    # ------------------------------------------------------------------ comparison
    def matches(self, other: "SinogramGeometry") -> bool:
        if not isinstance(other, SinogramGeometry):
            return False
        a, b = self.scanner, other.scanner
        same_scanner = (a.num_rings == b.num_rings and a.detectors_per_ring == b.detectors_per_ring
                        and abs(a.effective_radius_mm - b.effective_radius_mm) < 0.05
                        and abs(a.ring_spacing_mm - b.ring_spacing_mm) < 0.05
                        and abs(a.view_offset_deg - b.view_offset_deg) < 1e-3)
        segs = [(s.min_ring_diff, s.max_ring_diff, s.num_axial) for s in self.segments]
        osegs = [(s.min_ring_diff, s.max_ring_diff, s.num_axial) for s in other.segments]
        return (same_scanner and self.num_views == other.num_views
                and self.num_tangential == other.num_tangential and segs == osegs
                and self.tof_mash_factor == other.tof_mash_factor and self._same_tof(other))

    def _same_tof(self, other: "SinogramGeometry") -> bool:
        if not self.is_tof:
            return True
        a, b = self.scanner, other.scanner
        return (a.max_num_timing_poss == b.max_num_timing_poss
                and abs(a.size_timing_pos_ps - b.size_timing_pos_ps) <= 1e-3
                and abs(a.timing_resolution_ps - b.timing_resolution_ps) <= 1e-2)

    def check_matches(self, other: "SinogramGeometry", what: str = "data", other_what: str = "template") -> None:
        if not self.matches(other):
            raise GeometryMismatchError(f"{what} geometry [{self.describe()}] does not match {other_what} "
                                        f"geometry [{other.describe()}]")

    def describe(self) -> str:
        tof = (f", {self.num_tof_bins} TOF bins (TOF mash {self.tof_mash_factor})" if self.is_tof else "")
        return (f"{self.scanner.name}: {self.num_segments} segments (max ring diff {self.max_ring_diff}, "
                f"span {self.span}), {self.num_sinograms} sinograms, {self.num_views} views "
                f"(mash {self.view_mashing}), {self.num_tangential} tangential{tof}")

    def __repr__(self) -> str:
        return f"SinogramGeometry({self.describe()})"

    def __eq__(self, other) -> bool:
        return self.matches(other)

    def __hash__(self):
        return hash((self.scanner.name, self.num_views, self.num_tangential,
                     tuple((s.min_ring_diff, s.max_ring_diff, s.num_axial) for s in self.segments),
                     self.tof_mash_factor))

    # ---------------------------------------------------------- Interfile (writing; reading: io.sinogram_header)
    def header_dict(self, storage: str | None = None) -> dict[str, str]:
        """Interfile keys (STIR spelling) describing this geometry, except the scanner block and data file."""
        storage = storage or self.storage
        segs = self.segments
        d: dict[str, str] = {
            "!imaging modality": "PT",
            "originating system": self.scanner.name,
            "!version of keys": "STIR6.0",
            "!GENERAL DATA": "",
            "!GENERAL IMAGE DATA": "",
            "!type of data": "PET",
            "imagedata byte order": "LITTLEENDIAN",
            "number of radionuclides": "1",
            "!PET STUDY (General)": "",
            "!PET data type": "Emission",
            "applied corrections": "{None}",
            "!number format": "float",
            "!number of bytes per pixel": "4",
            "number of dimensions": "5" if self.is_tof else "4",
        }
        if self.is_tof:  # STIR 6.4: the timing axis first (slowest in the file)
            d.update({"matrix axis label [5]": "timing positions", "!matrix size [5]": str(self.num_tof_bins)})
        d.update({
            "matrix axis label [4]": "segment",
            "!matrix size [4]": str(len(segs)),
        })
        ax = "{ " + ",".join(str(s.num_axial) for s in segs) + "}"
        if storage == "view":
            d.update({"matrix axis label [3]": "view", "!matrix size [3]": str(self.num_views),
                      "matrix axis label [2]": "axial coordinate", "!matrix size [2]": ax})
        else:
            d.update({"matrix axis label [3]": "axial coordinate", "!matrix size [3]": ax,
                      "matrix axis label [2]": "view", "!matrix size [2]": str(self.num_views)})
        d.update({
            "matrix axis label [1]": "tangential coordinate",
            "!matrix size [1]": str(self.num_tangential),
        })
        if self.is_tof:
            d["TOF mashing factor"] = str(self.tof_mash_factor)
        d.update({
            "minimum ring difference per segment": "{ " + ",".join(str(s.min_ring_diff) for s in segs) + "}",
            "maximum ring difference per segment": "{ " + ",".join(str(s.max_ring_diff) for s in segs) + "}",
        })
        return d

    def header_lines(self, data_file: str | None = None, storage: str | None = None,
                     extra: dict[str, str] | None = None) -> list[str]:
        """A complete STIR ``.hs`` header; ``name of data file`` is included only if ``data_file`` is given."""
        d = self.header_dict(storage)
        lines = ["!INTERFILE  :="]
        items = list(d.items())
        lines.append(f"{items[0][0]} := {items[0][1]}")
        if data_file is not None:
            lines.append(f"name of data file := {data_file}")
        for k, v in items[1:]:
            lines.append(f"{k} :=" + (f" {v}" if v != "" else ""))
        lines.extend(self.scanner.header_lines())
        for k, v in (extra or {}).items():
            lines.append(f"{k} := {v}")
        if not extra or "number of time frames" not in extra:
            lines.append("number of time frames := 1")
        lines.append("!END OF INTERFILE :=")
        return lines
