"""Bad inputs the way a new user makes them, through every command of the CLI (issue 14).

Each case builds a tiny study in ``tmp_path`` (2-ring, 16-detector scanner; a 3x8x8 image), breaks one thing,
runs the command, and checks the three promises of the CLI:

- it fails (never exit 0 with a wrong result) with one of our named errors: exit code 2 and *one* line on
  stderr that names the culprit (``expect``), never a traceback;
- it leaves the folder as it found it: no new, partial or changed files;
- it fails before any work (all inputs here fail early, so the whole set runs in seconds in-process).

Run this file as a script to push every case through a real ``python -m sirf_ddip`` subprocess and print the
counts (exit 0 / traceback / partial or changed files / clean refusal)::

    PYTHONPATH=. python tests/test_reliability_cli.py [PACKAGE_ROOT]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_physics import tiny_geometry  # noqa: E402

# ----------------------------------------------------------------------------------------- the tiny study


def build_study(d: Path) -> None:
    """Prompts, factors, additive term, an image, an init image, an MR and a mask: tiny and valid."""
    from sirf_ddip.data import Image, ProjData
    from sirf_ddip.io import write_image, write_projdata

    geo = tiny_geometry(num_tang=8)
    grid = geo.default_image_grid()
    rng = np.random.default_rng(3)
    img = np.zeros(grid.shape, np.float32)
    img[:, 2:6, 2:6] = 2.0
    write_image(d / "img.hv", Image(img, grid))
    write_image(d / "init.hv", Image(np.ones(grid.shape, np.float32), grid))
    write_image(d / "mr.hv", Image(rng.uniform(0, 1, grid.shape).astype(np.float32), grid))
    write_projdata(d / "prompts.hs", ProjData(rng.poisson(5, geo.shape).astype(np.float32), geo))
    write_projdata(d / "mult.hs", ProjData(np.ones(geo.shape, np.float32), geo))
    write_projdata(d / "add.hs", ProjData(np.full(geo.shape, 0.1, np.float32), geo))
    (d / "sim.yaml").write_text("tracer: fdg\ndose_fraction: 0.1\nseed: 1\n")


def edit_header(path: Path, key: str, value: str) -> None:
    """Replace the value of ``key`` (a regex on the key part) in an Interfile header."""
    text = path.read_text(encoding="utf-8")
    new, n = re.subn(rf"(?im)^(\s*!?{key}\s*:=).*$", lambda m: f"{m.group(1)} {value}", text)
    assert n >= 1, f"{key} not in {path}"
    path.write_text(new, encoding="utf-8")


def poke_values(path: Path, value: float, index: int = 5) -> None:
    """Set one float32 of a data file (NaN, Inf, ...)."""
    a = np.fromfile(path, "<f4")
    a[index] = value
    a.tofile(path)


def append_bytes(path: Path, n: int) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * n)


def random_safetensors(d: Path, with_sha: bool = False) -> None:
    """A valid safetensors file of random tensors and a card that does not describe it."""
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.randn(4, 4)}, str(d / "rand.safetensors"))
    card = {"format": "sirf_ddip-prior/1", "architecture": {"channels": 8}}
    if with_sha:
        card["weights_sha256"] = "0" * 64
    (d / "rand.card.json").write_text(json.dumps(card))


# ----------------------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """One bad input: ``argv`` (``{d}`` is the study folder), what to break first, what the error must name."""

    name: str
    argv: list[str]
    setup: Callable[[Path], None] | None = None
    expect: str | None = None  # a (case-insensitive) regex the one-line error must contain
    env: dict[str, str] = field(default_factory=dict)


FWD = ["forward", "{d}/img.hv", "--template", "{d}/prompts.hs", "--out", "{d}/fwd.hs", "--device", "cpu"]
BWD = ["backward", "{d}/prompts.hs", "--image-template", "{d}/init.hv", "--out", "{d}/bp.hv", "--device", "cpu"]
OSEM = ["osem", "--prompts", "{d}/prompts.hs", "--mult", "{d}/mult.hs", "--additive", "{d}/add.hs",
        "--init", "{d}/init.hv", "--iterations", "1", "--subsets", "2", "--out", "{d}/osem.hv", "--device", "cpu"]
RECON = ["recon", "--prompts", "{d}/prompts.hs", "--mult", "{d}/mult.hs", "--additive", "{d}/add.hs",
         "--mr", "{d}/mr.hv", "--out", "{d}/ddip.hv", "--device", "cpu", "--no-png"]
CHECK = ["prior", "check", "--image", "{d}/img.hv", "--mr", "{d}/mr.hv", "--out", "{d}/den.hv", "--device", "cpu"]
SIM = ["simulate", "{d}/sim.yaml", "--out", "{d}/simout"]


def _w(name: str, text: str | bytes) -> Callable[[Path], None]:
    def f(d: Path) -> None:
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


def _truncated_nifti(d: Path) -> None:
    from sirf_ddip.io import read_image, write_image

    write_image(d / "cut.nii", read_image(d / "img.hv"))
    data = (d / "cut.nii").read_bytes()
    (d / "cut.nii").write_bytes(data[: len(data) - 100])


def _both(*fs: Callable[[Path], None]) -> Callable[[Path], None]:
    def f(d: Path) -> None:
        for g in fs:
            g(d)
    return f


def _sub(argv: list[str], old: str, new: str) -> list[str]:
    return [new if a == old else a for a in argv]


CASES: list[Case] = [
    # ------------------------------------------------------------------ forward: the image
    Case("fwd-image-missing", _sub(FWD, "{d}/img.hv", "{d}/nope.hv"), None, "nope.hv"),
    Case("fwd-image-nan", FWD, lambda d: poke_values(d / "img.v", np.nan), r"img\.hv.*NaN"),
    Case("fwd-image-inf", FWD, lambda d: poke_values(d / "img.v", np.inf), r"img\.hv.*Inf"),
    Case("fwd-image-data-too-long", FWD, lambda d: append_bytes(d / "img.v", 4 * 64), r"img.*matrix size"),
    Case("fwd-image-matrix-off-by-one", FWD, lambda d: edit_header(d / "img.hv", r"matrix size \[1\]", "7"),
         r"matrix size"),
    Case("fwd-image-number-format", FWD,
         lambda d: (edit_header(d / "img.hv", "number format", "signed integer"),
                    edit_header(d / "img.hv", r"number of bytes per pixel", "2")), r"number format|bytes per pixel"),
    Case("fwd-image-byte-order", FWD, lambda d: edit_header(d / "img.hv", "imagedata byte order", "BIGENDIAN"),
         "byte order"),
    Case("fwd-image-zero-voxel", FWD, lambda d: edit_header(d / "img.hv", r"scaling factor \(mm/pixel\) \[1\]", "0"),
         r"scaling factor"),
    Case("fwd-image-negative-voxel", FWD,
         lambda d: edit_header(d / "img.hv", r"scaling factor \(mm/pixel\) \[2\]", "-4"), r"scaling factor"),
    Case("fwd-image-not-interfile", FWD, _w("img.hv", "hello world\n"), "INTERFILE"),
    Case("fwd-image-binary-header", FWD, _w("img.hv", bytes(range(256)) * 4), r"img\.hv"),
    Case("fwd-image-is-folder", _sub(FWD, "{d}/img.hv", "{d}/folder.hv"), lambda d: (d / "folder.hv").mkdir(),
         "folder.hv"),
    Case("fwd-image-garbage-nifti", _sub(FWD, "{d}/img.hv", "{d}/junk.nii"), _w("junk.nii", b"\x00junk" * 50),
         "junk.nii"),
    Case("fwd-image-truncated-nifti", _sub(FWD, "{d}/img.hv", "{d}/cut.nii"), lambda d: _truncated_nifti(d), "cut.nii"),
    Case("fwd-image-unknown-suffix", _sub(FWD, "{d}/img.hv", "{d}/img.png"), _w("img.png", b"x"), r"\.hv"),
    # ------------------------------------------------------------------ forward: the template and outputs
    # forward's --template gives only a geometry (its data file is never read): header errors are refused there;
    # what needs the data (sizes, byte order, a missing file) is checked where data are read (backward's input)
    Case("bwd-sino-views-half", BWD, lambda d: edit_header(d / "prompts.hs", r"matrix size \[3\]", "4"),
         r"matrix size \[3\]|views"),
    Case("bwd-sino-bins-off", BWD, lambda d: edit_header(d / "prompts.hs", r"matrix size \[1\]", "7"),
         r"matrix size \[1\]"),
    Case("fwd-template-ring-diff-impossible", FWD,
         lambda d: (edit_header(d / "prompts.hs", "minimum ring difference per segment", "{-5,0,1}"),
                    edit_header(d / "prompts.hs", "maximum ring difference per segment", "{-1,0,5}")),
         r"ring difference"),
    Case("bwd-sino-axial-contradicts-rings", BWD,
         lambda d: (edit_header(d / "prompts.hs", r"matrix size \[2\]", "{1,3,1}"), append_bytes(d / "prompts.s", 256)),
         r"axial|matrix size \[2\]|rings"),
    Case("bwd-sino-rings-contradict", BWD,
         lambda d: edit_header(d / "prompts.hs", "number of rings", "3"), r"rings|axial"),
    Case("fwd-template-segment-keys-disagree", FWD,
         lambda d: edit_header(d / "prompts.hs", r"matrix size \[2\]", "{1,2}"), r"matrix size \[2\]|segment"),
    Case("fwd-out-wrong-suffix", _sub(FWD, "{d}/fwd.hs", "{d}/fwd.hv"), None, r"\.hs"),
    Case("fwd-out-exists", FWD, _w("fwd.hs", "old"), "overwrite"),
    Case("fwd-out-data-exists", FWD, _w("fwd.s", "old"), "overwrite"),
    Case("fwd-stale-run-record", FWD, _w("fwd_run_record.json", "{}"), "run_record"),
    Case("fwd-out-under-a-file", _sub(FWD, "{d}/fwd.hs", "{d}/afile/fwd.hs"), _w("afile", "x"), "afile"),
    Case("fwd-device-cuda", _sub(FWD, "cpu", "cuda"), None, "cuda"),
    Case("fwd-device-garbage", _sub(FWD, "cpu", "gpu0"), None, "gpu0"),
    # ------------------------------------------------------------------ backward
    Case("bwd-sino-nan", BWD, lambda d: poke_values(d / "prompts.s", np.nan), r"prompts.*NaN"),
    Case("bwd-sino-inf", BWD, lambda d: poke_values(d / "prompts.s", -np.inf), r"prompts.*Inf"),
    Case("bwd-sino-too-long", BWD, lambda d: append_bytes(d / "prompts.s", 4 * 8), r"prompts"),
    Case("bwd-sino-byte-order", BWD, lambda d: edit_header(d / "prompts.hs", "imagedata byte order", "BIGENDIAN"),
         "byte order"),
    Case("bwd-template-data-missing", BWD, lambda d: (d / "init.v").unlink(), r"init"),
    Case("bwd-out-wrong-suffix", _sub(BWD, "{d}/bp.hv", "{d}/bp.hs"), None, r"\.hv"),
    Case("bwd-out-no-suffix", _sub(BWD, "{d}/bp.hv", "{d}/bp"), None, r"\.hv"),
    Case("bwd-device-cuda", _sub(BWD, "cpu", "cuda:1"), None, "cuda"),
    # ------------------------------------------------------------------ osem
    Case("osem-init-nan", OSEM, lambda d: poke_values(d / "init.v", np.nan), r"init.*NaN"),
    Case("osem-init-inf", OSEM, lambda d: poke_values(d / "init.v", np.inf), r"init.*Inf"),
    Case("osem-prompts-nan", OSEM, lambda d: poke_values(d / "prompts.s", np.nan), r"prompts.*NaN"),
    Case("osem-mult-too-long", OSEM, lambda d: append_bytes(d / "mult.s", 64), r"mult"),
    Case("osem-subsets-zero", _sub(OSEM, "2", "0"), None, "subsets"),
    Case("osem-subsets-too-many", _sub(OSEM, "2", "100"), None, "subsets"),
    Case("osem-iterations-negative", _sub(OSEM, "1", "-1"), None, "iterations"),
    Case("osem-postfilter-negative", OSEM + ["--postfilter-fwhm", "-3"], None, "fwhm"),
    Case("osem-postfilter-nan", OSEM + ["--postfilter-fwhm", "nan"], None, "fwhm"),
    Case("osem-save-interval-negative", OSEM + ["--save-interval", "-2"], None, "save-interval"),
    Case("osem-out-wrong-suffix", _sub(OSEM, "{d}/osem.hv", "{d}/osem.txt"), None, r"\.hv"),
    Case("osem-out-exists", OSEM, _w("osem.hv", "old"), "overwrite"),
    Case("osem-stale-run-record", OSEM, _w("osem_run_record.json", "{}"), "run_record"),
    Case("osem-saved-estimate-exists", OSEM + ["--save-interval", "1"], _w("osem_1.hv", "old"), "osem_1"),
    Case("osem-device-cuda", _sub(OSEM, "cpu", "cuda"), None, "cuda"),
    # ------------------------------------------------------------------ recon (all fail before any work)
    Case("recon-out-wrong-suffix", _sub(RECON, "{d}/ddip.hv", "{d}/ddip.hs"), None, r"\.hv"),
    Case("recon-checkpoint-dir-under-file", RECON + ["--checkpoint-dir", "{d}/afile/ck"], _w("afile", "x"), "afile"),
    Case("recon-checkpoint-dir-is-file", RECON + ["--checkpoint-dir", "{d}/afile"], _w("afile", "x"), "afile"),
    Case("recon-stale-run-record", RECON, _w("ddip_run_record.json", "{}"), "run_record"),
    Case("recon-out-exists", RECON, _w("ddip.hv", "old"), "overwrite"),
    Case("recon-unknown-set-key", RECON + ["--set", "nosuchkey=1"], None, "nosuchkey"),
    Case("recon-set-no-equals", RECON + ["--set", "num_steps"], None, "key=value"),
    Case("recon-config-missing", RECON + ["--config", "{d}/none.yaml"], None, "none.yaml"),
    Case("recon-config-binary", RECON + ["--config", "{d}/bin.yaml"], _w("bin.yaml", b"\xff\xfe\x00\x81" * 30),
         "bin.yaml"),
    Case("recon-config-bad-yaml", RECON + ["--config", "{d}/bad.yaml"], _w("bad.yaml", "a: [1, 2\n"), "bad.yaml"),
    Case("recon-config-list", RECON + ["--config", "{d}/list.yaml"], _w("list.yaml", "- 1\n- 2\n"), "list.yaml"),
    Case("recon-resume-missing", RECON + ["--resume", "{d}/nock"], None, "nock"),
    Case("recon-resume-no-identity", RECON + ["--resume", "{d}/ck"], lambda d: (d / "ck").mkdir(), r"ck"),
    Case("recon-mr-and-no-mr", RECON + ["--no-mr"], None, "no-mr"),
    Case("recon-weights-missing", RECON + ["--weights", "{d}/nope.safetensors"], None, "nope.safetensors"),
    Case("recon-mr-nan", RECON, lambda d: poke_values(d / "mr.v", np.nan), r"mr.*NaN"),
    Case("recon-device-cuda", _sub(RECON, "cpu", "cuda"), None, "cuda"),
    Case("recon-prompts-too-long", RECON, lambda d: append_bytes(d / "prompts.s", 8), "prompts"),
    # ------------------------------------------------------------------ prior
    Case("prior-info-unknown-weights", ["prior", "info", "--weights", "{d}/rand.safetensors"],
         lambda d: random_safetensors(d), r"rand"),
    Case("prior-info-wrong-sha", ["prior", "info", "--weights", "{d}/rand.safetensors"],
         lambda d: random_safetensors(d, with_sha=True), r"sha"),
    Case("prior-info-missing", ["prior", "info", "--weights", "{d}/nope.safetensors"], None, "nope"),
    Case("prior-check-noisy-is-out", CHECK + ["--noisy-out", "{d}/den.hv"], None, "noisy-out"),
    Case("prior-check-out-wrong-suffix", _sub(CHECK, "{d}/den.hv", "{d}/den.hs"), None, r"\.hv"),
    Case("prior-check-noisy-wrong-suffix", CHECK + ["--noisy-out", "{d}/noisy.txt"], None, r"\.hv"),
    Case("prior-check-t-too-large", CHECK + ["--t", "100000"], None, r"\bt\b"),
    Case("prior-check-t-negative", CHECK + ["--t", "-1"], None, r"\bt\b"),
    Case("prior-check-image-nan", CHECK, lambda d: poke_values(d / "img.v", np.nan), r"img.*NaN"),
    Case("prior-check-no-mr", [a for a in CHECK if a not in ("--mr", "{d}/mr.hv")], None, "mr"),
    Case("prior-check-device-cuda", _sub(CHECK, "cpu", "cuda"), None, "cuda"),
    Case("prior-check-out-exists", CHECK, _w("den.hv", "old"), "overwrite"),
    # ------------------------------------------------------------------ simulate
    Case("sim-config-missing", _sub(SIM, "{d}/sim.yaml", "{d}/none.yaml"), None, "none.yaml"),
    Case("sim-unknown-key", SIM, _w("sim.yaml", "tracer: fdg\nbogus: 3\n"), "bogus"),
    Case("sim-bad-tracer", SIM, _w("sim.yaml", "tracer: water\n"), "tracer"),
    Case("sim-binary-config", SIM, _w("sim.yaml", b"\xff\xfe\x81\x00" * 10), "sim.yaml"),
    Case("sim-unknown-scanner", SIM, _w("sim.yaml", "scanner: nosuch\n"), "scanner"),
    Case("sim-num-rings-zero", SIM, _w("sim.yaml", "num_rings: 0\n"), "num_rings"),
    Case("sim-dose-string", SIM, _w("sim.yaml", "dose_fraction: lots\n"), "dose_fraction"),
    Case("sim-span-even", SIM + ["--set", "span=2"], None, "span"),
    Case("sim-out-is-file", _sub(SIM, "{d}/simout", "{d}/afile"), _w("afile", "x"), "afile"),
    Case("sim-set-bad-type", SIM + ["--set", "seed=abc"], None, "seed"),
    Case("sim-seed-negative", SIM + ["--set", "seed=-1"], None, "seed"),
    Case("sim-image-xy-zero", SIM + ["--set", "image_xy=0"], None, "image_xy"),
    Case("sim-config-is-folder", _sub(SIM, "{d}/sim.yaml", "{d}/cfgdir"), lambda d: (d / "cfgdir").mkdir(), "cfgdir"),
    # ------------------------------------------------------------------ more of each kind
    Case("fwd-image-offset-nan", FWD, lambda d: edit_header(d / "img.hv", r"first pixel offset \(mm\) \[1\]", "nan"),
         r"first pixel offset"),
    Case("fwd-image-scale-nan", FWD, lambda d: open(d / "img.hv", "a").write("image scaling factor [1] := nan\n"),
         "scaling factor"),
    Case("sim-template-cache-missing", SIM + ["--set", "template_cache={d}/none.npz"], None, "none.npz"),
    Case("bwd-sino-missing-data", BWD, lambda d: (d / "prompts.s").unlink(), "prompts"),
    Case("fwd-template-rings-zero", FWD, lambda d: edit_header(d / "prompts.hs", "number of rings", "0"),
         r"rings"),
    Case("bwd-out-is-input", _sub(BWD, "{d}/bp.hv", "{d}/init.hv") + ["--overwrite"], None, "input"),
    Case("osem-out-is-input", _sub(OSEM, "{d}/osem.hv", "{d}/init.hv") + ["--overwrite"], None, "input"),
    Case("recon-out-is-mr", _sub(RECON, "{d}/ddip.hv", "{d}/mr.hv") + ["--overwrite"], None, "input"),
    Case("recon-stale-checkpoint", RECON, lambda d: (d / "ddip_checkpoint").mkdir() or
         (d / "ddip_checkpoint" / "ddip_checkpoint.pt").write_bytes(b"old"), "ddip_checkpoint.pt"),
    Case("prior-check-out-is-image", _sub(CHECK, "{d}/den.hv", "{d}/img.hv") + ["--overwrite"], None, "input"),
    Case("prior-info-card-not-json", ["prior", "info", "--weights", "{d}/rand.safetensors"],
         lambda d: (random_safetensors(d), (d / "rand.card.json").write_text("{nope")), "JSON"),
]


# ----------------------------------------------------------------------------------------- running


def snapshot(d: Path) -> dict[str, str]:
    """Relative path -> content hash of every file (folders as ``<dir>``)."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    rc: int
    stderr: str
    traceback: bool
    changed: list[str]


