"""Model outputs -> detections (torchvision style), no NMS."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert


@torch.no_grad()
def postprocess(
    outputs: dict[str, Tensor],
    target_sizes: Tensor | list[tuple[int, int]],
    num_top: int = 100,
    category_ids: list[int] | None = None,
    score_threshold: float = 0.0,
) -> list[dict[str, Tensor]]:
    """Sigmoid scores, top-``num_top`` over all (query, class) pairs, absolute xyxy boxes.

    Args:
        outputs: ``pred_logits [B, Q, C]`` and ``pred_boxes [B, Q, 4]`` (normalised cxcywh).
        target_sizes: ``[B, 2]`` (height, width) to scale each image's boxes to — the
            original image size when the model saw the whole image resized.
        num_top: detections kept per image (capped at ``Q * C``).
        category_ids: maps logit index -> category id; ``None`` keeps logit indices.
        score_threshold: drop detections scoring below it (after top-k).

    Returns:
        One dict per image: ``boxes [N, 4]`` xyxy pixels (clipped to the image), ``scores [N]``, ``labels [N]`` int64.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    b, q, c = logits.shape
    sizes = torch.as_tensor(target_sizes, dtype=torch.float32, device=logits.device).reshape(b, 2)
    k = min(num_top, q * c)
    scores, index = logits.float().sigmoid().flatten(1).topk(k, dim=1)
    query, labels = index // c, index % c
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
    xyxy = torch.gather(xyxy, 1, query.unsqueeze(-1).expand(-1, -1, 4))
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)
    xyxy = torch.minimum((xyxy * scale[:, None, :]).clamp(min=0.0), scale[:, None, :])  # clipped to the image
    if category_ids is not None:
        labels = torch.as_tensor(category_ids, device=labels.device)[labels]
    results = []
    for s, lab, bx in zip(scores, labels, xyxy):
        keep = s >= score_threshold
        results.append({"boxes": bx[keep], "scores": s[keep], "labels": lab[keep].long()})
    return results
