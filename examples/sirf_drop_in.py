#!/usr/bin/env python
"""DDIP as a drop-in for SIRF's OSMAPOSL: the canonical SIRF OSEM script, with one line changed.

The script is SIRF's ``examples/Python/PET/osem_reconstruction.py`` recipe (prompts, mult factors and additive
term → acquisition model → ``make_Poisson_loglikelihood`` → reconstructor) run twice: once with
``sirf.STIR.OSMAPOSLReconstructor`` and once with ``sirf_ddip.DDIPReconstructor`` (and ``OSEMReconstructor`` as a
check that the data path agrees with STIR). It writes a comparison figure (PNG) and the images (Interfile).

Data (``--data``, default ``../shared/stir-reference/mmr_2d``): a folder with ``prompts.hs``, ``mult_factors.hs``,
``additive_term.hs`` (PETRIC convention: expected counts = mult · (A x + additive)) and an initial image
``init.hv`` (or ``OSEM_image.hv``) that defines the grid.

Listmode (``--listmode FILE --template T.hs``): the prompts and the randoms are first binned with SIRF's
``ListmodeToSinograms`` (randoms from delayeds/singles via ``estimate_randoms()``); the additive term is then
``randoms / mult`` (no scatter in this example) and the rest of the script is unchanged.

MR: the mmr_2d reference case has no MR image. The default prior of sirf_ddip is MR-conditioned; without ``--mr``
the script uses the shipped prior trained without MR (``no-mr``, or ``--prior``); ``--mr MR.hv`` gives an MR on the
PET grid; with ``--mr-phantom`` the script uses the reference ``phantom.hv`` as a stand-in "anatomical" image (a
demonstration only: it is the true activity, so it flatters the prior).

Needs a real SIRF (conda-forge / SyneRBI Docker); exits with a clear message when ``sirf.STIR`` is missing.

Test-only path: ``--standin`` imports ``tests/sirf_standin.py`` (a numpy stand-in that follows SIRF's behaviour,
not STIR's physics) as ``sirf.STIR`` and, without ``--data``, writes a small synthetic data set in its own format
first, so that CI runs this exact script end to end without SIRF. It is not a reconstruction of real data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "stir-reference" / "mmr_2d"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data folder (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("sirf_drop_in_out"), help="output folder")
    p.add_argument("--overwrite", action="store_true", help="overwrite existing outputs")
    p.add_argument("--subsets", type=int, default=7, help="view subsets (default 7)")
    p.add_argument("--iterations", type=int, default=2, help="OSEM iterations for OSMAPOSL (default 2)")
    p.add_argument("--projector", choices=("ray_tracing", "parallelproj"), default="ray_tracing")
    p.add_argument("--tangential-lors", type=int, default=3, help="ray tracing LORs per bin (default 3)")
    p.add_argument("--listmode", type=Path, help="listmode file (.l.hdr) to bin with ListmodeToSinograms")
    p.add_argument("--template", type=Path, help="sinogram template (.hs) for --listmode")
    p.add_argument("--interval", type=float, nargs=2, default=(0.0, 10.0), metavar=("START", "STOP"),
                   help="listmode time interval in s (default 0 10)")
    p.add_argument("--prior", help="prior weights (.safetensors or folder; default: the shipped prior)")
    p.add_argument("--config", help="DDIP config YAML (sirf_ddip.recon.config.DDIPConfig keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="DDIP config override")
    mr = p.add_mutually_exclusive_group()
    mr.add_argument("--mr", type=Path, help="MR image (on the PET grid) for an MR-conditioned prior")
    mr.add_argument("--mr-phantom", action="store_true",
                    help="use <data>/phantom.hv as a stand-in anatomical image (demonstration only)")
    p.add_argument("--device", default="auto", help="torch device for the prior (auto/cpu/cuda)")
    p.add_argument("--standin", action="store_true",
                   help="TEST ONLY: use tests/sirf_standin.py as sirf.STIR (and synthetic stand-in data)")
    return p.parse_args(argv)


def import_standin():
    """TEST ONLY: register ``tests/sirf_standin.py`` as ``sirf.STIR`` (see the module docstring)."""
    import importlib.util
    import types

    path = Path(__file__).resolve().parents[1] / "tests" / "sirf_standin.py"
    if not path.is_file():
        sys.exit(f"sirf_drop_in: --standin needs {path} (a source checkout of sirf_ddip)")
    spec = importlib.util.spec_from_file_location("sirf.STIR", path)
    mod = importlib.util.module_from_spec(spec)
    pkg = types.ModuleType("sirf")
    pkg.__path__ = []  # a namespace for the stand-in only
    pkg.STIR = mod
    sys.modules["sirf"], sys.modules["sirf.STIR"] = pkg, mod
    spec.loader.exec_module(mod)
    return mod


def write_standin_data(stir, folder: Path) -> Path:
    """TEST ONLY: prompts / mult_factors / additive_term / init / phantom in the stand-in's file format."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    acq = stir.AcquisitionData("StandIn Small")
    image = acq.create_uniform_image(1.0)
    nz, ny, nx = image.shape
    yy, xx = np.mgrid[:ny, :nx] - (ny - 1) / 2
    body = (yy / (0.4 * ny)) ** 2 + (xx / (0.33 * nx)) ** 2 <= 1
    hot = (yy + 3) ** 2 + (xx - 2) ** 2 <= 9
    phantom = image.clone().fill(np.repeat((body * 10.0 + hot * 30.0)[None], nz, 0).astype(np.float32))
    mult = acq.get_uniform_copy(1.0).fill(rng.uniform(0.5, 1.5, acq.shape).astype(np.float32))
    add = acq.get_uniform_copy(0.0).fill(rng.uniform(0.5, 1.0, acq.shape).astype(np.float32))
    am = stir.AcquisitionModelUsingRayTracingMatrix()
    am.set_acquisition_sensitivity(stir.AcquisitionSensitivityModel(mult))
    am.set_additive_term(add)
    am.set_up(acq, image)
    prompts = acq.clone().fill(rng.poisson(am.forward(phantom).as_array()).astype(np.float32))
    for name, obj in (("prompts.hs", prompts), ("mult_factors.hs", mult), ("additive_term.hs", add),
                      ("init.hv", image), ("phantom.hv", phantom)):
        obj.write(str(folder / name))
    return folder


