"""PETSIRD listmode files (``petsird`` package, binary format) for scanners that are a cylinder of detectors.

PETSIRD (the ETSI/PETSIRD standard; ``petsird`` 0.12 on PyPI) describes the scanner by replicated detector
modules (rigid transforms of boxes) and stores coincidences per module-type pair as two *detection bins*
(``(module * elements_per_module + element) * energy_bins + energy``, ``petsird.helpers.expand_detection_bins``)
and a TOF index, grouped in time blocks (``EventTimeBlock.time_interval`` in ms).

:class:`PetsirdCylinder` maps the detecting elements of one module type onto our ``(ring, crystal)`` indices
from their centres: rings by ``z`` (ascending), crystals by the azimuth ``atan2(y, x)`` (ascending from the
first element's angle), which requires a single layer of equally spaced crystals on complete rings. The events
are then binned by :mod:`sirf_ddip.physics.histogram` as the Siemens listmode is. Energy bins are merged. TOF indices
are summed over for a non-TOF target (as STIR does when it un-TOFs data), or binned into the TOF bins of a TOF
target (:func:`petsird_tof_positions`): PETSIRD stores ``(t1 - t2) c / 2`` of the two detection bins (negative:
the first detector fired first, the emission is nearer to it).

:func:`write_petsird_cylinder` writes such a file (used to check the reader against the package's own writer).
The ``petsird`` package deserialises every event into a Python object; that per-event cost is the package's,
the mapping and binning here are vectorised.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputFileError, UnsupportedDataError
from ..geometry.scanner import Scanner, get_scanner

__all__ = ["PetsirdCylinder", "PetsirdEvents", "read_petsird_header", "iter_petsird_events",
           "write_petsird_cylinder", "petsird_tof_positions"]


def _petsird():
    try:
        import petsird  # noqa: F401
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise UnsupportedDataError("petsird", "the 'petsird' package is needed to read PETSIRD files "
                                   "(pip install petsird)") from exc
    return petsird


def _mat44(t) -> np.ndarray:
    return np.vstack([np.asarray(t.matrix, dtype=np.float64), [0.0, 0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class PetsirdCylinder:
    """Detecting elements of one PETSIRD module type as ``(ring, crystal)`` of a cylindrical scanner.

    Attributes
    ----------
    ring, crystal : ndarray
        Per element (``module * elements_per_module + element``).
    num_energy_bins : int
    scanner : Scanner
        The matching preset when the model name is one (e.g. ``Siemens mMR``), else a scanner built from the
        geometry (effective radius at the crystal centres, ring spacing from the ``z`` of the rings).
    """

    ring: np.ndarray
    crystal: np.ndarray
    num_energy_bins: int
    scanner: Scanner
    module_type: int = 0

    @classmethod
    def from_scanner_information(cls, info, path: str | os.PathLike = "<petsird>", module_type: int = 0
                                 ) -> "PetsirdCylinder":
        """Build the element map; raises :class:`UnsupportedDataError` unless the modules form one layer of
        equally spaced crystals on complete rings."""
        geo = info.scanner_geometry
        if module_type >= len(geo.replicated_modules):
            raise UnsupportedDataError(path, f"no module type {module_type}", key="scanner_geometry")
        rep = geo.replicated_modules[module_type]
        det = rep.object.detecting_elements
        corners = np.array([c.c for c in det.object.shape.corners], dtype=np.float64)
        centre = np.append(corners.mean(axis=0), 1.0)
        el = np.stack([_mat44(t) @ centre for t in det.transforms])  # element centres in module frame
        pts = np.concatenate([(_mat44(t) @ el.T).T for t in rep.transforms])[:, :3]  # module-major
        r = np.hypot(pts[:, 0], pts[:, 1])
        rmean = float(r.mean())
        if r.max() - r.min() > 1e-3 * rmean + 1e-3:
            raise UnsupportedDataError(path, f"module type {module_type}: detecting elements at radii "
                                       f"{r.min():.2f}..{r.max():.2f} mm (several layers or not a cylinder); only "
                                       "a single layer of crystals on a cylinder is supported",
                                       key="scanner_geometry.replicated_modules")
        z = pts[:, 2]
        zu = np.unique(np.round(z, 3))
        ring = np.searchsorted(zu, np.round(z, 3))
        nr = zu.size
        n = pts.shape[0] // nr
        if n * nr != pts.shape[0] or n < 4 or n % 2:
            raise UnsupportedDataError(path, f"module type {module_type}: {pts.shape[0]} elements on {nr} "
                                       "rings is not a full cylinder with an even number of crystals per ring",
                                       key="scanner_geometry.replicated_modules")
        step = 2 * math.pi / n
        psi = np.arctan2(pts[:, 1], pts[:, 0])
        k = (psi - psi[0]) / step
        crystal = np.rint(k).astype(np.int64) % n
        if np.abs(k - np.rint(k)).max() > 0.05:
            raise UnsupportedDataError(path, f"module type {module_type}: crystals are not equally spaced by "
                                       f"2 pi / {n} around the axis (incomplete rings?)",
                                       key="scanner_geometry.replicated_modules")
        if np.unique(ring * n + crystal).size != pts.shape[0]:
            raise UnsupportedDataError(path, f"module type {module_type}: elements do not map one-to-one onto "
                                       f"{nr} rings x {n} crystals", key="scanner_geometry.replicated_modules")
        nen = info.event_energy_bin_edges[module_type].number_of_bins()
        try:
            sc = get_scanner(info.model_name)
        except KeyError:
            sc = None
        if sc is None or sc.num_rings != nr or sc.detectors_per_ring != n:  # not (exactly) a known preset
            spacing = float(np.median(np.diff(zu))) if nr > 1 else 4.0
            depth = float(np.ptp(corners[:, 0]))
            sc = Scanner(name=info.model_name or "PETSIRD cylinder", num_rings=int(nr), detectors_per_ring=int(n),
                         inner_ring_radius_mm=round(rmean - depth / 2, 4), average_doi_mm=round(depth / 2, 4),
                         ring_spacing_mm=round(spacing, 4), default_bin_size_mm=round(rmean * step / 2, 4),
                         max_num_non_arc_corrected_bins=int(n // 2))
        return cls(ring.astype(np.int64), crystal, int(nen), sc, module_type)

    def detectors(self, detection_bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ring, crystal)`` of PETSIRD detection bins (energy index dropped)."""
        e = np.asarray(detection_bins, dtype=np.int64) // self.num_energy_bins
        if e.size and (e.min() < 0 or e.max() >= self.ring.size):
            raise InputFileError("petsird", f"detection bin outside the {self.ring.size * self.num_energy_bins} "
                                 "bins of the scanner", key="detection_bins")
        return self.ring[e], self.crystal[e]


