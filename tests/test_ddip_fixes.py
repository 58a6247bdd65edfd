"""DDIP against the authors' sampler and fine-tuning (issue 9): DDS η, LoRA init and adapter rule, data-driven
fine-tuning target, subset-invariant β, FOV masking, the log-likelihood diagnostic and the final EM stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sirf_ddip.prior.schedule import NoiseSchedule
from sirf_ddip.physics.likelihood import PoissonLogLikelihood
from sirf_ddip.prior.adaptation import finetune_loss
from sirf_ddip.recon.hqs import hqs_image_step
from sirf_ddip.recon.em import em_update
from test_ddip_support import DenseDataStep, make_ddip, tiny_bundle

FAST = dict(t_start=30, num_steps=4, n_init=4, num_em=2, num_finetune=1, device="cpu", seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def make(ds, bundle, **kw):
    return make_ddip(ds, bundle, FAST, **kw)


# ---------------------------------------------------------------------- 1. the DDS / DDIP η update
def _alpha_bar_numpy(t: int) -> float:
    """ᾱ_t of the linear schedule (1e-4 … 0.02 over 1000 steps), computed independently of NoiseSchedule."""
    betas = np.linspace(1e-4, 0.02, 1000)
    return 1.0 if t < 0 else float(np.prod(1.0 - betas[: t + 1]))


@pytest.mark.parametrize("t, t_prev", [(600, 588), (100, 96), (4, 0), (0, -1)])
def test_dds_eta_step_matches_the_closed_form(t, t_prev):
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0, eps, z = (torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    a_t = _alpha_bar_numpy(t)
    xt = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    eta = 0.85
    out = s.ddim_step(xt, eps, t, t_prev, eta=eta, noise=z, eta_mode="dds")
    a_p = _alpha_bar_numpy(t_prev)
    expected = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * (eta * z + math.sqrt(1 - eta ** 2) * eps)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_dds_fresh_noise_share_is_eta_squared_and_ddim_is_not():
    """DDS: the fresh share of the step's noise variance is η² = 72 % at η = 0.85; Song's σ_t at stride 12 from
    t = 600 gives only a few per cent (the issue's finding)."""
    s = NoiseSchedule()
    like = torch.zeros(1, dtype=torch.float64)
    a_p = _alpha_bar_numpy(588)
    _, c_eps, c_noise = s.ddim_coefficients(600, 588, 0.85, like, "dds")
    assert float(c_noise) ** 2 / (1 - a_p) == pytest.approx(0.85 ** 2, rel=1e-9)
    assert (float(c_eps) ** 2 + float(c_noise) ** 2) == pytest.approx(1 - a_p, rel=1e-9)
    _, _, sigma = s.ddim_coefficients(600, 588, 0.85, like, "ddim")
    a_t = _alpha_bar_numpy(600)
    song = 0.85 ** 2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    assert float(sigma) ** 2 == pytest.approx(song, rel=1e-9)
    assert float(sigma) ** 2 / (1 - a_p) < 0.1


def test_reconstructor_uses_the_configured_eta_mode(bundle):
    ds = DenseDataStep()
    outs = {}
    for mode in ("dds", "ddim"):
        r = make(ds, bundle, finetune=False, eta_mode=mode)
        r.run(2)
        outs[mode] = r._xt.clone()
    assert float((outs["dds"] - outs["ddim"]).abs().max()) > 1e-2


# ---------------------------------------------------------------------- 2. LoRA init and adapter rule
def test_lora_init_std_authors_and_peft(bundle):
    import copy

    from sirf_ddip.prior.adapters import _lora_layers, add_lora, reset_adapters

    for init in ("authors", "peft"):
        net = copy.deepcopy(bundle.network)
        add_lora(net, rank=4, init=init)
        reset_adapters(net, generator=torch.Generator().manual_seed(1))
        n = 0
        for _, mod in _lora_layers(net):
            for key in mod.lora_A:
                a = mod.lora_A[key].weight.detach()
                assert float(mod.lora_B[key].weight.detach().abs().max()) == 0.0
                if a.numel() < 500:
                    continue
                n += 1
                want = 0.25 if init == "authors" else 1.0 / math.sqrt(3.0 * a[0].numel())
                assert float(a.std()) == pytest.approx(want, rel=0.12), (init, tuple(a.shape))
        assert n >= 3


def test_authors_adapter_rule_freezes_time_embedding_biases(bundle):
    import copy

    from sirf_ddip.prior.adapters import add_lora, lora_parameters

    net = copy.deepcopy(bundle.network)
    add_lora(net, rank=2, rule="authors")
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    biases = [n for n, _ in net.named_parameters() if n.endswith("bias") and "lora_" not in n]
    temb = [n for n in biases if "time_emb_proj" in n]
    norms = [n for n in biases if ".norm" in n]
    assert temb and norms
    assert not (set(temb) & trained)
    assert set(norms) <= trained
    assert any("skip_connection" in n and "lora_A" in n for n in trained) or \
        not any("skip_connection.conv" in n for n, _ in net.named_modules())
    assert len(lora_parameters(net)) == len(trained)
    legacy = copy.deepcopy(bundle.network)
    add_lora(legacy, rank=2, rule="legacy")
    ltrained = {n for n, p in legacy.named_parameters() if p.requires_grad}
    assert any("time_emb_proj" in n and n.endswith("bias") for n in ltrained)
    assert not any(".norm" in n for n in ltrained)


# ---------------------------------------------------------------------- 3. the fine-tuning target
def test_data_target_gradient_is_the_data_correction_even_when_slabs_disagree():
    g = torch.Generator().manual_seed(0)
    x0s = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fold = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)   # disagrees with every slab
    hqs = fold + 0.1 * torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    finetune_loss(x0s, hqs, fold, "data").backward()
    torch.testing.assert_close(x0s.grad, -2.0 * (hqs - fold) / x0s.numel(), rtol=1e-12, atol=1e-15)
    x0s.grad = None
    finetune_loss(x0s, hqs, fold, "fold").backward()    # the old target also pulls towards the slab average
    torch.testing.assert_close(x0s.grad, 2.0 * (x0s.detach() - hqs) / x0s.numel())
    x0s.grad = None
    finetune_loss(x0s, hqs, fold, "data", consistency=0.5).backward()
    torch.testing.assert_close(x0s.grad, (-2.0 * (hqs - fold) + 1.0 * (x0s.detach() - fold)) / x0s.numel())


