"""DECO+: ResNet-D -> conv hybrid encoder -> query selection -> conv decoder.

RT-DETR's frame with every attention replaced by convolution (see the spec, "DECO+"). Decoder as released:

1. The three encoder levels are projected again (1x1 conv + BN).  Flattened and concatenated they are scored
   densely by the encoder head (``enc_output`` Linear + LayerNorm, ``enc_score_head``, ``enc_bbox_head`` on
   grid anchors); the top ``Q = qH * qW`` positions by highest class logit give the initial query content and
   reference boxes (both detached).
2. The levels are also merged at stride 16 (stride 8 through a 2x2 stride-2 conv + BN + SiLU, stride 32 by
   nearest 2x upsampling; concat; 1x1 conv + BN): the CIM memory.
3. Each decoder layer places the ``Q`` queries row-major on the ``qH x qW`` grid (query ``q`` at row
   ``q // qW``, column ``q % qW``, in top-k order), mixes them with an Inception depthwise conv (SIM),
   upsamples them onto the memory and mixes with it (CIM), and max-pools back onto the grid.  The query
   position is an MLP of the current reference box; each layer's box head refines the previous box in logits.

Odd input sizes: level sizes are ``ceil`` halves of each other (see ``resnet_d``).  For the stride-16 merge,
the stride-8 map is zero-padded at the bottom/right to twice the stride-16 size before its 2x2 stride-2 conv,
and the 2x-upsampled stride-32 map is cropped at the bottom/right; both are no-ops when the input is a
multiple of 32, where this equals the authors' code.  Anchors are built for the actual level sizes (cached)."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decodet.config import DecoPlusConfig
from decodet.errors import DecodetError
from decodet.models.decoder import DecoDecoderLayer
from decodet.models.denoising import denoising_queries
from decodet.models.hybrid_encoder import HybridEncoder, upsample2x_to
from decodet.models.layers import MLP, DepthwiseConv2d, _exporting, check_images, init_detection_heads, inverse_sigmoid
from decodet.models.resnet_d import ConvNormLayer, PResNet

logger = logging.getLogger(__name__)

_PRIOR_PROB = 0.01
ANCHOR_SIZE = 0.05  # the finest level's anchor size; level l's is 0.05 * 2**l of the image


def make_anchors(
    shapes: list[tuple[int, int]], grid_size: float = ANCHOR_SIZE, eps: float = 0.01, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Grid anchors for levels of sizes ``shapes`` (finest first), in logit space.

    Level ``l`` cell ``(y, x)``: centre ``((x + 0.5) / W, (y + 0.5) / H)``, size ``grid_size * 2**l``.  An
    anchor with any coordinate outside ``(eps, 1 - eps)`` is invalid and set to ``+inf``.  Returns ``anchors:
    [1, N, 4]`` (float32) and ``valid: [1, N, 1]`` (bool), ``N = sum(H * W)``, row-major per level."""
    anchors = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        centre = (torch.stack([xs, ys], dim=-1) + 0.5) / torch.tensor([w, h], dtype=torch.float32, device=device)
        size = torch.full_like(centre, grid_size * 2.0**lvl)
        anchors.append(torch.cat([centre, size], dim=-1).reshape(1, h * w, 4))
    boxes = torch.cat(anchors, dim=1)
    valid = ((boxes > eps) & (boxes < 1 - eps)).all(dim=-1, keepdim=True)
    logits = torch.log(boxes / (1 - boxes))
    return torch.where(valid, logits, torch.inf), valid


class InceptionDWConv2d(nn.Module):
    """Inception depthwise conv: of ``dim`` channels, the first ``dim - 3 g`` pass untouched, then ``g = dim *
    ratio`` each go through a square (3x3), a horizontal band (1 x band_w) and a vertical band (band_h x 1)
    depthwise conv, in that order.  ``[B, dim, H, W] -> [B, dim, H, W]``."""

    def __init__(self, dim: int, square: int = 3, band_h: int = 13, band_w: int = 15, ratio: float = 0.25) -> None:
        super().__init__()
        g = int(dim * ratio)
        self.dwconv_hw = DepthwiseConv2d(g, square)
        self.dwconv_w = DepthwiseConv2d(g, (1, band_w))
        self.dwconv_h = DepthwiseConv2d(g, (band_h, 1))
        self.splits = [dim - 3 * g, g, g, g]

    def forward(self, x: Tensor) -> Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.splits, dim=1)
        return torch.cat([x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)], dim=1)