@dataclass
class PetsirdEvents:
    """Coincidences of one time block and module-type pair: detection bins ``(n, 2)``, TOF indices."""

    start_ms: int
    stop_ms: int
    prompts: np.ndarray
    prompt_tof: np.ndarray
    delayeds: np.ndarray
    delayed_tof: np.ndarray


def petsird_tof_positions(info, scanner: Scanner, path: str | os.PathLike = "<petsird>", module_type: int = 0
                          ) -> np.ndarray:
    """Unmashed STIR TOF position ``u`` (``-(n-1)/2 .. (n-1)/2``) of each PETSIRD TOF index, as the signed
    position of the emission from the LOR's mid-point towards the *first* detection bin, in units of the
    scanner's unmashed TOF bin (``c/2 * Size of unmashed TOF time bins (ps)``).

    Raises
    ------
    GeometryMismatchError
        If the file's TOF bins are not the scanner's unmashed TOF bins (number, width, centred on 0).
    """
    from ..errors import GeometryMismatchError
    from ..geometry.sinogram import SPEED_OF_LIGHT_MM_PER_PS_DIV2

    edges = np.asarray(info.tof_bin_edges[module_type][module_type].edges, dtype=np.float64)
    n = edges.size - 1
    w = scanner.size_timing_pos_ps * SPEED_OF_LIGHT_MM_PER_PS_DIV2
    widths = np.diff(edges)
    if (not scanner.is_tof_ready or n != scanner.max_num_timing_poss
            or np.abs(widths - w).max() > 1e-3 * w + 1e-4 or abs(edges[0] + edges[-1]) > 1e-3 * w + 1e-4):
        raise GeometryMismatchError(f"{path}: PETSIRD has {n} TOF bins of {widths.mean():.4g} mm from "
                                    f"{edges[0]:.4g} mm; the TOF template needs the {scanner.name}'s "
                                    f"{scanner.max_num_timing_poss} unmashed TOF bins of {w:.4g} mm centred on 0")
    # value (t1 - t2) c/2 at bin centre i; emission offset towards the first detector = -value
    centre = (edges[:-1] + edges[1:]) / 2
    return np.rint(-centre / w).astype(np.int64)


