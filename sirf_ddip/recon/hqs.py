"""Half-quadratic splitting (HQS) image step of DDIP: EM updates fused in closed form with the prior's x̂0.

The HQS image sub-problem
-------------------------
Given the prior's clean estimate ``z`` (x̂0 mapped to activity units), the image step of HQS solves::

    x* = argmax_{x >= 0}  L(x) − (β_a / 2) ‖x − z‖²                                              (1)

with ``L`` the Poisson log-likelihood. EM majorises −L at the current iterate by a separable surrogate whose
voxel-``j`` term is ``s_j (x_j − x^EM_j log x_j)`` (``s`` the (subset) sensitivity, ``x^EM`` the plain EM update
of the current iterate). Replacing ``−L`` by it makes (1) separable; per voxel, the stationarity condition::

    s_j x^EM_j / x_j − s_j − β_a (x_j − z_j) = 0                                                  (2)

is the quadratic ``β_a x² + (s − β_a z) x − s x^EM = 0`` whose non-negative root is::

    x_j = ½ [ (z_j − s_j/β_a) + √((z_j − s_j/β_a)² + 4 x^EM_j s_j / β_a) ]                          (3)

(De Pierro's / Gong's EM-fusion). Limits: ``β_a → 0`` gives ``x = x^EM`` (plain EM/OSEM); ``β_a → ∞`` gives
``x = max(z, 0)``; ``s_j = 0`` gives ``max(z_j, 0)`` (only the prior sees that voxel).
:func:`hqs_fusion` evaluates (3) in a cancellation-free form.

View subsets: β is for the whole data
-------------------------------------
With view subsets an EM update sees the subset sensitivity ``s_k ≈ s/S``. Fusing it with an unscaled β would solve
(1) with ``S·β`` (the data term shrinks ``S``-fold, the penalty does not). The subset update instead solves the
subset's share of (1), ``s_k (x^EM log x − x) − (β_a s_k / s)/2 (x − z)²`` (the penalty split over subsets in
proportion to each voxel's sensitivity, so the subsets' penalties add up to (1)'s). Its root is (3) with the
**full** sensitivity ``s`` in place of ``s_k`` (multiply the stationarity condition by ``s/s_k``), so
:func:`hqs_image_step` fuses every (subset) EM update with ``data_step.sensitivity(None)``: with 1 or ``S``
subsets the same β gives the same fixed point.

β in network units
------------------
The prior works in *network units* ``u = lo + g·x`` (``g = (hi − lo)/scale``, :mod:`sirf_ddip.prior.scaling`).
DDIP's β (paper/code default 0.01) weighs ``(β/2)‖u(x) − û0‖²``; since ``u(x) − û0 = g (x − z)`` with
``z = (û0 − lo)/g``, the same penalty in activity units is ``(β g² / 2)‖x − z‖²``, i.e.::

    β_a = β · g²                                                                                   (4)

:func:`beta_activity` converts. The fusion is then unit-equivariant: expressing activity in units ``c`` times
smaller (``x → c x``, ``A → A/c``, so ``s → s/c``, ``scale → c·scale``, ``g → g/c``, ``β_a → β_a/c²``) turns
(3) into ``c`` times the same image, so β need not be retuned per study or per unit.
"""

from __future__ import annotations

import math

import torch

from ..physics.likelihood import PoissonLogLikelihood
from .em import em_multiplicative_update


def beta_activity(beta_net: float, gain: float) -> float:
    """β in activity units from β in network units: ``β_a = β · g²`` (``g`` = d(net)/d(activity)).

    Parameters
    ----------
    beta_net : float
        β of the HQS penalty ``(β/2)‖u − û0‖²`` in network units (``>= 0``; ``inf`` allowed).
    gain : float
        ``g = (hi − lo) / scale`` of the fitted PET scaler (> 0).
    """
    if not (beta_net >= 0):
        raise ValueError(f"HQS: beta must be >= 0, got {beta_net}")
    if not (gain > 0 and math.isfinite(gain)):
        raise ValueError(f"HQS: scaler gain must be finite and > 0, got {gain}")
    return float(beta_net) * float(gain) ** 2


