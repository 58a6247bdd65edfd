"""``sirf-ddip prior check``: does the prior denoise an image of the user's kind?

Procedure (:func:`check_prior`)
-------------------------------
1. Fit the PET scaler to the image (robust 99th percentile of the smoothed image in the head, see
   :mod:`sirf_ddip.prior.scaling`) and map it to network units; fit and map the MR likewise.
2. Draw ``ε ~ N(0, I)`` (``seed``) and form ``x_t = √ᾱ_t x + √(1−ᾱ_t) ε``.
3. One Tweedie step over every overlapping 3-plane slab (:func:`sirf_ddip.prior.slabs.predict_x0`).
4. Map both the noisy image ``x_t/√ᾱ_t`` (the noisy image on the input's intensity scale, the natural "noisy input")
   and ``x̂_0`` back to the image's units and grid.
5. PSNR of each against the input, inside a mask: by default the head mask of the scaler (smoothed image > 10 % of
   its maximum, the same mask the scale fit uses), or a user mask (any non-zero voxel of ``--mask``).

PSNR = 10 log10(P² / MSE) with P the maximum of the input inside the mask and MSE the mean squared difference
inside the mask (the definition of :func:`sirf_ddip.study.metrics.psnr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataValueError, GeometryMismatchError, OutputPathError
from .slabs import predict_x0


def psnr(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) of ``x`` against ``ref`` inside ``mask``: peak = max(ref[mask])."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return math.nan
    x = np.asarray(x, dtype=np.float64)[m]
    r = np.asarray(ref, dtype=np.float64)[m]
    mse = float(np.mean((x - r) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(float(r.max()) ** 2 / mse)


@dataclass
class CheckResult:
    noisy: np.ndarray          # image units [z, y, x]
    denoised: np.ndarray       # image units [z, y, x]
    mask: np.ndarray
    psnr_noisy: float
    psnr_denoised: float
    t: int
    pet_scale: float
    mr_scale: float | None

    @property
    def gain_db(self) -> float:
        return self.psnr_denoised - self.psnr_noisy

    def summary(self) -> str:
        return (f"t={self.t}: PSNR noisy {self.psnr_noisy:.2f} dB, denoised {self.psnr_denoised:.2f} dB, "
                f"gain {self.gain_db:+.2f} dB (mask {int(self.mask.sum())} voxels; PET scale {self.pet_scale:.4g}"
                + (f", MR scale {self.mr_scale:.4g})" if self.mr_scale is not None else ")"))


def check_step(bundle, t: int) -> int:
    """``t`` as an int, refused with :class:`ConfigError` unless it is one of the prior's diffusion steps."""
    n = bundle.schedule.num_train_steps
    if isinstance(t, bool) or not float(t).is_integer() or not 0 <= int(t) < n:
        raise ConfigError(f"--t {t}: the diffusion step t must be an integer in 0..{n - 1} for this prior")
    return int(t)


def _check_outputs(out: Path, noisy_out: Path | None, inputs: list, overwrite: bool) -> None:
    """Every output name usable (suffix, folder, no clash with --out or an input), before any work."""
    from ..utils.provenance import check_output_path

    outs = [(out, "--out")] + ([(noisy_out, "--noisy-out")] if noisy_out is not None else [])
    if noisy_out is not None and noisy_out.resolve() == out.resolve():
        raise OutputPathError(noisy_out, "is the same file as --out; give the noisy image another name", "--noisy-out")
    srcs = {Path(i).resolve(): i for i in inputs if i}
    for p, opt in outs:
        name = p.name.lower()
        if not name.endswith((".hv", ".nii", ".nii.gz")):
            raise OutputPathError(p, "unsupported image suffix; use .hv, .nii or .nii.gz", opt)
        files = [p, p.with_suffix(".v")] if name.endswith(".hv") else [p]
        for f in files:
            if f.resolve() in srcs:
                raise OutputPathError(f, f"is also an input ({srcs[f.resolve()]}); choose another name", opt)
            check_output_path(f, overwrite, opt)
    if noisy_out is not None and noisy_out.name.lower().endswith(".hv") and out.name.lower().endswith(".hv") \
            and noisy_out.with_suffix(".v").resolve() == out.with_suffix(".v").resolve():
        raise OutputPathError(noisy_out, "shares its data file with --out", "--noisy-out")


def check_guidance(bundle, w: float) -> None:
    """Raise :class:`ConfigError` (key ``--mr-guidance``) unless ``w`` is finite, ≥ 0 and, when ≠ 1, the prior
    has a learned "no MR" input."""
    from .guidance import check_mr_guidance, needs_unconditioned

    try:
        w = check_mr_guidance(w)
    except ValueError as exc:
        raise ConfigError(f"--mr-guidance: {exc}") from None
    if needs_unconditioned(w) and bundle.uses_mr and not getattr(bundle.network, "has_mr_null", False):
        raise ConfigError(f"--mr-guidance {w}: prior {getattr(bundle, 'path', '') or 'default'} has no learned "
                          "'no MR' input (not trained with MR dropout); use --mr-guidance 1")