def read_petsird_header(path: str | os.PathLike):
    """The ``petsird.Header`` of a binary PETSIRD file."""
    petsird = _petsird()
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "PETSIRD file not found")
    try:
        with petsird.BinaryPETSIRDReader(str(path), skip_completed_check=True) as reader:
            return reader.read_header()
    except Exception as exc:  # the package raises plain exceptions for a foreign or corrupt stream
        raise InputFileError(path, f"not a readable binary PETSIRD file ({type(exc).__name__}: {exc})") from None


def _as_arrays(events) -> tuple[np.ndarray, np.ndarray]:
    if not events:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    bins = np.array([e.detection_bins for e in events], dtype=np.int64).reshape(-1, 2)
    tof = np.fromiter((e.tof_idx for e in events), dtype=np.int64, count=len(events))
    return bins, tof


def iter_petsird_events(path: str | os.PathLike, module_pair: tuple[int, int] = (0, 0)
                        ) -> Iterator[PetsirdEvents]:
    """Yield the coincidences of ``module_pair`` of every event time block, in file order."""
    petsird = _petsird()
    a, b = max(module_pair), min(module_pair)
    path = Path(path)
    try:
        with petsird.BinaryPETSIRDReader(str(path), skip_completed_check=True) as reader:
            reader.read_header()
            for block in reader.read_time_blocks():
                if not isinstance(block, petsird.TimeBlock.EventTimeBlock):
                    continue
                etb = block.value
                pe = etb.prompt_events[a][b] if len(etb.prompt_events) > a and len(etb.prompt_events[a]) > b else []
                de = (etb.delayed_events[a][b] if etb.delayed_events and len(etb.delayed_events) > a
                      and len(etb.delayed_events[a]) > b else [])
                p, pt = _as_arrays(pe)
                d, dt = _as_arrays(de)
                yield PetsirdEvents(int(etb.time_interval.start), int(etb.time_interval.stop), p, pt, d, dt)
    except (EOFError, ValueError, OSError) as exc:
        raise InputFileError(path, f"PETSIRD stream ended or is corrupt ({type(exc).__name__}: {exc})") from None


