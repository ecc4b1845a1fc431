"""Backbones for single-scale DECO: torchvision ResNets and the authors' ConvNeXt layout.

Each returns the last stage only (stride 32) as ``{"0": [B, C, H/32, W/32]}`` via
``body``; ``num_channels`` gives C.  Module names match the authors' checkpoints under
``backbone.0.body`` (ours: ``backbone.body``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter

from decodet.errors import DecodetError
from decodet.models.layers import FrozenBatchNorm2d, LayerNorm2d, channels_last_on_cpu, convnext_stages

log = logging.getLogger(__name__)

_RESNETS = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": (resnet.resnet34, resnet.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V1, 2048),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V1, 2048),
}


class ConvNeXt(nn.Module):
    """ConvNeXt feature extractor in the authors' layout (``downsample_layers``, ``stages``).

    ``x: [B, 3, H, W] -> [B, dims[-1], H/32, W/32]``.
    """

    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), drop_path: float = 0.0) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        downs = [
            nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2))
            for i in range(1, len(dims))
        ]
        self.downsample_layers = nn.ModuleList([stem, *downs])
        self.stages = convnext_stages(dims, depths, 7, drop_path)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return {"0": x}


class Backbone(nn.Module):
    """Wraps a feature extractor as ``self.body`` and records ``num_channels``."""

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        frozen_bn: bool = True,
        freeze_stem_layer1: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if name == "convnext_tiny":
            self.body = ConvNeXt(drop_path=drop_path)
            self.num_channels = 768
            if pretrained:
                _load_convnext_tiny_imagenet(self.body)
            return
        if name not in _RESNETS:
            raise DecodetError(f"unknown backbone {name!r}; known: {sorted([*_RESNETS, 'convnext_tiny'])}")
        ctor, weights, channels = _RESNETS[name]
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        try:
            net = ctor(weights=weights if pretrained else None, norm_layer=norm)
        except Exception as exc:  # no network / no cached weights
            raise DecodetError(f"could not load ImageNet weights for {name}: {exc}") from None
        if freeze_stem_layer1:
            for pname, p in net.named_parameters():
                if not pname.startswith(("layer2", "layer3", "layer4")):
                    p.requires_grad_(False)
        self.body = IntermediateLayerGetter(net, return_layers={"layer4": "0"})
        self.num_channels = channels
        # Weights in the layout the CPU input gets (channels_last_on_cpu): oneDNN then skips a
        # weight reorder per conv and per gradient (deco_r18 training step: ~10% faster).
        self.body.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, 3, H, W] -> [B, C, ceil(H/32), ceil(W/32)]``."""
        return self.body(channels_last_on_cpu(x))["0"].contiguous()


def _load_convnext_tiny_imagenet(body: ConvNeXt) -> None:
    """Map torchvision's ImageNet ConvNeXt-Tiny weights onto the authors' layout."""
    from torchvision.models import ConvNeXt_Tiny_Weights, convnext_tiny

    try:
        tv = convnext_tiny(weights=ConvNeXt_Tiny_Weights.IMAGENET1K_V1).features
    except Exception as exc:
        raise DecodetError(f"could not load ImageNet weights for convnext_tiny: {exc}") from None
    sd = {}
    # torchvision: features[0] = stem (conv, LN); features[2i] = downsample (LN, conv); features[2i+1] = stage i.
    for i in range(4):
        down = tv[0] if i == 0 else tv[2 * i]
        for j, mod in enumerate(down):
            for k, v in mod.state_dict().items():
                sd[f"downsample_layers.{i}.{j}.{k}"] = v
        for b, block in enumerate(tv[2 * i + 1]):
            seq = block.block  # dwconv, Permute, LayerNorm, Linear, GELU, Linear, Permute
            for name, layer in (("dwconv", seq[0]), ("norm", seq[2]), ("pwconv1", seq[3]), ("pwconv2", seq[5])):
                sd[f"stages.{i}.{b}.{name}.weight"] = layer.weight
                sd[f"stages.{i}.{b}.{name}.bias"] = layer.bias
            sd[f"stages.{i}.{b}.gamma"] = block.layer_scale.reshape(-1)
    body.load_state_dict(sd)
