"""DDIP on volumes with planes beyond the subject (issue 11): the prior runs only on the slabs holding planes
where the MR shows the subject; the other planes are reconstructed from the data alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sirf_ddip.errors import DataValueError
from sirf_ddip.prior.slabs import fold_slabs, slabs_touching
from sirf_ddip.recon.ddip import DDIPReconstructor
from test_ddip_support import DenseDataStep, make_ddip, one_torch_thread, tiny_bundle

FAST = dict(t_start=30, num_steps=4, n_init=4, num_em=2, num_finetune=1, device="cpu", seed=3)
SUBJECT = [3, 4, 5, 6]          # the planes (of 10) that hold the subject; 0-2 and 7-9 are empty


_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def _short_head_data() -> DenseDataStep:
    """10 planes, activity and MR only on planes 3-6 (a head shorter than the axial FOV); each bin sees one
    plane (direct sinograms), so that the data, like a scanner's, tell which planes are empty."""
    ds = DenseDataStep(shape=(10, 16, 16), nbins=3000)
    keep = torch.zeros(10, dtype=torch.bool)
    keep[SUBJECT] = True
    plane_of_voxel = torch.arange(10).repeat_interleave(16 * 16)
    plane_of_bin = torch.arange(ds.A.shape[0]) % 10
    ds.A = ds.A * (plane_of_bin.reshape(-1, 1) == plane_of_voxel.reshape(1, -1)) * 10.0
    ds.x_true = ds.x_true * keep.reshape(-1, 1, 1)
    ybar = ds.m * (ds.A @ ds.x_true.reshape(-1).to(ds.dtype) + ds.a)
    ds.y = torch.poisson(ybar, generator=torch.Generator().manual_seed(5))
    ds.mr = ds.mr * keep.reshape(-1, 1, 1)
    return ds


@pytest.fixture(scope="module")
def ds():
    return _short_head_data()


def make(ds, bundle, mr=True, **kw):
    return make_ddip(ds, bundle, FAST, mr=mr, **kw)


def test_slabs_touching_and_partial_fold_closed_form():
    planes = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    idx = slabs_touching(planes, 3)                 # slab i holds planes i, i+1, i+2
    assert idx.tolist() == [1, 2, 3, 4]
    covered = fold_slabs(torch.ones(4, 3, 1, 1, dtype=torch.float64), 8, idx)[:, 0, 0] > 0
    assert covered.tolist() == [False] + [True] * 6 + [False]
    vals = idx.to(torch.float64).reshape(-1, 1, 1, 1).expand(4, 3, 2, 2)   # slab k predicts the value k
    vol = fold_slabs(vals, 8, idx)[:, 0, 0]
    assert vol.tolist() == pytest.approx([0.0, 1.0, 1.5, 2.0, 3.0, 3.5, 4.0, 0.0])
    full = torch.arange(6, dtype=torch.float64).reshape(-1, 1, 1, 1).expand(6, 3, 2, 2)
    torch.testing.assert_close(fold_slabs(full, 8, torch.arange(6)), fold_slabs(full, 8))


def test_prior_planes_follow_the_mr_and_empty_planes_come_from_the_data(ds, bundle):
    r = make(ds, bundle)
    r.process(progress=False)
    expect = [k in SUBJECT for k in range(10)]
    assert r.prior_planes.tolist() == expect
    assert "4 of 10 planes (3-6" in r.prior_planes_summary()
    # only the 6 slabs holding a subject plane run: 2 volume passes per step + 2 fine-tuning slabs
    assert r.counts["slab_forwards"] == FAST["num_steps"] * (2 * 6 + 2)
    empty = ~torch.tensor(expect)
    torch.testing.assert_close(r.x[empty], r._x_img[empty])        # the data's own image there
    every = make(ds, bundle, prior_planes="all")
    every.process(progress=False)
    assert every.counts["slab_forwards"] == FAST["num_steps"] * (2 * 8 + 2)
    a_planes, a_all = float(r.x[empty].sum()), float(every.x[empty].sum())
    truth_total = float(ds.x_true.sum())
    assert a_planes < 0.5 * a_all, (a_planes, a_all)               # the untrained prior fills empty planes
    assert a_planes < 0.03 * truth_total, (a_planes, truth_total)   # the data alone keep them near-empty
    assert r.data_consistency()["loglik_output"] > every.data_consistency()["loglik_output"]


def test_all_planes_with_the_subject_is_unchanged(bundle):
    ds = DenseDataStep()                        # every plane holds the subject
    a = make(ds, bundle)
    a.process(progress=False)
    b = make(ds, bundle, prior_planes="all")
    b.process(progress=False)
    assert bool(a.prior_planes.all())
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)


def test_prior_without_mr_uses_the_warm_start(ds):
    r = make(ds, tiny_bundle(use_mr=False), mr=False)
    r.initialise()
    assert r.prior_planes.tolist() == [k in SUBJECT for k in range(10)]


def test_resume_keeps_the_planes_and_the_run_time(ds, bundle, tmp_path):
    full = make(ds, bundle)
    full.process(progress=False)
    part = make(ds, bundle)
    part.run(2)
    part.save_checkpoint(tmp_path)
    spent = part.timings["total"]
    res = make(ds, bundle)
    res.load_checkpoint(tmp_path)
    assert res.prior_planes.tolist() == part.prior_planes.tolist()
    assert res.timings["total"] == pytest.approx(spent)              # s/step covers the steps before the resume
    assert res.counts["slab_forwards"] == part.counts["slab_forwards"]
    res.process(progress=False)
    torch.testing.assert_close(res.x, full.x)


def test_mr_without_a_subject_is_a_named_error(ds, bundle):
    r = DDIPReconstructor(**FAST)
    r.set_objective_function(ds)
    r.set_prior(bundle)
    mr = ds.mr.numpy().copy()
    mr[:] = 0.0
    mr[5, 8, 8] = 100.0                         # one bright voxel: no plane shows a subject
    r.set_anatomical_image(mr)
    r.set_up(np.ones(ds.image_shape))
    with pytest.raises(DataValueError, match="prior_planes: all|MR"):
        r.process(progress=False)