def import_sirf():
    try:
        import sirf.STIR as stir
    except Exception as exc:  # noqa: BLE001 - ImportError or broken shared libraries
        sys.exit(f"sirf_drop_in: cannot import sirf.STIR ({exc}).\nThis example needs SIRF "
                 "(`conda install -c conda-forge sirf`, or the SyneRBI Docker image). Without SIRF use "
                 "`sirf-ddip recon` (sirf_ddip's own projector).")
    return stir


def load_data(stir, args):
    """prompts, mult_factors, additive_term, initial image (all SIRF objects)."""
    d = args.data
    stir.AcquisitionData.set_storage_scheme("memory")
    mult = stir.AcquisitionData(str(d / "mult_factors.hs"))
    if args.listmode:
        if args.template is None:
            sys.exit("sirf_drop_in: --listmode needs --template T.hs (the sinogram geometry)")
        template = stir.AcquisitionData(str(args.template))
        if tuple(template.dimensions()) != tuple(mult.dimensions()):
            sys.exit(f"sirf_drop_in: the template {args.template} has dimensions (tof, sinograms, views, "
                     f"tangential) {tuple(template.dimensions())} but {d / 'mult_factors.hs'} has "
                     f"{tuple(mult.dimensions())}: bin the listmode on the geometry of the mult factors")
        lm2sino = stir.ListmodeToSinograms()
        lm2sino.set_input(str(args.listmode))
        lm2sino.set_template(str(args.template))
        lm2sino.set_output_prefix(str(args.out / "sinograms"))
        lm2sino.set_time_interval(*args.interval)
        lm2sino.flag_on("store_prompts")
        lm2sino.set_up()
        lm2sino.process()
        prompts = lm2sino.get_output()
        randoms = lm2sino.estimate_randoms()
        # PETRIC convention: additive = background / mult (here background = randoms; add scatter if you have it)
        asm = stir.AcquisitionSensitivityModel(mult)
        asm.set_up(randoms)
        additive = asm.invert(randoms)
    else:
        prompts = stir.AcquisitionData(str(d / "prompts.hs"))
        additive = stir.AcquisitionData(str(d / "additive_term.hs"))
    for name in ("init.hv", "OSEM_image.hv"):
        if (d / name).is_file():
            image = stir.ImageData(str(d / name))
            break
    else:
        image = prompts.create_uniform_image(1.0)
    return prompts, mult, additive, image


def build_objective(stir, args, prompts, mult, additive, image):
    """The canonical SIRF recipe: acquisition model (S(Gx + a)) → Poisson log-likelihood."""
    from sirf_ddip.backends.sirf import make_acquisition_model

    am = make_acquisition_model(args.projector, num_tangential_LORs=args.tangential_lors, stir=stir)
    am.set_acquisition_sensitivity(stir.AcquisitionSensitivityModel(mult))
    am.set_additive_term(additive)
    am.set_up(prompts, image)
    return stir.make_Poisson_loglikelihood(prompts, acq_model=am), am