def test_targets_coincide_when_slabs_agree_exactly():
    g = torch.Generator().manual_seed(1)
    fold = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    hqs = fold + 0.2 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    a = fold.clone().requires_grad_(True)
    b = fold.clone().requires_grad_(True)
    la, lb = finetune_loss(a, hqs, fold, "data"), finetune_loss(b, hqs, fold, "fold")
    la.backward()
    lb.backward()
    assert float(la.detach()) == pytest.approx(float(lb.detach()), rel=1e-12)
    torch.testing.assert_close(a.grad, b.grad)


def test_finetuning_moves_the_prior_towards_the_data_when_slabs_agree(bundle):
    """3 planes = one slab (slabs agree exactly): one fine-tuning step brings the network's x̂0 closer to the
    HQS image it was given, and the move is along the data's correction."""
    ds = DenseDataStep(shape=(3, 16, 16))
    r = make(ds, bundle, lr=2e-2, beta=1.0)
    r.initialise()
    t = r.timesteps[0]
    xt = r._xt.clone()
    x0_before = r.schedule.tweedie_x0(xt, r.prior.eps(xt, t), t).clamp(*r.config.x0_clamp)
    r._finetune(xt, t)
    target = r._to_net(r._x_img)
    x0_after = r.schedule.tweedie_x0(xt, r.prior.eps(xt, t), t).clamp(*r.config.x0_clamp)
    d0 = float(((x0_before - target) ** 2).sum())
    d1 = float(((x0_after - target) ** 2).sum())
    assert d1 < 0.97 * d0
    move, corr = (x0_after - x0_before).reshape(-1), (target - x0_before).reshape(-1)
    assert float(torch.dot(move, corr) / (move.norm() * corr.norm())) > 0.2


