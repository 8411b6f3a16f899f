"""Specification of the outer optimisers (docs/design.md §1, step 4) on random pseudo-gradients.

Tensors are float64 so that the comparisons test the maths, not float32 rounding (m is an EMA
of differences θ_{t+1} − θ_t and loses relative precision in float32).

The reference maths is written here per tensor in plain Python, independently of
``diloco.algorithm.outer``; only ``torch.optim.SGD`` is used as an outside oracle for Nesterov.
"""

import pytest
import torch

from diloco.algorithm.outer import EMANesterov, Nesterov

SHAPES = [(7, 5), (5,), (3, 4, 2), ()]
ROUNDS = 60


def random_tensors(gen: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    return [scale * torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]


def feed(params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
    """Hand the pseudo-gradient to an optimiser the way the wrapper does: as ``.grad``."""
    for p, d in zip(params, deltas, strict=True):
        p.grad = d.clone()


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-6):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-6)


# ---------------------------------------------------------------------------- Nesterov / SGD


@pytest.mark.parametrize("foreach", [True, False], ids=["sgd_foreach", "sgd_for_loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lr, momentum", [(0.7, 0.9), (0.5, 0.37), (1.0, 0.0), (0.3, 0.0)])
def test_nesterov_is_bitwise_torch_sgd_with_nesterov_momentum_over_many_rounds(
    lr, momentum, dtype, foreach
):
    """Nesterov(η, μ) is torch.optim.SGD(lr=η, momentum=μ, nesterov=True, dampening=0) on Δ,
    bit for bit, in float32 too: θ is rounded once per round, θ − η·(Δ + μ·b), as torch rounds
    it (two adds, θ − η·Δ then − η·μ·b, drift apart by an ulp from the first round with μ > 0)."""
    gen = torch.Generator().manual_seed(0)
    init = [t.to(dtype) for t in random_tensors(gen)]
    ours = [t.clone() for t in init]
    theirs = [t.clone() for t in init]
    outer = Nesterov(ours, lr=lr, momentum=momentum)
    sgd = torch.optim.SGD(
        theirs, lr=lr, momentum=momentum, nesterov=momentum > 0, dampening=0.0, foreach=foreach
    )
    for _ in range(ROUNDS):
        deltas = [t.to(dtype) for t in random_tensors(gen, scale=0.1)]
        feed(ours, deltas)
        feed(theirs, deltas)
        outer.step()
        sgd.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("lr, momentum", [(0.7, 0.9), (0.68, 0.37)])
def test_nesterov_matches_the_design_formula_b_then_theta(lr, momentum):
    """b ← μ·b + Δ;  θ ← θ − η·(Δ + μ·b), written per tensor."""
    gen = torch.Generator().manual_seed(1)
    theta = random_tensors(gen)
    slow = [t.clone() for t in theta]
    outer = Nesterov(slow, lr=lr, momentum=momentum)
    bufs = [torch.zeros_like(t) for t in theta]
    for _ in range(ROUNDS):
        deltas = random_tensors(gen, scale=0.1)
        feed(slow, deltas)
        outer.step()
        for i, d in enumerate(deltas):
            bufs[i] = momentum * bufs[i] + d
            theta[i] = theta[i] - lr * (d + momentum * bufs[i])
        assert_close(slow, theta)


@pytest.mark.parametrize("lr", [0.5, 1.0])
def test_zero_momentum_is_lookahead_theta_minus_lr_delta(lr):
    """μ = 0 (``sgd``, Lookahead): θ ← θ − η·Δ, and no momentum buffer is kept."""
    gen = torch.Generator().manual_seed(2)
    theta = random_tensors(gen)
    slow = [t.clone() for t in theta]
    outer = Nesterov(slow, lr=lr, momentum=0.0)
    for _ in range(ROUNDS):
        deltas = random_tensors(gen, scale=0.1)
        feed(slow, deltas)
        outer.step()
        theta = [t - lr * d for t, d in zip(theta, deltas, strict=True)]
        assert_close(slow, theta)
    assert all(len(outer.state[p]) == 0 for p in slow)


def test_lookahead_with_unit_lr_lands_exactly_on_the_fast_weights():
    """η = 1, μ = 0, one group: θ_{t+1} = s_t − (s_t − φ) = φ (local SGD)."""
    gen = torch.Generator().manual_seed(3)
    slow = random_tensors(gen)
    outer = Nesterov(slow, lr=1.0, momentum=0.0)
    for _ in range(ROUNDS):
        fast = [t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in slow]
        feed(slow, [s - f for s, f in zip(slow, fast, strict=True)])
        outer.step()
        assert_close(slow, fast)


def test_nesterov_start_point_is_theta():
    """For Nesterov the next round restarts from s = θ."""
    gen = torch.Generator().manual_seed(4)
    slow = random_tensors(gen)
    outer = Nesterov(slow, lr=0.7, momentum=0.9)
    feed(slow, random_tensors(gen))
    outer.step()
    fast = [torch.full_like(t, 123.0) for t in slow]
    outer.write_start(fast)
    for f, s in zip(fast, slow, strict=True):
        assert torch.equal(f, s)


def test_nesterov_rejects_bad_hyperparameters():
    """η must be positive and μ in [0, 1)."""
    with pytest.raises(ValueError, match="outer lr"):
        Nesterov([torch.zeros(2)], lr=0.0)
    with pytest.raises(ValueError, match="outer momentum"):
        Nesterov([torch.zeros(2)], lr=0.7, momentum=1.0)


def test_outer_step_without_pseudo_gradient_is_an_error():
    """A slow tensor with no ``.grad`` cannot be stepped (the wrapper must always set Δ)."""
    outer = Nesterov([torch.zeros(2), torch.zeros(3)], lr=0.7)
    outer.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="pseudo-gradient"):
        outer.step()


