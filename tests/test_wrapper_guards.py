"""Specification of what the DiLoCo wrapper refuses (issue 15, class 6) and of EMA-Nesterov's β
bound under any LR schedule (class 7): β_t = β_max · lr_t / lr_peak, never above β_max."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diloco.algorithm.streaming import StreamingDiLoCo
from diloco.algorithm.wrapper import DiLoCo

BETA_MAX = 0.7


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def one_step(model: nn.Module, dl: DiLoCo):
    x = torch.randn(4, 4)
    model(x).square().mean().backward()
    report = dl.step()
    dl.zero_grad()
    return report


# --- arguments -----------------------------------------------------------------------------------


def test_optimizer_over_another_models_parameters_is_refused():
    model, other = make_model(0), make_model(1)
    with pytest.raises(ValueError, match=r"inner_optimizer does not hold 4 of the model's 4"):
        DiLoCo(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_optimizer_over_part_of_the_parameters_is_refused_naming_one_left_out():
    model = make_model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold 2 of the model's 4 .*'2.weight'"):
        DiLoCo(model, opt)


def test_frozen_parameters_need_not_be_in_the_optimizer():
    model = make_model()
    model[2].requires_grad_(False)
    DiLoCo(model, torch.optim.SGD(model[0].parameters(), lr=0.1))


@pytest.mark.parametrize("value", [2.5, "4", True, None], ids=["float", "str", "bool", "none"])
def test_sync_every_that_is_not_an_integer_is_a_type_error(value):
    model = make_model()
    with pytest.raises(TypeError, match=rf"sync_every must be an integer >= 1, got {value!r}"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=value)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("max_bad_rounds", 0, "max_bad_rounds must be an integer >= 1, got 0"),
        ("ema_warmup_steps", -1, "ema_warmup_steps must be an integer >= 0, got -1"),
        ("total_steps", 0, "total_steps must be an integer >= 1, got 0"),
        ("outer_lr", 0.0, "outer lr must be > 0"),
        ("outer_momentum", 1.0, "outer momentum must be in"),
    ],
)
def test_out_of_range_argument_is_a_value_error(name, value, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), **{name: value})


# --- misuse inside slow_weights() ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [DiLoCo, StreamingDiLoCo])
def test_step_that_closes_a_round_inside_slow_weights_raises_and_keeps_the_round(cls):
    model = make_model()
    dl = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    one_step(model, dl)
    fast = [p.detach().clone() for p in model.parameters()]
    with dl.slow_weights():
        model(torch.randn(4, 4)).square().mean().backward()
        with pytest.raises(RuntimeError, match=r"DiLoCo.step\(\) inside 'with dl.slow_weights"):
            dl.step()
    assert dl.inner_steps == 1 and dl.steps_in_round == 1
    for p, before in zip(model.parameters(), fast, strict=True):
        assert torch.equal(p.detach(), before)
    assert one_step(model, dl) is not None  # the round closes normally after the block


@pytest.mark.parametrize("call", ["sync", "load_state_dict", "slow_weights"])
def test_sync_load_or_nested_slow_weights_inside_slow_weights_raise(call):
    model = make_model()
    dl = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=4)
    one_step(model, dl)
    state = dl.state_dict()
    args = {"sync": (), "load_state_dict": (state,), "slow_weights": ()}[call]
    with dl.slow_weights(), pytest.raises(RuntimeError, match=rf"DiLoCo.{call}\(\) inside"):
        result = getattr(dl, call)(*args)
        if call == "slow_weights":
            result.__enter__()


def test_step_inside_slow_weights_raises_even_when_fast_equals_slow():
    model = make_model()
    dl = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    with dl.slow_weights(), pytest.raises(RuntimeError):
        dl.step()


def test_slow_weights_can_be_entered_again_after_an_error_inside():
    model = make_model()
    dl = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    with pytest.raises(KeyError), dl.slow_weights():
        raise KeyError("evaluation failed")
    one_step(model, dl)


# --- EMA-Nesterov's β under LR schedules ---------------------------------------------------------


def betas_under(make_scheduler, steps: int = 40, lr: float = 0.01) -> list[tuple[float, float]]:
    """(β reported, inner LR of the closing step) of every round of a K = 1 EMA-Nesterov run."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = make_scheduler(opt)
    dl = DiLoCo(model, opt, outer="ema_nesterov", sync_every=1, outer_lr=1.0, ema_beta=BETA_MAX)
    out = []
    for _ in range(steps):
        lr_now = opt.param_groups[0]["lr"]
        report = one_step(model, dl)
        out.append((report.beta, lr_now))
        sched.step()
    return out


def test_one_cycle_beta_is_scaled_by_max_lr_not_initial_lr():
    """OneCycleLR sets initial_lr = max_lr / 25; β = β_max · lr / max_lr reaches β_max once."""
    seen = betas_under(
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=41)
    )
    for beta, lr in seen:
        assert beta == pytest.approx(BETA_MAX * lr / 0.05)
    assert max(b for b, _ in seen) <= BETA_MAX
    assert max(b for b, _ in seen) == pytest.approx(BETA_MAX, rel=0.02)


def test_lambda_schedule_above_one_caps_beta_at_beta_max():
    """A LambdaLR factor above 1 raises the peak to the largest LR seen; β never exceeds β_max."""
    seen = betas_under(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 + s / 10))
    assert all(b == pytest.approx(BETA_MAX) for b, _ in seen)


def test_warmup_schedule_beta_rises_with_the_lr_to_beta_max():
    seen = betas_under(
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10)
    )
    assert seen[0][0] == pytest.approx(0.1 * BETA_MAX)
    assert seen[-1][0] == pytest.approx(BETA_MAX)
    assert all(b <= BETA_MAX + 1e-12 for b, _ in seen)


def test_zero_inner_lr_gives_beta_zero_instead_of_dividing_by_zero():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dl = DiLoCo(model, opt, outer="ema_nesterov", sync_every=1)
    assert one_step(model, dl).beta == 0.0


def test_the_peak_lr_survives_a_state_dict_round_trip():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 2.0 if s == 1 else 0.5)
    dl = DiLoCo(model, opt, outer="ema_nesterov", sync_every=1, ema_beta=BETA_MAX)
    for _ in range(3):
        one_step(model, dl)
        sched.step()
    fresh = make_model()
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05)
    dl2 = DiLoCo(fresh, opt2, outer="ema_nesterov", sync_every=1, ema_beta=BETA_MAX)
    dl2.load_state_dict(dl.state_dict())
    assert one_step(fresh, dl2).beta == pytest.approx(BETA_MAX * 0.05 / 0.2)
