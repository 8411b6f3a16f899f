"""The emulated slow link of :mod:`diloco.bench.slow_link`: network namespaces, or a throttle.

**The link** (``--mechanism netns``, the default where permitted): network namespaces ``dl0``
and ``dl1`` joined by a veth pair ``dlv0``/``dlv1`` with the link-local addresses
169.254.77.1/30 and 169.254.77.2/30, a ``tc tbf`` rate limit (``--rate``, default 100mbit,
burst 32kbit, latency 50ms) on both ends, and a ``netem`` delay (``--delay-ms``) only if this
kernel has netem. Link-local addresses need no sysctl: 127.x would need
``net.ipv4.conf.*.route_localnet=1`` to be routed over a veth, and a link-local pair is never
routed beyond the link anyway. Only the two namespaces and their veth pair are created; the host's
interfaces, routes and sysctls are not touched. One ``torchrun --nnodes 2`` node runs inside each
namespace (``ip netns exec``), with ``GLOO_SOCKET_IFNAME`` set to its veth. Bytes on the wire are
the veth's ``tx_bytes`` counters read before and after each run (rendezvous, evaluation and the
final-model gather included; TCP/IP headers and ACKs included). Everything is set up by this
script, bounded by timeouts, and torn down in ``finally`` (SIGINT/SIGTERM/SIGHUP included).

**Fallback** (``--mechanism throttle``, used automatically when namespaces or tc are not
permitted, and said so in the output): both nodes on 127.0.0.1, and inside every rank each
``torch.distributed`` collective is charged to a per-rank uplink of ``--rate`` bytes/s: a
transfer of B bytes (ring estimate: all-reduce 2(n−1)/n·B, all-gather (n−1)·B_in,
reduce-scatter and all-to-all (n−1)/n·B_in) finishes at max(now, link free) + B/rate + delay.
Synchronous collectives and FSDP2's all-gathers/reduce-scatters sleep until then; an async
all-reduce/all-to-all/all-gather (DiLoCo's reducer) only waits for it in ``wait()``, so overlap
is modelled. Bytes are then this model's count, not measured.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "ADDR",
    "NS",
    "VETH",
    "Link",
    "install_throttle",
    "kill_group",
    "rate_bytes",
    "throttled_worker",
]

NS = ("dl0", "dl1")
VETH = ("dlv0", "dlv1")
ADDR = ("169.254.77.1", "169.254.77.2")
PREFIX = 30


# --------------------------------------------------------------------------------------------
# the emulated link


def _run(cmd: list[str], timeout: float = 15, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip() or result.returncode}")
    return result


class Link:
    """Two namespaces joined by a rate-limited veth pair; :meth:`close` removes them."""

    def __init__(self, rate: str, delay_ms: float):
        self.rate, self.delay_ms = rate, delay_ms
        self.created: list[str] = []
        self.netem = False
        self.notes: list[str] = []

    def open(self) -> None:
        existing = _run(["ip", "netns", "list"]).stdout.split()
        clash = [ns for ns in NS if ns in existing]
        if clash:
            raise RuntimeError(
                f"network namespace(s) {', '.join(clash)} already exist (a killed run?); "
                f"remove them with `ip netns del {' '.join(clash)}` and rerun"
            )
        for ns in NS:
            _run(["ip", "netns", "add", ns])
            self.created.append(ns)
        _run(["ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth",
              "peer", "name", VETH[1], "netns", NS[1]])  # fmt: skip
        for ns, dev, addr in zip(NS, VETH, ADDR, strict=True):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        tbf = ["tbf", "rate", self.rate, "burst", "32kbit", "latency", "50ms"]
        for ns, dev in zip(NS, VETH, strict=True):
            parent = ["root"]
            if self.delay_ms > 0:
                netem = _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:",
                              "netem", "delay", f"{self.delay_ms}ms"], check=False)  # fmt: skip
                if netem.returncode == 0:
                    self.netem = True
                    parent = ["parent", "1:", "handle", "2:"]
                elif not self.notes:
                    self.notes.append(
                        f"netem is not available on this kernel ({netem.stderr.strip()}); "
                        f"no delay added (asked for {self.delay_ms} ms)"
                    )
            _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, *tbf])

    def tx_bytes(self) -> list[int]:
        """Bytes each end has sent so far (``/sys/class/net/<veth>/statistics/tx_bytes``)."""
        out = []
        for ns, dev in zip(NS, VETH, strict=True):
            counter = f"/sys/class/net/{dev}/statistics/tx_bytes"
            out.append(int(_run(["ip", "netns", "exec", ns, "cat", counter]).stdout))
        return out

    def measure_throughput(self, megabytes: int = 4) -> float:
        """MB/s of one TCP stream dl0 → dl1 (a sanity check of the emulated rate)."""
        port = 29400
        server = subprocess.Popen(
            ["ip", "netns", "exec", NS[1], sys.executable, "-c", _SINK.format(port=port)],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            client = _run(["ip", "netns", "exec", NS[0], sys.executable, "-c",
                           _SOURCE.format(addr=ADDR[1], port=port, n=megabytes)],
                          timeout=120)  # fmt: skip
            return float(client.stdout.strip())
        finally:
            kill_group(server)

    def close(self) -> None:
        for ns in reversed(self.created):  # deleting a namespace deletes its veth end
            _run(["ip", "netns", "del", ns], check=False)
        self.created.clear()


_SINK = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port})); s.listen(1); s.settimeout(60)
c, _ = s.accept()
while c.recv(1 << 16): pass
"""
_SOURCE = """
import socket, time
c = socket.create_connection(("{addr}", {port}), timeout=60)
block = b"x" * (1 << 20)
t = time.perf_counter()
for _ in range({n}): c.sendall(block)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print({n} / (time.perf_counter() - t))
"""


