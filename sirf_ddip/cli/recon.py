"""CLI: ``sirf-ddip recon`` — HQS-DDIP reconstruction of STIR Interfile data.

Parsing and file handling only; the algorithm is :class:`sirf_ddip.recon.ddip.DDIPReconstructor`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..io.template import DATA_HELP

#: the shipped configuration used when no --config is given (package data, so pip installs have it too)
from ..recon.config import SHIPPED_CONFIG as DEFAULT_CONFIG  # noqa: E402  (configs/ddip.yaml links to it)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "recon", help="HQS-DDIP reconstruction (diffusion prior fine-tuned with LoRA, fused with EM)",
        description="Reconstruct PET data with the Deep Diffusion Image Prior (Hashimoto & Gong 2025): an MR-"
                    "conditioned diffusion prior, fine-tuned with LoRA during reconstruction and fused with "
                    "(OS)EM by half-quadratic splitting, fully 3D. Settings come from configs/ddip.yaml unless "
                    "--config is given; --set KEY=VALUE overrides single keys.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", required=True, help=f"measured prompts, STIR Interfile (.hs; {DATA_HELP})")
    p.add_argument("--mult", default=None,
                   help=f"multiplicative factors m (.hs): efficiency × attenuation ({DATA_HELP})")
    p.add_argument("--additive", default=None, help=f"additive term a = (randoms + scatter)/m (.hs; {DATA_HELP})")
    p.add_argument("--mr", default=None, help="co-registered T1 MR on the PET grid (.hv, .nii, .nii.gz)")
    p.add_argument("--out", required=True, help="output image (.hv Interfile; .nii/.nii.gz NIfTI)")
    p.add_argument("--config", default=None, help=f"DDIP YAML config (default: {DEFAULT_CONFIG.name} shipped)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="start from a named preset instead of the shipped settings: paper (the authors'), 0.4, 0.2, "
                        "0.1 (superseded releases; docs/VALIDATION.md); --config and --set layer over it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set num_steps=50; repeatable")
    p.add_argument("--image-template", default=None,
                   help="image defining the reconstruction grid (default: the MR's grid)")
    p.add_argument("--weights", default=None, help="prior weights (.safetensors or folder; default: shipped)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: the config's)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the config's)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for this process (0 = one per core; default: the config's run.num_threads)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue from the checkpoint in DIR")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="where checkpoints go (default: OUT's name + '_checkpoint' next to OUT)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-mr", action="store_true", help="do not use an MR (needs a prior trained without MR)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG of central slices")
    p.set_defaults(func=_recon)


def output_stem(out: Path) -> str:
    name = out.name
    for suf in (".nii.gz", ".nii", ".hv"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return out.stem


def resolve_config(config: str | None, overrides: list[str], seed: int | None, device: str | None,
                   no_mr: bool, threads: int | None = None, preset: str | None = None):
    """The run's :class:`DDIPConfig`: shipped, ``--preset``, the given YAML, ``--set``, then the explicit flags."""
    from ..config import parse_overrides
    from ..recon.config import DDIPConfig

    path = Path(config) if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    ov = parse_overrides(overrides)
    if seed is not None:
        ov["seed"] = int(seed)
    if device is not None:
        ov["device"] = device
    if threads is not None:
        ov["num_threads"] = int(threads)
    if no_mr:
        ov["use_mr"] = False
    return DDIPConfig.load(path, ov, preset=preset), path   # the file layers over the shipped settings


def build_data_step(args, grid, device, num_subsets: int):
    """The physics for ``args`` on ``grid`` (the built-in engine)."""
    from ..physics.model import EngineLogLikelihood
    from ..io import read_projdata

    y = read_projdata(args.prompts)
    m = read_projdata(args.mult) if args.mult else None
    a = read_projdata(args.additive) if args.additive else None
    return EngineLogLikelihood(y, m, a, grid=grid, device=device, num_subsets=num_subsets)


#: the identity record of a run's inputs, next to its checkpoints (see :func:`inputs_identity_of`)
INPUTS_RECORD = "inputs.json"


def _input_files(path: str | None) -> list[Path] | None:
    """The files that hold an input: an Interfile header and its data file, or the one file (NIfTI)."""
    from ..errors import InputFileError
    from ..io.header import InterfileHeader

    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, "input file not found")
    if p.name.lower().endswith((".hs", ".hv")):
        try:
            data = InterfileHeader.read(p).data_file()
        except InputFileError:  # no data file named: the reader reports it with its own message
            return [p]
        return [p, data] if data.is_file() else [p]
    return [p]


