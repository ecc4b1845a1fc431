"""The set-prediction loss of DECO and DECO+: Hungarian matching, then class + box losses.

DECO (the Deformable-DETR recipe): sigmoid focal loss over every query and class (alpha 0.25, gamma 2), weight
2; L1 on matched cxcywh boxes, weight 5; GIoU loss, weight 2. DECO+ (RT-DETR's recipe): varifocal loss (alpha
0.75, gamma 2; the matched class's target is the detached IoU of the matched box), weight 1; L1 5; GIoU 2.
Every term is summed over the batch and divided by the number of target boxes (averaged over processes, at
least 1), and repeated, with its own matching, on every auxiliary output: DECO's earlier decoder layers,
DECO+'s earlier layers followed by the encoder's top-k selection.
Optional one-to-many hybrid matching (H-DETR's hybrid branch, off by default): a model may output an extra,
separate group of queries as ``pred_logits_o2m`` / ``pred_boxes_o2m`` (and ``aux_outputs_o2m``). With
``one_to_many = k > 0`` that group is matched to the targets repeated ``k`` times and gets the same losses,
normalised by ``k`` times the box count and scaled by ``o2m_weight``, under ``*_o2m`` names. The one-to-one
queries never see duplicates, so inference (one-to-one queries only) stays NMS-free.
Denoising queries (DN-DETR, training only; ``decodet.models.denoising``): a model may output ``dn_outputs``
(one dict per denoising grid, with its ``aux_outputs``) and ``dn_positives`` (per grid, per image, ``(query
indices, target indices)``). Those queries are not matched: each positive is supervised on its own box, every
other denoising query as background, with the same losses, normalised by the positives' count (each box
appears once per group) and scaled by ``dn_weight``, averaged over grids, under ``*_dn`` names.
Dense one-to-many supervision of DECO+'s encoder head (Co-DETR's idea, training only; ``dense_aux = k > 0``):
a model may output ``enc_dense`` (every encoder position's predictions and anchors); each target is assigned
to up to ``k`` positions (``decodet.losses.dense``) and those get the same losses, normalised by the number
of assigned positions and scaled by ``dense_weight``, under ``*_dense`` names.
Optional matchability-aware loss (DEIM's MAL, ``class_loss="mal"``, a training-time choice): like varifocal,
but the matched class's target is IoU**gamma with weight 1 (a poorly matched positive still pulls its score
up), and the negatives are weighted by p**gamma (times ``alpha``, 1 by default).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from decodet.errors import DecodetError
from decodet.losses.dense import dense_assign
from decodet.losses.matcher import HungarianMatcher, Indices

logger = logging.getLogger(__name__)

CLASS_LOSSES = ("focal", "vfl", "mal")


def paired_iou_giou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """``(iou, giou)``, each [M], of row-aligned box pairs ``boxes1, boxes2: [M, 4]`` cxcywh."""
    a = box_convert(boxes1, "cxcywh", "xyxy")
    b = box_convert(boxes2, "cxcywh", "xyxy")
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter_wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-12)
    hull_wh = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0)
    hull = (hull_wh[:, 0] * hull_wh[:, 1]).clamp(min=1e-12)
    return iou, iou - (hull - union) / hull


class SetCriterion(nn.Module):
    """Matches predictions to targets and returns the weighted loss terms and their sum (module docstring).

    Args:
        matcher: the Hungarian matcher (its costs are the matching weights).
        class_loss: ``"focal"`` (DECO), ``"vfl"`` (varifocal, IoU-aware; DECO+) or ``"mal"`` (DEIM's
            matchability-aware loss; module docstring).
        alpha, gamma: of the class loss (0.25 / 2 for focal, 0.75 / 2 for varifocal, 1 / 2 for MAL).
        one_to_many: ``k`` of the optional one-to-many branch (0: off), its terms scaled by ``o2m_weight``.
        dn_weight: the scale of the denoising terms (when the model outputs them).
        dense_aux: ``k`` of the dense encoder assignment (0: off), its terms scaled by ``dense_weight``."""

    def __init__(
        self,
        matcher: HungarianMatcher,
        class_loss: str = "focal",
        weight_class: float = 2.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        one_to_many: int = 0,
        o2m_weight: float = 1.0,
        dn_weight: float = 1.0,
        dense_aux: int = 0,
        dense_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if class_loss not in CLASS_LOSSES:
            raise DecodetError(f"unknown class loss {class_loss!r}; expected one of {CLASS_LOSSES}")
        if one_to_many < 0:
            raise DecodetError(f"one_to_many must be >= 0, got {one_to_many}")
        self.matcher = matcher
        self.class_loss = class_loss
        self.weights = {f"loss_{class_loss}": weight_class, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.alpha = alpha
        self.gamma = gamma
        self.one_to_many = one_to_many
        self.o2m_weight = o2m_weight
        self.dn_weight = dn_weight
        if dense_aux < 0:
            raise DecodetError(f"dense_aux must be >= 0, got {dense_aux}")
        self.dense_aux = dense_aux
        self.dense_weight = dense_weight
        self._warned_no_o2m = False
        self._warned_no_dense = False

    def extra_repr(self) -> str:
        return (
            f"class_loss={self.class_loss}, weights={self.weights}, alpha={self.alpha}, gamma={self.gamma}, "
            f"one_to_many={self.one_to_many}, o2m_weight={self.o2m_weight}, dn_weight={self.dn_weight}, "
            f"dense_aux={self.dense_aux}, dense_weight={self.dense_weight}"
        )

    def forward(self, outputs: dict, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Args:
            outputs: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] cxcywh in [0, 1], optionally
                ``aux_outputs`` (a list of such dicts) and the one-to-many group (see the module docstring).
            targets: B dicts with ``labels`` [N_b] int64 in [0, C) and ``boxes`` [N_b, 4] cxcywh in [0, 1].

        Returns:
            The weighted terms (``loss_focal`` or ``loss_vfl``, ``loss_bbox``, ``loss_giou``; auxiliary
            outputs add ``_aux{i}`` names, the one-to-many group ``_o2m`` names) and their sum ``loss``."""
        logits = outputs["pred_logits"]
        _check_targets(targets, logits.shape[0], logits.shape[-1])
        device = logits.device
        dtype = _loss_dtype(outputs)
        targets = [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in targets]
        sizes = [len(t["labels"]) for t in targets]
        flat = _FlatTargets(
            torch.cat([t["labels"] for t in targets]),
            torch.cat([t["boxes"] for t in targets]).to(dtype),
            [sum(sizes[:b]) for b in range(len(sizes))],
        )

        # (name suffix, prediction group, matching repetition k, weight scale)
        groups = [("", outputs, 1, 1.0)]
        groups += [(f"_aux{i}", aux, 1, 1.0) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if self.one_to_many > 0:
            if "pred_logits_o2m" in outputs:
                k, w = self.one_to_many, self.o2m_weight
                o2m = {"pred_logits": outputs["pred_logits_o2m"], "pred_boxes": outputs["pred_boxes_o2m"]}
                groups.append(("_o2m", o2m, k, w))
                groups += [(f"_o2m_aux{i}", aux, k, w) for i, aux in enumerate(outputs.get("aux_outputs_o2m", []))]
            elif not self._warned_no_o2m:
                logger.warning("one_to_many=%d but the model outputs no pred_logits_o2m; skipping", self.one_to_many)
                self._warned_no_o2m = True

        all_indices = self._match(groups, targets)
        num_boxes = _num_boxes(targets, device)

        losses: dict[str, Tensor] = {}
        for (suffix, group, k, scale), indices in zip(groups, all_indices):
            terms = self._group_losses(group, flat, indices, max(num_boxes * k, 1.0))
            for name, value in terms.items():
                losses[name + suffix] = value * (self.weights[name] * scale)
        self._denoising_losses(outputs, flat, num_boxes, sum(sizes), losses)
        self._dense_losses(outputs, targets, flat, losses)
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def _denoising_losses(
        self, outputs: dict, flat: _FlatTargets, num_boxes: float, local_boxes: int, losses: dict[str, Tensor]
    ) -> None:
        """Add the ``*_dn`` terms of the model's denoising grids (module docstring) to ``losses``."""
        grids = outputs.get("dn_outputs", [])
        for grid, positives in zip(grids, outputs.get("dn_positives", [])):
            repeats = sum(len(q) for q, _ in positives) / max(local_boxes, 1)  # positives per box
            norm = max(num_boxes * repeats, 1.0)
            layers = [("", grid), *((f"_aux{i}", aux) for i, aux in enumerate(grid.get("aux_outputs", [])))]
            for suffix, layer in layers:
                for name, value in self._group_losses(layer, flat, positives, norm).items():
                    term = value * (self.weights[name] * self.dn_weight / len(grids))
                    key = f"{name}_dn{suffix}"
                    losses[key] = losses[key] + term if key in losses else term

    def _dense_losses(
        self, outputs: dict, targets: list[dict[str, Tensor]], flat: _FlatTargets, losses: dict[str, Tensor]
    ) -> None:
        """Add the ``*_dense`` terms of the encoder's every position (module docstring) to ``losses``."""
        if self.dense_aux <= 0:
            return
        dense = outputs.get("enc_dense")
        if dense is None:
            if not self._warned_no_dense:
                logger.warning("dense_aux=%d but the model outputs no enc_dense; skipping", self.dense_aux)
                self._warned_no_dense = True
            return
        indices = dense_assign(
            dense["pred_logits"], dense["pred_boxes"], dense["centres"], dense["cells"], dense["valid"],
            targets, self.dense_aux,
        )  # fmt: skip
        positives = _mean_count(float(sum(len(q) for q, _ in indices)), dense["pred_logits"].device)
        for name, value in self._group_losses(dense, flat, indices, max(positives, 1.0)).items():
            losses[f"{name}_dense"] = value * (self.weights[name] * self.dense_weight)

    def _match(self, groups: list, targets: list[dict[str, Tensor]]) -> list[Indices]:
        """Match every group; groups with the same ``k`` share one cost computation."""
        result: list[Indices | None] = [None] * len(groups)
        for k in sorted({g[2] for g in groups}):
            members = [i for i, g in enumerate(groups) if g[2] == k]
            matched = self.matcher.match_groups([groups[i][1] for i in members], targets, k=k)
            for i, indices in zip(members, matched):
                result[i] = indices
        return result  # type: ignore[return-value]

    def _group_losses(
        self, outputs: dict[str, Tensor], targets: _FlatTargets, indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """Unweighted ``loss_<class_loss>``, ``loss_bbox``, ``loss_giou`` of one prediction group
        (``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4]) matched by ``indices``."""
        dtype = _loss_dtype(outputs)
        logits = outputs["pred_logits"].to(dtype)
        device = logits.device
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        tgt_idx = torch.cat([j + start for start, (_, j) in zip(targets.starts, indices)]).to(device)
        labels = targets.labels[tgt_idx]
        tgt_boxes = targets.boxes[tgt_idx]
        src_boxes = outputs["pred_boxes"][batch_idx, query_idx].to(dtype)

        iou, giou = paired_iou_giou(src_boxes, tgt_boxes)
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, labels] = 1.0
        if self.class_loss == "focal":
            loss_class = sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma, reduction="none").sum()
        else:  # varifocal / MAL: the matched class's target is the (detached) IoU of the matched box
            score = torch.zeros_like(logits)
            quality = iou.detach() if self.class_loss == "vfl" else iou.detach().pow(self.gamma)
            score[batch_idx, query_idx, labels] = quality
            positive = score if self.class_loss == "vfl" else onehot  # MAL: every positive at full weight
            weight = self.alpha * logits.detach().sigmoid().pow(self.gamma) * (1 - onehot) + positive
            loss_class = F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="none").sum()
        return {
            f"loss_{self.class_loss}": loss_class / num_boxes,
            "loss_bbox": (src_boxes - tgt_boxes).abs().sum() / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }


