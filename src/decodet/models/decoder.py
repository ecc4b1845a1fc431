"""DECO's convolutional decoder: SIM (query self-interaction) + CIM (query-memory
cross-interaction), queries laid out as a 2-D grid.  DECO+ reuses the layer with its own
SIM conv (:class:`~decodet.models.decoplus.DecoPlusDecoderLayer`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from decodet.models.layers import DepthwiseConv2d, adaptive_max_pool2d


class DecoDecoderLayer(nn.Module):
    """One decoder layer on queries ``t: [B, d, qH, qW]`` with ``memory: [B, d, H, W]``.

    SIM: ``t = t + gamma1 * MLP(LN(dwconv1(t + pos)))``.
    CIM: ``u = up(t, (H, W)); y = LN(dwconv2(u + memory) + u);
    t = pool(y + gamma2 * MLP(y), (qH, qW))`` (residual from the normalised ``y``).

    ``sim_conv`` replaces the SIM's ``kernel_size`` depthwise conv (DECO+: an Inception
    depthwise conv); ``drop_path`` is stochastic depth on both MLP branches.  Parameter names
    are the authors' (``dwconv1``, ``norm1``, ``pwconv1_1``, ..., ``gamma2``) in both releases.
    """

    def __init__(
        self,
        d: int,
        kernel_size: int = 9,
        layer_scale: float = 1e-6,
        sim_conv: nn.Module | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.dwconv1 = sim_conv if sim_conv is not None else DepthwiseConv2d(d, kernel_size)
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.pwconv1_1 = nn.Linear(d, 4 * d)
        self.pwconv1_2 = nn.Linear(4 * d, d)
        self.gamma1 = nn.Parameter(torch.full((d,), layer_scale))
        self.dwconv2 = DepthwiseConv2d(d, kernel_size)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.pwconv2_1 = nn.Linear(d, 4 * d)
        self.pwconv2_2 = nn.Linear(4 * d, d)
        self.gamma2 = nn.Parameter(torch.full((d,), layer_scale))
        self.act = nn.GELU()
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, t: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        q_hw = t.shape[-2:]
        # SIM
        y = self.dwconv1(t + pos).permute(0, 2, 3, 1)  # [B, qH, qW, d]
        y = self.pwconv1_2(self.act(self.pwconv1_1(self.norm1(y)))) * self.gamma1
        t = t + self.drop_path(y.permute(0, 3, 1, 2))
        # CIM
        u = F.interpolate(t, size=memory.shape[-2:], mode="nearest")
        y = (self.dwconv2(u + memory) + u).permute(0, 2, 3, 1)  # [B, H, W, d]
        y = self.norm2(y)
        y = y + self.drop_path(self.pwconv2_2(self.act(self.pwconv2_1(y))) * self.gamma2)
        return adaptive_max_pool2d(y.permute(0, 3, 1, 2), (int(q_hw[0]), int(q_hw[1])))


class DecoDecoder(nn.Module):
    """Stack of :class:`DecoDecoderLayer` and the shared final LayerNorm (eps 1e-5).

    Returns ``[L, B, Q, d]``: every layer's normalised output in row-major query order.
    """

    def __init__(self, d: int, num_layers: int = 6, kernel_size: int = 9) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoDecoderLayer(d, kernel_size) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor) -> list[Tensor]:
        """``tgt, pos: [B, d, qH, qW]``, ``memory: [B, d, H, W]`` -> list of ``[B, Q, d]``."""
        outs = []
        t = tgt
        for layer in self.layers:
            t = layer(t, memory, pos)
            outs.append(self.norm(t.flatten(2).transpose(1, 2)))
        return outs
