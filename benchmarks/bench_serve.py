"""Load test of ``decodet serve``: throughput and latency for ``--max-batch 1`` vs ``8``.

For each ``--max-batch`` value, starts ``decodet serve`` on a free port of 127.0.0.1 (a
subprocess), drives it with ``--clients`` concurrent clients (asyncio + httpx, keep-alive)
until ``--requests`` answers came back, and stops it.  Prints images/s, p50/p95/p99 latency,
the mean batch size (from ``/metrics``), errors, and the server's resident memory (RSS, from
/proc) after start-up, after the first 100 requests and at the end.  Talks to 127.0.0.1 only.

    python benchmarks/bench_serve.py                                   # random deco_tiny, 320 px
    python benchmarks/bench_serve.py --weights runs/demo/best.safetensors --requests 2000
    python benchmarks/bench_serve.py --batches 1 4 8 --clients 32 --backend onnxruntime

Without ``--weights`` the model is ``deco_tiny`` with random weights and the bundled data's
classes (the demo's model before training: the same compute).  The images are distinct
synthetic PNGs of ``--image-size``; clients cycle through them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def demo_like_checkpoint(folder: Path) -> Path:
    import torch

    from decodet.data.synthetic import CATEGORY_IDS, CLASS_NAMES
    from decodet.io.checkpoint import save_model
    from decodet.registry import build_model

    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES, category_ids=CATEGORY_IDS)
    return save_model(model.eval(), folder / "deco_tiny_random.safetensors")


def make_images(count: int, size: tuple[int, int]) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        low = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(size, Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def drive(url: str, images: list[bytes], clients: int, total: int, rss_at: dict[int, float], pid: int) -> dict:
    """``clients`` concurrent loops posting images until ``total`` answers; latencies in ms."""
    latencies: list[float] = []
    errors: dict[int, int] = {}
    issued = 0
    done = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued, done
        while issued < total:
            i = issued
            issued += 1
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/detect", content=images[i % len(images)])
                status = r.status_code
            except httpx.HTTPError:
                status = -1
            latencies.append((time.perf_counter() - start) * 1000.0)
            if status != 200:
                errors[status] = errors.get(status, 0) + 1
            done += 1
            if done in rss_at:
                rss_at[done] = rss_mb(pid)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
        text = (await http.get(f"{url}/metrics")).text
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    count = metric(text, "decodet_batch_size_count")
    return {
        "images_s": len(latencies) / wall,
        "p50": q[49],
        "p95": q[94],
        "p99": q[98],
        "errors": errors,
        "mean_batch": metric(text, "decodet_batch_size_sum") / count if count else float("nan"),
        "wall_s": wall,
    }


def run_one(weights: Path, max_batch: int, args: argparse.Namespace, images: list[bytes]) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "decodet", "serve", "--weights", str(weights), "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "1024"]
    cmd += ["--backend", args.backend]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 300 s")
            time.sleep(0.2)
        rss_start = rss_mb(proc.pid)
        rss_at = {100: float("nan"), args.requests: float("nan")}
        res = asyncio.run(drive(url, images, args.clients, args.requests, rss_at, proc.pid))
        res.update(rss_start=rss_start, rss_100=rss_at[100], rss_end=rss_at[args.requests])
        return res
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="default: a random-weight deco_tiny")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="--max-batch values to compare")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=400, help="answers per configuration (>= 100)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="server inference threads")
    p.add_argument("--image-size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    args = p.parse_args()
    if args.requests < 100:
        p.error("--requests must be at least 100")
    images = make_images(32, tuple(args.image_size))
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        weights = args.weights or demo_like_checkpoint(Path(tmp))
        w, h = args.image_size
        print(
            f"model {weights.name}, backend {args.backend}, {args.clients} clients, {args.requests} requests each, "
            f"images {w}x{h}, max wait {args.max_wait_ms:g} ms, {os.cpu_count()} CPUs"
        )
        rows = {b: run_one(weights, b, args, images) for b in args.batches}
    head = f"{'max-batch':>9} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'errors':>7}"
    head += f" {'RSS start':>9} {'RSS @100':>9} {'RSS end':>9} {'end/@100':>8}"
    print(head)
    for b, r in rows.items():
        errors = sum(r["errors"].values())
        print(
            f"{b:>9} {r['images_s']:>7.1f} {r['p50']:>8.0f} {r['p95']:>8.0f} {r['p99']:>8.0f} {r['mean_batch']:>10.2f}"
            f" {errors:>7} {r['rss_start']:>9.0f} {r['rss_100']:>9.0f} {r['rss_end']:>9.0f}"
            f" {r['rss_end'] / r['rss_100']:>8.3f}"
        )
        if errors:
            print(f"  errors by status: {r['errors']}")
    base = rows[min(rows)]["images_s"]
    for b, r in rows.items():
        if b != min(rows):
            print(f"throughput max-batch {b} / max-batch {min(rows)}: {r['images_s'] / base:.2f}x")
    print("RSS in MiB (server process); end/@100 is the memory requirement's ratio (within 1.10)")


if __name__ == "__main__":
    main()
