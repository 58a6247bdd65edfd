"""Simulated low-dose brain PET studies in the PETRIC folder layout (STIR Interfile).

Model (the same as STIR/SIRF's and the one every reconstructor here assumes)::

    prompts ~ Poisson( m ⊙ (A x + a) )

with ``x`` the true activity (kBq/mL, ``truth.hv``), ``A`` the geometric projector of
:class:`sirf_ddip.physics.projector.Projector`, ``m`` = ``mult_factors.hs`` and ``a`` = ``additive_term.hs``.
The Poisson mean is computed from exactly the float32 arrays that are written, so OSEM on the written files is
consistent with the data (``case.json`` keeps the mean's total).

- ``m = c · ε · exp(−∫μ)``: attenuation factors from the phantom's μ-map (water 0.096 cm⁻¹, bone 0.15 cm⁻¹,
  forward projected; the μ-map is taken :func:`attenuation_padding` planes beyond the simulated slab on each
  side, because the 1-ring-spacing tube of an edge direct sinogram reaches half a ring beyond the image: with
  the slab alone those sinograms saw only 3/4 of the head's μ and too little attenuation), detector efficiencies ``ε`` (:func:`detector_efficiencies`: per-crystal lognormal
  efficiencies with a block profile, multiplied per crystal pair as STIR maps bins to detector pairs, times a
  smooth tangential geometric factor; mean ≈ 1), and the count-scale calibration ``c``.
- ``a = (randoms + scatter) / m``. Randoms are ∝ ε (singles products) with a mild smooth modulation, a
  ``randoms_fraction`` of the prompts; scatter (``scatter_model``) is STIR's single scatter simulation of the truth
  in the μ-map (``sss``: :mod:`sirf_ddip.sim.scatter_model`, on STIR's down-sampled scanner, up-sampled as STIR's
  scatter estimation does) or the attenuated projection blurred heavily (``smooth``: σ ≈ 40 mm tangentially, a few
  views and planes), ∝ ε, and scaled to a NEMA-style ``scatter_fraction`` S / (T + S). ``auto`` (the default) is
  ``sss`` for non-TOF data of a scanner with an energy resolution and a known energy window, else ``smooth``.

Count level
-----------
100 % dose is :attr:`SimulationConfig.reference_prompts` prompts for the *whole* scanner (default 2·10⁸: a
10-min [18F]FDG brain scan on the Siemens mMR, 370 MBq, ~45 min p.i.: ~20 MBq in the head × ~15 cps/kBq
sensitivity × ~0.3 head attenuation ≈ 10⁵ trues/s → ~6·10⁷ trues, with 35 % scatter fraction and ~40 %
randoms ≈ 1.5-2·10⁸ prompts). A smaller simulated axial extent sees the part of those counts that its ring
pairs see: the reference total is scaled by ``F_sim / F_full``, ``F = Σ_ring pairs cos³θ · (activity in the
plane the pair crosses)``, computed from the same subject's whole head (89 planes) centred in the full scanner
(max ring difference 60 for the mMR, as in clinical data). ``dose_fraction`` scales the counts at fixed activity
(equivalent to a shorter frame); the truth stays in full-dose kBq/mL, ``m`` carries the count scale.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from ..data import Image, ProjData
from ..errors import ConfigError, GeometryMismatchError, OutputExistsError, OutputPathError
from ..geometry.image import ImageGrid
from . import phantoms as ph

__all__ = ["SimulationConfig", "SimulatedData", "simulate_study", "simulate_data", "detector_efficiencies",
           "build_geometry", "axial_count_fraction", "ring_pairs_per_sinogram", "attenuation_padding",
           "padded_grid", "resolve_scatter_model", "STUDY_FILES", "SCATTER_MODELS"]

#: Values of :attr:`SimulationConfig.scatter_model`.
SCATTER_MODELS = ("auto", "sss", "smooth")

#: Files written by :func:`simulate_study` (besides ``run_record.json`` / ``run_record_config.yaml``).
STUDY_FILES = ("prompts.hs", "mult_factors.hs", "additive_term.hs", "truth.hv", "mr.hv", "truth.nii.gz",
               "mr.nii.gz", "mu_map.hv", "mask_brain.hv", "mask_gm.hv", "mask_wm.hv", "mask_lesion.hv",
               "case.json")


@dataclass
class SimulationConfig:
    """Parameters of one simulated study (YAML-loadable with :func:`sirf_ddip.config.load_config`).

    Attributes
    ----------
    tracer : a key of :data:`sirf_ddip.sim.phantoms.TRACERS`
    dose_fraction : counts relative to the 100 % reference (0 < f)
    seed, split, pose, deform, lesions, rim : the subject (see :func:`sirf_ddip.sim.phantoms.make_subject`)
    lesion_kinds : list of "hot"/"cold" to draw lesions from instead of the tracer's (None: the tracer's), e.g.
        ``[hot, cold]`` for cold lesions in FDG; the rest of the subject is unchanged
    num_lesions : number of lesions instead of the drawn 1-3 (None: drawn)
    departures : PET departing from the MR (:mod:`sirf_ddip.sim.departures`; true: the defaults, a mapping to
        override them, e.g. ``{hypometabolism: 1.0, patterns: [ad], num_lesions: [0, 0]}``); lesion centres lie in
        the simulated planes
    noise_seed : seed of efficiencies and Poisson noise (default: derived from ``seed``)
    scanner : a preset of :func:`sirf_ddip.geometry.scanner.get_scanner`
    num_rings : simulated rings (None: the whole scanner); the slab is centred on the head + ``axial_offset_mm``
    span, max_ring_diff, view_mashing, num_tangential : projection-data geometry (STIR semantics)
    tof_mash_factor : 0 (default) for non-TOF data; ``f >= 1`` simulates TOF data with the scanner's unmashed TOF
        bins mashed by ``f`` (a TOF scanner: mCT, Vision 600, Discovery 690 / MI); the multiplicative factors are
        TOF-independent and written once per LOR, the additive term per TOF bin
    image_xy : transaxial image size (voxels of the scanner's default bin size)
    reference_prompts : prompts of a 100 % dose scan with the whole scanner (see module docstring)
    reference_max_ring_diff : the whole scanner's max ring difference for that reference (None: mMR 60, else all)
    scatter_fraction : S / (T + S);  randoms_fraction : R / prompts
    scatter_model : "smooth" (default: a blurred attenuated projection), "sss" (STIR's single scatter simulation of
        the truth) or "auto" (sss where it applies, else smooth); see the module docstring. Both set only the
        scatter's *shape* (its total is ``scatter_fraction``). The default stays "smooth": the validation studies
        and the README's figures were made with it (sss costs ~5 s for the 4-ring slab, ~70 s for a whole mMR
        head at span 11, on the shared 2-core CPU at load 15-19).
    efficiency_sd : SD of per-crystal efficiencies
    template_cache : ``.npz`` of the MNI templates (None: nilearn)
    device : projector device (None/"auto": CUDA if available)
    write_nifti : also write ``truth.nii.gz`` and ``mr.nii.gz``
    """

    tracer: str = "fdg"
    dose_fraction: float = 0.25
    seed: int = 0
    split: str = "test"
    pose: str | None = None
    deform: bool = True
    lesions: bool | None = True
    lesion_kinds: list | None = None
    num_lesions: int | None = None
    departures: dict | bool | None = None
    rim: bool = True
    axial_offset_mm: float = 0.0
    noise_seed: int | None = None
    scanner: str = "Siemens mMR"
    num_rings: int | None = 4
    span: int = 1
    max_ring_diff: int | None = 3
    view_mashing: int = 1
    num_tangential: int | None = None
    tof_mash_factor: int = 0
    image_xy: int = 128
    reference_prompts: float = 2.0e8
    reference_max_ring_diff: int | None = None
    scatter_fraction: float = 0.35
    scatter_model: str = "smooth"
    randoms_fraction: float = 0.3
    efficiency_sd: float = 0.08
    template_cache: str | None = None
    device: str | None = None
    write_nifti: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key of an impossible value."""
        if self.tracer not in ph.TRACERS:
            raise ConfigError(f"simulation: key 'tracer' must be one of {', '.join(ph.TRACERS)}, got {self.tracer!r}")
        if not (self.dose_fraction > 0 and math.isfinite(self.dose_fraction)):
            raise ConfigError(f"simulation: key 'dose_fraction' must be > 0, got {self.dose_fraction}")
        if not 0 <= self.scatter_fraction < 1:
            raise ConfigError(f"simulation: key 'scatter_fraction' must be in [0, 1), got {self.scatter_fraction}")
        if self.scatter_model not in SCATTER_MODELS:
            raise ConfigError(f"simulation: key 'scatter_model' must be one of {', '.join(SCATTER_MODELS)}, got "
                              f"{self.scatter_model!r}")
        if not 0 <= self.randoms_fraction < 1:
            raise ConfigError(f"simulation: key 'randoms_fraction' must be in [0, 1), got {self.randoms_fraction}")
        if self.reference_prompts <= 0:
            raise ConfigError(f"simulation: key 'reference_prompts' must be > 0, got {self.reference_prompts}")
        if self.efficiency_sd < 0:
            raise ConfigError(f"simulation: key 'efficiency_sd' must be >= 0, got {self.efficiency_sd}")
        if self.split not in ph.SPLITS:
            raise ConfigError(f"simulation: key 'split' must be one of {sorted(ph.SPLITS)}, got {self.split!r}")
        if self.pose is not None and self.pose not in ph.POSES:
            raise ConfigError(f"simulation: key 'pose' must be one of {sorted(ph.POSES)}, got {self.pose!r}")
        if self.lesion_kinds is not None:
            kinds = self.lesion_kinds
            if isinstance(kinds, str) or not kinds or any(k not in ("hot", "cold") for k in kinds):
                raise ConfigError("simulation: key 'lesion_kinds' must be a non-empty list of 'hot'/'cold', "
                                  f"got {kinds!r}")
        if self.departures not in (None, True, False) and not isinstance(self.departures, dict):
            raise ConfigError(f"simulation: key 'departures' must be true/false/null or a mapping, got "
                              f"{self.departures!r}")
        if isinstance(self.departures, dict):
            from .departures import resolve_spec

            try:
                resolve_spec(self.departures)
            except ValueError as exc:
                raise ConfigError(f"simulation: key 'departures': {exc}") from None
        if self.num_lesions is not None and not (isinstance(self.num_lesions, int) and 1 <= self.num_lesions <= 8):
            raise ConfigError(f"simulation: key 'num_lesions' must be an integer in 1..8 or null, got {self.num_lesions!r}")
        if (self.lesion_kinds is not None or self.num_lesions is not None) and self.lesions is False:
            raise ConfigError("simulation: keys 'lesion_kinds'/'num_lesions' need 'lesions' true or null, got false")
        for key in ("seed", "noise_seed"):
            v = getattr(self, key)
            if v is not None and not 0 <= v < 2 ** 63:
                raise ConfigError(f"simulation: key '{key}' must be an integer >= 0, got {v}")
        if not self.image_xy >= 8:
            raise ConfigError(f"simulation: key 'image_xy' must be >= 8 voxels, got {self.image_xy}")
        if not math.isfinite(self.axial_offset_mm):
            raise ConfigError(f"simulation: key 'axial_offset_mm' must be a finite number, got {self.axial_offset_mm}")
        if not (math.isfinite(self.reference_prompts) and math.isfinite(self.efficiency_sd)):
            raise ConfigError("simulation: keys 'reference_prompts' and 'efficiency_sd' must be finite numbers")


