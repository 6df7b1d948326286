"""The engine's inference network (optimize.py) computes what the trained one does."""
from __future__ import annotations

import pytest
import torch

from icnet_ros.inference import optimize
from icnet_ros.model.icnet import PYRAMID_BINS, PyramidPoolingSum

# the released network's pyramid windows (kernel_h, kernel_w, stride_h, stride_w) for its 33x65 map
RELEASED_WINDOWS = ((33, 65, 33, 65), (17, 33, 16, 32), (13, 25, 10, 20), (8, 15, 5, 10))


@pytest.mark.parametrize("pool_contiguous_on", [(), ("cpu",)], ids=["in place", "contiguous copy"])
@pytest.mark.parametrize("windows", [(), RELEASED_WINDOWS], ids=["adaptive", "released windows"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels last"])
def test_native_pyramid_pooling_equals_the_trained_one_in_either_layout(monkeypatch, pool_contiguous_on, windows,
                                                                       layout):
    """Pooling a contiguous copy (what CUDA does: its channels-last pooling kernels are slow) gives the
    same sums and leaves the output in the input's layout, so the next convolution gets what it expects."""
    monkeypatch.setattr(optimize, "POOL_CONTIGUOUS_ON", pool_contiguous_on)
    trained = PyramidPoolingSum(PYRAMID_BINS, (33, 65) if windows else None, windows)
    native = optimize.NativePyramidPoolingSum(trained)
    for size in ((33, 65), (23, 45)):  # the released map, and the bundled models' 720-row one
        x = torch.randn(2, 8, *size, generator=torch.Generator().manual_seed(sum(size)))
        expected = trained(x)
        x = x.contiguous(memory_format=layout)
        out = native(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_one_pixel_level_upsamples_to_itself_bit_for_bit(dtype):
    """Why the pyramid may broadcast its one-bin level instead of upsampling it: the same numbers."""
    from icnet_ros.model.icnet import ALIGN_CORNERS

    pooled = torch.randn(2, 8, 1, 1, generator=torch.Generator().manual_seed(1)).to(dtype)
    upsampled = torch.nn.functional.interpolate(pooled, (23, 45), mode="bilinear", align_corners=ALIGN_CORNERS)
    assert torch.equal(upsampled, pooled.expand_as(upsampled))
