"""DDIPReconstructor on a tiny dense-matrix likelihood with a tiny MR-conditioned prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sirf_ddip.errors import ConfigError, DataValueError, GeometryMismatchError
from sirf_ddip.recon.ddip import DDIPReconstructor
from sirf_ddip.recon.em import em_update
from test_ddip_support import DenseDataStep, make_ddip, tiny_bundle

FAST = dict(t_start=30, num_steps=4, n_init=4, num_em=2, num_finetune=2, device="cpu", seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny networks run far faster single-threaded on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ds():
    return DenseDataStep()


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def make(ds, bundle, mr=True, **kw):
    return make_ddip(ds, bundle, FAST, mr=mr, **kw)


def test_lora_starts_as_identity_and_prior_is_untouched(ds, bundle):
    r = make(ds, bundle)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    m = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([10, 10])
    with torch.no_grad():
        base = bundle.network(x, t, m)
        adapted = r.network(x, t, m)
    assert float(base.abs().max()) > 1e-3           # the test network is not the all-zero MONAI init
    torch.testing.assert_close(adapted, base, rtol=0, atol=1e-6)
    r.run(1)
    with torch.no_grad():
        assert torch.equal(bundle.network(x, t, m), base)     # the shared prior was deep-copied
        assert float((r.network(x, t, m) - base).abs().max()) > 1e-5   # fine-tuning changed the copy


def test_volume_eps_matches_prior_slab_inference(ds, bundle):
    """Our slab batching/folding equals the prior's own whole-volume inference (``predict_eps``)."""
    from sirf_ddip.prior.slabs import predict_eps

    r = make(ds, bundle, slab_batch=1)
    r.initialise()
    t = r.timesteps[0]
    a = float(r.schedule.alphas_cumprod[t])
    ours = r.prior.eps(r._xt, t)
    with torch.no_grad():
        ref = predict_eps(r.network, r._xt, t, r._mr_net, batch_size=5, pad_value=-math.sqrt(a))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_finetune_off_beta_inf_image_step_returns_prior_x0(ds, bundle):
    r = make(ds, bundle, finetune=False, beta=math.inf, beta_final=None)
    r.initialise()
    xt = r._xt.clone()
    t = r.timesteps[0]
    eps = r.prior.eps(xt, t)
    x0_prior = r.schedule.tweedie_x0(xt, eps, t).clamp(*r.config.x0_clamp)
    r.update_current_estimate()
    expected = r.pet_scaler.from_net(x0_prior).double()
    assert float(expected.std()) > 0
    torch.testing.assert_close(r._x_img, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.x, expected, rtol=1e-5, atol=1e-5)


def test_beta_zero_is_plain_osem(ds, bundle):
    """β → 0 (finetune off): the HQS image is exactly OSEM continued from the warm start."""
    r = make(ds, bundle, finetune=False, beta=0.0, beta_final=None, num_subsets=2, num_em=3, num_steps=3,
             em_start="previous")
    r.process(progress=False)
    x = torch.ones(ds.image_shape, dtype=ds.dtype)
    for k in range(4 + 3 * 2 * 3):       # n_init=4, S=2 → 2 OSEM iterations (4 sub-its), then 3 steps × K=2 × 3
        x = em_update(ds, x, k % 2)
    torch.testing.assert_close(r._x_img, x, rtol=1e-10, atol=1e-10)
    # the output is that image, through the network range (clamped)
    lo, hi = r.config.x0_clamp
    torch.testing.assert_close(r.x, r.pet_scaler.from_net(r.pet_scaler.to_net(x.float()).clamp(lo, hi)).double(),
                               rtol=1e-5, atol=1e-5)


