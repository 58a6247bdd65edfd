"""DDIPConfig: every knob of HQS-DDIP reconstruction (YAML ⇄ dataclass; unknown keys are errors).

Defaults are those of the authors' code (Hashimoto & Gong 2025) unless stated; ``configs/ddip.yaml`` is the shipped
(CPU-friendly) configuration used by ``sirf-ddip recon`` when no ``--config`` is given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import from_dict, load_config, to_dict
from ..errors import ConfigError


#: the shipped settings (package data; ``configs/ddip.yaml`` in a source checkout links to it)
SHIPPED_CONFIG = Path(__file__).resolve().parent / "ddip.yaml"


@dataclass
class DDIPConfig:
    """HQS-DDIP settings.

    Attributes
    ----------
    t_start : int
        T′, the diffusion step the warm start is forward-noised to (of the schedule's ``T``; paper 200 of 1000).
    num_steps : int
        Number of (strided) diffusion steps from ``t_start`` to 0 (paper: ``t_start + 1`` = every step; fewer =
        DDIM striding, ``NoiseSchedule.timesteps``).
    eta : float
        DDIM stochasticity η (0.85).
    beta : float
        HQS penalty weight in **network units** (0.01); converted to activity units as ``β·g²``
        (:func:`sirf_ddip.recon.hqs.beta_activity`). ``.inf`` = image step returns x̂0; 0 = plain EM/OSEM.
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
    train_biases : bool
        Also fine-tune the biases of the adapted layers (True, as the authors).
    lr : float
        AdamW learning rate (5e-4).
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
    slab_batch : int
        Slabs per network forward (memory knob; results do not depend on it).
    finetune_slabs : int
        Slabs in the random mini-batch of each fine-tuning iteration (0 = all slabs).
    x0_clamp : list of 2 floats
        Valid network range x̂0 is clamped to before the DDIM step and the output. The lower bound −1 is zero
        activity; the scaler maps its reference level (99th percentile in the head) to +1 and does not clip
        hotter voxels, so the upper bound leaves room for hot spots (3 = twice the reference level).
    seed : int
        Seed of every random draw (noise, mini-batches, LoRA A-matrices).
    device : str
        "auto" (CUDA when available), "cpu", "cuda", "cuda:1".
    checkpoint_every : int
        Diffusion steps between checkpoints in ``run``/CLI (0 = only at the end).
    num_threads : int
        CPU threads for torch, applied by the CLI (0 = torch's default, one per core). On a shared CPU, 1 thread
        avoids OpenMP oversubscription, which can slow the network several-fold.
    """

    t_start: int = 200
    num_steps: int = 200
    eta: float = 0.85
    beta: float = 0.01
    num_finetune: int = 2
    num_em: int = 5
    em_start: str = "x0"
    scale_smooth_vox: float = 3.0
    scale_fov_fraction: float = 0.1
    finetune: bool = True
    lora_rank: int = 4
    lora_alpha: float | None = None
    train_biases: bool = True
    lr: float = 5e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    use_mr: bool = True
    n_init: int = 20
    num_subsets: int = 1
    slab_batch: int = 16
    finetune_slabs: int = 0
    x0_clamp: list = field(default_factory=lambda: [-1.0, 3.0])
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 10
    num_threads: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key of any out-of-range value."""
        def bad(key: str, why: str):
            raise ConfigError(f"DDIP config: key '{key}' {why} (got {getattr(self, key)!r})")

        if self.t_start < 0:
            bad("t_start", "must be >= 0")
        if self.num_steps < 1:
            bad("num_steps", "must be >= 1")
        if not 0.0 <= self.eta <= 1.0:
            bad("eta", "must be in [0, 1]")
        if not self.beta >= 0:
            bad("beta", "must be >= 0 (.inf allowed)")
        for key in ("num_finetune", "num_em", "n_init", "finetune_slabs", "checkpoint_every", "num_threads"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        for key in ("lora_rank", "num_subsets", "slab_batch"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        if self.em_start not in ("x0", "previous"):
            bad("em_start", "must be 'x0' or 'previous'")
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
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "DDIP config") -> "DDIPConfig":
        return from_dict(cls, data, source=source)

    @classmethod
    def shipped(cls, overrides=None) -> "DDIPConfig":
        """The shipped (CPU-friendly) settings, :data:`SHIPPED_CONFIG`, plus overrides (dict or ``key=value``)."""
        return load_config(cls, SHIPPED_CONFIG, overrides)

    @classmethod
    def load(cls, path=None, overrides=None) -> "DDIPConfig":
        """From a YAML file (optional) plus ``key=value`` overrides (unknown keys are errors)."""
        return load_config(cls, path, overrides)

    def replace(self, **changes) -> "DDIPConfig":
        """A validated copy with ``changes`` (unknown keys are :class:`ConfigError`)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"DDIP config: unknown key(s) {unknown}; known keys: {sorted(names)}")
        return from_dict(type(self), {**self.to_dict(), **changes}, source="DDIP config (+ overrides)")
