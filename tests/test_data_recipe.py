"""The recipe that reads the data (decodet.engine.data_recipe): each choice from the statistics, only where
the option was left unset, logged with its reason; and what a run records."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from decodet.data.coco import ImageRecord
from decodet.engine.data_recipe import (
    AMP_MIN_STEPS,
    MIN_IMGSZ,
    SHRINK_OBJECT_PX,
    DataStats,
    apply_data_recipe,
    augment_for,
    choose_amp,
    choose_imgsz,
    choose_query_grid,
    size_step,
)
from decodet.engine.run_plan import EMA_DECAY_MAX, ema_decay_for
from decodet.engine.train_config import TrainConfig, parse_train_args, resolve


def records(n: int, side: int = 320, boxes_per_image: int = 3, box: float = 40.0) -> list[ImageRecord]:
    out = []
    for i in range(n):
        b = np.array([[10, 10, 10 + box, 10 + box]] * boxes_per_image, dtype=np.float32).reshape(-1, 4)
        out.append(ImageRecord(i, f"{i}.png", side, side * 3 // 4, b, np.zeros(len(b), dtype=np.int64)))
    return out


def stats(**kw) -> DataStats:
    base = dict(images=1000, long_side=320.0, boxes_median=3, boxes_p99=5, box_side_p10=30.0, box_side_median=50.0)
    return DataStats(**{**base, **kw})


def test_stats_read_the_records() -> None:
    recs = records(9, side=256, boxes_per_image=2, box=20.0) + records(1, side=640, boxes_per_image=40, box=5.0)
    s = DataStats.of(recs)
    assert s.images == 10 and s.long_side == 256 and s.boxes_median == 2
    assert 36 < s.boxes_p99 <= 40 and s.box_side_p10 == pytest.approx(5.0) and s.box_side_median == pytest.approx(5.0)
    empty = DataStats.of(records(3, boxes_per_image=0))
    assert (empty.boxes_p99, empty.box_side_p10) == (0.0, 0.0)


def test_image_size_follows_the_smallest_boxes() -> None:
    size, why = choose_imgsz(320, stats(long_side=1280, box_side_p10=48))  # 12 px at 320: kept
    assert size == 320 and "a tenth of the boxes are 12 px or more there" in why
    size, why = choose_imgsz(320, stats(long_side=1280, box_side_p10=16))  # 4 px at 320 -> 640 (the cap)
    assert size == 640 and "under 4.0 px" in why
    assert choose_imgsz(320, stats(long_side=480, box_side_p10=6))[0] == 480  # never past the images' side
    assert choose_imgsz(320, stats(long_side=1280, box_side_p10=28))[0] == 384  # 7 px -> 8 px at 384 (x32)
    assert choose_imgsz(320, stats(long_side=250, box_side_p10=3))[0] == 320  # small images: the preset's
    assert choose_imgsz(320, stats(long_side=256, box_side_p10=0))[0] == 320  # no boxes: the preset's


def test_image_size_shrinks_while_the_smallest_boxes_stay_wide_enough() -> None:
    size, why = choose_imgsz(320, stats(long_side=1280, box_side_p10=160))  # 40 px at 320 -> 20 at 160
    assert size == 160 and "a tenth of the boxes are 20 px or more there (40 at the preset's 320" in why
    assert "0.25x the pixels per step" in why
    assert choose_imgsz(320, stats(long_side=1280, box_side_p10=80))[0] == 320  # 20 px: 12 would need 192
    assert choose_imgsz(320, stats(long_side=1280, box_side_p10=80), step=64)[0] == 192  # another query grid
    assert choose_imgsz(320, stats(long_side=256, box_side_p10=19.4))[0] == 160  # the bundled set: 24 px at 320
    assert choose_imgsz(320, stats(long_side=256, box_side_p10=32))[0] == 160  # large boxes
    assert choose_imgsz(320, stats(long_side=320, box_side_p10=13.5))[0] == 320  # the photo set: 13.5 px, kept
    assert choose_imgsz(320, stats(long_side=320, box_side_p10=6))[0] == 320  # the small set: kept
    # the size steps keep the stride-16 memory a whole multiple of the query grid
    assert (size_step((10, 10)), size_step((11, 11)), size_step((4, 4))) == (160, 352, 64)
    size, why = choose_imgsz(320, stats(long_side=256, box_side_p10=32), short=False)  # a long run: not measured
    assert size == 320 and "the preset's on a long run" in why
    long_run = TrainConfig(model="deco_tiny", time_budget_min=60)
    assert apply_data_recipe(long_run, resolve(long_run), stats(long_side=256, box_side_p10=32)).imgsz == 320
    short = TrainConfig(model="deco_tiny", time_budget_min=5)
    assert apply_data_recipe(short, resolve(short), stats(long_side=256, box_side_p10=32)).imgsz == 160
    for p10 in np.linspace(0.5, 200, 97):  # never below the floor, never a box under the limit made by shrinking
        size = choose_imgsz(320, stats(long_side=320, box_side_p10=float(p10)))[0]
        assert size % 32 == 0 and size >= MIN_IMGSZ
        if size < 320:
            assert p10 * size / 320 >= SHRINK_OBJECT_PX and size % 160 == 0


def test_augmentation_follows_the_run_length_then_the_split_size() -> None:
    short = resolve(TrainConfig(time_budget_min=5))
    assert augment_for(300, short) == ((0.0, 0.0, 0.0), "a 5-minute run (augmenting from 30)")
    assert augment_for(300, resolve(TrainConfig()))[0] == (0.0, 0.0, 0.0)  # 12 epochs
    long = resolve(TrainConfig(time_budget_min=60))
    assert augment_for(300, long)[0] == (0.4, 0.1, 0.2)
    assert augment_for(800, long)[0] == (0.2, 0.05, 0.1)
    assert augment_for(3000, long)[0] == (0.0, 0.0, 0.0)
    assert augment_for(300, resolve(TrainConfig(epochs=50)))[0] == (0.4, 0.1, 0.2)


def test_query_grid_grows_for_crowded_images_keeping_its_aspect() -> None:
    cfg = resolve(TrainConfig(model="deco_tiny"))  # 10 x 10
    assert choose_query_grid(cfg, stats(boxes_p99=60)) is None  # 100 queries hold 60 objects (measured better)
    assert choose_query_grid(cfg, stats(boxes_p99=100)) is None
    qh, qw = choose_query_grid(cfg, stats(boxes_p99=130))
    assert qh * qw >= 130 and abs(qh - qw) <= 1
    cfg = resolve(TrainConfig(model="decoplus_r18"))  # 15 x 20
    qh, qw = choose_query_grid(cfg, stats(boxes_p99=400))
    assert qh * qw >= 400 and qh < qw


def test_training_time_aids_stay_off_unless_asked() -> None:
    """Mosaic and one-to-many matching cost AP at equal wall-clock on the tuning sets (docs/convergence.md)."""
    for crowd in (3, 40):
        given = TrainConfig(model="deco_tiny", time_budget_min=5)
        cfg = apply_data_recipe(given, resolve(given), stats(boxes_median=crowd, boxes_p99=crowd + 20))
        assert cfg.mosaic == 0.0 and not cfg.model_overrides.get("one_to_many")
    given = TrainConfig(model="deco_tiny", model_overrides={"one_to_many": 2}, mosaic=0.25)
    cfg = apply_data_recipe(given, resolve(given), stats(boxes_median=40, boxes_p99=60))
    assert cfg.model_overrides["one_to_many"] == 2 and cfg.mosaic == 0.25  # flags win


def test_precision_is_timed_only_for_runs_long_enough() -> None:
    assert choose_amp(resolve(TrainConfig(time_budget_min=10)), stats())[0] == "auto"
    amp, why = choose_amp(resolve(TrainConfig(time_budget_min=0.5)), stats())
    assert amp == "none" and "too short" in why
    assert choose_amp(resolve(TrainConfig(epochs=12, batch_size=4)), stats(images=1000))[0] == "auto"  # 3,000 steps
    amp, why = choose_amp(resolve(TrainConfig(epochs=2, batch_size=4)), stats(images=100))
    assert amp == "none" and "50 steps" in why and 50 < AMP_MIN_STEPS
    assert choose_amp(resolve(TrainConfig(epochs=12, max_steps=10)), stats(images=1000))[0] == "none"


def test_unset_options_are_chosen_given_ones_stay(caplog) -> None:
    crowded = stats(images=300, long_side=256, boxes_p99=160)
    given = TrainConfig(model="deco_tiny", time_budget_min=5)
    with caplog.at_level(logging.INFO, logger="decodet.engine.data_recipe"):
        cfg = apply_data_recipe(given, resolve(given), crowded)
    # (the grown grid allows no smaller size whose memory is a whole multiple of it: the preset's 320)
    assert cfg.imgsz == 320 and (cfg.zoom, cfg.shift, cfg.jitter) == (0.0, 0.0, 0.0) and cfg.amp == "auto"
    grid = cfg.model_overrides["query_grid"]
    assert grid[0] * grid[1] >= 160 and cfg.model_overrides["num_top_queries"] == grid[0] * grid[1]
    assert cfg.fit_schedule and cfg.lr == 1e-3 and cfg.clip_grad == 1.0 and cfg.loss_overrides == {"weight_class": 3.0}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data recipe: ")]
    kinds = ["image", "augmentation", "queries", "precision"]
    assert [line.split(":")[1].split()[0] for line in lines] == kinds
    # every flag overrides its choice
    flags = dict(imgsz=320, zoom=0.0, amp="none", model_overrides={"query_grid": (4, 4)}, clip_grad=0.1)
    given = TrainConfig(model="deco_tiny", time_budget_min=5, loss_overrides={"weight_class": 1}, **flags)
    cfg = apply_data_recipe(given, resolve(given), crowded)
    assert (cfg.imgsz, cfg.zoom, cfg.amp, cfg.model_overrides["query_grid"], cfg.clip_grad) == (
        320,
        0,
        "none",
        (4, 4),
        0.1,
    )
    assert cfg.loss_overrides == {"weight_class": 1}
    # ... and so does the same flag on the command line (its "none" is fp32, not "unset")
    given = parse_train_args(["--model", "deco_tiny", "--time-budget-min", "5", "--amp", "none"])
    assert apply_data_recipe(given, resolve(given), crowded).amp == "none"
    # starting from weights: the checkpoint's query layout stays
    given = TrainConfig(model="deco_tiny", weights="w.safetensors")
    assert "query_grid" not in apply_data_recipe(given, resolve(given), crowded).model_overrides
    # the published recipes keep their own size (rtdetr: 640 multi-scale)
    given = TrainConfig(model="decoplus_r18")
    assert apply_data_recipe(given, resolve(given), crowded).imgsz == resolve(given).imgsz


def test_ema_decay_is_sized_to_the_run() -> None:
    assert ema_decay_for(2000) == pytest.approx(1 - 1 / 200)  # 10% of the run: the demo's 0.995
    assert ema_decay_for(10) == pytest.approx(1 - 1 / 20)  # at least 20 updates
    assert ema_decay_for(10_000_000) == EMA_DECAY_MAX  # DECO+'s published 0.9999


@pytest.mark.slow
def test_a_run_logs_and_records_its_choices(tmp_path: Path, caplog) -> None:
    """A fresh run with the options unset: the log has one line per choice, train_config.yaml the values, and
    the resumed run keeps them."""
    from tests.test_trainer import make_tiny_coco, tiny_config

    from decodet.engine.trainer import train

    data = make_tiny_coco(tmp_path / "data", sizes=((96, 72),))
    cfg = tiny_config(tmp_path, data, imgsz=None, max_steps=2, epochs=1, ema=True)
    with caplog.at_level(logging.INFO):
        train(cfg)
    text = caplog.text
    assert "data recipe: image size 160: a tenth of the boxes are" in text  # 96 px images of large boxes
    assert (
        "data recipe: augmentation a flip only: a run of 1 epochs" in text
        and "data recipe: precision none: a run of 2 steps" in text
    )
    saved = TrainConfig.load(tmp_path / "runs" / "t" / "train_config.yaml")
    assert (saved.imgsz, saved.zoom, saved.amp) == (160, 0.0, "none")
    assert saved.ema_decay == pytest.approx(ema_decay_for(2), abs=1e-6) and saved.fit_schedule is False
