"""Shared layers: the depthwise convolution's hand-written backward and the one-pass frozen BN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBatchNorm2d

from decodet.models.layers import DepthwiseConv2d, FrozenBatchNorm2d


@pytest.mark.parametrize(
    ("shape", "kernel"),
    [((2, 6, 10, 10), 9), ((3, 4, 16, 12), 7), ((2, 5, 10, 10), (1, 15)), ((1, 3, 9, 7), (13, 1)), ((2, 4, 5, 5), 3)],
)
def test_depthwise_backward_equals_pytorch(shape, kernel):
    """Output and all three gradients equal the plain depthwise ``nn.Conv2d``'s (float64)."""
    torch.manual_seed(0)
    fast = DepthwiseConv2d(shape[1], kernel).double()
    ref = torch.nn.Conv2d(shape[1], shape[1], fast.kernel_size, padding=fast.padding, groups=shape[1]).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(*shape, dtype=torch.float64).transpose(2, 3).contiguous().transpose(2, 3)  # strided
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64)
    y1, y2 = fast(x1), ref(x2)
    torch.testing.assert_close(y1, y2)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad)


def test_depthwise_under_autocast_and_frozen_weights():
    """bf16 autocast computes in float32 (grads close to float32's); frozen weights get none."""
    torch.manual_seed(0)
    conv = DepthwiseConv2d(8, 9)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    ref = F.conv2d(x.detach(), conv.weight.detach(), conv.bias.detach(), padding=4, groups=8)
    torch.testing.assert_close(y, ref)
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    x.grad = None
    conv(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConv2d(4, 4)


def test_frozen_batch_norm_equals_torchvision():
    torch.manual_seed(0)
    ours, ref = FrozenBatchNorm2d(6), TvFrozenBatchNorm2d(6)
    state = {k: torch.rand_like(v) + 0.5 for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ours.load_state_dict(state)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), ref(x))
    assert set(ours.state_dict()) == set(ref.state_dict())
