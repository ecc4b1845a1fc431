"""DECO+ multi-scale encoder: RT-DETR's hybrid encoder with convolutions only.

1x1 conv + BN projections of the stride 8/16/32 backbone maps to ``hidden_dim``; ConvNeXt
blocks on the stride-32 level (in the slot of RT-DETR's attention layer, AIFI); then the
cross-scale fusion (CCFM): a top-down path (lateral 1x1 conv, 2x nearest upsample,
concat, CSP block of RepVGG blocks) and a bottom-up path (3x3 stride-2 conv, concat,
CSP block).  Names follow the DECO+ release (``input_proj``, ``encoder.0.self_attn``,
``lateral_convs``, ``fpn_blocks``, ``downsample_convs``, ``pan_blocks``).

Odd input sizes: a level is ``ceil`` of half the level below it (see ``resnet_d``), so
2x upsampling may give one row/column too many; it is cropped at the bottom/right, which
keeps every upsampled cell over the finer cells it covers.  For even sizes this is
exactly the authors' ``interpolate(scale_factor=2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decodet.models.layers import convnext_stages
from decodet.models.resnet_d import ConvNormLayer, activation, fuse_conv_bn


def upsample2x_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest 2x upsampling cropped to ``size`` (``<= 2x``).  ``[B, C, h, w] -> [B, C, *size]``."""
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    if tuple(x.shape[-2:]) != tuple(size):
        x = x[:, :, : size[0], : size[1]]
    return x


class RepVggBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN, summed, activation; ``fuse_for_deploy`` merges both
    branches into one biased 3x3 conv.  ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, ch_in: int, ch_out: int, act: str = "silu") -> None:
        super().__init__()
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0)
        self.act = activation(act)
        self.conv: nn.Conv2d | None = None  # set by fuse_for_deploy

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def fuse_for_deploy(self) -> None:
        if self.conv is not None:
            return
        self.conv1.fuse_for_deploy()
        self.conv2.fuse_for_deploy()
        k3, k1 = self.conv1.conv, self.conv2.conv
        fused = nn.Conv2d(k3.in_channels, k3.out_channels, 3, 1, padding=1).to(k3.weight)
        fused.weight.copy_(k3.weight + F.pad(k1.weight, [1, 1, 1, 1]))
        fused.bias.copy_(k3.bias + k1.bias)
        del self.conv1, self.conv2
        self.conv = fused


class CSPRepLayer(nn.Module):
    """CSP block: two 1x1 conv branches, one through ``num_blocks`` RepVGG blocks,
    summed, then a 1x1 conv when the hidden width differs from the output width.
    ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, ch_in: int, ch_out: int, num_blocks: int = 3, expansion: float = 1.0, act: str = "silu") -> None:
        super().__init__()
        hidden = int(ch_out * expansion)
        self.conv1 = ConvNormLayer(ch_in, hidden, 1, 1, act=act)
        self.conv2 = ConvNormLayer(ch_in, hidden, 1, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, ch_out, 1, 1, act=act) if hidden != ch_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class ConvNeXtStages(nn.Module):
    """One stage of ConvNeXt blocks (``stages.0.{i}``, the authors' layout).  ``[B, d, H, W]`` in and out."""

    def __init__(self, dim: int, depth: int, kernel_size: int = 7, drop_path: float = 0.0) -> None:
        super().__init__()
        self.stages = convnext_stages((dim,), (depth,), kernel_size, drop_path)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages[0](x)


class IntraScaleEncoder(nn.Module):
    """The convolutional replacement of RT-DETR's AIFI; the attribute keeps its name,
    ``self_attn``, as in the authors' checkpoints."""

    def __init__(self, dim: int, depth: int, kernel_size: int = 7, drop_path: float = 0.0) -> None:
        super().__init__()
        self.self_attn = ConvNeXtStages(dim, depth, kernel_size, drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return self.self_attn(x)


class HybridEncoder(nn.Module):
    """Project, refine the stride-32 level with ConvNeXt blocks, fuse across scales.

    Args:
        in_channels: channels of the stride 8, 16, 32 backbone maps.
        hidden_dim: width of every output level.
        num_blocks: ConvNeXt blocks on the stride-32 level.
        expansion: CSP hidden width / ``hidden_dim``.
        csp_blocks: RepVGG blocks per CSP block.

    ``feats: [[B, c_i, H_i, W_i]] * 3 -> [[B, hidden_dim, H_i, W_i]] * 3`` (strides 8, 16, 32).
    """

    def __init__(
        self,
        in_channels: list[int],
        hidden_dim: int = 256,
        num_blocks: int = 4,
        expansion: float = 1.0,
        csp_blocks: int = 3,
        kernel_size: int = 7,
        drop_path: float = 0.0,
        act: str = "silu",
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.hidden_dim = hidden_dim
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim)) for c in in_channels
        )
        self.encoder = nn.ModuleList([IntraScaleEncoder(hidden_dim, num_blocks, kernel_size, drop_path)])
        n = len(in_channels) - 1
        self.lateral_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act) for _ in range(n))
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, hidden_dim, csp_blocks, expansion, act) for _ in range(n)
        )
        self.downsample_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act) for _ in range(n))
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, hidden_dim, csp_blocks, expansion, act) for _ in range(n)
        )

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        proj[-1] = self.encoder[0](proj[-1])

        # Top-down: coarsest first; the lateral conv output replaces the coarse map.
        inner = [proj[-1]]
        for k, idx in enumerate(range(len(proj) - 1, 0, -1)):
            high = self.lateral_convs[k](inner[0])
            inner[0] = high
            low = proj[idx - 1]
            up = upsample2x_to(high, (low.shape[-2], low.shape[-1]))
            inner.insert(0, self.fpn_blocks[k](torch.cat([up, low], dim=1)))

        # Bottom-up.
        outs = [inner[0]]
        for k in range(len(proj) - 1):
            down = self.downsample_convs[k](outs[-1])
            outs.append(self.pan_blocks[k](torch.cat([down, inner[k + 1]], dim=1)))
        return outs

    @torch.no_grad()
    def fuse_for_deploy(self) -> None:
        """Fold the input projections' batch norms into their convs (idempotent)."""
        for seq in self.input_proj:
            if isinstance(seq[1], nn.BatchNorm2d):
                seq[0] = fuse_conv_bn(seq[0], seq[1])
                seq[1] = nn.Identity()