# ---------------------------------------------------------------------------- EMA-Nesterov


def reference_ema_nesterov(theta0, deltas, betas, lr, gamma, ema_init):
    """DESIGN §1: θ_{t+1} = s_t − ηΔ_t;  m ← γm + (1−γ)(θ_{t+1} − θ_t);  s = θ + βm.

    ``betas[t]`` is β_{t+1}, set after round t.  Returns (θ, m, s) after every round.
    """
    theta = [t.clone() for t in theta0]
    m = [torch.zeros_like(t) for t in theta0]
    beta = 0.0  # β_0: the first start point is θ_0
    history = []
    for t, (delta, next_beta) in enumerate(zip(deltas, betas, strict=True)):
        start = [th + beta * mm for th, mm in zip(theta, m, strict=True)]
        new_theta = [s - lr * d for s, d in zip(start, delta, strict=True)]
        for i in range(len(theta)):
            increment = new_theta[i] - theta[i]
            if t == 0 and ema_init == "first_increment":
                m[i] = increment.clone()
            else:
                m[i] = gamma * m[i] + (1 - gamma) * increment
        theta = new_theta
        beta = next_beta
        history.append(
            (
                [x.clone() for x in theta],
                [x.clone() for x in m],
                [th + beta * mm for th, mm in zip(theta, m, strict=True)],
            )
        )
    return history


def betas_schedule(rounds: int) -> list[float]:
    """A changing β: 0 for a warm-up, a cosine-shaped middle, 0 for a rest window."""
    out = []
    for t in range(rounds):
        if t < 8 or t >= rounds - 6:
            out.append(0.0)
        else:
            out.append(0.7 * (0.55 + 0.45 * torch.cos(torch.tensor(t / rounds * 3.0)).item()))
    return out


