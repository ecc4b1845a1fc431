"""Data: decoding, dataset locations, COCO-format datasets, augmentation recipes, the synthetic set.

Typical use::

    spec = resolve_data("path/to/dataset")            # folder or data.yaml
    train = CocoDetection.from_split(spec.split("train"), transforms=build_transforms("light", True, 320))
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate)
"""

from decodet.data.coco import CocoDetection, parse_coco
from decodet.data.images import load_image, to_rgb
from decodet.data.spec import DataSpec, SplitSpec, resolve_data
from decodet.data.synthetic import generate_synthetic
from decodet.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    MultiScaleCollate,
    build_transforms,
    collate,
    multiscale_sizes,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RECIPES",
    "CocoDetection",
    "DataSpec",
    "MultiScaleCollate",
    "SplitSpec",
    "build_transforms",
    "collate",
    "generate_synthetic",
    "load_image",
    "multiscale_sizes",
    "parse_coco",
    "resolve_data",
    "to_rgb",
]
