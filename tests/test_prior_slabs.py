"""2.5D slab inference: slab extraction/averaging and whole-volume prediction."""

import pytest
import torch
from torch import nn

from sirf_ddip.prior.schedule import NoiseSchedule
from sirf_ddip.prior.slabs import predict_eps, predict_x0, slabs_to_volume, volume_to_slabs


class PlaneNet(nn.Module):
    """A fake 'network': returns x_t * (1 + plane position k) + mr; lets us check slab bookkeeping exactly."""

    uses_mr = True
    slab = 3
    spatial_multiple = 4

    def forward(self, x, t, mr):
        assert x.shape[-1] % 4 == 0 and x.shape[-2] % 4 == 0
        k = torch.arange(3, dtype=x.dtype).reshape(1, 3, 1, 1)
        return x * (1 + k) + mr


def test_slabs_roundtrip_and_counts():
    vol = torch.randn(7, 5, 6)
    s = volume_to_slabs(vol)
    assert s.shape == (5, 3, 5, 6)
    assert torch.equal(s[2, 1], vol[3])
    torch.testing.assert_close(slabs_to_volume(s), vol)
    ones = torch.ones(5, 3, 1, 1)
    # plane counts 1,2,3,3,3,2,1 -> a slab of ones per position averages to ones
    torch.testing.assert_close(slabs_to_volume(ones), torch.ones(7, 1, 1))
    ramp = torch.zeros(5, 3, 1, 1)
    ramp[:, 1] = 1.0  # only the centre prediction is 1
    out = slabs_to_volume(ramp).flatten()
    expect = torch.tensor([0, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1 / 2, 0])
    torch.testing.assert_close(out, expect)
    with pytest.raises(ValueError):
        volume_to_slabs(torch.zeros(2, 4, 4))


def test_predict_eps_bookkeeping_padding():
    x = torch.randn(6, 10, 9)
    mr = torch.randn(6, 10, 9)
    eps = predict_eps(PlaneNet(), x, 5, mr, batch_size=2)
    # plane z gets mean over slabs containing it of x*(1+k)+mr, k = z - i
    Z = 6
    expect = torch.empty_like(x)
    for z in range(Z):
        ks = [z - i for i in range(Z - 2) if 0 <= z - i <= 2]
        expect[z] = sum(x[z] * (1 + k) + mr[z] for k in ks) / len(ks)
    torch.testing.assert_close(eps, expect)
    # fewer planes than the slab: padded by replication, cropped back
    e1 = predict_eps(PlaneNet(), x[:1], 5, mr[:1])
    torch.testing.assert_close(e1, x[:1] * 2 + mr[:1])  # the original plane sits at the slab centre (k = 1)
    with pytest.raises(ValueError, match="no MR"):
        predict_eps(PlaneNet(), x, 5, None)


def test_predict_x0_is_tweedie():
    class Bundle:
        schedule = NoiseSchedule()
        network = PlaneNet()

        class pet_scaling:
            lo = -1.0

        mr_scaling = None

    x = torch.randn(4, 8, 8)
    mr = torch.randn(4, 8, 8)
    x0 = predict_x0(Bundle, x, 200, mr)
    eps = predict_eps(PlaneNet(), x, 200, mr)
    torch.testing.assert_close(x0, Bundle.schedule.tweedie_x0(x, eps, 200))
