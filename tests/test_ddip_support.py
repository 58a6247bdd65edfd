"""Shared pieces of the DDIP tests: a tiny dense-matrix likelihood and a tiny MR-conditioned prior.

(No tests here; imported by test_ddip*.py, test_hqs.py and test_cli_recon.py.)
"""

from __future__ import annotations

import numpy as np
import torch

from sirf_ddip.physics.likelihood import PoissonLogLikelihood


def phantom(shape=(4, 16, 16)) -> torch.Tensor:
    """A head-like phantom: a disc of activity 1 with a hot spot of 3 and a cold spot, zero outside."""
    nz, ny, nx = shape
    yy, xx = torch.meshgrid(torch.arange(ny) - (ny - 1) / 2, torch.arange(nx) - (nx - 1) / 2, indexing="ij")
    r = torch.sqrt(yy ** 2 + xx ** 2)
    plane = (r < 0.4 * nx).float()
    plane[(yy + 0.15 * ny) ** 2 + (xx - 0.1 * nx) ** 2 < (0.1 * nx) ** 2] = 3.0
    plane[(yy - 0.15 * ny) ** 2 + (xx + 0.1 * nx) ** 2 < (0.08 * nx) ** 2] = 0.25
    return plane.expand(nz, ny, nx).clone() * torch.linspace(0.8, 1.2, nz).reshape(nz, 1, 1)


class DenseDataStep(PoissonLogLikelihood):
    """``y ~ Poisson(m (A x + a))`` with a dense random non-negative ``A``; subsets = rows round-robin."""

    def __init__(self, shape=(4, 16, 16), nbins=3000, counts=2e4, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.image_shape = tuple(shape)
        self.device = torch.device("cpu")
        self.dtype = dtype
        n = int(np.prod(shape))
        A = torch.rand(nbins, n, generator=g, dtype=torch.float64)
        A = A * (torch.rand(nbins, n, generator=g, dtype=torch.float64) < 0.05)  # sparse-ish, like a projector
        self.x_true = phantom(shape).to(torch.float64)
        ybar0 = A @ self.x_true.reshape(-1)
        A = A * (counts / float(ybar0.sum()))      # total expected trues = counts
        self.A = A.to(dtype)
        self.m = (0.5 + torch.rand(nbins, generator=g, dtype=torch.float64)).to(dtype)
        self.a = torch.full((nbins,), 0.2 * counts / nbins / 0.9, dtype=dtype) * 0 + 0.05
        ybar = self.m * (self.A @ self.x_true.reshape(-1).to(dtype) + self.a)
        self.y = torch.poisson(ybar.to(torch.float64), generator=g).to(dtype)
        self.mr = (self.x_true > 0).to(torch.float64) * (1.0 + 0.5 * (self.x_true > 2)) * 100.0
        self._S = 1
        self._sens: dict = {}

    @property
    def num_subsets(self):
        return self._S

    def set_num_subsets(self, n):
        if n != self._S:
            self._sens = {}
        self._S = int(n)

    def _rows(self, subset):
        idx = torch.arange(self.A.shape[0])
        return idx if subset is None else idx[idx % self._S == subset]

    def forward(self, x, subset=None):
        r = self._rows(subset)
        return self.m[r] * (self.A[r] @ x.reshape(-1).to(self.dtype) + self.a[r])

    def backward(self, y, subset=None):
        r = self._rows(subset)
        return (self.A[r].T @ (self.m[r] * y)).reshape(self.image_shape)

    def sensitivity(self, subset=None):
        if subset not in self._sens:
            self._sens[subset] = self.backward(torch.ones(len(self._rows(subset)), dtype=self.dtype), subset)
        return self._sens[subset]

    def backprojected_ratio(self, x, subset=None):
        r = self._rows(subset)
        yb = self.forward(x, subset)
        return self.backward(self.y[r] / yb, subset)

    def value(self, x, subset=None):
        yb = self.forward(x)
        return float((self.y * torch.log(yb) - yb).sum())

    def to_tensor(self, image):
        if isinstance(image, torch.Tensor):
            return image.detach().to(self.dtype).reshape(self.image_shape)
        arr = np.asarray(image, dtype=np.float64)
        if arr.shape != self.image_shape:
            raise ValueError(f"image shape {arr.shape} != {self.image_shape}")
        return torch.as_tensor(arr, dtype=self.dtype)

    def from_tensor(self, tensor, template=None):
        return tensor.detach().cpu().numpy().copy()


def tiny_bundle(use_mr: bool = True, seed: int = 0, std: float = 0.02):
    """A tiny (channels 8, 16) prior with MONAI's zero-initialised layers re-randomised."""
    from sirf_ddip.prior.network import build_network, reinit_zero_layers
    from sirf_ddip.prior.scaling import MRScaler, PETScaler
    from sirf_ddip.prior.schedule import NoiseSchedule
    from sirf_ddip.prior.weights import PriorBundle

    torch.manual_seed(seed)
    net = build_network({"channels": [8, 16], "attention_levels": [False, True], "num_head_channels": 8,
                         "norm_num_groups": 8, "use_mr": use_mr})
    reinit_zero_layers(net, std=std, generator=torch.Generator().manual_seed(seed))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return PriorBundle(net, NoiseSchedule(), PETScaler(), MRScaler() if use_mr else None)


def make_ddip(ds, bundle, settings: dict, mr: bool = True, **kw):
    """A DDIPReconstructor with ``settings`` (+ ``kw``) on ``ds`` and ``bundle`` (with ``ds.mr`` iff ``mr``), set up."""
    from sirf_ddip.recon.ddip import DDIPReconstructor

    r = DDIPReconstructor(**{**settings, **kw})
    r.set_objective_function(ds)
    r.set_prior(bundle)
    if mr:
        r.set_anatomical_image(ds.mr.numpy())
    r.set_up(np.ones(ds.image_shape))
    return r


def one_torch_thread():
    """Generator body of an autouse fixture: the tiny networks run far faster single-threaded on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
