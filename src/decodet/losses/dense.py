"""Dense one-to-many assignment for DECO+'s auxiliary dense head (training only; Co-DETR's idea, TOOD's assignment).

DECO+ scores every encoder position (``enc_score_head`` / ``enc_bbox_head`` on grid anchors) and keeps the top
``Q`` as queries; the released loss supervises only those ``Q`` positions, one-to-one.  With ``dense_aux = k >
0`` the model grows a separate, training-only head on the same positions (``decoder.dense_head``: its own
projection, score and box heads, so the top-k selection keeps its one-to-one training) and every target is
assigned to up to ``k`` of its positions:

1. candidates: valid positions whose anchor centre lies inside the target box, or within one cell of its
   centre on that position's level (so that a box smaller than a cell still gets its nearest positions);
2. among them, the ``k`` with the highest task alignment ``s * IoU**6`` (TOOD: ``s`` the predicted probability
   of the target's class, IoU of the predicted box with the target; both detached);
3. a position claimed by several targets keeps the one its box overlaps most.

The positions' losses are the set criterion's (varifocal / L1 / GIoU): the encoder and backbone learn from
``k`` positives per object instead of at most one.  At inference the head is never run (no NMS, and the
predictions are the same with or without it); its parameters live under ``decoder.dense_head.``, beside the
authors' names.  Measured at equal wall-clock it costs AP on short runs (docs/convergence.md), so it is off.

Written here rather than taken from a library: torchvision and timm ship no dense assigner, and those of
detection frameworks (mmdet, ultralytics) assume their own anchor layouts and heads.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from decodet.losses.matcher import Indices

ALIGN_POWER = 6.0  # TOOD's beta: the IoU's exponent in the alignment metric (alpha, the score's, is 1)


@torch.no_grad()
def dense_assign(
    logits: Tensor,
    boxes: Tensor,
    centres: Tensor,
    cells: Tensor,
    valid: Tensor,
    targets: list[dict[str, Tensor]],
    k: int,
) -> Indices:
    """Assign each target to up to ``k`` dense positions (module docstring).

    Args:
        logits: ``[B, N, C]`` class logits of every position.
        boxes: ``[B, N, 4]`` predicted boxes, sigmoid cxcywh.
        centres: ``[N, 2]`` anchor centres (x, y) in [0, 1]; ``cells``: ``[N, 2]`` the cell size of each
            position's level (1 / W_l, 1 / H_l); ``valid``: ``[N]`` bool, positions that may be assigned.
        targets: B dicts with ``labels`` [T_b] and ``boxes`` [T_b, 4] cxcywh.
        k: positions per target, at most.

    Returns:
        Per image ``(position indices, target indices)``, int64, each position at most once."""
    result: Indices = []
    empty = torch.empty(0, dtype=torch.int64, device=logits.device)
    for b, t in enumerate(targets):
        labels, gt = t["labels"], t["boxes"].float()
        if len(labels) == 0:
            result.append((empty, empty))
            continue
        # [T, N] candidates: the centre inside the box, or within one cell of the box's centre
        offset = (centres[None] - gt[:, None, :2]).abs()  # [T, N, 2]
        reach = torch.maximum(gt[:, None, 2:] / 2, cells[None])
        candidate = (offset < reach).all(dim=-1) & valid[None]
        iou = box_iou(box_convert(gt, "cxcywh", "xyxy"), box_convert(boxes[b].float(), "cxcywh", "xyxy"))  # [T, N]
        score = logits[b].float().sigmoid()[:, labels].T  # [T, N]: each target's class
        metric = torch.where(candidate, score * iou.pow(ALIGN_POWER), torch.full_like(iou, -1.0))
        top = metric.topk(min(k, metric.shape[1]), dim=1).indices  # [T, k]
        chosen = torch.zeros_like(candidate)
        chosen.scatter_(1, top, True)
        chosen &= candidate
        # a position chosen by several targets keeps the one it overlaps most
        overlap = torch.where(chosen, iou, torch.full_like(iou, -1.0))
        best = overlap.argmax(dim=0)  # [N]
        positions = chosen.any(dim=0).nonzero().squeeze(1)
        result.append((positions, best[positions]))
    return result
