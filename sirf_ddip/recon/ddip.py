"""DDIPReconstructor: HQS Deep Diffusion Image Prior reconstruction (Hashimoto & Gong 2025), fully 3D.

Algorithm (one diffusion step ``t → t′`` of the strided sequence ``T′ … 0``)
-------------------------------------------------------------------------
State: ``x_t`` (the whole volume ``[Z, H, W]`` in network units) and the HQS image ``x`` (activity units).

1. *Fine-tune* (``K = num_finetune`` times; the AdamW optimiser is new at every diffusion step, the LoRA adapters
   persist over the whole run):

   a. ``x̂0 = Tweedie(x_t, ε_θ(x_t, t, MR))``: the network runs on every overlapping 3-plane slab of the volume
      (:class:`sirf_ddip.prior.slabs.DiffusionPrior`, batches of ``run.slab_batch``), ε averaged per plane; x̂0
      clamped to ``x0_clamp``.
   b. HQS image step (:func:`sirf_ddip.recon.hqs.hqs_image_step`): ``num_em`` EM updates on the whole 3D data
      (all segments; view subsets cycle when ``num_subsets > 1``, β stays the whole data's), starting from x̂0
      (``em_start = "x0"``, default) or from the previous image step's ``x`` (``"previous"``), each fused in
      closed form with ``z = x̂0`` in activity units, β converted from network units as ``β_a = β g²``.
   c. One AdamW step (gradient-norm clip) on the LoRA adapters (+ biases, ``adapter_rule``) against
      :func:`finetune_loss` over a random mini-batch of ``finetune_slabs`` slabs: with ``finetune_target =
      "data"`` each slab's x̂0 is pulled by the data's correction ``u(x) − fold(x̂0)`` of the volume estimate
      (``u(x)`` the HQS image in network units, detached). The projector never enters back-propagation.

2. *DDIM step* from the fine-tuned network's ε (x̂0 clamped; ε re-derived from the clamped x̂0), with η as the
   authors use it (``eta_mode = "dds"``: fresh noise std ``η√(1−ᾱ_{t'})``) or Song's σ_t (``"ddim"``).

The output is the last x̂0 in activity units, zero outside the scanner's FOV (``fov_mask``), optionally followed by
``final_em`` EM updates on the data alone (the "trust the data" knob). Every step logs the Poisson log-likelihood
of the output (:meth:`DDIPReconstructor.data_consistency`; the warm start's too). ``finetune = False`` is the
"diffusion prior without adaptation" baseline: the image step runs ``K`` times per diffusion step against the
prior's x̂0 (the same projector budget as the adapted run) and its image (clamped, in network units) is the x̂0 of
the DDIM step (DDS/DiffPIR-style plug-in).

Warm start: ``n_init`` MLEM-equivalent iterations (``ceil(n_init/S)`` OSEM iterations of ``S`` subsets) from a
uniform image — or the image given to :meth:`set_current_estimate` — mapped to network units with the prior's
PET scaler (fitted on that image inside the FOV after in-plane smoothing, :meth:`fit_pet_scaler`), clamped to
the network range and forward-noised to ``T′ = t_start``. The HQS image ``x`` starts there too.

Planes without the subject (``prior_planes = "anatomy"``, :meth:`DDIPReconstructor.choose_prior_planes`): the
prior was trained on slabs through the head. Planes where the MR shows no subject (the rest of a 127-plane mMR
volume beyond the head, or beyond a short MR) are not given to the network: only slabs holding at least one
subject plane run, and on the other planes x̂0 is the current HQS image, so the image step there fuses EM with the
previous image (EM on the data alone, on the PET grid) and the output there is that image.

Fixes over the reference code: sensitivities cached by the data step (not recomputed per EM update), the network
in eval mode (no dropout) throughout, every random draw from one seeded generator (deterministic on CPU; noise is
drawn on the CPU so CPU and CUDA runs see the same noise).
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

import numpy as np
import torch

from ..errors import ConfigError, DataValueError, GeometryMismatchError, InputFileError
from ..physics.subsets import subset_of_iteration
from .base import IterativeReconstructor, NotSetUpError, fill_in_place
from .checkpoint import CHECKPOINT_FILE, CHECKPOINT_FORMAT  # noqa: F401  (re-exported)
from .config import DDIPConfig
from .em import em_update
from .hqs import beta_activity, beta_schedule, hqs_image_step

#: ``prior_planes = "anatomy"``: a plane shows the subject when at least ``ANATOMY_MIN_FRACTION`` of its voxels inside
#: the FOV exceed ``ANATOMY_LEVEL`` × the reference level (the scaler's 99th percentile) of the MR (or warm start).
ANATOMY_LEVEL = 0.1
ANATOMY_MIN_FRACTION = 0.005


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
    from .osem import gaussian_filter_mm

    fwhm = float(sigma_vox) * 2.0 * math.sqrt(2.0 * math.log(2.0))
    one = (1.0, 1.0, 1.0)
    num = gaussian_filter_mm(correction, fwhm, one)
    den = gaussian_filter_mm(torch.ones_like(correction), fwhm, one)
    return num / den


class DDIPReconstructor(IterativeReconstructor):
    """HQS-DDIP reconstruction on any :class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood`.

    Parameters
    ----------
    config : DDIPConfig, dict, path to YAML, or None
        Settings (None = :class:`DDIPConfig` defaults, i.e. the paper's).
    **overrides
        Individual config keys (unknown keys are :class:`~sirf_ddip.errors.ConfigError`).

    Notes
    -----
    The number of diffusion steps is the config key ``num_steps`` (``set_num_subiterations`` from a SIRF script
    does not change it, with a warning); ``set_num_subsets(n)`` sets the view subsets of the EM updates. ``self.x`` / :meth:`get_current_estimate` is the current x̂0 in activity units (after the warm
    start: the warm-start image). ``reconstruct(image)`` uses ``image`` only as geometry template and starts from
    the MLEM warm start unless :meth:`set_current_estimate` was called (unlike OSEM, a DDIP run from a uniform
    image is meaningless).
    """

    def __init__(self, config: DDIPConfig | dict | str | os.PathLike | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:  # the shipped settings (sirf_ddip/recon/ddip.yaml), as the CLI
            cfg = DDIPConfig.shipped()
        elif isinstance(config, DDIPConfig):
            cfg = copy.deepcopy(config)
        elif isinstance(config, dict):
            cfg = DDIPConfig.from_dict(config)
        elif isinstance(config, (str, os.PathLike)):
            cfg = DDIPConfig.load(config)
        else:
            raise TypeError(f"DDIPReconstructor: config must be a DDIPConfig, dict or YAML path, not "
                            f"{type(config).__name__}")
        if overrides:
            cfg = cfg.replace(**overrides)
        if cfg.finetune and cfg.num_finetune < 1:
            raise ConfigError("DDIP config: key 'num_finetune' must be >= 1 when finetune is true "
                              "(use finetune=false for the no-adaptation baseline)")
        self.config = cfg
        self._num_subsets = cfg.num_subsets
        self._num_subiterations = cfg.num_steps
        self._prior_source: Any = None
        self._mr_input: Any = None
        self.bundle = None
        self.network = None
        self.schedule = None
        self.prior = None      # the DiffusionPrior (network, slabs, units) built by set_up
        self.mr_scaler = None
        self._mr_net: torch.Tensor | None = None
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.x = None
        self.iteration = 0
        self._xt: torch.Tensor | None = None
        self._x_img: torch.Tensor | None = None      # HQS image (activity units)
        self._x0_net: torch.Tensor | None = None     # last clamped x̂0 (network units)
        self._user_init = False
        self._em_counter = 0
        self._gen: torch.Generator | None = None
        self.last_loss: float | None = None
        self._optimizer: torch.optim.Optimizer | None = None   # the run's AdamW (finetune_optimizer "persist")
        self.loglik_warm_start: float | None = None   # Poisson log-likelihood of the warm start
        self.loglik_history: list[float] = []         # ... of the output after every diffusion step
        self.loglik_final_em: float | None = None     # ... after the final data-consistency stage (final_em)
        self.timings: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.prior_planes: torch.Tensor | None = None   # bool [Z]: planes the prior runs on (None: not chosen yet)
        self._data_planes: torch.Tensor | None = None   # bool [Z, 1, 1] on the device: planes set by the data alone

    # ------------------------------------------------------------------ SIRF-style setters
    def set_prior(self, prior: Any = None) -> None:
        """Prior weights: a path (``.safetensors`` or folder), a :class:`~sirf_ddip.prior.weights.PriorBundle`,
        or None for the shipped default (:func:`~sirf_ddip.prior.weights.load_default`)."""
        self._prior_source = prior
        self.configured = False

    def set_anatomical_image(self, mr: Any) -> None:
        """The co-registered MR (T1) on the PET image grid (a backend image; same grid as the template)."""
        self._mr_input = mr
        self.configured = False

    def set_num_subsets(self, n: int) -> None:
        super().set_num_subsets(n)
        self.config = self.config.replace(num_subsets=int(n))

    def set_num_subiterations(self, n: int) -> None:
        """SIRF's sub-iteration count: recorded, but it does **not** change the diffusion schedule.

        A SIRF/OSEM script sets ``set_num_subiterations(iterations × subsets)`` for OSMAPOSL; the number of
        diffusion steps of DDIP is the config key ``num_steps`` (``DDIPReconstructor(num_steps=…)`` or the YAML),
        so a differing count is reported with a warning instead of silently replacing the schedule.
        :meth:`get_num_subiterations` returns the diffusion steps that ``process()`` runs.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"num_subiterations must be >= 0, got {n}")
        self._sirf_num_subiterations = n
        steps = len(self._timesteps) if self.configured and getattr(self, "_timesteps", None) else \
            self.config.num_steps
        if n != steps:
            warnings.warn(f"DDIPReconstructor.set_num_subiterations({n}) does not change the diffusion schedule: "
                          f"DDIP runs num_steps = {steps} diffusion steps (set num_steps in the config or "
                          "DDIPReconstructor(num_steps=...))", stacklevel=2)

    # ------------------------------------------------------------------ set-up
    def _load_bundle(self, device: torch.device):
        from ..prior import weights as W

        src = self._prior_source
        if src is None:
            return W.load_default(device=device)
        if isinstance(src, (str, os.PathLike)):
            return W.load_prior(src, device=device)
        if hasattr(src, "network") and hasattr(src, "schedule") and hasattr(src, "pet_scaling"):
            return src
        raise TypeError(f"set_prior: expected a weights path, a PriorBundle or None, got {type(src).__name__}")

    def _check_grid(self, image: Any, what: str) -> None:
        tgrid = getattr(self._template, "grid", None)
        grid = getattr(image, "grid", None)
        if tgrid is not None and grid is not None and hasattr(tgrid, "matches") and not tgrid.matches(grid):
            raise GeometryMismatchError(
                f"{what} grid (shape {grid.shape}, voxel {grid.voxel_size} mm, origin {grid.origin} mm) differs "
                f"from the PET image grid (shape {tgrid.shape}, voxel {tgrid.voxel_size} mm, origin {tgrid.origin} "
                f"mm); resample the {what} onto the PET grid")

    def _set_up(self, template: torch.Tensor) -> None:
        cfg = self.config
        ds = self.data_step
        dev = ds.device
        if cfg.device not in ("auto", None):
            from ..utils.device import resolve_device

            want = resolve_device(cfg.device)
            if want.type != torch.device(dev).type:
                raise ConfigError(f"DDIP config: key 'device' is {cfg.device!r} but the data step's tensors are on "
                                  f"{dev}; build the data step on the same device")
        self.device = torch.device(dev)
        # run.num_threads is applied by the CLI only: torch's thread count is process-wide, a library must not
        # change it under its caller
        bundle = self._load_bundle(self.device)
        self.bundle = bundle
        self.schedule = bundle.schedule
        if not 0 <= cfg.t_start < self.schedule.num_train_steps:
            raise ConfigError(f"DDIP config: key 't_start' = {cfg.t_start} outside [0, "
                              f"{self.schedule.num_train_steps - 1}] of the prior's schedule")
        net = copy.deepcopy(bundle.network).to(self.device).float().eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
        if cfg.finetune:
            from ..prior.adapters import add_lora, reset_adapters

            add_lora(net, rank=cfg.lora_rank, alpha=cfg.lora_alpha, train_biases=cfg.train_biases,
                     rule=cfg.adapter_rule, init=cfg.lora_init)
            reset_adapters(net, generator=self._gen)   # seeded A-matrices, B = 0: exactly the prior
        self.network = net
        # ---- MR conditioning
        from ..prior.grid import PriorGrid, mr_on_pet_grid

        pet_grid = getattr(ds, "grid", None) or getattr(self._template, "grid", None)
        self.prior_grid = None
        if pet_grid is not None:
            pg = PriorGrid.from_bundle(pet_grid, bundle, mode=cfg.prior_grid,
                                       fov_radius_mm=cfg.prior_fov_radius_mm)
            self.prior_grid = None if pg.is_identity else pg
        uses_mr = bool(getattr(net, "uses_mr", False))
        self._mr_net = None
        if uses_mr:
            if not cfg.use_mr:
                raise ConfigError("DDIP config: key 'use_mr' is false but the prior is MR-conditioned; give an MR "
                                  "(--mr) or use a prior trained without MR")
            if self._mr_input is None:
                raise ConfigError("the prior is MR-conditioned but no MR image was given "
                                  "(set_anatomical_image(mr) / --mr MR.hv)")
            if pet_grid is not None and hasattr(self._mr_input, "grid") and hasattr(self._mr_input, "array"):
                self._mr_input = mr_on_pet_grid(self._mr_input, pet_grid)
            self._check_grid(self._mr_input, "MR")
            mr = ds.to_tensor(self._mr_input)
            if tuple(mr.shape) != tuple(ds.image_shape):
                raise GeometryMismatchError(f"MR image shape {tuple(mr.shape)} != PET image shape "
                                            f"{tuple(ds.image_shape)}; resample the MR onto the PET grid")
            if not bool(torch.isfinite(mr).all()):
                raise DataValueError("MR image contains NaN or Inf values")
            if bundle.mr_scaling is None:
                raise InputFileError(getattr(bundle, "path", "prior"), "MR-conditioned prior without MR scaling",
                                     key="mr_scaling")
            try:
                self.mr_scaler = bundle.mr_scaling.fit(mr.detach().cpu().numpy())
            except ValueError as exc:
                raise DataValueError(f"MR image: {exc}") from None
            mr_p = mr if self.prior_grid is None else self.prior_grid.to_prior(mr)
            self._mr_net = self.mr_scaler.to_net(mr_p.to(self.device, torch.float32))
        elif self._mr_input is not None and cfg.use_mr:
            import warnings

            warnings.warn("DDIP: the prior is not MR-conditioned; the MR image is ignored", stacklevel=2)
        ds.set_num_subsets(self._num_subsets)
        self._timesteps = self.schedule.timesteps(cfg.t_start, cfg.num_steps)
        self._num_subiterations = len(self._timesteps)
        gen = self._gen
        self._reset_state()
        self._gen = gen
        from ..prior.slabs import DiffusionPrior

        self.prior = DiffusionPrior(net, self.schedule, bundle.pet_scaling, mr_net=self._mr_net,
                                    mr_pad_value=self.mr_scaler.lo if self.mr_scaler is not None else -1.0,
                                    batch_size=cfg.slab_batch, timings=self.timings, counts=self.counts,
                                    grid=self.prior_grid, mr_guidance=cfg.mr_guidance)

    # ------------------------------------------------------------------ estimates
    def _initialise_estimate(self, x: torch.Tensor) -> torch.Tensor:
        """``set_current_estimate`` / ``update(image)``: what an image does depends on where the run is.

        - before the first diffusion step: it seeds the warm start (replaces the MLEM warm start);
        - during the run: it becomes the current estimate only; the diffusion state (``x_t`` and the HQS image)
          and the schedule continue, so SIRF's canonical loop (``update_current_estimate``;
          ``image.fill(get_current_estimate())``; ``set_current_estimate(image)``, SIRF's
          ``examples/Python/PET/osem_reconstruction.py``) gives what ``process()`` gives;
        - after the last step: it seeds the next run, which the next ``process()`` starts (next frame or gate).
        """
        if not bool(torch.isfinite(x).all()):
            raise DataValueError("set_current_estimate: image contains NaN or Inf")
        if float(x.min()) < 0:
            raise DataValueError(f"set_current_estimate: image has negative values (min {float(x.min()):.4g})")
        steps = len(getattr(self, "_timesteps", []) or [])
        if self.iteration == 0:
            self._xt = None
            self._user_init = True
            self._next_seed = None
        elif self.iteration >= steps:
            self._next_seed = x.clone()
        return x

    def _prepare_process(self) -> None:
        """``process()``: finish a run in progress (e.g. after ``load_checkpoint`` or ``run(k)``); after a
        completed run start a new one (seeded by an image set since, else the MLEM warm start) with the same
        seeds, so ``set_current_estimate(b); process()`` twice gives the same image twice."""
        steps = len(getattr(self, "_timesteps", []) or [])
        if self.iteration < steps:
            return
        seed = getattr(self, "_next_seed", None)
        self._set_up(self._template_tensor)
        self._next_seed = None
        if seed is not None:
            self.x = seed
            self._user_init = True

    def warm_start(self) -> torch.Tensor:
        """The MLEM/OSEM warm start: ``ceil(n_init/S)`` OSEM iterations (S subsets) from a uniform image."""
        from ..utils.progress import progress

        ds = self.data_step
        S = self._num_subsets
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
        """Warm start (unless an estimate was set), fit the PET scaler, forward-noise to ``t_start``."""
        self._require_setup()
        cfg = self.config
        x0 = self.x if (self._user_init and self.x is not None) else self.warm_start()
        x0 = x0.detach().clamp_min(0)
        if not bool(torch.isfinite(x0).all()):
            raise DataValueError("DDIP warm start contains NaN or Inf (check the data and factors)")
        self.fit_pet_scaler(x0)
        self._use_prior_planes(self.choose_prior_planes(x0))
        # the network range is bounded: EM's edge artefacts must not enter it at hundreds of network units
        u0 = self.prior.to_network(x0).clamp(*cfg.x0_clamp)
        noise = self._randn(u0.shape)
        self._xt = self.schedule.q_sample(u0, int(self._timesteps[0]), noise)
        self._x_img = x0.clone()
        self._x0_net = u0.clamp(*cfg.x0_clamp)
        self.x = x0.clone()
        self.iteration = 0
        self._em_counter = 0
        self.loglik_warm_start = self._log_likelihood(self.x)
        self.loglik_history = []
        self.loglik_final_em = None

    # ------------------------------------------------------------------ data consistency
    def _log_likelihood(self, x: torch.Tensor) -> float:
        """The Poisson log-likelihood ``Σ y log ŷ − ŷ`` (constants dropped, all data) of ``x``; timed."""
        t0 = time.perf_counter()
        val = float(self.data_step.value(x))
        self.timings["loglik"] += time.perf_counter() - t0
        return val

    def data_consistency(self) -> dict[str, Any]:
        """The data-consistency diagnostic of this run (for the run record).

        Returns
        -------
        dict
            ``loglik_warm_start`` (the MLEM/OSEM warm start), ``loglik_output`` (the current output),
            ``loglik_gain`` (output − warm start: negative = the output explains the data worse than the warm
            start), ``loglik_per_step`` (after every diffusion step) and ``loglik_final_em`` when that stage ran.
            All are STIR's Poisson log-likelihood ``Σ y log ŷ − ŷ`` with constants dropped (larger = closer to
            the data).
        """
        out: dict[str, Any] = {"loglik_warm_start": self.loglik_warm_start,
                               "loglik_per_step": [float(f"{v:.8g}") for v in self.loglik_history]}
        last = self.loglik_final_em if self.loglik_final_em is not None else (
            self.loglik_history[-1] if self.loglik_history else self.loglik_warm_start)
        out["loglik_output"] = last
        if last is not None and self.loglik_warm_start is not None:
            out["loglik_gain"] = float(last - self.loglik_warm_start)
        if self.loglik_final_em is not None:
            out["loglik_final_em"] = self.loglik_final_em
        return out

    @property
    def pet_scaler(self):
        """The prior's PET scaler as fitted on the warm start (None before it)."""
        return None if self.prior is None else self.prior.pet_scaler

    def fit_pet_scaler(self, image: torch.Tensor):
        """Fit the prior's PET scaler on ``image`` inside the FOV, after in-plane smoothing (see the config
        keys ``scale_fov_fraction`` and ``scale_smooth_vox``); returns it."""
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

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self._gen, dtype=torch.float32).to(self.device)

    @property
    def timesteps(self) -> list[int]:
        """The diffusion steps of this run (descending, last 0)."""
        return list(self._timesteps)

    @property
    def beta_activity(self) -> float:
        """β of the HQS image step of the current diffusion step in activity units (``β(t) g²``; ``beta_final``
        schedules β(t), :func:`sirf_ddip.recon.hqs.beta_schedule`)."""
        if self.pet_scaler is None:
            raise NotSetUpError("DDIP: beta in activity units is known after the warm start (PET scaler fitted)")
        return beta_activity(self.beta_network, self.pet_scaler.gain)

    @property
    def beta_network(self) -> float:
        """β (network units) of the current diffusion step's image step (``beta`` unless ``beta_final`` is set)."""
        cfg = self.config
        steps = getattr(self, "_timesteps", None)
        if cfg.beta_final is None or not steps:
            return float(cfg.beta)
        t = int(steps[min(self.iteration, len(steps) - 1)])
        return beta_schedule(cfg.beta, cfg.beta_final, t, cfg.t_start)

    # ------------------------------------------------------------------ slabs (the prior's)
    @property
    def _num_planes(self) -> int:
        return int(self.data_step.image_shape[0])

    # ------------------------------------------------------------------ the planes the prior runs on
    def choose_prior_planes(self, warm_start: torch.Tensor) -> torch.Tensor:
        """The planes the prior runs on (``prior_planes``): boolean ``[Z]`` on the CPU.

        ``"all"``: every plane. ``"anatomy"``: the planes where the subject is, i.e. where at least
        ``ANATOMY_MIN_FRACTION`` of the plane's voxels inside the FOV exceed ``ANATOMY_LEVEL`` × the reference level
        of the MR (MR-conditioned prior: the MR on the PET grid, reference = the MR scaler's fitted level) or of the
        in-plane smoothed warm start (prior without MR: the PET scaler's level). The prior never saw slabs without
        a subject in training; on such planes (beyond the head, or beyond the MR's axial coverage) its x̂0 is made
        up, so they are reconstructed from the data alone (see the class docstring).

        Raises
        ------
        DataValueError
            ``"anatomy"`` and no plane shows the subject (an empty or misregistered MR).
        """
        Z = self._num_planes
        if self.config.prior_planes == "all":
            return torch.ones(Z, dtype=torch.bool)
        sens = self.data_step.sensitivity(None).detach().to("cpu", torch.float64).numpy()
        inside = sens > 0
        if self._mr_net is not None:
            vol = self.data_step.to_tensor(self._mr_input).detach().to("cpu", torch.float64).numpy()
            ref, what = float(self.mr_scaler.scale), "the MR"
        else:
            from scipy.ndimage import gaussian_filter

            vol = warm_start.detach().to("cpu", torch.float64).numpy()
            sv = self.config.scale_smooth_vox
            if sv > 0:
                vol = gaussian_filter(np.where(inside, vol, 0.0), [0.0, sv, sv], mode="constant")
            ref, what = float(self.pet_scaler.scale), "the warm start"
        above = ((vol > ANATOMY_LEVEL * ref) & inside).reshape(Z, -1).sum(axis=1)
        n_in = np.maximum(inside.reshape(Z, -1).sum(axis=1), 1)
        planes = torch.from_numpy(above >= ANATOMY_MIN_FRACTION * n_in)
        if not bool(planes.any()):
            raise DataValueError(f"DDIP: {what} shows no subject on any plane (no plane has "
                                 f"{100 * ANATOMY_MIN_FRACTION:g} % of its FOV voxels above "
                                 f"{100 * ANATOMY_LEVEL:g} % of its reference level {ref:.4g}); check the image and "
                                 f"its registration, or set prior_planes: all")
        return planes

    def _use_prior_planes(self, planes: torch.Tensor | None) -> None:
        """Run the prior on ``planes`` (bool [Z]; None = all) and set the others from the data alone."""
        Z = self._num_planes
        planes = torch.ones(Z, dtype=torch.bool) if planes is None else torch.as_tensor(planes, dtype=torch.bool)
        if int(planes.numel()) != Z:
            raise DataValueError(f"DDIP: {int(planes.numel())} prior planes given for a {Z}-plane image")
        self.prior_planes = planes.cpu()
        everywhere = bool(planes.all())
        self.prior.set_active_planes(None if everywhere else planes)
        self._data_planes = None if everywhere else (~planes).to(self.device).reshape(-1, 1, 1)
        if not everywhere:
            import logging

            logging.getLogger("sirf_ddip").info("DDIP: %s", self.prior_planes_summary())

    def prior_planes_summary(self) -> str:
        """One line: which planes the prior runs on (for logs and the run record)."""
        if self.prior_planes is None:
            return "prior planes not chosen yet (after the warm start)"
        p = self.prior_planes.numpy()
        Z = int(p.size)
        if p.all():
            return f"the prior runs on all {Z} planes"
        idx = np.nonzero(p)[0]
        runs, start = [], int(idx[0])
        for a, b in zip(idx[:-1], idx[1:]):
            if b != a + 1:
                runs.append((start, int(a)))
                start = int(b)
        runs.append((start, int(idx[-1])))
        where = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)
        return (f"the prior runs on {int(p.sum())} of {Z} planes ({where}, 0-based); the other {Z - int(p.sum())} "
                f"show no subject in {'the MR' if self._mr_net is not None else 'the warm start'} and are "
                f"reconstructed from the data alone")

    def _with_data_planes(self, x0_net: torch.Tensor) -> torch.Tensor:
        """``x0_net`` with the planes outside :attr:`prior_planes` replaced by the current HQS image (network
        units, clamped), for the DDIM step and the fine-tuning target; the image step itself fuses EM there with
        the previous image on the PET grid (:meth:`_image_step`), i.e. EM on the data alone."""
        if self._data_planes is None:
            return x0_net
        u = self._to_net(self._x_img).clamp(*self.config.x0_clamp)
        return torch.where(self._data_planes, u, x0_net)

    # ------------------------------------------------------------------ the image step
    def _image_step(self, x0_net: torch.Tensor, x_img: torch.Tensor, num_em: int | None = None) -> torch.Tensor:
        """HQS image step with the prior image ``x0_net`` (network units), from x̂0 or ``x_img`` (``em_start``)."""
        cfg = self.config
        ds = self.data_step
        num_em = cfg.num_em if num_em is None else int(num_em)
        S = self._num_subsets
        subsets = []
        for _ in range(num_em):
            subsets.append(subset_of_iteration(self._em_counter, S))
            self._em_counter += 1
        z = self.prior.from_network(x0_net.detach()).to(ds.dtype)
        if self._data_planes is not None:   # planes without the subject: fused with the previous image (PET grid)
            z = torch.where(self._data_planes, x_img.to(z.dtype), z)
        if cfg.em_start == "x0":
            start = z.clamp_min(1e-3 * float(self.pet_scaler.scale))
        else:
            start = x_img
        out = hqs_image_step(ds, start, z, self.beta_activity, num_em, subsets, timer=self.timings)
        self.counts["em_updates"] += num_em
        return out

    def _to_net(self, x: torch.Tensor) -> torch.Tensor:
        return self.prior.to_network(x)

    # ------------------------------------------------------------------ one diffusion step
    def update_current_estimate(self) -> None:
        """One diffusion step (warm start first if needed). Raises ``StopIteration`` when all steps are done."""
        self._require_setup()
        if self._xt is None:
            self.initialise()
        if self.iteration >= len(self._timesteps):
            raise StopIteration(f"DDIP: all {len(self._timesteps)} diffusion steps are done")
        self.x = self._update(self.x)
        self.iteration += 1
        self._after_update()  # SIRF surface: the image held by update(image), save-interval files

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        sched = self.schedule
        i = self.iteration
        t = int(self._timesteps[i])
        t_prev = int(sched.previous(self._timesteps, i))
        lo, hi = cfg.x0_clamp
        xt = self._xt
        t_step = time.perf_counter()
        if cfg.finetune:
            self._finetune(xt, t)
            eps = self.prior.eps(xt, t)
            if cfg.ddim_x0 == "hqs":   # the data-fused image steers the trajectory (DDS-style), ε̂ from the adapted net
                x0 = self._to_net(self._x_img)
                if cfg.correction_sigma_vox > 0:
                    x0 = self._smoothed_target(
                        self._with_data_planes(sched.tweedie_x0(xt, eps, t).clamp(lo, hi)), x0)
                x0 = x0.clamp(lo, hi)
            else:
                x0 = self._with_data_planes(sched.tweedie_x0(xt, eps, t).clamp(lo, hi))
        else:
            eps = self.prior.eps(xt, t)
            x0_prior = self._with_data_planes(sched.tweedie_x0(xt, eps, t).clamp(lo, hi))
            # same projector budget as the adapted run: K·N_em fused EM updates against the fixed x̂0
            self._x_img = self._image_step(x0_prior, self._x_img, cfg.num_em * max(1, cfg.num_finetune))
            x0 = self._to_net(self._x_img).clamp(lo, hi)
        noise = self._randn(xt.shape)
        self._xt = sched.ddim_step(xt, eps, t, t_prev, eta=cfg.eta, noise=noise, x0=x0, eta_mode=cfg.eta_mode)
        self._x0_net = x0
        out = self.prior.from_network(x0).to(self.data_step.dtype)
        if self._data_planes is not None:   # the data's own image there (PET grid, unclamped)
            out = torch.where(self._data_planes, self._x_img.to(out.dtype), out)
        out = self._masked(out)
        self.loglik_history.append(self._log_likelihood(out))
        if i == len(self._timesteps) - 1 and cfg.final_em > 0:
            out = self._final_em(out)
        self.timings["total"] += time.perf_counter() - t_step
        return out

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with zeros outside the scanner's FOV (zero sensitivity) when ``fov_mask`` is set."""
        if not self.config.fov_mask:
            return x
        sens = self.data_step.sensitivity(None)
        inside = sens > 0 if self.prior_grid is None else self.prior_grid.fov_mask(sens)
        return torch.where(inside, x, torch.zeros_like(x))

    def _final_em(self, x: torch.Tensor) -> torch.Tensor:
        """The data-consistency stage: ``final_em`` EM updates from the DDIP output ``x`` (fused with ``x`` at
        ``final_em_beta``; 0 = plain EM/OSEM)."""
        cfg = self.config
        S = self._num_subsets
        subsets = []
        for _ in range(cfg.final_em):
            subsets.append(subset_of_iteration(self._em_counter, S))
            self._em_counter += 1
        beta = beta_activity(cfg.final_em_beta, self.pet_scaler.gain)
        start = x.clamp_min(1e-3 * float(self.pet_scaler.scale))
        out = self._masked(hqs_image_step(self.data_step, start, x, beta, cfg.final_em, subsets,
                                          timer=self.timings))
        self.counts["final_em_updates"] += cfg.final_em
        self.loglik_final_em = self._log_likelihood(out)
        return out

    def _smoothed_target(self, x0: torch.Tensor, x_hqs: torch.Tensor) -> torch.Tensor:
        """``x0 + smooth(x_hqs − x0)`` (network units) with ``correction_sigma_vox``; ``x_hqs`` when it is 0."""
        sigma = self.config.correction_sigma_vox
        if sigma <= 0:
            return x_hqs
        return x0 + smooth_correction(x_hqs - x0, sigma)

    def _finetune(self, xt: torch.Tensor, t: int) -> None:
        """K AdamW steps on the adapters (a fresh optimiser; the run's one with ``finetune_optimizer: persist``), each
        against a new HQS image."""
        from ..prior.adapters import lora_parameters

        cfg = self.config
        sched = self.schedule
        lo, hi = cfg.x0_clamp
        params = lora_parameters(self.network)
        if cfg.finetune_optimizer == "persist":
            if self._optimizer is None:
                self._optimizer = self._new_optimizer()
            opt = self._optimizer
        else:   # the authors' code: a fresh AdamW each diffusion step
            opt = self._new_optimizer()
        Z = self._num_planes
        active = self.prior.slab_indices(Z)          # the slabs the prior runs on (all, or prior_planes')
        n = int(active.numel())
        m = n if cfg.finetune_slabs == 0 else min(cfg.finetune_slabs, n)
        b = cfg.slab_batch
        reuse = (m == n and n <= b)   # one forward with autograd serves both x̂0 and the loss
        for _ in range(cfg.num_finetune):
            opt.zero_grad(set_to_none=True)
            if reuse:
                idx_all = active.to(xt.device)
                with torch.enable_grad():
                    eps_s = self.prior.eps_slabs(xt, t, idx_all)
                eps_v = self.prior.fold(eps_s.detach(), Z, idx_all)
                x0 = self._with_data_planes(sched.tweedie_x0(xt, eps_v, t).clamp(lo, hi))
                self._x_img = self._image_step(x0, self._x_img)
                target = self._smoothed_target(x0, self._to_net(self._x_img))
                loss = self._slab_loss(xt, t, idx_all, target, x0, eps_s, n * int(np.prod(eps_s.shape[1:])))
                self.last_loss = float(loss)
            else:
                eps_v = self.prior.eps(xt, t)
                x0 = self._with_data_planes(sched.tweedie_x0(xt, eps_v, t).clamp(lo, hi))
                self._x_img = self._image_step(x0, self._x_img)
                target = self._smoothed_target(x0, self._to_net(self._x_img))
                pick = torch.arange(n) if m == n else torch.randperm(n, generator=self._gen)[:m]
                idx = active[pick].to(xt.device)
                total = 0.0
                plane_elems = int(np.prod(xt.shape[1:])) * self.prior.slab
                for j in range(0, m, b):
                    sub = idx[j:j + b]
                    with torch.enable_grad():
                        eps_s = self.prior.eps_slabs(xt, t, sub)
                    total += float(self._slab_loss(xt, t, sub, target, x0, eps_s, m * plane_elems))
                self.last_loss = total
            t0 = time.perf_counter()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            self.timings["finetune_backward"] += time.perf_counter() - t0
            self.counts["finetune_steps"] += 1

    def _new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh AdamW over the adapters (``lr``, ``weight_decay``)."""
        from ..prior.adapters import lora_parameters

        return torch.optim.AdamW(lora_parameters(self.network), lr=self.config.lr,
                                 weight_decay=self.config.weight_decay)

    def _slab_loss(self, xt, t, idx, target, x0_fold, eps_s, denom: int) -> torch.Tensor:
        """Back-propagate the fine-tuning loss (:func:`finetune_loss`) of slabs ``idx``; returns its value."""
        cfg = self.config
        planes = self.prior.slab_planes(self._num_planes, idx)   # [b, slab]
        xs = xt[planes]                                      # [b, slab, H, W]
        with torch.enable_grad():
            x0s = self.schedule.tweedie_x0(xs, eps_s, int(t))
            loss = finetune_loss(x0s, target[planes], x0_fold[planes], cfg.finetune_target,
                                 cfg.slab_consistency, denom)
            t0 = time.perf_counter()
            loss.backward()
            self.timings["finetune_backward"] += time.perf_counter() - t0
        self.counts["slab_backwards"] += int(idx.numel())
        return loss.detach()

    # ------------------------------------------------------------------ running
    def remaining(self) -> int:
        return max(0, len(getattr(self, "_timesteps", [])) - self.iteration) if self.configured \
            else max(0, self._num_subiterations - self.iteration)

    def reconstruct(self, image: Any) -> Any:
        """SIRF ``reconstruct(image)``: run all diffusion steps and write the output into ``image`` in place.

        ``image`` fixes the grid (a reconstructor not yet set up is set up on it); unlike OSEM's initial estimate
        its values are not used: DDIP starts from its own MLEM warm start (seed that with
        :meth:`set_current_estimate` before :meth:`process` instead). As SIRF, ``image`` holds the result
        afterwards; it is also returned (a superset: SIRF returns None, so SIRF scripts ignore it). An image
        that cannot be written in place (``TypeError``) is left alone and the output is returned as a new image.
        """
        if not self.configured:
            self.set_up(image)
        self.process()
        try:
            fill_in_place(image, self._output_tensor())
        except TypeError:
            return self.get_output()
        self._held = image
        return image

    def progress_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.configured and self.iteration > 0:
            info["t"] = int(self._timesteps[self.iteration - 1])
        if self.last_loss is not None:
            info["loss"] = float(f"{self.last_loss:.4g}")
        if self.loglik_history:
            last = self.loglik_final_em if self.loglik_final_em is not None else self.loglik_history[-1]
            info["loglik"] = float(f"{last:.8g}")
            if self.loglik_warm_start is not None:
                info["dloglik"] = float(f"{last - self.loglik_warm_start:.5g}")
        if self.iteration > 0 and self.timings.get("total"):
            info["s/step"] = round(self.timings["total"] / self.iteration, 3)
        return info

    def timing_report(self) -> dict[str, float]:
        """Mean seconds per diffusion step by part (network forward, fine-tune backward, projector, EM, total)."""
        n = max(1, self.iteration)
        out = {k: v / n for k, v in self.timings.items() if k != "init"}
        out["init_total"] = self.timings.get("init", 0.0)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/ddip_checkpoint.pt`` (:mod:`sirf_ddip.recon.checkpoint`): x_t, HQS image, x̂0, adapters,
        RNG state, step, the algorithm settings and the diagnostics so far."""
        from ..prior.adapters import adapter_state_dict
        from .checkpoint import write_checkpoint

        self._require_setup()
        if self._xt is None:
            raise NotSetUpError("DDIP: nothing to checkpoint before the warm start")
        state = {
            "iteration": int(self.iteration),
            "timesteps": [int(t) for t in self._timesteps],
            "image_shape": [int(s) for s in self.data_step.image_shape],
            "xt": self._xt.detach().cpu(),
            "x_img": self._x_img.detach().cpu(),
            "x0_net": self._x0_net.detach().cpu(),
            "x": self.x.detach().cpu(),
            "adapters": ({k: v.cpu() for k, v in adapter_state_dict(self.network).items()}
                         if self.config.finetune else {}),
            "generator": self._gen.get_state(),
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
            "em_counter": int(self._em_counter),
            "pet_scale": float(self.pet_scaler.scale),
            "last_loss": self.last_loss,
            "user_init": bool(self._user_init),
            "loglik_warm_start": self.loglik_warm_start,
            "loglik_history": [float(v) for v in self.loglik_history],
            "loglik_final_em": self.loglik_final_em,
            "prior_grid": self._prior_grid_record(),
            "prior_planes": [bool(v) for v in self.prior_planes.tolist()] if self.prior_planes is not None else None,
            "timings": dict(self.timings),
            "counts": dict(self.counts),
        }
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

        Raises
        ------
        InputFileError
            Missing/corrupt checkpoint or one of another image shape.
        ConfigError
            The checkpoint was made with settings that change the result (every algorithm key must match;
            the ``run`` options need not).
        """
        from ..prior.adapters import load_adapter_state_dict
        from .checkpoint import read_checkpoint

        self._require_setup()
        state = read_checkpoint(folder, self.config.algorithm_dict(), tuple(self.data_step.image_shape),
                                defaults=DDIPConfig().algorithm_dict())
        mine = self._prior_grid_record()
        where = Path(folder) / CHECKPOINT_FILE
        if "prior_grid" in state and state["prior_grid"] != mine:
            raise InputFileError(where, f"checkpoint made on {state['prior_grid'] or 'the prior grid itself'}, "
                                        f"this run is on {mine or 'the prior grid itself'}", key="prior_grid")
        if tuple(state["xt"].shape) != tuple(self._xt_shape()):
            raise InputFileError(where, f"checkpoint x_t shape {tuple(state['xt'].shape)} != this run's "
                                        f"{tuple(self._xt_shape())} (another prior or prior grid)", key="xt")
        dev, dt = self.device, self.data_step.dtype
        self._timesteps = list(state["timesteps"])
        self._xt = state["xt"].to(dev)
        self._x_img = state["x_img"].to(dev, dt)
        self._x0_net = state["x0_net"].to(dev)
        self.x = state["x"].to(dev, dt)
        if self.config.finetune:
            load_adapter_state_dict(self.network, state["adapters"])
        self._gen.set_state(state["generator"])
        self._optimizer = None
        if self.config.finetune and state.get("optimizer") is not None:   # finetune_optimizer "persist"
            self._optimizer = self._new_optimizer()
            self._optimizer.load_state_dict(state["optimizer"])
        self._em_counter = int(state["em_counter"])
        self.prior.set_pet_scale(float(state["pet_scale"]))
        self.last_loss = state.get("last_loss")
        self.loglik_warm_start = state.get("loglik_warm_start")
        self.loglik_history = [float(v) for v in state.get("loglik_history", [])]
        self.loglik_final_em = state.get("loglik_final_em")
        self._user_init = bool(state.get("user_init", False))
        # a checkpoint from before prior_planes ran the prior on every plane
        self._use_prior_planes(torch.tensor(state["prior_planes"], dtype=torch.bool)
                               if state.get("prior_planes") is not None else None)
        # the run's time and work so far (so s/step and the record cover the whole run, resumed or not)
        for mine_d, key in ((self.timings, "timings"), (self.counts, "counts")):
            mine_d.clear()
            mine_d.update(state.get(key) or {})
        self.iteration = int(state["iteration"])
