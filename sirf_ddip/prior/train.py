"""Pretraining of the diffusion prior (ε-prediction, DDPM loss), single process or DDP, exactly resumable.

``sirf-ddip pretrain CONFIG.yaml --out DIR`` runs :func:`pretrain`. Per step: a batch of slabs from the dataset,
``t ~ U{0, T−1}`` (``U{0, t_max−1}`` with ``train.t_max``), ``ε ~ N(0, I)``, ``x_t = q_sample(x_0, t, ε)``,
loss ``‖ε̂(x_t, t, mr) − ε‖²`` (mean), AdamW, gradient clipping, linear warm-up then cosine (or constant) learning
rate, EMA of the weights. All random draws of a rank (batch, t, ε) come from one ``torch.Generator`` seeded by
``(train.seed, rank)``; the generator state is the sampler state stored in checkpoints.

Checkpoints (``DIR/checkpoint.pt``, written atomically every ``train.checkpoint_every`` steps and at the end):
model, EMA, optimiser, LR scheduler, GradScaler, generator and torch RNG states, step, config. ``--resume DIR``
continues from it; on CPU (and deterministic kernels) the result is bit-for-bit that of an uninterrupted run. A
resume refuses a config that changes what the checkpoint trained (:data:`RESUME_IDENTITY`: network, schedule,
data, seeds, batch), naming the key and both values, and warns about a changed learning rate (:data:`RESUME_WARNED`),
kept on the card (``training.resume_changes``); a truncated checkpoint is a named error.

Outputs: ``DIR/prior.safetensors`` + ``DIR/prior.card.json`` (EMA weights, fp16 by default), ``DIR/train_log.csv``
(step, loss, lr, elapsed s), ``DIR/run_record.json`` (resolved config, seed, versions).

Multi-GPU: launch with ``torchrun --nproc_per_node N -m sirf_ddip.cli pretrain CONFIG --out DIR``; when
``WORLD_SIZE > 1`` the process group is initialised from the environment (NCCL on CUDA, Gloo on CPU), each rank
gets ``cuda:LOCAL_RANK``, the model is wrapped in ``DistributedDataParallel`` and rank 0 writes all files.
``train.batch_size`` is the global batch (split over ranks). Mixed precision (bf16 autocast, or fp16 with a
GradScaler when bf16 is unsupported) is used on CUDA only, when ``train.amp``.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import load_config, to_dict
from ..errors import ConfigError, InputFileError, OutputExistsError
from ..utils.device import resolve_device
from ..utils.progress import progress
from .network import DEFAULT_ARCH, build_network
from .scaling import MRScaler, PETScaler, default_mr_spec, default_pet_spec
from .schedule import NoiseSchedule


# ----------------------------------------------------------------------------------------------- config
@dataclass
class NetworkConfig:
    channels: list = field(default_factory=lambda: list(DEFAULT_ARCH["channels"]))
    attention_levels: list = field(default_factory=lambda: list(DEFAULT_ARCH["attention_levels"]))
    num_res_blocks: int = DEFAULT_ARCH["num_res_blocks"]
    num_head_channels: int = DEFAULT_ARCH["num_head_channels"]
    norm_num_groups: int = DEFAULT_ARCH["norm_num_groups"]
    use_mr: bool = True
    slab: int = 3
    mr_null: bool = False     # a learned "no MR" input (needed by train.mr_dropout and by mr_guidance != 1)


@dataclass
class ScheduleConfig:
    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class AugmentConfig:
    flip_lr: bool = True
    rotate_deg: float = 8.0
    translate_vox: float = 4.0
    intensity: float = 0.15


@dataclass
class DataConfig:
    """``source``: "phantom" (simulated brains) or "nifti" (``path``: folder or CSV of PET/MR pairs)."""

    source: str = "phantom"
    tracers: list = field(default_factory=lambda: ["fdg"])
    num_subjects: int = 8
    seed: int = 0
    grid_planes: int = 90
    grid_xy: int = 128
    subject_options: dict = field(default_factory=dict)
    template_cache: str = ""
    subjects_cache: str = ""
    workers: int = 1
    path: str = ""
    resample_mr: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    min_lr_fraction: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    amp: bool = True
    num_threads: int = 0
    export_dtype: str = "float16"
    max_seconds: float = 0.0  # > 0: stop (checkpoint + export) once the training loop has run this long
    init_from: str = ""       # a prior (path, folder or shipped name) whose weights start the training (fine-tuning
                              # a prior on other data); "" = random initialisation
    t_max: int = 0            # > 0: draw t ~ U{0, t_max - 1} only (a fine-tune aimed at the noise levels a DDIP
                              # run visits, t <= its t_start); 0 = the whole schedule, U{0, T - 1}
    mr_dropout: float = 0.0   # > 0: each sample's MR is replaced by the learned "no MR" input with this
                              # probability (needs network.mr_null), so that one prior also predicts without MR


@dataclass
class PretrainConfig:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pet_scaling: dict = field(default_factory=default_pet_spec)
    mr_scaling: dict = field(default_factory=default_mr_spec)


def load_pretrain_config(path: str | Path | None, overrides=None) -> PretrainConfig:
    """Load and validate a pretraining config (unknown keys are :class:`ConfigError`)."""
    cfg = load_config(PretrainConfig, path, overrides)
    src = str(path)
    if cfg.data.source not in ("phantom", "nifti"):
        raise ConfigError(f"{src}: key 'data.source' must be 'phantom' or 'nifti', got {cfg.data.source!r}")
    if cfg.data.source == "nifti" and not cfg.data.path:
        raise ConfigError(f"{src}: key 'data.path' (folder or CSV of PET/MR NIfTI pairs) is required for source nifti")
    if cfg.optim.lr_schedule not in ("cosine", "constant"):
        raise ConfigError(f"{src}: key 'optim.lr_schedule' must be 'cosine' or 'constant'")
    if cfg.train.export_dtype not in ("float16", "float32"):
        raise ConfigError(f"{src}: key 'train.export_dtype' must be 'float16' or 'float32'")
    for key, val in (("train.steps", cfg.train.steps), ("train.batch_size", cfg.train.batch_size),
                     ("train.checkpoint_every", cfg.train.checkpoint_every)):
        if val < 1:
            raise ConfigError(f"{src}: key '{key}' must be >= 1, got {val}")
    if not 0.0 <= cfg.train.mr_dropout < 1.0:
        raise ConfigError(f"{src}: key 'train.mr_dropout' must be in [0, 1), got {cfg.train.mr_dropout}")
    if cfg.train.mr_dropout > 0 and not (cfg.network.mr_null and cfg.network.use_mr):
        raise ConfigError(f"{src}: key 'train.mr_dropout' = {cfg.train.mr_dropout} needs network.use_mr and "
                          "network.mr_null: true (the learned 'no MR' input)")
    if not 0 <= cfg.train.t_max <= cfg.schedule.num_train_steps:
        raise ConfigError(f"{src}: key 'train.t_max' must be in [0, schedule.num_train_steps = "
                          f"{cfg.schedule.num_train_steps}] (0: the whole schedule), got {cfg.train.t_max}")
    try:
        arch_of(cfg)
        PETScaler.from_dict(cfg.pet_scaling)
        MRScaler.from_dict(cfg.mr_scaling)
    except ValueError as exc:
        raise ConfigError(f"{src}: {exc}") from None
    return cfg


def arch_of(cfg: PretrainConfig) -> dict[str, Any]:
    from .network import resolve_arch

    return resolve_arch(asdict(cfg.network))


def build_dataset(cfg: PretrainConfig, show_progress: bool = True):
    """The training dataset described by ``cfg.data`` (phantom subjects are generated here, once)."""
    from .data import Augmentation, NiftiSlabDataset, PhantomSlabDataset

    aug = Augmentation(**asdict(cfg.data.augment))
    pet = PETScaler.from_dict(cfg.pet_scaling)
    mr = MRScaler.from_dict(cfg.mr_scaling)
    if cfg.data.source == "phantom":
        from ..geometry.image import ImageGrid

        # the grid of sim.phantoms.mmr_brain_grid(grid_planes, grid_xy), built here so that a machine without
        # nilearn can train from data.subjects_cache
        grid = ImageGrid((cfg.data.grid_planes, cfg.data.grid_xy, cfg.data.grid_xy), (2.03125, 2.08626, 2.08626))
        return PhantomSlabDataset(cfg.data.num_subjects, cfg.data.tracers, cfg.data.seed, grid=grid, use_mr=cfg.network.use_mr,
                                  subject_options=cfg.data.subject_options,
                                  template_cache=cfg.data.template_cache or None, pet_scaling=pet, mr_scaling=mr,
                                  slab=cfg.network.slab, augmentation=aug, show_progress=show_progress,
                                  subjects_cache=cfg.data.subjects_cache or None, workers=cfg.data.workers)
    return NiftiSlabDataset(cfg.data.path, use_mr=cfg.network.use_mr, resample_mr=cfg.data.resample_mr,
                            pet_scaling=pet, mr_scaling=mr, slab=cfg.network.slab, augmentation=aug)


# ----------------------------------------------------------------------------------------------- helpers
def initial_prior(cfg: PretrainConfig):
    """The prior ``cfg.train.init_from`` that starts a fine-tuning run, checked against the config.

    The prior must have the config's architecture, noise schedule and PET/MR scalings: weights trained for
    other network units would start from a wrong model.

    Returns
    -------
    PriorBundle

    Raises
    ------
    ConfigError
        Key ``train.init_from``: the prior differs from the config (names what differs).
    InputFileError
        The prior's files are missing or corrupt (from :func:`~sirf_ddip.prior.weights.load_prior`).
    """
    from .network import resolve_arch
    from .weights import load_prior, scaling_card_entries

    bundle = load_prior(cfg.train.init_from, device="cpu")
    card = bundle.card
    want = {"architecture": arch_of(cfg),
            "schedule": NoiseSchedule(cfg.schedule.num_train_steps, cfg.schedule.beta_start,
                                      cfg.schedule.beta_end).to_dict(),
            **scaling_card_entries(PETScaler.from_dict(cfg.pet_scaling),
                                   MRScaler.from_dict(cfg.mr_scaling) if cfg.network.use_mr else None)}
    for key, val in want.items():
        have = card.get(key)
        if key == "architecture":
            have = resolve_arch(dict(have or {}))
            if val["mr_null"] and not have["mr_null"]:
                # adding the learned "no MR" input to a prior without one (MR-dropout fine-tuning) is allowed
                have = {**have, "mr_null": True}
        if _jsonish(have) != _jsonish(val):
            raise ConfigError(f"key 'train.init_from': prior {cfg.train.init_from!r} ({bundle.path}) has {key} "
                              f"{have} but the config asks for {val}; use a config with the prior's {key}")
    return bundle


def load_initial_weights(model: torch.nn.Module, cfg: PretrainConfig, bundle=None) -> dict[str, Any]:
    """Copy the weights of the prior ``cfg.train.init_from`` (:func:`initial_prior`) into ``model``.

    Returns
    -------
    dict
        ``{"prior": name or path, "weights_file": ..., "weights_sha256": ...}`` for the run record and the card.
    """
    bundle = initial_prior(cfg) if bundle is None else bundle
    own = model.state_dict()
    src = bundle.network.state_dict()
    # a prior without the learned "no MR" input starts a run that has one: that parameter keeps its
    # initialisation; every other key must match
    extra = {"mr_null"} - set(src) if getattr(model, "has_mr_null", False) else set()
    missing, unexpected = model.load_state_dict({k: v.to(dtype=own[k].dtype) for k, v in src.items()},
                                                strict=False)
    if set(missing) - extra or unexpected:
        raise ConfigError(f"train.init_from {cfg.train.init_from!r}: its weights do not match network.*: "
                          f"missing {sorted(set(missing) - extra)[:4]}, unexpected {list(unexpected)[:4]}")
    return {"prior": str(cfg.train.init_from), "weights_file": bundle.path.name,
            "weights_sha256": bundle.card.get("weights_sha256")}


def _jsonish(x):
    import json

    return json.loads(json.dumps(x, default=str))


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """LR multiplier at ``step``: linear warm-up, then cosine to ``min_lr_fraction`` (or constant)."""
    o = cfg.optim
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.train.steps - o.warmup_steps)
    p = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_fraction + (1 - o.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float, step: int) -> None:
    """``ema ← d·ema + (1−d)·θ`` with the warm-up ``d = min(decay, (1+step)/(10+step))``."""
    d = min(float(decay), (1.0 + step) / (10.0 + step))
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        else:
            ema[k].copy_(v)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


#: Config keys that make a checkpoint what it is: a resume with another value would train another model than the
#: one the checkpoint's steps trained (and the card would claim it): refused. Sections (all their keys) and keys.
RESUME_IDENTITY = ("network", "schedule", "data", "pet_scaling", "mr_scaling", "train.seed", "train.batch_size",
                   "train.t_max", "train.mr_dropout")  # train.init_from: checked on its own (pretrain)
#: Keys of those sections that do not change what is trained (where caches live, worker processes).
RESUME_OPERATIONAL = ("data.workers", "data.template_cache", "data.subjects_cache")
#: Keys that may change on a resume (the remaining steps use the new value): a warning naming both values, kept
#: in the run record and on the card (``training.resume_changes``); ``train.steps`` only where the cosine LR
#: schedule depends on it (more steps with a constant LR continue the run exactly).
RESUME_WARNED = ("optim", "train.ema_decay", "train.steps")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v and key not in ("pet_scaling", "mr_scaling", "data.subject_options"):
                out.update(_flat(v, key))
            else:
                out[key] = v
        return out
    return {prefix: d}


def _in(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def check_resume_config(ckpt: Path, saved: dict, cfg: PretrainConfig, step: int) -> list[dict[str, Any]]:
    """Compare the config of a checkpoint with the one it is resumed with.

    Returns
    -------
    list of dict
        The changed keys of :data:`RESUME_WARNED` (``key``, ``checkpoint``, ``now``, ``from_step``), each also
        warned about (an :class:`~sirf_ddip.errors.InputFileWarning` naming the key and both values).

    Raises
    ------
    ResumeMismatchError
        A key of :data:`RESUME_IDENTITY` differs (the key and both values named). Keys a checkpoint of an older
        version does not hold are not compared.
    ConfigError
        ``train.init_from`` names another starting prior than the checkpoint's.
    """
    import warnings

    from ..errors import InputFileWarning, ResumeMismatchError

    ck_init = str((saved.get("train") or {}).get("init_from", "") or "")
    if cfg.train.init_from and cfg.train.init_from != ck_init:
        raise ConfigError(f"key 'train.init_from': {ckpt} was started from {ck_init or 'a random network'!r}, "
                          f"not {cfg.train.init_from!r}; resume with the checkpoint's setting")
    was, now = _flat(_jsonish(saved)), _flat(_jsonish(to_dict(cfg)))
    changes = []
    for key in sorted(now):
        if key not in was or was[key] == now[key] or _in(key, RESUME_OPERATIONAL):
            continue
        if _in(key, RESUME_IDENTITY):
            what = {"network": "the network architecture", "schedule": "the noise schedule",
                    "data": "the training data"}.get(key.split(".")[0], "what the checkpoint trained")
            raise ResumeMismatchError(f"{ckpt} [key '{key}']: the checkpoint was trained with {was[key]!r}, the "
                                      f"config says {now[key]!r}: {what} differs; resume with the checkpoint's value "
                                      "or start a new run")
        if key == "train.steps" and cfg.optim.lr_schedule == "constant":
            continue
        if _in(key, RESUME_WARNED):
            changes.append({"key": key, "checkpoint": was[key], "now": now[key], "from_step": step})
            warnings.warn(InputFileWarning(ckpt, f"{key} changed on resume: {was[key]!r} in the checkpoint, "
                                           f"{now[key]!r} now; steps after {step} use {now[key]!r} (recorded on the "
                                           "card)", key=key), stacklevel=2)
    return changes


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A pretraining checkpoint, or an :class:`InputFileError` naming it (truncated, corrupt, not ours)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated zip, a pickle error, a file of something else
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputFileError(path, f"cannot read the checkpoint (truncated or corrupt?): {reason}") from None
    need = ("step", "arch", "model", "ema", "optimizer", "scheduler", "scaler", "generators", "torch_rng")
    missing = [k for k in need if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise InputFileError(path, f"not a sirf-ddip pretraining checkpoint (missing {', '.join(missing)})")
    return ck


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class TrainResult(dict):
    """Summary of a run: ``steps``, ``final_loss``, ``mean_loss_first``, ``mean_loss_last``, ``seconds``, paths."""


# ----------------------------------------------------------------------------------------------- main loop
def pretrain(cfg: PretrainConfig, out: str | Path, resume: str | Path | None = None, device=None,
             overwrite: bool = False, dataset=None, stop_after: int | None = None,
             config_path: str | None = None, show_progress: bool = True) -> TrainResult:
    """Train (or resume) a prior and export it to ``out``.

    Parameters
    ----------
    cfg : PretrainConfig
    out : folder for checkpoints, logs and the exported prior
    resume : folder holding a ``checkpoint.pt`` to continue from (may equal ``out``)
    device : "auto", "cpu", "cuda", "cuda:1", ... (DDP ranks use ``cuda:LOCAL_RANK``)
    overwrite : allow an ``out`` that already holds results (not needed when resuming into it)
    dataset : a ready :class:`~sirf_ddip.prior.data.SlabDataset` (tests; default built from ``cfg.data``)
    stop_after : stop (after checkpointing) once this global step is reached, without exporting (tests of resume)
    """
    out = Path(out)
    world, rank, local = _dist_info()
    distributed = world > 1
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    else:
        dev = resolve_device(device)
    main_rank = rank == 0
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)

    ckpt_in = None
    ck = None
    resume_changes: list[dict[str, Any]] = []
    if resume is not None:
        ckpt_in = Path(resume) / "checkpoint.pt"
        if not ckpt_in.is_file():
            raise InputFileError(ckpt_in, "no checkpoint to resume from")
        ck = load_checkpoint(ckpt_in)  # checked against the config before any data are built or files written
        resume_changes = check_resume_config(ckpt_in, ck.get("config") or {}, cfg, int(ck["step"]))
    # the starting prior is checked before anything is written or generated; a resumed run has its weights already
    init_bundle = initial_prior(cfg) if cfg.train.init_from and ckpt_in is None else None
    if main_rank:
        done = [p for p in ("prior.safetensors", "checkpoint.pt", "train_log.csv") if (out / p).exists()]
        resuming_here = resume is not None and Path(resume).resolve() == out.resolve()
        if done and not overwrite and not resuming_here:
            raise OutputExistsError(out / done[0])
        out.mkdir(parents=True, exist_ok=True)

    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} not divisible by WORLD_SIZE {world}")
    local_batch = cfg.train.batch_size // world

    schedule = NoiseSchedule(cfg.schedule.num_train_steps, cfg.schedule.beta_start, cfg.schedule.beta_end)
    if dataset is None:
        dataset = build_dataset(cfg, show_progress=show_progress and main_rank)
    if dataset.uses_mr != cfg.network.use_mr:
        raise ConfigError(f"network.use_mr={cfg.network.use_mr} but the dataset {'has' if dataset.uses_mr else 'lacks'} MR")

    torch.manual_seed(cfg.train.seed)
    model = build_network(arch_of(cfg)).to(dev)
    init_info = load_initial_weights(model, cfg, init_bundle) if init_bundle is not None else None
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    use_amp = bool(cfg.train.amp) and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    gen = torch.Generator().manual_seed(int(cfg.train.seed) * 1_000_003 + rank)
    start = 0
    elapsed0 = 0.0
    if ck is not None:
        if ck.get("arch") != arch_of(cfg):
            raise ConfigError(f"{ckpt_in}: checkpoint architecture {ck.get('arch')} differs from the config's")
        model.load_state_dict(ck["model"])
        for k in ema:
            ema[k].copy_(ck["ema"][k])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        gen.set_state(ck["generators"][rank] if rank < len(ck["generators"]) else ck["generators"][0])
        torch.set_rng_state(ck["torch_rng"])
        if dev.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], dev)
        start = int(ck["step"])
        elapsed0 = float(ck.get("elapsed_s", 0.0))
        init_info = ck.get("initialised_from")
        resume_changes = list(ck.get("resume_changes") or []) + resume_changes
        if start > cfg.train.steps:
            raise ConfigError(f"{ckpt_in}: checkpoint at step {start} is past train.steps {cfg.train.steps}")

    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    log_path = out / "train_log.csv"
    if main_rank:
        from ..utils.provenance import write_run_record

        write_run_record(out, to_dict(cfg), seed=cfg.train.seed,
                         extra={"config_file": config_path, "device": str(dev), "world_size": world,
                                "resumed_from": str(ckpt_in) if ckpt_in else None, "start_step": start,
                                "resume_changes": resume_changes, "initialised_from": init_info,
                                "data": dataset.description})
        if start == 0 or not log_path.exists():
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "loss", "lr", "elapsed_s"])
        else:  # drop log rows written after the checkpoint we resume from
            with open(log_path, newline="") as f:
                rows = list(csv.reader(f))
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= start]
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerows(keep)

    def save_checkpoint(step: int, elapsed: float) -> None:
        gens = [gen.get_state()]
        if distributed:
            import torch.distributed as dist

            allg = [None] * world
            dist.all_gather_object(allg, gen.get_state())
            gens = allg
        if main_rank:
            _atomic_save({"step": step, "arch": arch_of(cfg), "config": to_dict(cfg), "model": model.state_dict(),
                          "ema": ema, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "scaler": scaler.state_dict(), "generators": gens, "torch_rng": torch.get_rng_state(),
                          "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                          "elapsed_s": elapsed, "initialised_from": init_info, "resume_changes": resume_changes},
                         out / "checkpoint.pt")

    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, int(stop_after))
    t_high = cfg.train.t_max if cfg.train.t_max > 0 else schedule.num_train_steps
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    bar = progress(range(start, end), total=end - start, desc="pretrain", enabled=None if (show_progress and main_rank) else False)
    run_loss = None
    log_rows = []
    time_stop = False
    for step in bar:
        x0, mr = dataset.sample(local_batch, gen)
        t = torch.randint(t_high, (local_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        # drawn only when on, so that runs without MR dropout keep their random stream
        drop = (torch.rand(local_batch, generator=gen) < cfg.train.mr_dropout).to(dev) \
            if cfg.train.mr_dropout > 0 and mr is not None else None
        x_t = schedule.q_sample(x0, t, noise)
        x_t, noise, t = x_t.to(dev, non_blocking=True), noise.to(dev, non_blocking=True), t.to(dev)
        mr = mr.to(dev, non_blocking=True) if mr is not None else None
        with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=use_amp):
            eps = net(x_t, t, mr) if drop is None else net(x_t, t, mr, drop_mr=drop)
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        ema_update(ema, model, cfg.train.ema_decay, step)
        lv = float(loss.detach())
        if distributed:
            import torch.distributed as dist

            lt = torch.tensor([lv], device=dev)
            dist.all_reduce(lt)
            lv = float(lt) / world
        if not math.isfinite(lv):
            raise FloatingPointError(f"pretrain: loss became {lv} at step {step + 1}; lower optim.lr")
        losses.append(lv)
        run_loss = lv if run_loss is None else 0.95 * run_loss + 0.05 * lv
        done_steps = step + 1
        if main_rank:
            bar.set_postfix(loss=f"{run_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
            if done_steps % cfg.train.log_every == 0 or done_steps == end:
                log_rows.append([done_steps, f"{lv:.6f}", f"{sched.get_last_lr()[0]:.6e}",
                                 f"{elapsed0 + time.perf_counter() - t0:.2f}"])
        if cfg.train.max_seconds > 0 and not time_stop:
            flag = torch.tensor([float(elapsed0 + time.perf_counter() - t0 > cfg.train.max_seconds)], device=dev)
            if distributed:
                import torch.distributed as dist

                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            time_stop = bool(flag.item() > 0)
        if done_steps % cfg.train.checkpoint_every == 0 or done_steps == end or time_stop:
            if main_rank and log_rows:
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerows(log_rows)
                log_rows = []
            save_checkpoint(done_steps, elapsed0 + time.perf_counter() - t0)
        if time_stop:
            end = done_steps
            break
    if hasattr(bar, "close"):
        bar.close()
    seconds = elapsed0 + time.perf_counter() - t0
    result = TrainResult(steps=end, seconds=seconds, final_loss=losses[-1] if losses else None,
                         mean_loss_first=sum(losses[:20]) / max(1, len(losses[:20])) if losses else None,
                         mean_loss_last=sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
                         out=str(out), ema=ema, model=model)
    result["stopped_by_time"] = time_stop
    if (end == cfg.train.steps or time_stop) and main_rank:
        result["card"] = str(export(cfg, model, ema, schedule, dataset, out, seconds, dev, world, overwrite=True,
                                    steps_done=end, stopped_by_time=time_stop, initialised_from=init_info,
                                    resume_changes=resume_changes))
    result["initialised_from"] = init_info
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    return result


def export(cfg: PretrainConfig, model, ema: dict, schedule: NoiseSchedule, dataset, out: Path, seconds: float,
           dev, world: int, overwrite: bool = False, steps_done: int | None = None,
           stopped_by_time: bool = False, initialised_from: dict[str, Any] | None = None,
           resume_changes: list[dict[str, Any]] | None = None) -> Path:
    """Write ``out/prior.safetensors`` + card from the EMA weights (``resume_changes``: the settings changed on
    a resume, see :func:`check_resume_config`, so that the card says which values trained which steps)."""
    from .weights import save_prior

    training = {
        "data": dataset.description,
        "steps": cfg.train.steps if steps_done is None else int(steps_done),
        "planned_steps": cfg.train.steps,
        "stopped_by_time_limit": bool(stopped_by_time),
        "batch_size": cfg.train.batch_size,
        "seconds": round(seconds, 1),
        "device": str(dev) + (f" x{world}" if world > 1 else ""),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "weights": "EMA",
        "initialised_from": initialised_from,
        "resume_changes": list(resume_changes or []),
        "config": to_dict(cfg),
        "command": " ".join(["sirf-ddip", *sys.argv[1:]]),   # no machine path (the program's location)
    }
    return save_prior(out / "prior.safetensors", model, schedule, PETScaler.from_dict(cfg.pet_scaling),
                      MRScaler.from_dict(cfg.mr_scaling) if cfg.network.use_mr else None, training=training,
                      dtype=cfg.train.export_dtype, overwrite=overwrite,
                      state_dict={k: v.detach().cpu() for k, v in ema.items()})
