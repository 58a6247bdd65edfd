"""View subsets: the one place that decides which views an (OS)EM subset uses and which subset comes next.

STIR's OSMAPOSL forms subset ``s`` of ``S`` from the basic views ``v ≡ s (mod S)`` of the projector's
symmetries, each with its symmetry-related views (``find_basic_vs_nums_in_subset``, STIR
``src/recon_buildblock/distributable.cxx``); the geometry knows the symmetries
(:meth:`sirf_ddip.geometry.sinogram.SinogramGeometry.subset_views`). Subset ``k mod S`` is used at sub-iteration
``k`` (OSMAPOSL's ``subset_num = (subiteration_num - 1) % num_subsets`` when started at sub-iteration 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["ViewSubsets", "validate_num_subsets", "subset_of_iteration"]


def validate_num_subsets(n: Any) -> int:
    """``n`` as an int >= 1, else ``ValueError`` (shared by every likelihood and reconstructor)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"num_subsets must be >= 1, got {n}")
    return n


def subset_of_iteration(k: int, num_subsets: int) -> int | None:
    """The subset used at (0-based) sub-iteration ``k``: ``k mod S``, or ``None`` (all data) when ``S == 1``."""
    S = validate_num_subsets(num_subsets)
    return None if S == 1 else int(k) % S


class ViewSubsets:
    """``num_subsets`` view subsets of a sinogram geometry, STIR's symmetry-aware ones.

    Parameters
    ----------
    geometry : SinogramGeometry
        Gives ``num_views`` and ``subset_views(S, s, grid=...)``.
    num_subsets : int
        ``S >= 1``. Checked now: STIR refuses unbalanced subsets and so does this class (``ValueError``).
    grid : ImageGrid, optional
        The image grid: STIR drops view symmetries for shifted images, which changes the subsets.

    Notes
    -----
    ``views(None)`` and, for ``S == 1``, ``views(0)`` are all views. Index arrays are cached.
    """

    def __init__(self, geometry: Any, num_subsets: int = 1, grid: Any = None):
        self.geometry = geometry
        self.grid = grid
        self.num_subsets = validate_num_subsets(num_subsets)
        self.num_views = int(geometry.num_views)
        self._views: dict[int, np.ndarray] = {}
        self._tensors: dict[tuple[int, str], torch.Tensor] = {}
        if self.num_subsets > 1:  # validate (balance) now rather than mid-reconstruction
            self.views(0)

    def __len__(self) -> int:
        return self.num_subsets

    def check(self, subset: int | None) -> int | None:
        """``subset`` as an int in ``0..S-1``, or ``None`` for all data (also when ``S == 1``)."""
        if subset is None:
            return None
        s = int(subset)
        if not 0 <= s < self.num_subsets:
            raise ValueError(f"subset {s} out of range 0..{self.num_subsets - 1}")
        return None if self.num_subsets == 1 else s

    def views(self, subset: int | None) -> np.ndarray:
        """View indices of ``subset`` (ascending; all views for ``None`` or a single subset)."""
        s = self.check(subset)
        if s is None:
            return np.arange(self.num_views)
        if s not in self._views:
            self._views[s] = np.asarray(self.geometry.subset_views(self.num_subsets, s, grid=self.grid),
                                        dtype=np.int64)
        return self._views[s]

    def views_tensor(self, subset: int | None, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """:meth:`views` as a ``long`` tensor on ``device``, or ``None`` when the subset is all views."""
        s = self.check(subset)
        if s is None:
            return None
        key = (s, str(device))
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(self.views(s), dtype=torch.long, device=device)
        return self._tensors[key]

    def restrict(self, t: torch.Tensor | None, subset: int | None) -> torch.Tensor | None:
        """The subset's views of a sinogram ``t[..., views, :]`` (``t`` itself for all views; ``None`` stays);
        TOF data ``(n_tof, n_sino, n_views, n_tang)`` and non-TOF factors alike."""
        if t is None:
            return None
        v = self.views_tensor(subset, t.device)
        return t if v is None else t.index_select(t.dim() - 2, v)

    def projector_args(self, subset: int | None) -> tuple[int | None, int | None]:
        """``(subset, num_subsets)`` as the projector's ``forward``/``adjoint`` take them (``(None, None)``: all)."""
        s = self.check(subset)
        return (None, None) if s is None else (s, self.num_subsets)

    def of_iteration(self, k: int) -> int | None:
        """Subset of (0-based) sub-iteration ``k`` (see :func:`subset_of_iteration`)."""
        return subset_of_iteration(k, self.num_subsets)

    def __repr__(self) -> str:
        return f"ViewSubsets(num_subsets={self.num_subsets}, num_views={self.num_views})"