@dataclass
class SimulatedData:
    """Arrays of one simulation (memory layout ``[sinogram, view, tangential]``, float32)."""

    prompts: np.ndarray
    mult: np.ndarray
    additive: np.ndarray
    expected: np.ndarray  # m (A x + a), float64
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- geometry
def build_geometry(cfg: SimulationConfig):
    """The :class:`~sirf_ddip.geometry.sinogram.SinogramGeometry` of ``cfg`` (a ``num_rings`` slab of the scanner)."""
    from ..geometry.scanner import get_scanner
    from ..geometry.sinogram import SinogramGeometry

    try:
        sc = get_scanner(cfg.scanner)
    except KeyError as exc:
        raise ConfigError(f"simulation: key 'scanner': {exc.args[0]}") from None
    if cfg.num_rings is not None:
        if not 1 <= cfg.num_rings <= sc.num_rings:
            raise ConfigError(f"simulation: key 'num_rings' must be in 1..{sc.num_rings}, got {cfg.num_rings}")
        sc = sc.with_rings(cfg.num_rings)
    keys = dict(span=cfg.span, max_ring_diff=cfg.max_ring_diff, view_mashing=cfg.view_mashing,
                num_tangential=cfg.num_tangential)
    try:
        geometry = SinogramGeometry(sc, **keys)
    except ValueError as exc:
        raise ConfigError(f"simulation: geometry keys (span, max_ring_diff, view_mashing, num_tangential, "
                          f"tof_mash_factor): {exc}") from None
    if not cfg.tof_mash_factor:
        return geometry
    try:  # the same geometry is valid without TOF: what the scanner refuses is its TOF mashing factor
        return SinogramGeometry(sc, **keys, tof_mash_factor=cfg.tof_mash_factor)
    except ValueError as exc:
        raise ConfigError(f"simulation: key 'tof_mash_factor' ({cfg.tof_mash_factor}): {exc}") from None