# ---------------------------------------------------------------------- 4. β is for the whole data
class DuplicatedDataStep(PoissonLogLikelihood):
    """The data of ``base`` split into ``S`` identical subsets, each one ``1/S`` of it (``A/S``, ``y/S``).

    Every subset's EM update is then exactly the full-data MLEM update, so a correct subset HQS step has exactly
    the fixed point (and iterates) of the full-data one.
    """

    def __init__(self, base: DenseDataStep, S: int):
        self.b = base
        self.S = int(S)
        self.image_shape, self.device, self.dtype = base.image_shape, base.device, base.dtype

    @property
    def num_subsets(self):
        return self.S

    def set_num_subsets(self, n):
        if int(n) != self.S:
            raise ValueError("DuplicatedDataStep: the number of subsets is fixed")

    def forward(self, x, subset=None):
        f = self.b.forward(x)
        return f / self.S if subset is not None else f.repeat(self.S) / self.S

    def backward(self, y, subset=None):
        if subset is not None:
            return self.b.backward(y) / self.S
        return sum(self.b.backward(c) for c in y.reshape(self.S, -1)) / self.S

    def sensitivity(self, subset=None):
        s = self.b.sensitivity(None)
        return s / self.S if subset is not None else s

    def backprojected_ratio(self, x, subset=None):
        r = self.b.backprojected_ratio(x, None)
        return r / self.S if subset is not None else r

    def value(self, x, subset=None):
        return self.b.value(x)

    def to_tensor(self, image):
        return self.b.to_tensor(image)

    def from_tensor(self, tensor, template=None):
        return self.b.from_tensor(tensor, template)


def test_subset_hqs_has_the_same_fixed_point_as_full_data():
    base = DenseDataStep(counts=5e3)
    S = 4
    dup = DuplicatedDataStep(base, S)
    z = 0.5 * base.x_true + 0.3                     # a prior image away from the data's ML image
    x0 = torch.ones(base.image_shape, dtype=base.dtype)
    beta = 0.3 * float(base.sensitivity(None).mean())   # data and penalty both matter at this β
    n = 60
    full = hqs_image_step(dup, x0, z, beta, n, [None] * n)
    sub = hqs_image_step(dup, x0, z, beta, n, [k % S for k in range(n)])
    torch.testing.assert_close(sub, full, rtol=1e-9, atol=1e-12)
    scaled = hqs_image_step(dup, x0, z, S * beta, n, [None] * n)   # what β·S (the old fusion) converges to
    rel = float((scaled - full).abs().mean() / full.abs().mean())
    assert rel > 0.05, rel


# ---------------------------------------------------------------------- 5. FOV masking
def _ds_with_dead_voxels():
    ds = DenseDataStep()
    nz, ny, nx = ds.image_shape
    yy, xx = torch.meshgrid(torch.arange(ny) - (ny - 1) / 2, torch.arange(nx) - (nx - 1) / 2, indexing="ij")
    outside = (yy ** 2 + xx ** 2 > (0.45 * nx) ** 2).expand(nz, ny, nx).reshape(-1)
    ds.A[:, outside] = 0.0
    return ds, outside.reshape(ds.image_shape)


def test_output_is_zero_outside_the_fov(bundle):
    ds, outside = _ds_with_dead_voxels()
    assert float(ds.sensitivity(None)[outside].abs().max()) == 0.0
    masked = make(ds, bundle, fov_mask=True)
    masked.process(progress=False)
    assert float(masked.x[outside].abs().max()) == 0.0
    assert float(masked.x[~outside].mean()) > 0.1
    free = make(ds, bundle, fov_mask=False)
    free.process(progress=False)
    assert float(free.x[outside].abs().max()) > 1e-3        # the network fills what no data constrain
    torch.testing.assert_close(masked.x[~outside], free.x[~outside])


