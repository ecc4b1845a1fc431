"""DECO's encoder: ConvNeXt stages over the projected C5 map, no spatial downsampling."""

from __future__ import annotations

from torch import Tensor, nn

from decodet.models.layers import LayerNorm2d, convnext_stages


class DecoEncoder(nn.Module):
    """Stages of ConvNeXt blocks of widths ``dims`` and depths ``depths``; between stages a
    channels-first LayerNorm and a 1x1 conv to the next width.

    ``x: [B, dims[0], H, W] -> memory [B, dims[-1], H, W]``.  ``norm`` exists in the
    authors' release but their forward never applies it; we keep it (unused) so their
    checkpoints and parameter counts match.
    """

    def __init__(self, dims=(120, 240, 480), depths=(2, 6, 2), kernel_size: int = 7, drop_path: float = 0.0) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 1))
            for i in range(len(dims) - 1)
        )
        self.stages = convnext_stages(dims, depths, kernel_size, drop_path)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)  # unused, see class docstring

    def forward(self, x: Tensor) -> Tensor:
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsample_layers[i - 1](x)
            x = stage(x)
        return x
