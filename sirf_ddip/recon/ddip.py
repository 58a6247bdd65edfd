"""DDIPReconstructor: HQS Deep Diffusion Image Prior reconstruction (Hashimoto & Gong 2025), fully 3D.

The reconstructor is the SIRF surface and the loop that composes the method's parts, each in its own module:
the sampler (:class:`sirf_ddip.prior.sampler.DDIMSampler`), the prior on a volume of slabs
(:class:`sirf_ddip.prior.slabs.DiffusionPrior`), the adaptation (:class:`sirf_ddip.prior.adaptation.LoRAAdaptation`),
the image step (:func:`sirf_ddip.recon.hqs.hqs_image_step`), the prior's weights, grid, MR and planes
(:mod:`sirf_ddip.recon.planes`), checkpoints (:mod:`sirf_ddip.recon.checkpoint`) and diagnostics
(:mod:`sirf_ddip.recon.diagnostics`).

One diffusion step ``t → t′`` (:meth:`DDIPReconstructor._update`); state ``x_t`` (network units) and the HQS image
``x`` (activity units):

1. ``num_finetune`` times: Tweedie ``x̂0(x_t, ε_θ(x_t, t, MR))`` → HQS image step (``num_em`` EM updates on all the
   data, each fused in closed form with x̂0 at β(t)) → one AdamW step of the LoRA adapters pulling x̂0 by the data's
   correction. ``finetune = False``: the image step alone, ``K·num_em`` updates against the prior's x̂0.
2. DDIM/DDS step ``x_t → x_t′`` with ε of the adapted network and the clean image x̂0 (``ddim_x0 = "network"``) or
   the HQS image (``"hqs"``, the DDS way; always without fine-tuning).

Warm start: ``n_init`` MLEM-equivalent iterations (or the image given to :meth:`set_current_estimate`), mapped to
network units by the prior's PET scaler fitted on it inside the FOV, forward-noised to ``t_start``. The output is
the last clean image in activity units, zero outside the FOV (``fov_mask``), then ``final_em`` EM updates; on
planes without the subject (``prior_planes``) it is the data's own image. Every step logs the output's Poisson
log-likelihood. Every random draw comes from one seeded CPU generator; the network runs in eval mode throughout.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataValueError
from ..physics.subsets import subset_of_iteration
from ..prior.adaptation import LoRAAdaptation, attach_lora, finetune_loss, smooth_correction  # noqa: F401
from ..prior.sampler import DDIMSampler
from ..prior.slabs import DiffusionPrior
from . import diagnostics
from .base import IterativeReconstructor, NotSetUpError, fill_in_place
from .checkpoint import CHECKPOINT_FILE, CHECKPOINT_FORMAT, check_resumable  # noqa: F401  (re-exported)
from .config import DDIPConfig
from .em import em_update
from .hqs import beta_activity, beta_schedule, hqs_image_step
from .planes import (ANATOMY_LEVEL, ANATOMY_MIN_FRACTION, PlaneSplit, anatomy_planes,  # noqa: F401
                     condition_on_mr, load_bundle, prior_grid_for)


def as_config(config: Any, overrides: dict[str, Any]) -> DDIPConfig:
    """A :class:`DDIPConfig` from a config, dict, YAML path or None (the shipped settings), plus ``overrides``."""
    if config is None:
        cfg = DDIPConfig.shipped()
    elif isinstance(config, DDIPConfig):
        cfg = copy.deepcopy(config)
    elif isinstance(config, dict):
        cfg = DDIPConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = DDIPConfig.load(config)
    else:
        raise TypeError(f"DDIPReconstructor: config must be a DDIPConfig, dict or YAML path, not {type(config).__name__}")
    cfg = cfg.replace(**overrides) if overrides else cfg
    if cfg.finetune and cfg.num_finetune < 1:
        raise ConfigError("DDIP config: key 'num_finetune' must be >= 1 when finetune is true "
                          "(use finetune=false for the no-adaptation baseline)")
    return cfg


def run_device(want: str | None, have: Any) -> torch.device:
    """The data step's device; :class:`ConfigError` when the config's ``device`` asks for another kind."""
    if want not in ("auto", None):
        from ..utils.device import resolve_device

        if resolve_device(want).type != torch.device(have).type:
            raise ConfigError(f"DDIP config: key 'device' is {want!r} but the data step's tensors are on "
                              f"{have}; build the data step on the same device")
    return torch.device(have)


def adaptation_for(cfg: DDIPConfig, prior: DiffusionPrior, gen: torch.Generator) -> LoRAAdaptation | None:
    """The run's :class:`LoRAAdaptation` (None without fine-tuning)."""
    if not cfg.finetune:
        return None
    return LoRAAdaptation(prior, gen, num_finetune=cfg.num_finetune, finetune_slabs=cfg.finetune_slabs, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, optimizer=cfg.finetune_optimizer,
                          target=cfg.finetune_target, consistency=cfg.slab_consistency,
                          correction_sigma_vox=cfg.correction_sigma_vox)