def check_prior(bundle, image: np.ndarray, mr: np.ndarray | None, t: int, seed: int = 0,
                mask: np.ndarray | None = None, device=None, batch_size: int = 16,
                mr_guidance: float = 1.0) -> CheckResult:
    """Noise ``image`` to step ``t`` and denoise it with one Tweedie step (arrays ``[z, y, x]``, image units).

    ``mr_guidance`` is the classifier-free MR guidance ``w`` (:mod:`sirf_ddip.prior.guidance`)."""
    from ..utils.checks import require_finite
    from ..utils.device import resolve_device

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise GeometryMismatchError(f"check_prior: image must be [z, y, x], got shape {image.shape}")
    require_finite(image, "check_prior: image", "image")
    if bundle.uses_mr:
        if mr is None:
            raise ConfigError("check_prior: this prior is MR-conditioned; give the co-registered MR (--mr)")
        mr = np.asarray(mr, dtype=np.float32)
        if mr.shape != image.shape:
            raise GeometryMismatchError(f"check_prior: MR shape {mr.shape} != image shape {image.shape}")
        require_finite(mr, "check_prior: MR", "MR image")
    check_step(bundle, t)
    check_guidance(bundle, mr_guidance)
    dev = resolve_device(device)
    try:
        pet_s = bundle.pet_scaling.fit(image)
    except ValueError as exc:  # no positive signal: not a PET image the prior can be checked on
        raise DataValueError(f"check_prior: image: {exc}") from None
    x0 = torch.from_numpy(pet_s.to_net(image).astype(np.float32)).to(dev)
    mr_t, mr_scale = None, None
    if bundle.uses_mr:
        try:
            mr_s = bundle.mr_scaling.fit(mr)
        except ValueError as exc:
            raise DataValueError(f"check_prior: MR: {exc}") from None
        mr_scale = mr_s.scale
        mr_t = torch.from_numpy(mr_s.to_net(mr).astype(np.float32)).to(dev)
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x0.shape, generator=g).to(dev)
    bundle.network.to(dev)
    with torch.no_grad():
        x_t = bundle.schedule.q_sample(x0, int(t), noise)
        x0_hat = predict_x0(bundle, x_t, int(t), mr_t, batch_size=batch_size, mr_guidance=mr_guidance)
    a = float(bundle.schedule.alphas_cumprod[int(t)])
    noisy_net = (x_t / math.sqrt(a)).cpu().numpy()
    noisy = pet_s.from_net(noisy_net).astype(np.float32)
    den = pet_s.from_net(x0_hat.cpu().numpy()).astype(np.float32)
    if mask is None:
        mask = pet_s.head_mask(image)
    mask = np.asarray(mask, dtype=bool)
    return CheckResult(noisy, den, mask, psnr(noisy, image, mask), psnr(den, image, mask), int(t), pet_s.scale,
                       mr_scale)


def run_check(image_path: str | Path, mr_path: str | Path | None, t: int, seed: int, out: str | Path,
              noisy_out: str | Path | None = None, weights: str | Path | None = None, device=None,
              overwrite: bool = False, mask_path: str | Path | None = None, mr_guidance: float = 1.0) -> CheckResult:
    """File-level check (the CLI): read, :func:`check_prior`, write the outputs in the input's grid and units."""
    from ..io import read_image, write_image
    from .weights import load_default, load_prior

    from ..utils.checks import require_finite
    from ..utils.device import resolve_device

    out = Path(out)
    noisy_out = Path(noisy_out) if noisy_out is not None else None
    _check_outputs(out, noisy_out, [image_path, mr_path, mask_path], overwrite)
    device = resolve_device(device)
    bundle = load_prior(weights, device=device) if weights else load_default(device=device)
    check_step(bundle, t)
    check_guidance(bundle, mr_guidance)
    if bundle.uses_mr and mr_path is None:
        raise ConfigError(f"prior {getattr(bundle, 'path', '') or 'default'} is MR-conditioned; give the "
                          "co-registered MR with --mr")
    img = read_image(image_path)
    require_finite(img.array, str(image_path), "image")
    mr_arr = None
    if mr_path is not None:
        mr_img = read_image(mr_path)
        mr_img.grid.check_matches(img.grid, what=f"MR {mr_path}", other_what=f"PET image {image_path}")
        require_finite(mr_img.array, str(mr_path), "MR image")
        mr_arr = mr_img.array
    mask = None
    if mask_path is not None:
        m_img = read_image(mask_path)
        m_img.grid.check_matches(img.grid, what=f"mask {mask_path}", other_what=f"PET image {image_path}")
        mask = np.asarray(m_img.array) != 0
    for arr, path, what in ((img.array, image_path, "PET image"), (mr_arr, mr_path, "MR image"),
                            (mask, mask_path, "mask")):
        if arr is not None and not np.any(np.asarray(arr) > 0):
            raise DataValueError(f"{path}: the {what} has no positive value (all zero or negative): the prior's "
                                 f"scaling is fitted to its positive signal, there is none to "
                                 f"{'denoise' if what == 'PET image' else 'use'}")
    res = check_prior(bundle, img.array, mr_arr, t, seed, mask=mask, device=device, mr_guidance=mr_guidance)
    write_image(out, img.with_array(res.denoised), overwrite=overwrite)
    if noisy_out is not None:
        write_image(noisy_out, img.with_array(res.noisy), overwrite=overwrite)
    return res
