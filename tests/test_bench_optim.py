"""``diloco bench optim``: compute-factor arithmetic on synthetic curves, the run scheduler, the
tuning protocol (every horizon tuned, grids extended past an edge) on synthetic losses, and a
tiny --quick run.

Compute factor = x the baseline needs to reach its own final val loss ÷ x the method needs to
reach that loss, where "reach" is the first crossing of the eval curve, interpolated linearly.
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from diloco.bench.compute_factor import (
    compute_factor,
    factor_bound,
    format_factor,
    mean_curve,
    reach_point,
)
from diloco.bench.optim import _run_protocol
from diloco.bench.plan import BY_NAME, MAX_EXTENSIONS, Plan, beyond_edge
from diloco.bench.runner import _Slots
from diloco.cli import main
from diloco.config import Config, config_to_dict

# Baseline: loss 5 - 0.003 x, evaluated every 100; final loss 2.0 at x = 1000.
BASELINE = [(x, 5 - 0.003 * x) for x in range(0, 1001, 100)]


def test_baseline_against_itself_is_one():
    assert compute_factor(BASELINE, BASELINE) == pytest.approx(1.0)


def test_monotone_faster_method_on_an_eval_point():
    method = [(x, max(5 - 0.006 * x, 1.5)) for x in range(0, 1001, 100)]  # 2.0 at x = 500
    assert reach_point(method, 2.0) == pytest.approx(500)
    assert compute_factor(BASELINE, method) == pytest.approx(2.0)


def test_target_between_eval_points_is_interpolated_linearly():
    method = [(x, 5 - 0.004 * x) for x in range(0, 1001, 100)]  # 2.2 at 700, 1.8 at 800
    assert reach_point(method, 2.0) == pytest.approx(750)
    assert compute_factor(BASELINE, method) == pytest.approx(1000 / 750)


def test_slower_start_then_crossing():
    method = [(0, 5.0), (300, 4.5), (600, 3.0), (900, 1.9), (1000, 1.8)]
    crossing = 600 + (3.0 - 2.0) / (3.0 - 1.9) * 300  # 872.7
    assert compute_factor(BASELINE, method) == pytest.approx(1000 / crossing)


def test_first_crossing_counts_even_if_the_curve_rebounds():
    method = [(0, 5.0), (400, 1.9), (800, 2.5), (1000, 2.4)]
    crossing = (5.0 - 2.0) / (5.0 - 1.9) * 400
    assert compute_factor(BASELINE, method) == pytest.approx(1000 / crossing)


def test_slower_method_that_gets_there_has_factor_below_one():
    method = [(x, 5 - 0.0015 * x) for x in range(0, 2001, 200)]  # 2.0 at x = 2000
    assert compute_factor(BASELINE, method) == pytest.approx(0.5)


def test_never_reached_has_no_factor_and_an_upper_bound():
    method = [(0, 5.0), (500, 3.0), (1000, 2.5)]
    assert reach_point(method, 2.0) is None
    assert compute_factor(BASELINE, method) is None
    assert factor_bound(BASELINE, method) == pytest.approx(1.0)
    assert format_factor(None, 1.0) == "<1.00x (not reached)"


def test_noisy_baseline_reaches_its_final_loss_before_the_end():
    baseline = [(0, 5.0), (500, 1.9), (1000, 2.0)]
    reached = (5.0 - 2.0) / (5.0 - 1.9) * 500  # 483.9, not 1000
    assert reach_point(baseline, 2.0) == pytest.approx(reached)
    assert compute_factor(baseline, baseline) == pytest.approx(1.0)
    method = [(0, 5.0), (250, 2.0), (1000, 1.5)]
    assert compute_factor(baseline, method) == pytest.approx(reached / 250)


def test_tokens_as_x_compare_different_batch_sizes():
    # A 2x-batch run logs twice the tokens per step: equal steps are not equal tokens.
    base_tokens = [(s * 1024, 5 - 0.003 * s) for s in range(0, 1001, 100)]
    double = [(s * 2048, 5 - 0.004 * s) for s in range(0, 1001, 100)]  # 2.0 at step 750
    assert compute_factor(base_tokens, double) == pytest.approx(1000 / (750 * 2))


def test_diverged_points_never_reach_the_target():
    assert reach_point([(0, 5.0), (100, math.nan), (200, math.nan)], 2.0) is None
    assert compute_factor(BASELINE, [(0, math.nan), (1000, math.nan)]) is None
    # after a non-finite point there is nothing to interpolate from: the eval point itself
    assert reach_point([(0, 5.0), (100, math.nan), (200, 1.0)], 2.0) == 200


def test_format_factor():
    assert format_factor(1.2345) == "1.23x"
    assert format_factor(None) == "n/a"


def test_mean_curve_over_seeds_keeps_common_points():
    a = [(0, 4.0), (100, 3.0), (200, 2.0)]
    b = [(0, 6.0), (100, 3.5), (200, 2.5), (300, 2.0)]
    assert mean_curve([a, b]) == [(0, 5.0), (100, 3.25), (200, 2.25)]


def test_quick_writes_three_outputs_and_reuses_its_cache(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "optim", "--quick", "--tiny-test", "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["executed"] == len(results["runs"]) > 0
    methods = {row["method"] for row in results["table"]}
    expected = {
        "adamw", "muon", "snoo_adamw", "snoo_muon",
        "ema1_adamw", "ema1_muon", "ema8_adamw", "adamw_2x",
    }  # fmt: skip
    assert methods == expected  # diloco_g2 (torchrun) is left out of --tiny-test
    assert {row["steps"] for row in results["table"]} == {10, 20}  # two horizons
    adamw = [row for row in results["table"] if row["method"] == "adamw"]
    assert all(row["vs AdamW"]["factor"] == pytest.approx(1.0) for row in adamw)
    table = (out / "results.md").read_text()
    assert "| SNOO (Muon) |" in table and "CF vs AdamW" in table
    assert "CF vs AdamW" in first  # the table is printed

    assert main(args) == 0  # second invocation: everything from the cache
    again = json.loads((out / "results.json").read_text())
    assert again["meta"]["executed"] == 0
    assert again["meta"]["reused"] == len(results["runs"])
    assert again["table"] == results["table"]


def _start(slots: _Slots, order: list[str], name: str, n: int, priority: int, hold=None):
    def body():
        with slots.take(n, priority):
            order.append(name)
            if hold is not None:
                hold.wait(10)

    thread = threading.Thread(target=body)
    thread.start()
    return thread


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _queue_behind_a_holder(capacity: int, holder_slots: int, waiters: list[tuple[str, int, int]]):
    """A holder takes ``holder_slots`` of ``capacity`` and keeps them until released; then each
    (name, slots, priority) of ``waiters`` queues up, in this order. Returns (start order so
    far, the holder's release event, the threads)."""
    slots, order, release = _Slots(capacity), [], threading.Event()
    threads = [_start(slots, order, "holder", holder_slots, 0, release)]
    _wait_until(lambda: order == ["holder"])
    for queued, (name, n, priority) in enumerate(waiters, start=1):
        threads.append(_start(slots, order, name, n, priority))
        _wait_until(lambda queued=queued: len(slots._queue) == queued)
    return order, release, threads


def _release(release: threading.Event, threads: list[threading.Thread]) -> None:
    release.set()
    for thread in threads:
        thread.join(10)


def test_slots_go_to_the_highest_priority_waiter_first():
    order, release, threads = _queue_behind_a_holder(1, 1, [("late", 1, 5), ("urgent", 1, 1)])
    _release(release, threads)
    assert order == ["holder", "urgent", "late"]


def test_a_two_slot_run_at_the_head_is_not_overtaken_by_one_slot_runs():
    order, release, threads = _queue_behind_a_holder(2, 1, [("G=2 run", 2, 1), ("G=1 run", 1, 2)])
    time.sleep(0.2)  # one slot is free, but the head of the queue needs two
    assert order == ["holder"]
    _release(release, threads)
    assert order == ["holder", "G=2 run", "G=1 run"]


def test_two_slot_requests_are_capped_at_the_capacity():
    slots, order = _Slots(1), []
    _start(slots, order, "G=2 run on one slot", 2, 0).join(10)
    assert order == ["G=2 run on one slot"]


def test_results_do_not_depend_on_how_many_runs_go_at_once(tmp_path):
    tables = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        args = ["bench", "optim", "--quick", "--tiny-test", "--jobs", str(jobs), "--out", str(out)]
        assert main(args) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["meta"]["jobs"] == jobs
        tables.append(
            [
                (r["method"], r["steps"], r["setting"], r["final_val_loss_mean"])
                for r in results["table"]
            ]
        )
    assert tables[0] == tables[1]


# --- the tuning protocol, on synthetic losses ---------------------------------------------------


class _FakeRunner:
    """Answers every run with ``loss(settings, steps)`` instead of training; records the runs."""

    def __init__(self, loss):
        self.loss, self.runs, self._lock = loss, [], threading.Lock()

    def run_all(self, specs):
        results = []
        for s in specs:
            with self._lock:
                self.runs.append((s.steps, s.seed, s.method, dict(s.settings)))
            result = {"size": s.size, "steps": s.steps, "method": s.method, "seed": s.seed}
            loss = self.loss(s.settings, s.steps)
            results.append({**result, "settings": s.settings, "final_val_loss": loss})
        return results

    def close(self):
        pass


def _plan(methods, horizons=(10, 20)) -> Plan:
    return Plan(
        base=config_to_dict(Config()),
        sizes={"t": {}},
        horizons=list(horizons),
        seeds=2,
        lr_grid=[1e-3, 2e-3, 4e-3],
        muon_lr_grid=[0.01, 0.02, 0.04],
        outer_grid=[(8, 0.5, 0.5), (8, 0.7, 0.5), (8, 1.0, 0.5)],
        methods=[BY_NAME[name] for name in methods],
    )


def _bowl(best_lr):
    """Loss with its minimum at ``best_lr[steps]`` (log scale); η 0.7 is best for SNOO."""

    def loss(settings, steps):
        eta = math.log(settings.get("outer.lr", 0.7) / 0.7) ** 2
        return 2 + math.log(settings["inner.lr"] / best_lr[steps]) ** 2 + eta

    return loss


def _lrs_tried(runner, steps, method="adamw"):
    return sorted({s["inner.lr"] for h, seed, m, s in runner.runs if (h, m) == (steps, method)})


def test_each_horizon_has_its_own_tuned_setting():
    runner = _FakeRunner(_bowl({10: 2e-3, 20: 1e-3 * 2**0.1}))  # the longer run: a lower LR
    best, _ = _run_protocol(_plan(["adamw", "snoo_adamw"]), runner)
    assert best["t"][10]["adamw"] == {"inner.lr": 2e-3}
    assert best["t"][20]["adamw"] == {"inner.lr": 1e-3}
    # SNOO's outer sweep at each horizon starts from AdamW's LR tuned at that horizon
    outer_sweeps = {
        (h, s["inner.lr"])
        for h, _, m, s in runner.runs
        if m == "snoo_adamw" and s["outer.lr"] != 0.7
    }
    assert outer_sweeps == {(10, 2e-3), (20, 1e-3)}
    # each horizon is measured (seed 1) at its own best setting; seed 0 is the tuning run
    measured = {(h, m, s["inner.lr"]) for h, seed, m, s in runner.runs if seed == 1}
    assert {(10, "adamw", 2e-3), (20, "adamw", 1e-3)} <= measured


def test_a_grid_whose_best_sits_at_the_edge_is_extended():
    runner = _FakeRunner(_bowl({10: 8e-3 * 1.1, 20: 5e-4 * 0.9}))
    best, _ = _run_protocol(_plan(["adamw", "snoo_adamw"]), runner)
    assert _lrs_tried(runner, 10) == [1e-3, 2e-3, 4e-3, 8e-3, 0.016]  # until the best is inside
    assert best["t"][10]["adamw"] == {"inner.lr": 8e-3}
    assert _lrs_tried(runner, 20) == [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]  # downwards too
    assert best["t"][20]["adamw"] == {"inner.lr": 5e-4}
    # SNOO's LR sweep keeps its base's LR found past the edge (and extends from there)
    assert best["t"][10]["snoo_adamw"]["inner.lr"] == 8e-3
    assert _lrs_tried(runner, 10, "snoo_adamw") == [1e-3, 2e-3, 4e-3, 8e-3, 0.016]


def test_grid_extension_stops_after_max_extensions():
    runner = _FakeRunner(_bowl({10: 1.0}))
    best, _ = _run_protocol(_plan(["adamw"], horizons=[10]), runner)
    assert len(_lrs_tried(runner, 10)) == 3 + MAX_EXTENSIONS
    assert best["t"][10]["adamw"] == {"inner.lr": 4e-3 * 2**MAX_EXTENSIONS}


def test_beyond_edge_steps_on_each_knob_scale():
    lrs = [{"inner.lr": lr} for lr in (1e-3, 2e-3, 4e-3)]
    assert beyond_edge(lrs, lrs[1]) == []  # inside the grid
    assert beyond_edge(lrs, lrs[0]) == [{"inner.lr": 5e-4}]
    outer = [{"outer.sync_every": k, "outer.momentum": mu} for k, mu in ((8, 0.5), (32, 0.9))]
    # μ on the logit scale stays inside (0, 1); K (the traffic choice) is not extended
    assert beyond_edge(outer, outer[1]) == [{"outer.sync_every": 32, "outer.momentum": 0.9878}]
    assert beyond_edge(outer, outer[0]) == [{"outer.sync_every": 8, "outer.momentum": 0.1}]
