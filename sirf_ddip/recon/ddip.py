"""DDIPReconstructor: HQS Deep Diffusion Image Prior reconstruction (Hashimoto & Gong 2025), fully 3D.

The SIRF surface and the loop composing the method's parts (docs/ARCHITECTURE.md): the sampler
(:mod:`~sirf_ddip.prior.sampler`), the prior on slabs (:mod:`~sirf_ddip.prior.slabs`), the adaptation
(:mod:`~sirf_ddip.prior.adaptation`), the image step (:mod:`~sirf_ddip.recon.image_step`,
:mod:`~sirf_ddip.recon.hqs`), what the prior sees (:mod:`~sirf_ddip.recon.planes`), checkpoints and diagnostics.
One diffusion step ``t → t′`` (:meth:`DDIPReconstructor._update`), state ``x_t`` (network units) and the HQS
image ``x`` (activity units):

1. ``num_finetune`` times: Tweedie ``x̂0(x_t, ε_θ(x_t, t, MR))`` → HQS image step (``num_em`` EM updates, each fused
   with x̂0 at β(t)) → one AdamW step of the LoRA adapters pulling x̂0 by the data's correction
   (``finetune = False``: the image step alone, ``K·num_em`` updates against the prior's x̂0);
2. DDIM/DDS step ``x_t → x_t′``: ε of the adapted network, clean image x̂0 (``ddim_x0 = "network"``) or the HQS
   image (``"hqs"``; always without fine-tuning).

The Poisson log-likelihood of the output (a diagnostic: one full forward projection) is computed after every
``run.loglik_every``-th step and the last (:attr:`loglik_steps`, :attr:`loglik_history`).

Warm start: ``n_init`` MLEM-equivalent iterations, in network units by the prior's PET scaler, noised to
``t_start``. Output: the last clean image (activity units), zero outside the FOV, the data's own image on planes
without the subject (``prior_planes``), then ``final_em`` EM updates. One seeded CPU generator draws all noise.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import defaultdict
from typing import Any

import torch

from ..errors import DataValueError
from ..prior.adaptation import LoRAAdaptation, adapted_copy
from ..prior.sampler import DDIMSampler
from ..prior.slabs import DiffusionPrior
from ..utils.device import require_device_kind
from .base import IterativeReconstructor, NotSetUpError, fill_in_place
from .checkpoint import CHECKPOINT_FILE, CHECKPOINT_FORMAT, CheckpointMixin  # noqa: F401  (re-exported)
from .config import DDIPConfig
from .diagnostics import DiagnosticsMixin
from .hqs import beta_activity, beta_schedule
from .image_step import ImageStep
from .planes import PlaneSplit, PriorPlanesMixin, condition_on_mr, fov_of, load_bundle, prior_grid_for


class DDIPReconstructor(CheckpointMixin, DiagnosticsMixin, PriorPlanesMixin, IterativeReconstructor):
    """HQS-DDIP reconstruction on any :class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood`.

    ``config``: a :class:`DDIPConfig`, dict, YAML path or None (the shipped settings, ``recon/ddip.yaml``);
    ``overrides``: single keys. ``num_steps`` sets the diffusion steps (``set_num_subiterations`` does not, with a
    warning), ``set_num_subsets(n)`` the EM updates' view subsets. :meth:`get_current_estimate` is the current
    output; ``reconstruct(image)`` uses ``image`` as geometry only and starts from the MLEM warm start unless
    :meth:`set_current_estimate` was called.
    """

    def __init__(self, config: DDIPConfig | dict | str | os.PathLike | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = DDIPConfig.coerce(config, overrides)
        self._num_subsets, self._num_subiterations = self.config.num_subsets, self.config.num_steps
        self._prior_source: Any = None
        self._mr_input: Any = None
        self.bundle = self.network = self.schedule = self.prior = self.sampler = self.adaptation = None
        self.image_step: ImageStep | None = None
        self.mr_scaler = self.prior_grid = self._mr_net = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.x, self.iteration, self._user_init = None, 0, False
        # x_t (network units), the HQS image (activity units), the DDIM step's last clean image (network units)
        self._xt = self._x_img = self._x0_net = None
        self._gen: torch.Generator | None = None
        self.last_loss: float | None = None
        # Poisson log-likelihood of the warm start, of the output after the steps in loglik_steps (every
        # run.loglik_every-th and the last), after the final EM stage
        self.loglik_warm_start, self.loglik_history, self.loglik_final_em = None, [], None
        self.loglik_steps: list[int] = []
        self.timings, self.counts = defaultdict(float), defaultdict(int)
        self.prior_planes: torch.Tensor | None = None   # bool [Z]: planes the prior runs on (None: not chosen yet)
        self._planes: PlaneSplit | None = None

    # ------------------------------------------------------------------ SIRF-style setters
    def set_prior(self, prior: Any = None) -> None:
        """Prior weights: a path (``.safetensors`` or folder), a ``PriorBundle``, or None (the shipped prior)."""
        self._prior_source, self.configured = prior, False

    def set_anatomical_image(self, mr: Any) -> None:
        """The co-registered MR (T1) on the PET image grid (a backend image; same grid as the template)."""
        self._mr_input, self.configured = mr, False

    def set_num_subsets(self, n: int) -> None:
        super().set_num_subsets(n)
        self.config = self.config.replace(num_subsets=int(n))

    def set_num_subiterations(self, n: int) -> None:
        """SIRF's sub-iteration count: recorded with a warning, it does **not** change the diffusion schedule
        (``num_steps``; :meth:`get_num_subiterations` returns the steps ``process()`` runs)."""
        if int(n) < 0:
            raise ValueError(f"num_subiterations must be >= 0, got {n}")
        self._sirf_num_subiterations = n = int(n)
        steps = self._num_steps if self.configured and self.sampler is not None else self.config.num_steps
        if n != steps:
            warnings.warn(f"DDIPReconstructor.set_num_subiterations({n}) does not change the diffusion schedule: DDIP "
                          f"runs num_steps = {steps} diffusion steps (set num_steps in the config)", stacklevel=2)

    # ------------------------------------------------------------------ set-up: the parts of the method
    def _set_up(self, template: torch.Tensor) -> None:
        cfg, ds = self.config, self.data_step
        self.device = require_device_kind(cfg.device, ds.device)   # run.num_threads: the CLI's (process-wide)
        bundle = self.bundle = load_bundle(self._prior_source, self.device)
        self.schedule = bundle.schedule
        gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
        self.network = adapted_copy(bundle.network, self.device, cfg, gen)   # LoRA B = 0: exactly the prior
        if cfg.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        pet_grid = getattr(ds, "grid", None) or getattr(self._template, "grid", None)
        self.prior_grid = prior_grid_for(pet_grid, bundle, cfg.prior_grid, cfg.prior_fov_radius_mm)
        self._mr_input, self.mr_scaler, self._mr_net = condition_on_mr(
            ds, self._mr_input, bundle, self.prior_grid, pet_grid, self._template, cfg.use_mr, self.device)
        ds.set_num_subsets(self._num_subsets)
        self.sampler = DDIMSampler.build(self.schedule, cfg.t_start, cfg.num_steps, cfg.eta, cfg.eta_mode,
                                         cfg.x0_clamp)
        self._num_subiterations = len(self.sampler)
        self._reset_state()
        self._gen = gen
        self.prior = DiffusionPrior(self.network, self.schedule, bundle.pet_scaling, mr_net=self._mr_net,
                                    mr_pad_value=self.mr_scaler.lo if self.mr_scaler is not None else -1.0,
                                    batch_size=cfg.slab_batch, timings=self.timings, counts=self.counts,
                                    grid=self.prior_grid, mr_guidance=cfg.mr_guidance,
                                    channels_last=cfg.channels_last, precision=cfg.network_precision)
        self.adaptation = LoRAAdaptation.from_config(cfg, self.prior, gen)
        self.image_step = ImageStep(ds, self._num_subsets, self.timings, self.counts,
                                    fov_of(ds, self.prior_grid) if cfg.fov_mask else None)

    # ------------------------------------------------------------------ estimates and the warm start
    def _initialise_estimate(self, x: torch.Tensor) -> torch.Tensor:
        """``set_current_estimate``: before the first step it seeds the warm start; during the run it becomes the
        current estimate only (SIRF's canonical loop gives what ``process()`` gives); after the last step it seeds
        the next run (next frame or gate)."""
        if not bool(torch.isfinite(x).all()):
            raise DataValueError("set_current_estimate: image contains NaN or Inf")
        if float(x.min()) < 0:
            raise DataValueError(f"set_current_estimate: image has negative values (min {float(x.min()):.4g})")
        if self.iteration == 0:
            self._xt, self._user_init, self._next_seed = None, True, None
        elif self.iteration >= self._num_steps:
            self._next_seed = x.clone()
        return x

    def _prepare_process(self) -> None:
        """``process()`` finishes a run in progress; after a completed one it starts a new one with the same seeds
        (from an image set since, else the MLEM warm start)."""
        if self.iteration < self._num_steps:
            return
        seed = getattr(self, "_next_seed", None)
        self._set_up(self._template_tensor)
        self._next_seed = None
        if seed is not None:
            self.x, self._user_init = seed, True

    def warm_start(self) -> torch.Tensor:
        """The MLEM/OSEM warm start: ``ceil(n_init/S)`` OSEM iterations (S subsets) from a uniform image."""
        return self.image_step.warm_start(self.config.n_init)

    def initialise(self) -> None:
        """Warm start (unless an estimate was set), fit the PET scaler, choose the planes, noise to ``t_start``."""
        self._require_setup()
        x0 = self.x if (self._user_init and self.x is not None) else self.warm_start()
        x0 = x0.detach().clamp_min(0)
        if not bool(torch.isfinite(x0).all()):
            raise DataValueError("DDIP warm start contains NaN or Inf (check the data and factors)")
        self.fit_pet_scaler(x0)
        self._use_prior_planes(self.choose_prior_planes(x0))
        u0 = self.sampler.clamp(self.prior.to_network(x0))   # EM's edge artefacts must not enter the network
        self._xt = self.sampler.start(u0, self._randn(u0.shape))
        self._x_img, self._x0_net, self.x = x0.clone(), self.sampler.clamp(u0), x0.clone()
        self.iteration, self.image_step.em_counter = 0, 0
        self.loglik_warm_start = self.image_step.log_likelihood(self.x)
        self.loglik_history, self.loglik_steps, self.loglik_final_em = [], [], None

    # ------------------------------------------------------------------ one diffusion step
    def update_current_estimate(self) -> None:
        """One diffusion step (warm start first if needed). Raises ``StopIteration`` when all steps are done."""
        self._require_setup()
        if self._xt is None:
            self.initialise()
        if self.iteration >= self._num_steps:
            raise StopIteration(f"DDIP: all {self._num_steps} diffusion steps are done")
        self.x = self._update(self.x)
        self.iteration += 1
        self._after_update()  # SIRF surface: the image held by update(image), save-interval files

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """One diffusion step: K × (Tweedie x̂0 → HQS image step → LoRA step), then the DDIM/DDS step."""
        cfg, sampler, i = self.config, self.sampler, self.iteration
        t, xt = sampler.t(i), self._xt
        t_step = time.perf_counter()
        if cfg.finetune:
            self._finetune(xt, t)
            eps = self.prior.eps(xt, t)                       # ε of the adapted network
            x0 = self._ddim_x0(xt, eps, t)
        else:   # the same projector budget as the adapted run: K·N_em fused EM updates against the prior's x̂0
            eps = self.prior.eps(xt, t)
            self._x_img = self._image_step(self._tweedie(xt, eps, t), cfg.num_em * max(1, cfg.num_finetune))
            x0 = sampler.clamp(self._to_net(self._x_img))
        self._xt = sampler.step(xt, eps, i, x0, self._randn(xt.shape))
        self._x0_net = x0
        out = self._output(x0)
        if self._loglik_due(i):
            self.loglik_history.append(self.image_step.log_likelihood(out))
            self.loglik_steps.append(i + 1)
        if i == len(sampler) - 1 and cfg.final_em > 0:
            out = self.image_step.final_em(out, beta_activity(cfg.final_em_beta, self.pet_scaler.gain),
                                           cfg.final_em, 1e-3 * float(self.pet_scaler.scale))
            self.loglik_final_em = self.image_step.log_likelihood(out)
        self.timings["total"] += time.perf_counter() - t_step
        return out

    def _loglik_due(self, i: int) -> bool:
        """Whether the diagnostic runs after step ``i`` (0-based): every ``run.loglik_every``-th and the last."""
        k = int(self.config.loglik_every)
        return i == len(self.sampler) - 1 or (k > 0 and (i + 1) % k == 0)

    def _finetune(self, xt: torch.Tensor, t: int) -> None:
        """K AdamW steps on the adapters (:meth:`LoRAAdaptation.finetune`), each against a new HQS image step."""
        self.last_loss = self.adaptation.finetune(xt, t, lambda eps: self._tweedie(xt, eps, t), self._hqs_net)

    def _tweedie(self, xt: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """The clamped Tweedie x̂0, on the planes the data set alone the HQS image (network units, clamped)."""
        x0 = self.sampler.x0(xt, eps, t)
        if self._planes is None or self._planes.data_mask is None:
            return x0
        return self._planes.merge(self.sampler.clamp(self._to_net(self._x_img)), x0)

    def _hqs_net(self, x0_net: torch.Tensor) -> torch.Tensor:
        """The HQS image step from ``x0_net``; the new HQS image in network units."""
        self._x_img = self._image_step(x0_net)
        return self._to_net(self._x_img)

    def _ddim_x0(self, xt: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """The DDIM step's clean image: the adapted x̂0, or (``ddim_x0 = "hqs"``) the HQS image with the smoothed
        correction (``correction_sigma_vox``)."""
        if self.config.ddim_x0 != "hqs":
            return self._tweedie(xt, eps, t)
        x0 = self._to_net(self._x_img)
        if self.config.correction_sigma_vox > 0:
            x0 = self.adaptation.target(self._tweedie(xt, eps, t), x0)
        return self.sampler.clamp(x0)

    def _image_step(self, x0_net: torch.Tensor, num_em: int | None = None) -> torch.Tensor:
        """HQS image step with the prior image ``x0_net`` (network units), from it or the last HQS image
        (``em_start``); on planes without the subject the prior image is the last HQS image (EM alone)."""
        z = self.prior.from_network(x0_net.detach()).to(self.data_step.dtype)
        z = self._planes.merge(self._x_img.to(z.dtype), z)
        start = z.clamp_min(1e-3 * float(self.pet_scaler.scale)) if self.config.em_start == "x0" else self._x_img
        return self.image_step.image_step(start, z, self.beta_activity,
                                          self.config.num_em if num_em is None else int(num_em))

    def _output(self, x0_net: torch.Tensor) -> torch.Tensor:
        """The step's output in activity units: the clean image, the data's own on their planes, FOV-masked."""
        out = self.prior.from_network(x0_net).to(self.data_step.dtype)
        return self.image_step.masked(self._planes.merge(self._x_img.to(out.dtype), out))

    def _to_net(self, x: torch.Tensor) -> torch.Tensor:
        return self.prior.to_network(x)

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self._gen, dtype=torch.float32).to(self.device)

    @property
    def _num_steps(self) -> int:
        return len(self.sampler) if self.sampler is not None else 0

    @property
    def timesteps(self) -> list[int]:
        """The diffusion steps of this run (descending, last 0)."""
        return list(self.sampler.timesteps)

    @property
    def pet_scaler(self):
        """The prior's PET scaler as fitted on the warm start (None before it)."""
        return None if self.prior is None else self.prior.pet_scaler

    @property
    def beta_activity(self) -> float:
        """β of the current step's image step in activity units (``β(t) g²``)."""
        if self.pet_scaler is None:
            raise NotSetUpError("DDIP: beta in activity units is known after the warm start (PET scaler fitted)")
        return beta_activity(self.beta_network, self.pet_scaler.gain)

    @property
    def beta_network(self) -> float:
        """β (network units) of the current step: ``beta``, or scheduled to ``beta_final`` (:func:`beta_schedule`)."""
        if not self._num_steps:
            return float(self.config.beta)
        t = self.sampler.t(min(self.iteration, self._num_steps - 1))
        return beta_schedule(self.config.beta, self.config.beta_final, t, self.config.t_start)

    def remaining(self) -> int:
        return max(0, (self._num_steps if self.configured else self._num_subiterations) - self.iteration)

    def reconstruct(self, image: Any) -> Any:
        """SIRF ``reconstruct(image)``: all diffusion steps, the output written into ``image`` in place (also
        returned); ``image`` fixes the grid only. An image that cannot be written in place is left alone and the
        output is returned as a new image."""
        if not self.configured:
            self.set_up(image)
        self.process()
        try:
            fill_in_place(image, self._output_tensor())
        except TypeError:
            return self.get_output()
        self._held = image
        return image
