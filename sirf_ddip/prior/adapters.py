"""LoRA adapters (peft) on the score network's residual and attention layers, for per-study fine-tuning.

``add_lora`` injects low-rank adapters ``W + (α/r) B A`` (peft's ``LoraConfig``/``inject_adapter_in_model``)
into ``Conv2d``/``Linear`` layers of the U-Net. ``B`` starts at zero, so the adapted network equals the base network
until trained. All base weights are frozen; only the LoRA matrices and (``train_biases``) some biases train.

Two rules choose the adapted layers and the trained biases (``rule``):

- ``"authors"`` (default), the rule of the DDIP authors' code (``lora/lora.py``: ``adapt_model(impl="lora")`` and
  ``inject_trainable_lora_extended``, DDIPrecon_for_PET / DDIP3D): LoRA on every conv/linear layer inside a
  residual block (``conv1``, ``conv2``, ``skip_connection``, ``time_emb_proj``) or an attention block (``to_q``,
  ``to_k``, ``to_v``, ``out_proj``); **every bias of the network is trained except those of the time-embedding
  projections** (their ``"emb_layers"``, our ``time_emb_proj``), so the adapted prior cannot shift its own
  noise-level conditioning.
- ``"legacy"`` (this package before 0.2): LoRA on ``conv1``, ``conv2``, ``time_emb_proj`` and attention; only the
  biases of the adapted layers train (time-embedding projections included).

Two initialisations of the down-projection ``A`` (``init``; ``B = 0`` in both):

- ``"authors"`` (default): ``A ~ N(0, (1/r)²)`` (``nn.init.normal_(lora_down.weight, std=1/r)`` in their
  ``LoraInjectedConv2d``/``LoraInjectedLinear``); with ``r = 4``, std 0.25.
- ``"peft"``: peft's default, kaiming-uniform(a=√5), std ``1/√(3·fan_in)``: about 0.04 on the shipped prior's
  3×3 convolutions, 5-10× smaller, so the first updates of ``B`` move the output 5-10× less.

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

#: target modules of the ``"legacy"`` rule (regex on full module names of
#: :class:`~sirf_ddip.prior.network.ScoreNetwork`)
DEFAULT_TARGETS = (r".*(resnets\.\d+|resnet_\d)\.(conv1\.conv|conv2\.conv|time_emb_proj)"
                   r"|.*attentions?(\.\d+)?\.attn\.(to_q|to_k|to_v|out_proj)")
#: target modules of the ``"authors"`` rule: every conv/linear layer of a residual or attention block
AUTHORS_TARGETS = (r".*(resnets\.\d+|resnet_\d)\.(conv1\.conv|conv2\.conv|skip_connection\.conv|time_emb_proj)"
                   r"|.*attentions?(\.\d+)?\.attn\.(to_q|to_k|to_v|out_proj)")
#: parameter-name pattern of the time-embedding projections whose biases the ``"authors"`` rule keeps frozen
TIME_EMBEDDING_BIAS = re.compile(r"(^|\.)time_emb_proj\.")
RULES = ("authors", "legacy")
INITS = ("authors", "peft")

_BIAS0 = "_sirf_ddip_lora_bias0"
_INFO = "_sirf_ddip_lora"


def _lora_layers(net: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, mod in net.named_modules():
        if isinstance(mod, LoraLayer):
            yield name, mod


def add_lora(net: nn.Module, rank: int = 4, alpha: float | None = None, targets: str | Iterable[str] | None = None,
             train_biases: bool = True, dropout: float = 0.0, rule: str = "authors",
             init: str = "authors") -> nn.Module:
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
        Which ``Conv2d``/``Linear`` layers to adapt; default from ``rule`` (:data:`AUTHORS_TARGETS` or
        :data:`DEFAULT_TARGETS`).
    train_biases : bool
        Also train biases (which: ``rule``; their pretrained values are kept for :func:`reset_adapters`).
    dropout : float
        LoRA dropout (0 keeps the adapted network deterministic).
    rule : "authors" or "legacy"
        Adapted layers and trained biases (module docstring).
    init : "authors" or "peft"
        Initialisation of the LoRA down-projections, applied here and by :func:`reset_adapters`.

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
    if rule not in RULES:
        raise ValueError(f"add_lora: rule must be one of {RULES}, got {rule!r}")
    if init not in INITS:
        raise ValueError(f"add_lora: init must be one of {INITS}, got {init!r}")
    alpha = float(rank if alpha is None else alpha)
    if targets is None:
        tm = AUTHORS_TARGETS if rule == "authors" else DEFAULT_TARGETS
    else:
        tm = targets if isinstance(targets, str) else list(targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=tm, lora_dropout=float(dropout), bias="none")
    try:
        inject_adapter_in_model(cfg, net)
    except ValueError as exc:
        raise ValueError(f"add_lora: no layer matched targets {tm!r}: {exc}") from None
    for p in net.parameters():
        p.requires_grad_(False)
    n_layers = 0
    adapted_bias = set()
    for name, mod in _lora_layers(net):
        n_layers += 1
        for pname, p in mod.named_parameters():
            if "lora_" in pname:
                p.requires_grad_(True)
        if getattr(mod.get_base_layer(), "bias", None) is not None:
            adapted_bias.add(f"{name}.base_layer.bias")
    if n_layers == 0:
        raise ValueError(f"add_lora: no layer matched targets {tm!r}")
    bias0 = {}
    if train_biases:
        for pname, p in net.named_parameters():
            if "lora_" in pname or not pname.endswith("bias"):
                continue
            if (pname in adapted_bias) if rule == "legacy" else not TIME_EMBEDDING_BIAS.search(pname):
                p.requires_grad_(True)
                bias0[pname] = p.detach().clone()
    object.__setattr__(net, _BIAS0, bias0)
    object.__setattr__(net, _INFO, {"rank": rank, "alpha": alpha, "targets": tm, "train_biases": bool(train_biases),
                                    "num_layers": n_layers, "rule": rule, "init": init,
                                    "num_biases": len(bias0)})
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
    trained_biases = getattr(net, _BIAS0)
    for name, p in net.named_parameters():
        if p.requires_grad and ("lora_" in name or name in trained_biases):
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

    ``A`` is drawn as chosen by ``add_lora(init=...)``: ``N(0, (1/r)²)`` (``"authors"``) or peft's
    kaiming-uniform(a=√5), i.e. ``U(−1/√fan_in, 1/√fan_in)`` (``"peft"``). After this the network output equals the
    pretrained network's output exactly.
    """
    info = getattr(net, _INFO, None)
    if info is None:
        raise ValueError("reset_adapters: network has no LoRA adapters (call add_lora first)")
    init = info.get("init", "peft")
    rank = int(info["rank"])
    for name, mod in _lora_layers(net):
        for key in mod.lora_A:
            a = mod.lora_A[key].weight
            w = torch.empty(a.shape, dtype=torch.float32)
            if init == "authors":
                w.normal_(0.0, 1.0 / rank, generator=generator)
            else:
                bound = 1.0 / math.sqrt(w[0].numel()) if w.dim() > 1 else 0.0
                w.uniform_(-bound, bound, generator=generator)
            a.copy_(w.to(a.device, a.dtype))
            mod.lora_B[key].weight.zero_()
            for sub in (mod.lora_A[key], mod.lora_B[key]):
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
    params = dict(net.named_parameters())
    for pname, b0 in getattr(net, _BIAS0).items():
        params[pname].copy_(b0.to(params[pname].device))


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
