"""The core subcommands: models, train, eval, predict, export, benchmark, convert, demo."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from decodet.cli.options import add_options, options_from
from decodet.runtime.options import EVAL_DEFAULTS, RunOptions

log = logging.getLogger("decodet")


def _cmd_models(args: argparse.Namespace) -> int:
    from decodet.io.hub import WEIGHTS, cache_dir, is_cached
    from decodet.registry import list_models

    rows = [("preset", "named weights", "COCO AP", "cached")]
    for name in list_models():
        named = [w for w in WEIGHTS.values() if w.preset == name]
        rows += [(name, w.name, f"{w.coco_ap:.1f}", "yes" if is_cached(w.name) else "no") for w in named]
        rows += [] if named else [(name, "-", "", "")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"(COCO val2017 box AP published by the authors; cache: {cache_dir() / 'weights'})")
    return 0


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from decodet.engine.train_config import parse_train_args
    from decodet.engine.trainer import train

    cfg = parse_train_args(rest)
    metrics = train(cfg)
    if metrics:
        from decodet.utils.distributed import is_main

        if is_main():
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from decodet.evaluation.evaluate import evaluate_checkpoint
    from decodet.evaluation.evaluator import format_stats

    if args.plots and args.out is None:
        args.out = Path("runs/eval")
    stats = evaluate_checkpoint(
        args.weights, args.data, args.split, options_from(args), args.out, plots=args.plots,
        plot_threshold=args.plot_threshold,
    )  # fmt: skip
    from decodet.utils.distributed import is_main

    if is_main():
        print(format_stats(stats))
        if args.plots:
            from decodet.evaluation.analysis import PER_CLASS_CSV, format_per_class, read_per_class_csv

            print(format_per_class(read_per_class_csv(args.out / PER_CLASS_CSV)))
            print(f"per-class table, PR curves, confusion matrix and worst images written to {args.out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from decodet.predict.images import predict_to_folder

    out = predict_to_folder(
        args.source, args.weights, args.out, options_from(args), ann_file=args.ann, stride=args.stride,
        as_video=args.as_video, fps=args.fps,
    )  # fmt: skip
    from decodet.inference.video import is_video

    if is_video(args.source) or args.as_video or args.fps is not None:
        print(f"drawn video and per-frame detections (JSON Lines) written to {out}")
    else:
        print(f"detections and drawn images written to {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from decodet.cli.int8 import int8_kwargs, int8_options, report_path
    from decodet.export.onnx import export_onnx
    from decodet.inference.calibration import calibration_source

    calib = calibration_source(args.calib_images, args.data) if args.precision == "int8" else args.calib_images
    imgsz = tuple(args.imgsz) if args.imgsz else None
    out_path = args.out or args.dest
    w = Path(args.weights)
    folder, stem = (w, w.name) if w.is_dir() else (w.parent, w.stem)
    if args.format == "web":
        from decodet.export.web import export_web

        out_dir = out_path or folder / f"{stem}_web"
        int8 = int8_options(args) if args.precision == "int8" else None
        out = export_web(args.weights, out_dir, args.precision, imgsz, calib, ort_web=args.ort_web, int8=int8)
        print(f"exported {out}/ (serve it: python -m http.server -d {out})")
        return 0
    if out_path is None:
        suffix = "" if args.precision == "fp32" else f"_{args.precision}"
        out_path = folder / f"{stem}{suffix}{'.xml' if args.format == 'openvino' else '.onnx'}"
    if args.format == "openvino":
        from decodet.export.openvino import export_openvino

        if args.precision == "fp16" or args.dynamic_batch or args.opset is not None:
            log.warning("--format openvino: fp16, --dynamic-batch and --opset do not apply (IRs have a dynamic batch)")
        out = export_openvino(
            args.weights, out_path, imgsz=imgsz, precision=args.precision, calib_images=calib,
            calib_count=args.calib_count, int8_scheme=args.int8_scheme,
        )  # fmt: skip
        print(f"exported {out} (+ {out.with_suffix('.bin').name})")
        return 0
    out = export_onnx(
        args.weights, out_path, imgsz=imgsz, opset=args.opset, dynamic_batch=args.dynamic_batch,
        precision=args.precision, calib_images=calib, calib_count=args.calib_count, **int8_kwargs(args, out_path),
    )  # fmt: skip
    print(f"exported {out}")
    if args.precision == "int8" and args.sensitivity_report:
        print(f"int8 sensitivity report written to {report_path(args, out_path)} (and .csv)")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from decodet.bench.benchmark import format_table, rows_to_dicts, run_benchmark
    from decodet.inference.calibration import calibration_source
    from decodet.utils.machine import format_header, machine_info

    accuracy = None
    if args.data is not None:
        if args.weights is None:
            log.warning("--data without --weights: AP of random weights says nothing; pass --weights")
        from decodet.evaluation.deployed import RunnerEvaluator

        accuracy = RunnerEvaluator(args.data, "val", limit=args.ap_images, batch_size=max(1, args.throughput_batch))
    info = machine_info(args.threads)
    rows = run_benchmark(
        args.model, imgsz=args.imgsz, batch=args.batch, threads=args.threads, warmup=args.warmup, iters=args.iters,
        include_hf=not args.no_hf, include_compile=not args.no_compile, include_pt2e=not args.no_pt2e,
        include_openvino=not args.no_openvino, weights=args.weights, throughput_batch=args.throughput_batch,
        calib_images=calibration_source(args.calib_images, args.data), accuracy=accuracy, only=args.only,
    )  # fmt: skip
    print(format_header(info))
    print()
    print(format_table(rows, args.throughput_batch))
    if args.json is not None:
        import json

        from decodet.io.atomic import atomic_path

        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps({"machine": info, "rows": rows_to_dicts(rows)}, indent=1, default=str))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from decodet.io.checkpoint import convert_official

    out = convert_official(args.src, args.out)
    print(f"wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from decodet.demo import run_demo

    kwargs = {} if args.minutes is None else {"minutes": args.minutes}
    run_demo(data_dir=args.data, out_dir=args.out, threads=args.threads, **kwargs)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the core subcommands to the ``decodet`` parser's subparsers."""
    sub.add_parser("models", help="list model presets and named pretrained weights").set_defaults(func=_cmd_models)
    tr = sub.add_parser("train", help="train a model (see `decodet train --help`)", add_help=False)
    tr.set_defaults(func=_cmd_train, passthrough=True)
    for add in (_add_eval, _add_predict, _add_export, _add_benchmark):
        add(sub)
    cv = sub.add_parser("convert", help="convert the authors' .pth checkpoint to ours")
    cv.add_argument("src", type=Path)
    cv.add_argument("out", type=Path)
    cv.set_defaults(func=_cmd_convert)
    de = sub.add_parser("demo", help="generate the bundled data, train deco_tiny (~10 min CPU), evaluate, draw")
    de.add_argument("--data", type=Path, default=Path("data/synth"))
    de.add_argument("--out", type=Path, default=Path("runs/demo"))
    de.add_argument("--minutes", type=float, default=None, help="training time budget in minutes (default: 12.5)")
    de.add_argument("--threads", type=int, default=None)
    de.set_defaults(func=_cmd_demo)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="COCO mAP of a checkpoint on a dataset split")
    ev.add_argument("--weights", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--split", default="val")
    ev.add_argument("--out", type=Path, default=None, help="also write detections JSON and stats here")
    ev.add_argument(
        "--plots",
        action="store_true",
        help="also write a per-class table, PR curves, a confusion matrix and the worst images (to --out, "
        "default runs/eval)",
    )
    ev.add_argument("--plot-threshold", type=float, default=RunOptions.score_threshold,
                    help="score threshold of the confusion matrix")  # fmt: skip
    # --backend, --precision or --compile (or an exported file): the deployed model through Detector
    # at its fixed size, every detection up to COCO's 100
    add_options(ev, skip=("score_threshold", "max_det", "classes"), defaults=EVAL_DEFAULTS)
    ev.set_defaults(func=_cmd_eval)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="detect objects in images or a video, draw them, write the detections")
    pr.add_argument("source", help="image file, folder or glob; or a video file (.mp4, .mov, .mkv, ...)")
    pr.add_argument("--weights", required=True)
    pr.add_argument("--out", type=Path, default=Path("runs/predict"))
    pr.add_argument("--ann", default=None, help="COCO annotation JSON: take image ids from it (for evaluation)")
    pr.add_argument("--stride", type=int, default=1, help="video: detect every K-th frame")
    pr.add_argument("--as-video", action="store_true", help="treat a folder of images as the frames of a video")
    pr.add_argument("--fps", type=float, default=None, help="frame rate of --as-video frames (default 30; implies it)")
    add_options(pr)
    pr.set_defaults(func=_cmd_predict)