def kill_group(proc: subprocess.Popen) -> None:
    """Kill the process group this script started for ``proc`` (and only that)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------
# the fallback: a bandwidth-throttled process group (installed inside each rank)


class _Uplink:
    """This rank's emulated uplink: transfers queue behind each other at ``rate`` bytes/s."""

    def __init__(self, rate: float, delay_s: float):
        self.rate, self.delay_s = rate, delay_s
        self.free_at = 0.0
        self.sent = 0.0
        self.lock = threading.Lock()

    def book(self, nbytes: float) -> float:
        """Reserve the link for ``nbytes``; returns when the transfer is done."""
        with self.lock:
            now = time.perf_counter()
            self.free_at = max(now, self.free_at) + nbytes / self.rate
            self.sent += nbytes
            return self.free_at + self.delay_s


class _ThrottledWork:
    """An async collective that is not done before its emulated transfer is."""

    def __init__(self, work: Any, done_at: float):
        self.work, self.done_at = work, done_at

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        out = self.work.wait(*args, **kwargs)
        time.sleep(max(0.0, self.done_at - time.perf_counter()))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.work, name)


def install_throttle(rate: float, delay_s: float) -> _Uplink:
    """Wrap torch.distributed's collectives so each is charged to this rank's uplink."""
    import torch.distributed as dist

    link = _Uplink(rate, delay_s)

    def size(t: Any) -> float:
        return float(t.numel() * t.element_size())

    def ranks(group: Any) -> int:
        return dist.get_world_size(group)

    costs = {  # bytes this rank sends, by collective (ring estimates)
        "all_reduce": lambda a, n: 2 * (n - 1) / n * size(a[0]),
        "all_gather_into_tensor": lambda a, n: (n - 1) * size(a[1]),
        "all_gather_single": lambda a, n: (n - 1) * size(a[1]),
        "reduce_scatter_tensor": lambda a, n: (n - 1) / n * size(a[1]),
        "reduce_scatter_single": lambda a, n: (n - 1) / n * size(a[1]),
        "all_to_all_single": lambda a, n: (n - 1) / n * size(a[1]),
        "broadcast": lambda a, n: size(a[0]),
    }
    overlap = {"all_reduce", "all_gather_into_tensor", "all_to_all_single"}  # .wait() only

    def wrap(name: str, fn: Any, cost: Any) -> Any:
        signature = inspect.signature(fn)

        def throttled(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs).arguments  # in signature order
            n = ranks(bound.get("group"))
            done_at = link.book(cost(list(bound.values()), n)) if n > 1 else 0.0
            work = fn(*args, **kwargs)
            async_op = bool(bound.get("async_op"))
            if async_op and name in overlap and work is not None:
                return _ThrottledWork(work, done_at)
            if work is not None:
                work.wait()
            time.sleep(max(0.0, done_at - time.perf_counter()))
            return work if async_op else None

        return throttled

    for name, cost in costs.items():
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name), cost))
    return link


def throttled_worker(rate: float, delay_s: float, out: Path, argv: list[str]) -> None:
    """Under torchrun (fallback): train with the throttle installed; rank r writes
    ``throttle<r>.json`` with the bytes its uplink carried."""
    link = install_throttle(rate, delay_s)
    from diloco.cli import main

    code = main(["train", *argv])
    rank = int(os.environ.get("RANK", "0"))
    (out / f"throttle{rank}.json").write_text(json.dumps({"sent": link.sent}))
    sys.exit(code)


def rate_bytes(rate: str) -> float:
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise SystemExit(f"--rate {rate!r}: use e.g. 100mbit")
