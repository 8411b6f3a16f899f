"""``run.wandb: offline`` logs the same scalars as TensorBoard to a Weights & Biases run in
RUN_DIR/wandb; read back from the run's ``.wandb`` file (LevelDB-log framed protobuf records)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

pytest.importorskip("wandb", reason="needs wandb (pip install -e '.[wandb]'; the dev extra has it)")

from helpers import logging_run  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

from diloco.cli import main  # noqa: E402
from diloco.job.metrics import MetricsLogger, read_metrics  # noqa: E402

_BLOCK, _HEADER = 32768, 7  # LevelDB log framing: 32 KiB blocks, (crc32, length, type) headers


def records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file written so far."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pending, pos = [], b"", _HEADER  # the file header is as long as a record header
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # too little room left in this block: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:
            break
        pending += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(run_dir: Path, timeout_s: float = 60) -> list[dict[str, float]]:
    """The rows logged to the offline W&B run under ``run_dir/wandb`` (``_step`` included),
    once W&B's service has written the run's exit record (``finish()`` may return before)."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    found = records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in found):
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.1)
        found = records(path)
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in found
        if r.WhichOneof("record_type") == "history"
    ]


def by_step(rows: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    return [(row["_step"], row[key]) for row in rows if key in row]


def test_logger_sends_every_finite_scalar_to_an_offline_run(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, wandb="offline", config={"outer": {"lr": 0.7}})
    logger.log({"step": 0, "tokens": 0, "val_loss": 5.5})
    logger.log({"step": 10, "tokens": 640, "loss": 4.25, "val_loss": 4.5})
    logger.log({"step": 20, "tokens": 1280, "loss": float("nan")})
    logger.close()
    rows = history(tmp_path)
    assert by_step(rows, "val_loss") == [(0, 5.5), (10, 4.5)]
    assert by_step(rows, "loss") == [(10, 4.25)]  # NaN stays in the JSONL only
    assert by_step(rows, "tokens") == [(0, 0), (10, 640), (20, 1280)]


def test_disabled_logger_starts_no_wandb_run(tmp_path):
    MetricsLogger(tmp_path, enabled=False, wandb="offline").close()
    assert not (tmp_path / "wandb").exists()


def test_train_with_wandb_offline_logs_the_same_scalars_as_the_jsonl(tmp_path):
    out = tmp_path / "run"
    overrides = logging_run(out, "run.wandb=offline")
    assert main(["train", *(f"--set={o}" for o in overrides)]) == 0
    records = read_metrics(out / "metrics.jsonl")
    rows = history(out)
    for key in ("val_loss", "loss", "lr", "tokens"):
        expected = [(r["step"], pytest.approx(r[key])) for r in records if key in r]
        assert by_step(rows, key) == expected, key
