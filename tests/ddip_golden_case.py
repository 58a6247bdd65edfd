"""The DDIP golden cases: a 7-plane validation-like problem run with fixed settings, hashed bit for bit.

(No tests here; used by ``tests/test_ddip_golden.py`` and ``tools/make_ddip_golden.py``, which records the hashes
of the current code in ``tests/data/ddip_golden.json``.) Each case runs :class:`DDIPReconstructor` on the tiny
dense-matrix likelihood of ``test_ddip_support`` (7 planes = 5 overlapping 3-plane slabs, as the mMR 4-ring
validation studies) with the tiny MR-conditioned prior, a few strided steps from a low ``t_start``; the shipped
settings and :meth:`DDIPConfig.paper` plus a few single-branch variants (no fine-tuning, a persistent optimiser
with subsets and a final EM stage, the pre-0.5 keys, planes without the subject), so that every branch of the
loop is pinned.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from test_ddip_support import DenseDataStep, make_ddip, tiny_bundle

#: few steps from a low T' (each case runs in about a second on one CPU thread)
SHORT = dict(t_start=30, num_steps=4, n_init=4, device="cpu")

#: case name -> (base settings: "shipped" | "paper", overrides, planes holding the subject or None = all)
CASES: dict[str, tuple[str, dict[str, Any], list[int] | None]] = {
    "shipped": ("shipped", {}, None),
    "paper": ("paper", {}, None),
    "shipped_no_finetune": ("shipped", {"finetune": False}, None),
    "shipped_persist_subsets_final_em": ("shipped", {"finetune_optimizer": "persist", "num_subsets": 2,
                                                      "final_em": 2, "final_em_beta": 1.0,
                                                      "em_start": "previous", "seed": 5}, None),
    "pre_0_5": ("shipped", {"ddim_x0": "network", "beta_final": None, "correction_sigma_vox": 0.0,
                            "finetune_target": "fold", "eta_mode": "ddim", "lora_init": "peft",
                            "adapter_rule": "legacy", "finetune_slabs": 0, "num_finetune": 2}, None),
    "shipped_slab_consistency_alpha": ("shipped", {"slab_consistency": 0.5, "lora_alpha": 8.0,
                                                   "x0_clamp": [-1.0, 2.0], "eta": 0.5}, None),
    "shipped_subject_planes": ("shipped", {}, [1, 2, 3, 4]),
}


def _sha(a: torch.Tensor | np.ndarray) -> str:
    arr = np.ascontiguousarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a)
    return hashlib.sha256(arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()).hexdigest()


def golden_data(subject: list[int] | None = None) -> DenseDataStep:
    """The 7-plane problem (``subject``: planes holding activity and MR; the others empty)."""
    ds = DenseDataStep(shape=(7, 16, 16), nbins=2500, counts=2e4, seed=11)
    if subject is not None:
        keep = torch.zeros(7, dtype=torch.bool)
        keep[subject] = True
        ds.x_true = ds.x_true * keep.reshape(-1, 1, 1)
        ybar = ds.m * (ds.A @ ds.x_true.reshape(-1).to(ds.dtype) + ds.a)
        ds.y = torch.poisson(ybar, generator=torch.Generator().manual_seed(12))
        ds.mr = ds.mr * keep.reshape(-1, 1, 1)
    return ds


def settings(name: str) -> dict[str, Any]:
    """The full algorithm settings of case ``name`` (a dict for ``DDIPReconstructor(**...)``)."""
    from sirf_ddip.recon.config import DDIPConfig

    base, over, _ = CASES[name]
    cfg = (DDIPConfig.shipped() if base == "shipped" else DDIPConfig.paper()).replace(**{**SHORT, **over})
    # the record pins the diagnostic of every step (run.loglik_every = 1; the shipped run computes every 10th)
    return cfg.algorithm_dict() | {"device": "cpu", "loglik_every": 1}


def run_case(name: str, bundle=None) -> dict[str, Any]:
    """Run case ``name``; returns the hashes of the output, the HQS image, x_t and x̂0, and the log-likelihoods."""
    bundle = tiny_bundle() if bundle is None else bundle
    ds = golden_data(CASES[name][2])
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = make_ddip(ds, bundle, settings(name))
        r.process(progress=False)
    finally:
        torch.set_num_threads(n)
    ll = [float(v) for v in r.loglik_history]
    return {
        "x": _sha(r.x), "x_img": _sha(r._x_img), "xt": _sha(r._xt), "x0_net": _sha(r._x0_net),
        "loglik_warm_start": repr(float(r.loglik_warm_start)),
        "loglik_history": [repr(v) for v in ll],
        "loglik_final_em": None if r.loglik_final_em is None else repr(float(r.loglik_final_em)),
        "x_sum": repr(float(r.x.sum())),
        "counts": {k: int(v) for k, v in sorted(r.counts.items())},
    }


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else :func:`platform.processor`, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, str]:
    """What bit-identity depends on: torch, NumPy, the architecture, torch's CPU kernels and the CPU model.

    Two CPUs of one architecture can dispatch different kernels (AVX2, AVX-512) and round differently, so the
    hashes are compared only on the CPU that recorded them; elsewhere the recorded log-likelihoods are compared
    within a float tolerance (``tests/test_ddip_golden.py``).
    """
    return {"torch": torch.__version__, "numpy": np.__version__, "machine": platform.machine(),
            "cpu_capability": str(torch.backends.cpu.get_cpu_capability()), "cpu": _cpu_model()}


def same_software(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether two environments have the same torch, NumPy and architecture (the CPU may differ)."""
    return all(a.get(k) == b.get(k) for k in ("torch", "numpy", "machine"))


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=1, sort_keys=True) + "\n"