# ---------------------------------------------------------------------- 6. the data-consistency diagnostic
def test_log_likelihood_diagnostic_and_final_em_stage(bundle):
    ds = DenseDataStep()
    r = make(ds, bundle, num_steps=3, loglik_every=1)
    r.initialise()
    warm = r.x.clone()
    r.process(progress=False)
    dc = r.data_consistency()
    assert dc["loglik_warm_start"] == pytest.approx(ds.value(warm), rel=1e-12)
    assert len(dc["loglik_per_step"]) == 3
    assert dc["loglik_output"] == pytest.approx(ds.value(r.x), rel=1e-7)
    assert dc["loglik_gain"] == pytest.approx(dc["loglik_output"] - dc["loglik_warm_start"], rel=1e-9)
    info = r.progress_info()
    assert info["loglik"] == pytest.approx(dc["loglik_output"], rel=1e-6)

    k = 4
    f = make(ds, bundle, num_steps=3, final_em=k, loglik_every=1)
    f.process(progress=False)
    dcf = f.data_consistency()
    assert dcf["loglik_per_step"] == dc["loglik_per_step"]          # same run up to the final stage
    x = r.x.clamp_min(1e-3 * float(r.pet_scaler.scale))
    for _ in range(k):
        x = em_update(ds, x, None)
    torch.testing.assert_close(f.x, x, rtol=1e-6, atol=1e-8)        # final_em_beta = 0: plain EM from the output
    assert dcf["loglik_final_em"] == pytest.approx(ds.value(f.x), rel=1e-9)
    assert dcf["loglik_final_em"] > dc["loglik_output"]              # EM increases the likelihood


@pytest.mark.parametrize("every, steps", [(2, [2, 4, 5]), (0, [5]), (10, [5])])
def test_log_likelihood_every_k_steps_and_always_at_the_end(bundle, every, steps):
    ds = DenseDataStep()
    ref = make(ds, bundle, num_steps=5, loglik_every=1)
    ref.process(progress=False)
    r = make(ds, bundle, num_steps=5, loglik_every=every)
    outs = []
    for _ in range(5):
        r.update_current_estimate()
        outs.append(r.x.clone())
    dc = r.data_consistency()
    assert r.loglik_steps == steps and dc["loglik_steps"] == steps
    assert len(dc["loglik_per_step"]) == len(steps)
    # each value is the output's log-likelihood after that step, computed directly; the last one is the output's
    for s, v in zip(steps, r.loglik_history):
        assert v == pytest.approx(float(ds.value(outs[s - 1])), rel=1e-12)
    assert dc["loglik_output"] == pytest.approx(float(ds.value(r.x)), rel=1e-12)
    assert r.progress_info()["loglik_step"] == steps[-1]
    # a diagnostic only: the image and the evaluated values are those of the every-step run
    torch.testing.assert_close(r.x, ref.x, rtol=0, atol=0)
    assert r.loglik_history == [ref.loglik_history[s - 1] for s in steps]


# ---------------------------------------------------------------------- the β schedule (beta_final)
def test_beta_schedule_closed_form():
    from sirf_ddip.recon.hqs import beta_schedule

    assert beta_schedule(10.0, None, 300, 600) == 10.0                 # constant when unset
    assert beta_schedule(10.0, 1.0, 600, 600) == pytest.approx(10.0, rel=1e-12)
    assert beta_schedule(10.0, 1.0, 0, 600) == pytest.approx(1.0, rel=1e-12)
    assert beta_schedule(10.0, 1.0, 300, 600) == pytest.approx(math.sqrt(10.0), rel=1e-12)  # geometric midpoint
    assert beta_schedule(10.0, 1.0, 150, 600) == pytest.approx(10.0 * 0.1 ** 0.75, rel=1e-12)
    with pytest.raises(ValueError):
        beta_schedule(math.inf, 1.0, 10, 600)


