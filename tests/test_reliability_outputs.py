"""Nothing lost: atomic outputs under failure (mocked and a real file-size limit), checks before work, no
tracebacks (the CLI's last resort, ``--debug``), and ``--resume`` refusing a checkpoint of other inputs."""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sirf_ddip.cli import main
from sirf_ddip.data import Image, ProjData
from sirf_ddip.errors import OutputWriteError, ResumeMismatchError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.io import write_image, write_projdata

from toy_physics import tiny_geometry

REPO = Path(__file__).resolve().parents[1]
GRID = ImageGrid((3, 8, 8), (2.0, 4.0, 4.0))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


class _FullDisk(io.FileIO):
    """A file whose writes stop after ``room`` bytes with ENOSPC, as on a full disk."""

    room = 100

    def write(self, b):
        n = min(len(b), self.room)
        if n < len(b):
            super().write(bytes(b[:n]))
            raise OSError(errno.ENOSPC, "No space left on device", self.name)
        return super().write(b)


def _full_disk_open(path, mode="r", *a, **k):
    if "w" in mode:
        return _FullDisk(path, "w")
    return open(path, mode, *a, **k)


# ------------------------------------------------------------------------------- atomic writes, mocked failure
@pytest.mark.parametrize("kind", ["image", "projdata"])
def test_interfile_overwrite_on_a_full_disk_keeps_the_old_files(tmp_path, monkeypatch, kind):
    import sirf_ddip.io.interfile as itf

    if kind == "image":
        old, new = Image(np.ones(GRID.shape, np.float32), GRID), Image(np.full(GRID.shape, 2, np.float32), GRID)
        path, write = tmp_path / "x.hv", write_image
    else:
        geo = tiny_geometry(num_tang=8)
        old, new = ProjData(np.ones(geo.shape, np.float32), geo), ProjData(np.full(geo.shape, 2, np.float32), geo)
        path, write = tmp_path / "x.hs", write_projdata
    write(path, old)
    before = _digest(tmp_path)
    monkeypatch.setattr(itf, "open", _full_disk_open, raising=False)
    with pytest.raises(OutputWriteError, match=r"x\.[vs]: cannot write \(No space left on device.*unchanged"):
        write(path, new, overwrite=True)
    assert _digest(tmp_path) == before  # old data and header intact, no temporary file left


def test_nifti_run_record_and_png_failures_keep_the_old_files(tmp_path, monkeypatch):
    import matplotlib.figure
    import nibabel as nib

    from sirf_ddip.cli.recon import save_slices_png
    from sirf_ddip.utils import atomic
    from sirf_ddip.utils.provenance import write_run_record

    img = Image(np.ones(GRID.shape, np.float32), GRID)
    write_image(tmp_path / "x.nii.gz", img)
    write_run_record(tmp_path, {"a": 1}, name="rec")
    save_slices_png(img.array, GRID.voxel_size, tmp_path / "x.png")
    before = _digest(tmp_path)

    def half_then_fail(obj, filename, *a, **k):
        Path(filename).write_bytes(b"\x1f\x8b partial")
        raise OSError(errno.EFBIG, "File too large", str(filename))

    monkeypatch.setattr(nib, "save", half_then_fail)
    with pytest.raises(OutputWriteError, match="x.nii.gz"):
        write_image(tmp_path / "x.nii.gz", img.with_array(img.array * 2), overwrite=True)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, f, **k: half_then_fail(None, f))
    with pytest.raises(OutputWriteError, match="x.png"):
        save_slices_png(img.array * 3, GRID.voxel_size, tmp_path / "x.png")
    monkeypatch.setattr(atomic, "open", _full_disk_open, raising=False)
    with pytest.raises(OutputWriteError, match="rec"):
        write_run_record(tmp_path, {"a": 2, "pad": "x" * 500}, name="rec")
    assert _digest(tmp_path) == before


# ------------------------------------------------------------------------------- a real file-size limit
def _tiny_forward_inputs(d: Path) -> None:
    geo = tiny_geometry(num_tang=8)
    grid = geo.default_image_grid()
    write_image(d / "img.hv", Image(np.ones(grid.shape, np.float32), grid))
    write_image(d / "img2.hv", Image(np.full(grid.shape, 3, np.float32), grid))
    write_projdata(d / "tmpl.hs", ProjData(np.ones(geo.shape, np.float32), geo))


def _cli(args: list[str], cwd: Path, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit():  # RLIMIT_FSIZE: a write past it fails with EFBIG (Python ignores SIGXFSZ)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "SIRF_DDIP_PROGRESS": "0", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SIRF_DDIP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sirf_ddip", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def test_file_size_limit_under_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    from sirf_ddip.io import read_projdata

    _tiny_forward_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["forward", "img.hv", "--template", "tmpl.hs", "--out", "fwd.hs", "--device", "cpu"]
    assert main(args) == 0
    old = read_projdata(tmp_path / "fwd.hs").array
    before = _digest(tmp_path)
    # a real process under a real limit: the sinogram is 4 x 8 x 8 float32 = 1024 bytes, and a 600-byte limit
    # stops its data file half way (EFBIG) while the run record would fit
    p = _cli(["forward", "img2.hv", *args[2:], "--overwrite"], tmp_path, fsize=600)
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("note:")]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "fwd.s: cannot write (File too large" in lines[0], p.stderr
    assert _digest(tmp_path) == before  # fwd.hs / fwd.s / the run record are the first run's, byte for byte
    np.testing.assert_array_equal(read_projdata(tmp_path / "fwd.hs").array, old)


