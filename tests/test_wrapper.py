"""Specification of the DiLoCo wrapper: rounds, pseudo-gradient, EMA-Nesterov, state, guards.

Reference maths lives in this file, per tensor, written independently of
``diloco.algorithm.outer`` and ``diloco.algorithm.wrapper``. Outside oracles:
``torch.optim.AdamW`` / ``SGD`` as the inner step A.
"""

import copy
import math

import pytest
import torch
from torch import nn

from diloco.algorithm.wrapper import DiLoCo, NonFiniteError
from diloco.errors import CheckpointError
from diloco.job.inner import build_inner_optimizer
from diloco.models import GPT, GPTConfig
from diloco.testing.devices import separate_devices

IN, HIDDEN, OUT = 6, 16, 3
LR, WD = 1e-2, 0.1


def make_mlp(seed: int = 0, hidden: int = HIDDEN, depth: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN, hidden), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(hidden, OUT))


def make_batches(n: int, seed: int = 123) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, IN, generator=g), torch.randn(8, OUT, generator=g)) for _ in range(n)]


BATCHES = make_batches(80)


def adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.95))


def lr_lambda(total: int, warmup: int = 5, floor: float = 0.1):
    """Linear warm-up then cosine down to ``floor`` (a test-local schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def train_step(model, dl, batch, scheduler=None):
    """One step of the documented loop: forward/backward at φ, step, zero_grad, scheduler."""
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    report = dl.step()
    dl.zero_grad()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), report


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def clones(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-6)


def record_fast_after_each_inner_step(opt: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """φ right after every inner step (before the wrapper's sync touches it)."""
    seen: list[list[torch.Tensor]] = []

    def hook(optimizer, args, kwargs):
        seen.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    opt.register_step_post_hook(hook)
    return seen


# ---------------------------------------------------------------------------- outer="none"


def test_outer_none_is_bit_identical_to_the_plain_inner_optimizer():
    """``outer="none"``: every step is exactly ``inner.step()``; no round ever closes."""
    plain, wrapped = make_mlp(0), make_mlp(0)
    opt_plain = adamw(plain)
    dl = DiLoCo(wrapped, adamw(wrapped), outer="none", sync_every=3)
    for batch in BATCHES[:40]:
        x, y = batch
        nn.functional.mse_loss(plain(x), y).backward()
        opt_plain.step()
        opt_plain.zero_grad()
        _, report = train_step(wrapped, dl, batch)
        assert report is None
        assert_equal(weights(wrapped), weights(plain))
    assert dl.sync() is None
    assert dl.outer_steps == 0


def test_outer_none_slow_weights_context_is_a_no_op():
    """``outer="none"`` keeps no θ: ``slow_weights()`` leaves the model as it is."""
    model = make_mlp(0)
    dl = DiLoCo(model, adamw(model), outer="none")
    for batch in BATCHES[:3]:
        train_step(model, dl, batch)
    before = weights(model)
    storages = [p.data_ptr() for p in model.parameters()]
    with dl.slow_weights() as inside:
        assert inside is model
        assert_equal(weights(model), before)
    assert_equal(weights(model), before)
    assert [p.data_ptr() for p in model.parameters()] == storages
    assert dl.slow_tensors() == []


# ---------------------------------------------------------------------------- nesterov / sgd


def test_pseudo_gradient_is_start_minus_fast():
    """Δ = s − φ (not φ − s): with Lookahead η = 0.5, θ moves half-way *towards* φ."""
    model = make_mlp(0)
    opt = adamw(model)
    fast_seen = record_fast_after_each_inner_step(opt)
    dl = DiLoCo(model, opt, outer="sgd", sync_every=4, outer_lr=0.5)
    theta_old = clones(dl.slow_tensors())
    for batch in BATCHES[:4]:
        _, report = train_step(model, dl, batch)
    phi_end = fast_seen[-1]
    delta = [s - f for s, f in zip(theta_old, phi_end, strict=True)]
    assert report.pseudo_grad_norm == pytest.approx(
        math.sqrt(sum(float(d.double().square().sum()) for d in delta)), rel=1e-5
    )
    # θ_new = θ − 0.5·(θ − φ) = (θ + φ)/2; the reversed sign would give 1.5·θ − 0.5·φ.
    midpoint = [(s + f) / 2 for s, f in zip(theta_old, phi_end, strict=True)]
    assert_close(dl.slow_tensors(), midpoint)


@pytest.mark.parametrize("lr, momentum", [(0.7, 0.9), (0.68, 0.37)])
def test_nesterov_round_matches_hand_computation_and_restarts_fast_at_theta(lr, momentum):
    """K = 4, one group: Δ = θ_old − φ_end; b ← μb + Δ; θ ← θ_old − η(Δ + μb); φ ← θ."""
    K = 4
    model = make_mlp(0)
    opt = adamw(model)
    fast_seen = record_fast_after_each_inner_step(opt)
    dl = DiLoCo(model, opt, outer="nesterov", sync_every=K, outer_lr=lr, outer_momentum=momentum)
    theta = clones(dl.slow_tensors())
    buf = [torch.zeros_like(t) for t in theta]
    rounds = 0
    for step, batch in enumerate(BATCHES[: 12 * K]):
        _, report = train_step(model, dl, batch)
        if (step + 1) % K:
            assert report is None
            continue
        rounds += 1
        phi_end = fast_seen[-1]
        for i in range(len(theta)):
            delta = theta[i] - phi_end[i]
            buf[i] = momentum * buf[i] + delta
            theta[i] = theta[i] - lr * (delta + momentum * buf[i])
        assert report.round == rounds and report.inner_steps == step + 1 and not report.skipped
        assert_close(dl.slow_tensors(), theta)
        assert_equal(weights(model), clones(dl.slow_tensors()))


def test_sgd_with_unit_lr_puts_slow_weights_on_the_fast_weights_every_round():
    """``sgd``, η = 1, one group (local SGD): after each round θ = φ_end and φ restarts there."""
    K = 3
    model = make_mlp(0)
    opt = adamw(model)
    fast_seen = record_fast_after_each_inner_step(opt)
    dl = DiLoCo(model, opt, outer="sgd", sync_every=K, outer_lr=1.0)
    for step, batch in enumerate(BATCHES[: 10 * K]):
        train_step(model, dl, batch)
        if (step + 1) % K == 0:
            assert_close(dl.slow_tensors(), fast_seen[-1])
            assert_equal(weights(model), clones(dl.slow_tensors()))


def test_sgd_with_unit_lr_and_one_group_tracks_plain_inner_training():
    """Local SGD with one group is plain training (up to rounding in θ − (θ − φ))."""
    plain, wrapped = make_mlp(0), make_mlp(0)
    opt_plain = adamw(plain)
    dl = DiLoCo(wrapped, adamw(wrapped), outer="sgd", sync_every=5, outer_lr=1.0)
    for batch in BATCHES[:40]:
        x, y = batch
        nn.functional.mse_loss(plain(x), y).backward()
        opt_plain.step()
        opt_plain.zero_grad()
        train_step(wrapped, dl, batch)
    assert_close(weights(wrapped), weights(plain), atol=1e-5)


# ---------------------------------------------------------------------------- EMA-Nesterov


def reference_ema_per_step_adamw(model, batches, lr_fn, beta_max, gamma, ema_init, W, R, T):
    """The EMA-Nesterov paper's per-step wrapper: θ_{t+1} = A(θ_t + β_t m_t).

    m_{t+1} = γ m_t + (1−γ)(θ_{t+1} − θ_t) (or m_1 = θ_1 − θ_0 for ``first_increment``);
    β_{t} for the start point after n = t inner steps: 0 if n < W or n ≥ T − R, else
    β_max · lr(step n−1) / lr_peak.  Returns [(θ_{t+1}, s_{t+1}, β_{t+1}, loss_t)].
    """
    params = list(model.parameters())
    opt = adamw(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    theta = clones(params)
    m = [torch.zeros_like(p) for p in params]
    beta = 0.0
    out = []
    for t, (x, y) in enumerate(batches[:T]):
        with torch.no_grad():
            for p, th, mm in zip(params, theta, m, strict=True):
                p.copy_(th + beta * mm)  # the model holds s_t while the gradient is computed
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()  # A: one AdamW step from s_t
        opt.zero_grad()
        new_theta = clones(params)
        for i in range(len(params)):
            increment = new_theta[i] - theta[i]
            if t == 0 and ema_init == "first_increment":
                m[i] = increment
            else:
                m[i] = gamma * m[i] + (1 - gamma) * increment
        theta = new_theta
        n = t + 1
        lr_now = opt.param_groups[0]["lr"]  # LR of the step just taken
        beta = 0.0 if (n < W or n >= T - R) else beta_max * lr_now / LR
        sched.step()
        start = [th + beta * mm for th, mm in zip(theta, m, strict=True)]
        out.append((clones(theta), start, beta, loss.detach()))
    return out


@pytest.mark.parametrize("ema_init", ["zero", "first_increment"])
def test_ema_nesterov_with_k1_is_the_papers_per_step_wrapper_around_adamw(ema_init):
    """K = 1, η = 1, ``ema_nesterov`` with an LR schedule = θ_{t+1} = A(θ_t + β_t m_t), per step."""
    T, W, R, beta_max, gamma = 60, 12, 10, 0.7, 0.9
    lr_fn = lr_lambda(T)
    expected = reference_ema_per_step_adamw(
        make_mlp(0), BATCHES, lr_fn, beta_max, gamma, ema_init, W, R, T
    )

    model = make_mlp(0)
    opt = adamw(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    dl = DiLoCo(
        model,
        opt,
        outer="ema_nesterov",
        sync_every=1,
        outer_lr=1.0,
        ema_beta=beta_max,
        ema_gamma=gamma,
        ema_init=ema_init,
        ema_warmup_steps=W,
        ema_rest_steps=R,
        total_steps=T,
    )
    betas = []
    for t, (theta, start, beta, loss_ref) in enumerate(expected):
        loss, report = train_step(model, dl, BATCHES[t], sched)
        torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
        assert report.beta == pytest.approx(beta, abs=1e-12)
        assert_close(clones(dl.slow_tensors()), theta)
        assert_close(weights(model), start)
        betas.append(beta)
    # the test is only meaningful if the lookahead was really on (and off at both ends)
    assert max(betas) > 0.3 and betas[W - 2] == 0.0 and betas[-1] == 0.0


def test_ema_beta_follows_the_inner_lr_ratio_and_is_off_in_warmup_and_rest_windows():
    """Report β after n steps: 0 for n < W and n ≥ T − R, else β_max · lr_{n−1} / lr_peak."""
    T, W, R, K = 40, 8, 8, 2
    lr_fn = lr_lambda(T)
    model = make_mlp(0)
    opt = adamw(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    dl = DiLoCo(
        model, opt, outer="ema_nesterov", sync_every=K, ema_beta=0.6,
        ema_warmup_steps=W, ema_rest_steps=R, total_steps=T,
    )  # fmt: skip
    for step, batch in enumerate(BATCHES[:T]):
        _, report = train_step(model, dl, batch, sched)
        n = step + 1
        if report is None:
            continue
        expected = 0.0 if (n < W or n >= T - R) else 0.6 * lr_fn(step)
        assert report.beta == pytest.approx(expected, abs=1e-12), n


# ---------------------------------------------------------------------------- slow_weights()


def test_slow_weights_context_holds_theta_mid_round_and_restores_fast_exactly():
    """Mid-round (nesterov): inside the block the model holds θ; afterwards φ, bit for bit."""
    model = make_mlp(0)
    dl = DiLoCo(model, adamw(model), outer="nesterov", sync_every=4)
    for batch in BATCHES[:6]:  # one round and a half
        train_step(model, dl, batch)
    fast = weights(model)
    theta = clones(dl.slow_tensors())
    assert any(not torch.equal(f, s) for f, s in zip(fast, theta, strict=True))
    with dl.slow_weights() as inside:
        assert inside is model
        assert_equal(weights(model), theta)
    assert_equal(weights(model), fast)


def test_slow_weights_context_holds_theta_not_the_lookahead_point():
    """EMA-Nesterov with β > 0 right after a sync: the model holds s = θ + βm, the block θ."""
    model = make_mlp(0)
    dl = DiLoCo(model, adamw(model), outer="ema_nesterov", sync_every=2, ema_beta=0.7)
    for batch in BATCHES[:8]:
        train_step(model, dl, batch)
    assert dl.steps_in_round == 0 and dl.outer.beta > 0
    start = weights(model)
    theta = clones(dl.slow_tensors())
    assert any(not torch.equal(s, t) for s, t in zip(start, theta, strict=True))
    with dl.slow_weights():
        assert_equal(weights(model), theta)
    assert_equal(weights(model), start)


@pytest.mark.parametrize("outer", ["nesterov", "ema_nesterov"])
def test_entering_slow_weights_does_not_change_training(outer):
    """Training with an evaluation in ``slow_weights()`` every step is identical to without."""
    runs = []
    for evaluate in (False, True):
        model = make_mlp(0)
        dl = DiLoCo(model, adamw(model), outer=outer, sync_every=3, ema_beta=0.7)
        for batch in BATCHES[:20]:
            train_step(model, dl, batch)
            if evaluate:
                with dl.slow_weights(), torch.no_grad():
                    model(batch[0]).sum()
        runs.append((weights(model), clones(dl.slow_tensors())))
    assert_equal(runs[0][0], runs[1][0])
    assert_equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------------------- sync()


def test_sync_with_no_inner_step_since_the_last_sync_returns_none():
    """``sync()`` right after construction or right after a round is a no-op returning None."""
    model = make_mlp(0)
    dl = DiLoCo(model, adamw(model), outer="nesterov", sync_every=2)
    assert dl.sync() is None
    for batch in BATCHES[:2]:
        train_step(model, dl, batch)
    theta, fast = clones(dl.slow_tensors()), weights(model)
    assert dl.sync() is None
    assert dl.outer_steps == 1
    assert_equal(clones(dl.slow_tensors()), theta)
    assert_equal(weights(model), fast)


def test_final_partial_round_is_folded_into_theta_by_sync():
    """K = 5, 7 steps, then ``sync()``: the 2 leftover steps make one more Nesterov round."""
    lr, mu = 0.7, 0.9
    model = make_mlp(0)
    opt = adamw(model)
    fast_seen = record_fast_after_each_inner_step(opt)
    dl = DiLoCo(model, opt, outer="nesterov", sync_every=5, outer_lr=lr, outer_momentum=mu)
    theta0 = clones(dl.slow_tensors())
    for batch in BATCHES[:7]:
        train_step(model, dl, batch)
    report = dl.sync()
    assert report is not None and report.round == 2 and report.inner_steps == 7
    theta, buf = theta0, [torch.zeros_like(t) for t in theta0]
    for phi_end in (fast_seen[4], fast_seen[6]):
        for i in range(len(theta)):
            delta = theta[i] - phi_end[i]
            buf[i] = mu * buf[i] + delta
            theta[i] = theta[i] - lr * (delta + mu * buf[i])
    assert_close(dl.slow_tensors(), theta)
    assert_equal(weights(model), clones(dl.slow_tensors()))
    assert dl.sync() is None


# ---------------------------------------------------------------------------- state dict


def build(seed, outer, sched_total=40, model_fn=make_mlp):
    model = model_fn(seed)
    opt = adamw(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sched_total))
    dl = DiLoCo(
        model, opt, outer=outer, sync_every=4, ema_beta=0.7, ema_gamma=0.9,
        ema_init="first_increment", total_steps=sched_total, ema_rest_steps=4,
    )  # fmt: skip
    return model, dl, sched


@pytest.mark.parametrize("outer", ["nesterov", "ema_nesterov"])
@pytest.mark.parametrize("n_before", [8, 10], ids=["round_boundary", "mid_round"])
def test_state_dict_round_trip_continues_bit_identically(outer, n_before):
    """Save after N steps, load into a fresh run (other seed): the next M steps are identical."""
    model_a, dl_a, sched_a = build(0, outer)
    for batch in BATCHES[:n_before]:
        train_step(model_a, dl_a, batch, sched_a)
    saved = copy.deepcopy(dl_a.state_dict())
    saved_sched = copy.deepcopy(sched_a.state_dict())

    model_b, dl_b, sched_b = build(1, outer)
    dl_b.load_state_dict(saved)
    sched_b.load_state_dict(saved_sched)
    assert_equal(weights(model_b), weights(model_a))

    for batch in BATCHES[n_before : n_before + 14]:
        loss_a, _ = train_step(model_a, dl_a, batch, sched_a)
        loss_b, _ = train_step(model_b, dl_b, batch, sched_b)
        assert torch.equal(loss_a, loss_b)
        assert_equal(weights(model_a), weights(model_b))
        assert_equal(clones(dl_a.slow_tensors()), clones(dl_b.slow_tensors()))
    assert dl_a.outer_steps == dl_b.outer_steps


def test_loading_state_of_a_wider_model_raises_checkpoint_error():
    """Same tensor count, other shapes: CheckpointError naming a different model shape."""
    model, dl, sched = build(0, "nesterov")
    for batch in BATCHES[:6]:
        train_step(model, dl, batch, sched)
    saved = copy.deepcopy(dl.state_dict())
    _, other, _ = build(0, "nesterov", model_fn=lambda s: make_mlp(s, hidden=HIDDEN + 4))
    with pytest.raises(CheckpointError, match="different model shape"):
        other.load_state_dict(saved)


def test_loading_state_of_a_deeper_model_raises_checkpoint_error():
    """Other tensor count: CheckpointError naming a different model shape (not a ValueError)."""
    model, dl, sched = build(0, "nesterov")
    for batch in BATCHES[:6]:
        train_step(model, dl, batch, sched)
    saved = copy.deepcopy(dl.state_dict())
    _, other, _ = build(0, "nesterov", model_fn=lambda s: make_mlp(s, depth=2))
    with pytest.raises(CheckpointError, match="different model shape"):
        other.load_state_dict(saved)


def test_failed_load_leaves_the_wrapper_untouched():
    """A rejected state dict changes nothing: counters and inner state stay as they were."""
    model, dl, sched = build(0, "nesterov")
    for batch in BATCHES[:6]:
        train_step(model, dl, batch, sched)
    saved = copy.deepcopy(dl.state_dict())
    other_model, other, other_sched = build(0, "nesterov", model_fn=lambda s: make_mlp(s, 20))
    train_step(other_model, other, BATCHES[0], other_sched)
    with pytest.raises(CheckpointError):
        other.load_state_dict(saved)
    assert other.inner_steps == 1 and other.steps_in_round == 1
    train_step(other_model, other, BATCHES[1], other_sched)  # inner state still fits the model


def test_loading_state_of_another_outer_method_raises_checkpoint_error():
    """A nesterov state dict cannot be loaded into an ema_nesterov run."""
    _, dl, _ = build(0, "nesterov")
    _, other, _ = build(0, "ema_nesterov")
    with pytest.raises(CheckpointError, match="outer method"):
        other.load_state_dict(copy.deepcopy(dl.state_dict()))


# ---------------------------------------------------------------------------- non-finite guard


def sgd_run(outer: str, max_bad_rounds: int = 3, K: int = 4):
    """Plain SGD inner (no state), so a NaN cannot linger in the inner optimiser."""
    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dl = DiLoCo(model, opt, outer=outer, sync_every=K, ema_beta=0.7, max_bad_rounds=max_bad_rounds)
    return model, dl


def poison(model: nn.Module) -> None:
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")


@pytest.mark.parametrize("outer", ["nesterov", "ema_nesterov"])
def test_nan_round_is_skipped_theta_kept_and_fast_reset_to_the_start_point(outer):
    """A NaN mid-round: report.skipped, θ unchanged, φ back to s (finite), training goes on."""
    model, dl = sgd_run(outer)
    for batch in BATCHES[:8]:
        train_step(model, dl, batch)
    theta, start = clones(dl.slow_tensors()), weights(model)
    reports = []
    for i, batch in enumerate(BATCHES[8:12]):
        if i == 2:
            poison(model)
        reports.append(train_step(model, dl, batch)[1])
    assert reports[:3] == [None, None, None]
    assert reports[3].skipped and not math.isfinite(reports[3].pseudo_grad_norm)
    assert_equal(clones(dl.slow_tensors()), theta)
    assert_equal(weights(model), start)
    for batch in BATCHES[12:16]:
        loss, report = train_step(model, dl, batch)
        assert torch.isfinite(loss)
    assert not report.skipped
    assert all(torch.isfinite(t).all() for t in dl.slow_tensors())
    assert any(not torch.equal(a, b) for a, b in zip(dl.slow_tensors(), theta, strict=True))


def test_max_bad_rounds_in_a_row_raise_non_finite_error_naming_the_round():
    """``max_bad_rounds`` consecutive skipped rounds raise NonFiniteError (message: the round)."""
    model, dl = sgd_run("nesterov", max_bad_rounds=3, K=2)
    for batch in BATCHES[:4]:  # two good rounds
        train_step(model, dl, batch)
    for bad in range(3):
        poison(model)
        train_step(model, dl, BATCHES[10])
        if bad < 2:
            assert train_step(model, dl, BATCHES[11])[1].skipped
    poison(model)
    with pytest.raises(NonFiniteError, match="round 5"):
        train_step(model, dl, BATCHES[11])


def test_a_good_round_resets_the_bad_round_count():
    """bad, bad, good, bad, bad with max_bad_rounds = 3 does not raise."""
    model, dl = sgd_run("nesterov", max_bad_rounds=3, K=2)
    for bad in (True, True, False, True, True):
        if bad:
            poison(model)
        train_step(model, dl, BATCHES[0])
        assert train_step(model, dl, BATCHES[1])[1].skipped is bad


# ---------------------------------------------------------------------------- offload


@pytest.mark.parametrize("outer", ["nesterov", "ema_nesterov"])
def test_cpu_offload_gives_identical_results(outer):
    """``offload="cpu"`` (separate host copy of θ and a staging buffer) = ``offload="none"``."""
    runs = []
    for offload in ("none", "cpu"):
        model = make_mlp(0)
        dl = DiLoCo(model, adamw(model), outer=outer, sync_every=3, offload=offload)
        with separate_devices(dl):  # no op mixes host (θ, m, staging) and device tensors
            losses = [train_step(model, dl, batch)[0] for batch in BATCHES[:17]]
            dl.sync()
            with dl.slow_weights():
                evaluated = weights(model)
        runs.append((losses, weights(model), clones(dl.slow_tensors()), evaluated))
    for a, b in zip(*runs, strict=True):
        assert_equal(a, b)


# ---------------------------------------------------------------------------- Muon inner

GPT_CONFIG = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
GPT_BATCHES = [
    torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(i)) for i in range(30)
]


def muon_run(seed: int, total: int = 24):
    torch.manual_seed(seed)
    model = GPT(GPT_CONFIG)
    opt = build_inner_optimizer(model, "muon", lr=3e-3, muon_lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup=3))
    dl = DiLoCo(model, opt, outer="nesterov", sync_every=3)
    return model, opt, dl, sched


def gpt_step(model, dl, tokens, sched):
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    report = dl.step()
    dl.zero_grad()
    sched.step()
    return loss.detach(), report


def test_muon_inner_runs_under_nesterov_outer():
    """Muon+AdamW inner with a Nesterov outer: finite losses, rounds taken, θ moves."""
    model, _, dl, sched = muon_run(0)
    theta0 = clones(dl.slow_tensors())
    reports = []
    for tokens in GPT_BATCHES[:12]:
        loss, report = gpt_step(model, dl, tokens, sched)
        assert torch.isfinite(loss)
        reports.append(report)
    assert [r.round for r in reports if r is not None] == [1, 2, 3, 4]
    assert not any(r.skipped for r in reports if r is not None)
    assert any(not torch.equal(a, b) for a, b in zip(dl.slow_tensors(), theta0, strict=True))


def test_lr_scheduler_scales_both_muon_and_adamw_parts():
    """One LambdaLR over MuonWithAdamW sets lr = base · f(step) in both inner optimisers."""
    model, opt, dl, sched = muon_run(0)
    f = lr_lambda(24, warmup=3)
    for step, tokens in enumerate(GPT_BATCHES[:6]):
        assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * f(step))
        assert all(g["lr"] == pytest.approx(3e-3 * f(step)) for g in opt.adamw.param_groups)
        gpt_step(model, dl, tokens, sched)