def write_petsird_cylinder(path: str | os.PathLike, scanner: Scanner, blocks: list[tuple[int, int, np.ndarray,
                           np.ndarray]], overwrite: bool = False, tof: bool = False) -> Path:
    """Write a PETSIRD file for a cylinder of ``scanner.num_rings x detectors_per_ring`` crystals.

    One module type: ``detectors_per_ring`` modules (module ``k`` rotated by ``2 pi k / N``), each a column of
    ``num_rings`` crystals (element ``j`` = ring ``j``); one energy bin; one TOF bin, or with ``tof`` the
    scanner's unmashed TOF bins.  ``blocks`` are ``(start_ms, stop_ms, prompts, delayeds)`` with ``(n, 4)``
    arrays of ``(ring1, crystal1, ring2, crystal2)``, or with ``tof`` ``(n, 5)`` arrays whose last column is the
    unmashed TOF position ``u`` of the emission towards detector 1 (units of the unmashed TOF bin width).
    Written under a temporary name, then renamed.
    """
    petsird = _petsird()
    from petsird.helpers.create import initialize_scanner_information_dimensions

    from ..utils.provenance import check_output

    path = Path(path)
    check_output(path, overwrite)
    nr, n = scanner.num_rings, scanner.detectors_per_ring
    depth = max(2 * scanner.average_doi_mm, 1.0)
    w, h = 2 * math.pi * scanner.effective_radius_mm / n * 0.9, scanner.ring_spacing_mm * 0.9
    cs = [(0, -w / 2, -h / 2), (0, -w / 2, h / 2), (0, w / 2, h / 2), (0, w / 2, -h / 2),
          (depth, -w / 2, -h / 2), (depth, -w / 2, h / 2), (depth, w / 2, h / 2), (depth, w / 2, -h / 2)]
    box = petsird.BoxSolidVolume(shape=petsird.BoxShape(corners=[petsird.Coordinate(c=np.array(c, np.float32))
                                                                 for c in cs]), material_id=1)
    r0 = scanner.effective_radius_mm - depth / 2
    elements = petsird.ReplicatedBoxSolidVolume(object=box)
    for j in range(nr):
        zj = (j - (nr - 1) / 2) * scanner.ring_spacing_mm
        elements.transforms.append(petsird.RigidTransformation(matrix=np.array(
            ((1, 0, 0, r0), (0, 1, 0, 0), (0, 0, 1, zj)), dtype=np.float32)))
    rep = petsird.ReplicatedDetectorModule(object=petsird.DetectorModule(detecting_elements=elements))
    for k in range(n):
        c, s = math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)
        rep.transforms.append(petsird.RigidTransformation(matrix=np.array(
            ((c, -s, 0, 0), (s, c, 0, 0), (0, 0, 1, 0)), dtype=np.float32)))
    info = petsird.ScannerInformation(model_name=scanner.name,
                                      scanner_geometry=petsird.ScannerGeometry(replicated_modules=[rep]))
    initialize_scanner_information_dimensions(info, 1, allocate_detection_bin_efficiencies=False,
                                              allocate_module_pair_efficiencies=False)
    span = 2 * scanner.effective_radius_mm
    if tof:
        from ..geometry.sinogram import SPEED_OF_LIGHT_MM_PER_PS_DIV2
        ntof = scanner.max_num_timing_poss
        wt = scanner.size_timing_pos_ps * SPEED_OF_LIGHT_MM_PER_PS_DIV2
        info.tof_bin_edges[0][0] = petsird.BinEdges(edges=((np.arange(ntof + 1) - ntof / 2) * wt).astype(np.float32))
        info.tof_resolution[0][0] = scanner.timing_resolution_ps * SPEED_OF_LIGHT_MM_PER_PS_DIV2
    else:
        info.tof_bin_edges[0][0] = petsird.BinEdges(edges=np.array([-span, span], dtype=np.float32))
        info.tof_resolution[0][0] = 1e4
    info.event_energy_bin_edges[0] = petsird.BinEdges(edges=np.array([430.0, 610.0], dtype=np.float32))
    info.energy_resolution_at_511[0] = 0.145

    def events(arr: np.ndarray) -> list:
        arr = np.asarray(arr, dtype=np.int64).reshape(-1, 5 if tof else 4)
        b1 = arr[:, 1] * nr + arr[:, 0]
        b2 = arr[:, 3] * nr + arr[:, 2]
        hi, lo = np.maximum(b1, b2), np.minimum(b1, b2)  # PETSIRD: detection_bins[0] >= detection_bins[1]
        if tof:  # index of (t1 - t2) c/2 = -u w for the stored first detector (u flips with the order)
            u = np.where(b1 >= b2, arr[:, 4], -arr[:, 4])
            idx = (scanner.max_num_timing_poss - 1) // 2 - u
        else:
            idx = np.zeros(len(arr), np.int64)
        return [petsird.CoincidenceEvent(detection_bins=[int(x), int(y)], tof_idx=int(k))
                for x, y, k in zip(hi, lo, idx)]

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with petsird.BinaryPETSIRDWriter(str(tmp)) as writer:
            writer.write_header(petsird.Header(scanner=info))
            writer.write_time_blocks(
                petsird.TimeBlock.EventTimeBlock(petsird.EventTimeBlock(
                    time_interval=petsird.TimeInterval(start=int(t0), stop=int(t1)),
                    prompt_events=[[events(p)]], delayed_events=[[events(d)]]))
                for (t0, t1, p, d) in blocks)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