def test_reconstructor_uses_the_scheduled_beta_in_every_image_step(bundle, monkeypatch):
    import sirf_ddip.recon.image_step as image_step_mod
    from sirf_ddip.recon.hqs import beta_activity, beta_schedule

    seen = []
    real = image_step_mod.hqs_image_step

    def spy(ds, x, z, beta, num_em, subsets, timer=None):
        seen.append(beta)
        return real(ds, x, z, beta, num_em, subsets, timer=timer)

    monkeypatch.setattr(image_step_mod, "hqs_image_step", spy)
    ds = DenseDataStep()
    r = make(ds, bundle, num_steps=4, beta=8.0, beta_final=0.5)
    r.process(progress=False)
    g2 = float(r.pet_scaler.gain) ** 2
    want = [beta_schedule(8.0, 0.5, t, r.config.t_start) * g2 for t in r.timesteps]
    assert len(seen) == len(want) == 4
    assert seen == pytest.approx(want, rel=1e-12)
    assert seen[0] > seen[-1]                                          # loosens towards t = 0
    c = make(ds, bundle, num_steps=4, beta=8.0)
    assert c.beta_network == 8.0
    assert beta_activity(8.0, r.pet_scaler.gain) == pytest.approx(seen[0] * 8.0 / beta_schedule(
        8.0, 0.5, r.timesteps[0], r.config.t_start), rel=1e-12)


def test_beta_final_is_validated():
    from sirf_ddip.errors import ConfigError
    from sirf_ddip.recon.config import DDIPConfig

    with pytest.raises(ConfigError, match="beta_final"):
        DDIPConfig(beta_final=0.0)
    with pytest.raises(ConfigError, match="beta_final"):
        DDIPConfig(beta=math.inf, beta_final=1.0)
    assert DDIPConfig(beta_final=2.0).beta_final == 2.0


# ---------------------------------------------------------------------- SIRF reconstruct(image)
def test_reconstruct_writes_the_output_into_the_image_in_place(bundle):
    ds = DenseDataStep()
    a = make(ds, bundle, num_steps=2)
    image = np.full(ds.image_shape, 7.0, dtype=np.float32)
    back = a.reconstruct(image)
    assert back is image                                             # SIRF: the image itself holds the result
    np.testing.assert_allclose(image, a.get_output().numpy() if hasattr(a.get_output(), "numpy")
                               else np.asarray(a.get_output()), rtol=1e-6)
    assert not np.allclose(image, 7.0)
    b = make(ds, bundle, num_steps=2)                                # the template's values are not an estimate
    other = np.ones(ds.image_shape, dtype=np.float32)
    b.reconstruct(other)
    np.testing.assert_allclose(other, image, rtol=1e-6)


def test_ddim_x0_hqs_steers_with_the_data_fused_image(bundle):
    """``ddim_x0: hqs``: the output (and the DDIM step's x̂0) is the step's HQS image, clamped to the network range;
    ``network`` (0.2-0.4): the adapted network's x̂0, which differs from it. Unsmoothed correction here (the
    smoothed one, the 0.5 default, has its own test below)."""
    ds = DenseDataStep()
    h = make(ds, bundle, num_steps=2, ddim_x0="hqs", correction_sigma_vox=0.0)
    h.update_current_estimate()
    lo, hi = h.config.x0_clamp
    want = h.image_step.masked(h.prior.from_network(h.prior.to_network(h._x_img).clamp(lo, hi)).to(h.x.dtype))
    torch.testing.assert_close(h.x, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h._x0_net, h.prior.to_network(h._x_img).clamp(lo, hi))
    n = make(ds, bundle, num_steps=2, ddim_x0="network", correction_sigma_vox=0.0)
    n.update_current_estimate()
    torch.testing.assert_close(n._x_img, h._x_img)                   # same image step up to here
    assert float((n.x - h.x).abs().max()) > 1e-4


