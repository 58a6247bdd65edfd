"""PET/MR scaling: exact inverse maps, fit behaviour, spec round trip."""

import numpy as np
import pytest
import torch

from sirf_ddip.prior.scaling import MRScaler, PETScaler

from _prior_helpers import blobs


def test_roundtrip_and_fixed_points():
    pet, _ = blobs((8, 24, 24))
    s = PETScaler().fit(pet)
    assert s.scale > 0
    net = s.to_net(pet.astype(np.float64))
    np.testing.assert_allclose(s.from_net(net), pet, rtol=0, atol=1e-12)
    assert s.to_net(0.0) == -1.0 and s.to_net(s.scale) == pytest.approx(1.0)
    t = torch.from_numpy(pet)
    assert torch.allclose(s.from_net(s.to_net(t)), t, atol=1e-5)
    # the reference level is the 99th percentile of the smoothed image inside the head mask
    sm = s.smoothed(pet.astype(np.float64))
    assert s.scale == pytest.approx(np.percentile(sm[s.head_mask(pet)], 99.0))


def test_fit_is_scale_equivariant_and_noise_robust():
    pet, _ = blobs((8, 24, 24), seed=3)
    s1 = PETScaler().fit(pet)
    s2 = PETScaler().fit(37.0 * pet)
    assert s2.scale == pytest.approx(37.0 * s1.scale, rel=1e-6)
    np.testing.assert_allclose(s2.to_net(37.0 * pet), s1.to_net(pet), atol=1e-5)
    noisy = pet + np.random.default_rng(0).normal(0, 0.3, pet.shape).astype(np.float32)
    assert PETScaler().fit(noisy).scale == pytest.approx(s1.scale, rel=0.1)


def test_spec_roundtrip_and_errors():
    s = MRScaler({"percentile": 95.0}).fit(blobs((6, 16, 16))[1])
    d = s.to_dict()
    assert d["kind"] == "mr" and d["percentile"] == 95.0 and d["scale"] == s.scale
    s2 = MRScaler.from_dict(d)
    assert s2.scale == s.scale
    with pytest.raises(ValueError, match="kind"):
        PETScaler.from_dict(d)
    with pytest.raises(RuntimeError, match="not fitted"):
        PETScaler().to_net(1.0)
    with pytest.raises(ValueError, match="unknown spec"):
        PETScaler({"percentil": 99})
    with pytest.raises(ValueError, match="no positive signal"):
        PETScaler().fit(np.zeros((4, 8, 8)))
    fixed = PETScaler({"method": "fixed", "scale": 2.0}).fit(np.ones((3, 4, 4)))
    assert fixed.scale == 2.0 and fixed.to_net(2.0) == 1.0