# ------------------------------------------------------------------------------- checks before any work
def test_output_checks_come_before_reading_inputs(tmp_path, capsys):
    _tiny_forward_inputs(tmp_path)
    (tmp_path / "fwd_run_record.json").write_text("{}")
    # the image does not exist: if the inputs were read first, the error would name it
    assert main(["forward", str(tmp_path / "missing.hv"), "--template", str(tmp_path / "tmpl.hs"),
                 "--out", str(tmp_path / "fwd.hs"), "--device", "cpu"]) == 2
    assert "fwd_run_record.json: output exists" in capsys.readouterr().err
    assert main(["backward", str(tmp_path / "tmpl.hs"), "--image-template", str(tmp_path / "missing.hv"),
                 "--out", str(tmp_path / "bp.v"), "--device", "cpu"]) == 2
    assert "--out" in capsys.readouterr().err


# ------------------------------------------------------------------------------- no tracebacks
@pytest.fixture
def broken_command(monkeypatch):
    import sirf_ddip.cli.engine as engine

    def boom(args):
        raise RuntimeError("something inside broke\nover two lines")

    monkeypatch.setattr(engine, "run_forward", boom)
    monkeypatch.delenv("SIRF_DDIP_DEBUG", raising=False)
    return ["forward", "a.hv", "--template", "b.hs", "--out", "c.hs"]


def test_last_resort_prints_one_line_and_exits_1(broken_command, capsys):
    assert main(broken_command) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sirf-ddip forward: unexpected error: RuntimeError: something inside broke over two lines "
                   "(run with --debug for the traceback)"]


@pytest.mark.parametrize("how", ["flag-after", "flag-before", "env"])
def test_debug_shows_the_traceback(broken_command, capsys, monkeypatch, how):
    argv = {"flag-after": broken_command + ["--debug"], "flag-before": ["--debug"] + broken_command,
            "env": broken_command}[how]
    if how == "env":
        monkeypatch.setenv("SIRF_DDIP_DEBUG", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in boom" in err
    assert err.strip().splitlines()[-1] == ("sirf-ddip forward: unexpected error: RuntimeError: something inside "
                                            "broke over two lines")


def test_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _tiny_forward_inputs(tmp_path)
    assert main(["forward", str(tmp_path / "img.hv"), "--template", str(tmp_path / "tmpl.hs"),
                 "--out", str(tmp_path / "f.hs"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sirf-ddip forward: error: --device cuda: this machine has no CUDA GPU that torch can use "
        "(use --device cpu or auto)"]


# ------------------------------------------------------------------------------- resume integrity
def _recon_args(d: Path, **kw) -> argparse.Namespace:
    a = dict(prompts=str(d / "p.hs"), mult=str(d / "m.hs"), additive=None, mr=str(d / "mr.hv"),
             image_template=None, weights=None, no_mr=False)
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint folder with the identity record of its run's inputs (the checkpoint bytes do not matter)."""
    from sirf_ddip.cli.recon import INPUTS_RECORD, inputs_identity_of
    from sirf_ddip.recon.ddip import CHECKPOINT_FILE

    geo = tiny_geometry(num_tang=8)
    write_projdata(tmp_path / "p.hs", ProjData(np.ones(geo.shape, np.float32), geo))
    write_projdata(tmp_path / "m.hs", ProjData(np.ones(geo.shape, np.float32), geo))
    write_image(tmp_path / "mr.hv", Image(np.ones(GRID.shape, np.float32), GRID))
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / CHECKPOINT_FILE).write_bytes(b"checkpoint")
    (ck / INPUTS_RECORD).write_text(json.dumps(inputs_identity_of(_recon_args(tmp_path))))
    return tmp_path, ck


def test_resume_with_the_same_inputs_is_accepted(checkpoint):
    from sirf_ddip.cli.recon import check_resume, inputs_identity_of

    d, ck = checkpoint
    (d / "moved").mkdir()
    for f in ("p.hs", "p.s"):  # a moved copy is the same input
        (d / "moved" / f).write_bytes((d / f).read_bytes())
    check_resume(ck, inputs_identity_of(_recon_args(d, prompts=str(d / "moved" / "p.hs"))))


@pytest.mark.parametrize("role", ["prompts", "mult", "mr", "prior"])
def test_resume_with_another_input_names_it(checkpoint, role):
    from sirf_ddip.cli.recon import check_resume, inputs_identity_of

    d, ck = checkpoint
    if role == "prior":
        args = _recon_args(d, weights="no-mr")
    else:
        target = {"prompts": d / "p.s", "mult": d / "m.s", "mr": d / "mr.v"}[role]
        a = np.fromfile(target, "<f4")
        a[3] = 7.0  # same size, other content
        a.tofile(target)
        args = _recon_args(d)
    with pytest.raises(ResumeMismatchError, match=rf"other inputs than the checkpoint's: {role} changed"):
        check_resume(ck, inputs_identity_of(args))


def test_resume_without_an_identity_record_is_refused(checkpoint):
    from sirf_ddip.cli.recon import INPUTS_RECORD, check_resume, inputs_identity_of

    d, ck = checkpoint
    (ck / INPUTS_RECORD).unlink()
    with pytest.raises(ResumeMismatchError, match="no record of its inputs"):
        check_resume(ck, inputs_identity_of(_recon_args(d)))