class DDIPReconstructor(IterativeReconstructor):
    """HQS-DDIP reconstruction on any :class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood`.

    Parameters
    ----------
    config : DDIPConfig, dict, path to YAML, or None
        Settings (None = the shipped ones, ``recon/ddip.yaml``).
    **overrides
        Individual config keys (unknown keys are :class:`~sirf_ddip.errors.ConfigError`).

    Notes
    -----
    ``num_steps`` sets the diffusion steps (``set_num_subiterations`` does not, with a warning);
    ``set_num_subsets(n)`` the view subsets of the EM updates. :meth:`get_current_estimate` is the current output
    (after the warm start: the warm start). ``reconstruct(image)`` uses ``image`` as geometry template only and
    starts from the MLEM warm start unless :meth:`set_current_estimate` was called.
    """

    def __init__(self, config: DDIPConfig | dict | str | os.PathLike | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = as_config(config, overrides)
        self._num_subsets = self.config.num_subsets
        self._num_subiterations = self.config.num_steps
        self._prior_source: Any = None
        self._mr_input: Any = None
        self.bundle = self.network = self.schedule = self.prior = self.sampler = self.adaptation = None
        self.mr_scaler = self.prior_grid = None
        self._mr_net: torch.Tensor | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.x, self.iteration, self._user_init, self._em_counter = None, 0, False, 0
        self._xt: torch.Tensor | None = None       # x_t (network units)
        self._x_img: torch.Tensor | None = None    # HQS image (activity units)
        self._x0_net: torch.Tensor | None = None   # last clean image of the DDIM step (network units)
        self._gen: torch.Generator | None = None
        self.last_loss: float | None = None
        self.loglik_warm_start: float | None = None   # Poisson log-likelihood of the warm start,
        self.loglik_history: list[float] = []         # ... of the output after every diffusion step,
        self.loglik_final_em: float | None = None     # ... after the final EM stage
        self.timings: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
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
        n = int(n)
        if n < 0:
            raise ValueError(f"num_subiterations must be >= 0, got {n}")
        self._sirf_num_subiterations = n
        steps = len(self.sampler) if self.configured and self.sampler is not None else self.config.num_steps
        if n != steps:
            warnings.warn(f"DDIPReconstructor.set_num_subiterations({n}) does not change the diffusion schedule: "
                          f"DDIP runs num_steps = {steps} diffusion steps (set num_steps in the config or "
                          "DDIPReconstructor(num_steps=...))", stacklevel=2)

    # ------------------------------------------------------------------ set-up: the parts of the method
    def _set_up(self, template: torch.Tensor) -> None:
        cfg, ds = self.config, self.data_step
        self.device = run_device(cfg.device, ds.device)   # run.num_threads: the CLI's (torch's is process-wide)
        bundle = self.bundle = load_bundle(self._prior_source, self.device)
        self.schedule = bundle.schedule
        if not 0 <= cfg.t_start < self.schedule.num_train_steps:
            raise ConfigError(f"DDIP config: key 't_start' = {cfg.t_start} outside [0, "
                              f"{self.schedule.num_train_steps - 1}] of the prior's schedule")
        net = copy.deepcopy(bundle.network).to(self.device).float().eval()
        for p in net.parameters():
            p.requires_grad_(False)
        gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
        if cfg.finetune:   # seeded A-matrices, B = 0: exactly the prior
            attach_lora(net, cfg.lora_rank, cfg.lora_alpha, cfg.train_biases, cfg.adapter_rule, cfg.lora_init, gen)
        self.network = net
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
        self.prior = DiffusionPrior(net, self.schedule, bundle.pet_scaling, mr_net=self._mr_net,
                                    mr_pad_value=self.mr_scaler.lo if self.mr_scaler is not None else -1.0,
                                    batch_size=cfg.slab_batch, timings=self.timings, counts=self.counts,
                                    grid=self.prior_grid, mr_guidance=cfg.mr_guidance)
        self.adaptation = adaptation_for(cfg, self.prior, gen)

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
        """``process()``: finish a run in progress; after a completed one start a new one with the same seeds
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
        from ..utils.progress import progress

        ds, S = self.data_step, self._num_subsets
        n_sub = int(math.ceil(self.config.n_init / S)) * S
        sens = ds.sensitivity(None)
        x = torch.where(sens > 0, torch.ones_like(sens), torch.zeros_like(sens))
        t0 = time.perf_counter()
        for k in progress(range(n_sub), total=n_sub, desc="DDIP warm start (OSEM)", leave=False):
            x = em_update(ds, x, subset_of_iteration(k, S))
        self.timings["init"] += time.perf_counter() - t0
        self.counts["init_em"] += n_sub
        return x

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
        self.iteration, self._em_counter = 0, 0
        self.loglik_warm_start = self._log_likelihood(self.x)
        self.loglik_history, self.loglik_final_em = [], None

    def fit_pet_scaler(self, image: torch.Tensor):
        """Fit the prior's PET scaler on ``image`` inside the FOV (``scale_fov_fraction``), after in-plane smoothing
        (``scale_smooth_vox``); returns it."""
        import numpy as np
        from scipy.ndimage import gaussian_filter

        cfg = self.config
        arr = image.detach().to("cpu", torch.float64).numpy()
        sens = self.data_step.sensitivity(None).detach().to("cpu", torch.float64).numpy()
        arr = np.where(sens > cfg.scale_fov_fraction * float(sens.max()), arr, 0.0)
        if cfg.scale_smooth_vox > 0:
            arr = gaussian_filter(arr, [0.0, cfg.scale_smooth_vox, cfg.scale_smooth_vox], mode="constant")
        try:
            return self.prior.fit_pet(arr)
        except ValueError as exc:
            raise DataValueError(f"DDIP: cannot normalise the starting image for the prior: {exc}") from None

    def choose_prior_planes(self, warm_start: torch.Tensor) -> torch.Tensor:
        """The planes the prior runs on (bool ``[Z]``, CPU): all, or (``"anatomy"``) where the MR, or for a prior
        without MR the smoothed warm start, shows the subject (:func:`sirf_ddip.recon.planes.anatomy_planes`)."""
        if self.config.prior_planes == "all":
            return torch.ones(self._num_planes, dtype=torch.bool)
        sens = self.data_step.sensitivity(None).detach().to("cpu", torch.float64).numpy()
        if self._mr_net is not None:
            mr = self.data_step.to_tensor(self._mr_input).detach().to("cpu", torch.float64).numpy()
            return anatomy_planes(sens, mr, float(self.mr_scaler.scale), "the MR")
        vol = warm_start.detach().to("cpu", torch.float64).numpy()
        return anatomy_planes(sens, vol, float(self.pet_scaler.scale), "the warm start", self.config.scale_smooth_vox)

    def _use_prior_planes(self, planes: torch.Tensor | None) -> None:
        """Run the prior on ``planes`` (bool [Z]; None = all) and set the others from the data alone."""
        self._planes = PlaneSplit(planes, self._num_planes, self.device,
                                  "the MR" if self._mr_net is not None else "the warm start")
        self.prior_planes = self._planes.planes
        self.prior.set_active_planes(None if self._planes.everywhere else self.prior_planes)
        self._planes.log()

    def prior_planes_summary(self) -> str:
        """One line: which planes the prior runs on (for logs and the run record)."""
        return "prior planes not chosen yet (after the warm start)" if self._planes is None else self._planes.summary()

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
            self._x_img = self._image_step(self._tweedie(xt, eps, t), self._x_img, cfg.num_em * max(1, cfg.num_finetune))
            x0 = sampler.clamp(self._to_net(self._x_img))
        self._xt = sampler.step(xt, eps, i, x0, self._randn(xt.shape))
        self._x0_net = x0
        out = self._output(x0)
        self.loglik_history.append(self._log_likelihood(out))
        if i == len(sampler) - 1 and cfg.final_em > 0:
            out = self._final_em(out)
        self.timings["total"] += time.perf_counter() - t_step
        return out

    def _finetune(self, xt: torch.Tensor, t: int) -> None:
        """K AdamW steps on the adapters (:meth:`LoRAAdaptation.finetune`), each against a new HQS image step."""
        self.last_loss = self.adaptation.finetune(xt, t, lambda eps: self._tweedie(xt, eps, t), self._hqs_net)

    def _tweedie(self, xt: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """The clamped Tweedie x̂0, with the planes the data set alone taken from the HQS image."""
        return self._with_data_planes(self.sampler.x0(xt, eps, t))

    def _hqs_net(self, x0_net: torch.Tensor) -> torch.Tensor:
        """The HQS image step from ``x0_net``; the new HQS image in network units."""
        self._x_img = self._image_step(x0_net, self._x_img)
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

    def _with_data_planes(self, x0_net: torch.Tensor) -> torch.Tensor:
        """``x0_net`` with the planes the data set alone replaced by the HQS image (network units, clamped)."""
        if self._planes is None or self._planes.data_mask is None:
            return x0_net
        return self._planes.merge(self.sampler.clamp(self._to_net(self._x_img)), x0_net)

    def _image_step(self, x0_net: torch.Tensor, x_img: torch.Tensor, num_em: int | None = None) -> torch.Tensor:
        """HQS image step with the prior image ``x0_net`` (network units), from x̂0 or ``x_img`` (``em_start``)."""
        num_em = self.config.num_em if num_em is None else int(num_em)
        subsets = self._next_subsets(num_em)
        z = self.prior.from_network(x0_net.detach()).to(self.data_step.dtype)
        if self._planes is not None:   # planes without the subject: fused with the previous image (PET grid)
            z = self._planes.merge(x_img.to(z.dtype), z)
        start = z.clamp_min(1e-3 * float(self.pet_scaler.scale)) if self.config.em_start == "x0" else x_img
        out = hqs_image_step(self.data_step, start, z, self.beta_activity, num_em, subsets, timer=self.timings)
        self.counts["em_updates"] += num_em
        return out

    def _next_subsets(self, n: int) -> list[int | None]:
        """The view subsets of the next ``n`` EM updates (STIR's order, continued over the run)."""
        out = [subset_of_iteration(self._em_counter + k, self._num_subsets) for k in range(n)]
        self._em_counter += n
        return out

    def _output(self, x0_net: torch.Tensor) -> torch.Tensor:
        """The step's output in activity units: the clean image, the data's own on their planes, FOV-masked."""
        out = self.prior.from_network(x0_net).to(self.data_step.dtype)
        if self._planes is not None:   # the data's own image there (PET grid, unclamped)
            out = self._planes.merge(self._x_img.to(out.dtype), out)
        return self._masked(out)

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with zeros outside the scanner's FOV (zero sensitivity) when ``fov_mask`` is set."""
        if not self.config.fov_mask:
            return x
        sens = self.data_step.sensitivity(None)
        inside = sens > 0 if self.prior_grid is None else self.prior_grid.fov_mask(sens)
        return torch.where(inside, x, torch.zeros_like(x))

    def _final_em(self, x: torch.Tensor) -> torch.Tensor:
        """``final_em`` EM updates from the output ``x``, fused with it at ``final_em_beta`` (0 = plain EM)."""
        cfg = self.config
        subsets = self._next_subsets(cfg.final_em)
        beta = beta_activity(cfg.final_em_beta, self.pet_scaler.gain)
        start = x.clamp_min(1e-3 * float(self.pet_scaler.scale))
        out = self._masked(hqs_image_step(self.data_step, start, x, beta, cfg.final_em, subsets, timer=self.timings))
        self.counts["final_em_updates"] += cfg.final_em
        self.loglik_final_em = self._log_likelihood(out)
        return out

    # ------------------------------------------------------------------ small accessors
    def _to_net(self, x: torch.Tensor) -> torch.Tensor:
        return self.prior.to_network(x)

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self._gen, dtype=torch.float32).to(self.device)

    def _log_likelihood(self, x: torch.Tensor) -> float:
        """The Poisson log-likelihood ``Σ y log ŷ − ŷ`` (constants dropped, all data) of ``x``; timed."""
        t0 = time.perf_counter()
        val = float(self.data_step.value(x))
        self.timings["loglik"] += time.perf_counter() - t0
        return val

    @property
    def _num_planes(self) -> int:
        return int(self.data_step.image_shape[0])

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
        """β (network units) of the current step (``beta``, or scheduled to ``beta_final``: :func:`beta_schedule`)."""
        cfg = self.config
        if cfg.beta_final is None or not self._num_steps:
            return float(cfg.beta)
        t = self.sampler.t(min(self.iteration, self._num_steps - 1))
        return beta_schedule(cfg.beta, cfg.beta_final, t, cfg.t_start)

    # ------------------------------------------------------------------ running and diagnostics
    def remaining(self) -> int:
        return max(0, (self._num_steps if self.configured else self._num_subiterations) - self.iteration)

    def reconstruct(self, image: Any) -> Any:
        """SIRF ``reconstruct(image)``: run all diffusion steps and write the output into ``image`` in place (also
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

    def data_consistency(self) -> dict[str, Any]:
        """The run's data-consistency record (:func:`sirf_ddip.recon.diagnostics.data_consistency`)."""
        return diagnostics.data_consistency(self.loglik_warm_start, self.loglik_history, self.loglik_final_em)

    def progress_info(self) -> dict[str, Any]:
        t = self.sampler.t(self.iteration - 1) if self.configured and self.iteration > 0 else None
        return diagnostics.progress_fields(t, self.last_loss, self.loglik_warm_start, self.loglik_history,
                                           self.loglik_final_em, self.timings.get("total") or 0.0, self.iteration)

    def timing_report(self) -> dict[str, float]:
        """Mean seconds per diffusion step by part (network forward, fine-tune backward, projector, EM, total)."""
        return diagnostics.timing_report(self.timings, self.iteration)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/ddip_checkpoint.pt`` (:mod:`sirf_ddip.recon.checkpoint`): the state, the adapters, the
        RNG, the algorithm settings and the diagnostics so far."""
        from .checkpoint import write_checkpoint

        self._require_setup()
        if self._xt is None:
            raise NotSetUpError("DDIP: nothing to checkpoint before the warm start")
        cpu = {k: getattr(self, a).detach().cpu() for k, a in
               (("xt", "_xt"), ("x_img", "_x_img"), ("x0_net", "_x0_net"), ("x", "x"))}
        ad = self.adaptation.state_dict() if self.adaptation is not None else {"adapters": {}, "optimizer": None}
        state = {"iteration": int(self.iteration), "timesteps": [int(t) for t in self.sampler.timesteps],
                 "image_shape": [int(s) for s in self.data_step.image_shape], **cpu, **ad,
                 "generator": self._gen.get_state(), "em_counter": int(self._em_counter),
                 "pet_scale": float(self.pet_scaler.scale), "last_loss": self.last_loss,
                 "user_init": bool(self._user_init), "loglik_warm_start": self.loglik_warm_start,
                 "loglik_history": [float(v) for v in self.loglik_history], "loglik_final_em": self.loglik_final_em,
                 "prior_grid": self._prior_grid_record(),
                 "prior_planes": [bool(v) for v in self.prior_planes.tolist()] if self.prior_planes is not None else None,
                 "timings": dict(self.timings), "counts": dict(self.counts)}
        return write_checkpoint(folder, state, self.config.algorithm_dict())

    def _prior_grid_record(self) -> str | None:
        """What the network's grid is (None: the PET grid is the prior's own); checked when a checkpoint is read."""
        return None if self.prior_grid is None else self.prior_grid.describe()

    def _xt_shape(self) -> tuple[int, ...]:
        """Shape of x_t: the PET planes on the prior's in-plane grid."""
        hw = tuple(self.data_step.image_shape[1:]) if self.prior_grid is None else tuple(self.prior_grid.prior_shape_yx)
        return (int(self.data_step.image_shape[0]),) + tuple(int(v) for v in hw)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore a :meth:`save_checkpoint` state (after ``set_up`` on the same data, prior and MR).

        Raises :class:`InputFileError` for a missing/corrupt checkpoint or one of another image shape or prior grid,
        :class:`ConfigError` when an algorithm key differs (the ``run`` options need not match).
        """
        from .checkpoint import read_checkpoint

        self._require_setup()
        state = read_checkpoint(folder, self.config.algorithm_dict(), tuple(self.data_step.image_shape),
                                defaults=DDIPConfig().algorithm_dict())
        check_resumable(state, folder, self._prior_grid_record(), self._xt_shape())
        dev, dt = self.device, self.data_step.dtype
        self.sampler.timesteps = list(state["timesteps"])
        self._xt, self._x0_net = state["xt"].to(dev), state["x0_net"].to(dev)
        self._x_img, self.x = state["x_img"].to(dev, dt), state["x"].to(dev, dt)
        if self.adaptation is not None:
            self.adaptation.load_state_dict(state["adapters"], state.get("optimizer"))
        self._gen.set_state(state["generator"])
        self._em_counter = int(state["em_counter"])
        self.prior.set_pet_scale(float(state["pet_scale"]))
        self.last_loss, self._user_init = state.get("last_loss"), bool(state.get("user_init", False))
        self.loglik_warm_start, self.loglik_final_em = state.get("loglik_warm_start"), state.get("loglik_final_em")
        self.loglik_history = [float(v) for v in state.get("loglik_history", [])]
        planes = state.get("prior_planes")   # a checkpoint from before prior_planes ran the prior on every plane
        self._use_prior_planes(torch.tensor(planes, dtype=torch.bool) if planes is not None else None)
        for mine, key in ((self.timings, "timings"), (self.counts, "counts")):   # the whole run's time and work
            mine.clear()
            mine.update(state.get(key) or {})
        self.iteration = int(state["iteration"])