def prepare(case: Case, base: Path, d: Path) -> None:
    shutil.copytree(base, d, dirs_exist_ok=True)
    if case.setup is not None:
        case.setup(d)


def _argv(case: Case, d: Path) -> list[str]:
    return [a.replace("{d}", str(d)) for a in case.argv]



def outcome(d: Path, before: dict[str, str], rc: int, err: str, traceback: bool) -> Outcome:
    after = snapshot(d)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return Outcome(rc, err, traceback or "Traceback (most recent call last)" in err, changed)


def run_in_process(case: Case, d: Path, capsys) -> Outcome:
    from sirf_ddip.cli import main

    before = snapshot(d)
    capsys.readouterr()
    tb = False
    try:
        rc = main(_argv(case, d))
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    except BaseException:  # noqa: BLE001 - an escaping exception is a traceback for the user
        rc, tb = 1, True
    err = capsys.readouterr().err
    return outcome(d, before, rc, err, tb)


def run_subprocess(case: Case, d: Path, root: Path, timeout: float = 60) -> Outcome:
    before = snapshot(d)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "SIRF_DDIP_PROGRESS": "0",
           "CUDA_VISIBLE_DEVICES": "", **case.env}
    env.pop("SIRF_DDIP_DEBUG", None)
    try:
        p = subprocess.run([sys.executable, "-m", "sirf_ddip", *_argv(case, d)], capture_output=True, text=True,
                           env=env, cwd=str(d), timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # it started real work: a late refusal at best
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return outcome(d, before, -9, err + f"\n(still running after {timeout} s: killed)", False)
    return outcome(d, before, p.returncode, p.stderr, False)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("study")
    build_study(base)
    return base


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, study: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("SIRF_DDIP_DEBUG", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the "no GPU" of the cuda cases, anywhere
    d = tmp_path / "s"
    prepare(case, study, d)
    res = run_in_process(case, d, capsys)
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("note:")]
    assert not res.traceback, res.stderr
    assert res.rc == 2, f"exit {res.rc}: {res.stderr}"
    assert len(lines) == 1, res.stderr
    assert res.changed == [], f"files created or changed: {res.changed}"
    if case.expect:
        assert re.search(case.expect, lines[0], re.I), lines[0]


def test_case_names_are_unique():
    assert len({c.name for c in CASES}) == len(CASES) >= 50


def main(argv: list[str]) -> int:
    """Run every case in a subprocess against the package at ``argv[0]`` (default: this checkout); print counts."""
    import tempfile

    root = Path(argv[0]).resolve() if argv else Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    counts = {"exit 0": 0, "traceback": 0, "partial/changed files": 0, "clean refusal": 0, "late (timed out)": 0,
              "other": 0}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        build_study(base)
        for i, case in enumerate(CASES):
            d = Path(tmp) / f"c{i}"
            prepare(case, base, d)
            r = run_subprocess(case, d, root)
            lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("note:")]
            kinds = []
            if r.rc == 0:
                kinds.append("exit 0")
            if r.rc == -9:
                kinds.append("late (timed out)")
            if r.traceback:
                kinds.append("traceback")
            if r.changed:
                kinds.append("partial/changed files")
            if not kinds:
                kinds.append("clean refusal" if r.rc != 0 and len(lines) == 1 else "other")
            for k in kinds:
                counts[k] += 1
            last = lines[-1] if lines else ""
            print(f"{case.name:40s} rc={r.rc:<3d} {','.join(kinds):24s} {last[:150]}", flush=True)
    print(json.dumps({"cases": len(CASES), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