def inputs_identity_of(args) -> dict[str, Any]:
    """Size + SHA-256 of every input of a ``recon`` run (prompts, factors, additive term, MR, image template) and
    the prior's SHA-256: what a checkpoint must have been made from to be resumed by this run."""
    from ..errors import InputFileError
    from ..prior.weights import resolve_weights, sha256_file
    from ..utils.fingerprint import inputs_identity

    files = {"prompts": args.prompts, "mult": args.mult, "additive": args.additive,
             "mr": None if args.no_mr else args.mr, "image_template": args.image_template}
    try:
        wpath, _ = resolve_weights(args.weights)
    except InputFileError:
        wpath = None  # reported with its own message when the prior is loaded
    prior = {"path": str(wpath), "sha256": sha256_file(wpath)} if wpath is not None else None
    try:
        resolved = {k: _input_files(v) for k, v in files.items()}
        return inputs_identity(resolved, extra={"prior": prior})
    except OSError as exc:
        raise InputFileError(getattr(exc, "filename", None) or "input", f"cannot read: {exc.strerror or exc}") \
            from None


def check_resume(resume: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume from ``resume`` unless its checkpoint was made from the same inputs as this run.

    Raises
    ------
    InputFileError
        ``resume`` is not a folder or holds no checkpoint.
    ResumeMismatchError
        No identity record (a checkpoint of unknown inputs) or an input whose content changed, named.
    """
    from ..errors import InputFileError, ResumeMismatchError
    from ..recon.ddip import CHECKPOINT_FILE
    from ..utils.fingerprint import compare_identities, read_identity

    if not resume.is_dir():
        raise InputFileError(resume, "--resume: not a folder with a DDIP checkpoint")
    if not (resume / CHECKPOINT_FILE).is_file():
        raise InputFileError(resume / CHECKPOINT_FILE, "--resume: no DDIP checkpoint in this folder")
    saved = read_identity(resume / INPUTS_RECORD)
    if saved is None:
        raise ResumeMismatchError(f"{resume}: the checkpoint has no record of its inputs ({INPUTS_RECORD}), so "
                                  "resuming could mix data; start a new run (or resume with the version that made it)")
    diff = compare_identities(saved, identity)
    if diff:
        raise ResumeMismatchError(f"{resume}: cannot resume with other inputs than the checkpoint's: " + "; ".join(diff))


def _check_recon_outputs(args, out: Path, ck_dir: Path | None, checkpointing: bool) -> None:
    """Every output of the run can be written, checked before anything is read or reconstructed."""
    from ..errors import OutputExistsError, OutputPathError
    from ..recon.ddip import CHECKPOINT_FILE
    from ..utils.provenance import check_output_path, run_record_paths
    from .engine import IMAGE_SUFFIXES, check_out_suffix

    check_out_suffix(out, IMAGE_SUFFIXES)
    stem, folder = output_stem(out), out.parent
    files = [out] + ([out.with_suffix(".v")] if out.name.lower().endswith(".hv") else [])
    files += run_record_paths(folder, f"{stem}_run_record")
    if not args.no_png:
        files.append(folder / f"{stem}.png")
    if not args.resume:  # a resumed run appends to its log
        files.append(folder / f"{stem}_log.jsonl")
    inputs = {Path(p).resolve(): p for p in (args.prompts, args.mult, args.additive, args.mr, args.image_template)
              if p}
    for f in files:
        if f.resolve() in inputs:
            raise OutputPathError(f, f"is also an input ({inputs[f.resolve()]}); choose another --out", "--out")
        check_output_path(f, args.overwrite)
    if ck_dir is None or not checkpointing:
        return
    opt = "--checkpoint-dir" if args.checkpoint_dir else "checkpoint folder"
    if ck_dir.exists() and not ck_dir.is_dir():
        raise OutputPathError(ck_dir, "is a file, not a folder", opt)
    for parent in ck_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(ck_dir, f"cannot be created: {parent} is a file", opt)
            break
    resuming_here = args.resume and Path(args.resume).resolve() == ck_dir.resolve()
    if not resuming_here and (ck_dir / CHECKPOINT_FILE).exists() and not args.overwrite:
        raise OutputExistsError(ck_dir / CHECKPOINT_FILE)


def _recon(args) -> int:
    from ..errors import ConfigError
    from ..io import read_image, write_image
    from ..recon.callbacks import CheckpointCallback, LoggingCallback, ProgressCallback
    from ..recon.ddip import CHECKPOINT_FILE, DDIPReconstructor
    from ..utils.atomic import ensure_folder, write_text
    from ..utils.checks import require_finite
    from ..utils.device import resolve_device
    from ..utils.provenance import write_run_record

    out = Path(args.out)
    if args.no_mr and args.mr:
        raise ConfigError("--no-mr and --mr given together; drop one")
    cfg, cfg_path = resolve_config(args.config, args.overrides, args.seed, args.device, args.no_mr,
                                   getattr(args, "threads", None), getattr(args, "preset", None))
    checkpointing = cfg.checkpoint_every > 0
    if args.checkpoint_dir:
        ck_dir = Path(args.checkpoint_dir)
    elif args.resume:
        ck_dir = Path(args.resume)
    else:
        ck_dir = out.parent / (output_stem(out) + "_checkpoint")
    _check_recon_outputs(args, out, ck_dir, checkpointing)   # fail before hours of work, not after
    device = resolve_device(cfg.device)
    identity = inputs_identity_of(args)
    if args.resume:
        check_resume(Path(args.resume), identity)
    mr = read_image(args.mr) if (args.mr and not args.no_mr) else None
    if mr is not None:
        require_finite(mr.array, args.mr, "MR image")
    template = read_image(args.image_template) if args.image_template else mr
    if mr is not None and template is not mr and not template.grid.matches(mr.grid):
        from ..prior.grid import mr_on_pet_grid

        mr = mr_on_pet_grid(mr, template.grid)   # trilinear, with a one-line message saying from which grid
    if cfg.num_threads > 0:       # the CLI owns the process, so it (not the library) sets torch's thread count
        import torch

        torch.set_num_threads(cfg.num_threads)
    ds = build_data_step(args, template.grid if template is not None else None, device, cfg.num_subsets)
    if template is None:
        template = ds.from_tensor(ds.sensitivity(None) * 0)
    recon = DDIPReconstructor(cfg)
    recon.set_objective_function(ds)
    recon.set_prior(args.weights)
    if mr is not None:
        recon.set_anatomical_image(mr)
    t0 = time.perf_counter()
    recon.set_up(template)
    if args.resume:
        recon.load_checkpoint(args.resume)
        print(f"recon: resumed from {args.resume} at diffusion step {recon.iteration}/"
              f"{len(recon.timesteps)}", file=sys.stderr)
    folder = ensure_folder(out.parent)
    if checkpointing:
        ensure_folder(ck_dir)
        if not (args.resume and Path(args.resume).resolve() == ck_dir.resolve()):
            # a fresh checkpoint folder (or one replaced under --overwrite): never leave an old checkpoint next to
            # this run's identity record, or a later --resume would continue it with these inputs
            for stale in (ck_dir / CHECKPOINT_FILE, ck_dir / INPUTS_RECORD):
                stale.unlink(missing_ok=True)
        write_text(ck_dir / INPUTS_RECORD, json.dumps(identity, indent=2))
    log = folder / f"{output_stem(out)}_log.jsonl"
    if not args.resume:
        log.unlink(missing_ok=True)  # checked above: absent, or replaced under --overwrite (the log appends)
    cbs: list[Any] = [ProgressCallback(desc="DDIP"), LoggingCallback(log)]
    if checkpointing:
        cbs.append(CheckpointCallback(ck_dir, every=cfg.checkpoint_every, at_end=False))
    recon.run(recon.remaining(), callbacks=cbs)
    seconds = time.perf_counter() - t0
    result = recon.get_output()
    write_image(out, result, overwrite=args.overwrite)
    stem = output_stem(out)
    timing = recon.timing_report()
    run_seconds = float(recon.timings.get("total", 0.0) + recon.timings.get("init", 0.0))  # all sessions
    bundle = recon.bundle
    write_run_record(folder, cfg, cfg.seed, name=f"{stem}_run_record", extra={
        "inputs": {"prompts": args.prompts, "mult": args.mult, "additive": args.additive, "mr": args.mr,
                   "image_template": args.image_template, "weights": str(getattr(bundle, "path", None) or
                                                                         args.weights or "default"),
                   "config_file": str(cfg_path) if cfg_path else None, "preset": getattr(args, "preset", None),
                   "resume": args.resume},
        "input_identity": identity["inputs"],
        "output": str(out), "device": str(device), "seconds": round(seconds, 2),
        "seconds_per_step": timing, "pet_scale": float(recon.pet_scaler.scale),
        "beta_activity_units": recon.beta_activity, "timesteps": recon.timesteps,
        "data_consistency": recon.data_consistency(),
        "prior_planes": recon.prior_planes_summary(),
        "run_seconds_all_sessions": round(run_seconds, 2),
        "prior_card": {k: v for k, v in (getattr(bundle, "card", None) or {}).items()
                       if k in ("format", "weights_sha256", "created", "training", "architecture")},
    })
    if not args.no_png:
        png = folder / f"{stem}.png"
        save_slices_png(result.array, result.grid.voxel_size, png, title=f"DDIP {stem}",
                        units=str(result.meta.get("units", "activity (units of the data)")))
    dc = recon.data_consistency()
    if recon.prior_planes is not None and not bool(recon.prior_planes.all()):
        print(f"recon: {recon.prior_planes_summary()}")
    whole = f", the whole run with the steps before the resume {run_seconds:.1f} s" if args.resume else ""
    print(f"recon: wrote {out} ({len(recon.timesteps)} diffusion steps, {seconds:.1f} s{whole}, "
          f"{timing.get('total', 0.0):.2f} s/step); Poisson log-likelihood: warm start "
          f"{dc['loglik_warm_start']:.6g}, output {dc['loglik_output']:.6g} "
          f"({dc.get('loglik_gain', 0.0):+.4g})")
    return 0


#: volumes with fewer planes than this show every axial plane instead of the central three orthogonal slices (the
#: coronal and sagittal views of a 7-plane volume would be a few pixels high)
MIN_PLANES_FOR_ORTHOGONAL = 16


def slice_panels(array, voxel_size_zyx) -> list[tuple[str, Any, float]]:
    """The panels of the slice PNG: ``(title, 2D slice, aspect)``; aspect = height/width of a pixel (voxel sizes).

    Fewer than :data:`MIN_PLANES_FOR_ORTHOGONAL` planes: every axial plane. Otherwise the central axial, coronal
    and sagittal slices.
    """
    import numpy as np

    a = np.asarray(array)
    nz, ny, nx = a.shape
    vz, vy, vx = (float(v) for v in voxel_size_zyx)
    if nz < MIN_PLANES_FOR_ORTHOGONAL:
        return [(f"z = {k}", a[k], vy / vx) for k in range(nz)]
    return [("axial (z = %d)" % (nz // 2), a[nz // 2], vy / vx),
            ("coronal (y = %d)" % (ny // 2), a[:, ny // 2, :], vz / vx),
            ("sagittal (x = %d)" % (nx // 2), a[:, :, nx // 2], vz / vy)]


def save_slices_png(array, voxel_size_zyx, path: Path, title: str = "", units: str = "") -> Path:
    """Slices of ``array[z, y, x]`` (:func:`slice_panels`) with one colour bar (Agg backend), written atomically."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a = np.asarray(array, dtype=np.float32)
    vmax = float(np.percentile(a, 99.9)) if a.size else 1.0
    vmax = vmax if vmax > 0 else float(a.max() or 1.0)
    panels = slice_panels(a, voxel_size_zyx)
    rows = math.ceil(len(panels) / 5) if len(panels) > 3 else 1      # at most 5 panels a row
    cols = math.ceil(len(panels) / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 4.2) if len(panels) <= 3 else (2.6 * cols + 1.2, 2.8 * rows),
                             squeeze=False)
    axes = list(axes.ravel())
    im = None
    for ax, (name, sl, aspect) in zip(axes, panels):
        im = ax.imshow(sl, cmap="inferno", vmin=0, vmax=vmax, origin="upper",
                       aspect=aspect, interpolation="nearest")
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    cb = fig.colorbar(im, ax=axes, shrink=0.85)
    cb.set_label(units)
    if title:
        fig.suptitle(title)
    from ..utils.atomic import atomic_path

    try:
        with atomic_path(path) as tmp:  # a temporary name with the same suffix, renamed when complete
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
