"""Checkpoints: our format (safetensors + config JSON metadata) and the authors' ``.pth``.

``load_model(path)`` needs nothing but the file: our files carry their config; for the
authors' files the preset and class count are inferred from the tensors' names and
shapes.  Writes are atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from decodet.config import DecoConfig, DecoPlusConfig, ModelConfig, config_from_dict, config_to_dict, replace
from decodet.errors import DecodetError
from decodet.io.atomic import atomic_write_bytes
from decodet.registry import build_from_config, get_config, list_models

log = logging.getLogger(__name__)

FORMAT = "decodet"
_META_CONFIG = "decodet_config"

# The authors' DECO checkpoints name modules differently; DECO+ uses their names as-is.
_DECO_RENAMES = [
    ("backbone.0.body.", "backbone.body."),
    ("deco_convnet.encoder._encoder.", "encoder."),
    ("deco_convnet.decoder.layers.", "decoder.layers."),
    ("deco_convnet.decoder.norm.", "decoder.norm."),
    ("deco_convnet.tgt.", "query_content."),
    ("query_embed.", "query_pos."),
    ("class_embed.", "class_heads."),
    ("bbox_embed.", "box_heads."),
    ("input_proj.", "input_proj."),
]
# Duplicate view of ``bbox_embed`` the authors' decoder holds; dropped on import.
_DECO_SHARED = "deco_convnet.decoder.bbox_embed."


def coco_class_names() -> list[str]:
    """COCO names indexed by category id (0..90); unused ids are ``"N/A"``."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])


# ----------------------------------------------------------------------------- ours


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights and config to ``path`` (safetensors), atomically."""
    path = Path(path)
    model = getattr(model, "module", model)  # DDP / EMA wrappers
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, _META_CONFIG: json.dumps(config_to_dict(model.config))}
    meta.update(extra or {})
    # serialised in memory, then written by Python: a failing write (disk full) raises an OSError
    # with its reason, where safetensors' own file writer would raise an opaque error
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))
    return path


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model in eval mode from our checkpoint or the authors' released ``.pth``."""
    cfg, state = read_checkpoint(path)
    with torch.device("meta"):
        model = build_from_config(replace(cfg, pretrained_backbone=False))
    _load_state(model, state, path)
    return model.to(map_location).eval()


