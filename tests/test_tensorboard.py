"""``run.tensorboard: true`` mirrors the metrics to event files in RUN_DIR/tensorboard."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard")

from helpers import logging_run  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from diloco.cli import main  # noqa: E402
from diloco.job.metrics import MetricsLogger, read_metrics  # noqa: E402


def scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


def test_logger_writes_every_finite_scalar_as_an_event(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    logger.log({"step": 0, "tokens": 0, "val_loss": 5.5})
    logger.log({"step": 10, "tokens": 640, "loss": 4.25, "val_loss": 4.5})
    logger.log({"step": 20, "tokens": 1280, "loss": float("nan")})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert scalars(tmp_path / "tensorboard", "val_loss") == [(0, 5.5), (10, 4.5)]
    assert scalars(tmp_path / "tensorboard", "loss") == [(10, 4.25)]  # NaN stays in the JSONL only


def test_train_with_tensorboard_writes_the_same_losses_as_the_jsonl(tmp_path):
    out = tmp_path / "run"
    overrides = logging_run(out, "run.tensorboard=true")
    assert main(["train", *(f"--set={o}" for o in overrides)]) == 0
    expected = [(r["step"], r["val_loss"]) for r in read_metrics(out / "metrics.jsonl")]
    assert [step for step, _ in expected] == [0, 5, 10]
    assert scalars(out / "tensorboard", "val_loss") == expected
