"""``sirf-ddip recon``: files in, image + record + PNG + checkpoints out; resume; bad-input errors.

The physics is the tiny dense DataStep (monkeypatched in for the engine, which is tested on its own); the prior is
the tiny test network. Everything else (config resolution, Interfile I/O, grids, output files) is the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sirf_ddip.cli import main
from sirf_ddip.data import Image
from sirf_ddip.errors import GeometryMismatchError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.io import read_image, write_image
from test_ddip_support import DenseDataStep, tiny_bundle

SHAPE = (4, 16, 16)
GRID = ImageGrid(SHAPE, (2.03125, 2.08626, 2.08626))


class ImageDenseDataStep(DenseDataStep):
    """The dense test physics, speaking sirf_ddip Images like the engine does."""

    grid = GRID

    def to_tensor(self, image):
        if isinstance(image, Image):
            if not image.grid.matches(self.grid):
                raise GeometryMismatchError(f"image grid {image.grid.describe()} != {self.grid.describe()}")
            image = image.array
        return super().to_tensor(image)

    def from_tensor(self, tensor, template=None):
        return Image(tensor.detach().cpu().numpy().astype(np.float32), self.grid, {})


@pytest.fixture(autouse=True)
def _patch(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import sirf_ddip.cli.recon as cli_recon
    from sirf_ddip.recon.ddip import DDIPReconstructor

    ds = ImageDenseDataStep(shape=SHAPE)
    bundles = {True: tiny_bundle(True), False: tiny_bundle(False)}

    def fake_build(args, grid, device, num_subsets):
        if grid is not None and not grid.matches(GRID):
            raise GeometryMismatchError("grid differs from the test data's")
        ds.set_num_subsets(num_subsets)
        return ds

    def fake_bundle(self, device):
        return bundles[self._prior_source != "nomr"]     # --weights nomr: a prior trained without MR

    monkeypatch.setattr(cli_recon, "build_data_step", fake_build)
    monkeypatch.setattr(DDIPReconstructor, "_load_bundle", fake_bundle)
    yield ds
    torch.set_num_threads(threads)


@pytest.fixture
def files(tmp_path, _patch):
    ds = _patch
    mr = tmp_path / "mr_t1.hv"
    write_image(mr, Image(ds.mr.numpy().astype(np.float32), GRID, {}))
    prompts = tmp_path / "prompts.hs"   # read only by the (patched) engine builder
    prompts.write_text("!INTERFILE :=\n")
    return tmp_path, mr, prompts


FAST = ["--set", "num_steps=4", "--set", "t_start=30", "--set", "n_init=4", "--set", "num_em=2",
        "--set", "finetune_slabs=1", "--set", "checkpoint_every=2", "--device", "cpu"]


def _run(args):
    return main(["recon", *map(str, args)])


def test_recon_writes_image_record_png_and_checkpoint(files):
    d, mr, prompts = files
    out = d / "res" / "x.hv"
    assert _run(["--prompts", prompts, "--mr", mr, "--out", out, "--seed", 0, *FAST]) == 0
    img = read_image(out)
    assert img.grid.matches(GRID) and np.isfinite(img.array).all() and img.array.max() > 0
    rec = json.loads((d / "res" / "x_run_record.json").read_text())
    assert rec["seed"] == 0 and rec["config"]["num_steps"] == 4 and rec["config"]["finetune_slabs"] == 1
    assert rec["config"]["lora_rank"] == 4          # from the shipped configs/ddip.yaml (+ --set)
    assert rec["seconds_per_step"]["network_forward"] > 0 and "torch" in rec["versions"]
    assert (d / "res" / "x.png").stat().st_size > 1000
    assert (d / "res" / "x_checkpoint" / "ddip_checkpoint.pt").is_file()
    assert len((d / "res" / "x_log.jsonl").read_text().splitlines()) == 4
    # refuses to overwrite, then overwrites when asked
    assert _run(["--prompts", prompts, "--mr", mr, "--out", out, *FAST]) == 2
    assert _run(["--prompts", prompts, "--mr", mr, "--out", out, "--overwrite", "--seed", 0, *FAST]) == 0
    np.testing.assert_array_equal(read_image(out).array, img.array)     # same seed, same result


def test_resume_gives_the_uninterrupted_result(files, monkeypatch):
    from sirf_ddip.recon.ddip import DDIPReconstructor

    d, mr, prompts = files
    full = d / "full.hv"
    assert _run(["--prompts", prompts, "--mr", mr, "--out", full, *FAST]) == 0
    # interrupt a second run after 2 steps (Ctrl-C); its checkpoint is at step 2
    orig = DDIPReconstructor._update
    calls = {"n": 0}

    def interrupted(self, x):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return orig(self, x)

    monkeypatch.setattr(DDIPReconstructor, "_update", interrupted)
    part = d / "part.hv"
    assert _run(["--prompts", prompts, "--mr", mr, "--out", part, *FAST]) == 130
    assert not part.exists()
    monkeypatch.setattr(DDIPReconstructor, "_update", orig)
    assert _run(["--prompts", prompts, "--mr", mr, "--out", part, "--resume", d / "part_checkpoint", *FAST]) == 0
    np.testing.assert_array_equal(read_image(part).array, read_image(full).array)


def test_bad_inputs_are_clear_errors(files, capsys):
    d, mr, prompts = files
    out = d / "y.hv"
    assert _run(["--prompts", prompts, "--mr", mr, "--out", out, "--set", "lora_rnk=3"]) == 2
    assert "lora_rnk" in capsys.readouterr().err
    # MR grid differs from the image template
    tmpl = d / "tmpl.hv"
    write_image(tmpl, Image(np.ones(SHAPE, np.float32), ImageGrid(SHAPE, (2.0, 2.0, 2.0)), {}))
    assert _run(["--prompts", prompts, "--mr", mr, "--image-template", tmpl, "--out", out, *FAST]) == 2
    err = capsys.readouterr().err
    assert "mr_t1.hv" in err and "tmpl.hv" in err
    # MR-conditioned prior but no MR
    assert _run(["--prompts", prompts, "--image-template", mr, "--out", out, *FAST]) == 2
    assert "MR" in capsys.readouterr().err
    # --no-mr with an MR-conditioned prior
    assert _run(["--prompts", prompts, "--image-template", mr, "--no-mr", "--out", out, *FAST]) == 2
    assert "use_mr" in capsys.readouterr().err
    # missing MR file
    assert _run(["--prompts", prompts, "--mr", d / "nope.hv", "--out", out, *FAST]) == 2
    assert "nope.hv" in capsys.readouterr().err
    assert not out.exists()


def test_no_mr_prior_runs_without_mr(files):
    d, mr, prompts = files
    out = d / "nomr.nii.gz"
    assert _run(["--prompts", prompts, "--image-template", mr, "--no-mr", "--weights", "nomr", "--out", out,
                 *FAST]) == 0
    img = read_image(out)
    assert img.array.shape == SHAPE and np.isfinite(img.array).all()
