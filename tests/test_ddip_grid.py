"""DDIPReconstructor on a PET grid other than the prior's training grid (recon/ddip.py + prior/grid.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.recon.ddip import DDIPReconstructor
from test_ddip_support import DenseDataStep, tiny_bundle

FAST = dict(t_start=30, num_steps=4, n_init=4, num_em=2, num_finetune=2, device="cpu", seed=3)


def _card(shape: int, vox: float) -> dict:
    return {"training": {"data": {"grid": {"shape": [9, shape, shape], "voxel_size": [2.0, vox, vox]}}}}


def _run(ds, bundle, mode: str) -> DDIPReconstructor:
    r = DDIPReconstructor(**FAST, prior_grid=mode)
    r.set_objective_function(ds)
    r.set_prior(bundle)
    r.set_anatomical_image(ds.mr.numpy())
    r.set_up(np.ones(ds.image_shape))
    for _ in range(4):
        r.update_current_estimate()
    return r


@pytest.mark.parametrize("shape,vox,mode", [(24, 2.0, "pad_crop"), (24, 1.6, "resample"), (12, 2.5, "resample")])
def test_ddip_runs_on_another_prior_grid(shape, vox, mode):
    """The network state lives on the prior grid, the output on the PET grid; a prior grid equal to the PET grid
    changes nothing (bit-identical to a run without grid information)."""
    ds = DenseDataStep()
    ds.grid = ImageGrid(ds.image_shape, (2.0, 2.0, 2.0))
    b = tiny_bundle()
    b.card = _card(shape, vox)
    r = _run(ds, b, mode)
    assert r.prior_grid is not None
    assert tuple(r._xt.shape[1:]) == (shape, shape)
    assert tuple(r.x.shape) == ds.image_shape and bool(torch.isfinite(r.x).all())
    same = tiny_bundle()
    same.card = _card(ds.image_shape[1], 2.0)
    r_id = _run(ds, same, mode)
    assert r_id.prior_grid is None
    del ds.grid
    r_none = _run(ds, same, mode)
    assert torch.equal(r_id.x, r_none.x)


def test_checkpoint_records_the_prior_grid(tmp_path):
    """A checkpoint holds x_t on the prior grid: resuming with another prior grid (same PET image shape, other
    training voxel size) is refused naming ``prior_grid``; the same grid resumes to the identical state."""
    from sirf_ddip.errors import InputFileError

    ds = DenseDataStep()
    ds.grid = ImageGrid(ds.image_shape, (2.0, 2.0, 2.0))
    b = tiny_bundle()
    b.card = _card(24, 1.6)
    r = _run(ds, b, "resample")
    r.save_checkpoint(tmp_path)
    again = DDIPReconstructor(**FAST, prior_grid="resample")
    again.set_objective_function(ds)
    again.set_prior(b)
    again.set_anatomical_image(ds.mr.numpy())
    again.set_up(np.ones(ds.image_shape))
    again.load_checkpoint(tmp_path)
    assert torch.equal(again._xt, r._xt) and torch.equal(again.x, r.x)
    other = tiny_bundle()
    other.card = _card(24, 1.7)
    o = DDIPReconstructor(**FAST, prior_grid="resample")
    o.set_objective_function(ds)
    o.set_prior(other)
    o.set_anatomical_image(ds.mr.numpy())
    o.set_up(np.ones(ds.image_shape))
    with pytest.raises(InputFileError, match="checkpoint made on prior grid") as e:
        o.load_checkpoint(tmp_path)
    assert e.value.key == "prior_grid"
