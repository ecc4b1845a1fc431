"""Export a detector as a static web folder that runs it in the browser (ONNX Runtime Web, WASM).

The folder ``decodet export --format web`` writes::

    index.html        the page: choose or drop an image, see the boxes (no CDN, no server code)
    app.js            loads the model, runs it, draws; exposes ``window.lastDetections``
    preprocess.js     Detector's pre-processing in JS (torchvision's uint8 antialiased resize)
    style.css         the page's style
    model.onnx        the ONNX export with post-processing inside (fp32 or int8), batch 1
    model.json        what the page needs from the file's metadata: size, mean/std, classes
    ort/              onnxruntime-web's WASM backend: ort.wasm.min.mjs, ort-wasm-simd-threaded.{mjs,wasm}

onnxruntime-web is not vendored (its WASM binary alone is ~14 MB): the export runs ``npm pack
onnxruntime-web@ORT_WEB_VERSION --prefer-offline`` (npm checks the tarball's integrity) and keeps the three
files in ``~/.cache/decodet`` (``$XDG_CACHE_HOME``); ``ort_web=`` (``--ort-web``) or ``$DECODET_ORT_WEB``
names a package folder or ``.tgz`` instead, for machines without npm. The page runs single-threaded, so it
needs no cross-origin isolation (COOP/COEP): any static server works. ``decodet serve`` serves the same page
(:data:`PAGE_ASSETS`, :func:`page_html` pointing it at its HTTP API).
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from decodet.errors import DecodetError
from decodet.version import __version__

log = logging.getLogger(__name__)

ORT_WEB_VERSION = "1.30.0"
# The WASM backend alone: the JS API, its Emscripten glue and the SIMD binary (its threaded build also runs
# with one thread, without SharedArrayBuffer).
ORT_WEB_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE_FILES = ("index.html", "app.js", "preprocess.js", "style.css")
PAGE_ASSETS = ("decodet.export", "web_assets")  # (package, folder) of PAGE_FILES
WEB_PRECISIONS = ("fp32", "int8")
MARKER = "model.json"


def export_web(
    model_or_weights: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    imgsz: int | tuple[int, int] | None = None,
    calib_images: Any = None,
    threshold: float = 0.25,
    ort_web: str | os.PathLike | None = None,
    int8: Any = None,
) -> Path:
    """Write the static web folder (module docstring) to ``out_dir``; ``out_dir`` is replaced if it holds an
    earlier web export, refused if it holds anything else (written beside it, then renamed into place).
    ``precision``, ``imgsz``, ``calib_images`` and ``int8``: as for ``export_onnx`` (fp32 or int8 only).
    ``threshold``: the page's initial score threshold. ``ort_web``: an onnxruntime-web folder or ``.tgz``
    (default: :func:`ort_web_files`)."""
    import onnx

    from decodet.export.onnx import export_onnx
    from decodet.inference.metadata import parse_metadata

    precision = str(precision).lower()
    if precision not in WEB_PRECISIONS:
        raise DecodetError(f"web export supports precision {' or '.join(WEB_PRECISIONS)}, not {precision!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).is_file())):
        raise DecodetError("output exists and is not an earlier web export; choose a new or empty folder", out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        copy_ort_web(tmp / "ort", ort_web)  # first: fail fast, before the (slower) model export
        model_path = export_onnx(model_or_weights, tmp / "model.onnx", imgsz=imgsz, precision=precision,
                                 calib_images=calib_images, batch=1, int8=int8)  # fmt: skip
        info = parse_metadata({p.key: p.value for p in onnx.load(str(model_path)).metadata_props}, model_path)
        (tmp / MARKER).write_text(json.dumps(page_config(info, threshold), indent=1) + "\n")
        assets = resources.files(PAGE_ASSETS[0]) / PAGE_ASSETS[1]
        for name in PAGE_FILES:  # index.html as it is: its config runs model.onnx in the page
            (tmp / name).write_bytes((assets / name).read_bytes())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a web server may run as another user
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("web export written to %s (serve it with any static file server)", out_dir)
    return out_dir


def page_config(info: Any, threshold: float) -> dict[str, Any]:
    """``model.json``: what the page reads instead of the ONNX metadata (ONNX Runtime Web does not expose
    ``metadata_props``)."""
    cfg = info.config
    names = list(cfg.class_names or [])
    ids = list(cfg.category_ids) if cfg.category_ids is not None else list(range(len(names)))
    return {
        "format": "decodet-web",
        "decodet_version": __version__,
        "onnxruntime_web": ORT_WEB_VERSION,
        "model": cfg.name,
        "precision": info.precision,
        "imgsz": [int(v) for v in info.imgsz],
        "mean": [float(v) for v in info.mean],
        "std": [float(v) for v in info.std],
        "num_top": int(info.num_top),
        "threshold": float(threshold),
        "class_names": {str(int(i)): str(n) for i, n in zip(ids, names)},
    }


def page_html(config: dict[str, Any], base: str = "./") -> str:
    """The page's ``index.html`` with ``config`` as its source of detections (``{"source": "onnx"}``:
    model.onnx beside it, the file's default; ``{"source": "api", "root": ""}``: decodet serve's HTTP API) and
    its other files (app.js, style.css) read from ``base``."""
    page = (resources.files(PAGE_ASSETS[0]) / PAGE_ASSETS[1] / "index.html").read_text(encoding="utf-8")
    data = json.dumps(config).replace("<", "\\u003c")  # no "</script>" inside the element
    page, n = re.subn(r'(<script id="config" type="application/json">).*?(</script>)',
                      lambda m: m[1] + data + m[2], page, count=1)  # fmt: skip
    page, k = re.subn(r'<base href="[^"]*">', lambda _: f'<base href="{html.escape(base)}">', page, count=1)
    if n != 1 or k != 1:
        raise DecodetError("web_assets/index.html lacks its config <script> or its <base>")
    return page


def cache_dir() -> Path:
    """Where the onnxruntime-web files are kept: ``$XDG_CACHE_HOME/decodet`` or ``~/.cache/decodet``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "decodet" / f"onnxruntime-web-{ORT_WEB_VERSION}"


