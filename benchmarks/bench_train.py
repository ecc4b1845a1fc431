"""Training throughput (images/s) on CPU: fp32 and bf16 autocast, one optimizer step per batch,
with each row's achieved GFLOP/s and its share of the matching matmul peak.

FLOPs of one step: ``torch.utils.flop_counter`` over forward plus backward (convolutions and
matrix products; a multiply-add = 2 FLOPs).  Peaks: the best 2048x2048 fp32 / bf16 matmul
(``decodet.utils.machine.peak_calls``), timed in the same run; fp32 rows are judged against
the fp32 peak, bf16 autocast rows against the bf16 peak.

Each step is the real thing: forward, the preset's criterion (Hungarian matching and all
losses, aux layers included), backward, gradient clipping and a fused AdamW step.  Inputs
are random images with 1-12 random boxes each (speed does not depend on content).

    python benchmarks/bench_train.py                       # deco_tiny and deco_r18, 512x512, batch 4
    python benchmarks/bench_train.py --models deco_r18 --size 512 --batch 4 --threads 2
    python benchmarks/bench_train.py --models deco_tiny --size 160 --batch 8 --layout-ab  # channels-last vs not

``--layout-ab`` times each model and precision in the contiguous layout and in channels-last (model and
input, as ``decodet train`` does on a CPU by default), alternating, and prints the ratio.

For reference (quoted in issue 3, measured on this machine kind with 2 threads): the authors'
DECO-R18 code trains at 1.59 images/s in fp32 and 2.37 with bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import decodet
from decodet.utils.machine import peak_calls


def _batch(b: int, size: int, num_classes: int, gen: torch.Generator):
    images = torch.randn(b, 3, size, size, generator=gen)
    targets = []
    for _ in range(b):
        n = int(torch.randint(1, 13, (1,), generator=gen))
        cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append(
            {"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": torch.cat([cxcy, wh], 1)}
        )
    return images, targets


def step_gflops(name: str, size: int, batch: int) -> float:
    """GFLOPs of one training step's forward + backward (fp32 count)."""
    gen = torch.Generator().manual_seed(0)
    model = decodet.build_model(name, num_classes=80).train()
    criterion = decodet.build_criterion(model.config)
    images, targets = _batch(batch, size, 80, gen)
    counter = FlopCounterMode(display=False)
    with counter:
        criterion(model(images), targets)["loss"].backward()
    return counter.get_total_flops() / 1e9


def peaks(iters: int = 5) -> dict[str, float]:
    """Best GFLOP/s of the fp32 and bf16 matmuls (the training rows' references)."""
    out = {}
    for key, (call, gflop) in peak_calls().items():
        if key == "int8":
            continue
        call()
        best = min(_timed(call) for _ in range(iters))
        out[key] = gflop / best
    return out


def _timed(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def measure(name: str, size: int, batch: int, amp: bool, warmup: int, iters: int, channels_last: bool = False) -> float:
    """Median images/s over ``iters`` steps after ``warmup`` steps."""
    gen = torch.Generator().manual_seed(0)
    model = decodet.build_model(name, num_classes=80).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = decodet.build_criterion(model.config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=True)
    images, targets = _batch(batch, size, 80, gen)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        with ctx():
            out = model(images)
        loss = criterion(out, targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deco_tiny", "deco_r18"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--layout-ab", action="store_true", help="contiguous against channels-last, side by side")
    p.add_argument("--rounds", type=int, default=3, help="--layout-ab: alternating rounds (the median is kept)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.layout_ab:
        layout_ab(args)
        return
    peak = peaks()
    print(f"training throughput, {args.size}x{args.size}, batch {args.batch}, {args.threads} threads")
    print("matmul peaks: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items()))
    head = ["model", "GFLOP/step", "fp32 img/s", "GFLOP/s", "% fp32 pk", "bf16 img/s", "GFLOP/s", "% bf16 pk"]
    print(f"{head[0]:<14}" + "".join(f"{h:>12}" for h in head[1:]) + f"{'bf16/fp32':>11}{'fp32 vs 1.59':>14}")
    for name in args.models:
        gflop = step_gflops(name, args.size, args.batch)
        fp32 = measure(name, args.size, args.batch, False, args.warmup, args.iters)
        bf16 = measure(name, args.size, args.batch, True, args.warmup, args.iters)
        g32, g16 = gflop * fp32 / args.batch, gflop * bf16 / args.batch  # steps/s x GFLOP/step
        p16 = f"{100 * g16 / peak['bf16']:>11.0f}%" if "bf16" in peak else f"{'-':>12}"
        print(
            f"{name:<14}{gflop:>12.1f}{fp32:>12.2f}{g32:>12.1f}{100 * g32 / peak['fp32']:>11.0f}%"
            f"{bf16:>12.2f}{g16:>12.1f}{p16}{bf16 / fp32:>10.2f}x{fp32 / 1.59:>13.2f}x",
            flush=True,
        )


def layout_ab(args: argparse.Namespace) -> None:
    """ms per step, contiguous against channels-last, in alternating rounds (a busy machine slows both)."""
    print(f"training step, {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds")
    print(f"{'model':<14}{'precision':>10}{'contiguous ms':>15}{'channels-last ms':>18}{'ratio':>8}")
    for name in args.models:
        for amp in (False, True):
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for cl in (False, True):
                    ips = measure(name, args.size, args.batch, amp, args.warmup, args.iters, channels_last=cl)
                    times[cl].append(1000 * args.batch / ips)
            a, b = statistics.median(times[False]), statistics.median(times[True])
            print(f"{name:<14}{'bf16' if amp else 'fp32':>10}{a:>15.1f}{b:>18.1f}{a / b:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
