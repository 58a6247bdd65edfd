"""prior check: numeric core, file round trip, CLI."""

import math

import numpy as np
import pytest
import torch

from sirf_ddip.cli import main
from sirf_ddip.data import Image
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.prior.check import check_prior, psnr
from sirf_ddip.prior.network import build_network, reinit_zero_layers
from sirf_ddip.prior.scaling import MRScaler, PETScaler
from sirf_ddip.prior.schedule import NoiseSchedule
from sirf_ddip.prior.weights import PriorBundle, save_prior

from _prior_helpers import TINY_ARCH, blobs


def test_psnr_definition():
    ref = np.array([[[0.0, 2.0, 4.0]]])
    x = ref + np.array([[[0.0, 0.0, 1.0]]])
    m = np.ones_like(ref, bool)
    assert psnr(x, ref, m) == pytest.approx(10 * math.log10(16 / (1 / 3)))
    assert psnr(ref, ref, m) == math.inf


def test_check_prior_identity_net_gives_noisy_image():
    # a zero-output eps network: x0_hat = x_t/sqrt(abar) = the "noisy" image, so the gain is exactly 0
    net = build_network(TINY_ARCH)
    b = PriorBundle(net, NoiseSchedule(), PETScaler(), MRScaler(), {})
    pet, mr = blobs((5, 16, 16))
    res = check_prior(b, 10 * pet, mr, 200, seed=3, device="cpu")
    np.testing.assert_allclose(res.denoised, res.noisy, rtol=1e-5, atol=1e-4)
    assert res.gain_db == pytest.approx(0.0, abs=1e-3)
    # noisy = image + sqrt((1-a)/a) * noise in network units -> known PSNR scale
    a = float(b.schedule.alphas_cumprod[200])
    sd = math.sqrt((1 - a) / a) * res.pet_scale / 2  # network range 2 -> image units
    err = (res.noisy - 10 * pet)[res.mask]
    assert err.std() == pytest.approx(sd, rel=0.1)
    with pytest.raises(ValueError, match="MR"):
        check_prior(b, pet, None, 200)


def test_cli_check_and_info(tmp_path, capsys):
    net = build_network(TINY_ARCH)
    reinit_zero_layers(net, 0.01)
    save_prior(tmp_path / "w.safetensors", net, NoiseSchedule(), PETScaler(), MRScaler(), training={"steps": 1})
    pet, mr = blobs((4, 16, 16), seed=2)
    grid = ImageGrid((4, 16, 16), (2.0, 2.5, 2.5))
    from sirf_ddip.io import read_image, write_image

    write_image(tmp_path / "pet.nii.gz", Image(5 * pet, grid))
    write_image(tmp_path / "mr.nii.gz", Image(mr, grid))
    args = ["prior", "check", "--image", str(tmp_path / "pet.nii.gz"), "--mr", str(tmp_path / "mr.nii.gz"),
            "--t", "100", "--seed", "1", "--out", str(tmp_path / "den.nii.gz"), "--noisy-out",
            str(tmp_path / "noisy.nii.gz"), "--weights", str(tmp_path / "w.safetensors"), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PSNR noisy" in out and "denoised" in out
    den = read_image(tmp_path / "den.nii.gz")
    assert den.grid.matches(grid) and den.array.shape == (4, 16, 16)
    assert np.isfinite(den.array).all() and float(np.abs(den.array - 5 * pet).mean()) > 0
    assert main(args) == 2  # refuses to overwrite
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(["prior", "info", "--weights", str(tmp_path / "w.safetensors")]) == 0
    assert "architecture" in capsys.readouterr().out


def test_check_prior_mr_guidance():
    """--mr-guidance: w = 1 is bit-identical to the plain check; w = 0 is the learned no-MR prediction (the MR
    no longer matters); a prior without the null MR refuses w != 1 naming the option."""
    from sirf_ddip.errors import ConfigError

    torch.manual_seed(0)
    net = build_network({**TINY_ARCH, "mr_null": True})
    reinit_zero_layers(net, generator=torch.Generator().manual_seed(1))
    b = PriorBundle(net.eval(), NoiseSchedule(), PETScaler(), MRScaler(), {})
    pet, mr = blobs((5, 16, 16))
    plain = check_prior(b, 10 * pet, mr, 200, seed=3, device="cpu")
    w1 = check_prior(b, 10 * pet, mr, 200, seed=3, device="cpu", mr_guidance=1.0)
    np.testing.assert_array_equal(plain.denoised, w1.denoised)
    w0 = check_prior(b, 10 * pet, mr, 200, seed=3, device="cpu", mr_guidance=0.0)
    w0_other = check_prior(b, 10 * pet, mr[::-1].copy(), 200, seed=3, device="cpu", mr_guidance=0.0)
    np.testing.assert_array_equal(w0.denoised, w0_other.denoised)
    assert np.abs(w0.denoised - plain.denoised).max() > 1e-3
    plain_net = PriorBundle(build_network(TINY_ARCH), NoiseSchedule(), PETScaler(), MRScaler(), {})
    with pytest.raises(ConfigError, match="--mr-guidance"):
        check_prior(plain_net, 10 * pet, mr, 200, mr_guidance=0.5)
