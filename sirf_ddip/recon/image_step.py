"""DDIP's data side on the PET grid: the OSEM warm start, the HQS image steps and the final EM stage.

:class:`ImageStep` runs every EM update of a DDIP run on the data step, in STIR's subset order continued over the
whole run (``em_counter``; checkpointed), each image step fused in closed form with the prior's image
(:func:`sirf_ddip.recon.hqs.hqs_image_step`), and times them into the run's ``timings`` / ``counts``.
"""

from __future__ import annotations

import math
import time

import torch

from ..physics.likelihood import PoissonLogLikelihood
from ..physics.subsets import subset_of_iteration
from .em import em_update
from .hqs import hqs_image_step


class ImageStep:
    """EM updates on ``data_step`` with ``num_subsets`` view subsets (timed into ``timings`` / ``counts``)."""

    def __init__(self, data_step: PoissonLogLikelihood, num_subsets: int, timings: dict, counts: dict,
                 fov: torch.Tensor | None = None) -> None:
        self.data_step = data_step
        self.num_subsets = int(num_subsets)
        self.timings, self.counts = timings, counts
        self.fov = fov        # bool mask of the scanner's FOV the outputs are zeroed outside (None: not masked)
        self.em_counter = 0   # EM updates of the run so far (the next one's subset is em_counter mod S)

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with zeros outside :attr:`fov` (``x`` itself without a mask)."""
        return x if self.fov is None else torch.where(self.fov, x, torch.zeros_like(x))

    def subsets(self, n: int) -> list[int | None]:
        """The view subsets of the next ``n`` EM updates (STIR's order, continued over the run)."""
        out = [subset_of_iteration(self.em_counter + k, self.num_subsets) for k in range(n)]
        self.em_counter += n
        return out

    def warm_start(self, n_init: int) -> torch.Tensor:
        """``ceil(n_init/S)`` OSEM iterations (S subsets) from a uniform image (0 outside the FOV)."""
        from ..utils.progress import progress

        ds, S = self.data_step, self.num_subsets
        n_sub = int(math.ceil(n_init / S)) * S
        sens = ds.sensitivity(None)
        x = torch.where(sens > 0, torch.ones_like(sens), torch.zeros_like(sens))
        t0 = time.perf_counter()
        for k in progress(range(n_sub), total=n_sub, desc="DDIP warm start (OSEM)", leave=False):
            x = em_update(ds, x, subset_of_iteration(k, S))
        self.timings["init"] += time.perf_counter() - t0
        self.counts["init_em"] += n_sub
        return x

    def image_step(self, start: torch.Tensor, z: torch.Tensor, beta: float, num_em: int,
                   count: str = "em_updates") -> torch.Tensor:
        """``num_em`` EM updates from ``start``, each fused with ``z`` at ``beta`` (activity units)."""
        subsets = self.subsets(num_em)
        out = hqs_image_step(self.data_step, start, z, beta, num_em, subsets, timer=self.timings)
        self.counts[count] += num_em
        return out

    def final_em(self, x: torch.Tensor, beta: float, num_em: int, floor: float) -> torch.Tensor:
        """The data-consistency stage: ``num_em`` EM updates from ``x`` (floored at ``floor``), fused with ``x`` at
        ``beta`` (0 = plain EM), masked to the FOV."""
        return self.masked(self.image_step(x.clamp_min(floor), x, beta, num_em, count="final_em_updates"))

    def log_likelihood(self, x: torch.Tensor) -> float:
        """The Poisson log-likelihood ``Σ y log ŷ − ŷ`` (constants dropped, all data) of ``x``; timed."""
        t0 = time.perf_counter()
        val = float(self.data_step.value(x))
        self.timings["loglik"] += time.perf_counter() - t0
        return val
