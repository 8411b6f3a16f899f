"""Specification of compressed pseudo-gradients (``outer.compress``): codecs, error feedback, bytes.

Reference maths lives here, written from the docstring of :mod:`diloco.comm.compress`: int8 is
symmetric per-block absmax/127 scaling; the exchange averages the decoded chunks of the G groups
in fp32, re-encodes the average once and every group decodes the same bytes; error feedback
keeps e_g = x_g − dec(enc(x_g)) plus, on the owner of a chunk, G·(a − t).

Single-process tests simulate G groups by arithmetic; the others run real processes under
torchrun (gloo). NCCL is not tested here (no GPU); the code uses no CPU-only operation.
"""

from __future__ import annotations

import math
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import run_torchrun, run_torchrun_script, same_fields, tiny_overrides
from torch.distributed.checkpoint import FileSystemReader

from diloco.comm.compress import (
    ErrorFeedback,
    bytes_sent,
    dequantize_int8,
    exchange_average,
    exchange_decode,
    exchange_encode,
    make_codec,
    quantize_int8,
)
from diloco.job.metrics import read_metrics
from diloco.testing import faults

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# references, written from the spec


def ref_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded x, per-element scale) of symmetric per-block int8 quantisation."""
    n = x.numel()
    pad = (-n) % block
    blocks = torch.cat([x.flatten().float(), torch.zeros(pad)]).view(-1, block)
    scale = blocks.abs().max(dim=1, keepdim=True).values / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(blocks / safe), -127, 127)
    decoded = (codes * scale).flatten()[:n]
    return decoded, scale.expand_as(blocks).flatten()[:n]


def ref_chunk(n: int, groups: int, align: int) -> int:
    per = math.ceil(n / groups)
    return align * math.ceil(per / align)


def ref_bytes(numel: int, groups: int, compress: str, block: int = 256) -> float:
    if groups == 1:
        return 0.0
    if compress == "none":
        return 2 * (groups - 1) / groups * 4 * numel
    if compress == "bf16":
        return 2 * (groups - 1) * 2 * ref_chunk(numel, groups, 1)
    c = ref_chunk(numel, groups, block)
    return 2 * (groups - 1) * (c + 4 * c // block)


def ref_exchange(xs: list[torch.Tensor], compress: str, block: int) -> torch.Tensor:
    """t: per chunk j, a_j = mean_g dec(enc(x_g[j])) in fp32, t_j = dec(enc(a_j))."""
    G, n = len(xs), xs[0].numel()
    c = ref_chunk(n, G, block if compress == "int8" else 1)

    def roundtrip(v: torch.Tensor) -> torch.Tensor:
        return ref_int8(v, block)[0] if compress == "int8" else v.bfloat16().float()

    padded = [torch.cat([x, torch.zeros(G * c - n)]).view(G, c) for x in xs]
    out = []
    for j in range(G):
        a = sum(roundtrip(p[j]) for p in padded) / G
        out.append(roundtrip(a))
    return torch.cat(out)[:n]


def simulate(xs: list[torch.Tensor], compress: str, block: int):
    """The exchange with diloco.comm.compress's three steps, G groups in one process.

    Returns (t, [x_g − dec(enc(x_g)) per g], [owner's a − t on its chunk per g]).
    """
    codec = make_codec(compress, block)
    G, n = len(xs), xs[0].numel()
    c = codec.chunk(n, G)
    sends, errors = zip(*(exchange_encode(x, G, codec) for x in xs), strict=True)
    payloads, owner = [], []
    for j in range(G):  # all_to_all: owner j receives row j of every group's send
        recv = torch.stack([s[j] for s in sends])
        payload, err = exchange_average(recv, G, c, codec)
        payloads.append(payload[0])
        owner.append(err)
    t = exchange_decode(torch.stack(payloads), n, codec)  # all_gather
    return t, list(errors), owner


# --------------------------------------------------------------------------------------------
# int8 / bf16 round trips


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    huge = torch.randn(700, generator=g) * torch.logspace(-30, 30, 700)
    huge[::7] *= -1
    return {
        "random": torch.randn(1000, generator=g),
        "zeros": torch.zeros(300),
        "huge_range": huge,
        "one": torch.tensor([-3.0]),
        "fp32_max": torch.tensor([3.0e38, -3.0e38, 1.0, 0.0]),
        "ragged": torch.randn(257, generator=g) * 1e-3,
    }


@pytest.mark.parametrize("block", [8, 256])
@pytest.mark.parametrize("name", list(_cases()))
def test_int8_round_trip_error_is_at_most_half_a_block_scale(name, block):
    x = _cases()[name]
    codes, scales = quantize_int8(x, block)
    n_blocks = math.ceil(x.numel() / block)
    assert codes.dtype == torch.int8 and codes.shape == (n_blocks * block,)
    assert scales.dtype == torch.float32 and scales.shape == (n_blocks,)
    assert int(codes.abs().max()) <= 127
    decoded = dequantize_int8(codes, scales, x.numel())
    want, scale = ref_int8(x, block)
    torch.testing.assert_close(decoded, want, rtol=0, atol=0)
    bound = scale / 2 * (1 + 1e-6) + 1e-45  # fp32 rounding of x / scale
    assert bool(((x - decoded).abs() <= bound).all())
    assert bool(torch.isfinite(decoded).all())


def test_int8_block_extremes_decode_exactly_and_zero_blocks_stay_zero():
    x = torch.cat([torch.linspace(-2, 1, 16), torch.zeros(16)])
    codes, scales = quantize_int8(x, 16)
    assert scales.tolist() == [float(torch.tensor(2.0) / 127), 0.0]
    assert codes[0] == -127 and not codes[16:].any()
    decoded = dequantize_int8(codes, scales)
    assert math.isclose(float(decoded[0]), -2.0, rel_tol=1e-6)
    assert not decoded[16:].any()


def test_a_non_finite_element_makes_its_block_decode_non_finite():
    """So a non-finite round is still caught downstream, never silently clipped."""
    for bad in (float("nan"), float("inf")):
        x = torch.ones(32)
        x[3] = bad
        decoded = dequantize_int8(*quantize_int8(x, 16))
        assert not torch.isfinite(decoded[:16]).any()
        assert bool(torch.isfinite(decoded[16:]).all())


def test_bf16_codec_is_round_to_nearest_bf16():
    codec = make_codec("bf16")
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.shape == (3, 100)
    torch.testing.assert_close(codec.decode(payload, 50), x.bfloat16().float(), rtol=0, atol=0)


def test_unknown_compression_is_an_error():
    with pytest.raises(ValueError, match="compress must be one of none, bf16, int8"):
        make_codec("fp8")


# --------------------------------------------------------------------------------------------
# bytes


@pytest.mark.parametrize("compress", ["none", "bf16", "int8"])
@pytest.mark.parametrize("numel", [1, 62, 1000, 123_457])
@pytest.mark.parametrize("groups", [1, 2, 3, 8])
def test_bytes_sent_is_the_analytic_count(compress, numel, groups):
    assert bytes_sent(numel, groups, compress, 256) == ref_bytes(numel, groups, compress, 256)


def test_int8_sends_about_four_times_less_than_fp32():
    n, G = 10_000_000, 4
    ratio = bytes_sent(n, G, "none") / bytes_sent(n, G, "int8", 256)
    assert ratio == pytest.approx(4 / (1 + 4 / 256), rel=1e-4)  # 3.94
    assert bytes_sent(n, G, "none") / bytes_sent(n, G, "bf16") == pytest.approx(2, rel=1e-6)


# --------------------------------------------------------------------------------------------
# the exchange and error feedback, G groups simulated in one process


@pytest.mark.parametrize("compress, block", [("int8", 16), ("int8", 256), ("bf16", 1)])
@pytest.mark.parametrize("groups", [2, 3])
def test_exchange_decodes_the_requantised_mean_of_the_decoded_chunks(compress, block, groups):
    g = torch.Generator().manual_seed(groups)
    xs = [torch.randn(301, generator=g) * (1 + k) for k in range(groups)]
    t, _, _ = simulate(xs, compress, block)
    torch.testing.assert_close(t, ref_exchange(xs, compress, block), rtol=0, atol=1e-7)
    exact = sum(xs) / groups
    tol = 3e-2 if compress == "int8" else 1e-2
    assert float((t - exact).norm() / exact.norm()) < tol


@pytest.mark.parametrize("compress, block", [("int8", 16), ("bf16", 1)])
def test_error_feedback_telescopes_to_one_rounds_quantisation_error(compress, block):
    """Σ_rounds t = Σ_rounds mean_g Δ_g − mean_g e_g(R), and |mean_g e_g(R)| is one round's error.

    The Δ_g carry a small steady drift next to a few large entries per block, the case where
    compression without feedback loses the drift every round.
    """
    G, n, R, spikes = 3, 203, 100, 16
    gen = torch.Generator().manual_seed(7)
    drift = torch.full((n,), 1e-3)
    codec = make_codec(compress, block)
    c = codec.chunk(n, G)
    e = [torch.zeros(n) for _ in range(G)]
    sent, true, plain = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for _ in range(R):
        deltas = []
        for _g in range(G):
            d = drift + 1e-4 * torch.randn(n, generator=gen)
            d[::spikes] = torch.randn(len(d[::spikes]), generator=gen)  # big entries
            deltas.append(d)
        xs = [d + r for d, r in zip(deltas, e, strict=True)]
        t, errors, owner = simulate(xs, compress, block)
        for j in range(G):  # e_g = x_g − dec(enc(x_g));  owner j: += G·(a_j − t_j) on chunk j
            e[j] = errors[j].clone()
            lo, hi = j * c, min((j + 1) * c, n)
            e[j][lo:hi] += G * owner[j][: hi - lo]
        sent += t
        true += sum(deltas) / G
        plain += simulate(deltas, compress, block)[0]  # the same rounds without feedback
    owed = sum(e) / G
    torch.testing.assert_close(sent, true - owed, rtol=0, atol=1e-5)
    if compress == "int8":  # one round: mean_g s_g/2 + s_a/2, s ≤ max|x|/127 per block
        last = max(float(x.abs().max()) for x in xs)
        bound = last / 127
    else:
        bound = 2 * 2**-9 * float(max(x.abs().max() for x in xs))
    assert float(owed.abs().max()) <= bound
    # without feedback the drift is lost round after round; with it the sum keeps up
    mask = torch.ones(n, dtype=torch.bool)
    mask[::spikes] = False
    assert float((true - sent)[mask].abs().max()) <= bound
    if compress == "int8":
        assert float((true - plain)[mask].abs().max()) > 3 * bound


def test_error_feedback_residuals_are_keyed_by_parameter_and_checked():
    ef = ErrorFeedback()
    a, b = ef.get([0, 3], [torch.ones(2, 3), torch.ones(4)], torch.device("cpu"))
    assert a.shape == (2, 3) and b.shape == (4,) and not a.any()
    assert ef.get([3], [torch.ones(4)], torch.device("cpu"))[0] is b
    with pytest.raises(ValueError, match="residual 3 has shape"):
        ef.get([3], [torch.ones(5)], torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# MeshReducer under torchrun: G = 3 real processes


REDUCER_SCRIPT = textwrap.dedent(
    """
    # torchrun, 3 ranks = a (3, 1) mesh. Rounds of MeshReducer.average for none/bf16/int8,
    # synchronously and with start_average/wait (two fragments in flight at once).
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from diloco.comm.mesh import MeshReducer
    from diloco.comm.topology import destroy_process_groups

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (3, 1), mesh_dim_names=("group", "shard"))
    g = dist.get_rank()
    SHAPES = [(5, 3), (7,), (300,), (40, 10)]

    def delta(r, g):
        gen = torch.Generator().manual_seed(100 * r + g)
        return [torch.randn(s, generator=gen) * 10.0 ** (i - 2) for i, s in enumerate(SHAPES)]

    out = {}
    for mode in ("none", "bf16", "int8"):
        for how in ("sync", "async", "fragments_sync", "fragments_async"):
            red = MeshReducer(mesh, bucket_mb=330 * 4 / 2**20, compress=mode, block=16)
            rounds = []
            for r in range(3):
                ts = delta(r, g)
                if how == "sync":
                    stats = red.average(ts)
                elif how == "async":
                    stats = red.start_average(ts).wait()
                elif how == "fragments_sync":
                    stats = [red.average(ts[:2], ids=[0, 1]), red.average(ts[2:], ids=[2, 3])]
                else:  # two fragments in flight at once, waited in issue order
                    h1 = red.start_average(ts[:2], ids=[0, 1])
                    h2 = red.start_average(ts[2:], ids=[2, 3])
                    stats = [h1.wait(), h2.wait()]
                rounds.append({"mean": ts, "stats": stats})
            res = red.residuals([torch.empty(s) for s in SHAPES]) if mode != "none" else []
            out[mode, how] = {"rounds": rounds, "residuals": [e.clone() for e in res]}
            if how == "sync":  # a non-finite round on group 0: NaN mean, residuals kept
                ts = delta(9, g)
                ts[3][0, 0] = float("nan") if g == 0 else 0.0
                red.average(ts)
                out[mode, "nan"] = {"mean": ts, "residuals": [e.clone() for e in res]}
    torch.save(out, f"{sys.argv[1]}/rank{g}.pt")
    del red, mesh
    destroy_process_groups()
    """
)
SHAPES = [(5, 3), (7,), (300,), (40, 10)]


def _delta(r: int, g: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * r + g)
    return [torch.randn(s, generator=gen) * 10.0 ** (i - 2) for i, s in enumerate(SHAPES)]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts])


@pytest.fixture(scope="module")
def reducer_runs(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("reducer")
    script = tmp / "reducer.py"
    script.write_text(REDUCER_SCRIPT)
    result = run_torchrun_script(3, script, str(tmp))
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(tmp / f"rank{g}.pt", weights_only=False) for g in range(3)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "bf16", "int8"])
def test_mesh_reducer_rounds_match_the_simulation_on_every_group(reducer_runs, mode):
    """Every group gets bit-for-bit the same mean; it is the simulated exchange of Δ_g + e_g;
    error feedback telescopes with the real residuals; bytes_sent is the analytic count."""
    G, bucket_sizes = 3, [15 + 7 + 300, 400]  # buckets of <= 330 floats
    runs = [r[mode, "sync"] for r in reducer_runs]
    for r in range(3):
        means = [_flat(run["rounds"][r]["mean"]) for run in runs]
        assert all(torch.equal(m, means[0]) for m in means[1:])
        stats = runs[0]["rounds"][r]["stats"]
        assert stats["bytes_sent"] == sum(ref_bytes(n, G, mode, 16) for n in bucket_sizes)
        assert stats["buckets"] == 2
        assert ("residual_norm" in stats) == (mode != "none")
    for run in reducer_runs:  # a round that is non-finite anywhere is NaN and leaves e as it was
        assert torch.isnan(_flat(run[mode, "nan"]["mean"])).any()
        for e, kept in zip(
            run[mode, "sync"]["residuals"], run[mode, "nan"]["residuals"], strict=True
        ):
            assert torch.equal(e, kept)
    exact = [sum(_flat(_delta(r, g)) for g in range(G)) / G for r in range(3)]
    if mode == "none":
        for r in range(3):
            torch.testing.assert_close(_flat(runs[0]["rounds"][r]["mean"]), exact[r])
        return
    sent = sum(_flat(runs[0]["rounds"][r]["mean"]) for r in range(3))
    owed = sum(_flat(run["residuals"]) for run in runs) / G
    torch.testing.assert_close(sent, sum(exact) - owed, rtol=1e-5, atol=1e-6)
    # round 0 starts from e = 0: the mean is exactly the simulated exchange of the Δ_g
    first = [_flat(_delta(0, g)) for g in range(G)]
    for lo, hi in [(0, 322), (322, 722)]:
        want = ref_exchange([f[lo:hi] for f in first], mode, 16)
        got = _flat(runs[0]["rounds"][0]["mean"])[lo:hi]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def _without_timings(stats):
    """A round's statistics (a dict, or one per fragment) minus the wall-clock timings (only the
    blocking form measures ``reduce_wait_s``)."""
    if isinstance(stats, list):
        return [_without_timings(s) for s in stats]
    return {k: v for k, v in stats.items() if not k.endswith("_s")}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "bf16", "int8"])
def test_async_average_equals_the_synchronous_one_also_with_fragments_in_flight(reducer_runs, mode):
    """start_average(…).wait() == average(…) bit for bit; two fragments started before either
    is waited for == the same two fragments averaged one after the other (residuals too)."""
    for run in reducer_runs:
        for a, b in [("async", "sync"), ("fragments_async", "fragments_sync")]:
            for ra, rb in zip(run[mode, a]["rounds"], run[mode, b]["rounds"], strict=True):
                assert torch.equal(_flat(ra["mean"]), _flat(rb["mean"]))
                assert _without_timings(ra["stats"]) == _without_timings(rb["stats"])
            for ea, eb in zip(run[mode, a]["residuals"], run[mode, b]["residuals"], strict=True):
                assert torch.equal(ea, eb)
        fragment_stats = run[mode, "fragments_async"]["rounds"][0]["stats"]
        sizes = ([22], [300, 400])  # fragment [0, 1], fragment [2, 3] (two buckets)
        for stats, buckets in zip(fragment_stats, sizes, strict=True):
            assert stats["bytes_sent"] == sum(ref_bytes(n, 3, mode, 16) for n in buckets)
    if mode != "none":  # error feedback telescopes per fragment as well
        exact = sum(sum(_flat(_delta(r, g)) for g in range(3)) / 3 for r in range(3))
        rounds = reducer_runs[0][mode, "fragments_async"]["rounds"]
        sent = sum(_flat(r["mean"]) for r in rounds)
        owed = sum(_flat(run[mode, "fragments_async"]["residuals"]) for run in reducer_runs) / 3
        torch.testing.assert_close(sent, exact - owed, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# training runs under torchrun: G = 2, S = 1 and S = 2


STEPS, K = 16, 4
TINY = tiny_overrides(
    STEPS,
    K,
    "train.eval_every=8",
    "train.log_every=4",
    "train.check_every=1",  # θ checksums of all groups compared after every round
    "topology.groups=2",
)
LAUNCHES = {  # name -> (processes, overrides, env)
    "none": (2, [], {}),
    "int8": (2, ["outer.compress=int8", "train.checkpoint_every=1"], {}),
    "int8_killed": (
        2,
        ["outer.compress=int8", "train.checkpoint_every=1"],
        {faults.KILL_AT_STEP: "10", faults.KILL_RANK: "1"},
    ),
    "bf16": (2, ["outer.compress=bf16"], {}),
    "int8_s2": (4, ["outer.compress=int8", "topology.shards=2"], {}),
    "bf16_s2": (4, ["outer.compress=bf16", "topology.shards=2"], {}),
}


def _train(out: Path, nproc: int, overrides: list[str], env: dict) -> Path:
    overrides = [*TINY, f"run.out_dir={out}", *overrides]
    proc = run_torchrun(nproc, overrides, env=env, timeout=300, restarts=1 if env else 0)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if env:
        assert "diloco: resumed from" in proc.stderr and "step_8" in proc.stderr, proc.stderr
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_runs")
    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores: two jobs side by side
        jobs = {n: pool.submit(_train, root / n, *job) for n, job in LAUNCHES.items()}
        yield {n: job.result for n, job in jobs.items()}


def _shard0_numel(run: Path, shards: int) -> int:
    theta = torch.load(run / "final_model.pt", map_location="cpu")
    del theta["lm_head.weight"]  # tied to wte.weight
    return sum(math.ceil(t.shape[0] / shards) * t[0].numel() for t in theta.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "bf16", "int8_s2", "bf16_s2"])
def test_compressed_training_tracks_fp32_and_reports_exact_bytes(runs, name):
    """Runs (θ checksums agree across groups every round, or the job fails), val loss within
    0.5% of the uncompressed run, bytes_sent per round the analytic count for rank 0's shard."""
    compress, shards = name.split("_")[0], 2 if name.endswith("s2") else 1
    records = read_metrics(runs[name]() / "metrics.jsonl")
    base = read_metrics(runs["none"]() / "metrics.jsonl")
    final, ref = records[-1]["val_loss"], base[-1]["val_loss"]
    assert math.isfinite(final) and abs(final - ref) <= 0.005 * ref, (final, ref)
    assert final < records[0]["val_loss"]
    numel = _shard0_numel(runs[name](), shards)
    rounds = [r for r in records if "pseudo_grad_norm" in r]
    assert len(rounds) == STEPS // K
    assert sum("theta_sumsq" in r for r in records) == 1 + STEPS // K
    for r in rounds:
        assert r["bytes_sent"] == ref_bytes(numel, 2, compress)
        assert r["bytes_sent"] < ref_bytes(numel, 2, "none") / (3.5 if compress == "int8" else 1.9)
        assert r["residual_norm"] > 0 and "pairwise_cosine" not in r
        assert -1 <= r["group_cosine"] <= 1


@pytest.mark.slow
def test_resume_with_compression_equals_the_uninterrupted_run(runs):
    """A rank SIGKILLed at step 10 restarts from step_8; the error-feedback residual is in the
    checkpoint, so every logged number (residual_norm included) is the uninterrupted run's."""

    killed, whole = runs["int8_killed"](), runs["int8"]()
    assert same_fields(killed / "metrics.jsonl") == same_fields(whole / "metrics.jsonl")
    for g in (0, 1):  # each group's residual is in its own DCP part
        part = FileSystemReader(str(whole / "checkpoints" / "step_16" / f"group{g}"))
        assert any(k.startswith("residual.") for k in part.read_metadata().state_dict_metadata)
