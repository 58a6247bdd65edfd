"""``study --report-only`` and ``prior check`` on bad inputs (issue 36): a named one-line error (exit 2), never
an empty report, an "unexpected error" (exit 1) or a message that swaps the two images it compares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sirf_ddip.cli import main
from sirf_ddip.data import Image
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.io import write_image
from sirf_ddip.prior.network import build_network, reinit_zero_layers
from sirf_ddip.prior.scaling import MRScaler, PETScaler
from sirf_ddip.prior.schedule import NoiseSchedule
from sirf_ddip.prior.weights import save_prior

from _prior_helpers import TINY_ARCH, blobs

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "study-quick.yaml"


def _one_error(capsys, prog: str) -> str:
    err = "\n".join(ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("note:"))
    assert err.count("\n") == 0 and err.startswith(f"sirf-ddip {prog}: error: "), err
    return err


# ----------------------------------------------------------------------------------------- study --report-only
@pytest.mark.parametrize("content, text", [
    (None, "no metrics file: run the study first (without --report-only)"),
    ("{}", "[key 'cases']: holds no results (no case under 'cases'): nothing to report"),
    ('{"cases": {}}', "[key 'cases']: holds no results"),
    ('{"cases": {"x": {"osem": {"psnr": 30}}}}', "[key 'cases']: holds results for 'x', none of the study's cases"),
    ('{"cases": {"quick": [1, 2]}}', "[key 'cases.quick']: case 'quick' is not a method -> result mapping"),
    ('{"cases": {"quick": {"osem": ', "the metrics file is not valid JSON (line 1, column 30"),
    (b"\xff\xfe\x00garbage", "the metrics file is not UTF-8 text (corrupt?)"),
])
def test_report_only_without_results_is_a_named_error(tmp_path, capsys, content, text):
    out = tmp_path / "study"
    out.mkdir()
    m = out / "metrics.json"
    if isinstance(content, bytes):
        m.write_bytes(content)
    elif content is not None:
        m.write_text(content)
    assert main(["study", str(QUICK), "--out", str(out), "--report-only", "--set", "cases=[{name: quick}]"]) == 2
    err = _one_error(capsys, "study")
    assert f"{m}" in err and text in err
    assert not (out / "report.html").exists()


# ------------------------------------------------------------------------------------------------- prior check
@pytest.fixture
def files(tmp_path):
    net = build_network(TINY_ARCH)
    reinit_zero_layers(net, 0.01)
    save_prior(tmp_path / "w.safetensors", net, NoiseSchedule(), PETScaler(), MRScaler(), training={"steps": 1})
    pet, mr = blobs((4, 16, 16), seed=2)
    grid = ImageGrid((4, 16, 16), (2.0, 2.5, 2.5))
    write_image(tmp_path / "pet.nii.gz", Image(5 * pet, grid))
    write_image(tmp_path / "mr.nii.gz", Image(mr, grid))
    write_image(tmp_path / "zero.nii.gz", Image(np.zeros_like(pet), grid))
    write_image(tmp_path / "mr_other.nii.gz", Image(mr, ImageGrid((4, 16, 16), (2.0, 2.0, 2.0))))
    return tmp_path, grid


def _check(d: Path, image: str, mr: str, *extra: str) -> list[str]:
    return ["prior", "check", "--image", str(d / image), "--mr", str(d / mr), "--t", "100", "--out",
            str(d / "den.nii.gz"), "--weights", str(d / "w.safetensors"), "--device", "cpu", *extra]


@pytest.mark.parametrize("image, mr, extra, what", [
    ("zero.nii.gz", "mr.nii.gz", (), "zero.nii.gz: the PET image has no positive value"),
    ("pet.nii.gz", "zero.nii.gz", (), "zero.nii.gz: the MR image has no positive value"),
    ("pet.nii.gz", "mr.nii.gz", ("--mask", "zero.nii.gz"), "zero.nii.gz: the mask has no positive value"),
])
def test_prior_check_on_an_all_zero_image_is_a_named_error(files, capsys, image, mr, extra, what):
    d, _ = files
    extra = tuple(str(d / e) if e.endswith(".nii.gz") else e for e in extra)
    assert main(_check(d, image, mr, *extra)) == 2
    err = _one_error(capsys, "prior")
    assert f"{d}/{what}" in err and not (d / "den.nii.gz").exists()


def test_prior_check_grid_mismatch_names_each_grid_with_its_image(files, capsys):
    d, grid = files
    assert main(_check(d, "pet.nii.gz", "mr_other.nii.gz")) == 2
    err = _one_error(capsys, "prior")
    mr_grid = ImageGrid((4, 16, 16), (2.0, 2.0, 2.0)).describe()
    assert err == (f"sirf-ddip prior: error: MR {d / 'mr_other.nii.gz'} grid {mr_grid} does not match PET image "
                   f"{d / 'pet.nii.gz'} grid {grid.describe()}")
    write_image(d / "mask.nii.gz", Image(np.ones((4, 16, 16), np.float32), ImageGrid((4, 16, 16), (2.0, 2.0, 2.0))))
    assert main(_check(d, "pet.nii.gz", "mr.nii.gz", "--mask", str(d / "mask.nii.gz"))) == 2
    err = _one_error(capsys, "prior")
    assert err == (f"sirf-ddip prior: error: mask {d / 'mask.nii.gz'} grid {mr_grid} does not match PET image "
                   f"{d / 'pet.nii.gz'} grid {grid.describe()}")