class DecoPlusDecoderLayer(DecoDecoderLayer):
    """DECO's SIM/CIM layer (:class:`~decodet.models.decoder.DecoDecoderLayer`, same parameter names) with an
    Inception depthwise conv in the SIM and stochastic depth, on queries as a sequence: ``tgt: [B, Q, d]``,
    ``memory: [B, d, H, W]``, ``query_pos: [B, Q, d]`` -> ``[B, Q, d]`` (query ``q`` at row ``q // qW``)."""

    def __init__(self, dim: int, query_grid: tuple[int, int], kernel_size: int = 9, drop_path: float = 0.0) -> None:
        super().__init__(dim, kernel_size, sim_conv=InceptionDWConv2d(dim), drop_path=drop_path)
        self.qh, self.qw = query_grid

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor) -> Tensor:
        b = tgt.shape[0]
        t = tgt.transpose(1, 2).reshape(b, -1, self.qh, self.qw)  # [B, d, qH, qW], row-major
        pos = query_pos.transpose(1, 2).reshape(b, -1, self.qh, self.qw)
        return super().forward(t, memory, pos).flatten(2).transpose(1, 2)  # [B, Q, d]


class DecoderLayers(nn.Module):
    """Container of the decoder layers (``decoder.decoder.layers.{i}``, the authors' key layout)."""

    def __init__(self, layers: list[DecoPlusDecoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class DecoPlusDecoder(nn.Module):
    """Query selection + conv decoder layers + per-layer heads.  ``feats: [[B, d, H_i, W_i]] * 3`` (strides 8,
    16, 32) -> dict with ``pred_logits`` ``[B, Q, C]``, ``pred_boxes`` ``[B, Q, 4]`` (sigmoid cxcywh) of the last
    layer and, in training, ``aux_outputs``: the earlier layers then the encoder's top-k selection."""

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int = 256,
        query_grid: tuple[int, int] = (15, 20),
        num_layers: int = 6,
        drop_path: float = 0.0,
        num_levels: int = 3,
        one_to_many: int = 0,
        query_layout: str = "score",
        denoising: int = 0,
        dense_aux: int = 0,
    ) -> None:
        super().__init__()
        self.one_to_many = one_to_many
        if dense_aux < 0:
            raise DecodetError(f"dense_aux must be >= 0 (positions per target), got {dense_aux}")
        self.dense_aux = dense_aux
        if denoising < 0:
            raise DecodetError(f"denoising must be >= 0 (extra query grids), got {denoising}")
        self.denoising = denoising
        if query_layout not in ("score", "spatial"):
            raise DecodetError(f"query_layout must be 'score' or 'spatial', got {query_layout!r}")
        self.query_layout = query_layout
        if num_levels != 3:
            raise DecodetError(f"DECO+ decoder expects 3 feature levels, got {num_levels}")
        d = hidden_dim
        self.query_grid = tuple(query_grid)
        self.num_queries = query_grid[0] * query_grid[1]
        self.num_layers = num_layers
        self.input_proj = nn.ModuleList(ConvNormLayer(d, d, 1, 1) for _ in range(num_levels))
        self.output_proj = ConvNormLayer(num_levels * d, d, 1, 1)
        self.downsample_convs = nn.ModuleList([ConvNormLayer(d, d, 2, 2, act="silu")])  # stride 8 -> 16
        self.decoder = DecoderLayers(
            [DecoPlusDecoderLayer(d, query_grid, drop_path=drop_path) for _ in range(num_layers)]
        )
        self.query_pos_head = MLP(4, 2 * d, d, 2)
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.enc_score_head = nn.Linear(d, num_classes)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        self.dec_score_head = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(num_layers))
        self._anchor_cache: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        self._reset_parameters()
        if dense_aux > 0:  # training-only auxiliary dense head (decodet.losses.dense); never used at inference.
            # Built last, so the published modules draw the same random numbers with or without it.
            self.dense_head = nn.ModuleDict(
                {"output": nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d)), "score": nn.Linear(d, num_classes),
                 "bbox": MLP(d, d, 4, 3)}
            )  # fmt: skip
            init_detection_heads([self.dense_head["score"]], [self.dense_head["bbox"]], _PRIOR_PROB)
            nn.init.xavier_uniform_(self.dense_head["output"][0].weight)

    def _reset_parameters(self) -> None:
        init_detection_heads(
            [self.enc_score_head, *self.dec_score_head], [self.enc_bbox_head, *self.dec_bbox_head], _PRIOR_PROB
        )
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)

    def anchors(self, shapes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """:func:`make_anchors` for these level sizes, cached per (sizes, device)."""
        if _exporting():
            return make_anchors(shapes, device=device)
        key = (tuple(shapes), str(device))
        if key not in self._anchor_cache:
            if len(self._anchor_cache) >= 32:
                self._anchor_cache.clear()
            self._anchor_cache[key] = make_anchors(shapes, device=device)
        return self._anchor_cache[key]

    def _merge_memory(self, proj: list[Tensor]) -> Tensor:
        """The CIM memory: all levels merged at stride 16.  ``-> [B, d, H16, W16]``."""
        p8, p16, p32 = proj
        h, w = p16.shape[-2], p16.shape[-1]
        pad_h, pad_w = 2 * h - p8.shape[-2], 2 * w - p8.shape[-1]
        if pad_h or pad_w:  # odd stride-8 size: pad to 2x the stride-16 size (see module doc)
            p8 = F.pad(p8, [0, pad_w, 0, pad_h])
        merged = torch.cat([self.downsample_convs[0](p8), p16, upsample2x_to(p32, (h, w))], dim=1)
        return self.output_proj(merged)

    def _select_queries(self, proj: list[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Any]:
        """Top-``k`` query selection from the dense encoder predictions.  Returns ``target [B, k, d]``
        (detached), ``ref_unact [B, k, 4]`` (detached box logits), ``enc_logits [B, k, C]``, ``enc_boxes [B, k, 4]``
        every position's content ``[B, N, d]`` (for denoising queries), then, in training with ``dense_aux``,
        every position's predictions (:meth:`_dense_outputs`; else ``None``)."""
        shapes = [(int(p.shape[-2]), int(p.shape[-1])) for p in proj]
        memory = torch.cat([p.flatten(2).transpose(1, 2) for p in proj], dim=1)  # [B, N, d]
        if memory.shape[1] < k:
            raise DecodetError(
                f"input too small: {memory.shape[1]} feature positions for {k} queries "
                f"(level sizes {shapes}); use a larger image"
            )
        anchors, valid = self.anchors(shapes, memory.device)
        memory = memory * valid.to(memory.dtype)
        out_memory = self.enc_output(memory)
        logits = self.enc_score_head(out_memory)  # [B, N, C]
        coords = self.enc_bbox_head(out_memory) + anchors  # [B, N, 4] logits
        dense = self._dense_outputs(shapes, memory, anchors, valid) if self.training and self.dense_aux > 0 else None

        index = torch.topk(logits.max(dim=-1).values, k, dim=1).indices  # [B, k]
        if self.query_layout == "spatial":
            index = self._spatial_order(index, coords, k)
        index = index.unsqueeze(-1)
        ref_unact = coords.gather(1, index.expand(-1, -1, coords.shape[-1]))
        enc_logits = logits.gather(1, index.expand(-1, -1, logits.shape[-1]))
        target = out_memory.gather(1, index.expand(-1, -1, out_memory.shape[-1]))
        return target.detach(), ref_unact.detach(), enc_logits, torch.sigmoid(ref_unact), out_memory, dense

    def _dense_outputs(self, shapes: list[tuple[int, int]], memory: Tensor, anchors: Tensor, valid: Tensor) -> dict:
        """The auxiliary dense head on every encoder position of ``memory [B, N, d]`` (its own projection and
        heads, so the top-k selection keeps its one-to-one training): ``pred_logits [B, N, C]``, ``pred_boxes
        [B, N, 4]``, with the anchor ``centres [N, 2]``, the level ``cells [N, 2]`` (1 / W, 1 / H) and ``valid
        [N]`` (decodet.losses.dense)."""
        head = self.dense_head
        features = head["output"](memory)
        logits, coords = head["score"](features), head["bbox"](features) + anchors
        centres, cells = [], []
        for h, w in shapes:
            ys, xs = torch.meshgrid(
                torch.arange(h, device=logits.device), torch.arange(w, device=logits.device), indexing="ij"
            )
            size = torch.tensor([w, h], dtype=torch.float32, device=logits.device)
            centres.append((torch.stack([xs, ys], dim=-1).reshape(-1, 2) + 0.5) / size)
            cells.append((1.0 / size).expand(h * w, 2))
        return {
            "pred_logits": logits,
            "pred_boxes": torch.sigmoid(coords),
            "centres": torch.cat(centres),
            "cells": torch.cat(cells),
            "valid": valid[0, :, 0],
        }

    def _spatial_order(self, index: Tensor, coords: Tensor, k: int) -> Tensor:
        """Reorder ``index [B, k]`` for the ``"spatial"`` layout: each group of ``Q`` queries (one-to-one, then
        hybrid) by reference-box centre y into rows of ``qW``, then each row by centre x.  (Box logits order as
        the boxes do: the sigmoid is monotonic.)"""
        qh, qw = self.query_grid
        b = index.shape[0]
        centre = coords.gather(1, index.unsqueeze(-1).expand(-1, -1, coords.shape[-1]))[..., :2].detach()
        index, cx, cy = (t.reshape(b * (k // (qh * qw)), qh * qw) for t in (index, centre[..., 0], centre[..., 1]))
        # Exact ties (boxes still on their anchors) are broken by top-k rank via a tiny offset, so every backend agrees.
        rank = torch.arange(qh * qw, device=index.device, dtype=cx.dtype).expand_as(cx) * (1e-4 / (qh * qw))
        by_y = torch.argsort(cy + rank, dim=1)
        index, cx, rank = (t.gather(1, by_y).reshape(-1, qh, qw) for t in (index, cx, rank))
        return index.gather(2, torch.argsort(cx + rank, dim=2)).reshape(b, k)

    def forward(self, feats: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> dict[str, Any]:
        """``targets`` (training with ``denoising > 0`` only; criterion format) give the denoising grids."""
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        memory = self._merge_memory(proj)
        q, b = self.num_queries, memory.shape[0]
        hybrid = self.training and self.one_to_many > 0
        dn = self.training and self.denoising > 0 and targets is not None
        output, ref_unact, enc_logits, enc_boxes, content, dense = self._select_queries(proj, 2 * q if hybrid else q)
        # Extra query grids (hybrid, then denoising) run through the same decoder as extra batch entries
        # (convolutions never mix batch entries, so groups can't see each other).
        outputs, refs = [output[:, :q]], [ref_unact[:, :q]]
        if hybrid:  # the next Q encoder positions form the one-to-many grid
            outputs.append(output[:, q:])
            refs.append(ref_unact[:, q:])
            enc_logits, enc_boxes = enc_logits[:, :q], enc_boxes[:, :q]
        dn_positives = []
        if dn:
            shapes = [(int(p.shape[-2]), int(p.shape[-1])) for p in proj]
            for _ in range(self.denoising):
                dn_content, dn_ref, positives = denoising_queries(targets, q, content.detach(), shapes, ANCHOR_SIZE)
                outputs.append(dn_content.to(output.dtype))
                refs.append(dn_ref.to(ref_unact.dtype))
                dn_positives.append(positives)
        groups = len(outputs)
        if groups > 1:
            output, ref_unact = torch.cat(outputs, dim=0), torch.cat(refs, dim=0)
            memory = memory.repeat(groups, 1, 1, 1)

        logits_per_layer, boxes_per_layer = [], []
        ref_detached = torch.sigmoid(ref_unact)
        ref = ref_detached
        last = self.num_layers - 1
        for i, layer in enumerate(self.decoder.layers):
            output = layer(output, memory, self.query_pos_head(ref_detached))
            delta = self.dec_bbox_head[i](output)
            box = torch.sigmoid(delta + inverse_sigmoid(ref_detached))
            if self.training:
                logits_per_layer.append(self.dec_score_head[i](output))
                # Layer i > 0's supervised box keeps the gradient through the previous (undetached) box;
                # the next layer's reference is detached (RT-DETR).
                boxes_per_layer.append(box if i == 0 else torch.sigmoid(delta + inverse_sigmoid(ref)))
            elif i == last:
                logits_per_layer.append(self.dec_score_head[i](output))
                boxes_per_layer.append(box)
            ref = box
            ref_detached = box.detach() if self.training else box

        per_layer = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits_per_layer, boxes_per_layer)]

        def group(g: int) -> list[dict[str, Tensor]]:  # the g-th grid's layer outputs, first layer first
            return [{k: v[g * b : (g + 1) * b] for k, v in layer.items()} for layer in per_layer]

        layers = group(0) if groups > 1 else per_layer  # one grid: no slicing (the exported graph is as before)
        out: dict[str, Any] = dict(layers[-1])
        if hybrid:
            o2m = group(1)
            out["pred_logits_o2m"], out["pred_boxes_o2m"] = o2m[-1]["pred_logits"], o2m[-1]["pred_boxes"]
            out["aux_outputs_o2m"] = o2m[:-1]
        if dn:
            first = 2 if hybrid else 1
            out["dn_outputs"] = [
                {**group(first + g)[-1], "aux_outputs": group(first + g)[:-1]} for g in range(self.denoising)
            ]
            out["dn_positives"] = dn_positives
        if self.training:
            out["aux_outputs"] = [*layers[:-1], {"pred_logits": enc_logits, "pred_boxes": enc_boxes}]
            if dense is not None:
                out["enc_dense"] = dense
        return out


def _backbone_depth(name: str) -> int:
    depths = {"presnet18": 18, "presnet34": 34, "presnet50": 50, "presnet101": 101}
    if name not in depths:
        raise DecodetError(f"unknown DECO+ backbone {name!r}; expected one of {sorted(depths)}")
    return depths[name]


class DECOPlus(nn.Module):
    """The DECO+ detector; parameter names equal the authors' (``backbone.``, ``encoder.``, ``decoder.``) so
    their state dicts load as they are.  ``forward(images: [B, 3, H, W])`` (float, [0, 1] pixels unless
    ``normalize``; checked as DECO checks it) ``-> {"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4]}`` (sigmoid
    cxcywh in [0, 1]); in training also ``aux_outputs`` (decoder layers ``0..L-2``, then the encoder's top-k)."""

    def __init__(self, cfg: DecoPlusConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = PResNet(
            _backbone_depth(cfg.backbone),
            width=cfg.backbone_width,
            freeze_at=cfg.freeze_at,
            freeze_norm=cfg.freeze_backbone_bn,
        )
        self.encoder = HybridEncoder(
            self.backbone.out_channels,
            hidden_dim=cfg.hidden_dim,
            num_blocks=cfg.encoder_blocks,
            expansion=cfg.expansion,
            csp_blocks=cfg.csp_blocks,
            drop_path=cfg.drop_path,
        )
        self.decoder = DecoPlusDecoder(
            cfg.num_classes,
            hidden_dim=cfg.hidden_dim,
            query_grid=tuple(cfg.query_grid),
            num_layers=cfg.num_decoder_layers,
            drop_path=cfg.drop_path,
            one_to_many=cfg.one_to_many,
            query_layout=cfg.query_layout,
            denoising=cfg.denoising,
            dense_aux=cfg.dense_aux,
        )
        if cfg.pretrained_backbone:
            self.backbone.load_pretrained(cfg.extra.get("backbone_weights"))

    @property
    def num_queries(self) -> int:
        return self.decoder.num_queries

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict[str, Any]:
        """``targets``: only for training with denoising queries (``config.denoising > 0``), else ignored."""
        check_images(images)
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def deploy(self) -> DECOPlus:
        """Inference form, in place: eval mode, RepVGG branches fused into one 3x3 conv, every batch norm folded
        into its conv.  The state dict no longer matches the authors' after this.  Returns ``self``."""
        self.eval()
        for module in list(self.modules()):
            fuse = getattr(module, "fuse_for_deploy", None)
            if callable(fuse):
                fuse()
        return self
