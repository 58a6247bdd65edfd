"""The LoRA adaptation of DDIP: adapters, optimiser policy, fine-tuning target and loss.

One diffusion step's fine-tuning (:meth:`LoRAAdaptation.finetune`) runs ``num_finetune`` times: the volume's
Tweedie x̂0, the image step that fuses it with the data (a callable given by the reconstructor, so this layer
never sees the physics), the target built from the data's correction, and one AdamW step on the adapters
against :func:`finetune_loss` over a mini-batch of slabs. The projector never enters back-propagation.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError
from ..utils.filters import gaussian_filter_mm
from .adapters import (add_lora, adapter_state_dict, load_adapter_state_dict, lora_parameters,
                       reset_adapters)


def finetune_loss(x0_slabs: torch.Tensor, hqs_slabs: torch.Tensor, fold_slabs: torch.Tensor, target: str = "data",
                  consistency: float = 0.0, denom: int | None = None) -> torch.Tensor:
    """The LoRA fine-tuning loss of a batch of slabs (differentiable in ``x0_slabs``).

    Parameters
    ----------
    x0_slabs : tensor [b, slab, H, W]
        Each slab's own Tweedie x̂0 (network units, autograd intact).
    hqs_slabs : tensor [b, slab, H, W]
        The HQS image ``x_HQS`` (network units) on the slabs' planes.
    fold_slabs : tensor [b, slab, H, W]
        The slab-averaged (and clamped) volume estimate ``fold(x̂0)`` that the HQS step started from, on the same
        planes.
    target : "data" or "fold"
        ``"data"``: ``Σ (x̂0_slab − [x̂0_slab.detach() + (x_HQS − fold(x̂0))])²``, whose gradient is the data's
        correction ``x_HQS − fold(x̂0)`` alone (the authors' loss ``mean((x̂0 − x_HQS)²)`` of
        DDIPrecon_for_PET ``solver_pet_ddiprecon.py`` / ``lora/adaptation.py`` on one slab, where fold = x̂0;
        made insensitive to the disagreement between overlapping slabs). ``"fold"``: ``Σ (x̂0_slab − x_HQS)²``.
    consistency : float
        Weight of ``Σ (x̂0_slab − fold(x̂0))²`` added to the ``"data"`` loss.
    denom : int, optional
        Normaliser (default: the number of elements, i.e. a mean).

    Returns
    -------
    tensor (scalar)
    """
    denom = float(x0_slabs.numel() if denom is None else denom)
    if target == "fold":
        return ((x0_slabs - hqs_slabs) ** 2).sum() / denom
    if target != "data":
        raise ConfigError(f"DDIP config: key 'finetune_target' must be 'data' or 'fold', got {target!r}")
    goal = x0_slabs.detach() + (hqs_slabs - fold_slabs).detach()
    loss = ((x0_slabs - goal) ** 2).sum() / denom
    if consistency > 0:
        loss = loss + float(consistency) * ((x0_slabs - fold_slabs.detach()) ** 2).sum() / denom
    return loss


def smooth_correction(correction: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Normalised 3D Gaussian smoothing of a correction volume ``[Z, H, W]`` (sigma in voxels).

    ``G * c / G * 1`` with zero padding, so a constant correction is kept exactly up to the volume's edges (a 7-plane
    volume loses nothing at its end planes); ``sigma_vox = 0`` returns ``correction`` itself.
    """
    if sigma_vox <= 0:
        return correction
    fwhm = float(sigma_vox) * 2.0 * math.sqrt(2.0 * math.log(2.0))
    one = (1.0, 1.0, 1.0)
    num = gaussian_filter_mm(correction, fwhm, one)
    den = gaussian_filter_mm(torch.ones_like(correction), fwhm, one)
    return num / den


def attach_lora(network: nn.Module, rank: int, alpha: float | None, train_biases: bool, rule: str, init: str,
                generator: torch.Generator) -> None:
    """Add LoRA adapters to ``network`` in place, seeded from ``generator`` (B = 0: exactly the prior)."""
    add_lora(network, rank=rank, alpha=alpha, train_biases=train_biases, rule=rule, init=init)
    reset_adapters(network, generator=generator)