def muon_resume(n_before: int = 7):
    model_a, _, dl_a, sched_a = muon_run(0)
    for tokens in GPT_BATCHES[:n_before]:
        gpt_step(model_a, dl_a, tokens, sched_a)
    saved = copy.deepcopy(dl_a.state_dict())
    saved_sched = copy.deepcopy(sched_a.state_dict())
    model_b, opt_b, dl_b, sched_b = muon_run(1)
    dl_b.load_state_dict(saved)
    sched_b.load_state_dict(saved_sched)
    return (model_a, dl_a, sched_a), (model_b, dl_b, sched_b), opt_b


def test_muon_state_dict_round_trip_restores_the_same_point():
    """After loading, weights, θ and the inner state of both parts equal the saved run's."""
    (model_a, dl_a, _), (model_b, dl_b, _), _ = muon_resume()
    assert_equal(weights(model_b), weights(model_a))
    assert_equal(clones(dl_b.slow_tensors()), clones(dl_a.slow_tensors()))
    sa, sb = dl_a.inner.state_dict(), dl_b.inner.state_dict()
    for part in ("muon", "adamw"):
        assert sa[part]["state"].keys() == sb[part]["state"].keys()
        for k, state in sa[part]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, sb[part]["state"][k][name]), (part, k, name)


