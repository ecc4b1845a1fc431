"""Training losses: the Hungarian matcher and the set criterion, with the authors' presets.

>>> criterion = build_criterion("decoplus_r18")  # varifocal 1 / L1 5 / GIoU 2, matcher costs 2 / 5 / 2
>>> losses = criterion(outputs, targets)  # doctest: +SKIP
>>> losses["loss"].backward()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from decodet.errors import DecodetError, reject_unknown
from decodet.losses.criterion import SetCriterion
from decodet.losses.matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "SetCriterion", "build_criterion", "criterion_options"]

# The authors' settings per architecture.  ``alpha=None`` means the class loss's usual value:
# 0.25 for focal, 0.75 for varifocal.
# DECO: Deformable-DETR's focal criterion (the released main.py defaults).
_DECO: dict[str, Any] = dict(
    use_vfl=False, class_loss=None,  # the class loss (a name wins over use_vfl)
    weight_class=2.0, weight_bbox=5.0, weight_giou=2.0, alpha=None, gamma=2.0,  # the loss
    cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, matcher_alpha=0.25, matcher_gamma=2.0,  # the matching
    one_to_many=0, o2m_weight=1.0,  # the hybrid branch
    dn_weight=1.0,  # the denoising queries' terms (when the model has them)
    dense_aux=0, dense_weight=1.0,  # the dense encoder assignment (decodet.losses.dense)
)  # fmt: skip
_DEFAULT_ALPHA = {"focal": 0.25, "vfl": 0.75, "mal": 1.0}  # DEIM's MAL leaves the negatives unscaled
_RECIPES: dict[str, dict[str, Any]] = {
    "deco": _DECO,
    # DECO+: RT-DETR's varifocal criterion (decoplus_base.yml); the rest as DECO's.
    "decoplus": {**_DECO, "use_vfl": True, "weight_class": 1.0, "cost_class": 2.0},
}


def criterion_options(name_or_config: Any) -> dict[str, Any]:
    """The criterion settings :func:`build_criterion` uses for a preset name or model config."""
    if isinstance(name_or_config, str):
        from decodet.registry import get_config

        name_or_config = get_config(name_or_config)
    arch = getattr(name_or_config, "arch", None)
    if arch not in _RECIPES:
        raise DecodetError(
            f"cannot build a criterion for {name_or_config!r}: expected a preset name or a model config "
            f"with arch in {sorted(_RECIPES)}"
        )
    options = dict(_RECIPES[arch])
    if getattr(name_or_config, "one_to_many", 0):  # the model trains a hybrid-matching group
        options["one_to_many"] = int(name_or_config.one_to_many)
    if getattr(name_or_config, "dense_aux", 0):  # the model outputs every encoder position's predictions
        options["dense_aux"] = int(name_or_config.dense_aux)
    return options


def build_criterion(name_or_config: Any, **overrides: Any) -> SetCriterion:
    """The authors' criterion for a preset name (``"deco_r50"``) or a ``DecoConfig`` / ``DecoPlusConfig``.

    ``arch == "deco"`` gives the focal setup, ``"decoplus"`` the varifocal one.  ``overrides``: any
    key of :func:`criterion_options` (``use_vfl``: the IoU-aware varifocal class loss; ``class_loss``:
    ``"focal"``, ``"vfl"`` or ``"mal"`` by name, overriding ``use_vfl``; ``alpha=None``: 0.25 for focal,
    0.75 for varifocal, 1 for MAL; ``one_to_many``: k of the hybrid branch, 0 = off; ``dense_aux``: k of the
    dense encoder assignment, 0 = off).
    """
    options = criterion_options(name_or_config)
    reject_unknown(overrides, options, "criterion option(s)")
    options.update(overrides)
    class_loss = options["class_loss"] or ("vfl" if options["use_vfl"] else "focal")  # an explicit name wins
    alpha = options["alpha"] if options["alpha"] is not None else _DEFAULT_ALPHA.get(class_loss, 0.25)
    matcher = HungarianMatcher(
        cost_class=float(options["cost_class"]),
        cost_bbox=float(options["cost_bbox"]),
        cost_giou=float(options["cost_giou"]),
        alpha=float(options["matcher_alpha"]),
        gamma=float(options["matcher_gamma"]),
    )
    return SetCriterion(
        matcher,
        class_loss=str(class_loss),
        weight_class=float(options["weight_class"]),
        weight_bbox=float(options["weight_bbox"]),
        weight_giou=float(options["weight_giou"]),
        alpha=float(alpha),
        gamma=float(options["gamma"]),
        one_to_many=int(options["one_to_many"]),
        o2m_weight=float(options["o2m_weight"]),
        dn_weight=float(options["dn_weight"]),
        dense_aux=int(options["dense_aux"]),
        dense_weight=float(options["dense_weight"]),
    )
