"""Specification of Streaming DiLoCo (diloco/algorithm/streaming.py, diloco/algorithm/fragments.py):
fragments, schedule, overlap, resume.

The reference maths and the expected schedule are written here from the module docstring
(docs/design.md §1, torchft's fragment semantics), independently of the code under test:

* fragment i = blocks j with j mod P = i; every other parameter, in name order, joins the
  fragment with the fewest elements so far (lowest index on ties);
* fragment i starts (Δ_i = s_i − φ_i) after inner step n with n mod K = ((i+1)K/P − τ) mod K and
  is applied after step n + τ: Nesterov on θ_i with the averaged Δ_i, then
  φ_i ← α·φ_i + (1 − α)·θ_i.
"""

from __future__ import annotations

import copy
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import run_torchrun_script, tiny_overrides

from diloco.algorithm.fragments import assign_fragments, fragment_schedule
from diloco.algorithm.streaming import StreamingDiLoCo
from diloco.comm.topology import Runtime
from diloco.config import load_config
from diloco.errors import DilocoError
from diloco.job import events
from diloco.job.data import eval_batches, load_corpus
from diloco.job.metrics import read_metrics
from diloco.job.train import evaluate, train
from diloco.models import GPT, GPTConfig
from diloco.persist.resume import list_checkpoints, read_meta
from diloco.testing.devices import separate_devices

STEPS, K = 16, 4
TINY = tiny_overrides(
    STEPS,
    K,
    "model.n_head=2",
    "train.eval_every=7",  # step 7: fragment 1 of P=2, τ=1 is in flight during the evaluation
    "train.log_every=2",
)
GPT_TINY = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_fragments(names: list[str], numels: list[int], P: int) -> list[int]:
    """The documented assignment, written out independently of diloco.algorithm.fragments."""
    out, sizes = {}, [0] * P
    for k, name in enumerate(names):
        if name.startswith("blocks."):
            out[k] = int(name.split(".")[1]) % P
            sizes[out[k]] += numels[k]
    for k in range(len(names)):
        if k not in out:
            out[k] = sizes.index(min(sizes))
            sizes[out[k]] += numels[k]
    return [out[k] for k in range(len(names))]


