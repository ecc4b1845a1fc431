"""How far bf16 and int8 inference land from fp32 across kernel paths, thread counts and seeds.

The precision tests (tests/test_precision.py, tests/test_openvino.py) train one tiny model and
compare reduced-precision detections with fp32's.  Their bounds must hold on CPUs we do not
have: other kernels round differently, and the tiny model itself trains to different weights
on another CPU (its fp32 kernels differ too), so near-tied scores fall elsewhere.  This script
measures that spread: for each (oneDNN ISA cap, threads, training seed) it trains the test's
model in a fresh process, then reports, per backend and precision,

* ``matched``: the tests' metric (:func:`test_precision.reproduced`): the fraction of fp32's
  top-5 detections per image that the other run reproduces within the tests' tolerances;
* ``AP``: COCO AP on the tiny validation images, fp32 and the other run (``dAP``: difference).

Usage (from the repository root; one child process per configuration)::

    python benchmarks/precision_spread.py --seeds 0 1 2 --threads 1 2 --isa default AVX SSE41

``--isa`` values are oneDNN's ``ONEDNN_MAX_CPU_ISA`` names (``default``: no cap); the cap is
passed to OpenVINO's oneDNN the same way (and ``OV_CPU_MAX_ISA`` for builds that read it);
``CAP+default`` also sets ``ATEN_CPU_CAPABILITY=default`` (ATen's portable kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(seed: int, threads: int, only: str) -> dict:
    """One configuration in this process: train, then compare every precision with fp32."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    torch.set_num_threads(threads)
    from decodet.cli import main
    from decodet.runtime.detector import Detector
    from test_precision import BF16, INT8, reproduced, run, train_tiny, val_images

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights, data = train_tiny(Path(tmp), seed=seed, threads=threads)
        images = val_images(data)
        common = {"score_threshold": 0.0, "max_det": 30}
        ref = run(Detector(weights, **common), images)
        calib = data / "train"
        runs = {
            "torch bf16": (lambda: Detector(weights, precision="bf16", **common), BF16),
            "torch int8": (lambda: Detector(weights, precision="int8", calib_images=calib, **common), INT8),
            "ort int8": (
                lambda: Detector(weights, backend="onnxruntime", precision="int8", calib_images=calib, **common),
                INT8,
            ),
        }
        try:
            import openvino  # noqa: F401

            runs["openvino bf16"] = (lambda: Detector(weights, backend="openvino", precision="bf16", **common), BF16)
            runs["openvino int8"] = (
                lambda: Detector(weights, backend="openvino", precision="int8", calib_images=calib, **common),
                INT8,
            )
        except ImportError:
            pass
        # bf16 rounded at other points (autocast: fp32 weights cast per op, fp32 heads and
        # accumulation elsewhere): a stand-in for another CPU's bf16 kernels.
        runs["torch bf16 autocast"] = (lambda: Detector(weights, **common), BF16)
        for name, (make, tol) in runs.items():
            if only not in name:
                continue
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.endswith("autocast")):
                    got = run(make(), images)
            except Exception as e:  # a backend missing here is a row with the reason
                out[name] = {"error": f"{type(e).__name__}: {e}"[:120]}
                continue
            out[name] = {"matched": reproduced(ref, got, tol)}
        for precision in ("fp32", "bf16"):
            folder = Path(tmp) / f"eval_{precision}"
            args = ["eval", "--weights", str(weights), "--data", str(data), "--imgsz", "64"]
            main([*args, "--precision", precision, "--out", str(folder)])
            out[f"AP {precision}"] = json.loads((folder / "stats.json").read_text())["AP"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--isa", nargs="+", default=["default", "AVX2", "AVX"])
    parser.add_argument("--only", default="", help="measure only the runs whose name holds this, e.g. bf16")
    parser.add_argument("--child", nargs=2, type=int, metavar=("SEED", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.only)))
        return
    rows = []
    for isa in args.isa:
        env = dict(os.environ)
        cap, _, aten = isa.partition("+")  # e.g. AVX2+default: ATen's portable kernels too
        if cap != "default":
            env.update(ONEDNN_MAX_CPU_ISA=cap, OV_CPU_MAX_ISA=cap)
        if aten:
            env["ATEN_CPU_CAPABILITY"] = aten
        for threads in args.threads:
            env["OMP_NUM_THREADS"] = str(threads)
            for seed in args.seeds:
                cmd = [sys.executable, __file__, "--child", str(seed), str(threads), "--only", args.only]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
                lines = proc.stdout.strip().splitlines()
                if proc.returncode or not lines:
                    print(f"{isa} threads={threads} seed={seed}: failed\n{proc.stderr[-2000:]}", flush=True)
                    continue
                result = json.loads(lines[-1])
                rows.append({"isa": isa, "threads": threads, "seed": seed, **result})
                cells = [f"{k} {v['matched']:.2f}" for k, v in result.items() if isinstance(v, dict) and "matched" in v]
                dap = result["AP bf16"] - result["AP fp32"]
                print(f"{isa:8} t={threads} seed={seed}  AP fp32 {result['AP fp32']:.3f} bf16 dAP {dap:+.3f}  "
                      + "  ".join(cells), flush=True)  # fmt: skip
    names = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict) and "matched" in v})
    print("\nworst case over all configurations:")
    for name in names:
        vals = [r[name]["matched"] for r in rows if "matched" in r.get(name, {})]
        print(f"  {name:14} matched min {min(vals):.2f}  median {sorted(vals)[len(vals) // 2]:.2f}  (n={len(vals)})")
    daps = [abs(r["AP bf16"] - r["AP fp32"]) for r in rows]
    if daps:
        print(f"  |AP bf16 - AP fp32| max {max(daps):.3f}")


if __name__ == "__main__":
    main()
