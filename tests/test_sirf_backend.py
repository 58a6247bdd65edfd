"""SirfLogLikelihood on the numpy stand-in of sirf.STIR (tests/sirf_standin.py): the adapter logic without SIRF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sirf_standin as sirf
from sirf_ddip.backends.sirf import (SirfLogLikelihood, SirfFeatureError, SirfNotReadyError, SirfObjectError,
                                     make_acquisition_model, objective_prior, set_image_data_processor, sirf_kind)
from sirf_ddip.errors import GeometryMismatchError, UnsupportedDataError
from sirf_ddip.recon.base import as_datastep
from sirf_ddip.recon.em import em_update

S = 7  # subsets (28 views -> 4 views each)


def _phantom(img: sirf.ImageData) -> np.ndarray:
    nz, ny, nx = img.shape
    yy, xx = np.mgrid[:ny, :nx]
    c = (ny - 1) / 2
    body = ((yy - c) / (0.4 * ny)) ** 2 + ((xx - c) / (0.33 * nx)) ** 2 <= 1
    hot = (yy - c + 3) ** 2 + (xx - c - 2) ** 2 <= 9
    arr = body * 1.0 + hot * 3.0
    return np.repeat(arr[None], nz, 0).astype(np.float32)


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path, monkeypatch):
    """The stand-in's OSMAPOSL writes ``_<k>.hv`` files as STIR does with an empty prefix: keep them out of the
    working folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def problem():
    """Prompts, mult factors, additive term, acquisition model and initial image on 'StandIn Small'."""
    rng = np.random.default_rng(7)
    sirf.AcquisitionData.set_storage_scheme("memory")
    acq = sirf.AcquisitionData("StandIn Small")
    image = acq.create_uniform_image(1.0)
    truth = image.clone().fill(_phantom(image))
    mult = acq.get_uniform_copy(1.0).fill(rng.uniform(0.5, 1.5, acq.shape).astype(np.float32))
    add = acq.get_uniform_copy(0.0).fill(rng.uniform(0.05, 0.2, acq.shape).astype(np.float32))
    am = make_acquisition_model("ray_tracing", num_tangential_LORs=3, stir=sirf)
    am.set_acquisition_sensitivity(sirf.AcquisitionSensitivityModel(mult))
    am.set_additive_term(add)
    am.set_up(acq, image)
    prompts = acq.clone().fill(rng.poisson(am.forward(truth).as_array()).astype(np.float32))
    yield {"prompts": prompts, "mult": mult, "add": add, "am": am, "image": image, "truth": truth}
    sirf.AcquisitionData.set_storage_scheme("file")


def _objective(p):
    return sirf.make_Poisson_loglikelihood(p["prompts"], acq_model=p["am"])


def _numpy_model(p):
    """Independent numpy evaluation of A (sparse G), m, a for one plane-stack."""
    G = p["am"]._G.toarray().astype(np.float64)
    m = p["mult"].as_array()[0].astype(np.float64)
    a = p["add"].as_array()[0].astype(np.float64)
    y = p["prompts"].as_array()[0].astype(np.float64)
    n_views, n_tang = y.shape[1:]
    return G, m, a, y, n_views, n_tang


def _rows(views, n_tang):
    return np.concatenate([np.arange(v * n_tang, (v + 1) * n_tang) for v in views])


