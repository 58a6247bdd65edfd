"""DDIPConfig: every knob of HQS-DDIP reconstruction (YAML ⇄ dataclass; unknown keys are errors).

One source of truth: the dataclass defaults **are** the shipped settings (``sirf_ddip/recon/ddip.yaml``, linked
from ``configs/ddip.yaml``; a test checks that they agree), so ``DDIPConfig()``, ``DDIPConfig.shipped()``,
``DDIPReconstructor()`` and ``sirf-ddip recon`` without ``--config`` all run the same thing, and a partial
``--config`` file only changes the keys it names. The authors' values (Hashimoto & Gong 2025, DDIPrecon_for_PET)
are :data:`PAPER_SETTINGS` / :meth:`DDIPConfig.paper`; those and the settings of superseded releases are named
presets (:data:`PRESETS`, :meth:`DDIPConfig.preset`, ``sirf-ddip recon --preset``) layered over the shipped ones,
so that the values only an old release used (:data:`SUPERSEDED`) need not be set key by key (doing so warns).

Two sections: the *algorithm* keys (everything that changes the result; a checkpoint must match them to resume)
at the top level, and the *run options* (:class:`DDIPRunOptions`: device, CPU threads, slab batch, checkpoint
interval), which change only where and how fast it runs, under ``run:``. For convenience the run options may
also be given flat (``--set device=cpu`` = ``--set run.device=cpu``) and read flat (``cfg.device``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import deep_merge, from_dict, parse_overrides, read_yaml, to_dict
from ..errors import ConfigError, ConfigWarning


#: the shipped settings (package data; ``configs/ddip.yaml`` in a source checkout links to it)
SHIPPED_CONFIG = Path(__file__).resolve().parent / "ddip.yaml"

#: keys of :class:`DDIPRunOptions` (accepted flat for convenience)
RUN_KEYS = ("device", "num_threads", "slab_batch", "checkpoint_every", "loglik_every", "channels_last")

#: the authors' settings (DDIPrecon_for_PET ``run_ddiprecon_2d.sh`` / the paper), in this package's units:
#: their β = 0.01 is for images in [0, 1]; our network range is [−1, 1], so the same penalty is β = 0.0025 here.
PAPER_SETTINGS: dict[str, Any] = {
    "t_start": 200, "num_steps": 200, "eta": 0.85, "eta_mode": "dds", "beta": 0.0025, "num_finetune": 2,
    "num_em": 5, "em_start": "x0", "finetune": True, "lora_rank": 4, "lora_init": "authors",
    "adapter_rule": "authors", "train_biases": True, "finetune_target": "data", "lr": 5e-4, "grad_clip": 1.0,
    "n_init": 20, "num_subsets": 1, "finetune_slabs": 0, "final_em": 0,
    "beta_final": None, "ddim_x0": "network", "correction_sigma_vox": 0.0, "finetune_optimizer": "reset",
}

#: named presets, each layered over the shipped settings (``DDIPConfig.preset(name)``, ``sirf-ddip recon --preset``):
#: the authors' settings and those of superseded releases (docs/VALIDATION.md has what each one measured)
PRESETS: dict[str, dict[str, Any]] = {
    "paper": PAPER_SETTINGS,
    # 0.2-0.4: T' = 600, the adapted network's x̂0 in the DDIM step, constant beta, unsmoothed correction
    "0.4": {"t_start": 600, "ddim_x0": "network", "beta_final": None, "correction_sigma_vox": 0.0},
}
#: 0.2: as 0.4, and the prior on every plane (before 0.3's prior_planes)
PRESETS["0.2"] = {**PRESETS["0.4"], "prior_planes": "all"}
#: 0.1: as 0.2, with the sampler, LoRA initialisation, adapter rule, loss and FOV handling that 0.2 replaced
PRESETS["0.1"] = {**PRESETS["0.2"], "eta_mode": "ddim", "lora_init": "peft", "adapter_rule": "legacy",
                  "finetune_target": "fold", "fov_mask": False}

#: values that only reproduce a superseded release: key -> (value, the preset that sets it); a config file or
#: override that sets one by hand loads with a warning naming the key and the preset
SUPERSEDED: dict[str, tuple[Any, str]] = {"eta_mode": ("ddim", "0.1"), "lora_init": ("peft", "0.1"),
                                          "adapter_rule": ("legacy", "0.1"), "finetune_target": ("fold", "0.1"),
                                          "prior_planes": ("all", "0.2")}


def warn_superseded(data: dict[str, Any], source: str) -> None:
    """One warning per key of ``data`` set to a value of :data:`SUPERSEDED` (naming the key and the preset)."""
    for key, (value, preset) in SUPERSEDED.items():
        if key in data and data[key] == value:
            warnings.warn(f"{source}: key '{key}' = {value!r} only reproduces release {preset} (superseded); "
                          f"use --preset {preset} (DDIPConfig.preset({preset!r})) for that release's settings",
                          ConfigWarning, stacklevel=3)


@dataclass
class DDIPRunOptions:
    """Where and how fast DDIP runs; none of these changes the result.

    Attributes
    ----------
    device : str
        "auto" (CUDA when available), "cpu", "cuda", "cuda:1".
    num_threads : int
        CPU threads for torch, applied **by the CLI only** (``torch.set_num_threads`` is process-wide, so the
        library never sets it; 0 = torch's default, one per core). On a shared CPU, 1 thread avoids OpenMP
        oversubscription, which was measured to slow the network several-fold.
    slab_batch : int
        Slabs per network forward (memory knob).
    checkpoint_every : int
        Diffusion steps between checkpoints in ``run``/CLI (0 = only at the end).
    loglik_every : int
        Diffusion steps between evaluations of the Poisson log-likelihood diagnostic (steps ``k, 2k, ...`` and
        always the last step; 0 = the last step only; 1 = every step, as before 0.7.0). Each evaluation is one
        full forward projection, which at full size with view subsets costs as much as the image step's own
        projections; every 10th step keeps it under a tenth of them (``benchmarks/validation/speed.md``).
    channels_last : bool
        Run the network in channels-last memory order (the same image up to float rounding; a speed lever,
        measured in ``benchmarks/validation/speed.md``).
    """

    device: str = "auto"
    num_threads: int = 1
    slab_batch: int = 8
    checkpoint_every: int = 10
    loglik_every: int = 10
    channels_last: bool = False

    def __post_init__(self) -> None:
        for key in ("num_threads", "checkpoint_every", "loglik_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"DDIP config: key 'run.{key}' must be >= 0 (got {getattr(self, key)!r})")
        if self.slab_batch < 1:
            raise ConfigError(f"DDIP config: key 'run.slab_batch' must be >= 1 (got {self.slab_batch!r})")


def _route_run_keys(data: dict[str, Any] | None) -> dict[str, Any]:
    """Move flat run-option keys (``device: cpu``) into the ``run`` section (a copy; nested ones win)."""
    data = dict(data or {})
    run = dict(data.get("run") or {}) if isinstance(data.get("run"), dict) or data.get("run") is None else None
    if run is None:
        raise ConfigError(f"DDIP config: key 'run' must be a mapping of {', '.join(RUN_KEYS)}")
    for k in RUN_KEYS:
        if k in data:
            run.setdefault(k, data.pop(k))
    if run:
        data["run"] = run
    return data


@dataclass
class DDIPConfig:
    """HQS-DDIP settings.

    Attributes
    ----------
    t_start : int
        T′, the diffusion step the warm start is forward-noised to (of the schedule's ``T``; paper 200 of 1000,
        shipped 400, 600 in 0.2-0.4).
    num_steps : int
        Number of (strided) diffusion steps from ``t_start`` to 0 (paper: ``t_start + 1`` = every step; fewer =
        DDIM striding, ``NoiseSchedule.timesteps``).
    eta : float
        DDIM stochasticity η (0.85).
    eta_mode : str
        How η enters the DDIM step: ``"dds"`` (default, the authors' DDIPrecon_for_PET / DDIP3D / DDS update:
        fresh noise std ``η√(1−ᾱ_{t−1})``, ``√(1−η²)√(1−ᾱ_{t−1})`` on ε̂) or ``"ddim"`` (Song et al.'s ``σ_t(η)``,
        this package's behaviour before 0.2: at η = 0.85 and a stride of a few steps only 1-10 % of each step's
        noise variance is fresh, against 72 % with ``"dds"``). See :meth:`NoiseSchedule.ddim_coefficients`.
    beta : float
        HQS penalty weight in **network units** (0.01); converted to activity units as ``β·g²``
        (:func:`sirf_ddip.recon.hqs.beta_activity`). ``.inf`` = image step returns x̂0; 0 = plain EM/OSEM.
        Units: our network range is [−1, 1] (``u = lo + g·x``, lo = −1, the reference level at +1); the authors'
        images are in [0, 1], so their β (paper 0.01) is ``4×`` ours for the same penalty (``β_ours = β_paper / 4``).
        Its effect on the image depends on the counts per voxel (the data term scales with the sensitivity, the
        penalty does not), so no value is right for every study. The penalty is for the whole data: with view
        subsets each subset update uses ``β·s_k/s`` so the fixed point does not depend on ``num_subsets``.
    beta_final : float or None
        β schedule (network units). ``None`` = constant ``beta`` (before 0.5; shipped: 3). Otherwise β loosens (or
        tightens) log-linearly in the diffusion time from ``beta`` at ``t_start`` to ``beta_final`` at ``t = 0``:
        ``β(t) = beta · (beta_final / beta)^(1 − t / t_start)`` (:func:`sirf_ddip.recon.hqs.beta_schedule`). A
        ``beta_final`` below ``beta`` lets the data steer the last steps more ("trust the data" towards t = 0).
    mr_guidance : float
        Classifier-free MR guidance ``w`` (:mod:`sirf_ddip.prior.guidance`): ``ε̂ = ε̂_uncond + w (ε̂_cond −
        ε̂_uncond)``. 1 (shipped) = the MR-conditioned prediction, one network call; 0 = the prior's learned "no
        MR" input (the no-MR ablation); 0 < w < 1 trusts the MR less. w ≠ 1 needs a prior trained with MR
        dropout (architecture ``mr_null``).
    num_finetune : int
        K, LoRA fine-tuning iterations per diffusion step (2).
    num_em : int
        N_em, EM(+fusion) updates per image step (5).
    em_start : str
        Where each image step's EM updates start: ``"x0"`` (default) from the prior's current x̂0 (activity
        units, floored at ``1e-3 × scale`` so that EM can move every voxel), as in DDS/DDIP where the data step is
        initialised at the Tweedie estimate; ``"previous"`` continues from the previous image step's result
        (warm-started HQS; with β = 0 this is exactly OSEM continued from the warm start).
    scale_smooth_vox : float
        In-plane Gaussian σ (voxels) applied to the warm start before the prior's PET scaler is fitted on it
        (3). A 20-iteration MLEM of low-dose data is so noisy that its 99th percentile overstates the
        reference level several-fold; smoothing brings it within ~10 % of the true image's (measured on a
        simulated 10 %-dose amyloid study: 6.0 vs 5.6 kBq/mL; unsmoothed 12).
    scale_fov_fraction : float
        The scaler is fitted inside the field of view where the sensitivity exceeds this fraction of its maximum
        (0.1): EM's hot artefacts at the FOV edge (×200 the brain's level) would otherwise set the scale.
    finetune : bool
        False = "diffusion prior without adaptation": no LoRA training; ``num_finetune`` image steps per diffusion
        step against the prior's x̂0, and the DDIM step uses the HQS image (not the network's x̂0), i.e. a
        DDS/DiffPIR-style plug-in baseline with the same projector budget.
    lora_rank : int
        LoRA rank on ResBlock and attention layers (4).
    lora_alpha : float or None
        LoRA α (scaling α/r); None = rank (scaling 1).
    lora_init : str
        LoRA down-projection initialisation: ``"authors"`` (default, ``N(0, (1/r)²)`` as their ``lora/lora.py``) or
        ``"peft"`` (peft's kaiming-uniform, 5-10× smaller on the shipped prior; before 0.2).
    adapter_rule : str
        Which layers carry LoRA and which biases train (:mod:`sirf_ddip.prior.adapters`): ``"authors"`` (default:
        LoRA on every conv/linear of the residual and attention blocks; every bias trained except the
        time-embedding projections') or ``"legacy"`` (before 0.2: only the adapted layers' biases, time-embedding
        projections included).
    train_biases : bool
        Also fine-tune biases (which ones: ``adapter_rule``) (True, as the authors).
    finetune_target : str
        The fine-tuning loss. ``"data"`` (default): each slab's x̂0 is pulled towards
        ``x̂0_slab.detach() + (x_HQS − fold(x̂0))`` on its planes, i.e. by the data's correction of the volume
        estimate only; ``"fold"`` (before 0.2): towards ``x_HQS`` itself, which also penalises each slab's
        disagreement with the slab average ``fold(x̂0)`` (measured: ~98 % of the loss at t = 600, β = 10, so the
        adapters learnt slab consistency instead of the data). The two coincide when all slabs agree exactly.
    correction_sigma_vox : float
        Gaussian sigma (voxels, 3D, normalised at the volume's edges) applied to the data's correction
        ``x_HQS − fold(x̂0)`` before it enters the fine-tuning target (and, with ``ddim_x0 = "hqs"``, the DDIM
        image ``x̂0 + smooth(x_HQS − x̂0)``). 0 = unsmoothed (the authors' loss; before 0.5); shipped 2. A coherent
        correction (a lesion the prior lacks) survives, voxel noise of the few EM updates is averaged out.
    finetune_optimizer : str
        ``"reset"`` (default, the authors' code): a fresh AdamW every diffusion step, so with ``num_finetune = 1``
        each step moves every adapter parameter by about ``lr·sign(g)`` whatever the gradient's size or
        consistency; ``"persist"``: one AdamW for the whole run (its moments carry over the diffusion steps), so a
        parameter whose gradient keeps its sign (a contrast the prior lacks) keeps moving at ``lr`` and one whose
        gradient flips from step to step (the EM updates' noise) moves less. Measured on the amyloid validation
        cases (``docs/VALIDATION.md``): persist adds voxel noise (SSIM 0.48 / 0.71 against 0.66 / 0.78 with reset), so
        reset stays the default.
    slab_consistency : float
        Weight of a separate slab-consistency term ``mean((x̂0_slab − fold(x̂0).detach())²)`` added to the
        ``"data"`` loss (0 = none, the default; 1 restores the ``"fold"`` loss's implicit weight).
    ddim_x0 : str
        Which clean image the DDIM step (and the output) uses with fine-tuning: ``"network"`` (the
        authors' code, before 0.5: the adapted network's Tweedie x̂0) or ``"hqs"`` (shipped: the last HQS image,
        i.e. x̂0 fused with the data, as DDS does; ε̂ still comes from the adapted network). Without fine-tuning the HQS
        image is always used.
    fov_mask : bool
        Zero the output (and every x̂0 handed out) where the sensitivity is zero, i.e. outside the scanner's field
        of view, where only the network, not the data, sets the value (True).
    prior_planes : str
        Which planes the prior runs on: ``"anatomy"`` (default) the planes where the MR (for a prior without MR: the
        warm start) shows the subject, with the slabs that hold them; ``"all"`` (before 0.3) every plane. The prior
        was trained on slabs through the head only: on planes beyond it (the rest of a 127-plane mMR volume, or
        beyond a short MR) its x̂0 is made up (measured on a full-size study: ~3e4 activity units per empty plane
        after 5 steps, the log-likelihood 14 % below the truth's). Those planes are reconstructed from the data
        alone (each image step there continues EM from the previous image) and skip the network (faster). Volumes
        whose every plane shows the subject (the 7-plane cases) are unchanged.
    prior_grid : str
        How the network sees a PET grid other than its training grid (:class:`sirf_ddip.prior.grid.PriorGrid`):
        ``"pad_crop"`` (default) keeps the PET voxels and takes a training-size window centred on the scanner
        axis; ``"resample"`` resamples in-plane to the prior's voxel size and back (area-overlap, total activity
        kept). The HQS data step always stays on the PET grid. Identical grids: no change at all.
    prior_fov_radius_mm : float or None
        Radius of the object region the prior window must cover (e.g. ~120 mm for a brain on an mMR grid);
        ``None`` = only the window itself is checked.
    final_em : int
        The data-consistency knob: ``final_em`` EM (OSEM sub-)iterations on the data alone, started from the DDIP
        output (0 = none, the default). Each iteration moves the image towards the maximum-likelihood image:
        more lesion contrast and higher log-likelihood, more noise. ``final_em_beta`` keeps the prior in them.
    final_em_beta : float
        β (network units) of those final updates, fused with the DDIP output as HQS image steps (0 = pure EM).
    lr : float
        AdamW learning rate (5e-4, the paper's). With a fresh AdamW per diffusion step (``finetune_optimizer:
        reset``) each step moves every adapter parameter by about ``lr``, so a run's whole adaptation is about
        ``num_steps · num_finetune · lr``: lower is smoother, with lesions a little nearer the prior (see
        ``docs/VALIDATION.md``, rows "lr").
    weight_decay : float
        AdamW weight decay (0.01, torch's default, as in the reference code).
    grad_clip : float
        Gradient-norm clip (1.0; 0 disables).
    use_mr : bool
        Condition the prior on the MR (needed iff the prior is MR-conditioned).
    n_init : int
        Warm start: MLEM-*equivalent* iterations; with ``num_subsets = S`` it runs ``ceil(n_init / S)`` full OSEM
        iterations (``ceil(n_init/S)·S`` sub-iterations), which costs the projections of ``ceil(n_init/S)`` MLEM
        iterations and converges about as far as ``n_init`` MLEM iterations (20).
    num_subsets : int
        View subsets S for the warm start and the image-step EM updates (1 = MLEM, as the authors).
    finetune_slabs : int
        Slabs in the random mini-batch of each fine-tuning iteration (0 = all slabs).
    x0_clamp : list of 2 floats
        Valid network range x̂0 is clamped to before the DDIM step and the output. The lower bound −1 is zero
        activity; the scaler maps its reference level (99th percentile in the head) to +1 and does not clip
        hotter voxels, so the upper bound leaves room for hot spots (3 = twice the reference level).
    seed : int
        Seed of every random draw (noise, mini-batches, LoRA A-matrices).
    network_precision : str
        ``"float32"`` (default) or ``"bfloat16"``: the score network's forward (and fine-tuning backward) under
        bf16 autocast; faster on CPUs with bf16 instructions and on GPUs, and it changes the image (see
        ``benchmarks/validation/speed.md``).
    run : DDIPRunOptions
        Device, CPU threads, slab batch, checkpoint interval (do not change the result).
    """

    t_start: int = 400
    num_steps: int = 50
    eta: float = 0.85
    eta_mode: str = "dds"
    beta: float = 10.0
    beta_final: float | None = 3.0
    num_finetune: int = 1
    num_em: int = 5
    em_start: str = "x0"
    scale_smooth_vox: float = 3.0
    scale_fov_fraction: float = 0.1
    finetune: bool = True
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_init: str = "authors"
    adapter_rule: str = "authors"
    train_biases: bool = True
    finetune_target: str = "data"
    slab_consistency: float = 0.0
    finetune_optimizer: str = "reset"
    correction_sigma_vox: float = 2.0
    ddim_x0: str = "hqs"
    fov_mask: bool = True
    prior_planes: str = "anatomy"
    prior_grid: str = "pad_crop"
    prior_fov_radius_mm: float | None = None
    final_em: int = 0
    final_em_beta: float = 0.0
    lr: float = 5e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    use_mr: bool = True
    mr_guidance: float = 1.0
    n_init: int = 20
    num_subsets: int = 1
    finetune_slabs: int = 2
    x0_clamp: list = field(default_factory=lambda: [-1.0, 3.0])
    seed: int = 0
    network_precision: str = "float32"
    run: DDIPRunOptions = field(default_factory=DDIPRunOptions)

    # run options, readable flat (cfg.device == cfg.run.device)
    device = property(lambda self: self.run.device, doc="``run.device``")
    num_threads = property(lambda self: self.run.num_threads, doc="``run.num_threads``")
    slab_batch = property(lambda self: self.run.slab_batch, doc="``run.slab_batch``")
    checkpoint_every = property(lambda self: self.run.checkpoint_every, doc="``run.checkpoint_every``")
    loglik_every = property(lambda self: self.run.loglik_every, doc="``run.loglik_every``")
    channels_last = property(lambda self: self.run.channels_last, doc="``run.channels_last``")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key of any out-of-range value."""
        def bad(key: str, why: str):
            raise ConfigError(f"DDIP config: key '{key}' {why} (got {getattr(self, key)!r})")

        if self.t_start < 0:
            bad("t_start", "must be >= 0")
        if not (self.mr_guidance >= 0 and self.mr_guidance != float("inf")):
            bad("mr_guidance", "must be a finite number >= 0 (1: MR-conditioned, 0: no MR)")
        if self.num_steps < 1:
            bad("num_steps", "must be >= 1")
        if not 0.0 <= self.eta <= 1.0:
            bad("eta", "must be in [0, 1]")
        if not self.beta >= 0:
            bad("beta", "must be >= 0 (.inf allowed)")
        if self.beta_final is not None:
            if not (0 < self.beta_final < float("inf")):
                bad("beta_final", "must be > 0 and finite, or null (constant beta)")
            if not (0 < self.beta < float("inf")):
                bad("beta_final",
                    "needs a finite beta > 0 to schedule from (with beta 0 or inf set beta_final: null too)")
        for key in ("num_finetune", "num_em", "n_init", "finetune_slabs"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        for key in ("lora_rank", "num_subsets"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        choices = {"em_start": ("x0", "previous"), "eta_mode": ("dds", "ddim"), "lora_init": ("authors", "peft"),
                   "adapter_rule": ("authors", "legacy"), "finetune_target": ("data", "fold"),
                   "prior_grid": ("pad_crop", "resample"), "ddim_x0": ("network", "hqs"),
                   "prior_planes": ("anatomy", "all"), "finetune_optimizer": ("reset", "persist"),
                   "network_precision": ("float32", "bfloat16")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, "must be one of " + ", ".join(repr(a) for a in allowed))
        if not self.slab_consistency >= 0:
            bad("slab_consistency", "must be >= 0")
        if not self.correction_sigma_vox >= 0:
            bad("correction_sigma_vox", "must be >= 0")
        if self.prior_fov_radius_mm is not None and not self.prior_fov_radius_mm > 0:
            bad("prior_fov_radius_mm", "must be > 0 or null")
        if self.final_em < 0:
            bad("final_em", "must be >= 0")
        if not self.final_em_beta >= 0:
            bad("final_em_beta", "must be >= 0")
        if self.scale_smooth_vox < 0:
            bad("scale_smooth_vox", "must be >= 0")
        if not 0 <= self.scale_fov_fraction < 1:
            bad("scale_fov_fraction", "must be in [0, 1)")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.grad_clip < 0:
            bad("grad_clip", "must be >= 0 (0 disables)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            bad("lora_alpha", "must be > 0 or null")
        try:
            lo, hi = (float(v) for v in self.x0_clamp)
        except (TypeError, ValueError):
            bad("x0_clamp", "must be a list [lo, hi] of two numbers")
        if not hi > lo:
            bad("x0_clamp", "needs hi > lo")
        self.x0_clamp = [lo, hi]

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """All keys, the run options under ``run``."""
        return to_dict(self)

    def algorithm_dict(self) -> dict[str, Any]:
        """The keys that change the result (everything except the ``run`` section)."""
        d = to_dict(self)
        d.pop("run")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "DDIP config") -> "DDIPConfig":
        """From a mapping (run options flat or under ``run``); keys not given keep their (shipped) defaults."""
        return from_dict(cls, _route_run_keys(data), source=source)

    @classmethod
    def coerce(cls, config: Any = None, overrides: dict[str, Any] | None = None) -> "DDIPConfig":
        """A config for :class:`~sirf_ddip.recon.ddip.DDIPReconstructor`: from a DDIPConfig (copied), a mapping, a
        YAML path or None (the shipped settings), plus ``overrides``; fine-tuning needs ``num_finetune >= 1``."""
        if config is None:
            cfg = cls.shipped()
        elif isinstance(config, DDIPConfig):
            cfg = copy.deepcopy(config)
        elif isinstance(config, dict):
            cfg = cls.from_dict(config)
        elif isinstance(config, (str, os.PathLike)):
            cfg = cls.load(config)
        else:
            raise TypeError(f"DDIPReconstructor: config must be a DDIPConfig, dict or YAML path, not "
                            f"{type(config).__name__}")
        cfg = cfg.replace(**overrides) if overrides else cfg
        if cfg.finetune and cfg.num_finetune < 1:
            raise ConfigError("DDIP config: key 'num_finetune' must be >= 1 when finetune is true "
                              "(use finetune=false for the no-adaptation baseline)")
        return cfg

    @classmethod
    def shipped(cls, overrides=None) -> "DDIPConfig":
        """The shipped settings, :data:`SHIPPED_CONFIG`, plus overrides (dict or ``key=value`` strings)."""
        return cls.load(None, overrides)

    @classmethod
    def paper(cls, overrides=None) -> "DDIPConfig":
        """The authors' settings (:data:`PAPER_SETTINGS`, β converted to our units), plus overrides."""
        return cls.preset("paper", overrides)

    @classmethod
    def preset(cls, name: str, overrides=None) -> "DDIPConfig":
        """The named preset (:data:`PRESETS`: ``"paper"``, ``"0.4"``, ``"0.2"``, ``"0.1"``) over the shipped
        settings, plus overrides."""
        base = cls.load(None, preset=name)
        return base.replace(**(dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)))

    @classmethod
    def load(cls, path=None, overrides=None, preset: str | None = None) -> "DDIPConfig":
        """The shipped settings, then the ``preset`` (:data:`PRESETS`, optional), then the YAML file ``path``
        (optional; only the keys it names; the shipped file itself adds nothing), then overrides (a mapping or
        ``key=value`` strings). Unknown keys, presets and wrong types are :class:`ConfigError` naming the file and
        the key; a file or override that sets a superseded value by hand warns (:data:`SUPERSEDED`)."""
        data = _route_run_keys(read_yaml(SHIPPED_CONFIG))
        source = "DDIP config"
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"DDIP config: unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
            data = deep_merge(data, _route_run_keys(PRESETS[preset]))
            source = f"DDIP config (preset {preset})"
        if path is not None and Path(path).resolve() != SHIPPED_CONFIG:
            user = _route_run_keys(read_yaml(path))
            warn_superseded(user, str(path))
            data = deep_merge(data, user)
            source = str(path)
        if overrides:
            ov = _route_run_keys(dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides))
            warn_superseded(ov, "--set")
            data = deep_merge(data, ov)
            source = f"{source} (+ overrides)"
        return from_dict(cls, data, source=source)

    def replace(self, **changes) -> "DDIPConfig":
        """A validated copy with ``changes`` (run options flat or as ``run={...}``; unknown keys are
        :class:`ConfigError`)."""
        names = {f.name for f in dataclasses.fields(self)} | set(RUN_KEYS)
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"DDIP config: unknown key(s) {unknown}; known keys: {sorted(names)}")
        return from_dict(type(self), deep_merge(self.to_dict(), _route_run_keys(changes)),
                         source="DDIP config (+ overrides)")