def expected_events(steps: int, P: int, tau: int) -> list[list]:
    """(step, fragment, start|apply) after each inner step, in the documented order."""
    events = []
    for n in range(1, steps + 1):
        for i in range(P):
            if n % K == ((i + 1) * K // P - tau) % K:
                events.append([n, i, "start"])
        for i in range(P):
            if n % K == (i + 1) * K // P % K and n - tau >= 1:
                events.append([n, i, "apply"])
    return events


# ------------------------------------------------------------------------------- units


def test_schedule_offsets_and_limits():
    assert fragment_schedule(4, 1, 0) == [(0, 0)]
    assert fragment_schedule(8, 2, 1) == [(3, 4), (7, 0)]
    assert fragment_schedule(32, 4, 2) == [(6, 8), (14, 16), (22, 24), (30, 0)]
    with pytest.raises(ValueError, match="divisible"):
        fragment_schedule(10, 4, 0)
    with pytest.raises(ValueError, match="sync_delay"):
        fragment_schedule(16, 4, 4)


def test_fragments_are_strided_blocks_and_the_rest_balances_them():
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=4, n_head=2, n_embd=32))
    names = [n for n, _ in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    got = assign_fragments(names, [p.shape for _, p in model.named_parameters()], 2)
    assert got == expected_fragments(names, numels, 2)
    for name, f in zip(names, got, strict=True):
        if name.startswith("blocks."):
            assert f == int(name.split(".")[1]) % 2
    assert {names[k]: got[k] for k in range(len(names)) if "blocks" not in names[k]} == {
        "wte.weight": 0,  # the tied head: sizes tie, lowest index
        "wpe.weight": 1,
        "ln_f.weight": 1,
    }


# ------------------------------------------------------------------------------- maths


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "P, tau, alpha", [(1, 0, 0.0), (1, 2, 0.0), (2, 0, 0.0), (2, 1, 0.5), (2, 1, 1.0)]
)
def test_overlap_follows_the_schedule_and_the_reference_maths(P, tau, alpha):
    """One group: Δ_i taken at its start, applied τ steps later, φ_i mixed with θ_i by α."""
    lr, mu, steps = 0.7, 0.9, 13  # ends mid-period: sync() finishes the period
    torch.manual_seed(0)
    model = GPT(GPT_TINY)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    dl = StreamingDiLoCo(
        model, opt, outer="nesterov", sync_every=K, outer_lr=lr, outer_momentum=mu,
        fragments=P, sync_delay=tau, mix_alpha=alpha,
    )  # fmt: skip
    names = [n for n, _ in ref.named_parameters()]
    frag = expected_fragments(names, [p.numel() for p in ref.parameters()], P)
    params = list(ref.parameters())
    theta = [p.detach().clone() for p in params]
    buf = [torch.zeros_like(t) for t in theta]
    pending: dict[int, list[torch.Tensor]] = {}

    def apply(i: int) -> None:
        for k, delta in pending.pop(i).items():
            buf[k] = mu * buf[k] + delta
            theta[k] = theta[k] - lr * (delta + mu * buf[k])
            params[k].data = alpha * params[k].data + (1 - alpha) * theta[k]

    def start(i: int) -> None:
        pending[i] = {k: theta[k] - params[k].detach() for k in range(len(params)) if frag[k] == i}

    reports = []
    for n, (x, y) in enumerate(batches(steps), start=1):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x, y)[1].backward()
            if o is opt:
                reports.append(dl.step())
            else:
                o.step()
            o.zero_grad()
        for i in range(P):
            if n % K == ((i + 1) * K // P - tau) % K:
                start(i)
        for i in range(P):
            if n % K == (i + 1) * K // P % K and i in pending:
                apply(i)
    report = dl.sync()  # end of the run on step 13: finish the period
    for i in range(P):
        if i in pending:
            apply(i)
        elif steps % K < ((i + 1) * K // P % K or K):
            start(i)
            apply(i)
    assert [r is not None for r in reports] == [n % K == 0 for n in range(1, steps + 1)]
    assert report is not None and dl.outer_steps == 4 and dl.in_flight == 0
    assert [list(e) for e in dl.events if e[0] <= 12] == expected_events(12, P, tau)
    for a, b in zip(dl.slow_tensors(), theta, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_state_cannot_be_saved_while_an_average_is_in_flight():
    torch.manual_seed(0)
    model = GPT(GPT_TINY)
    dl = StreamingDiLoCo(
        model, torch.optim.AdamW(model.parameters()), sync_every=K, fragments=2, sync_delay=1
    )
    x, y = batches(1)[0]
    model(x, y)[1].backward()
    dl.step()  # step 1: fragment 0 starts (o_0 = 2 − 1)
    assert dl.in_flight == 1
    with pytest.raises(DilocoError, match="in flight"):
        dl.state_dict()


# ------------------------------------------------------------------------------- training job


def single(out: Path, *extra: str, force_streaming: bool = False, monkeypatch=None) -> dict:
    if force_streaming:  # P=1, τ=0, α=0 through StreamingDiLoCo (the config would pick DiLoCo)
        monkeypatch.setattr(
            "diloco.job.train.streaming_options",
            lambda o: {"fragments": 1, "sync_delay": 0, "mix_alpha": 0.0},
        )
    try:
        return train(load_config(None, [*TINY, f"run.out_dir={out}", *extra]))
    finally:
        if force_streaming:
            monkeypatch.undo()


def curves(run: Path) -> list[tuple]:
    return [
        (r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")
    ]


def assert_same_theta(a: Path, b: Path) -> None:
    ta, tb = torch.load(a / "final_model.pt"), torch.load(b / "final_model.pt")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [
        k for k in ta if not torch.equal(ta[k], tb[k])
    ]


@pytest.mark.parametrize("method", ["nesterov", "ema_nesterov"])
def test_one_fragment_without_delay_is_plain_diloco_bit_for_bit(tmp_path, monkeypatch, method):
    extra = [f"outer.method={method}", "train.steps=14"]  # 14: ends on a partial round
    plain = single(tmp_path / "plain", *extra)
    stream = single(tmp_path / "stream", *extra, force_streaming=True, monkeypatch=monkeypatch)
    assert plain["final_val_loss"] == stream["final_val_loss"]
    assert curves(tmp_path / "plain") == curves(tmp_path / "stream")
    assert_same_theta(tmp_path / "plain", tmp_path / "stream")


def test_final_model_holds_theta_not_the_fast_weights(tmp_path):
    """With P=2 and α > 0 the fast weights differ from θ at the end; final_model.pt is θ (its
    val loss is the logged final one)."""
    out = tmp_path / "run"
    summary = single(out, "outer.fragments=2", "outer.sync_delay=1", "outer.mix_alpha=0.5")
    cfg = load_config(out / "config.yaml")
    model = GPT(GPTConfig(**vars(cfg.model)))
    model.load_state_dict(torch.load(out / "final_model.pt", weights_only=True))
    corpus = load_corpus(cfg.data.source, cfg.model.block_size)
    val = eval_batches(corpus.val, cfg.data.batch_size, cfg.model.block_size, 2)
    assert evaluate(model, val, Runtime(device=torch.device("cpu"))) == summary["final_val_loss"]


class Crash(Exception):
    pass


def same_fields(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_metrics(path)]


@pytest.mark.parametrize(
    "variant",
    [
        ["outer.mix_alpha=0.5"],
        ["outer.method=ema_nesterov", "outer.ema_warmup=0.2", "outer.ema_rest=0.1"],
    ],
    ids=["nesterov-alpha0.5", "ema_nesterov"],
)
def test_resume_mid_run_with_fragments_equals_an_uninterrupted_run(tmp_path, monkeypatch, variant):
    """P=2, τ=1: the checkpoint at step 8 (a period boundary, nothing in flight) holds θ, the
    per-fragment outer state and the fast weights; the crash comes at step 11."""
    extra = ["outer.fragments=2", "outer.sync_delay=1", "train.checkpoint_every=2", *variant]
    full = single(tmp_path / "full", *extra)
    cfg = load_config(None, [*TINY, f"run.out_dir={tmp_path / 'resumed'}", *extra])

    def crash(name, **info):
        if name == "after_backward" and info["step"] == 11:
            raise Crash

    with events.observing(crash), pytest.raises(Crash):
        train(cfg)
    ckpt = list_checkpoints(tmp_path / "resumed")[0]
    assert ckpt.name == "step_8"
    meta = read_meta(ckpt)
    assert len(meta["outer_group_scalars"]) == 2  # one outer param group per fragment
    assert any(f.startswith("group0/") for f in meta["files"])
    resumed = train(cfg)
    assert same_fields(tmp_path / "resumed" / "metrics.jsonl") == same_fields(
        tmp_path / "full" / "metrics.jsonl"
    )
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert_same_theta(tmp_path / "full", tmp_path / "resumed")


# ------------------------------------------------------------------------------- two groups

WORKER = textwrap.dedent(
    """
    # torchrun, 2 ranks: three G=2 jobs in one process group (plain DiLoCo, StreamingDiLoCo
    # forced to P=1/τ=0, and P=2/τ=1); each rank records its wrapper's schedule events.
    import json, sys
    import torch.distributed as dist
    import diloco.job.train as T
    from diloco.config import load_config
    from diloco.comm.topology import destroy_process_groups

    out, overrides = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    built, build, options = [], T.build_diloco, T.streaming_options

    def recording(cfg, model, runtime):
        dl, scheduler = build(cfg, model, runtime)
        built.append(dl)
        return dl, scheduler

    T.build_diloco = recording
    for name, extra in [("plain", []), ("stream1", []),
                        ("stream2", ["outer.fragments=2", "outer.sync_delay=1"])]:
        T.streaming_options = options
        if name == "stream1":
            T.streaming_options = lambda o: {"fragments": 1, "sync_delay": 0, "mix_alpha": 0.0}
        T.train(load_config(None, [*overrides, f"run.out_dir={out}/{name}", *extra]))
        dl = built[-1]
        record = {"class": type(dl).__name__, "events": list(getattr(dl, "events", []))}
        with open(f"{out}/{name}/rank{dist.get_rank()}.json", "w") as f:
            json.dump(record, f)
    built.clear()
    destroy_process_groups()
    """
)


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("streaming_g2")
    script = root / "worker.py"
    script.write_text(WORKER)
    overrides = [*TINY, "topology.groups=2", "train.check_every=1"]
    result = run_torchrun_script(2, script, str(root), *overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.mark.slow
def test_two_groups_one_fragment_without_delay_is_plain_diloco_bit_for_bit(two_groups):
    ranks = [json.loads((two_groups / "stream1" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["class"] == "StreamingDiLoCo" for r in ranks)
    assert curves(two_groups / "plain") == curves(two_groups / "stream1")
    assert_same_theta(two_groups / "plain", two_groups / "stream1")


@pytest.mark.slow
def test_two_groups_issue_fragment_collectives_in_the_same_order(two_groups):
    events = [
        json.loads((two_groups / "stream2" / f"rank{r}.json").read_text())["events"] for r in (0, 1)
    ]
    assert events[0] == events[1] == expected_events(STEPS, 2, 1)


@pytest.mark.slow
def test_bytes_per_round_equal_the_analytic_count_and_peak_is_one_fragment(two_groups):
    """Σ_fragments 2(G−1)/G·4·numel_i = the unfragmented count; the peak is the largest
    fragment's (blocks 0 | 1, plus wte | wpe + ln_f by the balancing rule)."""
    model = GPT(GPT_TINY)  # the tied head counts once: named_parameters lists wte only
    names = [n for n, _ in model.named_parameters()]
    numels = [p.numel() for p in model.parameters()]
    frag = expected_fragments(names, numels, 2)
    sizes = [sum(n for n, f in zip(numels, frag, strict=True) if f == i) for i in (0, 1)]
    G = 2
    total = 2 * (G - 1) / G * 4 * sum(numels)
    plain = [r for r in read_metrics(two_groups / "plain" / "metrics.jsonl") if "bytes_sent" in r]
    stream = [
        r for r in read_metrics(two_groups / "stream2" / "metrics.jsonl") if "bytes_sent" in r
    ]
    assert len(plain) == len(stream) == STEPS // K
    for p, s in zip(plain, stream, strict=True):
        assert p["bytes_sent"] == s["bytes_sent"] == total
        assert s["peak_bytes"] == 2 * (G - 1) / G * 4 * max(sizes) < total
        assert s["fragments"] == 2
        assert math.isfinite(s["pseudo_grad_norm"]) and not s["outer_skipped"]


# ------------------------------------------------------------------------------- offload


def offloaded_run(offload: str, P: int, tau: int, alpha: float) -> tuple[list, list, list]:
    """EMA-Nesterov (β ≠ 0 from the first round) with P fragments and an SGD inner step. With
    τ = 0 the last fragment's fast weights are poisoned at step 8, which applies it, so that
    round is skipped. The run ends with a state round trip into a fresh wrapper whose fast
    weights restart at the start point s. Every ``torch._foreach_*`` op is checked for mixing
    host (θ, m, buffers) and device sides. Returns (θ, fast weights, fast weights after the
    round trip)."""
    torch.manual_seed(0)
    model = GPT(GPT_TINY)
    kwargs = dict(
        outer="ema_nesterov", sync_every=K, outer_lr=0.9, ema_beta=0.7,
        fragments=P, sync_delay=tau, mix_alpha=alpha, offload=offload,
    )  # fmt: skip
    dl = StreamingDiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), **kwargs)
    params = list(model.parameters())
    skipped = []
    with separate_devices(dl):
        for n, (x, y) in enumerate(batches(16), start=1):
            model(x, y)[1].backward()
            if n == 8 and tau == 0:
                with torch.no_grad():
                    for k in dl.fragment_params[-1]:
                        params[k].fill_(math.nan)
            report = dl.step()
            dl.zero_grad()
            if report is not None:
                skipped.append(report.skipped)
        assert dl.outer.beta != 0.0 and skipped == [False, tau == 0, False, False]
        slow, fast = clone_all(dl.slow_tensors()), clone_all(dl.fast_tensors())
        sd = dl.state_dict()
        sd.pop("fast")  # the fast weights restart at each fragment's start point s_i
    torch.manual_seed(0)
    fresh = GPT(GPT_TINY)
    dl2 = StreamingDiLoCo(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05), **kwargs)
    with separate_devices(dl2):
        dl2.load_state_dict(sd)
    return slow, fast, clone_all(dl2.fast_tensors())


def clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize(
    "P, tau, alpha", [(1, 0, 0.0), (2, 0, 0.0), (2, 0, 0.5), (2, 1, 0.0), (2, 1, 0.5)]
)
def test_offloaded_start_point_is_formed_on_the_host_and_copied_once(P, tau, alpha):
    """``offload="cpu"``: θ and m live on the host, φ on the device. The start point
    s = θ + β·m is written on the host and copied to φ in one copy, at a restart, after a
    skipped round and when a state is loaded (adding the host m to device φ crashes on CUDA);
    the results equal ``offload="none"`` bit for bit."""
    on_device = offloaded_run("none", P, tau, alpha)
    offloaded = offloaded_run("cpu", P, tau, alpha)
    for a, b in zip(on_device, offloaded, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
