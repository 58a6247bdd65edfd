"""The shared SIRF/CIL surface of iterative reconstructors, on a tiny dense likelihood (tests/toy_physics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sirf_ddip.recon.base import IterativeReconstructor, NotSetUpError, as_datastep
from sirf_ddip.recon.callbacks import CheckpointCallback, EarlyStopping, LoggingCallback
from sirf_ddip.recon.em import em_multiplicative_update, em_update
from toy_physics import DenseLikelihood


def DenseDataStep(shape=(1, 4, 4), nbins=40, seed=0) -> DenseLikelihood:
    """y ~ Poisson(A x + 0.1) with a dense random matrix; subsets = rows round-robin."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    A = torch.rand(nbins, n, generator=g, dtype=torch.float64)
    a = torch.full((nbins,), 0.1, dtype=torch.float64)
    xt = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return DenseLikelihood(A, torch.poisson(A @ xt + a, generator=g), None, a, shape)


class PlainEM(IterativeReconstructor):
    def _set_up(self, template):
        pass

    def _update(self, x):
        return em_update(self.data_step, x, self.get_subset_num())

    def save_checkpoint(self, folder):
        self.saved = getattr(self, "saved", 0) + 1


def test_surface_and_monotone_em(tmp_path):
    ds = DenseDataStep()
    r = PlainEM()
    with pytest.raises(NotSetUpError):
        r.set_up(np.ones(ds.image_shape))
    r.set_objective_function(ds)
    r.set_num_subsets(1)
    r.set_num_subiterations(5)
    x0 = np.ones(ds.image_shape)
    r.set_up(x0)
    r.set_current_estimate(x0)
    lls = []
    for _ in range(5):
        r.update_current_estimate()
        lls.append(ds.value(r.x))
    assert all(b >= a - 1e-9 for a, b in zip(lls, lls[1:]))
    out = r.get_output()
    out[:] = -1  # a copy: the held estimate is untouched
    assert float(r.x.min()) > 0 and r.get_subiteration_num() == 5


def test_run_callbacks_stop_and_log(tmp_path):
    ds = DenseDataStep()
    r = PlainEM()
    r.set_objective_function(ds)
    r.set_num_subsets(2)
    r.set_up(np.ones(ds.image_shape))
    r.set_current_estimate(np.ones(ds.image_shape))
    log = tmp_path / "log.jsonl"
    r.run(math.inf, callbacks=[LoggingCallback(log), CheckpointCallback(tmp_path, every=2),
                               EarlyStopping(lambda a: a.iteration >= 6)])
    assert r.iteration == 6
    assert len(log.read_text().splitlines()) == 6
    assert r.saved == 3 + 1  # iterations 2, 4, 6 and at the end
    assert [r.get_subset_num(i) for i in range(4)] == [0, 1, 0, 1]


def test_as_datastep_rejects_unknown():
    with pytest.raises(TypeError, match="objective"):
        as_datastep(object())


def test_em_multiplicative_update_zero_sensitivity():
    x = torch.tensor([1.0, 2.0, 3.0])
    out = em_multiplicative_update(x, torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 2.0]))
    assert torch.equal(out, torch.tensor([2.0, 0.0, 1.5]))


class _FakeBar:
    """Records what ProgressCallback does with its bar."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.postfixes, self.closed = total, desc, 0, [], False

    def update(self, k):
        self.n += k

    def set_postfix(self, info, refresh=True):
        self.postfixes.append(dict(info))

    def close(self):
        self.closed = True


class InfoEM(PlainEM):
    def progress_info(self):
        return {"it": self.iteration}


def test_progress_callback_drives_one_bar_per_run(monkeypatch):
    import sirf_ddip.utils.progress as progress_module
    from sirf_ddip.recon.callbacks import ProgressCallback

    bars = []

    def fake_progress(iterable=None, total=None, desc=None, enabled=None):
        bars.append(_FakeBar(total, desc))
        return bars[-1]

    monkeypatch.setattr(progress_module, "progress", fake_progress)
    ds = DenseDataStep()
    r = InfoEM()
    r.set_objective_function(ds)
    r.set_num_subsets(1)
    r.set_up(np.ones(ds.image_shape))
    r.set_current_estimate(np.ones(ds.image_shape))
    r.run(3, callbacks=[ProgressCallback(desc="EM")])
    (bar,) = bars
    assert (bar.total, bar.desc, bar.n, bar.closed) == (3, "EM", 3, True)
    assert bar.postfixes == [{"it": 1}, {"it": 2}, {"it": 3}]
    r.run(2, callbacks=[ProgressCallback()])   # a second run gets its own bar, named after the algorithm
    assert len(bars) == 2 and bars[1].desc == "InfoEM" and bars[1].n == 2 and bars[1].closed


def test_early_stopping_max_seconds_on_a_fake_clock(monkeypatch):
    import sirf_ddip.recon.callbacks as cb

    clock = {"t": 100.0}
    monkeypatch.setattr(cb.time, "perf_counter", lambda: clock["t"])

    class Ticking(PlainEM):
        def _update(self, x):
            clock["t"] += 1.5          # each sub-iteration "takes" 1.5 s
            return super()._update(x)

    ds = DenseDataStep()
    r = Ticking()
    r.set_objective_function(ds)
    r.set_num_subsets(1)
    r.set_up(np.ones(ds.image_shape))
    r.set_current_estimate(np.ones(ds.image_shape))
    r.run(100, callbacks=[cb.EarlyStopping(max_seconds=4.0)])
    assert r.iteration == 3            # 1.5, 3.0 s: go on; 4.5 s > 4 s: stop after the third