def _loss_dtype(outputs: dict[str, Tensor]) -> torch.dtype:
    """float64 for a float64 model (gradient checks), else float32 (bf16/fp16 autocast outputs too)."""
    return torch.promote_types(outputs["pred_boxes"].dtype, torch.float32)


class _FlatTargets(NamedTuple):
    """A batch's targets concatenated: ``labels`` [T], ``boxes`` [T, 4] (loss dtype); image b starts at starts[b]."""

    labels: Tensor
    boxes: Tensor
    starts: list[int]


def _check_targets(targets: Sequence[dict[str, Tensor]], batch: int, num_classes: int) -> None:
    """Raise :class:`DecodetError` for targets that do not fit predictions of ``batch`` images, C classes."""
    if len(targets) != batch:
        raise DecodetError(f"the model predicted {batch} images but {len(targets)} targets were given")
    labels = []
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise DecodetError(f"target {i} needs 'labels' and 'boxes', got keys {sorted(t)}")
        n = t["labels"].shape[0] if t["labels"].dim() == 1 else -1
        if n < 0 or tuple(t["boxes"].shape) != (n, 4):
            raise DecodetError(
                f"target {i}: expected labels [N] and boxes [N, 4], got {tuple(t['labels'].shape)} and "
                f"{tuple(t['boxes'].shape)}"
            )
        labels.append(t["labels"])
    all_labels = torch.cat(labels)
    if all_labels.numel() and bool(((all_labels < 0) | (all_labels >= num_classes)).any()):
        raise DecodetError(
            f"target labels must lie in [0, {num_classes}) for a model with {num_classes} class logits, got "
            f"values {int(all_labels.min())}..{int(all_labels.max())}; check num_classes and the label mapping"
        )


def _num_boxes(targets: Sequence[dict[str, Tensor]], device: torch.device) -> float:
    """Target boxes per process: the batch's count, averaged over processes when distributed (unclamped)."""
    return _mean_count(float(sum(len(t["labels"]) for t in targets)), device)


def _mean_count(value: float, device: torch.device) -> float:
    """A per-process count averaged over processes when distributed (as is, otherwise)."""
    count = torch.tensor([value], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return float(count.item())
