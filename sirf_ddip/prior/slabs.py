"""2.5D inference over a whole volume: every overlapping 3-plane slab through the network, averaged back.

A volume ``[Z, H, W]`` (network units) is cut into the ``max(Z, slab) − slab + 1`` overlapping slabs of ``slab``
adjacent planes (``slab = 3``: planes ``i, i+1, i+2``). The network predicts ε for all planes of each slab; each
plane's prediction is the mean over every slab plane that holds it (1 slab for the end planes, 2 for the next, 3
inside). A volume with fewer than ``slab`` planes is padded by edge replication, and every replicated copy's
prediction is averaged back onto its source plane. ``H`` and ``W`` are padded (centred, constant: the background
level) to the network's multiple and cropped back.

This module is the one slab path of the package: :func:`predict_eps` / :func:`predict_x0` (the prior check) and
:class:`DiffusionPrior` (the DDIP reconstructor) both use :func:`slab_planes`, :func:`run_network` and
:func:`fold_slabs`. Everything keeps autograd intact (the DDIP reconstructor back-propagates through
:meth:`DiffusionPrior.eps_slabs` to train LoRA adapters); wrap calls in ``torch.no_grad()`` when no gradient is
needed.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .guidance import check_mr_guidance, guided_eps, needs_conditioned, needs_unconditioned
from .network import ScoreNetwork, crop_padding, pad_to_multiple


def num_slabs(num_planes: int, slab: int = 3) -> int:
    """Number of overlapping slabs of a ``num_planes`` volume (after edge replication to ``slab`` planes)."""
    return max(int(num_planes), int(slab)) - int(slab) + 1


def plane_sources(num_planes: int, slab: int = 3) -> torch.Tensor:
    """Source plane of every plane of the (edge-replicated to ≥ ``slab`` planes) volume: ``[max(Z, slab)]``."""
    Z = int(num_planes)
    if Z >= slab:
        return torch.arange(Z)
    before = (slab - Z) // 2
    return torch.tensor([0] * before + list(range(Z)) + [Z - 1] * (slab - Z - before))


def slab_planes(num_planes: int, slab: int, idx: torch.Tensor) -> torch.Tensor:
    """Source plane index of every plane of slabs ``idx``: ``[len(idx), slab]`` (on ``idx``'s device)."""
    src = plane_sources(num_planes, slab)
    return src[idx.cpu().reshape(-1, 1) + torch.arange(slab).reshape(1, -1)].to(idx.device)


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
    return fold_slabs(slabs, Z)


def fold_slabs(slabs: torch.Tensor, num_planes: int, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Average slab predictions ``[N, slab, H, W]`` onto the ``num_planes`` source planes (replicated copies of a
    short volume's planes included).

    ``idx`` None: the slabs are *all* ``num_slabs(Z)`` slabs. Otherwise they are slabs ``idx`` (distinct indices) and
    each plane is the mean over the given slabs holding it; a plane that no given slab holds is 0.
    """
    if slabs.dim() != 4:
        raise ValueError(f"fold_slabs: expected [N, slab, H, W], got shape {tuple(slabs.shape)}")
    N, S, H, W = slabs.shape
    if idx is None:
        if N != num_slabs(num_planes, S):
            raise ValueError(f"fold_slabs: {N} slabs given, a {num_planes}-plane volume has "
                             f"{num_slabs(num_planes, S)}")
        idx = torch.arange(N, device=slabs.device)
    elif int(idx.numel()) != N:
        raise ValueError(f"fold_slabs: {N} slabs given for {int(idx.numel())} slab indices")
    src = slab_planes(num_planes, S, idx.to(slabs.device)).reshape(-1)
    acc = slabs.new_zeros((num_planes, H, W)).index_add(0, src, slabs.reshape(N * S, H, W))
    cnt = torch.bincount(src, minlength=num_planes).to(slabs.dtype).reshape(num_planes, 1, 1)
    return acc / cnt.clamp_min(1)


def slabs_touching(planes: torch.Tensor, slab: int = 3) -> torch.Tensor:
    """Indices of the slabs that hold at least one plane where the boolean ``planes [Z]`` is True."""
    planes = torch.as_tensor(planes, dtype=torch.bool).cpu()
    Z = int(planes.numel())
    n = num_slabs(Z, slab)
    held = slab_planes(Z, slab, torch.arange(n))          # [n, slab]
    return torch.nonzero(planes[held].any(dim=1)).reshape(-1)


def gather_slabs(vol: torch.Tensor, slab: int, idx: torch.Tensor) -> torch.Tensor:
    """Slabs ``idx`` of ``vol [Z, H, W]`` (any ``Z ≥ 1``; short volumes edge-replicated): ``[len(idx), slab, H, W]``."""
    if vol.dim() != 3:
        raise ValueError(f"gather_slabs: expected a [Z, H, W] volume, got shape {tuple(vol.shape)}")
    return vol[slab_planes(vol.shape[0], slab, idx)]


#: names of :func:`run_network`'s network precisions (``network_precision`` in the DDIP config)
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def run_network(network: nn.Module, xs: torch.Tensor, t: int, ms: torch.Tensor | None = None,
                pad_value: float = 0.0, mr_pad_value: float = -1.0, mr_guidance: float = 1.0,
                channels_last: bool = False, precision: str = "float32") -> torch.Tensor:
    """ε of a batch of slabs ``xs [b, slab, H, W]`` (MR slabs ``ms`` iff the network uses MR), with ``H, W``
    padded to the network's multiple by the constants ``pad_value`` / ``mr_pad_value`` and cropped back.

    ``mr_guidance`` ``w`` (:mod:`sirf_ddip.prior.guidance`): 1 is the one MR-conditioned call; otherwise the
    network's learned "no MR" input gives ε̂_uncond and the result is ``ε̂_uncond + w (ε̂_cond − ε̂_uncond)``.
    ``channels_last``: the inputs in channels-last memory order (for a network converted with
    ``network.to(memory_format=torch.channels_last)``; the same numbers up to float rounding). ``precision``:
    ``"float32"``, or ``"bfloat16"`` (autocast on the inputs' device; changes the numbers). ε is returned in
    ``xs``'s dtype either way.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"key 'network_precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    multiple = int(getattr(network, "spatial_multiple", 1))
    xp, pad = _pad_hw(xs, multiple, pad_value)
    mp = _pad_hw(ms, multiple, mr_pad_value)[0] if ms is not None else None
    if channels_last:
        xp = xp.contiguous(memory_format=torch.channels_last)
        mp = mp.contiguous(memory_format=torch.channels_last) if mp is not None else None
    tb = torch.full((xs.shape[0],), int(t), dtype=torch.long, device=xs.device)
    amp = PRECISIONS[precision]
    with torch.autocast(device_type=xs.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        if mp is None:
            eps = network(xp, tb)
        elif not needs_unconditioned(mr_guidance):
            eps = network(xp, tb, mp)
        else:
            cond = network(xp, tb, mp) if needs_conditioned(mr_guidance) else None
            eps = guided_eps(cond, network(xp, tb, mp, drop_mr=True), mr_guidance)
    eps = crop_padding(eps, pad)
    if amp is not None or channels_last:
        eps = eps.to(xs.dtype).contiguous()
    return eps


def _pad_hw(x: torch.Tensor, multiple: int, value: float):
    if multiple <= 1:
        return x, (0, 0, 0, 0)
    xp, pad = pad_to_multiple(x, multiple)
    if any(pad) and value != 0.0:
        xp = nn.functional.pad(x, pad, value=float(value))
    return xp, pad


def predict_eps(network: ScoreNetwork | nn.Module, x_t_vol: torch.Tensor, t: int, mr_vol: torch.Tensor | None = None,
                batch_size: int = 16, pad_value: float = 0.0, mr_pad_value: float = -1.0,
                mr_guidance: float = 1.0) -> torch.Tensor:
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
    mr_guidance : float
        Classifier-free MR guidance ``w`` (:func:`run_network`); 1: the MR-conditioned prediction.
    """
    slab = int(getattr(network, "slab", 3))
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
    n = num_slabs(Z, slab)
    b = max(1, int(batch_size))
    outs = []
    for i in range(0, n, b):
        idx = torch.arange(i, min(i + b, n), device=x_t_vol.device)
        ms = gather_slabs(mr_vol.to(x_t_vol.dtype), slab, idx) if uses_mr else None
        outs.append(run_network(network, gather_slabs(x_t_vol, slab, idx), t, ms, pad_value, mr_pad_value,
                                mr_guidance=mr_guidance))
    return fold_slabs(torch.cat(outs, dim=0).to(x_t_vol.dtype), Z)


def predict_x0(bundle, x_t_vol: torch.Tensor, t: int, mr_vol: torch.Tensor | None = None, batch_size: int = 16,
               network: nn.Module | None = None, mr_guidance: float = 1.0) -> torch.Tensor:
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
    mr_guidance : float
        Classifier-free MR guidance ``w`` (:func:`run_network`).
    """
    net = bundle.network if network is None else network
    a = float(bundle.schedule.alphas_cumprod[int(t)])
    eps = predict_eps(net, x_t_vol, t, mr_vol, batch_size=batch_size, pad_value=bundle.pet_scaling.lo * a ** 0.5,
                      mr_pad_value=bundle.mr_scaling.lo if bundle.mr_scaling is not None else -1.0,
                      mr_guidance=mr_guidance)
    return bundle.schedule.tweedie_x0(x_t_vol, eps, int(t))


class DiffusionPrior:
    """The score network as a prior on a whole volume: ε, Tweedie x̂0 and the image ⇄ network-unit maps.

    Parameters
    ----------
    network : nn.Module
        The score network (possibly a LoRA-adapted copy); ``slab`` planes per input, ``uses_mr``.
    schedule : NoiseSchedule
    pet_scaling : Scaler
        The prior's (unfitted) PET scaler spec; :meth:`fit_pet` fits it on an image.
    mr_net : tensor [Z, H, W], optional
        The MR in network units (required iff the network uses MR).
    mr_pad_value : float
        Background of the MR in network units (for ``H, W`` padding).
    batch_size : int
        Slabs per network call (memory only).
    channels_last : bool
        Run the network in channels-last memory order (convert the network too:
        ``network.to(memory_format=torch.channels_last)``; :func:`run_network`).
    precision : str
        ``"float32"`` or ``"bfloat16"`` (autocast; :func:`run_network`).

    Attributes
    ----------
    pet_scaler : fitted Scaler or None
    timings, counts : dict
        Seconds in network forwards (``"network_forward"``) and slab counts (``"slab_forwards"``).
    """

    def __init__(self, network: nn.Module, schedule, pet_scaling, mr_net: torch.Tensor | None = None,
                 mr_pad_value: float = -1.0, batch_size: int = 8,
                 timings: dict[str, float] | None = None, counts: dict[str, int] | None = None,
                 grid=None, mr_guidance: float = 1.0, channels_last: bool = False, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ConfigError(f"key 'network_precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.channels_last, self.precision = bool(channels_last), str(precision)
        self.grid = grid  # a PriorGrid (PET grid <-> the prior's in-plane grid) or None
        self.network = network
        self.schedule = schedule
        self.pet_scaling = pet_scaling
        self.pet_scaler = None
        self.mr_net = mr_net
        self.mr_pad_value = float(mr_pad_value)
        self.mr_guidance = check_mr_guidance(mr_guidance)
        if needs_unconditioned(self.mr_guidance) and bool(getattr(network, "uses_mr", False)) and \
                not bool(getattr(network, "has_mr_null", False)):
            raise ConfigError(f"key 'mr_guidance' = {self.mr_guidance} needs a prior with a learned "
                             "'no MR' input (trained with MR dropout, architecture mr_null); this one has none, "
                             "use mr_guidance = 1")
        self.batch_size = max(1, int(batch_size))
        self.slab = int(getattr(network, "slab", 3))
        self.timings = timings if timings is not None else {}
        self.counts = counts if counts is not None else {}
        self.active_slabs: torch.Tensor | None = None   # None: every slab runs
        if bool(getattr(network, "uses_mr", False)) and mr_net is None:
            raise ValueError("DiffusionPrior: the network is MR-conditioned but no MR was given")

    # ------------------------------------------------------------------ units
    def fit_pet(self, image) -> Any:
        """Fit (a copy of) the PET scaler on ``image`` (activity units, numpy); returns and keeps it."""
        self.pet_scaler = self.pet_scaling.fit(image)
        return self.pet_scaler

    def set_pet_scale(self, scale: float) -> None:
        """Use the PET scaler with this reference level (e.g. from a checkpoint)."""
        spec = self.pet_scaling.spec_unfitted()
        spec["scale"] = float(scale)
        self.pet_scaler = type(self.pet_scaling)(spec)

    def to_network(self, x: torch.Tensor) -> torch.Tensor:
        """Activity → network units (float32 on the network's device)."""
        dev = self.mr_net.device if self.mr_net is not None else next(self.network.parameters()).device
        x = x.detach() if self.grid is None else self.grid.to_prior(x.detach())
        return self._scaler().to_net(x.to(dev, torch.float32))

    def from_network(self, u: torch.Tensor) -> torch.Tensor:
        """Network units → activity."""
        out = self._scaler().from_net(u)
        return out if self.grid is None else self.grid.from_prior(out)

    def _scaler(self):
        if self.pet_scaler is None:
            raise RuntimeError("DiffusionPrior: the PET scaler is not fitted yet (fit_pet)")
        return self.pet_scaler

    # ------------------------------------------------------------------ slabs
    def num_slabs(self, num_planes: int) -> int:
        return num_slabs(num_planes, self.slab)

    def slab_planes(self, num_planes: int, idx: torch.Tensor) -> torch.Tensor:
        return slab_planes(num_planes, self.slab, idx)

    def eps_slabs(self, x_t: torch.Tensor, t: int, idx: torch.Tensor) -> torch.Tensor:
        """ε of slabs ``idx`` of ``x_t [Z, H, W]``: ``[len(idx), slab, H, W]`` (autograd intact)."""
        a = float(self.schedule.alphas_cumprod[int(t)])
        ms = gather_slabs(self.mr_net, self.slab, idx) if self.mr_net is not None and \
            bool(getattr(self.network, "uses_mr", False)) else None
        t0 = time.perf_counter()
        eps = run_network(self.network, gather_slabs(x_t, self.slab, idx), t, ms,
                          pad_value=self.pet_scaling.lo * math.sqrt(a), mr_pad_value=self.mr_pad_value,
                          mr_guidance=self.mr_guidance, channels_last=self.channels_last, precision=self.precision)
        self.timings["network_forward"] = self.timings.get("network_forward", 0.0) + time.perf_counter() - t0
        self.counts["slab_forwards"] = self.counts.get("slab_forwards", 0) + int(idx.numel())
        return eps

    def set_active_planes(self, planes: torch.Tensor | None) -> None:
        """Run the network only on the slabs that hold at least one plane where ``planes [Z]`` is True (None:
        every slab). Planes no active slab holds get ε = 0 from :meth:`eps`; the caller sets them otherwise."""
        self.active_slabs = None if planes is None else slabs_touching(planes, self.slab)

    def slab_indices(self, num_planes: int, device=None) -> torch.Tensor:
        """The slabs that run: the active ones (:meth:`set_active_planes`), else all ``num_slabs(Z)``."""
        idx = torch.arange(self.num_slabs(num_planes)) if self.active_slabs is None else self.active_slabs
        return idx.to(device) if device is not None else idx

    def fold(self, eps_slabs: torch.Tensor, num_planes: int, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Slab predictions averaged back to the ``[Z, H, W]`` volume: all slabs, or slabs ``idx``."""
        return fold_slabs(eps_slabs, num_planes, idx)

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """Slab-averaged ε of the whole volume over the slabs that run (no gradient)."""
        Z = x_t.shape[0]
        idx = self.slab_indices(Z, x_t.device)
        n = int(idx.numel())
        parts = [self.eps_slabs(x_t, t, idx[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
        return self.fold(torch.cat(parts, 0), Z, idx)

    def x0(self, x_t: torch.Tensor, t: int, eps: torch.Tensor | None = None,
           clamp: tuple[float, float] | None = None) -> torch.Tensor:
        """Tweedie ``x̂0`` of the whole volume (network units; ``eps`` = :meth:`eps` unless given), clamped."""
        e = self.eps(x_t, t) if eps is None else eps
        x0 = self.schedule.tweedie_x0(x_t, e, int(t))
        return x0 if clamp is None else x0.clamp(*clamp)