def ring_pairs_per_sinogram(geometry) -> list[list[tuple[int, int]]]:
    """Ring pairs ``(ring1, ring2)`` (``ring2 − ring1`` = the segment's ring difference) of each sinogram, memory order."""
    n = geometry.scanner.num_rings
    out: list[list[tuple[int, int]]] = []
    for k in geometry.segment_sequence:
        sg = geometry.segment(k)
        by_sum: dict[int, list[tuple[int, int]]] = {}
        for d in range(sg.min_ring_diff, sg.max_ring_diff + 1):
            for r1 in range(max(0, -d), min(n, n - d)):
                by_sum.setdefault(2 * r1 + d, []).append((r1, r1 + d))
        sums = sorted(by_sum)
        if len(sums) != sg.num_axial:
            raise ValueError(f"segment {k}: {len(sums)} ring-pair planes but {sg.num_axial} axial positions")
        out.extend(by_sum[s] for s in sums)
    return out


def detector_efficiencies(geometry, rng: np.random.Generator, sd: float = 0.08) -> np.ndarray:
    """Normalisation-like LOR efficiencies ``[sinogram, view, tangential]`` (float64, mean ≈ 1).

    Per crystal ``(ring, detector)``: lognormal (``sd``) × a block profile (edge crystals ~12 % lower,
    transaxially and axially). A bin's efficiency is the mean over its detector pairs (STIR's mapping
    ``det1 = v + t>>1``, ``det2 = v − (t+1)>>1 + N/2`` for uncompressed view ``v`` and tangential position ``t``,
    over mashed views and combined ring pairs) of ``ε(ring1, det1) ε(ring2, det2)``, times a smooth tangential
    geometric factor ``1 − 0.1 (t / t_max)²``.
    """
    sc = geometry.scanner
    nd, nr = sc.detectors_per_ring, sc.num_rings
    extra = getattr(sc, "extra", {}) or {}
    ct = int(extra.get("num_transaxial_crystals_per_block", 8) or 8)
    ca = int(extra.get("num_axial_crystals_per_block", 8) or 8)

    def profile(n: int, per_block: int) -> np.ndarray:
        k = np.arange(n) % per_block
        c = (per_block - 1) / 2.0
        return 1.0 - 0.12 * ((k - c) / max(c, 1.0)) ** 2

    eps = np.exp(rng.standard_normal((nr, nd)) * sd) * profile(nd, ct)[None, :] * profile(nr, ca)[:, None]
    t = geometry.tangential_positions()
    mash = geometry.view_mashing if geometry.num_views * geometry.view_mashing * 2 == nd else 1
    pairs = ring_pairs_per_sinogram(geometry)
    r1 = np.array([a for rp in pairs for (a, _) in rp])
    r2 = np.array([b for rp in pairs for (_, b) in rp])
    starts = np.cumsum([0] + [len(rp) for rp in pairs[:-1]])
    counts = np.array([len(rp) for rp in pairs], dtype=np.float64)
    out = np.zeros(geometry.shape, dtype=np.float64)
    for v in range(geometry.num_views):
        for u in range(v * mash, (v + 1) * mash):
            d1 = (u + (t >> 1) + nd) % nd
            d2 = (u - ((t + 1) >> 1) + nd // 2) % nd
            prod = eps[r1][:, d1] * eps[r2][:, d2]  # (ring pairs, tangential)
            out[:, v] += np.add.reduceat(prod, starts, axis=0) / counts[:, None]
    out /= mash
    tmax = max(abs(t).max(), 1)
    out *= (1.0 - 0.1 * (t / tmax) ** 2)[None, None, :]
    return out / out.mean()


def axial_count_fraction(geometry, slab_profile: np.ndarray, full_profile: np.ndarray,
                         full_max_ring_diff: int | None = None) -> float:
    """``F_sim / F_full``: the part of a whole-scanner scan's counts that ``geometry``'s ring pairs see.

    Parameters
    ----------
    geometry : the simulated SinogramGeometry (``2 N − 1`` planes of half the ring spacing)
    slab_profile : activity per plane of the simulated image (``2 N − 1`` values)
    full_profile : activity per plane of the whole head on the same plane spacing (odd length, centred on the slab)
    full_max_ring_diff : maximum ring difference of the whole scanner (default: all)
    """
    from ..geometry.scanner import get_scanner

    sc = geometry.scanner
    full = get_scanner(sc.name)
    R, dz = sc.effective_radius_mm, sc.ring_spacing_mm

    def f(n_rings: int, mrd: int, profile: np.ndarray, offset: int, pairs=None) -> float:
        tot = 0.0
        if pairs is None:
            pairs = [(r1, r1 + d) for d in range(-mrd, mrd + 1) for r1 in range(max(0, -d), min(n_rings, n_rings - d))]
        for (r1, r2) in pairs:
            p = r1 + r2 - offset
            if 0 <= p < len(profile):
                cos = 1.0 / math.sqrt(1.0 + ((r2 - r1) * dz / (2 * R)) ** 2)
                tot += cos ** 3 * profile[p]
        return tot

    sim_pairs = [rp for group in ring_pairs_per_sinogram(geometry) for rp in group]
    f_sim = f(sc.num_rings, 0, np.asarray(slab_profile, dtype=float), 0, pairs=sim_pairs)
    nplanes_full = 2 * full.num_rings - 1
    if len(full_profile) % 2 != 1:
        raise ValueError("full_profile needs an odd number of planes (centred on the slab)")
    offset = (nplanes_full - len(full_profile)) // 2  # profile index = plane index - offset
    mrd = full.num_rings - 1 if full_max_ring_diff is None else int(full_max_ring_diff)
    f_full = f(full.num_rings, mrd, np.asarray(full_profile, dtype=float), offset)
    if f_full <= 0:
        raise ConfigError("simulation: no activity in the full scanner's field of view (check the keys "
                          "'axial_offset_mm' and 'num_rings')")
    return float(f_sim / f_full)


def attenuation_padding(geometry, grid: ImageGrid) -> int:
    """Planes the μ-map needs beyond ``grid`` on each side so that every LOR tube lies inside it.

    The projector (as STIR's ray tracer) gives a bin of segment ``k`` an axial tube of
    ``axial_sampling_mm`` around its ring-pair centre ``m``; for the outermost axial positions of a direct
    segment (``m`` on the first / last plane centre) the tube reaches ``sampling / 2 − v_z / 2`` mm beyond the
    image (span 1: one ring spacing wide, i.e. one plane beyond). Activity outside the slab is zero by
    construction (the truth is the slab), but the head's μ is not: without these planes the edge direct
    sinograms would see only part of the attenuating path.
    """
    vz = float(grid.voxel_size[0])
    pad = 0
    for sg in geometry.segments:
        pad = max(pad, int(math.ceil(float(sg.axial_sampling_mm) / (2.0 * vz) - 0.5 - 1e-6)))
    return pad


def padded_grid(grid: ImageGrid, pad: int) -> ImageGrid:
    """``grid`` with ``pad`` extra planes on each side, same centre (the projector centres the index centre)."""
    return ImageGrid((grid.shape[0] + 2 * int(pad),) + tuple(grid.shape[1:]), grid.voxel_size, origin=grid.origin)


# ----------------------------------------------------------------------------------------------- physics
def _smooth_sino(y: np.ndarray, geometry, sigma_tang_bins: float, sigma_views: float, sigma_axial: float) -> np.ndarray:
    out = np.empty_like(y)
    for k in geometry.segment_sequence:
        sl = geometry.segment_slice(k)
        out[sl] = ndimage.gaussian_filter(y[sl], (sigma_axial, sigma_views, sigma_tang_bins), mode="nearest")
    return out


def simulate_data(truth: np.ndarray, mu_map_per_cm: np.ndarray, geometry, forward: Callable[[np.ndarray], np.ndarray],
                  target_trues: float, rng: np.random.Generator, *, scatter_fraction: float = 0.35,
                  randoms_fraction: float = 0.3, efficiency_sd: float = 0.08,
                  brain_fraction: np.ndarray | None = None, length_unit_mm: float = 1.0,
                  mu_forward: Callable[[np.ndarray], np.ndarray] | None = None,
                  scatter_shape: np.ndarray | None = None) -> SimulatedData:
    """Prompts, mult and additive arrays for ``truth`` with ``target_trues`` expected trues (before noise).

    Parameters
    ----------
    truth : activity ``[z, y, x]`` (kBq/mL)
    mu_map_per_cm : μ-map ``[z, y, x]`` (cm⁻¹) on the same grid
    geometry : SinogramGeometry of the data (TOF or not)
    forward : ``A``: image ``[z, y, x]`` (numpy) → sinograms ``geometry.shape`` (TOF ones for a TOF geometry; line
        integrals in units of
        ``length_unit_mm``; STIR's ray tracing and the built-in projector give lengths in units of the x voxel size,
        which is why STIR scales μ-maps by ``v_x / 10`` before projecting them)
    target_trues : expected total of ``m ⊙ A x``
    rng : generator for efficiencies, randoms pattern and Poisson noise
    brain_fraction : optional ``[z, y, x]`` weights; its expected trues are reported as ``trues_brain``
    mu_forward : projector for ``mu_map_per_cm`` (same geometry and length unit, non-TOF) when the μ-map is on
        another grid than ``truth`` (e.g. :func:`padded_grid`, see :func:`attenuation_padding`), or for TOF data;
        default ``forward``
    scatter_shape : the scatter per unit efficiency on ``geometry`` (e.g. the single scatter simulation of
        :func:`sirf_ddip.sim.scatter_model.sss_scatter_shape`); it is multiplied by the efficiencies and scaled to
        ``scatter_fraction``. Default: the smooth model (the attenuated projection blurred)

    Notes
    -----
    TOF data: ``mult`` (efficiencies x attenuation) is TOF-independent, shape ``geometry.sinogram_shape``; the
    scatter is blurred within each TOF bin and the randoms are spread evenly over the TOF bins (as the STIR
    reference case ``d690_tof_2d``).
    """
    if target_trues <= 0:
        raise ConfigError(f"target trues must be > 0, got {target_trues}")
    # Memory: at full size (mMR span 11, 72.6 M bins) every float64 sinogram is 0.58 GB, so the arrays are made
    # in place and freed as soon as they are used (the same operations in the same order as the plain
    # expressions in the comments, hence the same numbers bit for bit; issue 33: 8.2 GB peak before).
    shape = tuple(geometry.shape)
    tof = bool(getattr(geometry, "is_tof", False))
    sino_shape = tuple(geometry.sinogram_shape) if tof else shape
    ax = np.array(forward(np.asarray(truth, dtype=np.float32)), dtype=np.float64)   # our own copy: made in place
    if ax.shape != shape:
        raise GeometryMismatchError(f"forward projection shape {ax.shape} != geometry shape {shape}")
    mu_fwd = forward if mu_forward is None else mu_forward
    att = np.array(mu_fwd(np.asarray(mu_map_per_cm, dtype=np.float32)), dtype=np.float64)
    if att.shape != sino_shape:
        raise GeometryMismatchError(f"μ-map forward projection shape {att.shape} != (non-TOF) geometry shape "
                                    f"{sino_shape}")
    att *= -0.1 * float(length_unit_mm)
    np.exp(att, out=att)                                   # att = exp(-0.1 L mu_proj)
    att_stats = {"mean_attenuation_factor": float(att.mean()), "min_attenuation_factor": float(att.min())}
    eff = detector_efficiencies(geometry.non_tof() if tof else geometry, rng, efficiency_sd)
    norm_att = eff * att
    c = target_trues / float((norm_att * ax).sum())
    norm_att *= c
    mult32 = norm_att.astype(np.float32)                   # (c * norm_att) in float32
    del norm_att
    mult = mult32.astype(np.float64)
    t_total = float((mult * ax).sum())                     # the expected trues
    trues_brain = None
    if brain_fraction is not None:
        trues_brain = float((mult * np.asarray(forward(np.asarray(truth * brain_fraction, dtype=np.float32)),
                                               dtype=np.float64)).sum())
    # scatter: attenuated object projection blurred heavily, detected with the efficiencies
    s_total = scatter_fraction / (1.0 - scatter_fraction) * t_total
    scatter = None
    if s_total > 0:
        bin_mm = float(np.median(np.abs(np.diff(geometry.s())))) if geometry.num_tangential > 1 else 2.0
        if scatter_shape is not None:
            scatter = np.asarray(scatter_shape, dtype=np.float64).reshape(shape) * eff
            total = float(scatter.sum())
            if not (np.isfinite(scatter).all() and scatter.min() >= 0 and total > 0):
                raise ConfigError(f"simulation: key 'scatter_model': the given scatter shape is not a finite, "
                                  f"non-negative sinogram with a positive total (total {total:.4g}); it cannot be "
                                  f"scaled to scatter_fraction {scatter_fraction:g} (use scatter_model 'smooth')")
        elif tof:  # blurred within each TOF bin
            scatter = np.stack([_smooth_sino(b * att, geometry, 40.0 / bin_mm, 3.0, 1.5) for b in ax]) * eff
        else:
            tmp = ax * att
            scatter = _smooth_sino(tmp, geometry, 40.0 / bin_mm, 3.0, 1.5)
            del tmp
            scatter *= eff
        scatter *= s_total / scatter.sum()
    del att
    # randoms: a fraction of the prompts, ∝ singles products (efficiencies), mildly modulated
    p_total = (t_total + s_total) / (1.0 - randoms_fraction)
    r_total = randoms_fraction * p_total
    randoms = None
    if r_total > 0:
        nv = sino_shape[1]
        mod = 1.0 + 0.05 * np.cos(2 * np.pi * (np.arange(nv) / nv + rng.random()))[None, :, None]
        randoms = eff * mod
        if tof:  # randoms are uniform in time: evenly over the TOF bins
            r_shape = np.broadcast_to(randoms, shape)
            randoms = r_shape * (r_total / r_shape.sum())
        else:
            randoms *= r_total / randoms.sum()             # r_shape * (r_total / r_shape.sum())
    del eff
    s_sum = float(scatter.sum()) if scatter is not None else 0.0
    r_sum = float(randoms.sum()) if randoms is not None else 0.0
    if randoms is None:
        randoms = np.zeros(shape)
    if scatter is not None:
        randoms += scatter
    del scatter
    randoms /= mult
    additive32 = randoms.astype(np.float32)               # ((randoms + scatter) / mult) in float32
    del randoms
    ax += additive32
    ax *= mult
    expected = ax                                          # mult * (ax + additive32)
    del mult, ax
    prompts = np.empty(shape, np.float32)                  # rng.poisson(expected), drawn in chunks (same stream)
    flat_e, flat_p = expected.reshape(-1), prompts.reshape(-1)
    chunk = 1 << 22
    for i in range(0, flat_e.size, chunk):
        flat_p[i:i + chunk] = rng.poisson(flat_e[i:i + chunk])
    stats = {"calibration_counts_per_unit_Ax": c, "expected_trues": t_total, "expected_scatter": s_sum,
             "expected_randoms": r_sum, "expected_prompts": float(expected.sum()),
             "total_prompts": float(prompts.sum()), **att_stats}
    if trues_brain is not None:
        stats["trues_brain"] = trues_brain
    return SimulatedData(prompts=prompts, mult=mult32, additive=additive32, expected=expected, stats=stats)


# ----------------------------------------------------------------------------------------------- study
def resolve_scatter_model(model: str, geometry) -> tuple[str, tuple[float, float] | None]:
    """``(model, energy window)`` of a study: ``auto`` becomes ``sss`` for non-TOF data of a scanner with an energy
    resolution and a known energy window, else ``smooth``; the window is the scanner's (None if unknown).

    Raises
    ------
    ConfigError
        ``sss`` asked for where it does not apply (TOF data, no energy resolution or window), naming the key.
    """
    from ..io.energy_window import SCANNER_ENERGY_WINDOWS_KEV

    sc = geometry.scanner
    window = SCANNER_ENERGY_WINDOWS_KEV.get(sc.name)
    res = (getattr(sc, "extra", {}) or {}).get("energy_resolution") or 0.0
    why = ("TOF data" if geometry.is_tof else f"scanner {sc.name!r} has no energy resolution" if not res > 0
           else f"scanner {sc.name!r} has no known energy window" if window is None else None)
    if model == "auto":
        return ("smooth" if why else "sss"), window
    if model == "sss" and why:
        raise ConfigError(f"simulation: key 'scatter_model' is 'sss' but {why}; use 'smooth' or 'auto'")
    return model, window



def _numpy_forward(geometry, grid: ImageGrid, device: str | None) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    from ..physics.projector import Projector
    from ..utils.device import resolve_device

    proj = Projector(geometry, grid, device=resolve_device(device))
    dev = resolve_device(device)

    def fwd(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            y = proj.forward(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=dev))
        return y.detach().cpu().numpy()

    return fwd


def _full_head_planes(nz: int, vz: float) -> int:
    """Odd number of planes (same parity as the odd slab) covering 182 mm, at least ``nz``."""
    n = max(int(math.ceil(ph.MMR_BRAIN_PLANES * ph.MMR_VOXEL_SIZE_MM[0] / vz)), nz)
    return n if n % 2 == 1 else n + 1


def simulate_study(config: SimulationConfig | dict, out_dir: str | Path, overwrite: bool = False,
                   forward: Callable[[np.ndarray], np.ndarray] | None = None,
                   forward_length_unit_mm: float | None = None) -> Path:
    """Simulate one study and write it to ``out_dir`` (PETRIC layout, STIR Interfile); returns ``out_dir``.

    Files: :data:`STUDY_FILES` and ``run_record.json``. ``forward`` replaces the built-in projector (tests);
    ``forward_length_unit_mm`` is its length unit (default: the x voxel size, the built-in projector's and STIR's).
    Refuses a non-empty ``out_dir`` unless ``overwrite``.
    """
    from ..config import from_dict
    from ..io import write_image, write_projdata
    from ..utils.atomic import write_text
    from ..utils.provenance import write_run_record

    cfg = from_dict(SimulationConfig, config, source="simulation config") if isinstance(config, dict) else config
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputPathError(out, "is a file; the simulation writes a folder", "--out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(out)
    geometry = build_geometry(cfg)  # config errors before anything is made; the writers create the folder
    grid = geometry.default_image_grid(xy=cfg.image_xy)
    nz = grid.shape[0]
    nz_full = _full_head_planes(nz, grid.voxel_size[0])
    full_grid = ImageGrid((nz_full, grid.shape[1], grid.shape[2]), grid.voxel_size)
    k0 = (nz_full - nz) // 2
    templates = ph.load_templates(cfg.template_cache)
    subj = ph.make_subject(full_grid, cfg.tracer, cfg.seed, split=cfg.split, deform=cfg.deform, lesions=cfg.lesions,
                           pose=cfg.pose, rim=cfg.rim, axial_offset_mm=cfg.axial_offset_mm, templates=templates,
                           lesion_planes=(k0, k0 + nz),
                           lesion_kinds=None if cfg.lesion_kinds is None else tuple(cfg.lesion_kinds),
                           num_lesions=cfg.num_lesions, departures=cfg.departures,
                           departure_planes=(k0, k0 + nz))
    sl = slice(k0, k0 + nz)
    truth = np.ascontiguousarray(subj.activity.array[sl])
    mr = np.ascontiguousarray(subj.mr.array[sl])
    mu = np.ascontiguousarray(subj.mu_map.array[sl])
    brain_frac = np.ascontiguousarray(subj.fractions["brain"][sl])
    masks = {k: np.ascontiguousarray(v[sl]) for k, v in subj.masks.items()}

    vox_ml = float(np.prod(grid.voxel_size)) / 1000.0
    full_prof = subj.activity.array.sum(axis=(1, 2)) * vox_ml
    slab_prof = full_prof[sl]
    sc_name = geometry.scanner.name
    ref_mrd = cfg.reference_max_ring_diff
    if ref_mrd is None and "mMR" in sc_name:
        ref_mrd = 60
    frac = axial_count_fraction(geometry, slab_prof, full_prof, ref_mrd)
    target_prompts = cfg.dose_fraction * cfg.reference_prompts * frac
    target_trues = target_prompts * (1.0 - cfg.randoms_fraction) * (1.0 - cfg.scatter_fraction)

    noise_seed = cfg.noise_seed if cfg.noise_seed is not None else 1_000_003 * (cfg.seed + 1) + ph.SPLITS[cfg.split][0]
    rng = np.random.default_rng(np.random.SeedSequence([0x4E4F, int(noise_seed)]))
    fwd = forward if forward is not None else _numpy_forward(geometry, grid, cfg.device)
    tof = geometry.is_tof
    # μ-map for the attenuation: the slab plus the head's planes that the edge LOR tubes reach (built-in
    # projector only: a test projector given as ``forward`` knows only the slab grid)
    mu_att, mu_fwd, mu_pad = mu, None, 0
    if forward is None:
        mu_pad = attenuation_padding(geometry, grid)
        if mu_pad > 0:
            idx = np.clip(np.arange(k0 - mu_pad, k0 + nz + mu_pad), 0, nz_full - 1)  # edge planes repeat
            mu_att = np.ascontiguousarray(subj.mu_map.array[idx])
            mu_fwd = _numpy_forward(geometry.non_tof(), padded_grid(grid, mu_pad), cfg.device)
        elif tof:
            mu_fwd = _numpy_forward(geometry.non_tof(), grid, cfg.device)
    scatter_model, window = resolve_scatter_model(cfg.scatter_model, geometry)
    scatter_shape, scatter_info = None, {}
    if scatter_model == "sss" and cfg.scatter_fraction > 0:
        import time

        from .scatter_model import sss_scatter_shape

        t_sss = time.perf_counter()
        # the study's μ-map (the slab, as written to mu_map.hv and given to a scatter estimate), not the axially
        # padded one of the attenuation: STIR puts its scatter-point planes from the μ-map's first to its last plane
        # centre, so on a scanner of 2 rings the padded map's 2 planes lie outside the activity and the single
        # scatter is 0 (ScatterSimulation::downsample_density_image_for_scatter_points)
        scatter_shape, scatter_info = sss_scatter_shape(Image(truth, grid), Image(mu, grid), geometry, window,
                                                        device=cfg.device)
        scatter_info["time_s"] = time.perf_counter() - t_sss
    sim = simulate_data(truth, mu_att, geometry, fwd, target_trues, rng, scatter_fraction=cfg.scatter_fraction,
                        randoms_fraction=cfg.randoms_fraction, efficiency_sd=cfg.efficiency_sd,
                        brain_fraction=brain_frac,
                        length_unit_mm=grid.voxel_size[2] if forward_length_unit_mm is None else forward_length_unit_mm,
                        mu_forward=mu_fwd, scatter_shape=scatter_shape)

    meta = {"originating system": sc_name}
    prompts_meta = dict(meta, **({"energy_window_kev": window} if window else {}))  # the window in the header
    write_projdata(out / "prompts.hs", ProjData(sim.prompts, geometry, prompts_meta), overwrite=overwrite)
    write_projdata(out / "mult_factors.hs", ProjData(sim.mult, geometry.non_tof() if tof else geometry, dict(meta)),
                   overwrite=overwrite)  # TOF data: a TOF-independent norm, once per LOR (STIR accepts it)
    write_projdata(out / "additive_term.hs", ProjData(sim.additive, geometry, dict(meta)), overwrite=overwrite)
    write_image(out / "truth.hv", Image(truth, grid, {"units": "kBq/mL"}), overwrite=overwrite)
    write_image(out / "mr.hv", Image(mr, grid, {"units": "a.u."}), overwrite=overwrite)
    write_image(out / "mu_map.hv", Image(mu, grid, {"units": "cm^-1"}), overwrite=overwrite)
    if cfg.write_nifti:
        write_image(out / "truth.nii.gz", Image(truth, grid), overwrite=overwrite)
        write_image(out / "mr.nii.gz", Image(mr, grid), overwrite=overwrite)
    for k in ("brain", "gm", "wm", "lesion"):
        write_image(out / f"mask_{k}.hv", Image(masks[k].astype(np.float32), grid), overwrite=overwrite)
    if cfg.departures:  # where the PET departs from the MR (departures' lesions and hypometabolic region)
        write_image(out / "mask_departure.hv", Image(masks["departure"].astype(np.float32), grid),
                    overwrite=overwrite)

    case = {
        "kind": "sirf_ddip simulated brain study",
        "config": asdict(cfg),
        "scanner": sc_name, "num_rings": geometry.scanner.num_rings, "span": geometry.span,
        "max_ring_diff": geometry.max_ring_diff, "views": geometry.num_views, "tang": geometry.num_tangential,
        "sinograms": geometry.num_sinograms, "tof_bins": geometry.num_tof_bins,
        "tof_mash_factor": geometry.tof_mash_factor, "image_shape": list(grid.shape), "voxel_size_mm_zyx": list(grid.voxel_size),
        "image_origin_mm_zyx": list(grid.origin),
        "dose_fraction": cfg.dose_fraction,
        "departures": subj.meta.get("departures"),
        "reference_prompts_full_scanner": cfg.reference_prompts,
        "reference_max_ring_diff": ref_mrd,
        "axial_count_fraction": frac,
        "target_prompts": target_prompts,
        "total_prompts": sim.stats["total_prompts"],
        "expected_prompts": sim.stats["expected_prompts"],
        "expected_trues": sim.stats["expected_trues"],
        "expected_scatter": sim.stats["expected_scatter"],
        "scatter_model": scatter_model, "scatter_model_info": scatter_info,
        "energy_window_kev": list(window) if window else None,
        "expected_randoms": sim.stats["expected_randoms"],
        "expected_trues_from_brain": sim.stats.get("trues_brain"),
        "calibration_counts_per_unit_Ax": sim.stats["calibration_counts_per_unit_Ax"],
        "mean_attenuation_factor": sim.stats["mean_attenuation_factor"],
        "min_attenuation_factor": sim.stats["min_attenuation_factor"],
        "attenuation_mu_padding_planes": mu_pad,
        "activity_units": "kBq/mL", "mu_units": "cm^-1",
        "truth_total_kBq": float(truth.sum() * vox_ml),
        "truth_brain_mean_kBq_per_mL": float(truth[masks["brain"]].mean()) if masks["brain"].any() else None,
        "noise_seed": int(noise_seed),
        "subject": subj.meta,
        "slab_planes_in_head_grid": [k0, k0 + nz],
        "model": "prompts ~ Poisson(mult_factors * (A truth + additive_term)); "
                 "additive_term = (randoms + scatter) / mult_factors",
    }
    write_text(out / "case.json", json.dumps(case, indent=1, default=float))
    write_run_record(out, config=cfg, seed=cfg.seed, extra={"noise_seed": int(noise_seed)})
    return out
