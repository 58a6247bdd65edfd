"""CLI of simulation and studies: ``sirf-ddip simulate CONFIG --out DIR`` and ``sirf-ddip study CONFIG --out DIR``."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "simulate", help="simulate low-dose brain PET data (PETRIC folder layout)",
        description="Simulate one study from a simulation YAML (SimulationConfig keys: tracer, dose_fraction, "
                    "seed, scanner, num_rings, ...) into DIR, or every case of a study YAML (one with a 'cases' "
                    "list) into DIR/CASE. Files: prompts.hs, mult_factors.hs, additive_term.hs, truth.hv, mr.hv, "
                    "mask_*.hv, case.json.")
    s.add_argument("config", help="simulation or study YAML")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--overwrite", action="store_true", help="replace existing output")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted); repeatable")
    s.set_defaults(func=_simulate)

    p = subparsers.add_parser(
        "study", help="run a simulation study: simulate, reconstruct with every method, metrics, report",
        description="Simulate the cases of CONFIG, reconstruct each with OSEM, MAP-RDP, the diffusion prior "
                    "without fine-tuning, DDIP without MR and DDIP, compute metrics against the truth and write "
                    "DIR/metrics.json and DIR/report.html. Finished pieces are kept: rerunning the same command "
                    "after an interruption resumes. See configs/study-quick.yaml.")
    p.add_argument("config", help="study YAML (see configs/study-quick.yaml, configs/study-paper.yaml)")
    p.add_argument("--out", required=True, help="study folder (created; resumed if it exists)")
    p.add_argument("--overwrite", action="store_true", help="recompute everything, replacing earlier results")
    p.add_argument("--report-only", action="store_true", help="only rebuild DIR/report.html from saved results")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, e.g. methods.osem.max_iterations=5); repeatable")
    p.set_defaults(func=_study)

    d = subparsers.add_parser(
        "demo", help="offline demo: simulate an out-of-distribution low-dose brain, run OSEM, MAP-RDP and DDIP",
        description="The main job, offline: simulates an amyloid-negative brain at 10 % dose on 4 mMR rings "
                    "(the shipped prior was trained on FDG), reconstructs it with OSEM, MAP-RDP and DDIP "
                    "(shipped settings), and writes DIR/report.html, DIR/metrics.json and the images. "
                    "Settings: sirf_ddip/study/demo.yaml (any key can be changed with --set).")
    d.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    d.add_argument("--overwrite", action="store_true", help="recompute everything, replacing earlier results")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo config key (e.g. ddip.num_steps=20); repeatable")
    d.set_defaults(func=_demo)


def _simulate(args) -> int:
    from ..config import deep_merge, from_dict, parse_overrides, read_yaml
    from ..sim.simulate import SimulationConfig, simulate_study

    data = deep_merge(read_yaml(args.config), parse_overrides(args.set))
    out = Path(args.out)
    if "cases" in data:
        from ..study.study import load_study_config

        cfg = load_study_config(args.config, args.set)
        t0 = time.perf_counter()
        for c in cfg.cases:
            d = deep_merge(cfg.simulation, c.simulation)
            d.update(tracer=c.tracer, dose_fraction=c.dose_fraction, seed=c.seed)
            sc = from_dict(SimulationConfig, d, source=f"{args.config} (case {c.name})")
            with _config_named(f"{args.config} (case {c.name})", args.set):
                simulate_study(sc, out / c.name, overwrite=args.overwrite)
            print(f"{c.name}: {out / c.name}")
        print(f"simulated {len(cfg.cases)} case(s) in {time.perf_counter() - t0:.1f} s")
        return 0
    sc = from_dict(SimulationConfig, data, source=str(args.config))
    t0 = time.perf_counter()
    with _config_named(str(args.config), args.set):
        simulate_study(sc, out, overwrite=args.overwrite)
    print(f"simulated {out} in {time.perf_counter() - t0:.1f} s")
    return 0


@contextlib.contextmanager
def _config_named(source: str, overrides: list[str]):
    """A ``simulation: key 'k' ...`` error of the simulation names the config file (and the ``--set`` overrides,
    where a value may come from) instead of ``simulation``."""
    from ..errors import ConfigError

    try:
        yield
    except ConfigError as exc:
        msg = str(exc)
        if not msg.startswith("simulation: "):
            raise
        where = source + (f" (with --set {' '.join(overrides)})" if overrides else "")
        raise ConfigError(f"{where}: {msg[len('simulation: '):]}") from None


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "study" / "demo.yaml"


def _demo(args) -> int:
    args.config = str(DEMO_CONFIG)
    args.report_only = False
    if args.device:
        args.set = [f"device={args.device}"] + list(args.set)
    return _study(args)


def _study(args) -> int:
    from ..study.study import failed_pieces, format_metrics_table, load_study_config, rebuild_report, run_study

    cfg = load_study_config(args.config, args.set)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.report_only:
        path = rebuild_report(out, cfg)
        print(f"report: {path}")
        return 0
    metrics = run_study(cfg, out, overwrite=args.overwrite)
    el = time.perf_counter() - t0
    print(format_metrics_table(metrics))
    print(f"\nmetrics: {out / 'metrics.json'}\nreport:  {out / 'report.html'}\nwall time: {el:.1f} s")
    failed = failed_pieces(metrics)
    if failed:
        print(f"FAILED (recorded in metrics.json; rerun to retry): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