def convert_official(path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write our checkpoint format from the authors' ``.pth`` (DECO or DECO+)."""
    model = load_model(path)
    return save_model(model, out_path, extra={"converted_from": Path(path).name})


def read_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Tensor]]:
    """``(config, state_dict in our names)`` from either checkpoint format (or a run folder,
    or named weights such as ``"decoplus_r18.coco"``: :mod:`decodet.io.hub`)."""
    from decodet.io.hub import resolve_weights

    path = Path(resolve_weights(path))
    if not path.exists():
        raise DecodetError("weights file not found", path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors", "model.safetensors"):
            if (path / name).exists():
                return read_checkpoint(path / name)
        raise DecodetError("folder holds no best/last/model .safetensors checkpoint", path)
    if path.stat().st_size == 0:
        raise DecodetError("weights file is empty (0 bytes)", path)
    if _is_safetensors(path):
        return _read_ours(path)
    return _read_official(path)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def _read_ours(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ValueError, ... on junk bytes
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DecodetError(f"corrupt or truncated safetensors checkpoint ({msg})", path) from None
    if _META_CONFIG not in meta:
        raise DecodetError("safetensors file has no decodet model config (not a decodet checkpoint)", path)
    try:
        cfg = config_from_dict(json.loads(meta[_META_CONFIG]))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DecodetError(f"model config in checkpoint is unreadable ({exc})", path) from None
    return cfg, state


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; the authors' files also pickle their
    training options as ``argparse.Namespace``, which we allow-list and nothing more."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else "unpickling failed"
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = found.group(1) if found else "an object"
            raise DecodetError(
                f"checkpoint pickles {what}, which is not allowed by safe loading (not a DECO checkpoint?)", path
            ) from None
        raise DecodetError(f"not a readable checkpoint ({msg})", path) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file is the user's bad input
        # torch.load raises many types on junk bytes (RuntimeError, EOFError, UnicodeDecodeError, and
        # safetensors' own error when it recognises that format): all mean the same to the user.
        msg = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise DecodetError(f"corrupt or truncated checkpoint ({msg})", path) from None


def _read_official(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    state = official_to_ours(_extract_state(safe_torch_load(path), path))
    return infer_config(state, path), state


def _extract_state(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        ema = obj.get("ema")
        if isinstance(ema, dict) and isinstance(ema.get("module"), dict):  # DECO+: prefer EMA weights
            return ema["module"]
        if isinstance(obj.get("model"), dict):
            return obj["model"]
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj  # a bare state dict
    raise DecodetError("no model state dict found (expected a dict with a 'model' or 'ema' entry)", path)


def official_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the authors' DECO keys to ours (DECO+ keys are already ours)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("deco_convnet.") for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        if key.startswith(_DECO_SHARED):
            continue
        for old, new in _DECO_RENAMES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def ours_to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`official_to_ours` for DECO (authors' names, shared box heads)."""
    if not any(k.startswith("query_content.") for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        for old, new in _DECO_RENAMES:
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        out[key] = value
        if key.startswith("bbox_embed."):
            out[_DECO_SHARED + key[len("bbox_embed.") :]] = value
    return out


def _num_classes(state: dict[str, Tensor]) -> int | None:
    for key in ("class_heads.0.weight", "decoder.dec_score_head.0.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def infer_config(state: dict[str, Tensor], path: str | os.PathLike | None = None) -> ModelConfig:
    """Find the preset whose tensors' names and shapes match ``state`` exactly."""
    num_classes = _num_classes(state)
    if num_classes is None:
        raise DecodetError("weights hold no DECO/DECO+ class head (another architecture?)", path)
    want = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    arch = "deco" if "query_content.weight" in state else "decoplus"
    best: tuple[int, str] = (-1, "")
    for name in list_models():
        cfg = get_config(name, num_classes=num_classes)
        if cfg.arch != arch:
            continue
        if isinstance(cfg, DecoConfig) and "backbone.body.bn1.num_batches_tracked" in state:
            cfg = replace(cfg, freeze_backbone_bn=False)
        shapes = _preset_shapes(cfg)
        if shapes == want:
            return _label_coco(cfg, num_classes)
        best = max(best, (len(set(shapes.items()) & set(want.items())), name))
    raise DecodetError(
        f"weights match no known model (closest: {best[1]}); "
        "tensor names or shapes differ — a checkpoint of another architecture?",
        path,
    )


def _preset_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _label_coco(cfg: ModelConfig, num_classes: int) -> ModelConfig:
    """The authors' COCO label layouts: 91 logits = category ids; 80 = ids in ascending order."""
    names = coco_class_names()
    if num_classes == 91:
        return replace(cfg, category_ids=None, class_names=names)
    if num_classes == 80:
        ids = [i for i, n in enumerate(names) if n not in ("N/A", "__background__")]
        return replace(cfg, category_ids=ids, class_names=[names[i] for i in ids])
    return cfg


def _load_state(model: nn.Module, state: dict[str, Tensor], path: str | os.PathLike) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise DecodetError(f"weights do not fit {model.config.name} ({detail})", path)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state, strict=True, assign=True)


def class_head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the class heads (re-initialised when fine-tuning to new classes)."""
    heads = ("class_heads.", "decoder.dec_score_head.", "decoder.enc_score_head.")
    return [k for k in model.state_dict() if k.startswith(heads)]


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Initialise ``model`` from a checkpoint (ours or the authors') for fine-tuning.

    Class heads whose class count differs are left at their fresh initialisation, with a
    warning; any other mismatch means the weights are of another architecture
    (:class:`DecodetError`).  Returns ``{"reinitialised": [...], "loaded": [...]}``.
    """
    model = getattr(model, "module", model)
    src_cfg, state = read_checkpoint(path)
    own = model.state_dict()
    heads = set(class_head_keys(model))
    reinit, loaded, bad = [], {}, []
    for key, value in own.items():
        if key not in state:
            if not key.endswith("num_batches_tracked"):
                bad.append(key)
            continue
        if tuple(state[key].shape) == tuple(value.shape):
            loaded[key] = state[key]
        elif key in heads:
            reinit.append(key)
        else:
            bad.append(key)
    if bad:
        raise DecodetError(
            f"weights ({src_cfg.name}) do not fit {model.config.name}: {len(bad)} tensors missing or "
            f"of another shape, e.g. {bad[0]} — a checkpoint of another architecture?",
            path,
        )
    model.load_state_dict(loaded, strict=False)
    if reinit:
        log.warning(
            "%s: class count differs (%d in the weights, %d here): class heads re-initialised for fine-tuning",
            Path(path).name,
            _num_classes(state) or -1,
            model.config.num_classes,
        )
    return {"reinitialised": reinit, "loaded": list(loaded)}


__all__ = [
    "DecoConfig",
    "DecoPlusConfig",
    "class_head_keys",
    "convert_official",
    "infer_config",
    "load_model",
    "load_weights_into",
    "official_to_ours",
    "ours_to_official",
    "read_checkpoint",
    "safe_torch_load",
    "save_model",
]
