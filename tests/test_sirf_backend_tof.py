"""SirfLogLikelihood with TOF data on the numpy stand-in of sirf.STIR (SIRF 3.10's TOF behaviour, see
``tests/sirf_standin.py``): TOF passes through the adapter, the EM quantities equal an independent numpy evaluation
with the stand-in's per-TOF-bin matrices, and terms of other TOF bins are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sirf_standin as sirf
from sirf_ddip.backends.sirf import SirfLogLikelihood, make_acquisition_model, num_tof_bins
from sirf_ddip.errors import GeometryMismatchError
from sirf_ddip.recon.em import em_update

S = 7
TOF = "StandIn Small TOF"


@pytest.fixture(autouse=True)
def _memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sirf.AcquisitionData.set_storage_scheme("memory")
    yield
    sirf.AcquisitionData.set_storage_scheme("file")


def _phantom(shape) -> np.ndarray:
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    c = (ny - 1) / 2
    body = ((yy - c) / (0.4 * ny)) ** 2 + ((xx - c) / (0.33 * nx)) ** 2 <= 1
    hot = (yy - c + 3) ** 2 + (xx - c - 2) ** 2 <= 9
    return np.repeat((body * 1.0 + hot * 3.0)[None], nz, 0).astype(np.float32)


def _problem(scanner=TOF, tof_mash_factor=1, seed=3):
    """TOF prompts with a non-TOF normalisation (broadcast over the TOF bins, as STIR does) and a TOF additive term."""
    rng = np.random.default_rng(seed)
    acq = sirf.AcquisitionData(scanner, tof_mash_factor=tof_mash_factor)
    non_tof = sirf.AcquisitionData(scanner, tof_mash_factor=0)
    image = acq.create_uniform_image(1.0)
    truth = image.clone().fill(_phantom(image.shape))
    mult = non_tof.get_uniform_copy(1.0).fill(rng.uniform(0.5, 1.5, non_tof.shape).astype(np.float32))
    add = acq.get_uniform_copy(0.0).fill(rng.uniform(0.01, 0.05, acq.shape).astype(np.float32))
    am = make_acquisition_model("ray_tracing", num_tangential_LORs=3, stir=sirf)
    am.set_acquisition_sensitivity(sirf.AcquisitionSensitivityModel(mult))
    am.set_additive_term(add)
    am.set_up(acq, image)
    prompts = acq.clone().fill(rng.poisson(am.forward(truth).as_array()).astype(np.float32))
    return {"acq": acq, "prompts": prompts, "mult": mult, "add": add, "am": am, "image": image, "truth": truth}


def test_standin_tof_data_follow_sirf():
    """AcquisitionData(scanner) defaults to tof_mash_factor=1 (TOF on a TOF scanner, cstir.cpp:965); 0 is non-TOF;
    STIR 6.4's set_tof_mash_factor refuses an even number of bins; non-TOF scanners ignore the factor."""
    assert sirf.AcquisitionData(TOF).dimensions() == (9, 1, 28, 33)
    assert sirf.AcquisitionData(TOF).get_tof_mash_factor() == 1
    assert sirf.AcquisitionData(TOF, tof_mash_factor=3).dimensions() == (3, 1, 28, 33)
    nt = sirf.AcquisitionData(TOF, tof_mash_factor=0)
    assert nt.dimensions() == (1, 1, 28, 33) and nt.get_tof_mash_factor() == 0
    assert sirf.AcquisitionData("StandIn Small", tof_mash_factor=3).get_tof_mash_factor() == 0
    with pytest.raises(sirf.error, match="odd"):
        sirf.AcquisitionData(TOF, tof_mash_factor=2)


def test_tof_projection_sums_to_the_non_tof_one():
    p = _problem()
    lin = p["am"].get_linear_acquisition_model()
    y = lin.forward(p["truth"]).as_array()
    q = _problem(tof_mash_factor=0)
    y0 = q["am"].get_linear_acquisition_model().forward(q["truth"]).as_array()
    assert y.shape == (9, 1, 28, 33) and y0.shape == (1, 1, 28, 33)
    np.testing.assert_allclose(y.sum(axis=0), y0[0], rtol=1e-6, atol=1e-6 * y0.max())
    assert y[4].max() < 0.9 * y0.max()  # the central TOF bin holds only part of each LOR


