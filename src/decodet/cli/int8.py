"""int8 options of ``decodet export``: the quantisation choices and the sweep's AP score on a
labelled split (calibration images: :func:`decodet.inference.calibration.calibration_source`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def int8_options(args: argparse.Namespace) -> Any:
    from decodet.export.quantize import Int8Options

    exclude: str | list[str] = args.int8_exclude
    if exclude not in ("auto", "none"):
        exclude = [e.strip() for e in exclude.split(",") if e.strip()]
    return Int8Options(calibrate=args.calib_method, activation=args.int8_activations, exclude=exclude)


def report_path(args: argparse.Namespace, out_path: Path) -> Path:
    report = args.sensitivity_report
    return Path(out_path).with_name(Path(out_path).stem + "_int8_sensitivity.md") if report is True else Path(report)


def int8_kwargs(args: argparse.Namespace, out_path: Path) -> dict:
    """``export_onnx``'s int8 arguments: options, report path, and COCO AP on the validation
    split of ``--data`` as the sweep's score (else the output error against fp32)."""
    if args.precision != "int8":
        return {}
    kwargs: dict = {"int8": int8_options(args)}
    if args.sensitivity_report:
        kwargs["sensitivity_report"] = report_path(args, out_path)
    if args.data is not None and (args.sensitivity_report or args.int8_exclude == "auto"):
        import torch

        from decodet.evaluation.deployed import RunnerEvaluator
        from decodet.inference.graph import as_size, normalization
        from decodet.io.checkpoint import load_model

        cfg = load_model(args.weights).config
        size = as_size(tuple(args.imgsz) if args.imgsz else None, cfg)
        mean, std = normalization(cfg)
        # a fixed-batch export (the default) takes one image per call
        batch = 8 if args.dynamic_batch else 1
        evaluator = RunnerEvaluator(args.data, "val", limit=args.sweep_images, batch_size=batch)

        def score(run) -> float:  # run: numpy feeds -> outputs
            def runner(x, s):
                out = run({"images": x.numpy(), "orig_sizes": s.numpy()})
                return tuple(torch.from_numpy(out[k]) for k in ("boxes", "scores", "labels"))

            return evaluator(runner, size, mean, std)["AP"]

        kwargs["score_fn"] = score
    return kwargs
