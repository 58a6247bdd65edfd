"""Image filters on torch tensors ``[z, y, x]`` (no geometry): STIR's separable Gaussian.

Used by OSEM's post-filter (:mod:`sirf_ddip.recon.osem`), the study's filtered baselines and the DDIP
adaptation's smoothed correction (:mod:`sirf_ddip.prior.adaptation`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _gaussian_kernel(fwhm_mm: float, voxel_mm: float, dtype, device) -> torch.Tensor | None:
    if fwhm_mm <= 0:
        return None
    sigma = fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / voxel_mm
    half = max(1, int(math.ceil(4.0 * sigma)))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    return k.to(device=device, dtype=dtype)


def gaussian_filter_mm(x: torch.Tensor, fwhm_mm: float | Sequence[float], voxel_size_zyx: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian filter of ``x[z, y, x]``; ``fwhm_mm`` scalar or ``(z, y, x)``; zero boundary."""
    if isinstance(fwhm_mm, (int, float)):
        fwhm = (float(fwhm_mm),) * 3
    else:
        fwhm = tuple(float(f) for f in fwhm_mm)
        if len(fwhm) != 3:
            raise ValueError(f"post-filter FWHM must be a number or 3 numbers (z, y, x) in mm, got {fwhm_mm}")
    out = x
    for axis in range(3):
        k = _gaussian_kernel(fwhm[axis], float(voxel_size_zyx[axis]), x.dtype, x.device)
        if k is None:
            continue
        moved = out.movedim(axis, -1)
        shp = moved.shape
        flat = moved.reshape(-1, 1, shp[-1])
        filt = F.conv1d(flat, k.view(1, 1, -1), padding=k.numel() // 2)
        out = filt.reshape(shp).movedim(-1, axis)
    return out
