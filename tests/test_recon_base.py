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
    assert float(r.x.min()) > 0 and r.get_subiteration_num() == 6  # SIRF: k + 1 after k updates


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


def _plain_em(ds, n_sub=4, subsets=2):
    r = PlainEM()
    r.set_objective_function(ds)
    r.set_num_subsets(subsets)
    r.set_num_subiterations(n_sub)
    r.set_up(np.ones(ds.image_shape))
    return r


def _em_by_hand(ds, x, n, subsets):
    """n sub-iterations of EM written out independently: x ← x · A_sᵀ(y_s / (A_s x + a_s)) / A_sᵀ 1."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    rows = torch.arange(ds.A.shape[0])
    for k in range(n):
        r = rows[rows % subsets == k % subsets]
        A = ds.A[r]
        x = x * (A.T @ (ds.y[r] / (A @ x + ds.a[r]))) / (A.T @ torch.ones(len(r), dtype=torch.float64))
    return x.reshape(ds.image_shape)


def test_process_always_runs_all_subiterations_from_subiteration_one():
    """SIRF/STIR: process() loops sub-iterations 1..N whatever ran before (IterativeReconstruction.cxx:414)."""
    ds = DenseDataStep()
    r = _plain_em(ds)
    start = np.ones(ds.image_shape)
    r.set_current_estimate(start)
    r.update_current_estimate()                  # one update before process(): process still runs 4, from subset 0
    r.set_current_estimate(start)
    r.process(progress=False)
    first = r.x.clone()
    torch.testing.assert_close(first, _em_by_hand(ds, start, 4, 2), rtol=1e-12, atol=0)
    assert r.get_subiteration_num() == 5
    r.set_current_estimate(start)                # the next frame from the same start: the same image again
    r.process(progress=False)
    torch.testing.assert_close(r.x, first, rtol=0, atol=0)


def test_update_changes_the_image_in_place_and_numbers_follow_stir():
    ds = DenseDataStep()
    r = _plain_em(ds)
    assert r.get_subiteration_num() == 1
    x = np.ones(ds.image_shape)
    for k in range(3):
        assert r.update(x) is x
        assert r.get_subiteration_num() == k + 2
    np.testing.assert_allclose(x, _em_by_hand(ds, np.ones(ds.image_shape), 3, 2).numpy(), rtol=1e-12)
    r.update_current_estimate()                  # the held image keeps being updated
    np.testing.assert_allclose(x, _em_by_hand(ds, np.ones(ds.image_shape), 4, 2).numpy(), rtol=1e-12)
    r.set_current_estimate(np.ones(ds.image_shape))  # ends the hold
    r.update_current_estimate()
    np.testing.assert_allclose(x, _em_by_hand(ds, np.ones(ds.image_shape), 4, 2).numpy(), rtol=1e-12)


def test_reconstruct_fills_the_image_and_returns_none():
    ds = DenseDataStep()
    r = _plain_em(ds, n_sub=3)
    x = np.ones(ds.image_shape)
    assert r.reconstruct(x) is None
    np.testing.assert_allclose(x, _em_by_hand(ds, np.ones(ds.image_shape), 3, 2).numpy(), rtol=1e-12)


def test_set_input_needs_the_objective_and_subset_bookkeeping():
    from sirf_ddip.errors import ConfigError

    r = PlainEM()
    with pytest.raises(NotSetUpError, match="objective function needs to be set before calling set_input"):
        r.set_input(object())
    r.set_objective_function(DenseDataStep())
    with pytest.raises(ConfigError, match="does not accept new measured data"):
        r.set_input(object())
    r.set_num_subsets(2)
    r.set_current_subset_num(1)
    with pytest.raises(ValueError, match="out of range"):
        r.set_current_subset_num(2)
    with pytest.warns(UserWarning, match="recorded only"):
        r.set_maximum_relative_change(2.0)


def test_recon_base_does_not_import_the_sirf_backend():
    """Layering: recon/base.py reaches backends/ only inside as_datastep (no import at module level)."""
    import subprocess
    import sys

    code = ("import sys, sirf_ddip.recon.base, sirf_ddip.recon.osem, sirf_ddip.recon.cil; "
            "print([m for m in sys.modules if m.startswith('sirf_ddip.backends')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_ddip_process_after_a_finished_run_starts_a_new_identical_run():
    """DDIP: a finished run + process() = a new run with the same seeds; an image set after the run seeds it."""
    from test_ddip_support import DenseDataStep as DDIPDense
    from test_ddip_support import tiny_bundle

    from sirf_ddip import DDIPReconstructor

    ds = DDIPDense(shape=(2, 16, 16), nbins=800)
    bundle = tiny_bundle(use_mr=False)

    def make():
        r = DDIPReconstructor(num_steps=2, t_start=20, n_init=2, num_finetune=1, num_em=1, use_mr=False,
                              device="cpu", slab_batch=4, finetune_slabs=1)
        r.set_prior(bundle)
        r.set_objective_function(ds)
        r.set_up(np.ones(ds.image_shape))
        return r

    r = make()
    r.process(progress=False)
    first = r.get_output().copy()
    r.process(progress=False)
    np.testing.assert_array_equal(r.get_output(), first)
    seed = np.full(ds.image_shape, float(first.mean()))
    r.set_current_estimate(seed)                    # after the run: seeds the next one
    r.process(progress=False)
    fresh = make()
    fresh.set_current_estimate(seed)                # before the first step: seeds the warm start
    fresh.process(progress=False)
    np.testing.assert_array_equal(r.get_output(), fresh.get_output())
    assert np.abs(r.get_output() - first).max() > 1e-4