def test_beta_zero_em_from_x0(ds, bundle):
    """em_start = x0 (default), β = 0: the image step is K·N_em plain EM updates from the prior's x̂0."""
    r = make(ds, bundle, finetune=False, beta=0.0, beta_final=None, num_em=2)
    r.initialise()
    xt = r._xt.clone()
    t = r.timesteps[0]
    x0_prior = r.schedule.tweedie_x0(xt, r.prior.eps(xt, t), t).clamp(*r.config.x0_clamp)
    r.update_current_estimate()
    x = r.pet_scaler.from_net(x0_prior).double().clamp_min(1e-3 * r.pet_scaler.scale)
    for _ in range(2 * 2):
        x = em_update(ds, x, None)
    torch.testing.assert_close(r._x_img, x, rtol=1e-5, atol=1e-6)


def test_pet_scale_is_fitted_inside_the_fov(bundle):
    """A hot artefact where the sensitivity is ~0 (FOV edge) must not set the network scale."""
    d = DenseDataStep(shape=(4, 16, 16), nbins=800)
    d.A[:, 0] = 0.0                                   # voxel [0, 0, 0] is outside the FOV
    d._sens = {}
    r = DDIPReconstructor(**{**FAST, "scale_smooth_vox": 0.0})
    r.set_objective_function(d)
    r.set_prior(bundle)
    r.set_anatomical_image(d.mr.numpy())
    r.set_up(np.ones(d.image_shape))
    img = d.x_true.clone()
    img[0, 0, 0] = 1000.0
    fitted = r.fit_pet_scaler(img)
    ref = bundle.pet_scaling.fit(d.x_true.numpy() * (d.sensitivity(None).numpy() > 0.1 * float(d.sensitivity().max())))
    assert fitted.scale == pytest.approx(ref.scale, rel=1e-6)
    assert bundle.pet_scaling.fit(img.numpy()).scale > 2 * fitted.scale     # unmasked, the artefact wins


def test_finetuning_changes_the_output_and_fits_the_data(ds, bundle):
    r_ft = make(ds, bundle)
    r_ft.process(progress=False)
    r_no = make(ds, bundle, finetune=False, beta=math.inf, beta_final=None)
    r_no.process(progress=False)
    out_ft, out_no = r_ft.get_output(), r_no.get_output()
    assert np.abs(out_ft - out_no).max() > 1e-3
    from sirf_ddip.prior.adapters import adapter_state_dict

    b_norm = sum(float(v.abs().sum()) for k, v in adapter_state_dict(r_ft.network).items() if "lora_B" in k)
    assert b_norm > 0
    # the adapted network is pulled towards the HQS (data) image: closer to it than the unadapted prior sample
    target = r_ft._x_img.numpy()
    assert np.mean((out_ft - target) ** 2) < np.mean((out_no - target) ** 2)
    rep = r_ft.timing_report()
    assert rep["network_forward"] > 0 and rep["finetune_backward"] > 0 and rep["projector"] > 0
    assert r_ft.counts["finetune_steps"] == 4 * 2 and r_ft.counts["em_updates"] == 4 * 2 * 2


def test_minibatch_and_chunking_give_the_same_result(ds, bundle):
    """All slabs in one autograd batch == slab-by-slab chunks with gradient accumulation."""
    a = make(ds, bundle, slab_batch=16, num_steps=2)
    b = make(ds, bundle, slab_batch=1, num_steps=2)
    a.process(progress=False)
    b.process(progress=False)
    np.testing.assert_allclose(a.get_output(), b.get_output(), rtol=1e-4, atol=1e-4)


def test_seeded_determinism(ds, bundle):
    outs = []
    for seed in (5, 5, 6):
        r = make(ds, bundle, seed=seed, finetune_slabs=1, num_steps=2)
        r.process(progress=False)
        outs.append(r.get_output())
    assert np.array_equal(outs[0], outs[1])
    assert np.abs(outs[0] - outs[2]).max() > 1e-4