# ---------------------------------------------------------------------- smoothed data correction
def test_smooth_correction_keeps_constants_and_spreads_a_spike_as_a_gaussian():
    from sirf_ddip.prior.adaptation import smooth_correction

    c = torch.full((7, 9, 9), 0.3, dtype=torch.float64)
    torch.testing.assert_close(smooth_correction(c, 1.5), c)            # normalised: exact up to the end planes
    spike = torch.zeros(9, 21, 21, dtype=torch.float64)
    spike[4, 10, 10] = 1.0
    assert smooth_correction(spike, 0.0) is spike
    s = smooth_correction(spike, 1.0)
    # interior (the kernel, +-4 sigma, fits): the sampled 1D Gaussian (sigma 1 voxel) cubed, computed here
    k = np.exp(-0.5 * np.arange(-4, 5) ** 2)
    k /= k.sum()
    assert float(s[4, 10, 10]) == pytest.approx(k[4] ** 3, rel=1e-9)
    assert float(s[4, 10, 11]) == pytest.approx(k[4] ** 2 * k[5], rel=1e-9)
    assert float(s[4, 12, 9]) == pytest.approx(k[4] * k[6] * k[3], rel=1e-9)
    # at an end plane the normaliser restores the lost kernel mass: a spike there keeps its sum
    edge = torch.zeros(7, 21, 21, dtype=torch.float64)
    edge[0, 10, 10] = 1.0
    e = smooth_correction(edge, 1.0)
    assert float(e[0, 10, 10]) == pytest.approx(k[4] ** 3 / k[4:].sum(), rel=1e-9)


def test_correction_sigma_smooths_the_finetuning_target_and_the_hqs_image(bundle, monkeypatch):
    """``correction_sigma_vox > 0``: the fine-tuning loss sees ``fold(x̂0) + smooth(x_HQS − fold(x̂0))`` and
    ``ddim_x0: hqs`` steers with ``x̂0 + smooth(x_HQS − x̂0)``; 0 leaves both as they were."""
    import sirf_ddip.prior.adaptation as adaptation_mod

    seen = []
    real = adaptation_mod.finetune_loss

    def spy(x0s, hqs_s, fold_s, *a, **k):
        seen.append((hqs_s.detach().clone(), fold_s.detach().clone()))
        return real(x0s, hqs_s, fold_s, *a, **k)

    monkeypatch.setattr(adaptation_mod, "finetune_loss", spy)
    ds = DenseDataStep(shape=(3, 16, 16))
    r = make(ds, bundle, num_steps=2, correction_sigma_vox=1.0, ddim_x0="hqs")
    r.initialise()
    t = r.timesteps[0]
    x0 = r._tweedie(r._xt, r.prior.eps(r._xt, t), t)
    r._finetune(r._xt.clone(), t)
    hqs_s, fold_s = seen[-1]
    raw = r._to_net(r._x_img)
    planes = r.prior.slab_planes(3, r.prior.slab_indices(3))
    want = adaptation_mod.smooth_correction(raw - x0, 1.0)[planes]
    torch.testing.assert_close(hqs_s - fold_s, want, rtol=1e-5, atol=1e-6)
    assert float((hqs_s - fold_s - (raw - x0)[planes]).abs().max()) > 1e-3   # it is smoothed, not the raw one
    with pytest.raises(Exception, match="correction_sigma_vox"):
        make(ds, bundle, correction_sigma_vox=-1.0)


def test_correction_sigma_with_ddim_x0_hqs_steers_with_the_smoothed_image(bundle):
    """``ddim_x0: hqs`` with ``correction_sigma_vox``: the step's x̂0 is the adapted net's x̂0 plus the smoothed
    correction towards the HQS image (clamped), not the HQS image itself."""
    from sirf_ddip.prior.adaptation import smooth_correction

    ds = DenseDataStep(shape=(3, 16, 16))
    h = make(ds, bundle, num_steps=2, ddim_x0="hqs", correction_sigma_vox=1.0)
    h.initialise()
    t = h.timesteps[0]
    xt = h._xt.clone()
    h.update_current_estimate()
    lo, hi = h.config.x0_clamp
    x0_net = h._tweedie(xt, h.prior.eps(xt, t), t)  # adapted net
    raw = h.prior.to_network(h._x_img)
    want = (x0_net + smooth_correction(raw - x0_net, 1.0)).clamp(lo, hi)
    torch.testing.assert_close(h._x0_net, want, rtol=1e-5, atol=1e-5)
    assert float((h._x0_net - raw.clamp(lo, hi)).abs().max()) > 1e-3