def run(recon, obj, prompts, image, subsets, subiterations=None):
    """SIRF's order (examples/Python/PET/osem_reconstruction.py): objective, subsets, input, set_up, estimate."""
    recon.set_objective_function(obj)
    # STIR writes <prefix>_<k>.hv after every sub-iteration by default, even with an empty prefix
    # (IterativeReconstruction.cxx:568-571): this script writes its own outputs
    recon.disable_output()
    recon.set_num_subsets(subsets)
    if subiterations is not None:
        recon.set_num_subiterations(subiterations)
    recon.set_input(prompts)
    recon.set_up(image)
    recon.set_current_estimate(image)
    t0 = time.perf_counter()
    recon.process()
    return recon.get_output(), time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    stir = import_standin() if args.standin else import_sirf()
    import numpy as np

    import sirf_ddip
    from sirf_ddip.recon.config import DDIPConfig
    from sirf_ddip.utils.provenance import check_output, write_run_record

    check_output(args.out, args.overwrite)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.standin and args.data == DEFAULT_DATA:
        args.data = write_standin_data(stir, args.out / "standin_data")
    prompts, mult, additive, image = load_data(stir, args)
    n_sub = args.iterations * args.subsets

    # 1. SIRF/STIR OSEM (OSMAPOSL without prior)
    obj, _ = build_objective(stir, args, prompts, mult, additive, image)
    osmaposl, t_stir = run(stir.OSMAPOSLReconstructor(), obj, prompts, image.clone(), args.subsets, n_sub)

    # 2. the same with sirf_ddip's OSEM on the same SIRF objective (a check of the data path)
    obj, _ = build_objective(stir, args, prompts, mult, additive, image)
    osem, t_osem = run(sirf_ddip.OSEMReconstructor(), obj, prompts, image.clone(), args.subsets, n_sub)

    # 3. the drop-in: DDIPReconstructor in place of OSMAPOSLReconstructor
    cfg = DDIPConfig.load(args.config, args.set)
    use_mr = args.mr is not None or args.mr_phantom
    cfg = cfg.replace(use_mr=use_mr, device=args.device)
    obj, _ = build_objective(stir, args, prompts, mult, additive, image)
    ddip = sirf_ddip.DDIPReconstructor(cfg)
    # without an MR image the shipped MR-conditioned prior cannot run: use the shipped prior trained without MR
    ddip.set_prior(args.prior if (args.prior is not None or use_mr) else "no-mr")
    if use_mr:
        ddip.set_anatomical_image(stir.ImageData(str(args.mr if args.mr else args.data / "phantom.hv")))
    ddip.set_objective_function(obj)
    ddip.set_input(prompts)
    ddip.set_up(image.clone())
    t0 = time.perf_counter()
    ddip.process()  # starts from its MLEM warm start (set_current_estimate would override it)
    ddip_img, t_ddip = ddip.get_output(), time.perf_counter() - t0

    for name, img in (("osmaposl", osmaposl), ("osem_sirf_ddip", osem), ("ddip", ddip_img)):
        img.write(str(args.out / f"{name}.hv"))
    ref = osmaposl.as_array()
    diff = float(np.linalg.norm(osem.as_array() - ref) / np.linalg.norm(ref))
    summary = {"osem_vs_osmaposl_rel_l2": diff, "time_s": {"osmaposl": t_stir, "osem": t_osem, "ddip": t_ddip},
               "standin": bool(args.standin)}
    print(f"OSEM (sirf_ddip) vs OSMAPOSL ({'stand-in' if args.standin else 'STIR'}): relative L2 = {diff:.2e}")
    print(f"times: OSMAPOSL {t_stir:.1f} s, OSEM {t_osem:.1f} s, DDIP {t_ddip:.1f} s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = ref.shape[0] // 2
    panels = [("OSMAPOSL (stand-in)" if args.standin else "STIR OSMAPOSL", ref), ("sirf_ddip OSEM", osem.as_array()), ("sirf_ddip DDIP", ddip_img.as_array())]
    vmax = max(float(a[z].max()) for _, a in panels)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for ax, (title, a) in zip(axes, panels):
        im = ax.imshow(a[z], cmap="gray_r", vmin=0, vmax=vmax)
        ax.set_title(title)
        ax.axis("off")
    fig.colorbar(im, ax=axes[:3].tolist(), shrink=0.8)
    mid = ref.shape[1] // 2
    for title, a in panels:
        axes[3].plot(a[z, mid], label=title)
    axes[3].set_title(f"profile y={mid}")
    axes[3].legend(fontsize=8)
    png = args.out / "comparison.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")
    write_run_record(args.out, cfg.to_dict(), cfg.seed, extra={"args": {k: str(v) for k, v in vars(args).items()},
                                                                "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