@pytest.mark.parametrize("optimizer", ["reset", "persist"])
def test_resume_equals_uninterrupted(ds, bundle, tmp_path, optimizer):
    """Bit-identical resume; with ``finetune_optimizer: persist`` the AdamW moments travel in the checkpoint
    (a resume that restarted them would step the adapters by lr*sign(g) again and differ)."""
    kw = dict(finetune_slabs=1, num_subsets=2, finetune_optimizer=optimizer)
    full = make(ds, bundle, **kw)
    full.process(progress=False)
    first = make(ds, bundle, **kw)
    first.run(2)
    first.save_checkpoint(tmp_path / "ck")
    second = make(ds, bundle, **kw)
    second.load_checkpoint(tmp_path / "ck")
    assert second.iteration == 2 and second.remaining() == 2
    second.process(progress=False)
    assert np.array_equal(second.get_output(), full.get_output())
    # a checkpoint of other settings is refused, naming the key
    other = make(ds, bundle, beta=0.5, **kw)
    with pytest.raises(ConfigError, match="beta"):
        other.load_checkpoint(tmp_path / "ck")


def test_run_stops_after_last_step_and_callbacks(ds, bundle, tmp_path):
    from sirf_ddip.recon.callbacks import CheckpointCallback, LoggingCallback

    r = make(ds, bundle, num_steps=2)
    r.run(10, callbacks=[LoggingCallback(tmp_path / "log.jsonl"), CheckpointCallback(tmp_path / "ck", every=1)])
    assert r.iteration == 2 and r.remaining() == 0
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"t": 0' in lines[-1]
    assert (tmp_path / "ck" / "ddip_checkpoint.pt").is_file()
    with pytest.raises(StopIteration):
        r.update_current_estimate()


@pytest.mark.parametrize("nz", [1, 2])
def test_volumes_with_fewer_than_three_planes(nz, bundle):
    d = DenseDataStep(shape=(nz, 16, 16), nbins=800)
    r = make(d, bundle, num_steps=2)
    r.process(progress=False)
    out = r.get_output()
    assert out.shape == (nz, 16, 16) and np.isfinite(out).all() and out.min() >= 0
    # folding: for one plane the volume ε is the mean of the 3 channels of the replicated slab
    if nz == 1:
        xt = r._xt
        t = 5
        eps = r.prior.eps(xt, t)
        with torch.no_grad():
            s = r.prior.eps_slabs(xt, t, torch.tensor([0]))
        torch.testing.assert_close(eps[0], s[0].mean(0), rtol=1e-5, atol=1e-6)


def test_set_current_estimate_replaces_the_warm_start(ds, bundle):
    r = make(ds, bundle, num_steps=1)
    x = ds.x_true.numpy() * 2 + 0.1
    r.set_current_estimate(x)
    r.initialise()
    assert r.counts["init_em"] == 0
    torch.testing.assert_close(r._x_img, torch.as_tensor(x))
    with pytest.raises(DataValueError, match="negative"):
        r.set_current_estimate(-x)


def test_bad_inputs(ds, bundle):
    with pytest.raises(ConfigError, match="no MR image"):
        make(ds, bundle, mr=False)
    r = DDIPReconstructor(**FAST)
    r.set_objective_function(ds)
    r.set_prior(bundle)
    r.set_anatomical_image(np.ones((3, 16, 16)))
    with pytest.raises((GeometryMismatchError, ValueError), match="shape"):
        r.set_up(np.ones(ds.image_shape))
    bad = ds.mr.numpy().copy()
    bad[0, 0, 0] = np.nan
    r.set_anatomical_image(bad)
    with pytest.raises(DataValueError, match="NaN"):
        r.set_up(np.ones(ds.image_shape))
    with pytest.raises(ConfigError, match="use_mr"):
        make(ds, bundle, use_mr=False)
    with pytest.raises(ConfigError, match="unknown"):
        DDIPReconstructor(lora_rnk=4)
    with pytest.raises(ConfigError, match="t_start"):
        make(ds, bundle, t_start=5000)
    with pytest.raises(ConfigError, match="eta"):
        DDIPReconstructor(eta=2.0)
    with pytest.raises(ConfigError, match="num_finetune"):
        DDIPReconstructor(num_finetune=0)


def test_prior_without_mr(ds):
    b = tiny_bundle(use_mr=False)
    r = make(ds, b, mr=False, num_steps=2)
    r.process(progress=False)
    assert np.isfinite(r.get_output()).all()