def adapted_copy(network: nn.Module, device, cfg, generator: torch.Generator) -> nn.Module:
    """A frozen float32 eval-mode copy of ``network`` on ``device``, with seeded LoRA adapters when
    ``cfg.finetune`` (keys ``lora_rank``, ``lora_alpha``, ``train_biases``, ``adapter_rule``, ``lora_init``)."""
    net = copy.deepcopy(network).to(device).float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if cfg.finetune:
        attach_lora(net, cfg.lora_rank, cfg.lora_alpha, cfg.train_biases, cfg.adapter_rule, cfg.lora_init, generator)
    return net


class LoRAAdaptation:
    """Fine-tuning of a LoRA-adapted :class:`~sirf_ddip.prior.slabs.DiffusionPrior` during sampling.

    Parameters
    ----------
    prior : DiffusionPrior
        The prior whose network carries the adapters (:func:`attach_lora`); its ``timings``/``counts`` record the
        backward passes (``"finetune_backward"``, ``"finetune_steps"``, ``"slab_backwards"``).
    generator : torch.Generator
        The run's generator (mini-batches of slabs).
    num_finetune : int
        K, AdamW steps per diffusion step.
    finetune_slabs : int
        Slabs per mini-batch (0 = all).
    lr, weight_decay, grad_clip : float
        AdamW and the gradient-norm clip (0 = none).
    optimizer : "reset" or "persist"
        A fresh AdamW every diffusion step (the authors') or one for the whole run.
    target : "data" or "fold"
        The loss (:func:`finetune_loss`); ``consistency`` its slab-consistency weight.
    correction_sigma_vox : float
        Gaussian σ (voxels) on the data's correction in the target (:meth:`target`).
    """

    def __init__(self, prior, generator: torch.Generator, *, num_finetune: int, finetune_slabs: int, lr: float,
                 weight_decay: float, grad_clip: float, optimizer: str = "reset", target: str = "data",
                 consistency: float = 0.0, correction_sigma_vox: float = 0.0) -> None:
        self.prior = prior
        self.generator = generator
        self.num_finetune = int(num_finetune)
        self.finetune_slabs = int(finetune_slabs)
        self.lr, self.weight_decay, self.grad_clip = lr, weight_decay, grad_clip
        self.policy = optimizer
        self.loss_target, self.consistency = target, consistency
        self.correction_sigma_vox = correction_sigma_vox
        self.optimizer: torch.optim.Optimizer | None = None   # the run's AdamW (policy "persist")

    @classmethod
    def from_config(cls, cfg, prior, generator: torch.Generator) -> "LoRAAdaptation | None":
        """The adaptation a DDIP config asks for (its keys of the same names); None when ``cfg.finetune`` is false."""
        if not cfg.finetune:
            return None
        return cls(prior, generator, num_finetune=cfg.num_finetune, finetune_slabs=cfg.finetune_slabs, lr=cfg.lr,
                   weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, optimizer=cfg.finetune_optimizer,
                   target=cfg.finetune_target, consistency=cfg.slab_consistency,
                   correction_sigma_vox=cfg.correction_sigma_vox)

    @property
    def network(self) -> nn.Module:
        return self.prior.network

    def target(self, x0: torch.Tensor, x_hqs: torch.Tensor) -> torch.Tensor:
        """``x0 + smooth(x_hqs − x0)`` (network units) with ``correction_sigma_vox``; ``x_hqs`` when it is 0."""
        sigma = self.correction_sigma_vox
        if sigma <= 0:
            return x_hqs
        return x0 + smooth_correction(x_hqs - x0, sigma)

    def new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh AdamW over the adapters (``lr``, ``weight_decay``)."""
        return torch.optim.AdamW(lora_parameters(self.network), lr=self.lr, weight_decay=self.weight_decay)

    def _step_optimizer(self) -> torch.optim.Optimizer:
        """This diffusion step's AdamW: a fresh one, or the run's one with the policy ``"persist"``."""
        if self.policy == "persist":
            if self.optimizer is None:
                self.optimizer = self.new_optimizer()
            return self.optimizer
        return self.new_optimizer()   # the authors' code: a fresh AdamW each diffusion step

    def finetune(self, xt: torch.Tensor, t: int, x0_of: Callable[[torch.Tensor], torch.Tensor],
                 image_step: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """K AdamW steps on the adapters at ``x_t``, each against a new image step; returns the last loss.

        ``x0_of(eps)`` is the clamped volume x̂0 of the slab-averaged ``eps`` (with the planes the data set);
        ``image_step(x0)`` runs the HQS image step from it and returns its image in network units.
        """
        params = lora_parameters(self.network)
        opt = self._step_optimizer()
        prior, Z = self.prior, int(xt.shape[0])
        active = prior.slab_indices(Z)          # the slabs the prior runs on (all, or prior_planes')
        n = int(active.numel())
        m = n if self.finetune_slabs == 0 else min(self.finetune_slabs, n)
        b = prior.batch_size
        reuse = (m == n and n <= b)   # one forward with autograd serves both x̂0 and the loss
        loss_value = 0.0
        for _ in range(self.num_finetune):
            opt.zero_grad(set_to_none=True)
            if reuse:
                loss_value = self._finetune_all(xt, t, active, x0_of, image_step)
            else:
                loss_value = self._finetune_batch(xt, t, active, m, x0_of, image_step)
            t0 = time.perf_counter()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            opt.step()
            prior.timings["finetune_backward"] += time.perf_counter() - t0
            prior.counts["finetune_steps"] += 1
        return loss_value

    def _finetune_all(self, xt, t, active, x0_of, image_step) -> float:
        """All active slabs in one batch: their forward with autograd gives both x̂0 and the loss."""
        Z = int(xt.shape[0])
        idx_all = active.to(xt.device)
        with torch.enable_grad():
            eps_s = self.prior.eps_slabs(xt, t, idx_all)
        eps_v = self.prior.fold(eps_s.detach(), Z, idx_all)
        x0 = x0_of(eps_v)
        target = self.target(x0, image_step(x0))
        n = int(active.numel())
        return float(self._slab_loss(xt, t, idx_all, target, x0, eps_s, n * int(np.prod(eps_s.shape[1:]))))

    def _finetune_batch(self, xt, t, active, m: int, x0_of, image_step) -> float:
        """x̂0 from a no-grad volume pass, the loss over ``m`` random slabs in batches."""
        eps_v = self.prior.eps(xt, t)
        x0 = x0_of(eps_v)
        target = self.target(x0, image_step(x0))
        n, b = int(active.numel()), self.prior.batch_size
        pick = torch.arange(n) if m == n else torch.randperm(n, generator=self.generator)[:m]
        idx = active[pick].to(xt.device)
        total = 0.0
        plane_elems = int(np.prod(xt.shape[1:])) * self.prior.slab
        for j in range(0, m, b):
            sub = idx[j:j + b]
            with torch.enable_grad():
                eps_s = self.prior.eps_slabs(xt, t, sub)
            total += float(self._slab_loss(xt, t, sub, target, x0, eps_s, m * plane_elems))
        return total

    def _slab_loss(self, xt, t, idx, target, x0_fold, eps_s, denom: int) -> torch.Tensor:
        """Back-propagate the fine-tuning loss (:func:`finetune_loss`) of slabs ``idx``; returns its value."""
        planes = self.prior.slab_planes(int(xt.shape[0]), idx)   # [b, slab]
        xs = xt[planes]                                          # [b, slab, H, W]
        with torch.enable_grad():
            x0s = self.prior.schedule.tweedie_x0(xs, eps_s, int(t))
            loss = finetune_loss(x0s, target[planes], x0_fold[planes], self.loss_target, self.consistency, denom)
            t0 = time.perf_counter()
            loss.backward()
            self.prior.timings["finetune_backward"] += time.perf_counter() - t0
        self.prior.counts["slab_backwards"] += int(idx.numel())
        return loss.detach()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The adapters (on the CPU) and the run's AdamW state (None with a fresh optimiser per step)."""
        return {"adapters": {k: v.cpu() for k, v in adapter_state_dict(self.network).items()},
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, adapters: dict, optimizer: dict | None) -> None:
        """Restore :meth:`state_dict`'s parts."""
        load_adapter_state_dict(self.network, adapters)
        self.optimizer = None
        if optimizer is not None:   # finetune_optimizer "persist"
            self.optimizer = self.new_optimizer()
            self.optimizer.load_state_dict(optimizer)
