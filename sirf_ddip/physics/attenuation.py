"""Attenuation factors ``exp(-∫ μ)`` from a μ-map, with our STIR-matching ray-tracing projector.

As STIR's ``BinNormalisationFromAttenuationImage`` (UCL/STIR ``src/recon_buildblock/
BinNormalisationFromAttenuationImage.cxx``, ``post_processing`` and ``undo``): the μ-map (cm⁻¹) is multiplied by
its x voxel size in cm, because the ray-tracing projector returns line integrals in units of x voxels
(``ProjMatrixByBinUsingRayTracing``: lengths divided by ``voxel_size.x``), forward projected, and
exponentiated: ``att = exp(-A (μ vx / 10))``, so ``att <= 1``.

Memory: the projector's sparse matrix for the full mMR span-11 template on the 57 × 57 × 127 μ-map grid is
built view subset by view subset (a STIR view subset per chunk, sized by :func:`max_views_for_memory`), so that
only one chunk's matrix is alive; each chunk's projector is discarded after use.
"""

from __future__ import annotations

import numpy as np

from ..data import Image, ProjData
from ..errors import GeometryMismatchError
from ..geometry.image import ImageGrid
from ..geometry.sinogram import SinogramGeometry
from ..io.mumap import resample_to_grid

__all__ = ["attenuation_factors", "attenuation_factors_subset", "projector_grid_for", "view_chunks",
           "max_views_for_memory"]


def projector_grid_for(mu: Image, geometry: SinogramGeometry) -> ImageGrid:
    """The μ-map's own grid if the projector accepts it, else a grid with the μ-map's transaxial sampling and
    extent and STIR's default axial sampling for ``geometry`` (ring spacing / 2, ``2 N - 1`` planes)."""
    g = mu.grid
    vz = g.voxel_size[0]
    ok = all(abs(s.axial_sampling_mm / vz - round(s.axial_sampling_mm / vz)) < 1e-4 and round(s.axial_sampling_mm / vz)
             >= 1 for s in geometry.segments) and abs(g.origin[0] / vz - round(g.origin[0] / vz)) < 1e-3
    if ok:
        return g
    sc = geometry.scanner
    return ImageGrid((2 * sc.num_rings - 1, g.shape[1], g.shape[2]), (sc.ring_spacing_mm / 2.0,) + g.voxel_size[1:],
                     (0.0, g.origin[1], g.origin[2]))


#: Measured: the matrices of 12 views of the full mMR span-11 template (11 segments, 344 bins) on the 57 x 57
#: μ-map grid take ~600 MB, i.e. ~230 bytes per (view, segment, bin, voxel along x).
_BYTES_PER_VIEW_SEGMENT_BIN_VOXEL = 240


