"""``sirf-ddip forward / backward / osem`` on tiny data written to tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sirf_ddip.cli import main
from sirf_ddip.data import Image, ProjData
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.io import read_image, read_projdata, write_image, write_projdata
from sirf_ddip.physics.model import EngineLogLikelihood
from sirf_ddip.physics.projector import Projector
from sirf_ddip.recon.osem import OSEMReconstructor

from toy_physics import tiny_geometry


@pytest.fixture
def tiny(tmp_path):
    geo = tiny_geometry(num_tang=8)
    grid = geo.default_image_grid()
    rng = np.random.default_rng(7)
    phantom = np.zeros(grid.shape, np.float32)
    phantom[:, 2:6, 2:6] = 2.0
    phantom[1, 3, 3] = 6.0
    proj = Projector(geo, grid, device="cpu")
    fwd = proj.forward(torch.as_tensor(phantom)).numpy()
    m = rng.uniform(0.5, 1.0, geo.shape).astype(np.float32)
    a = np.full(geo.shape, 0.2, np.float32)
    y = rng.poisson(20 * m * (fwd + a)).astype(np.float32)
    write_image(tmp_path / "phantom.hv", Image(phantom, grid))
    write_image(tmp_path / "init.hv", Image(np.ones(grid.shape, np.float32), grid))
    write_projdata(tmp_path / "prompts.hs", ProjData(y, geo))
    write_projdata(tmp_path / "mult.hs", ProjData(20 * m, geo))
    write_projdata(tmp_path / "add.hs", ProjData(a, geo))
    return tmp_path, geo, grid, proj, phantom


def test_forward_and_backward(tiny, capsys):
    d, geo, grid, proj, phantom = tiny
    assert main(["forward", str(d / "phantom.hv"), "--template", str(d / "prompts.hs"),
                 "--out", str(d / "fwd.hs"), "--device", "cpu"]) == 0
    fwd = read_projdata(d / "fwd.hs")
    np.testing.assert_allclose(fwd.array, proj.forward(torch.as_tensor(phantom)).numpy(), rtol=1e-6)
    rec = json.loads((d / "fwd_run_record.json").read_text())
    assert rec["config"]["command"] == "forward" and "torch" in rec["versions"]
    assert main(["backward", str(d / "fwd.hs"), "--image-template", str(d / "init.hv"),
                 "--out", str(d / "bp.hv"), "--device", "cpu"]) == 0
    bp = read_image(d / "bp.hv")
    np.testing.assert_allclose(bp.array, proj.adjoint(torch.as_tensor(fwd.array)).numpy(), rtol=1e-5)
    assert bp.grid == grid
    # refuses to overwrite, exit code 2 with one line
    capsys.readouterr()
    assert main(["backward", str(d / "fwd.hs"), "--image-template", str(d / "init.hv"),
                 "--out", str(d / "bp.hv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to overwrite" in err[0]
    assert main(["backward", str(d / "fwd.hs"), "--image-template", str(d / "init.hv"),
                 "--out", str(d / "bp.hv"), "--overwrite"]) == 0


def test_mismatch_and_bad_files_exit_2(tiny, capsys):
    d, geo, grid, *_ = tiny
    bad = ImageGrid(grid.shape, (1.5, grid.voxel_size[1], grid.voxel_size[2]))  # z voxel does not divide 4 mm
    write_image(d / "bad.hv", Image(np.ones(bad.shape, np.float32), bad))
    capsys.readouterr()
    assert main(["forward", str(d / "bad.hv"), "--template", str(d / "prompts.hs"), "--out", str(d / "x.hs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.hv" in err[0] and "prompts.hs" in err[0]
    assert main(["backward", str(d / "missing.hs"), "--image-template", str(d / "init.hv"),
                 "--out", str(d / "y.hv")]) == 2
    assert "missing.hs" in capsys.readouterr().err
    other = tiny_geometry(num_tang=6)
    write_projdata(d / "other.hs", ProjData(np.ones(other.shape, np.float32), other))
    assert main(["osem", "--prompts", str(d / "prompts.hs"), "--mult", str(d / "other.hs"), "--init",
                 str(d / "init.hv"), "--iterations", "1", "--subsets", "2", "--out", str(d / "o.hv")]) == 2
    err = capsys.readouterr().err
    assert "other.hs" in err and "prompts.hs" in err
    assert not (d / "o.hv").exists()


def test_osem_cli_matches_library(tiny):
    d, geo, grid, *_ = tiny
    args = ["osem", "--prompts", str(d / "prompts.hs"), "--mult", str(d / "mult.hs"), "--additive",
            str(d / "add.hs"), "--init", str(d / "init.hv"), "--iterations", "2", "--subsets", "2",
            "--out", str(d / "osem.hv"), "--device", "cpu", "--save-interval", "2"]
    assert main(args) == 0
    out = read_image(d / "osem.hv")
    ds = EngineLogLikelihood.from_files(d / "prompts.hs", d / "mult.hs", d / "add.hs",
                                        image_template=d / "init.hv", device="cpu")
    init = read_image(d / "init.hv")
    r = OSEMReconstructor(ds, num_subsets=2, num_iterations=2)
    r.reconstruct(init)
    np.testing.assert_allclose(out.array, r.get_output().array, rtol=1e-6)
    assert [p.name for p in sorted(d.glob("osem_*.hv"))] == ["osem_2.hv", "osem_4.hv"]
    np.testing.assert_array_equal(read_image(d / "osem_4.hv").array, out.array)
    by_grid = EngineLogLikelihood.from_files(d / "prompts.hs", d / "mult.hs", d / "add.hs", grid=init, device="cpu")
    ones = ds.to_tensor(init) * 0 + 1
    assert by_grid.image_shape == ds.image_shape and by_grid.value(ones) == ds.value(ones)
    with pytest.raises(ValueError, match="not both"):
        EngineLogLikelihood.from_files(d / "prompts.hs", image_template=d / "init.hv", grid=init)
    rec = json.loads((d / "osem_run_record.json").read_text())
    assert rec["config"]["subiterations"] == 4 and rec["timing_s"]["iterations"] > 0
    assert main(args) == 2  # outputs exist
    assert main(args + ["--overwrite", "--postfilter-fwhm", "6"]) == 0
    filt = read_image(d / "osem.hv").array
    assert filt.max() < out.array.max() and filt.sum() <= out.array.sum() * (1 + 1e-6)
    assert not np.allclose(filt, out.array)


def test_osem_nifti_output(tiny):
    d, *_ = tiny
    assert main(["osem", "--prompts", str(d / "prompts.hs"), "--init", str(d / "init.hv"), "--iterations", "1",
                 "--subsets", "1", "--out", str(d / "o.nii.gz")]) == 0
    img = read_image(d / "o.nii.gz")
    init = read_image(d / "init.hv")
    assert img.grid.matches(init.grid)
    r = OSEMReconstructor(EngineLogLikelihood.from_files(d / "prompts.hs", image_template=d / "init.hv",
                                                         device="cpu"), num_subsets=1, num_iterations=1)
    r.reconstruct(init)
    np.testing.assert_allclose(img.array, r.get_output().array, rtol=1e-6)