@pytest.mark.parametrize("ema_init", ["zero", "first_increment"])
@pytest.mark.parametrize("lr, gamma", [(1.0, 0.99), (0.8, 0.9)])
def test_ema_nesterov_matches_the_design_formula_with_a_changing_beta(ema_init, lr, gamma):
    """θ, m and the start point s follow DESIGN §1 round after round while β changes."""
    gen = torch.Generator().manual_seed(5)
    theta0 = random_tensors(gen)
    deltas = [random_tensors(gen, scale=0.1) for _ in range(ROUNDS)]
    betas = betas_schedule(ROUNDS)
    expected = reference_ema_nesterov(theta0, deltas, betas, lr, gamma, ema_init)

    slow = [t.clone() for t in theta0]
    outer = EMANesterov(slow, lr=lr, gamma=gamma, ema_init=ema_init)
    for delta, next_beta, (theta, m, start) in zip(deltas, betas, expected, strict=True):
        feed(slow, delta)
        outer.step()
        outer.set_beta(next_beta)
        fast = [torch.full_like(t, float("nan")) for t in slow]
        outer.write_start(fast)
        assert_close(slow, theta, atol=1e-9)
        assert_close([outer.state[p]["ema"] for p in slow], m, atol=1e-9)
        assert_close(fast, start, atol=1e-9)
    assert max(betas) > 0.3


def test_ema_first_increment_init_sets_m_to_the_first_increment():
    """``ema_init='first_increment'``: after round 0, m = θ_1 − θ_0 exactly (no (1−γ) factor)."""
    gen = torch.Generator().manual_seed(6)
    theta0 = random_tensors(gen)
    delta = random_tensors(gen, scale=0.1)
    slow = [t.clone() for t in theta0]
    outer = EMANesterov(slow, lr=0.9, gamma=0.99, ema_init="first_increment")
    feed(slow, delta)
    outer.step()
    assert_close([outer.state[p]["ema"] for p in slow], [-0.9 * d for d in delta])


def test_ema_zero_init_starts_m_at_one_minus_gamma_times_the_first_increment():
    """``ema_init='zero'``: after round 0, m = (1−γ)(θ_1 − θ_0)."""
    gen = torch.Generator().manual_seed(7)
    theta0 = random_tensors(gen)
    delta = random_tensors(gen, scale=0.1)
    slow = [t.clone() for t in theta0]
    outer = EMANesterov(slow, lr=1.0, gamma=0.9, ema_init="zero")
    feed(slow, delta)
    outer.step()
    assert_close([outer.state[p]["ema"] for p in slow], [-0.1 * d for d in delta])


def test_ema_increment_is_measured_from_theta_not_from_the_start_point():
    """With β > 0 the increment θ_{t+1} − θ_t includes the lookahead β·m (not just −ηΔ)."""
    theta = [torch.zeros(3)]
    outer = EMANesterov(theta, lr=1.0, gamma=0.5, ema_init="first_increment")
    feed(theta, [torch.full((3,), -1.0)])  # θ_1 = 1, m_1 = 1
    outer.step()
    outer.set_beta(0.5)  # s_1 = θ_1 + 0.5·m_1 = 1.5
    feed(theta, [torch.zeros(3)])  # the fast weights did not move: θ_2 = s_1 = 1.5
    outer.step()
    torch.testing.assert_close(theta[0], torch.full((3,), 1.5))
    # increment from θ_1 is 0.5 (from s_1 it would be 0): m_2 = 0.5·1 + 0.5·0.5
    torch.testing.assert_close(outer.state[theta[0]]["ema"], torch.full((3,), 0.75))


def test_ema_state_dict_keeps_beta_and_round_count():
    """β and the number of rounds travel in the outer state dict (needed for an exact resume)."""
    gen = torch.Generator().manual_seed(8)
    slow = random_tensors(gen)
    outer = EMANesterov(slow, lr=1.0, gamma=0.9, ema_init="first_increment")
    for _ in range(3):
        feed(slow, random_tensors(gen))
        outer.step()
    outer.set_beta(0.42)
    fresh = EMANesterov([t.clone() for t in slow], lr=1.0, gamma=0.9, ema_init="first_increment")
    fresh.load_state_dict(outer.state_dict())
    assert fresh.beta == 0.42
    assert fresh.param_groups[0]["rounds"] == 3


def test_ema_nesterov_rejects_bad_hyperparameters():
    """η > 0, γ in [0, 1) and ema_init in {'zero', 'first_increment'}."""
    with pytest.raises(ValueError, match="outer lr"):
        EMANesterov([torch.zeros(2)], lr=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        EMANesterov([torch.zeros(2)], gamma=1.0)
    with pytest.raises(ValueError, match="ema_init"):
        EMANesterov([torch.zeros(2)], ema_init="ones")
