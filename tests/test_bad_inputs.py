"""Bad inputs through the command line: each is one ``decodet: error:`` line naming the file
(exit status 2) or a documented recovery (skipped with a warning naming the file) -- never a
traceback.  The library-level cases (each bad image kind, each bad annotation, bad weights files)
are in test_data.py, test_checkpoint.py and test_detector.py; this file covers what they leave out.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import decodet
from decodet.cli import main
from decodet.data import load_image
from decodet.errors import DecodetError
from decodet.io.checkpoint import save_model
from decodet.registry import build_model
from decodet.utils.console import rss_mb
from test_trainer import TINY, make_tiny_coco

# deco_tiny shrunk (test_trainer.TINY) as command-line overrides
TINY_FLAGS = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]


def _train_argv(data: Path, runs: Path, *extra: str) -> list[str]:
    argv = ["train", "--model", "deco_tiny", "--data", str(data), "--imgsz", "64", "--epochs", "1"]
    argv += ["--batch-size", "2", "--workers", "0", "--threads", "1", "--project", str(runs), "--name", "t"]
    return argv + [*TINY_FLAGS, *extra]


def _one_line_error(argv: list[str], capsys, names: str | Path) -> str:
    """Run the CLI; assert exit status 2 and exactly one stderr line, the error, naming ``names``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("decodet: error: "), err[0]
    assert str(names) in err[0], (names, err[0])
    return err[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tiny_coco(tmp_path / "data", n_train=4, n_val=2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny deco_tiny checkpoint for the two categories of make_tiny_coco."""
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=2, category_ids=[3, 7], class_names=["red", "green"], **TINY)
    return save_model(model, tmp_path_factory.mktemp("weights") / "tiny.safetensors")


# ----------------------------------------------------------------------------- train: annotations


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"images": [}', "malformed JSON at line 1"),
        ('{"annotations": [], "categories": [{"id": 1}]}', "'images' is missing"),
        ('{"images": [], "categories": [{"id": 1}]}', "'annotations' is missing"),
        ('{"images": [], "annotations": []}', "'categories' is missing"),
    ],
    ids=["malformed", "no-images", "no-annotations", "no-categories"],
)
def test_train_with_a_broken_annotation_file(data: Path, tmp_path: Path, capsys, content: str, problem: str) -> None:
    ann = data / "annotations" / "instances_train.json"
    ann.write_text(content)
    line = _one_line_error(_train_argv(data, tmp_path / "runs"), capsys, ann)
    assert problem in line
    assert not (tmp_path / "runs").exists(), "nothing is written before the data is validated"


def test_train_with_duplicate_image_ids(data: Path, tmp_path: Path, capsys) -> None:
    ann = data / "annotations" / "instances_train.json"
    content = json.loads(ann.read_text())
    content["images"][1]["id"] = content["images"][0]["id"]
    ann.write_text(json.dumps(content))
    assert "duplicate image id 10" in _one_line_error(_train_argv(data, tmp_path / "runs"), capsys, ann)


def test_train_with_bad_annotations_drops_them_with_one_warning(data: Path, tmp_path: Path, caplog, capsys) -> None:
    ann = data / "annotations" / "instances_train.json"
    content = json.loads(ann.read_text())
    good = content["annotations"][0]
    content["annotations"] += [
        {**good, "id": 101, "image_id": 999},  # unknown image
        {**good, "id": 102, "category_id": 42},  # unknown category
        {**good, "id": 103, "bbox": [1, 1, float("nan"), 4]},
        {**good, "id": 104, "bbox": [1, 1, 0, 4]},
        {**good, "id": 105, "bbox": [500, 1, 4, 4]},  # outside the 64 px image
        {**good, "id": 106, "bbox": [50, 50, 40, 40]},  # reaching outside: clipped
    ]
    content["images"].append({"id": 77, "file_name": "000.png", "width": 64, "height": 64})  # no annotations
    ann.write_text(json.dumps(content))  # NaN as JSON's NaN token, which Python's json reads
    with caplog.at_level(logging.WARNING, logger="decodet.data.coco"):
        assert main(_train_argv(data, tmp_path / "runs")) == 0
    assert capsys.readouterr().err == ""
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "decodet.data.coco"]
    assert warning.startswith(str(ann))
    for part in (
        "1 annotations with unknown image",
        "1 annotations with unknown category",
        "NaN",
        "zero or",
        "outside",
    ):
        assert part in warning, (part, warning)
    assert "clipped 1 boxes" in warning


# ----------------------------------------------------------------------------- train: image files


def test_train_skips_missing_and_corrupt_images_with_a_warning(data: Path, tmp_path: Path, capsys, caplog) -> None:
    """A long run must not die on one bad file: it is skipped and named in a warning. With loader
    workers too, where an error would otherwise reach the user as a worker's traceback."""
    (data / "train" / "001.png").unlink()
    truncated = data / "train" / "002.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    empty = data / "val" / "001.png"
    empty.write_bytes(b"")
    with caplog.at_level(logging.INFO):
        assert main(_train_argv(data, tmp_path / "runs", "--workers", "1")) == 0
    assert capsys.readouterr().err == ""
    assert "train: 1 of 4 images are missing (first: 001.png); they are skipped, 3 are used" in caplog.text
    assert "| 3 train images, 2 val images |" in caplog.text  # the count actually used
    assert (tmp_path / "runs" / "t" / "last.safetensors").is_file()
    # a worker's warnings go to its own stderr: check the unreadable files' warnings without workers
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(_train_argv(data, tmp_path / "runs", "--name", "t0")) == 0
    assert f"{truncated}: cannot read image: corrupt or truncated" in caplog.text
    assert f"{empty}: cannot read image: empty file" in caplog.text


def test_train_with_no_image_present_is_one_line(data: Path, tmp_path: Path, capsys) -> None:
    for image in (data / "train").iterdir():
        image.unlink()
    line = _one_line_error(_train_argv(data, tmp_path / "runs"), capsys, data / "train")
    assert "none of the 4 images of instances_train.json is in this folder" in line


# ----------------------------------------------------------------------------- train: weights


def test_train_from_weights_with_another_class_count_reinitialises_heads(
    data: Path, tmp_path: Path, caplog, capsys
) -> None:
    other = save_model(build_model("deco_tiny", num_classes=5, **TINY), tmp_path / "five.safetensors")
    with caplog.at_level(logging.WARNING):
        assert main(_train_argv(data, tmp_path / "runs", "--weights", str(other))) == 0
    assert "five.safetensors: class count differs (5 in the weights, 2 here)" in caplog.text
    assert capsys.readouterr().err == ""


def test_train_from_weights_of_another_architecture_or_truncated(data: Path, tmp_path: Path, capsys) -> None:
    other = save_model(build_model("deco_tiny", num_classes=2), tmp_path / "wide.safetensors")  # not TINY
    line = _one_line_error(_train_argv(data, tmp_path / "runs", "--weights", str(other)), capsys, other)
    assert "do not fit" in line and "another architecture" in line
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(other.read_bytes()[:5000])
    assert "truncated" in _one_line_error(_train_argv(data, tmp_path / "runs", "--weights", str(cut)), capsys, cut)


# ----------------------------------------------------------------------------- eval


def test_eval_with_weights_of_another_architecture(data: Path, tmp_path: Path, capsys) -> None:
    import torchvision

    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), resnet)
    line = _one_line_error(["eval", "--weights", str(resnet), "--data", str(data)], capsys, resnet)
    assert "another architecture" in line


