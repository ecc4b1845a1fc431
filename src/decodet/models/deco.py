"""DECO: backbone C5 -> 1x1 projection -> ConvNeXt encoder -> SIM/CIM decoder -> heads.

Single scale, learned queries on a 2-D grid, no attention, no positional encoding.
"""

from __future__ import annotations

from torch import Tensor, nn

from decodet.config import DecoConfig
from decodet.errors import DecodetError
from decodet.models.backbone import Backbone
from decodet.models.decoder import DecoDecoder
from decodet.models.encoder import DecoEncoder
from decodet.models.layers import MLP, check_images, init_detection_heads


class DECO(nn.Module):
    """The DECO detector.

    ``forward(images: [B, 3, H, W])`` (float, ImageNet-normalised, any H, W; checked) returns
    ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]`` (normalised cxcywh) and, in
    training mode, ``aux_outputs``: the same for decoder layers 1..L-1.
    """

    def __init__(self, cfg: DecoConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.backbone = Backbone(
            cfg.backbone, cfg.pretrained_backbone, cfg.freeze_backbone_bn, cfg.freeze_stem_layer1, 0.0
        )
        self.input_proj = nn.Conv2d(self.backbone.num_channels, cfg.encoder_dims[0], 1)
        if cfg.encoder_dims[-1] != d:
            raise DecodetError(f"encoder_dims[-1] ({cfg.encoder_dims[-1]}) must equal d_model ({d})")
        self.encoder = DecoEncoder(cfg.encoder_dims, cfg.encoder_depths, cfg.encoder_kernel, cfg.drop_path)
        self.decoder = DecoDecoder(d, cfg.num_decoder_layers, cfg.decoder_kernel)
        q = cfg.num_queries
        self.query_content = nn.Embedding(q, d)  # the authors' ``tgt``
        self.query_pos = nn.Embedding(q, d)  # the authors' ``query_embed``
        self.class_heads = nn.ModuleList(nn.Linear(d, cfg.num_classes) for _ in range(cfg.num_decoder_layers))
        self.box_heads = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(cfg.num_decoder_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for module in (self.encoder, self.decoder, self.query_content):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        init_detection_heads(self.class_heads, self.box_heads, prior_prob=0.01, size_bias=-2.0)

    def _grid(self, emb: nn.Embedding, batch: int) -> Tensor:
        """``[Q, d]`` embedding -> ``[B, d, qH, qW]`` (query q at row q // qW, column q % qW)."""
        qh, qw = self.config.query_grid
        return emb.weight.t().reshape(1, -1, qh, qw).expand(batch, -1, -1, -1)

    def forward(self, images: Tensor) -> dict[str, Tensor | list[dict[str, Tensor]]]:
        check_images(images)
        b = images.shape[0]
        memory = self.encoder(self.input_proj(self.backbone(images)))
        hs = self.decoder(self._grid(self.query_content, b), memory, self._grid(self.query_pos, b))
        outs = [
            {"pred_logits": cls(h), "pred_boxes": box(h).sigmoid()}
            for h, cls, box in zip(hs, self.class_heads, self.box_heads)
        ]
        result: dict = dict(outs[-1])
        if self.training:
            result["aux_outputs"] = outs[:-1]
        return result