def test_lr_scheduler_still_scales_muon_after_load_state_dict():
    """After a resume the scheduler's LR reaches the Muon and AdamW parts."""
    _, (model_b, dl_b, sched_b), opt_b = muon_resume()
    for tokens in GPT_BATCHES[7:10]:
        gpt_step(model_b, dl_b, tokens, sched_b)
    assert opt_b.muon.param_groups[0]["lr"] == pytest.approx(opt_b.param_groups[0]["lr"])
    assert opt_b.adamw.param_groups[0]["lr"] == pytest.approx(opt_b.param_groups[1]["lr"])


def test_muon_state_dict_round_trip_continues_bit_identically():
    """Save after 7 steps, load into a fresh run (other seed): the next steps are identical."""
    (model_a, dl_a, sched_a), (model_b, dl_b, sched_b), _ = muon_resume()
    for tokens in GPT_BATCHES[7:16]:
        loss_a, _ = gpt_step(model_a, dl_a, tokens, sched_a)
        loss_b, _ = gpt_step(model_b, dl_b, tokens, sched_b)
        assert torch.equal(loss_a, loss_b)
    assert_equal(weights(model_a), weights(model_b))
    assert_equal(clones(dl_a.slow_tensors()), clones(dl_b.slow_tensors()))


# ---------------------------------------------------------------------------- arguments


def test_wrapper_rejects_bad_arguments():
    """Unknown outer method, K < 1, β ∉ [0, 1), unknown offload, rest window without T."""
    model = make_mlp(0)
    opt = adamw(model)
    with pytest.raises(ValueError, match="outer must be"):
        DiLoCo(model, opt, outer="adam")
    with pytest.raises(ValueError, match="sync_every"):
        DiLoCo(model, opt, sync_every=0)
    with pytest.raises(ValueError, match="ema_beta"):
        DiLoCo(model, opt, outer="ema_nesterov", ema_beta=1.0)
    with pytest.raises(ValueError, match="offload"):
        DiLoCo(model, opt, offload="gpu")
    with pytest.raises(ValueError, match="total_steps"):
        DiLoCo(model, opt, outer="ema_nesterov", ema_rest_steps=5)
