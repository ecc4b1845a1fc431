"""Convert decodet detections to and from ``supervision.Detections``.

So that supervision's annotators, zones and trackers work on decodet output::

    import supervision as sv
    from decodet.predict.interop import to_supervision

    dets = to_supervision(detector(image)[0])
    drawn = sv.LabelAnnotator().annotate(sv.BoxAnnotator().annotate(image.copy(), dets), dets)

A decodet detection dict (one image, see :class:`~decodet.Detector`) holds ``boxes [N, 4]``
xyxy pixels, ``scores [N]``, ``labels [N]`` (category ids) and ``names`` (N strings).  In
supervision these are ``xyxy``, ``confidence``, ``class_id`` and ``data["class_name"]``;
a tracker's ``tracker_id`` comes back as ``track_ids [N]``.  supervision is the optional
``supervision`` extra (``pip install 'decodet[supervision]'``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch

from decodet.errors import DecodetError


def _supervision() -> ModuleType:
    try:
        with warnings.catch_warnings():  # it warns at import when OpenCV is absent; decodet needs none of it
            warnings.simplefilter("ignore", UserWarning)
            import supervision
    except ImportError:
        raise DecodetError("this needs supervision: pip install 'decodet[supervision]'") from None
    return supervision


def to_supervision(det: Mapping[str, Any], class_names: Mapping[int, str] | None = None) -> Any:
    """A decodet detection dict -> ``supervision.Detections`` (float32 ``xyxy``, int ``class_id``).

    ``data["class_name"]`` comes from ``det["names"]``, else from ``class_names`` (category id ->
    name, e.g. ``Detector.class_names``), else the id as text.  ``track_ids``, when present,
    becomes ``tracker_id``.
    """
    sv = _supervision()
    boxes = torch.as_tensor(det["boxes"]).detach().cpu().reshape(-1, 4).float().numpy()
    scores = torch.as_tensor(det["scores"]).detach().cpu().reshape(-1).float().numpy()
    labels = torch.as_tensor(det["labels"]).detach().cpu().reshape(-1).long().numpy()
    if not len(boxes) == len(scores) == len(labels):
        raise DecodetError(f"detections disagree: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    names = det.get("names")
    if names is None:
        names = [(class_names or {}).get(int(v), str(int(v))) for v in labels]
    if len(names) != len(labels):
        raise DecodetError(f"detections disagree: {len(names)} names for {len(labels)} labels")
    tracks = det.get("track_ids")
    return sv.Detections(
        xyxy=boxes,
        confidence=scores,
        class_id=labels,
        tracker_id=None if tracks is None else torch.as_tensor(tracks).cpu().reshape(-1).long().numpy(),
        data={"class_name": np.array([str(n) for n in names], dtype=str)},
    )


def from_supervision(detections: Any, class_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """``supervision.Detections`` -> a decodet detection dict (CPU tensors, as :class:`~decodet.Detector`).

    Needs ``class_id``.  Without ``confidence`` (ground truth, say) every score is 1.0.  Names
    come from ``data["class_name"]``, else ``class_names``, else the id as text; a
    ``tracker_id`` becomes ``track_ids``.  Masks and other ``data`` keys are not carried.
    """
    sv = _supervision()
    if not isinstance(detections, sv.Detections):
        raise DecodetError(f"expected supervision.Detections, got {type(detections).__name__}")
    n = len(detections)
    if detections.class_id is None and n:
        raise DecodetError("supervision Detections without class_id cannot become decodet detections")
    labels = torch.as_tensor(np.asarray(detections.class_id if n else [], dtype=np.int64)).reshape(-1)
    confidence = detections.confidence if detections.confidence is not None else np.ones(n, dtype=np.float32)
    names = detections.data.get("class_name")
    if names is None:
        names = [(class_names or {}).get(int(v), str(int(v))) for v in labels]
    out: dict[str, Any] = {
        "boxes": torch.as_tensor(np.asarray(detections.xyxy, dtype=np.float32)).reshape(-1, 4),
        "scores": torch.as_tensor(np.asarray(confidence, dtype=np.float32)).reshape(-1),
        "labels": labels,
        "names": [str(v) for v in names],
    }
    if detections.tracker_id is not None:
        out["track_ids"] = torch.as_tensor(np.asarray(detections.tracker_id, dtype=np.int64)).reshape(-1)
    return out