def test_tof_passes_through_the_adapter_and_em_matches_numpy():
    p = _problem()
    obj = sirf.make_Poisson_loglikelihood(p["prompts"], acq_model=p["am"])
    ds = SirfLogLikelihood.from_objective(obj, acq_model=p["am"], acq_data=p["prompts"], image_template=p["image"],
                                          num_subsets=S)
    assert num_tof_bins(p["prompts"]) == 9 and "tof_bins=9" in repr(ds)
    Gk = [g.toarray().astype(np.float64) for g in p["am"]._G]
    m = p["mult"].as_array()[0, 0].ravel().astype(np.float64)
    a = p["add"].as_array()[:, 0].reshape(9, -1).astype(np.float64)
    y = p["prompts"].as_array()[:, 0].reshape(9, -1).astype(np.float64)
    x = torch.from_numpy(_phantom(p["image"].shape) * 0.9 + 0.1)
    xv = x.numpy()[0].ravel().astype(np.float64)
    n_tang = 33
    for s in (0, 3):
        rows = np.concatenate([np.arange(v * n_tang, (v + 1) * n_tang) for v in sirf.subset_views(28, s, S)])
        sens = sum(Gk[k][rows].T @ m[rows] for k in range(9))  # non-TOF norm: every TOF bin
        np.testing.assert_allclose(ds.sensitivity(s).numpy()[0].ravel(), sens, rtol=1e-5, atol=1e-5 * sens.max())
        num = np.zeros_like(sens)
        for k in range(9):
            yhat = m[rows] * (Gk[k][rows] @ xv + a[k, rows])
            num += Gk[k][rows].T @ (m[rows] * np.where(yhat > 0, y[k, rows] / yhat, 0.0))
        np.testing.assert_allclose(ds.backprojected_ratio(x, s).numpy()[0].ravel(), num, rtol=1e-4,
                                   atol=1e-5 * num.max())
    fwd = ds.forward(x)
    assert fwd.dimensions() == (9, 1, 28, 33)
    back = ds.backward(fwd.as_array())  # a TOF array of the full shape
    assert tuple(back.shape) == (1, 33, 33) and float(back.sum()) > 0
    x1 = em_update(ds, x, 0)
    assert torch.isfinite(x1).all() and float(x1.sum()) > 0


def test_tof_osem_beats_non_tof_osem_on_the_same_counts():
    """The TOF data of a phantom reconstruct closer to it than their TOF sum, after the same OSEM iterations."""
    p = _problem(seed=5)
    summed = sirf.AcquisitionData(TOF, tof_mash_factor=0)
    summed = summed.clone().fill(p["prompts"].as_array().sum(axis=0, keepdims=True))
    q = _problem(tof_mash_factor=0)
    q["am"].set_additive_term(summed.get_uniform_copy(0.0).fill(p["add"].as_array().sum(axis=0, keepdims=True)))
    q["am"].set_up(summed, q["image"])
    truth = _phantom(p["image"].shape).astype(np.float64)
    err = {}
    for name, prompts, am in (("tof", p["prompts"], p["am"]), ("non-tof", summed, q["am"])):
        ds = SirfLogLikelihood.from_acquisition_model(am, prompts, image_template=p["image"], num_subsets=S)
        x = torch.ones(ds.image_shape)
        for k in range(4 * S):
            x = em_update(ds, x, k % S)
        err[name] = float(np.sqrt(((x.numpy() - truth) ** 2).mean()))
    assert err["tof"] < err["non-tof"], err


def test_terms_of_other_tof_bins_are_one_line_errors():
    p = _problem()
    non_tof = sirf.AcquisitionData(TOF, tof_mash_factor=0)
    with pytest.raises(GeometryMismatchError, match=r"is non-TOF but .* is 9 TOF bins.*prompts' TOF bins"):
        SirfLogLikelihood.from_acquisition_model(p["am"], non_tof.get_uniform_copy(1.0), image_template=p["image"])
    am = make_acquisition_model("ray_tracing", stir=sirf)
    am.set_additive_term(non_tof.get_uniform_copy(0.1))  # a non-TOF additive term for TOF prompts
    with pytest.raises(GeometryMismatchError, match=r"prompts is 9 TOF bins but the acquisition model's additive "
                                                    r"term is non-TOF"):
        SirfLogLikelihood.from_objective(sirf.make_Poisson_loglikelihood(p["prompts"], acq_model=p["am"]),
                                         acq_model=am, acq_data=p["prompts"])
    ds = SirfLogLikelihood.from_acquisition_model(p["am"], p["prompts"], image_template=p["image"])
    with pytest.raises(GeometryMismatchError, match="backward: array shape"):
        ds.backward(np.ones((1, 1, 28, 33), np.float32))
    with pytest.raises(GeometryMismatchError, match="backward: the data is non-TOF but the prompts is 9 TOF bins"):
        ds.backward(non_tof.get_uniform_copy(1.0))
    with pytest.raises(sirf.error, match="incompatible"):  # TOF factors of other TOF bins (STIR refuses)
        sirf.AcquisitionSensitivityModel(sirf.AcquisitionData(TOF, tof_mash_factor=3).get_uniform_copy(1.0)).set_up(
            p["prompts"])
