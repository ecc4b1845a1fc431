"""ResNet-D ("PResNet"): the DECO+ / RT-DETR backbone.

A ResNet with a deep stem (three 3x3 convs instead of one 7x7) whose down-sampling shortcuts average-pool
before their 1x1 conv (the "D" tweak). It returns the stride 8, 16 and 32 feature maps. Module and parameter
names follow the DECO+ release (``conv1.conv1_1``, ``layers.{i}.blocks.{j}.branch1``, ``short``, ...), so the
authors' state dicts load unchanged.

Every stride-2 op rounds up (``ceil(H / 2)``), so for any input size the stride-16 map is exactly ``ceil(H8 /
2)`` and the stride-32 map ``ceil(H16 / 2)``: maps of neighbouring levels line up at their top-left corners,
which the encoder and decoder rely on.

Also home of :class:`ConvNormLayer` (conv -> batch norm -> activation) and the conv/batch-norm folding used by
``DECOPlus.deploy()``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from decodet.errors import DecodetError
from decodet.models.layers import FrozenBatchNorm2d, channels_last_on_cpu

logger = logging.getLogger(__name__)

_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# ImageNet weights RT-DETR converted from PaddlePaddle (keys ``res_layers.*.branch2a``...).
PRETRAINED_URLS = {
    18: "https://github.com/lyuwenyu/storage/releases/download/v0.1/ResNet18_vd_pretrained_from_paddle.pth",
    34: "https://github.com/lyuwenyu/storage/releases/download/v0.1/ResNet34_vd_pretrained_from_paddle.pth",
    50: "https://github.com/lyuwenyu/storage/releases/download/v0.1/ResNet50_vd_ssld_v2_pretrained_from_paddle.pth",
    101: "https://github.com/lyuwenyu/storage/releases/download/v0.1/ResNet101_vd_ssld_pretrained_from_paddle.pth",
}


def activation(name: str | None) -> nn.Module:
    """``"relu" | "silu" | "gelu" | None`` -> module."""
    acts = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
    return nn.Identity() if name is None else acts[name]()


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A conv with bias equal to ``bn(conv(x))`` in eval mode (``bn``: BatchNorm2d or FrozenBatchNorm2d)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


class ConvNormLayer(nn.Module):
    """Conv (no bias, "same" padding for odd kernels) -> BatchNorm2d -> activation. ``x: [B, C_in, H, W] ->
    [B, C_out, H', W']``."""

    def __init__(
        self, ch_in: int, ch_out: int, kernel_size: int, stride: int, padding: int | None = None, act: str | None = None
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, bias=False)
        self.norm: nn.Module = nn.BatchNorm2d(ch_out)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))

    def fuse_for_deploy(self) -> None:
        """Fold the norm into the conv (idempotent)."""
        if not isinstance(self.norm, nn.Identity):
            self.conv = fuse_conv_bn(self.conv, self.norm)
            self.norm = nn.Identity()


def _shortcut(ch_in: int, ch_out: int, stride: int) -> nn.Module:
    """ResNet-D projection shortcut: 2x2 average pool (ceil mode) then 1x1 conv when striding, else a plain
    1x1 conv."""
    if stride == 1:
        return ConvNormLayer(ch_in, ch_out, 1, 1)
    pool = nn.AvgPool2d(2, 2, 0, ceil_mode=True)
    return nn.Sequential(OrderedDict([("pool", pool), ("conv", ConvNormLayer(ch_in, ch_out, 1, 1))]))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN (ReLU between) + shortcut, ReLU.  ``[B, C_in, H, W] -> [B, C_out, H/s, W/s]``."""

    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out, stride)
        self.branch1 = ConvNormLayer(ch_in, ch_out, 3, stride, act="relu")
        self.branch2 = ConvNormLayer(ch_out, ch_out, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch2(self.branch1(x))
        return self.act(out + (x if self.shortcut else self.short(x)))


class BottleNeck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (4x wider) conv-BN + shortcut, ReLU."""

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        self.branch1 = ConvNormLayer(ch_in, ch_out, 1, 1, act="relu")
        self.branch2 = ConvNormLayer(ch_out, ch_out, 3, stride, act="relu")
        self.branch3 = ConvNormLayer(ch_out, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out * self.expansion, stride)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch3(self.branch2(self.branch1(x)))
        return self.act(out + (x if self.shortcut else self.short(x)))


class Blocks(nn.Module):
    """One stage: ``count`` residual blocks, the first one projecting (and striding)."""

    def __init__(self, block: type[BasicBlock | BottleNeck], ch_in: int, ch_out: int, count: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            self.blocks.append(block(ch_in, ch_out, stride if i == 0 else 1, shortcut=i > 0))
            ch_in = ch_out * block.expansion

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


def _freeze_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_norms(child)


class PResNet(nn.Module):
    """ResNet-D backbone returning the stride 8, 16, 32 maps.

    Args:
        depth: 18, 34 (basic blocks), 50 or 101 (bottlenecks).
        width: base width (64 as published); every channel count scales by ``width / 64``, the deep stem's
            included.
        freeze_at: -1 trains everything; ``k >= 0`` freezes the stem and the first ``k`` stages.
        freeze_norm: use FrozenBatchNorm2d (statistics and affine fixed, buffers only).
    ``images: [B, 3, H, W] -> [C3: [B, c0, H/8, W/8], C4: [B, c1, H/16, W/16], C5: [B, c2, H/32, W/32]]``
    (sizes rounded up), channels ``self.out_channels``."""

    def __init__(self, depth: int = 18, width: int = 64, freeze_at: int = -1, freeze_norm: bool = False) -> None:
        super().__init__()
        if depth not in _BLOCKS_PER_STAGE:
            raise DecodetError(f"unsupported ResNet-D depth {depth}; expected one of {sorted(_BLOCKS_PER_STAGE)}")
        self.depth = depth
        self.width = width
        half = width // 2
        stem = [(3, half, 2, "conv1_1"), (half, half, 1, "conv1_2"), (half, width, 1, "conv1_3")]
        self.conv1 = nn.Sequential(OrderedDict((name, ConvNormLayer(i, o, 3, s, act="relu")) for i, o, s, name in stem))
        block = BottleNeck if depth >= 50 else BasicBlock
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.layers = nn.ModuleList()
        ch_in = width
        for i, (w, n) in enumerate(zip(widths, _BLOCKS_PER_STAGE[depth])):
            self.layers.append(Blocks(block, ch_in, w, n, stride=1 if i == 0 else 2))
            ch_in = w * block.expansion
        self.out_channels = [w * block.expansion for w in widths[1:]]
        self.out_strides = [8, 16, 32]

        if freeze_at >= 0:
            for module in [self.conv1, *self.layers[: min(freeze_at, len(self.layers))]]:
                module.requires_grad_(False)
        if freeze_norm:
            _freeze_norms(self)
        # Weights in the layout the CPU input gets (see channels_last_on_cpu): no per-conv reorder.
        self.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.conv1(channels_last_on_cpu(images))
        x = nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i > 0:
                outs.append(x.contiguous())
        return outs

    def load_pretrained(self, path: str | os.PathLike | None = None) -> None:
        """Load ImageNet weights from ``path`` (default: RT-DETR's converted file in the torch hub cache).
        Accepts RT-DETR's key names (``res_layers``, ``branch2a``...) and the DECO+ ones. Nothing is
        downloaded: a missing file is a DecodetError."""
        if self.width != 64:
            raise DecodetError(f"no pretrained ResNet-D weights exist for backbone width {self.width} (only 64)")
        if path is None:
            name = PRETRAINED_URLS[self.depth].rsplit("/", 1)[-1]
            path = Path(torch.hub.get_dir()) / "checkpoints" / name
        path = Path(path)
        if not path.is_file():
            raise DecodetError(
                f"pretrained ResNet{self.depth}-D weights not found; download {PRETRAINED_URLS[self.depth]} "
                "there or pass pretrained_backbone=False",
                path,
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or foreign file
            raise DecodetError(f"cannot read backbone weights ({type(exc).__name__}: {exc})", path) from exc
        renames = {
            "res_layers.": "layers.",
            ".branch2a.": ".branch1.",
            ".branch2b.": ".branch2.",
            ".branch2c.": ".branch3.",
        }
        converted = {}
        for key, value in state.items():
            for old, new in renames.items():
                key = key.replace(old, new)
            if not key.startswith("fc."):
                converted[key] = value
        missing, unexpected = self.load_state_dict(converted, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise DecodetError(
                f"backbone weights do not fit ResNet{self.depth}-D: missing {missing[:3]}, unexpected {unexpected[:3]}",
                path,
            )
        logger.info("loaded ResNet%d-D weights from %s", self.depth, path)