def _add_export(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export to ONNX with post-processing inside the graph")
    ex.add_argument("--weights", required=True)
    ex.add_argument(
        "--format",
        choices=("onnx", "openvino", "web"),
        default="onnx",
        help="openvino: an OpenVINO IR (.xml + .bin); web: a static in-browser page",
    )
    ex.add_argument("dest", nargs="?", type=Path, default=None, help="same as --out")
    ex.add_argument("--out", type=Path, default=None, help="output .onnx or web folder (default: beside the weights)")
    ex.add_argument("--ort-web", default=None, help="web: onnxruntime-web package folder or .tgz (default: npm)")
    ex.add_argument("--opset", type=int, default=None)
    ex.add_argument("--dynamic-batch", action="store_true")
    ex.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default="fp32")
    ex.add_argument("--imgsz", type=int, nargs=2, metavar=("H", "W"), default=None)
    ex.add_argument("--data", default=None, help="int8: dataset; calibrate on its train split, rank layers by val AP")
    add_options(ex, only=("calib_images", "calib_count", "int8_scheme"))  # --calib default: --data's train split
    ex.add_argument("--calib-method", choices=("minmax", "percentile", "entropy"), default="minmax")
    ex.add_argument("--int8-activations", choices=("uint8", "int8"), default="uint8")
    ex.add_argument(
        "--int8-exclude",
        default="auto",
        help="int8: layer groups kept fp32: auto (measured sweep), none, or comma-separated group/node names",
    )
    ex.add_argument(
        "--sensitivity-report",
        nargs="?",
        const=True,
        default=None,
        help="int8: write the per-layer-group sweep (Markdown + CSV; default beside the .onnx)",
    )
    ex.add_argument("--sweep-images", type=int, default=50, help="int8 with --data: val images scored per sweep step")
    ex.set_defaults(func=_cmd_export)


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    be = sub.add_parser(
        "benchmark", help="speed (and AP) table: eager, bf16, compile, ONNX Runtime, PT2E, OpenVINO, DETR, RT-DETR"
    )
    be.add_argument("--model", default="deco_r50")
    be.add_argument("--batch", type=int, default=1)
    be.add_argument("--warmup", type=int, default=3)
    be.add_argument("--iters", type=int, default=10)
    be.add_argument("--no-hf", action="store_true", help="skip the Hugging Face DETR / RT-DETR rows")
    be.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    be.add_argument("--no-pt2e", action="store_true", help="skip the PT2E int8 row")
    be.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO rows")
    be.add_argument("--weights", default=None, help="checkpoint to benchmark (default: random weights)")
    be.add_argument("--data", default=None, help="dataset: AP on its val split; int8 calibrates on its train split")
    add_options(be, only=("imgsz", "threads", "calib_images"), defaults={"imgsz": 640, "threads": 2})
    be.add_argument("--ap-images", type=int, default=None, help="score AP on the first N val images only")
    be.add_argument("--throughput-batch", type=int, default=8, help="batch of the images/s column (0: none)")
    be.add_argument("--only", nargs="+", default=None, help="keep rows whose 'runtime precision' contains these")
    be.add_argument("--json", type=Path, default=None, help="also write the table and header as JSON here")
    be.set_defaults(func=_cmd_benchmark)