def beta_schedule(beta: float, beta_final: float | None, t: int, t_start: int) -> float:
    """β of the image step at diffusion time ``t``: log-linear from ``beta`` at ``t_start`` to ``beta_final`` at 0.

    ``β(t) = beta · (beta_final / beta)^(1 − t / t_start)``; ``beta_final = None`` (or ``t_start = 0``) gives the
    constant ``beta``. Units are whatever ``beta`` is in (network units in :class:`DDIPReconstructor`).

    Parameters
    ----------
    beta, beta_final : float
        β at ``t = t_start`` and at ``t = 0`` (both ``> 0`` when scheduling).
    t, t_start : int
        The step's diffusion time and the warm start's (``0 <= t <= t_start``; ``t`` is clipped to that range).
    """
    if beta_final is None or int(t_start) <= 0 or float(beta_final) == float(beta):
        return float(beta)
    if not (beta > 0 and beta_final > 0 and math.isfinite(beta) and math.isfinite(beta_final)):
        raise ValueError(f"HQS: a beta schedule needs finite beta, beta_final > 0, got {beta}, {beta_final}")
    frac = 1.0 - min(max(float(t), 0.0), float(t_start)) / float(t_start)
    return float(beta) * (float(beta_final) / float(beta)) ** frac


def hqs_fusion(x_em: torch.Tensor, z: torch.Tensor, sens: torch.Tensor, beta: float) -> torch.Tensor:
    """Closed-form solution (3) of the separable HQS sub-problem, in activity units.

    Parameters
    ----------
    x_em : tensor
        EM update of the current iterate (``>= 0``).
    z : tensor
        The prior's clean estimate in activity units (may be negative; it is only a quadratic centre).
    sens : tensor
        (Subset) sensitivity used by that EM update (``>= 0``).
    beta : float
        β in activity units (``>= 0``; ``0`` → ``x_em``; ``inf`` → ``max(z, 0)``).

    Returns
    -------
    tensor
        ``argmax_{x>=0}  s (x_em log x − x) − (β/2)(x − z)²`` voxel-wise.
    """
    beta = float(beta)
    if not beta >= 0:
        raise ValueError(f"hqs_fusion: beta must be >= 0, got {beta}")
    if beta == 0.0:
        return x_em.clone()
    if math.isinf(beta):
        return z.clamp_min(0)
    sens = sens.clamp_min(0)
    x_em = x_em.clamp_min(0)
    a = z - sens / beta                       # (z − s/β)
    c = x_em * sens / beta                    # x_EM s / β  (>= 0)
    root = torch.sqrt(a * a + 4.0 * c)
    # (a + root)/2 loses precision when a << 0 (small β); there 2c/(root − a) is the same number, exactly.
    pos = 0.5 * (a + root)
    denom = root - a
    neg = torch.where(denom > 0, 2.0 * c / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(c))
    return torch.where(a >= 0, pos, neg)


def hqs_objective(x: torch.Tensor, x_em: torch.Tensor, z: torch.Tensor, sens: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """Voxel-wise surrogate objective ``s (x_em log x − x) − (β/2)(x − z)²`` (for tests and diagnostics)."""
    return sens * (x_em * torch.log(x) - x) - 0.5 * beta * (x - z) ** 2


def hqs_image_step(data_step: PoissonLogLikelihood, x: torch.Tensor, z: torch.Tensor, beta: float, num_em: int,
                   subsets: list[int | None] | None = None, timer: dict | None = None) -> torch.Tensor:
    """``num_em`` EM updates from ``x``, each followed by the fusion (3) with ``z`` (all in activity units).

    Parameters
    ----------
    data_step : PoissonLogLikelihood
        The physics (3D, all segments); its sensitivities are cached by the data step.
    x : tensor (nz, ny, nx)
        Starting image (activity units, ``>= 0``).
    z : tensor (nz, ny, nx)
        The prior's x̂0 in activity units.
    beta : float
        β in **activity units** (see :func:`beta_activity`).
    num_em : int
        Number of EM(+fusion) updates.
    subsets : list, optional
        Subset for each update (``None`` entries = all data); default all data for every update. Each subset's EM
        update is fused with the full sensitivity, so β does not scale with the number of subsets.
    timer : dict, optional
        Accumulates seconds under ``"projector"`` (the EM numerator: forward + back projection) and ``"em"``
        (the multiplicative update and the fusion).

    Returns
    -------
    tensor
        The fused image after ``num_em`` updates (``x`` itself when ``num_em = 0``).
    """
    import time

    if subsets is None:
        subsets = [None] * int(num_em)
    if len(subsets) != int(num_em):
        raise ValueError(f"hqs_image_step: {len(subsets)} subsets given for {num_em} EM updates")
    x = x.clamp_min(0)
    sens_all = data_step.sensitivity(None)    # β is for the whole data (module docstring: view subsets)
    for sub in subsets:
        t0 = time.perf_counter()
        num = data_step.backprojected_ratio(x, sub)
        t1 = time.perf_counter()
        sens = data_step.sensitivity(sub)
        x_em = em_multiplicative_update(x, num, sens)
        x = hqs_fusion(x_em, z, sens_all, beta)
        t2 = time.perf_counter()
        if timer is not None:
            timer["projector"] = timer.get("projector", 0.0) + (t1 - t0)
            timer["em"] = timer.get("em", 0.0) + (t2 - t1)
    return x