def max_views_for_memory(geometry: SinogramGeometry, grid: ImageGrid, budget_bytes: float = 768e6) -> int:
    """Views per projector chunk so that one chunk's sparse matrix stays under ``budget_bytes`` (estimate)."""
    per_view = (_BYTES_PER_VIEW_SEGMENT_BIN_VOXEL * geometry.num_segments * geometry.num_tangential
                * max(grid.shape[1], grid.shape[2]))
    return int(max(1, min(geometry.num_views, budget_bytes // max(per_view, 1))))


def view_chunks(geometry: SinogramGeometry, grid: ImageGrid, max_views: int | None = None) -> list[np.ndarray]:
    """Disjoint view sets covering all views, each a balanced STIR subset of at most ``max_views`` views
    (default :func:`max_views_for_memory`), so that each chunk is one ``Projector.forward(x, subset,
    num_subsets)`` call."""
    n = geometry.num_views
    if max_views is None:
        max_views = max_views_for_memory(geometry, grid)
    for S in range(max(1, -(-n // max_views)), n + 1):
        try:
            subsets = [geometry.subset_views(S, s, grid=grid) for s in range(S)]
        except ValueError:
            continue
        if max(len(v) for v in subsets) <= max_views:
            return subsets
    return [np.asarray([v]) for v in range(n)]  # pragma: no cover - S = n always works


def _prepared(mu: Image, geometry: SinogramGeometry, grid: ImageGrid | None) -> tuple[np.ndarray, ImageGrid]:
    """μ (cm⁻¹) on the projection grid, times the x voxel size in cm (STIR's rescale to pixel units)."""
    target = grid if grid is not None else projector_grid_for(mu, geometry)
    img = mu if mu.grid.matches(target) else resample_to_grid(mu, target)
    return np.asarray(img.array, dtype=np.float32) * np.float32(img.grid.voxel_size[2] / 10.0), img.grid


def attenuation_factors_subset(mu: Image, geometry: SinogramGeometry, subset: int, num_subsets: int,
                               grid: ImageGrid | None = None, num_tangential_lors: int = 3,
                               device=None) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation factors of the views of one STIR view subset only: ``(views, factors[sino, view, tang])``.

    The views are ``geometry.subset_views(num_subsets, subset, grid=...)`` (sorted).
    """
    from .projector import Projector

    scaled, g = _prepared(mu, geometry, grid)
    views = geometry.subset_views(num_subsets, subset, grid=g) if num_subsets > 1 else np.arange(geometry.num_views)
    P = Projector(geometry, g, device=device, num_tangential_lors=num_tangential_lors, cache=False)
    li = P.forward(scaled) if num_subsets == 1 else P.forward(scaled, subset=subset, num_subsets=num_subsets)
    li = li.detach().cpu().numpy()
    if li.shape[1] != len(views):
        raise GeometryMismatchError(f"projector returned {li.shape[1]} views for a subset of {len(views)}")
    return views, np.exp(-li.astype(np.float64)).astype(np.float32)


def attenuation_factors(mu: Image, geometry: SinogramGeometry, grid: ImageGrid | None = None,
                        num_tangential_lors: int = 3, max_views_per_chunk: int | None = None, device=None,
                        progress=None) -> ProjData:
    """``exp(-∫ μ)`` on ``geometry`` (STIR ``BinNormalisationFromAttenuationImage`` with the ray-tracing matrix).

    Parameters
    ----------
    mu : Image
        μ-map in cm⁻¹ (see :func:`sirf_ddip.io.mumap.read_mu_map`).
    geometry : SinogramGeometry
    grid : ImageGrid, optional
        Resample the μ-map onto this grid first (default: its own grid, or :func:`projector_grid_for` when the
        projector cannot use it).
    num_tangential_lors : int
        Rays per bin (STIR's default 1; SIRF / the shared reference use 3).
    max_views_per_chunk : int, optional
        Views per projector chunk (default: :func:`max_views_for_memory`, ~768 MB of matrix per chunk).
    device : optional
        Torch device for the projector (default: :func:`sirf_ddip.utils.device.resolve_device`).
    progress : callable, optional
        Called as ``progress(done_chunks, total_chunks)``.

    Returns
    -------
    ProjData of float32 factors in (0, 1].
    """
    g = grid if grid is not None else projector_grid_for(mu, geometry)
    prepared = mu if mu.grid.matches(g) else resample_to_grid(mu, g)  # resample once, not per chunk
    out = np.empty(geometry.shape, dtype=np.float32)
    chunks = view_chunks(geometry, g, max_views_per_chunk)
    S = len(chunks)
    for s, views in enumerate(chunks):
        got, fac = attenuation_factors_subset(prepared, geometry, s, S, grid=g,
                                              num_tangential_lors=num_tangential_lors, device=device)
        if not np.array_equal(got, views):  # pragma: no cover - same subset definition
            raise GeometryMismatchError(f"view subset {s} of {S}: {got.tolist()} != {views.tolist()}")
        out[:, views, :] = fac
        if progress is not None:
            progress(s + 1, S)
    return ProjData(out, geometry, {"mu_map": str(mu.meta.get("source", "")), "mu_grid": g.describe(),
                                    "num_tangential_lors": num_tangential_lors})