def copy_ort_web(dest: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Write :data:`ORT_WEB_FILES` into the folder ``dest``, from ``source`` (or ``$DECODET_ORT_WEB``): an
    onnxruntime-web package folder (``dist/`` in it or the files themselves) or its npm ``.tgz``; without one,
    from :func:`ort_web_files` (npm)."""
    dest = Path(dest)
    source = source or os.environ.get("DECODET_ORT_WEB") or None
    if source is not None and Path(source).is_file():
        _extract(Path(source), dest)
        return dest
    folder = _package_folder(Path(source)) if source is not None else ort_web_files()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ORT_WEB_FILES:
        shutil.copyfile(folder / name, dest / name)
    return dest


def _package_folder(path: Path) -> Path:
    for folder in (path / "package" / "dist", path / "dist", path):
        if all((folder / n).is_file() for n in ORT_WEB_FILES):
            return folder
    raise DecodetError(f"not an onnxruntime-web package: {', '.join(ORT_WEB_FILES)} not found in it", path)


def ort_web_files(cache: str | os.PathLike | None = None) -> Path:
    """The cache folder (default :func:`cache_dir`) holding :data:`ORT_WEB_FILES`, filled on first use by
    ``npm pack`` (npm's own cache first, then the npm registry). No npm, or npm failing, is a one-line
    :class:`DecodetError`."""
    dest = Path(cache) if cache else cache_dir()
    if all((dest / n).is_file() for n in ORT_WEB_FILES):
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise DecodetError(
            f"web export needs onnxruntime-web {ORT_WEB_VERSION} from npm, and npm was not found; install "
            "Node.js/npm, or pass --ort-web PATH (an onnxruntime-web package folder or .tgz)"
        )
    with tempfile.TemporaryDirectory(prefix="decodet-npm-") as tmp:
        log.info("fetching onnxruntime-web %s with npm pack (npm's cache first)", ORT_WEB_VERSION)
        cmd = [npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--prefer-offline", "--silent",
               "--pack-destination", tmp]  # fmt: skip
        try:
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            what = f"npm pack onnxruntime-web@{ORT_WEB_VERSION}"
            raise DecodetError(f"{what} timed out: is the npm registry reachable?") from None
        tgz = sorted(Path(tmp).glob("onnxruntime-web-*.tgz"))
        if done.returncode != 0 or not tgz:
            err = (done.stderr.strip().splitlines() or ["no tarball written"])[-1]
            raise DecodetError(
                f"npm pack onnxruntime-web@{ORT_WEB_VERSION} failed ({err}); check the npm registry is "
                "reachable, or pass --ort-web PATH (an onnxruntime-web package folder or .tgz)"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            _extract(tgz[0], stage)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(stage, dest)  # a reader sees all three files or none
        finally:
            if stage.exists():
                shutil.rmtree(stage)
    return dest


def _extract(tgz: Path, dest: Path) -> None:
    """Copy :data:`ORT_WEB_FILES` out of an npm tarball into the folder ``dest``, by name only (no other
    member is written, so a hostile archive cannot escape ``dest``)."""
    wanted = {f"package/dist/{n}": n for n in ORT_WEB_FILES}
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name)
                if name and member.isfile():
                    with tar.extractfile(member) as src, open(dest / name, "wb") as out:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, out)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DecodetError(f"cannot read the onnxruntime-web tarball ({exc})", tgz) from None
    missing = [n for n in ORT_WEB_FILES if not (dest / n).is_file()]
    if missing:
        raise DecodetError(f"not an onnxruntime-web tarball: {', '.join(missing)} missing from package/dist", tgz)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
