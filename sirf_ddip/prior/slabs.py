"""2.5D inference over a whole volume: every overlapping 3-plane slab through the network, averaged back.

A volume ``[Z, H, W]`` (network units) is cut into the ``Z − slab + 1`` overlapping slabs of ``slab`` adjacent
planes (``slab = 3``: planes ``i, i+1, i+2``). The network predicts ε for all planes of each slab; each plane's
prediction is the mean over the slabs that contain it (1 slab for the end planes, 2 for the next, 3 inside).
A volume with fewer than ``slab`` planes is padded by edge replication and cropped back. ``H`` and ``W`` are
padded (centred, constant) to the network's multiple and cropped back.

The functions keep autograd intact (the DDIP reconstructor back-propagates through :func:`predict_eps` to train
LoRA adapters); wrap calls in ``torch.no_grad()`` when no gradient is needed.
"""

from __future__ import annotations

import torch
from torch import nn

from .network import ScoreNetwork, crop_padding, pad_to_multiple


def _pad_planes(vol: torch.Tensor, slab: int) -> tuple[torch.Tensor, int]:
    """Edge-replicate planes so that the volume has at least ``slab`` planes; returns (volume, added before)."""
    Z = vol.shape[0]
    if Z >= slab:
        return vol, 0
    need = slab - Z
    before = need // 2
    after = need - before
    parts = [vol[:1]] * before + [vol] + [vol[-1:]] * after
    return torch.cat(parts, dim=0), before


def volume_to_slabs(vol: torch.Tensor, slab: int = 3) -> torch.Tensor:
    """All overlapping ``slab``-plane slabs of ``vol [Z, H, W]`` (Z ≥ slab) → ``[Z − slab + 1, slab, H, W]``.

    A view (no copy) of ``vol`` via ``unfold``.
    """
    if vol.dim() != 3:
        raise ValueError(f"volume_to_slabs: expected a [Z, H, W] volume, got shape {tuple(vol.shape)}")
    if vol.shape[0] < slab:
        raise ValueError(f"volume_to_slabs: {vol.shape[0]} planes < slab {slab} (pad first)")
    return vol.unfold(0, slab, 1).permute(0, 3, 1, 2)


def slabs_to_volume(slabs: torch.Tensor, num_planes: int | None = None) -> torch.Tensor:
    """Average overlapping slab predictions ``[N, slab, H, W]`` back to a volume ``[N + slab − 1, H, W]``."""
    if slabs.dim() != 4:
        raise ValueError(f"slabs_to_volume: expected [N, slab, H, W], got shape {tuple(slabs.shape)}")
    N, S, H, W = slabs.shape
    Z = N + S - 1
    if num_planes is not None and num_planes != Z:
        raise ValueError(f"slabs_to_volume: {N} slabs of {S} planes make {Z} planes, not {num_planes}")
    acc = slabs.new_zeros((Z, H, W))
    for k in range(S):  # slab i, plane k → volume plane i + k
        acc = acc.index_add(0, torch.arange(k, k + N, device=slabs.device), slabs[:, k])
    counts = torch.clamp(torch.minimum(torch.arange(Z, device=slabs.device) + 1,
                                       torch.arange(Z, 0, -1, device=slabs.device)), max=min(S, N))
    return acc / counts.to(slabs.dtype).reshape(Z, 1, 1)