def test_persistent_optimizer_carries_adam_moments_over_the_diffusion_steps(bundle):
    """``finetune_optimizer``. ``reset`` (the authors'): a fresh AdamW per diffusion step, so with K = 1 every
    parameter with a gradient moves by exactly lr (Adam's first step is lr*g/|g|), whatever the gradient.
    ``persist``: one AdamW for the run (step count = every fine-tuning step); its second step is Adam's closed form
    lr*m/sqrt(v), m = (0.09 g1 + 0.1 g2)/0.19, v = (0.000999 g1^2 + 0.001 g2^2)/0.001999 (betas 0.9 / 0.999, bias
    corrected), so a parameter whose gradient changed sign moves by < 0.75 lr, one that kept it by up to ~lr."""
    from sirf_ddip.prior.adapters import lora_parameters

    lr = 5e-4
    ds = DenseDataStep()
    for mode in ("reset", "persist"):
        r = make(ds, bundle, finetune_optimizer=mode, num_steps=3, weight_decay=0.0, lr=lr)
        params = lora_parameters(r.network)
        r.initialise()
        moves, grads = [], []
        for _ in range(2):
            before = torch.cat([p.detach().flatten() for p in params])
            r.update_current_estimate()
            moves.append(torch.cat([p.detach().flatten() for p in params]) - before)
            grads.append(torch.cat([p.grad.detach().flatten() if p.grad is not None else torch.zeros(p.numel())
                                    for p in params]))
        live = (grads[0].abs() > 1e-6) & (grads[1].abs() > 1e-6)
        assert int(live.sum()) > 100
        if mode == "reset":
            assert r.adaptation.optimizer is None
            for d, g in zip(moves, grads):   # (the gradients are the clipped ones AdamW used; its eps is 1e-8)
                torch.testing.assert_close(d[live], -lr * g[live] / (g[live].abs() + 1e-8), rtol=1e-3, atol=1e-9)
        else:
            assert all(int(st["step"]) == 2 for st in r.adaptation.optimizer.state.values())
            g = grads[0][live]
            torch.testing.assert_close(moves[0][live], -lr * g / (g.abs() + 1e-8), rtol=1e-3, atol=1e-9)
            g1, g2 = grads[0][live], grads[1][live]
            m = (0.09 * g1 + 0.1 * g2) / 0.19
            v = (0.000999 * g1 ** 2 + 0.001 * g2 ** 2) / 0.001999
            torch.testing.assert_close(moves[1][live], -lr * m / (v.sqrt() + 1e-8), rtol=1e-3, atol=1e-9)
            flipped = torch.sign(g1) != torch.sign(g2)
            assert int(flipped.sum()) >= 1
            assert float(moves[1][live][flipped].abs().max()) < 0.75 * lr


def test_log_likelihood_steps_survive_a_checkpoint(bundle, tmp_path):
    ds = DenseDataStep()
    whole = make(ds, bundle, num_steps=5, loglik_every=2)
    whole.process(progress=False)
    first = make(ds, bundle, num_steps=5, loglik_every=2)
    for _ in range(3):
        first.update_current_estimate()
    first.save_checkpoint(tmp_path / "ck")
    second = make(ds, bundle, num_steps=5, loglik_every=2)
    second.load_checkpoint(tmp_path / "ck")
    assert second.loglik_steps == [2]
    second.process(progress=False)
    assert second.loglik_steps == whole.loglik_steps == [2, 4, 5]
    assert second.loglik_history == whole.loglik_history
