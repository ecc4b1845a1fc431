"""COCO mAP of one trained model on each inference backend: torch fp32, ONNX Runtime fp32,
ONNX Runtime int8 (static quantisation calibrated on training images).

    python benchmarks/bench_backends_map.py --weights runs/demo/best.safetensors --data data/synth

Prints AP / AP50 per backend and the difference to torch fp32 in AP points (x100).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from decodet.data.spec import resolve_data
from decodet.deploy.detector import Detector
from decodet.deploy.export import export_onnx
from decodet.engine.evaluator import evaluate_coco
from decodet.io.coco_results import detections_to_coco


def detections(det: Detector, images_dir: Path, ann_file: Path) -> tuple[list[dict], float]:
    ids = {Path(im["file_name"]).name: im["id"] for im in json.loads(ann_file.read_text())["images"]}
    results, t0 = [], time.perf_counter()
    for r in det.stream(images_dir, batch_size=8):
        image_id = ids[Path(r["path"]).name]
        results.extend(detections_to_coco({image_id: r}, max_dets=None))
    return results, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-count", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = resolve_data(args.data)
    val, train = spec.split("val"), spec.split("train")
    calib = sorted(train.images_dir.iterdir())[: args.calib_count]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(args.weights, Path(tmp) / "fp32.onnx", dynamic_batch=True)
        int8 = export_onnx(
            args.weights, Path(tmp) / "int8.onnx", dynamic_batch=True, precision="int8", calib_images=calib
        )
        backends = [
            ("torch fp32", Detector(args.weights, score_threshold=0.0)),
            ("onnxruntime fp32", Detector(fp32, score_threshold=0.0, threads=args.threads)),
            ("onnxruntime int8", Detector(int8, score_threshold=0.0, threads=args.threads)),
        ]
        for name, det in backends:
            results, seconds = detections(det, val.images_dir, val.ann_file)
            stats = evaluate_coco(val.ann_file, results)
            rows.append((name, stats["AP"], stats["AP50"], seconds))
    base = rows[0][1]
    print(f"{'backend':<18}{'AP':>8}{'AP50':>8}{'dAP (points)':>14}{'seconds':>9}")
    for name, ap, ap50, seconds in rows:
        print(f"{name:<18}{ap:>8.4f}{ap50:>8.4f}{100 * (ap - base):>+14.2f}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
