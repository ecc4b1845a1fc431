"""Model outputs -> detections (torchvision style), no NMS.

:func:`top_detections` is the one implementation: batched, fixed shapes, so it exports to
ONNX inside :class:`~decodet.inference.graph.DeployModel`.  :func:`postprocess` wraps it into
one dict per image with a score threshold (evaluation, the Python API).
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_detections(
    logits: Tensor, boxes: Tensor, sizes: Tensor, num_top: int, category_ids: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``K`` (query, class) pairs of each image by sigmoid score, boxes in pixels.

    Args:
        logits: ``[B, Q, C]`` class logits.
        boxes: ``[B, Q, 4]`` normalised cxcywh.
        sizes: ``[B, 2]`` float (height, width) to scale each image's boxes to.
        num_top: ``K`` before capping at ``Q * C``.
        category_ids: ``[C]`` int64, logit index -> category id; ``None`` keeps logit indices.

    Returns:
        ``boxes [B, K, 4]`` xyxy pixels clipped to the image, ``scores [B, K]`` sorted high to
        low, ``labels [B, K]`` int64.
    """
    logits, boxes = logits.float(), boxes.float()
    c = logits.shape[2]
    k = min(int(num_top), logits.shape[1] * c)
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    query = torch.div(index, c, rounding_mode="floor")
    labels = index % c
    if category_ids is not None:
        labels = category_ids[labels]
    # cxcywh -> xyxy written out (torchvision's box_convert computes the same) so the graph exports
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    xyxy = torch.gather(xyxy, 1, query.unsqueeze(-1).expand(-1, -1, 4))
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1).unsqueeze(1)
    # clipped to the image, as the evaluation does (a box past the border only loses IoU)
    return torch.minimum(torch.clamp(xyxy * scale, min=0.0), scale), scores, labels


@torch.no_grad()
def postprocess(
    outputs: dict[str, Tensor],
    target_sizes: Tensor | list[tuple[int, int]],
    num_top: int = 100,
    category_ids: list[int] | None = None,
    score_threshold: float = 0.0,
) -> list[dict[str, Tensor]]:
    """Sigmoid scores, top-``num_top`` over all (query, class) pairs, absolute xyxy boxes.

    ``outputs``: ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]``; ``target_sizes``: ``[B, 2]``
    (height, width), the original image size when the model saw the whole image resized; the rest
    as :func:`top_detections`, then detections scoring below ``score_threshold`` are dropped.
    Returns one dict per image: ``boxes [N, 4]`` xyxy pixels, ``scores [N]``, ``labels [N]`` int64.
    """
    logits = outputs["pred_logits"]
    sizes = torch.as_tensor(target_sizes, dtype=torch.float32, device=logits.device).reshape(logits.shape[0], 2)
    ids = torch.as_tensor(category_ids, device=logits.device) if category_ids is not None else None
    boxes, scores, labels = top_detections(logits, outputs["pred_boxes"], sizes, num_top, ids)
    results = []
    for s, lab, bx in zip(scores, labels, boxes):
        keep = s >= score_threshold
        results.append({"boxes": bx[keep], "scores": s[keep], "labels": lab[keep].long()})
    return results
