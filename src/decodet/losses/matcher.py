"""Hungarian matching between predictions and ground-truth boxes (DETR's set assignment).

The cost of assigning query ``q`` to target ``t`` is

    cost_class * focal(p[q, label_t]) + cost_bbox * |box_q - box_t|_1 + cost_giou * (-GIoU(box_q, box_t))

with the focal class cost ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` at the target's class
(DINO / Deformable-DETR style; the authors add 1e-8 inside both logarithms). The cost matrices of a whole
batch are computed in one go on the model's device (targets padded to the largest count, so, unlike DETR, no
query is costed against another image's targets), moved to the CPU once and solved per image with scipy's
``linear_sum_assignment``. :meth:`HungarianMatcher.match_groups` goes one step further and matches several
prediction groups (the last decoder layer, the auxiliary layers, the encoder's top-k) with one cost
computation and one transfer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from decodet.errors import DecodetError

Indices = list[tuple[Tensor, Tensor]]


class HungarianMatcher(nn.Module):
    """One-to-one (or, with ``k > 1``, one-to-``k``) assignment of queries to targets.
    ``cost_class``, ``cost_bbox``, ``cost_giou`` weigh the terms of the module docstring's cost."""

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise DecodetError("matcher costs cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"alpha={self.alpha}, gamma={self.gamma}"
        )

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]], k: int = 1) -> Indices:
        """Match one prediction group.

        Args:
            outputs: ``pred_logits`` [B, Q, C] (sigmoid logits) and ``pred_boxes`` [B, Q, 4] cxcywh in [0, 1].
            targets: B dicts with ``labels`` [N_b] int64 and ``boxes`` [N_b, 4] cxcywh in [0, 1].
            k: each target may take up to ``k`` queries (its cost column repeated ``k`` times; H-DETR's
                one-to-many matching). ``k = 1`` is the usual one-to-one matching.

        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 CPU tensors of equal length ``min(Q, k * N_b)``;
            ``target_idx`` indexes the image's original (unrepeated) targets."""
        return self.match_groups([outputs], targets, k=k)[0]

    @torch.no_grad()
    def match_groups(
        self, groups: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]], k: int = 1
    ) -> list[Indices]:
        """Match G prediction groups (dicts as :meth:`forward`'s ``outputs``, same B and C, the query count
        may differ) for the same targets at once (one device-to-host copy); returns G lists of B ``(query_idx,
        target_idx)`` pairs."""
        if k < 1:
            raise DecodetError(f"matcher repetition k must be >= 1, got {k}")
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [[(empty, empty) for _ in targets] for _ in groups]

        for group in groups:
            if group["pred_logits"].shape[0] != len(targets):
                raise DecodetError(
                    f"predictions hold {group['pred_logits'].shape[0]} images but {len(targets)} targets were given"
                )

        # Targets padded to [B, N_max]; padding columns get a harmless full-image box and are dropped later.
        device = groups[0]["pred_logits"].device
        # Costs in float64 for a float64 model (gradient checks), else float32 (also under autocast).
        dtype = torch.promote_types(groups[0]["pred_boxes"].dtype, torch.float32)
        batch, n_max = len(targets), max(sizes)
        slots = torch.cat([torch.arange(n) + b * n_max for b, n in enumerate(sizes)]).to(device)
        tgt_ids = torch.zeros(batch * n_max, dtype=torch.int64, device=device)
        tgt_ids[slots] = torch.cat([t["labels"] for t in targets]).to(device)
        tgt_boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device, dtype=dtype).repeat(batch * n_max, 1)
        tgt_boxes[slots] = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=dtype)
        tgt_ids, tgt_boxes = tgt_ids.view(batch, n_max), tgt_boxes.view(batch, n_max, 4)

        # Groups with the same query count share one batched cost computation; one device-to-host copy in all.
        by_queries: dict[int, list[int]] = {}
        for g, group in enumerate(groups):
            by_queries.setdefault(group["pred_logits"].shape[1], []).append(g)
        costs, order = [], []
        for members in by_queries.values():
            logits = torch.cat([groups[g]["pred_logits"] for g in members]).to(dtype)  # [G'B, Q, C]
            boxes = torch.cat([groups[g]["pred_boxes"] for g in members]).to(dtype)  # [G'B, Q, 4]
            costs.append(
                self._cost(logits, boxes, tgt_ids.repeat(len(members), 1), tgt_boxes.repeat(len(members), 1, 1))
            )
            order += members
        flat = torch.cat([c.flatten() for c in costs]).cpu().numpy()
        if not np.isfinite(flat).all():
            raise DecodetError(
                "non-finite predictions reached the matcher (NaN/inf in pred_logits or pred_boxes); training has "
                "diverged: lower the learning rate, keep gradient clipping on, or check the inputs and targets"
            )

        result: list[Indices | None] = [None] * len(groups)
        offset = 0
        for g in order:
            queries = groups[g]["pred_logits"].shape[1]
            block = flat[offset : offset + batch * queries * n_max].reshape(batch, queries, n_max)
            offset += batch * queries * n_max
            indices: Indices = []
            for b, n in enumerate(sizes):
                if n == 0:
                    indices.append((empty, empty))
                    continue
                q_idx, t_idx = linear_sum_assignment(np.tile(block[b, :, :n], (1, k)))  # k: one-to-k columns
                indices.append(
                    (torch.as_tensor(q_idx, dtype=torch.int64), torch.as_tensor(t_idx % n, dtype=torch.int64))
                )
            result[g] = indices
        return result  # type: ignore[return-value]

    def _cost(self, logits: Tensor, boxes: Tensor, tgt_ids: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Weighted per-image costs ``[N, Q, T]`` of ``logits: [N, Q, C]``, ``boxes: [N, Q, 4]`` cxcywh,
        ``tgt_ids: [N, T]``, ``tgt_boxes: [N, T, 4]`` cxcywh."""
        prob = logits.gather(2, tgt_ids[:, None, :].expand(-1, logits.shape[1], -1)).sigmoid()  # [N, Q, T]
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        return self.cost_class * (pos - neg) + self.cost_bbox * cost_bbox - self.cost_giou * giou