def test_eval_with_truncated_or_foreign_weights(data: Path, tmp_path: Path, weights: Path, capsys) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:3000])
    _one_line_error(["eval", "--weights", str(cut), "--data", str(data)], capsys, cut)
    zip_junk = tmp_path / "junk.pth"
    zip_junk.write_bytes(b"PK\x03\x04" + bytes(200))  # looks like torch's zip format, is not
    _one_line_error(["eval", "--weights", str(zip_junk), "--data", str(data)], capsys, zip_junk)


def test_eval_with_a_text_file_as_weights(data: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    _one_line_error(["eval", "--weights", str(text), "--data", str(data)], capsys, text)


# Every suffix the loader accepts: ours (.safetensors) and the authors' / torch's pickles.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _junk_weights(kind: str, suffix: str, weights: Path, folder: Path) -> Path:
    """A weights file of random bytes, or a real checkpoint cut short, named ``*suffix``."""
    path = folder / f"{kind}{suffix}"
    if kind == "junk":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif suffix == ".safetensors":
        path.write_bytes(weights.read_bytes()[:4000])
    else:  # an authors'-style pickle, truncated
        full = folder / f"full{suffix}"
        torch.save({"model": load_file(str(weights))}, full)
        path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return path


@pytest.mark.parametrize("suffix", WEIGHT_SUFFIXES)
@pytest.mark.parametrize("kind", ["junk", "truncated"])
def test_unreadable_weights_of_every_suffix_are_one_line(
    kind: str, suffix: str, data: Path, tmp_path: Path, weights: Path, capsys
) -> None:
    bad = _junk_weights(kind, suffix, weights, tmp_path)
    image = data / "val" / sorted(p.name for p in (data / "val").iterdir())[0]
    _one_line_error(["predict", str(image), "--weights", str(bad), "--out", str(tmp_path / "p")], capsys, bad)
    _one_line_error(["eval", "--weights", str(bad), "--data", str(data)], capsys, bad)
    with pytest.raises(DecodetError, match=re.escape(str(bad))):
        decodet.Detector(bad)


def test_eval_with_a_model_of_fewer_classes_than_the_data(data: Path, tmp_path: Path, capsys) -> None:
    one = save_model(build_model("deco_tiny", num_classes=1, **TINY), tmp_path / "one.safetensors")
    line = _one_line_error(["eval", "--weights", str(one), "--data", str(data)], capsys, "instances_val.json")
    assert "2 categories" in line and "1 class logits" in line


# ----------------------------------------------------------------------------- predict


def test_predict_on_an_empty_folder(tmp_path: Path, weights: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["predict", str(empty), "--weights", str(weights), "--out", str(tmp_path / "out")]
    assert "no image files" in _one_line_error(argv, capsys, empty)


def test_predict_skips_an_unreadable_image(data: Path, tmp_path: Path, weights: Path, capsys, caplog) -> None:
    folder = data / "val"
    (folder / "000_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    argv = ["predict", str(folder), "--weights", str(weights), "--out", str(out), "--imgsz", "64", "--threshold", "0"]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "000_broken.jpg" in caplog.text
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in out.glob("*.jpg")) == ["000.jpg", "001.jpg"]
    index = json.loads((out / "images.json").read_text())
    assert [Path(i["file_name"]).name for i in index] == ["000.png", "001.png"]
    assert {d["image_id"] for d in json.loads((out / "predictions.json").read_text())} == {1, 2}


def test_predict_on_a_folder_of_unreadable_files(tmp_path: Path, weights: Path, capsys) -> None:
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("text")
    argv = ["predict", str(folder), "--weights", str(weights), "--out", str(tmp_path / "out")]
    assert "none of the 2 files" in _one_line_error(argv, capsys, folder)


# ----------------------------------------------------------------------------- a huge image


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` RGB pixels, followed by a few bytes of data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (2**31 - 1, 2**31 - 1), (50_000, 3_000)])
def test_a_header_claiming_a_huge_image_is_refused_without_allocating(tmp_path: Path, width, height) -> None:
    path = tmp_path / "huge.png"
    _png_header_only(path, width, height)
    before = rss_mb()
    with pytest.raises(DecodetError, match="cannot read image: (too large|.* over the limit)") as info:
        load_image(path)
    assert info.value.path == str(path)
    assert rss_mb() - before < 50  # decoding would need >= 450 MB


def test_a_huge_image_through_the_cli(tmp_path: Path, weights: Path, capsys) -> None:
    path = tmp_path / "huge.png"
    _png_header_only(path, 100_000, 100_000)
    argv = ["predict", str(path), "--weights", str(weights), "--out", str(tmp_path / "out")]
    assert "cannot read image" in _one_line_error(argv, capsys, path)


# ----------------------------------------------------------------------------- image modes through training


def test_every_image_mode_trains(tmp_path: Path) -> None:
    """Grey, RGBA, palette, CMYK, 16-bit and EXIF-rotated files of one dataset all load as RGB with
    their boxes on the upright image (the per-mode pixel checks are in test_data.py)."""
    from decodet.data.coco import CocoDetection
    from decodet.data.transforms import build_transforms, collate

    rng = np.random.default_rng(0)
    root = tmp_path / "modes"
    root.mkdir()
    images = {
        "grey.png": Image.fromarray(rng.integers(0, 255, (40, 60), dtype=np.uint8)),
        "rgba.png": Image.fromarray(rng.integers(0, 255, (40, 60, 4), dtype=np.uint8)),
        "palette.gif": Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).convert("P"),
        "cmyk.jpg": Image.new("CMYK", (60, 40), (0, 255, 255, 0)),
        "sixteen.png": Image.fromarray(rng.integers(0, 65535, (40, 60), dtype=np.uint16)),
    }
    for name, img in images.items():
        img.save(root / name)
    rotated = Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8))  # stored 40 wide, 60 high
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed rotated: 60 wide, 40 high, as annotated
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", exif=exif)
    (root / "exif.jpg").write_bytes(buf.getvalue())
    names = [*images, "exif.jpg"]
    content = {
        "images": [{"id": i, "file_name": n, "width": 60, "height": 40} for i, n in enumerate(names)],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "bbox": [10, 5, 30, 20], "area": 600} for i in range(len(names))
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "ann.json").write_text(json.dumps(content))
    ds = CocoDetection(root, root / "ann.json", transforms=build_transforms("light", train=True, imgsz=64))
    batch = [ds[i] for i in range(len(ds))]
    images_t, targets = collate(batch)
    assert images_t.shape == (len(names), 3, 64, 64) and torch.isfinite(images_t).all()
    # the EXIF image's annotated box stays a box of the same size (not rescaled by a mismatch)
    plain = CocoDetection(root, root / "ann.json")
    image, target = plain[names.index("exif.jpg")]
    assert image.shape == (3, 40, 60) and target["boxes"].tolist() == [[10.0, 5.0, 40.0, 25.0]]


# ----------------------------------------------------------------------------- the real program


def test_the_installed_program_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    """What a user sees: the real stderr of ``python -m decodet`` (logging set up by the CLI)."""
    data = make_tiny_coco(tmp_path / "data", n_train=2, n_val=1)
    (data / "annotations" / "instances_train.json").write_text('{"images": [1, 2,, 3]}')
    cmd = [sys.executable, "-m", "decodet", *_train_argv(data, tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("decodet: error: "), proc.stderr
    assert "instances_train.json: malformed JSON at line 1 column 18" in lines[-1]
