"""LoRA adapters (peft) on the score network's residual and attention layers, for per-study fine-tuning.

``add_lora`` injects low-rank adapters ``W + (α/r) B A`` (peft's ``LoraConfig``/``inject_adapter_in_model``)
into the ``Conv2d``/``Linear`` layers of the U-Net's residual blocks (``conv1``, ``conv2``, ``time_emb_proj``)
and attention blocks (``to_q``, ``to_k``, ``to_v``, ``out_proj``). ``B`` starts at zero, so the adapted network
equals the base network until trained. All base weights are frozen; only the LoRA matrices (and, when
``train_biases``, the biases of the adapted layers) are trainable.

Adapter state (:func:`adapter_state_dict`) holds only the trainable tensors, a few hundred kB, so a
reconstruction can checkpoint or reset it cheaply (:func:`reset_adapters` returns the network exactly to the
pretrained prior).
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import torch
from torch import nn

#: default target modules (regex on full module names of :class:`~sirf_ddip.prior.network.ScoreNetwork`)
DEFAULT_TARGETS = (r".*(resnets\.\d+|resnet_\d)\.(conv1\.conv|conv2\.conv|time_emb_proj)"
                   r"|.*attentions?(\.\d+)?\.attn\.(to_q|to_k|to_v|out_proj)")

_BIAS0 = "_sirf_ddip_lora_bias0"
_INFO = "_sirf_ddip_lora"


def _lora_layers(net: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, mod in net.named_modules():
        if isinstance(mod, LoraLayer):
            yield name, mod


def add_lora(net: nn.Module, rank: int = 4, alpha: float | None = None, targets: str | Iterable[str] | None = None,
             train_biases: bool = True, dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters into ``net`` (in place) and freeze everything else.

    Parameters
    ----------
    net : nn.Module
        Usually a :class:`~sirf_ddip.prior.network.ScoreNetwork`.
    rank : int
        LoRA rank ``r``.
    alpha : float, optional
        LoRA ``α`` (scaling ``α/r``); default ``rank`` (scaling 1).
    targets : regex str or list of module-name suffixes, optional
        Which ``Conv2d``/``Linear`` layers to adapt; default :data:`DEFAULT_TARGETS`.
    train_biases : bool
        Also train the biases of the adapted layers (their pretrained values are kept for
        :func:`reset_adapters`).
    dropout : float
        LoRA dropout (0 keeps the adapted network deterministic).

    Returns
    -------
    nn.Module
        ``net`` itself, adapted.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(net, _INFO, None) is not None:
        raise ValueError("add_lora: the network already has LoRA adapters (use reset_adapters to restart)")
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    tm = DEFAULT_TARGETS if targets is None else (targets if isinstance(targets, str) else list(targets))
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=tm, lora_dropout=float(dropout), bias="none")
    try:
        inject_adapter_in_model(cfg, net)
    except ValueError as exc:
        raise ValueError(f"add_lora: no layer matched targets {tm!r}: {exc}") from None
    for p in net.parameters():
        p.requires_grad_(False)
    bias0 = {}
    n_layers = 0
    for name, mod in _lora_layers(net):
        n_layers += 1
        for pname, p in mod.named_parameters():
            if "lora_" in pname:
                p.requires_grad_(True)
        base = mod.get_base_layer()
        if train_biases and getattr(base, "bias", None) is not None:
            base.bias.requires_grad_(True)
            bias0[name] = base.bias.detach().clone()
    if n_layers == 0:
        raise ValueError(f"add_lora: no layer matched targets {tm!r}")
    object.__setattr__(net, _BIAS0, bias0)
    object.__setattr__(net, _INFO, {"rank": rank, "alpha": alpha, "targets": tm, "train_biases": bool(train_biases),
                                    "num_layers": n_layers})
    return net


def lora_info(net: nn.Module) -> dict | None:
    """The settings passed to :func:`add_lora` (None if the network has no adapters)."""
    info = getattr(net, _INFO, None)
    return dict(info) if info is not None else None


def lora_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (LoRA matrices and, if enabled, adapted-layer biases)."""
    return [p for _, p in _adapter_named_parameters(net)]


def _adapter_named_parameters(net: nn.Module):
    if getattr(net, _INFO, None) is None:
        raise ValueError("network has no LoRA adapters (call add_lora first)")
    for name, p in net.named_parameters():
        if p.requires_grad and ("lora_" in name or name.endswith("base_layer.bias")):
            yield name, p


def adapter_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the adapter tensors (small; safe to keep as a checkpoint)."""
    return {name: p.detach().clone() for name, p in _adapter_named_parameters(net)}


@torch.no_grad()
def load_adapter_state_dict(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by :func:`adapter_state_dict` (keys and shapes must match exactly)."""
    params = dict(_adapter_named_parameters(net))
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"load_adapter_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} "
                         "(saved with other LoRA settings?)")
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ValueError(f"load_adapter_state_dict: '{k}' has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(p.shape)}")
        p.copy_(state[k].to(p.device, p.dtype))


@torch.no_grad()
def reset_adapters(net: nn.Module, generator: torch.Generator | None = None) -> None:
    """Return the adapters to their initial state: ``B = 0`` (identity), ``A`` re-drawn, biases restored.

    After this the network output equals the pretrained network's output exactly.
    """
    if getattr(net, _INFO, None) is None:
        raise ValueError("reset_adapters: network has no LoRA adapters (call add_lora first)")
    bias0 = getattr(net, _BIAS0)
    for name, mod in _lora_layers(net):
        for key in mod.lora_A:
            a = mod.lora_A[key].weight
            w = torch.empty(a.shape, dtype=a.dtype)
            # peft's default: kaiming-uniform(a=sqrt(5)) for A, zeros for B
            bound = 1.0 / math.sqrt(w[0].numel()) if w.dim() > 1 else 0.0
            w.uniform_(-bound, bound, generator=generator)
            a.copy_(w.to(a.device))
            mod.lora_B[key].weight.zero_()
            for sub in (mod.lora_A[key], mod.lora_B[key]):
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
        if name in bias0:
            mod.get_base_layer().bias.copy_(bias0[name].to(mod.get_base_layer().bias.device))


def base_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the network *without* adapter tensors and with peft's ``base_layer.`` names undone.

    Loadable into a freshly built network of the same architecture (biases as currently trained).
    """
    out = {}
    for k, v in net.state_dict().items():
        if "lora_" in k:
            continue
        out[re.sub(r"\.base_layer\.", ".", k)] = v
    return out
