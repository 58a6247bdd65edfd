"""The 2.5D, optionally MR-conditioned ε-prediction U-Net of the diffusion prior.

Why MONAI's ``DiffusionModelUNet`` (and not diffusers' ``UNet2DModel``)
----------------------------------------------------------------------
- It is a medical-imaging implementation already in our dependencies (``monai>=1.4``); diffusers would be an
  extra, large dependency for one class.
- Its ResBlocks and attention blocks are built from plain ``nn.Conv2d`` / ``nn.Linear`` modules with stable
  names (``down_blocks.1.resnets.0.conv1.conv``, ``…attentions.0.attn.to_q``), which peft's LoRA addresses
  directly (see :mod:`sirf_ddip.prior.adapters`).
- Its constructor takes a plain dict of ints/bools, so the architecture is JSON-serialisable and travels in the
  weights card.

Input / output
--------------
``x_t`` holds ``slab`` (= 3) adjacent noisy PET planes as channels ``[B, 3, H, W]`` (the 2.5D scheme of
Hashimoto & Gong); when the network ``uses_mr``, the 3 co-registered MR planes are concatenated as 3 extra
input channels. The output is the predicted noise ε for the 3 PET planes ``[B, 3, H, W]``. ``H`` and ``W``
must be divisible by ``2 ** (levels − 1)``; :func:`pad_to_multiple` helps callers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

#: architecture defaults (a small, CPU-trainable network)
DEFAULT_ARCH: dict[str, Any] = {
    "channels": [32, 64, 64],
    "attention_levels": [False, False, True],
    "num_res_blocks": 1,
    "num_head_channels": 32,
    "norm_num_groups": 16,
    "use_mr": True,
    "slab": 3,
    # a learned "no MR" input (MR dropout in training, classifier-free MR guidance at sampling); False keeps
    # the parameter set of priors trained without it
    "mr_null": False,
}


class _Rearrange(nn.Module):
    """Minimal stand-in for ``einops.layers.torch.Rearrange`` for the two patterns MONAI's attention uses.

    MONAI imports einops optionally; when einops is not installed, :func:`_ensure_rearrange` installs this
    class in MONAI's attention modules so that attention levels work. Install ``einops`` to use the original.
    """

    _PATTERNS = ("b h (l d) -> b l h d", "b l h d -> b h (l d)")

    def __init__(self, pattern: str, **axes: int):
        super().__init__()
        if pattern not in self._PATTERNS:
            raise NotImplementedError(f"_Rearrange: pattern {pattern!r} not supported without einops "
                                      "(install einops)")
        self.pattern = pattern
        self.axes = axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern == self._PATTERNS[0]:
            b, h, ld = x.shape
            heads = int(self.axes["l"])
            return x.reshape(b, h, heads, ld // heads).permute(0, 2, 1, 3)
        b, heads, h, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, h, heads * d)


def _ensure_rearrange() -> None:
    """Make MONAI's self/cross-attention constructible without einops (see :class:`_Rearrange`)."""
    try:
        import einops  # noqa: F401

        return
    except ImportError:
        pass
    import monai.networks.blocks.crossattention as ca
    import monai.networks.blocks.selfattention as sa

    for mod in (sa, ca):
        if getattr(mod, "Rearrange", None) is not _Rearrange:
            mod.Rearrange = _Rearrange


