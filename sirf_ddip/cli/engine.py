"""Engine sub-commands: ``forward``, ``backward``, ``osem`` (STIR Interfile in and out).

- ``sirf-ddip forward IMAGE.hv --template SINO.hs --out OUT.hs``: geometric ``A x`` (no factors) in the
  template's geometry;
- ``sirf-ddip backward SINO.hs --image-template IMG.hv --out OUT.hv``: ``Aᵀ y`` on the template's grid;
- ``sirf-ddip osem --prompts P.hs [--mult M.hs] [--additive A.hs] --init IMG.hv --iterations N --subsets S
  --out OUT.hv``: STIR-OSMAPOSL-equivalent OSEM; ``--init`` fixes the image grid.

Every command writes ``<out stem>_run_record.json`` next to its output (resolved parameters, versions, timing)
and refuses to overwrite unless ``--overwrite``. Every output is checked (suffix, folder, existing files, the
run record, no output that is an input) before any input is read, inputs with NaN/Inf are refused, and outputs
are written atomically. Errors in the inputs exit with code 2 and one line.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..io.template import DATA_HELP, TEMPLATE_HELP

__all__ = ["register"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device: auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def register(subparsers) -> None:
    """Add ``forward``, ``backward`` and ``osem`` to the ``sirf-ddip`` parser."""
    p = subparsers.add_parser("forward", help="forward project an image (geometric A x, no factors)",
                              description="Forward project IMAGE in the geometry of the template sinogram "
                                          "(geometric projector only: no multiplicative or additive terms).")
    p.add_argument("image", metavar="IMAGE", help="image (.hv, .nii, .nii.gz)")
    p.add_argument("--template", required=True, metavar="SINO.hs",
                   help=f"projection-data header giving the output geometry ({TEMPLATE_HELP})")
    p.add_argument("--out", required=True, metavar="OUT.hs", help="output projection data (.hs)")
    _add_common(p)
    p.set_defaults(func=run_forward)

    p = subparsers.add_parser("backward", help="back project projection data (A^T y)",
                              description="Back project SINO onto the grid of the image template.")
    p.add_argument("sino", metavar="SINO.hs", help=f"projection data (.hs; {DATA_HELP})")
    p.add_argument("--image-template", required=True, metavar="IMG.hv", help="image giving the grid")
    p.add_argument("--out", required=True, metavar="OUT.hv", help="output image (.hv, .nii, .nii.gz)")
    _add_common(p)
    p.set_defaults(func=run_backward)

    p = subparsers.add_parser("osem", help="OSEM reconstruction (STIR OSMAPOSL semantics)",
                              description="OSEM with STIR OSMAPOSL semantics; model y ~ Poisson(m (A x + a)).")
    p.add_argument("--prompts", required=True, metavar="P.hs", help=f"measured prompts (.hs; {DATA_HELP})")
    p.add_argument("--mult", default=None, metavar="M.hs", help=f"multiplicative factors m (.hs; {DATA_HELP})")
    p.add_argument("--additive", default=None, metavar="A.hs",
                   help=f"additive term a = (randoms + scatter) / m (.hs, PETRIC convention; {DATA_HELP})")
    p.add_argument("--init", required=True, metavar="IMG.hv", help="initial image; fixes the image grid")
    p.add_argument("--iterations", required=True, type=int, metavar="N", help="full iterations")
    p.add_argument("--subsets", required=True, type=int, metavar="S", help="view subsets")
    p.add_argument("--out", required=True, metavar="OUT.hv", help="output image (.hv, .nii, .nii.gz)")
    p.add_argument("--postfilter-fwhm", type=float, default=None, metavar="MM",
                   help="Gaussian post-filter FWHM in mm (applied to the output only)")
    p.add_argument("--save-interval", type=int, default=0, metavar="K",
                   help="also save the estimate every K sub-iterations as <out stem>_<k><suffix>")
    _add_common(p)
    p.set_defaults(func=run_osem)


# ------------------------------------------------------------------------------------------- helpers
def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


def _stem(path: Path) -> str:
    s = _suffix(path)
    return path.name[: -len(s)] if s else path.name


def _outputs_of(path: Path) -> list[Path]:
    """The files a header path produces (header + data file for Interfile)."""
    suf = _suffix(path).lower()
    if suf == ".hv":
        return [path, path.with_suffix(".v")]
    if suf == ".hs":
        return [path, path.with_suffix(".s")]
    return [path]


#: output suffixes each command accepts
IMAGE_SUFFIXES = (".hv", ".nii", ".nii.gz")
PROJ_SUFFIXES = (".hs",)


def check_out_suffix(path: Path, allowed: tuple[str, ...], option: str = "--out") -> None:
    """Refuse an output name whose suffix the writer cannot produce (before any work)."""
    from ..errors import OutputPathError

    if _suffix(path).lower() not in allowed:
        raise OutputPathError(path, f"unsupported output suffix {_suffix(path) or '(none)'!r}; use "
                              + " or ".join(allowed), option)


def _run_record_files(out: Path) -> list[Path]:
    from ..utils.provenance import run_record_paths

    return run_record_paths(out.parent, f"{_stem(out)}_run_record")


def _check_outputs(paths: list[Path], overwrite: bool, inputs: list[str | None] = ()) -> None:
    """Every file the command will write (outputs, their data files, the run record) can be written: no folder
    in the way, no existing file without ``--overwrite``, no output that is also an input. Runs before any work."""
    from ..errors import OutputPathError
    from ..utils.provenance import check_output_path

    files = [f for p in paths for f in _outputs_of(p)] + _run_record_files(paths[0])
    seen: dict[Path, Path] = {}
    srcs = {Path(i).resolve(): i for i in inputs if i}
    for f in files:
        key = f.resolve()
        if key in seen:
            raise OutputPathError(f, f"written twice (also the data file or record of {seen[key]})")
        seen[key] = f
        if key in srcs:
            raise OutputPathError(f, f"is also an input ({srcs[key]}); choose another output name")
        check_output_path(f, overwrite)


def _record(out: Path, command: str, params: dict[str, Any], timing: dict[str, float], overwrite: bool,
            args: argparse.Namespace | None = None) -> Path:
    from ..utils.provenance import write_run_record

    name = f"{_stem(out)}_run_record"  # checked with the outputs, before any work (_check_outputs)
    argv = ["sirf-ddip", command]
    if args is not None:
        argv += [f"{k}={v}" for k, v in sorted(vars(args).items()) if k not in ("func", "command")]
    return write_run_record(out.parent, config={"command": command, **params}, seed=None,
                            command=argv, extra={"timing_s": timing}, name=name)


def _projector(geometry, grid, device, image_name: str, sino_name: str):
    from ..errors import GeometryMismatchError
    from ..physics.projector import Projector

    try:
        return Projector(geometry, grid, device=device)
    except ValueError as exc:
        raise GeometryMismatchError(f"image {image_name} ({grid.describe()}) cannot be used with the "
                                    f"projection data {sino_name} ({geometry.describe()}): {exc}") from None


# ------------------------------------------------------------------------------------------- commands
def _project(args, adjoint: bool) -> int:
    """``forward`` (``adjoint=False``: image → ``A x`` in the template's geometry) and ``backward``
    (``adjoint=True``: sinogram → ``Aᵀ y`` on the template's grid): one body, two directions."""
    import torch

    from ..data import Image, ProjData
    from ..io import read_image, read_projdata, write_image, write_projdata
    from ..io.template import read_template_geometry
    from ..utils.checks import require_finite
    from ..utils.device import resolve_device

    out = Path(args.out)
    if adjoint:
        command, inputs = "backward", {"sino": args.sino, "image_template": args.image_template}
        check_out_suffix(out, IMAGE_SUFFIXES)
    else:
        command, inputs = "forward", {"image": args.image, "template": args.template}
        check_out_suffix(out, PROJ_SUFFIXES)
    _check_outputs([out], args.overwrite, list(inputs.values()))
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    if adjoint:
        sino, img = read_projdata(args.sino), read_image(args.image_template)  # data read: exact size
        geometry, src, img_name, sino_name, what = (sino.geometry, sino.array, args.image_template, args.sino,
                                                    "projection data")
    else:
        img, geometry = read_image(args.image), read_template_geometry(args.template)  # data file not read
        src, img_name, sino_name, what = img.array, args.image, args.template, "image"
    require_finite(src, sino_name if adjoint else img_name, what)
    proj = _projector(geometry, img.grid, device, img_name, sino_name)
    with torch.no_grad():
        t = torch.as_tensor(src, device=device)
        res = (proj.adjoint(t) if adjoint else proj.forward(t)).detach().cpu().numpy().astype("float32")
    t1 = time.perf_counter()
    if adjoint:
        write_image(out, Image(res, img.grid), overwrite=args.overwrite)
    else:
        write_projdata(out, ProjData(res, geometry), overwrite=args.overwrite)
    _record(out, command, {**inputs, "out": str(out), "device": str(device), "geometry": geometry.describe(),
                           "image_grid": img.grid.to_dict()},
            {"project": t1 - t0, "total": time.perf_counter() - t0}, args.overwrite, args)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def run_forward(args) -> int:
    """``sirf-ddip forward``: geometric ``A x`` of IMAGE in the template's geometry."""
    return _project(args, adjoint=False)


def run_backward(args) -> int:
    """``sirf-ddip backward``: ``Aᵀ y`` of SINO on the image template's grid."""
    return _project(args, adjoint=True)


def _set_up_with_progress(ds, num_subsets: int) -> None:
    """Trace the projector (one-off; on-disk cache for large ones) and compute the subset sensitivities, with
    progress on stderr (a full mMR span-11 study takes minutes here)."""
    from ..utils.progress import progress, progress_enabled

    proj = getattr(ds, "projector", None)
    if proj is not None and hasattr(proj, "set_up"):
        t = time.perf_counter()
        if progress_enabled():
            print(f"setting up the projector ({ds.geometry.describe()}, image {tuple(ds.grid.shape)})...",
                  file=sys.stderr, flush=True)
        proj.set_up()
        if progress_enabled():
            nnz = proj.nnz() if hasattr(proj, "nnz") else None
            print(f"projector ready in {time.perf_counter() - t:.1f} s"
                  + (f" ({nnz / 1e6:.0f} M matrix elements)" if nnz else ""), file=sys.stderr, flush=True)
    for s in progress(range(num_subsets), desc="subset sensitivities"):
        ds.sensitivity(s if num_subsets > 1 else None)  # cached by the data step; OSEM's set-up reuses them


class _SaveEvery:
    """Callback: write the estimate every ``k`` sub-iterations."""

    def __init__(self, out: Path, every: int, overwrite: bool):
        self.out, self.every, self.overwrite = out, every, overwrite
        self.written: list[str] = []

    def on_start(self, algorithm, total):
        pass

    def on_end(self, algorithm):
        pass

    def path(self, k: int) -> Path:
        return self.out.parent / f"{_stem(self.out)}_{k}{_suffix(self.out)}"

    def __call__(self, algorithm):
        from ..io import write_image

        k = algorithm.iteration
        if k % self.every == 0:
            p = self.path(k)
            write_image(p, algorithm.get_current_estimate(), overwrite=self.overwrite)
            self.written.append(str(p))


def run_osem(args) -> int:
    from ..errors import ConfigError
    from ..io import read_image, write_image
    from ..physics.model import EngineLogLikelihood
    from ..recon.callbacks import ProgressCallback
    from ..recon.osem import OSEMReconstructor
    from ..utils.checks import require_finite
    from ..utils.device import resolve_device

    if args.iterations < 0:
        raise ConfigError(f"--iterations must be >= 0, got {args.iterations}")
    if args.subsets < 1:
        raise ConfigError(f"--subsets must be >= 1, got {args.subsets}")
    if args.save_interval < 0:
        raise ConfigError(f"--save-interval must be >= 0, got {args.save_interval}")
    if args.postfilter_fwhm is not None and not (math.isfinite(args.postfilter_fwhm) and args.postfilter_fwhm >= 0):
        raise ConfigError(f"--postfilter-fwhm must be a number of mm >= 0, got {args.postfilter_fwhm}")
    out = Path(args.out)
    check_out_suffix(out, IMAGE_SUFFIXES)
    nsub = args.iterations * args.subsets
    saves = []
    if args.save_interval:
        saver = _SaveEvery(out, args.save_interval, args.overwrite)
        saves = [saver.path(k) for k in range(args.save_interval, nsub + 1, args.save_interval)]
    _check_outputs([out, *saves], args.overwrite, [args.prompts, args.mult, args.additive, args.init])
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    init = read_image(args.init)
    require_finite(init.array, args.init, "initial image")
    ds = EngineLogLikelihood.from_files(args.prompts, args.mult, args.additive, image_template=args.init,
                                   device=device, num_subsets=1)
    try:
        ds.set_num_subsets(args.subsets)
    except ValueError as exc:
        raise ConfigError(f"--subsets {args.subsets}: {exc}") from None
    recon = OSEMReconstructor(ds, num_subsets=args.subsets, num_iterations=args.iterations,
                              postfilter_fwhm=args.postfilter_fwhm)
    t1 = time.perf_counter()
    _set_up_with_progress(ds, args.subsets)
    recon.set_up(init)
    recon.set_current_estimate(init)
    t2 = time.perf_counter()
    callbacks: list[Any] = [ProgressCallback(desc="OSEM")]
    if args.save_interval:
        callbacks.append(saver)
    recon.run(nsub, callbacks=callbacks)
    t3 = time.perf_counter()
    write_image(out, recon.get_output(), overwrite=args.overwrite)
    params = {
        "prompts": args.prompts, "mult": args.mult, "additive": args.additive, "init": args.init,
        "iterations": args.iterations, "subsets": args.subsets, "subiterations": nsub, "out": str(out),
        "postfilter_fwhm_mm": args.postfilter_fwhm, "save_interval": args.save_interval,
        "saved_estimates": [str(p) for p in saves], "device": str(device),
        "geometry": ds.geometry.describe(), "image_grid": ds.grid.to_dict(),
        "enforce_initial_positivity": recon.enforce_initial_positivity,
        "semantics": "STIR OSMAPOSL (no prior), subset sensitivities, STIR view subsets",
    }
    timing = {"load_and_build": t1 - t0, "sensitivities": t2 - t1, "iterations": t3 - t2,
              "per_subiteration": (t3 - t2) / max(nsub, 1), "total": time.perf_counter() - t0}
    _record(out, "osem", params, timing, args.overwrite, args)
    print(f"wrote {out} ({nsub} sub-iterations in {t3 - t2:.1f} s)", file=sys.stderr)
    return 0