def predict_eps(network: ScoreNetwork | nn.Module, x_t_vol: torch.Tensor, t: int, mr_vol: torch.Tensor | None = None,
                batch_size: int = 16, pad_value: float = 0.0, mr_pad_value: float = -1.0) -> torch.Tensor:
    """Predicted ε for a whole volume ``[Z, H, W]`` (slab-averaged), differentiable.

    Parameters
    ----------
    network : ScoreNetwork (possibly with LoRA adapters)
    x_t_vol : tensor [Z, H, W]
        Noisy volume in network units at step ``t``, on the network's device.
    t : int
    mr_vol : tensor [Z, H, W] or None
        Normalised MR (required iff the network uses MR).
    batch_size : int
        Slabs per network call.
    pad_value, mr_pad_value : float
        Constant used to pad H, W to the network multiple (background in network units).
    """
    slab = int(getattr(network, "slab", 3))
    multiple = int(getattr(network, "spatial_multiple", 1))
    uses_mr = bool(getattr(network, "uses_mr", mr_vol is not None))
    if x_t_vol.dim() != 3:
        raise ValueError(f"predict_eps: expected a [Z, H, W] volume, got shape {tuple(x_t_vol.shape)}")
    if uses_mr:
        if mr_vol is None:
            raise ValueError("predict_eps: the prior is MR-conditioned but no MR volume was given")
        if tuple(mr_vol.shape) != tuple(x_t_vol.shape):
            raise ValueError(f"predict_eps: MR volume shape {tuple(mr_vol.shape)} != PET volume shape "
                             f"{tuple(x_t_vol.shape)}")
    Z = x_t_vol.shape[0]
    xv, before = _pad_planes(x_t_vol, slab)
    xs = volume_to_slabs(xv, slab)
    xs, pad = _pad_hw(xs, multiple, pad_value)
    ms = None
    if uses_mr:
        mv, _ = _pad_planes(mr_vol.to(x_t_vol.dtype), slab)
        ms, _ = _pad_hw(volume_to_slabs(mv, slab), multiple, mr_pad_value)
    outs = []
    for i in range(0, xs.shape[0], max(1, int(batch_size))):
        xb = xs[i:i + batch_size]
        mb = ms[i:i + batch_size] if ms is not None else None
        tb = torch.full((xb.shape[0],), int(t), dtype=torch.long, device=xb.device)
        outs.append(network(xb, tb, mb) if uses_mr else network(xb, tb))
    eps = crop_padding(torch.cat(outs, dim=0), pad)
    vol = slabs_to_volume(eps.to(x_t_vol.dtype))
    return vol[before:before + Z]


def _pad_hw(x: torch.Tensor, multiple: int, value: float):
    if multiple <= 1:
        return x, (0, 0, 0, 0)
    xp, pad = pad_to_multiple(x, multiple)
    if any(pad) and value != 0.0:
        xp = nn.functional.pad(x, pad, value=float(value))
    return xp, pad


def predict_x0(bundle, x_t_vol: torch.Tensor, t: int, mr_vol: torch.Tensor | None = None, batch_size: int = 16,
               network: nn.Module | None = None) -> torch.Tensor:
    """Tweedie estimate ``x̂_0`` of a whole volume from ``x_t`` (network units), differentiable.

    Parameters
    ----------
    bundle : PriorBundle
        Supplies the schedule, the default network and the background level for padding.
    x_t_vol : tensor [Z, H, W] on the network's device
    t : int
    mr_vol : tensor [Z, H, W] or None (normalised MR)
    network : nn.Module, optional
        Use this network instead of ``bundle.network`` (e.g. a LoRA-adapted copy).
    """
    net = bundle.network if network is None else network
    a = float(bundle.schedule.alphas_cumprod[int(t)])
    eps = predict_eps(net, x_t_vol, t, mr_vol, batch_size=batch_size, pad_value=bundle.pet_scaling.lo * a ** 0.5,
                      mr_pad_value=bundle.mr_scaling.lo if bundle.mr_scaling is not None else -1.0)
    return bundle.schedule.tweedie_x0(x_t_vol, eps, int(t))


@torch.no_grad()
def denoise_volume(bundle, x0_vol: torch.Tensor, t: int, mr_vol: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, batch_size: int = 16,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise a clean-ish volume (network units) to step ``t`` and denoise it with one Tweedie step.

    Returns
    -------
    (x_t, x0_hat) : tensors [Z, H, W] in network units
    """
    if noise is None:
        noise = torch.randn(x0_vol.shape, generator=generator, dtype=torch.float32).to(x0_vol.device, x0_vol.dtype)
    x_t = bundle.schedule.q_sample(x0_vol, int(t), noise)
    x0_hat = predict_x0(bundle, x_t, t, mr_vol, batch_size=batch_size)
    return x_t, x0_hat
