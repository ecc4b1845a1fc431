"""The metadata an exported file (ONNX, OpenVINO IR) carries, read by the runtimes and written
by the exporters: format tag and version, decodet version, model config, image size,
normalisation, K, precision, opset."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from decodet.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, config_from_dict, config_to_dict
from decodet.errors import DecodetError
from decodet.version import __version__

FORMAT = "decodet-onnx"
FORMAT_VERSION = 1  # bump when inputs/outputs/metadata change incompatibly


@dataclass
class OnnxInfo:
    """What an exported file's metadata says about it."""

    config: ModelConfig
    imgsz: tuple[int, int]
    num_top: int
    precision: str
    dynamic_batch: bool
    opset: int
    decodet_version: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def build_metadata(info: OnnxInfo) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "decodet_version": info.decodet_version,
        "model_config": json.dumps(config_to_dict(info.config)),
        "imgsz": json.dumps(list(info.imgsz)),
        "num_top": str(info.num_top),
        "precision": info.precision,
        "dynamic_batch": json.dumps(info.dynamic_batch),
        "opset": str(info.opset),
        "normalize_mean": json.dumps(list(info.mean)),
        "normalize_std": json.dumps(list(info.std)),
        "inputs": describe_inputs(info.mean, info.std),
        "outputs": "boxes [B,K,4] xyxy pixels; scores [B,K] sorted; labels [B,K] int64 category ids",
    }


def describe_inputs(mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    """The metadata's ``inputs`` text for a graph whose ``images`` are ``(x / 255 - mean) / std``:
    written from the same ``mean``/``std`` as ``normalize_mean``/``normalize_std`` (the config's
    :func:`~decodet.config.normalization`), so it cannot disagree with them."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if all(m == 0.0 for m in mean) and all(s == 1.0 for s in std):
        how = "scaled to [0,1] (x/255, no mean/std)"
    else:
        name = "ImageNet-normalised" if (mean, std) == (IMAGENET_MEAN, IMAGENET_STD) else "normalised"
        how = f"{name} ((x/255 - mean) / std, mean {_numbers(mean)}, std {_numbers(std)})"
    return f"images [B,3,H,W] float32 RGB {how}; orig_sizes [B,2] float32 (h, w)"


def _numbers(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def parse_metadata(meta: dict[str, str], path: str | os.PathLike | None = None) -> OnnxInfo:
    """Validate an ONNX file's ``metadata_props``; a foreign or incompatible file is a
    :class:`DecodetError`."""
    if meta.get("format") != FORMAT:
        raise DecodetError(
            "not an ONNX file exported by decodet (no decodet metadata); export one with `decodet export`", path
        )
    version = meta.get("format_version", "?")
    made_by = meta.get("decodet_version", "unknown")
    if version != str(FORMAT_VERSION):
        raise DecodetError(
            f"ONNX file has decodet export format {version} (written by decodet {made_by}); this decodet "
            f"{__version__} reads format {FORMAT_VERSION} — re-export it with this version",
            path,
        )
    try:
        return OnnxInfo(
            config=config_from_dict(json.loads(meta["model_config"])),
            imgsz=tuple(json.loads(meta["imgsz"])),
            num_top=int(meta["num_top"]),
            precision=meta["precision"],
            dynamic_batch=bool(json.loads(meta["dynamic_batch"])),
            opset=int(meta["opset"]),
            decodet_version=made_by,
            mean=tuple(json.loads(meta["normalize_mean"])),
            std=tuple(json.loads(meta["normalize_std"])),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise DecodetError(f"decodet metadata in the ONNX file is incomplete or corrupt ({exc!r})", path) from None
    except DecodetError as exc:  # config of an unknown architecture / keys from another version
        raise DecodetError(f"model config in the ONNX file does not fit this decodet ({exc})", path) from None