class ScoreNetwork(nn.Module):
    """ε-prediction network ``eps = f(x_t, t, mr)`` over 3-plane slabs.

    Parameters
    ----------
    arch : dict
        Keys: ``channels`` (list of int per level), ``attention_levels`` (list of bool), ``num_res_blocks``
        (int or list), ``num_head_channels`` (int), ``norm_num_groups`` (int, must divide every channel count),
        ``use_mr`` (bool), ``slab`` (int, odd; 3), ``mr_null`` (bool: a learned "no MR" input, see
        :meth:`null_mr`; needs ``use_mr``). Missing keys take :data:`DEFAULT_ARCH` values; unknown keys
        are errors.

    Attributes
    ----------
    uses_mr : bool
    slab : int
    arch : dict (the resolved, JSON-serialisable architecture)
    unet : monai.networks.nets.DiffusionModelUNet
    """

    def __init__(self, arch: dict[str, Any] | None = None):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        _ensure_rearrange()
        arch = resolve_arch(arch)
        self.arch = arch
        self.uses_mr = bool(arch["use_mr"])
        self.slab = int(arch["slab"])
        self.in_channels = self.slab * (2 if self.uses_mr else 1)
        self.levels = len(arch["channels"])
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=self.in_channels,
            out_channels=self.slab,
            num_res_blocks=arch["num_res_blocks"],
            channels=tuple(arch["channels"]),
            attention_levels=tuple(arch["attention_levels"]),
            norm_num_groups=arch["norm_num_groups"],
            num_head_channels=arch["num_head_channels"],
        )
        self.has_mr_null = bool(arch["mr_null"])
        if self.has_mr_null:
            # one learned value per MR plane, broadcast over H, W; starts at the MR background level (-1)
            self.mr_null = nn.Parameter(torch.full((1, self.slab, 1, 1), -1.0))

    @property
    def spatial_multiple(self) -> int:
        """H and W must be multiples of this (``2 ** (levels - 1)``)."""
        return 2 ** (self.levels - 1)

    def null_mr(self, like: torch.Tensor) -> torch.Tensor:
        """The learned "no MR" input shaped like ``like [B, slab, H, W]`` (raises if the arch has no ``mr_null``)."""
        if not self.has_mr_null:
            raise ValueError("ScoreNetwork: this prior has no learned 'no MR' input (architecture mr_null is "
                             "false), so it cannot predict without the MR; use mr_guidance = 1 or a prior "
                             "trained with MR dropout")
        return self.mr_null.to(like.dtype).expand(like.shape)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, mr: torch.Tensor | None = None,
                drop_mr: torch.Tensor | bool | None = None) -> torch.Tensor:
        """Predict ε.

        Parameters
        ----------
        x_t : tensor [B, slab, H, W]
            Noisy PET slabs in network units.
        t : int or long tensor [B]
            Diffusion step(s) in ``[0, num_train_steps)``.
        mr : tensor [B, slab, H, W] or None
            Normalised MR slabs; required iff :attr:`uses_mr`.
        drop_mr : bool or bool tensor [B], optional
            Replace the MR of all (True) or of the flagged samples by the learned "no MR" input
            (:meth:`null_mr`): MR dropout in training, the unconditioned ε̂ of MR guidance at sampling.
        """
        if x_t.dim() != 4 or x_t.shape[1] != self.slab:
            raise ValueError(f"ScoreNetwork: x_t must be [B, {self.slab}, H, W] (a {self.slab}-plane PET slab), "
                             f"got shape {tuple(x_t.shape)}")
        m = self.spatial_multiple
        if x_t.shape[2] % m or x_t.shape[3] % m:
            raise ValueError(f"ScoreNetwork: H, W = {tuple(x_t.shape[2:])} must be multiples of {m} for "
                             f"{self.levels} levels (pad with sirf_ddip.prior.network.pad_to_multiple)")
        if self.uses_mr:
            if mr is None:
                raise ValueError("ScoreNetwork: this prior is MR-conditioned (use_mr=True) but no MR was given; "
                                 "pass the co-registered MR slabs (e.g. --mr MR.hv)")
            if mr.shape != x_t.shape:
                raise ValueError(f"ScoreNetwork: MR slabs shape {tuple(mr.shape)} != PET slabs shape "
                                 f"{tuple(x_t.shape)}")
            mr = mr.to(x_t.dtype)
            if drop_mr is not None and drop_mr is not False:
                null = self.null_mr(mr)
                if isinstance(drop_mr, bool):
                    mr = null
                else:
                    drop = torch.as_tensor(drop_mr, device=mr.device).reshape(-1, 1, 1, 1)
                    mr = torch.where(drop, null, mr)
            inp = torch.cat([x_t, mr], dim=1)
        else:
            if mr is not None:
                raise ValueError("ScoreNetwork: this prior is not MR-conditioned (use_mr=False) but an MR was "
                                 "given; drop the MR input or use an MR-conditioned prior")
            inp = x_t
        B = x_t.shape[0]
        tt = torch.as_tensor(t, device=x_t.device)
        if tt.dim() == 0:
            tt = tt.expand(B)
        if tt.shape != (B,):
            raise ValueError(f"ScoreNetwork: t must be a scalar or shape [{B}], got {tuple(tt.shape)}")
        return self.unet(inp, timesteps=tt.long())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def resolve_arch(arch: dict[str, Any] | None) -> dict[str, Any]:
    """Fill defaults into ``arch`` and validate it (raises ``ValueError`` naming the key)."""
    arch = dict(arch or {})
    unknown = sorted(set(arch) - set(DEFAULT_ARCH))
    if unknown:
        raise ValueError(f"network arch: unknown key(s) {unknown}; known keys: {sorted(DEFAULT_ARCH)}")
    out = {**DEFAULT_ARCH, **arch}
    out["channels"] = [int(c) for c in out["channels"]]
    out["attention_levels"] = [bool(a) for a in out["attention_levels"]]
    if len(out["attention_levels"]) != len(out["channels"]):
        raise ValueError(f"network arch: 'attention_levels' has {len(out['attention_levels'])} entries but "
                         f"'channels' has {len(out['channels'])}")
    nrb = out["num_res_blocks"]
    out["num_res_blocks"] = [int(n) for n in nrb] if isinstance(nrb, (list, tuple)) else int(nrb)
    out["num_head_channels"] = int(out["num_head_channels"])
    out["norm_num_groups"] = int(out["norm_num_groups"])
    for c in out["channels"]:
        if c % out["norm_num_groups"]:
            raise ValueError(f"network arch: 'norm_num_groups' {out['norm_num_groups']} must divide every "
                             f"channel count, not {c}")
    out["use_mr"] = bool(out["use_mr"])
    out["mr_null"] = bool(out["mr_null"])
    if out["mr_null"] and not out["use_mr"]:
        raise ValueError("network arch: 'mr_null' (a learned 'no MR' input) needs 'use_mr': true")
    out["slab"] = int(out["slab"])
    if out["slab"] < 1 or out["slab"] % 2 == 0:
        raise ValueError(f"network arch: 'slab' must be a positive odd number, got {out['slab']}")
    return out


