"""Cylindrical PET scanner description, mirroring STIR's ``stir::Scanner``.

The presets are the numbers of STIR's ``src/buildblock/Scanner.cxx`` (``Scanner::Scanner(Type)``,
``set_params(...)`` calls; UCL/STIR on GitHub).  STIR's argument order there is: rings,
max. non-arc-corrected bins, default arc-corrected bins, detectors per ring, inner ring radius (mm),
average depth of interaction (mm), ring spacing (mm), default bin size (mm), intrinsic tilt (rad),
axial blocks per bucket, transaxial blocks per bucket, axial crystals per block, transaxial crystals
per block, axial / transaxial crystals per singles unit, detector layers, energy resolution,
reference energy.

The effective ring radius used by every geometric formula is ``inner radius + average DOI``
(``Scanner::get_effective_ring_radius``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace

from ..errors import GeometryError, UnknownScannerError

__all__ = ["Scanner", "get_scanner", "scanner_names"]

# Optional STIR "Scanner parameters" keys that do not affect the geometry but are kept for writing.
_OPTIONAL_KEYS: dict[str, str] = {
    "energy_resolution": "Energy resolution",
    "reference_energy_kev": "Reference energy (in keV)",
    "num_transaxial_blocks_per_bucket": "Number of blocks per bucket in transaxial direction",
    "num_axial_blocks_per_bucket": "Number of blocks per bucket in axial direction",
    "num_axial_crystals_per_block": "Number of crystals per block in axial direction",
    "num_transaxial_crystals_per_block": "Number of crystals per block in transaxial direction",
    "num_detector_layers": "Number of detector layers",
    "num_axial_crystals_per_singles_unit": "Number of crystals per singles unit in axial direction",
    "num_transaxial_crystals_per_singles_unit": "Number of crystals per singles unit in transaxial direction",
}
_INT_OPTIONAL = {k for k in _OPTIONAL_KEYS if k.startswith("num_")}


@dataclass(frozen=True)
class Scanner:
    """A cylindrical PET scanner (STIR ``Scanner``), lengths in mm and angles in degrees.

    Parameters
    ----------
    name : str
        STIR scanner name (the first of STIR's names for a preset), e.g. ``"Siemens mMR"``.
    num_rings, detectors_per_ring : int
    inner_ring_radius_mm, average_doi_mm : float
        STIR's inner ring radius and average depth of interaction; their sum is the effective radius.
    ring_spacing_mm, default_bin_size_mm : float
    view_offset_deg : float
        STIR's intrinsic azimuthal tilt ("View offset (degrees)").
    max_num_non_arc_corrected_bins, default_num_arc_corrected_bins : int
    extra : dict
        Optional block / crystal / energy keys (see ``_OPTIONAL_KEYS``), written back unchanged.
    max_num_timing_poss : int
        STIR's "Maximum number of (unmashed) TOF time bins" (0: not a TOF scanner).
    size_timing_pos_ps : float
        STIR's "Size of unmashed TOF time bins (ps)".
    timing_resolution_ps : float
        STIR's "TOF timing resolution (ps)" (FWHM of the coincidence timing response).
    """

    name: str
    num_rings: int
    detectors_per_ring: int
    inner_ring_radius_mm: float
    average_doi_mm: float
    ring_spacing_mm: float
    default_bin_size_mm: float
    view_offset_deg: float = 0.0
    max_num_non_arc_corrected_bins: int = 0
    default_num_arc_corrected_bins: int = 0
    extra: dict = field(default_factory=dict, compare=False)
    max_num_timing_poss: int = 0
    size_timing_pos_ps: float = 0.0
    timing_resolution_ps: float = 0.0

    def __post_init__(self):
        """Raises :class:`GeometryError` for impossible parameters (rings, detectors, radius, spacing, bins)."""
        for k in ("num_rings", "detectors_per_ring", "max_num_non_arc_corrected_bins",
                  "default_num_arc_corrected_bins", "max_num_timing_poss"):
            v = getattr(self, k)
            if isinstance(v, bool) or not (isinstance(v, numbers.Integral)
                                           or (isinstance(v, numbers.Real) and float(v).is_integer())):
                raise GeometryError(f"Scanner {self.name!r}: {k} must be an integer, got {v!r}")
            object.__setattr__(self, k, int(v))
        for k in ("inner_ring_radius_mm", "average_doi_mm", "ring_spacing_mm", "default_bin_size_mm",
                  "view_offset_deg", "size_timing_pos_ps", "timing_resolution_ps"):
            try:
                object.__setattr__(self, k, float(getattr(self, k)))
            except (TypeError, ValueError):
                raise GeometryError(f"Scanner {self.name!r}: {k} must be a number, got {getattr(self, k)!r}") from None
        if not (math.isfinite(self.average_doi_mm) and math.isfinite(self.view_offset_deg)):
            raise GeometryError(f"Scanner {self.name!r}: average_doi_mm and view_offset_deg must be finite")
        if self.num_rings < 1 or self.detectors_per_ring < 2 or self.detectors_per_ring % 2:
            raise GeometryError(f"Scanner {self.name!r}: need num_rings >= 1 and an even detectors_per_ring >= 2, "
                             f"got {self.num_rings}, {self.detectors_per_ring}")
        for k in ("inner_ring_radius_mm", "ring_spacing_mm", "default_bin_size_mm"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v > 0):
                raise GeometryError(f"Scanner {self.name!r}: {k} must be positive, got {v}")
        if self.max_num_timing_poss < 0 or not (math.isfinite(self.size_timing_pos_ps)
                                                 and math.isfinite(self.timing_resolution_ps)):
            raise GeometryError(f"Scanner {self.name!r}: TOF parameters must be finite and non-negative, got "
                                f"{self.max_num_timing_poss} bins of {self.size_timing_pos_ps} ps, "
                                f"{self.timing_resolution_ps} ps resolution")
        if self.max_num_non_arc_corrected_bins <= 0:
            object.__setattr__(self, "max_num_non_arc_corrected_bins", self.detectors_per_ring // 2)
        if self.default_num_arc_corrected_bins <= 0:
            object.__setattr__(self, "default_num_arc_corrected_bins", self.max_num_non_arc_corrected_bins)

    # ------------------------------------------------------------------ derived
    @property
    def effective_radius_mm(self) -> float:
        """Inner ring radius + average depth of interaction (STIR ``get_effective_ring_radius``)."""
        return float(self.inner_ring_radius_mm + self.average_doi_mm)

    @property
    def is_tof_ready(self) -> bool:
        """STIR's ``Scanner::is_tof_ready``: TOF bins, their size and the timing resolution are all known."""
        return self.max_num_timing_poss > 0 and self.size_timing_pos_ps > 0 and self.timing_resolution_ps > 0

    @property
    def view_offset_rad(self) -> float:
        return math.radians(self.view_offset_deg)

    @property
    def axial_fov_mm(self) -> float:
        return self.num_rings * self.ring_spacing_mm

    # ---------------------------------------------------------- Interfile (writing; reading: io.sinogram_header)
    def header_lines(self) -> list[str]:
        """The ``Scanner parameters :=`` block of a STIR ``.hs`` header, laid out as STIR 6.4's
        ``Scanner::parameter_info`` writes it (key names, padding; TOF keys for a TOF-ready scanner)."""
        ex = self.extra
        lines = [
            "Scanner parameters:=",
            f"  Scanner type := {self.name}",
            f"  Number of rings                          := {self.num_rings}",
            f"  Number of detectors per ring             := {self.detectors_per_ring}",
            f"  Inner ring diameter (cm)                 := {_fmt(self.inner_ring_radius_mm * 2 / 10)}",
            f"  Average depth of interaction (cm)        := {_fmt(self.average_doi_mm / 10)}",
            f"  Distance between rings (cm)              := {_fmt(self.ring_spacing_mm / 10)}",
            f"  Default bin size (cm)                    := {_fmt(self.default_bin_size_mm / 10)}",
            f"  View offset (degrees)                    := {_fmt(self.view_offset_deg)}",
            f"  Maximum number of non-arc-corrected bins := {self.max_num_non_arc_corrected_bins}",
            f"  Default number of arc-corrected bins     := {self.default_num_arc_corrected_bins}",
        ]
        if ex.get("energy_resolution") is not None:
            lines.append(f"  Energy resolution         := {_fmt(ex['energy_resolution'])}")
        if ex.get("reference_energy_kev") is not None:
            lines.append(f"  Reference energy (in keV) := {_fmt(ex['reference_energy_kev'])}")
        if self.is_tof_ready:
            lines += [f"  Maximum number of (unmashed) TOF time bins := {self.max_num_timing_poss}",
                      f"  Size of unmashed TOF time bins (ps)        := {_fmt6(self.size_timing_pos_ps)}",
                      f"  TOF timing resolution (ps)                 := {_fmt6(self.timing_resolution_ps)}"]
        for attr, key in _OPTIONAL_KEYS.items():
            if attr in ("energy_resolution", "reference_energy_kev"):
                continue
            if attr in ex and ex[attr] is not None:
                v = ex[attr]
                lines.append(f"  {key:<59} := {v if attr in _INT_OPTIONAL else _fmt(v)}")
        lines.append("  Scanner geometry (BlocksOnCylindrical/Cylindrical/Generic)  := Cylindrical")
        lines.append("End scanner parameters:=")
        return lines

    def with_rings(self, num_rings: int) -> "Scanner":
        """Same scanner with another number of rings (for small test geometries)."""
        return replace(self, num_rings=int(num_rings))


def _fmt(v: float) -> str:
    return f"{float(v):.8g}"


def _fmt6(v: float) -> str:
    """A number as C++'s default ``ostream <<`` prints it (6 significant digits), as STIR writes TOF keys."""
    return f"{float(v):.6g}"


# ---------------------------------------------------------------------- presets
# Numbers from STIR src/buildblock/Scanner.cxx (UCL/STIR), converted to mm / degrees.
def _p(name, rings, non_arc, arc, dets, inner, doi, spacing, binsize, tilt_deg, tof=(0, 0.0, 0.0),
       **extra) -> Scanner:
    return Scanner(name, rings, dets, inner, doi, spacing, binsize, tilt_deg, non_arc, arc, extra, *tof)


_PRESETS: list[tuple[tuple[str, ...], Scanner]] = [
    # case Siemens_mMR: set_params(64, 344, 2*252, 328.0, 7.0, 4.0625, 2.08626, 0.0, 2, 1, 8, 9, 16, 9, 1, 0.145, 511)
    (("Siemens mMR", "mMR", "2008"),
     _p("Siemens mMR", 64, 344, 344, 504, 328.0, 7.0, 4.0625, 2.08626, 0.0,
        num_axial_blocks_per_bucket=2, num_transaxial_blocks_per_bucket=1, num_axial_crystals_per_block=8,
        num_transaxial_crystals_per_block=9, num_axial_crystals_per_singles_unit=16,
        num_transaxial_crystals_per_singles_unit=9, num_detector_layers=1, energy_resolution=0.145,
        reference_energy_kev=511.0)),
    # case Siemens_mCT: set_params(55, 400, (13+1)*48, 421.0, 7.0, 4.054, 2.005, 0.0, 4, 1, 14, 14, 0, 0, 1,
    #                              0, 511, TOF: 13 bins of 4.056 * 1000 / 13 ps, 555 ps)   (STIR 6.4)
    (("Siemens mCT", "mCT", "2011", "1104", "1094"),
     _p("Siemens mCT", 55, 400, 400, 672, 421.0, 7.0, 4.054, 2.005, 0.0, tof=(13, 4.056 * 1000 / 13, 555.0),
        num_axial_blocks_per_bucket=4, num_transaxial_blocks_per_bucket=1, num_axial_crystals_per_block=14,
        num_transaxial_crystals_per_block=14, num_detector_layers=1)),
    # case Siemens_Vision_600 (STIR >= 5): 80 rings, 520 bins, 760 detectors, 410.0 + 7.0 mm, 3.29114 mm rings,
    # 1.6470 mm bins, no tilt.  Block keys are not reproduced here.  TOF (STIR 6.4): 33 * 8 unmashed positions of
    # 143.231 / 8 ps (Siemens' 33 bins are TOF mashing 8), 214 ps resolution.
    (("Siemens Vision 600", "Biograph Vision 600", "Vision600", "Vision 600", "Siemens VISION 600", "2007"),
     _p("Siemens Vision 600", 80, 520, 520, 760, 410.0, 7.0, 3.29114, 1.6470, 0.0,
        tof=(33 * 8, 143.231 / 8, 214.0))),
    # case Discovery690: set_params(24, 381, 331, 2*288, 405.1, 9.4, 6.54, 2.1306, -5.021 deg, 4, 2, 6, 9, 1, 1, 1,
    #                               0, 511, TOF: 55 bins of 89 ps, 550 ps)
    (("GE Discovery 690", "Discovery 690", "GE Discovery 710", "Discovery 710"),
     _p("GE Discovery 690", 24, 381, 331, 576, 405.1, 9.4, 6.54, 2.1306, -5.021, tof=(55, 89.0, 550.0),
        num_axial_blocks_per_bucket=4, num_transaxial_blocks_per_bucket=2, num_axial_crystals_per_block=6,
        num_transaxial_crystals_per_block=9, num_axial_crystals_per_singles_unit=1,
        num_transaxial_crystals_per_singles_unit=1, num_detector_layers=1, energy_resolution=0.0,
        reference_energy_kev=511.0)),
    # case DiscoveryMI4ring: set_params(36, 415, 401, 2*272, 380.5-9.4, 9.4, 5.52296, 2.206, -4.399 deg,
    #                                   4, 4, 9, 4, 1, 1, 1, 0.0944, 511, TOF: 2*188+1 bins of 13 ps, 375.4 ps)
    (("GE Discovery MI 4 rings", "Discovery MI4", "Discovery MI", "DMI", "GE Discovery MI"),
     _p("GE Discovery MI 4 rings", 36, 415, 401, 544, 380.5 - 9.4, 9.4, 5.52296, 2.206, -4.399,
        tof=(2 * 188 + 1, 13.0, 375.4),
        num_axial_blocks_per_bucket=4, num_transaxial_blocks_per_bucket=4, num_axial_crystals_per_block=9,
        num_transaxial_crystals_per_block=4, num_axial_crystals_per_singles_unit=1,
        num_transaxial_crystals_per_singles_unit=1, num_detector_layers=1, energy_resolution=0.0944,
        reference_energy_kev=511.0)),
    # case DiscoveryMI3ring: as the 4-ring DMI with 27 rings and 3 axial blocks per bucket
    (("GE Discovery MI 3 rings", "Discovery MI3"),
     _p("GE Discovery MI 3 rings", 27, 415, 401, 544, 380.5 - 9.4, 9.4, 5.52296, 2.206, -4.399,
        tof=(2 * 188 + 1, 13.0, 375.4),
        num_axial_blocks_per_bucket=3, num_transaxial_blocks_per_bucket=4, num_axial_crystals_per_block=9,
        num_transaxial_crystals_per_block=4, num_axial_crystals_per_singles_unit=1,
        num_transaxial_crystals_per_singles_unit=1, num_detector_layers=1, energy_resolution=0.0944,
        reference_energy_kev=511.0)),
]


def _norm(name: str) -> str:
    # STIR's standardise_interfile_keyword: case-insensitive, white space and '_' / '-' ignored
    return "".join(ch for ch in name.lower() if ch.isalnum())


def scanner_names() -> list[str]:
    """Canonical names of the built-in presets."""
    return [sc.name for _, sc in _PRESETS]


def get_scanner(name: str) -> Scanner:
    """Preset by (case-insensitive) name or alias.

    Raises
    ------
    UnknownScannerError
        (a :class:`ConfigError` and a ``KeyError``) listing the known names.
    """
    key = _norm(name)
    for aliases, sc in _PRESETS:
        if key in {_norm(a) for a in aliases}:
            return replace(sc, extra=dict(sc.extra))
    known = "; ".join(f"{sc.name} (aliases: {', '.join(a for a in aliases if a != sc.name)})"
                      for aliases, sc in _PRESETS)
    raise UnknownScannerError(f"unknown scanner {name!r}; known scanners: {known}")
