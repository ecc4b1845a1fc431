"""Denoising queries for DECO+'s decoder (DN-DETR, with DINO's positive/negative pairs), training only.

A denoising grid is one more ``qH x qW`` query grid per image, run through the decoder as extra batch
entries, as the hybrid group is: a convolution never mixes batch entries, so the denoising queries and the
matched ones cannot see each other (attention needs a mask for that; a separate batch entry needs none).

An image with ``n`` boxes fills its grid with groups of ``2 n`` slots: slot ``j < n`` is a *positive*, box
``j`` with each side moved by less than half the box's width or height (times ``noise_scale``), to be
reconstructed and classified as box ``j``'s class; slot ``n + j`` is a *negative*, box ``j`` moved by one to
two half-sizes, to be classified as background.  Slots past the last whole group are negatives too; an
image without boxes gets random boxes, all negatives.  Positives are supervised on their own box (no
matching): that is what makes the task easy early in training and steadies the matched queries.

DECO+'s queries carry no label embedding (the authors' checkpoints have none), so labels are not noised: a
denoising query's content is the encoder's feature at its noised box's centre, on the level whose anchor
size is nearest the box, just as a selected query's content is the encoder's feature at its position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert

from decodet.models.layers import inverse_sigmoid


def denoising_queries(
    targets: Sequence[dict[str, Tensor]],
    num_queries: int,
    memory: Tensor,
    shapes: list[tuple[int, int]],
    anchor_size: float,
    noise_scale: float = 1.0,
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """One denoising grid per image.

    Args:
        targets: B dicts with ``labels`` [n_b] and ``boxes`` [n_b, 4] cxcywh in [0, 1].
        num_queries: slots per grid (``qH * qW``).
        memory: the encoder's projected features ``[B, N, d]``, levels ``shapes`` (finest first) flattened
            row-major and concatenated, as query selection scores them.
        anchor_size: the finest level's anchor size (level l's is ``anchor_size * 2**l``, as the encoder's).
        noise_scale: DN-DETR's box noise scale (1: positives move by up to half the box's size).

    Returns:
        ``content [B, Q, d]`` (detached), ``ref_unact [B, Q, 4]`` (box logits) and, per image, the positives
        as ``(query indices, target indices)`` for the criterion."""
    b, _, d = memory.shape
    device = memory.device
    content = memory.new_zeros(b, num_queries, d)
    boxes = torch.zeros(b, num_queries, 4, device=device)
    positives: list[tuple[Tensor, Tensor]] = []
    for i, t in enumerate(targets):
        gt = t["boxes"].to(device=device, dtype=torch.float32)
        slot = torch.arange(num_queries, device=device)
        n = min(len(gt), num_queries // 2)
        if n == 0:  # no boxes: random ones, all background
            wh = 0.05 + 0.25 * torch.rand(num_queries, 2, device=device)
            gt_of_slot = torch.cat([wh / 2 + (1 - wh) * torch.rand(num_queries, 2, device=device), wh], dim=-1)
            positive = torch.zeros(num_queries, dtype=torch.bool, device=device)
            which = slot
        else:
            if n < len(gt):  # more boxes than half the grid: a random subset this step
                keep = torch.randperm(len(gt), device=device)[:n]
            else:
                keep = torch.arange(n, device=device)
            within = slot % (2 * n)
            whole = slot < (num_queries // (2 * n)) * 2 * n
            positive = (within < n) & whole
            which = keep[within % n]
            gt_of_slot = gt[which]
        boxes[i] = _noised(gt_of_slot, positive, noise_scale)
        content[i] = _features_at(memory[i], boxes[i], shapes, anchor_size)
        positives.append((slot[positive], which[positive]) if n else (slot[:0], slot[:0]))
    return content.detach(), inverse_sigmoid(boxes), positives


def _noised(boxes: Tensor, positive: Tensor, scale: float) -> Tensor:
    """``boxes [M, 4]`` cxcywh with each side moved by ``U[0, 1)`` (positives) or ``U[1, 2)`` (negatives) half
    sizes times ``scale``, in a random direction; clipped to the image, at least 1e-3 wide and high."""
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    half = boxes[:, 2:].repeat(1, 2) / 2
    magnitude = torch.rand_like(xyxy) + (~positive).to(xyxy.dtype).unsqueeze(-1)
    sign = torch.randint(0, 2, xyxy.shape, device=xyxy.device).to(xyxy.dtype) * 2 - 1
    xyxy = (xyxy + sign * magnitude * half * scale).clamp(0, 1)
    lo = torch.minimum(xyxy[:, :2], xyxy[:, 2:])
    hi = torch.maximum(xyxy[:, :2], xyxy[:, 2:])
    out = box_convert(torch.cat([lo, hi], dim=-1), "xyxy", "cxcywh")
    return torch.cat([out[:, :2].clamp(1e-3, 1 - 1e-3), out[:, 2:].clamp(min=1e-3)], dim=-1)


def _features_at(memory: Tensor, boxes: Tensor, shapes: list[tuple[int, int]], anchor_size: float) -> Tensor:
    """``memory [N, d]`` rows at each box's centre, on the level whose anchor size is nearest the box."""
    size = boxes[:, 2:].max(dim=-1).values.clamp(min=1e-6)
    level = torch.round(torch.log2(size / anchor_size)).clamp(0, len(shapes) - 1).long()
    offsets = torch.tensor([0, *[h * w for h, w in shapes]], device=memory.device).cumsum(0)[:-1]
    heights = torch.tensor([h for h, _ in shapes], device=memory.device)[level]
    widths = torch.tensor([w for _, w in shapes], device=memory.device)[level]
    row = (boxes[:, 1] * heights).long().clamp(max=heights - 1)
    col = (boxes[:, 0] * widths).long().clamp(max=widths - 1)
    return memory[offsets[level] + row * widths + col]