def build_network(arch: dict[str, Any] | None = None) -> ScoreNetwork:
    """Build a :class:`ScoreNetwork` from a JSON-serialisable architecture dict."""
    return ScoreNetwork(arch)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pad the last two dims of ``x`` up to multiples of ``multiple`` (centred).

    Returns the padded tensor and the ``(left, right, top, bottom)`` padding, for :func:`crop_padding`.
    """
    H, W = x.shape[-2:]
    Hp = int(math.ceil(H / multiple) * multiple)
    Wp = int(math.ceil(W / multiple) * multiple)
    top, left = (Hp - H) // 2, (Wp - W) // 2
    pad = (left, Wp - W - left, top, Hp - H - top)
    if Hp == H and Wp == W:
        return x, pad
    return nn.functional.pad(x, pad), pad


def crop_padding(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`."""
    left, right, top, bottom = pad
    H, W = x.shape[-2:]
    return x[..., top:H - bottom, left:W - right]


@torch.no_grad()
def reinit_zero_layers(net: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> int:
    """Re-initialise every all-zero weight tensor with N(0, std²) (for tests).

    MONAI zero-initialises the output convolution and the last conv of each residual/attention branch, so a
    freshly built network outputs exactly 0 and LoRA adapters on inner layers receive zero gradients.
    Returns the number of tensors changed.
    """
    n = 0
    for name, p in net.named_parameters():
        if name.endswith("weight") and p.dim() >= 2 and not torch.any(p != 0):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu").to(p.device) * std)
            n += 1
    return n