def _stir_views(n_views: int, s: int, num_subsets: int) -> np.ndarray:
    """STIR's subset ``s`` for the ray-tracing matrix with 90/180-degree view symmetries (n_views % 4 == 0):
    basic views ``0..n/4`` with ``v % S == s``, each with ``n/2 - v, n/2 + v, n - v``
    (find_basic_vs_nums_in_subset.cxx:45-53), written out here independently of the stand-in."""
    out = set()
    for v in range(n_views // 4 + 1):
        if v % num_subsets == s:
            out.update(w for w in (v, n_views // 2 - v, n_views // 2 + v, n_views - v) if 0 <= w < n_views)
    return np.array(sorted(out))


def test_subsets_are_stir_symmetry_aware():
    """28 views, 7 subsets: subset 1 is {1, 13, 15, 27} (STIR), not {1, 8, 15, 22} (plain s mod S)."""
    assert sirf.subset_views(28, 0, 7).tolist() == [0, 7, 14, 21]
    assert sirf.subset_views(28, 1, 7).tolist() == [1, 13, 15, 27]
    for s in range(7):
        np.testing.assert_array_equal(sirf.subset_views(28, s, 7), _stir_views(28, s, 7))
    assert sorted(np.concatenate([sirf.subset_views(28, s, 7) for s in range(7)]).tolist()) == list(range(28))


# ------------------------------------------------------------------------------------------- EM quantities
def test_subset_sensitivities_match_numpy_and_are_cached(problem):
    obj = _objective(problem)
    ds = SirfLogLikelihood.from_objective(obj, num_subsets=S)
    ds.set_template(problem["image"])
    G, m, *_rest, n_views, n_tang = _numpy_model(problem)
    total = np.zeros(G.shape[1])
    for s in range(S):
        rows = _rows(_stir_views(n_views, s, S), n_tang)
        ref = G[rows].T @ m[0].ravel()[rows]
        got = ds.sensitivity(s).numpy()[0].ravel()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.max())
        total += ref
    np.testing.assert_allclose(ds.sensitivity(None).numpy()[0].ravel(), total, rtol=1e-5, atol=1e-5 * total.max())
    assert ds.sensitivity(3) is ds.sensitivity(3)  # cached
    assert ds.set_up_count == 1 and obj.set_up_count == 1
    assert float(ds.sensitivity(None).max()) > 0 and float((ds.sensitivity(None) == 0).sum()) > 0  # FOV edge


def test_set_num_subsets_resets_up_the_objective(problem):
    obj = _objective(problem)
    ds = SirfLogLikelihood.from_objective(obj, image_template=problem["image"], num_subsets=S)
    s7 = ds.sensitivity(0).clone()
    ds.set_num_subsets(4)
    assert obj.get_num_subsets() == 4
    s4 = ds.sensitivity(0)  # the stand-in raises if the objective was not set up again for 4 subsets
    assert obj.set_up_count == 2
    assert not torch.allclose(s7, s4)  # 7 views vs 4 views per subset
    np.testing.assert_allclose(sum(ds.sensitivity(s) for s in range(4)).numpy(),
                               ds.sensitivity(None).numpy(), rtol=1e-6)
    ds.set_num_subsets(4)  # unchanged: no new set-up
    ds.sensitivity(1)
    assert obj.set_up_count == 2


def test_em_numerator_matches_numpy(problem):
    ds = SirfLogLikelihood.from_objective(_objective(problem), image_template=problem["image"], num_subsets=S)
    G, m, a, y, n_views, n_tang = _numpy_model(problem)
    x = torch.from_numpy(_phantom(problem["image"]) * 0.9 + 0.1)
    for s in (0, 4):
        rows = _rows(_stir_views(n_views, s, S), n_tang)
        mm, aa, yy = m[0].ravel()[rows], a[0].ravel()[rows], y[0].ravel()[rows]
        yhat = mm * (G[rows] @ x.numpy()[0].ravel().astype(np.float64) + aa)
        ref = G[rows].T @ (mm * yy / yhat)
        got = ds.backprojected_ratio(x, s).numpy()[0].ravel()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * ref.max())
    # gradient = numerator - sensitivity, and the full gradient equals the objective's (no prior)
    full = ds.gradient(x).numpy()
    ref_grad = _objective(problem)
    ref_grad.set_num_subsets(1)
    ref_grad.set_up(problem["image"])
    np.testing.assert_allclose(full, ref_grad.gradient(ds.from_tensor(x)).as_array(), rtol=1e-4,
                               atol=1e-4 * np.abs(full).max())


def test_log_likelihood_is_poisson_term_even_with_prior(problem):
    obj = _objective(problem)
    prior = sirf.QuadraticPrior().set_penalisation_factor(0.5)
    obj.set_prior(prior)
    with pytest.warns(UserWarning, match="prior"):
        ds = SirfLogLikelihood.from_objective(obj, image_template=problem["image"])
    G, m, a, y, *_ = _numpy_model(problem)
    x = torch.from_numpy(_phantom(problem["image"]) + 0.5)
    yhat = m[0].ravel() * (G @ x.numpy()[0].ravel().astype(np.float64) + a[0].ravel())
    yy = y[0].ravel()
    ref = float(np.sum(np.where(yy > 0, yy * np.log(yhat), 0)) - yhat.sum())
    assert ds.value(x) == pytest.approx(ref, rel=1e-6)
    assert obj.value(ds.from_tensor(x)) < ds.value(x) - 1  # the objective itself includes the prior


def _run_standin_osmaposl(problem, init: np.ndarray, n_sub: int):
    obj = _objective(problem)
    rec = sirf.OSMAPOSLReconstructor()
    rec.set_objective_function(obj)
    rec.set_num_subsets(S)
    rec.set_num_subiterations(n_sub)
    rec.set_input(problem["prompts"])
    image = problem["image"].clone().fill(init)
    rec.set_up(image)
    rec.set_current_estimate(image)
    rec.process()
    return rec.get_output().as_array()


def test_datastep_em_update_loop_equals_standin_osmaposl(problem):
    """STIR's update (divide with small_num, subset order 0..S-1) vs recon.em.em_update, uniform start."""
    ref = _run_standin_osmaposl(problem, np.ones(problem["image"].shape, np.float32), 2 * S)
    ds = SirfLogLikelihood.from_objective(_objective(problem), image_template=problem["image"], num_subsets=S)
    x = torch.ones(ds.image_shape)
    for k in range(2 * S):
        x = em_update(ds, x, k % S)
    err = np.abs(x.numpy() - ref).max() / ref.max()
    assert err <= 1e-5, err
    assert ref.max() > 1.5  # it did reconstruct something


def test_osem_reconstructor_equals_standin_osmaposl(problem):
    """sirf_ddip.OSEMReconstructor driven with stand-in SIRF objects == stand-in OSMAPOSL, 2 it x 7 subsets."""
    from sirf_ddip import OSEMReconstructor

    init = np.ones(problem["image"].shape, np.float32)
    ref = _run_standin_osmaposl(problem, init, 2 * S)
    obj = _objective(problem)
    rec = OSEMReconstructor()
    rec.set_objective_function(obj)  # as_datastep -> SirfLogLikelihood.from_objective
    rec.set_num_subsets(S)
    rec.set_num_subiterations(2 * S)
    rec.set_input(problem["prompts"])
    image = problem["image"].clone().fill(init)
    rec.set_up(image)
    rec.set_current_estimate(image)
    rec.process(progress=False)
    out = rec.get_output()
    assert isinstance(out, sirf.ImageData)
    assert out.voxel_sizes() == problem["image"].voxel_sizes()
    assert obj.get_num_subsets() == S
    err = np.abs(out.as_array() - ref).max() / ref.max()
    assert err <= 1e-5, err


def test_osem_initial_positivity_matches_stir_osmaposl(problem):
    """set_up(image) thresholds the set-up image in place, as OSMAPOSL (OSMAPOSLReconstruction.cxx:291-292)."""
    from sirf_ddip.recon.osem import OSEMReconstructor

    init = _phantom(problem["image"])  # zeros outside the body
    init[0, 0, 0] = -1.0
    ours, theirs = problem["image"].clone().fill(init), problem["image"].clone().fill(init)
    rec = OSEMReconstructor()
    rec.set_objective_function(_objective(problem))
    rec.set_up(ours)
    ref = sirf.OSMAPOSLReconstructor()
    ref.set_objective_function(_objective(problem))
    ref.set_up(theirs)
    np.testing.assert_array_equal(ours.as_array(), theirs.as_array())
    floor = init[init > 0].min() * 1e-6
    assert ours.as_array()[0, 0, 0] == pytest.approx(floor, rel=1e-6)


# ------------------------------------------------------------------------------------------- conversion
def test_conversion_preserves_geometry_and_copies(problem):
    img = problem["image"].clone()
    img.initialise((1, 33, 33), (2.5, 3.0, 3.0), (1.0, -2.0, 4.0))
    img.fill(_phantom(img))
    ds = SirfLogLikelihood.from_objective(_objective(problem))
    with pytest.raises(SirfNotReadyError, match="template"):
        ds.image_shape
    with pytest.raises(GeometryMismatchError, match="voxel sizes"):  # template vs the model's image domain
        SirfLogLikelihood.from_objective(_objective(problem), acq_model=problem["am"], image_template=img)
    ds.set_template(img)
    t = ds.to_tensor(img)
    assert t.dtype == torch.float32 and tuple(t.shape) == (1, 33, 33)
    img.asarray()[0, 0, 0] = 123.0  # the tensor does not alias SIRF's buffer
    assert float(t[0, 0, 0]) != 123.0
    out = ds.from_tensor(t * 2)
    assert out is not img and isinstance(out, sirf.ImageData)
    assert out.voxel_sizes() == (2.5, 3.0, 3.0) and out._origin == (1.0, -2.0, 4.0) and out.modality == "PT"
    np.testing.assert_array_equal(out.as_array(), 2 * t.numpy())
    assert img.as_array()[0, 5, 5] == _phantom(img)[0, 5, 5]  # template untouched
    with pytest.raises(GeometryMismatchError, match="shape"):
        ds.from_tensor(torch.zeros(1, 32, 33))
    other = img.clone()
    other.initialise((1, 33, 33), (2.5, 2.0, 2.0))
    with pytest.raises(GeometryMismatchError, match="voxel sizes"):
        ds.to_tensor(other)


def test_template_from_set_up_model_and_first_image(problem):
    ds = SirfLogLikelihood.from_acquisition_model(problem["am"], problem["prompts"], num_subsets=S)
    assert ds.image_shape == problem["image"].shape  # from acq_model.domain_geometry()
    ds2 = SirfLogLikelihood.from_objective(_objective(problem))
    ds2.to_tensor(problem["image"])  # adopts the first image as template
    assert ds2.image_shape == (1, 33, 33)


# ------------------------------------------------------------------------------------------- operators
def test_forward_backward_through_acquisition_model(problem):
    am = problem["am"]
    ds = SirfLogLikelihood.from_acquisition_model(am, problem["prompts"], num_subsets=S)
    x = torch.from_numpy(_phantom(problem["image"]))
    ad = ds.forward(x, 2)
    ref = am.forward(problem["truth"], subset_num=2, num_subsets=S)
    np.testing.assert_allclose(ad.as_array(), ref.as_array(), rtol=1e-6)
    assert sirf_kind(ad) == "AcquisitionData"
    # backward of the subset data equals A_s^T m_s y_s computed in numpy
    G, m, _a, _y, n_views, n_tang = _numpy_model(problem)
    rows = _rows(_stir_views(n_views, 2, S), n_tang)
    yv = ad.as_array()[0, 0].ravel().astype(np.float64)
    # SIRF's subset forward leaves S a + b (here m a) in the other views (stir_x.cpp:520-566)
    other = np.setdiff1d(np.arange(n_views * n_tang), rows)
    np.testing.assert_allclose(yv[other], (m[0].ravel() * _a[0].ravel())[other], rtol=1e-6)
    ref_bp = G[rows].T @ (m[0].ravel()[rows] * yv[rows])
    np.testing.assert_allclose(ds.backward(ad, 2).numpy()[0].ravel(), ref_bp, rtol=1e-4, atol=1e-5 * ref_bp.max())
    np.testing.assert_allclose(ds.backward(torch.from_numpy(ad.as_array()), 2).numpy(),
                               ds.backward(ad, 2).numpy(), rtol=1e-6)
    full = ds.forward(x)
    assert full.as_array().min() > 0  # additive term everywhere
    ds_obj = SirfLogLikelihood.from_objective(_objective(problem), image_template=problem["image"])
    with pytest.raises(SirfNotReadyError, match="acquisition model"):
        ds_obj.forward(x)


def test_set_input_replaces_objective_data_and_read_only_prompts_work(problem, tmp_path):
    path = str(tmp_path / "prompts.npz")
    problem["prompts"].write(path)
    sirf.AcquisitionData.set_storage_scheme("file")
    ro = sirf.AcquisitionData(path)
    with pytest.raises(sirf.error, match="read-only"):
        ro.fill(1.0)
    obj = _objective(problem)
    ds = SirfLogLikelihood.from_objective(obj, acq_model=problem["am"], acq_data=problem["prompts"],
                                     image_template=problem["image"])
    ds.sensitivity(0)
    ds.set_prompts(ro)  # what reconstructor.set_input does
    assert obj._ad is ro
    x = torch.ones(ds.image_shape)
    ds.backprojected_ratio(x, 0)
    assert obj.set_up_count == 2  # the objective was set up again for the new data
    bad = sirf.AcquisitionData("StandIn Tiny")
    with pytest.raises(GeometryMismatchError, match="dimensions"):
        ds.set_prompts(bad)


# ------------------------------------------------------------------------------------------- errors
def test_wrong_kind_of_sirf_object_is_a_clear_error(problem):
    with pytest.raises(SirfObjectError, match="got a AcquisitionData.*make_Poisson_loglikelihood"):
        SirfLogLikelihood.from_objective(problem["prompts"])
    with pytest.raises(SirfObjectError, match="AcquisitionModel"):
        SirfLogLikelihood.from_objective(problem["am"])
    with pytest.raises(TypeError, match="cannot use a .*AcquisitionData as objective"):
        as_datastep(problem["prompts"])
    with pytest.raises(SirfObjectError, match="acq_data must be"):
        SirfLogLikelihood.from_acquisition_model(problem["am"], problem["image"])
    ds = SirfLogLikelihood.from_objective(_objective(problem), image_template=problem["image"])
    with pytest.raises(SirfObjectError, match="expected a sirf.STIR ImageData, got a AcquisitionData"):
        ds.to_tensor(problem["prompts"])


def test_non_pet_modality_is_rejected(problem):
    nm = problem["image"].clone()
    nm.set_modality("NM")
    with pytest.raises(UnsupportedDataError, match="modality is 'NM'"):
        SirfLogLikelihood.from_objective(_objective(problem), image_template=nm)
    ds = SirfLogLikelihood.from_objective(_objective(problem), image_template=problem["image"])
    with pytest.raises(UnsupportedDataError, match="modality"):
        ds.to_tensor(nm)


def test_make_acquisition_model_kinds(monkeypatch):
    am = make_acquisition_model("ray_tracing", 3, stir=sirf)
    assert am.get_num_tangential_LORs() == 3
    with pytest.raises(SirfFeatureError, match="SIRF_HAS_Parallelproj is False"):
        make_acquisition_model("parallelproj", stir=sirf)
    monkeypatch.setattr(sirf.config, "SIRF_HAS_Parallelproj", True)
    monkeypatch.setattr(sirf, "AcquisitionModelUsingParallelproj", sirf.AcquisitionModelUsingMatrix, raising=False)
    assert isinstance(make_acquisition_model("parallelproj", stir=sirf), sirf.AcquisitionModel)
    with pytest.raises(ValueError, match="unknown acquisition model kind"):
        make_acquisition_model("joseph", stir=sirf)


# ------------------------------------------------------------------------------------------- DDIP
def test_ddip_with_sirf_objects_returns_sirf_image(problem):
    from test_ddip_support import tiny_bundle

    from sirf_ddip import DDIPReconstructor

    rec = DDIPReconstructor(num_steps=1, t_start=10, n_init=1, num_finetune=1, num_em=1, num_subsets=1,
                            use_mr=False, device="cpu", slab_batch=4, finetune_slabs=1)
    rec.set_prior(tiny_bundle(use_mr=False))
    rec.set_objective_function(_objective(problem))
    rec.set_input(problem["prompts"])
    rec.set_up(problem["image"])
    rec.initialise()
    rec.process(progress=False)
    out = rec.get_output()
    assert isinstance(out, sirf.ImageData)
    assert out.shape == problem["image"].shape and out.voxel_sizes() == problem["image"].voxel_sizes()
    arr = out.as_array()
    assert np.isfinite(arr).all() and arr.max() > 0


def test_drop_in_example_fails_clearly_without_sirf(tmp_path):
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("sirf") is not None:
        pytest.skip("sirf is installed: the example runs for real (tests/test_sirf_real.py territory)")
    script = Path(__file__).resolve().parents[1] / "examples" / "sirf_drop_in.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "cannot import sirf.STIR" in r.stderr and "conda-forge" in r.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- SIRF's edges
def test_origin_is_part_of_the_image_geometry(problem):
    """STIR compares has_same_characteristics (origin included): a shifted image of the same size is refused."""
    ds = SirfLogLikelihood.from_objective(_objective(problem), acq_model=problem["am"])
    shifted = problem["image"].clone()
    shifted.initialise(problem["image"].shape, problem["image"].voxel_sizes(), (0.0, 6.0, 0.0))
    with pytest.raises(GeometryMismatchError, match="different positions"):
        ds.to_tensor(shifted)


def test_model_never_set_up_works_for_em_and_refuses_projections(problem):
    """SIRF's objective sets up STIR's projectors, not the model's templates (stir_x.cpp:641-649)."""
    am = make_acquisition_model("ray_tracing", 3, stir=sirf)
    am.set_acquisition_sensitivity(sirf.AcquisitionSensitivityModel(problem["mult"]))
    am.set_additive_term(problem["add"])
    obj = sirf.make_Poisson_loglikelihood(problem["prompts"], acq_model=am)
    with pytest.raises(sirf.error, match="null handle"):
        am.domain_geometry().voxel_sizes()
    ds = SirfLogLikelihood.from_objective(obj, acq_model=am, image_template=problem["image"], num_subsets=S)
    ref = SirfLogLikelihood.from_objective(_objective(problem), image_template=problem["image"], num_subsets=S)
    x = torch.from_numpy(_phantom(problem["image"]) + 0.5)
    np.testing.assert_allclose(ds.backprojected_ratio(x, 3).numpy(), ref.backprojected_ratio(x, 3).numpy(), rtol=1e-6)
    assert am.acq_templ is None and am.img_templ is None  # still not set up
    with pytest.raises(SirfNotReadyError, match="never set up.*acq_model.set_up"):
        ds.forward(x)


def test_listmode_objective_is_rejected_by_class(problem, tmp_path):
    path = str(tmp_path / "lm.l.hdr")
    sirf.standin_write_listmode(path, problem["prompts"], np.array([0, 1]), np.array([0.0, 1.0]),
                                np.array([True, True]))
    obj = sirf.make_Poisson_loglikelihood(sirf.ListmodeData(path),
                                          "LinearModelForMeanAndListModeDataWithProjMatrixByBin", problem["am"])
    with pytest.raises(SirfObjectError, match="listmode objectives are not supported.*ListmodeToSinograms"):
        SirfLogLikelihood.from_objective(obj)
    with pytest.raises(SirfObjectError, match="listmode"):
        as_datastep(obj)


def test_prior_set_on_the_cpp_side_is_seen_through_get_prior(problem):
    obj = _objective(problem)
    obj.set_prior(sirf.QuadraticPrior().set_penalisation_factor(0.5))
    del obj.prior  # as for a prior that reached the C++ objective without SIRF's Python set_prior
    with pytest.warns(UserWarning, match="prior"):
        ds = SirfLogLikelihood.from_objective(obj, image_template=problem["image"])
    x = torch.from_numpy(_phantom(problem["image"]) + 0.5)
    img = ds.from_tensor(x)
    assert ds.value(x) == pytest.approx(obj.value(img) + obj.get_prior().value(img), rel=1e-9)
    assert objective_prior(_objective(problem)) is None  # null handle: no prior


def test_parallelproj_subsets_warn(problem, monkeypatch):
    class AcquisitionModelUsingParallelproj(sirf.AcquisitionModelUsingMatrix):
        _symmetric_views = False

    am = AcquisitionModelUsingParallelproj()
    am.set_up(problem["prompts"], problem["image"])
    obj = sirf.make_Poisson_loglikelihood(problem["prompts"], acq_model=am)
    with pytest.warns(UserWarning, match="projects every view for every subset.*get_subset"):
        SirfLogLikelihood.from_objective(obj, acq_model=am, num_subsets=4)
    with pytest.warns(UserWarning, match="SIRF#1324"), pytest.raises(sirf.error, match="not implemented"):
        set_image_data_processor(am, object())


def test_set_input_before_objective_is_an_error(problem):
    from sirf_ddip import OSEMReconstructor
    from sirf_ddip.recon.base import NotSetUpError

    for rec in (OSEMReconstructor(), sirf.OSMAPOSLReconstructor()):
        with pytest.raises((NotSetUpError, sirf.error), match="objective function needs to be set before"):
            rec.set_input(problem["prompts"])


@pytest.mark.slow
def test_drop_in_example_runs_end_to_end_on_the_standin(tmp_path):
    """examples/sirf_drop_in.py --standin: the SIRF script (objective before set_input) to the end, and the
    listmode template checked against the mult factors' geometry."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "sirf_drop_in.py"
    fast = ["--device", "cpu", "--set", "num_steps=2", "--set", "n_init=7", "--set", "num_finetune=1",
            "--set", "num_em=1"]  # no MR: the shipped no-MR prior
    r = subprocess.run([sys.executable, str(script), "--standin", "--out", str(tmp_path / "o"), *fast],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "o"
    rec = json.loads((out / "run_record.json").read_text())
    assert rec["summary"]["osem_vs_osmaposl_rel_l2"] <= 2e-6
    ddip = sirf.ImageData(str(out / "ddip.hv"))
    assert ddip.shape == sirf.ImageData(str(out / "standin_data" / "init.hv")).shape
    assert np.isfinite(ddip.as_array()).all() and ddip.as_array().max() > 0
    # listmode on a template of another geometry than the mult factors: refused before binning
    tiny = tmp_path / "tiny.hs"
    sirf.AcquisitionData("StandIn Tiny").write(str(tiny))
    r = subprocess.run([sys.executable, str(script), "--standin", "--out", str(tmp_path / "lm"), "--data",
                        str(out / "standin_data"), "--listmode", str(tiny), "--template", str(tiny), "--mr-phantom",
                        *fast],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "bin the listmode on the geometry of the mult factors" in r.stderr
