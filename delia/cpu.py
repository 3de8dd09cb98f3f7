"""Training fast on a CPU: what the hardware can do, how many threads to use, and less work in the LM head.

`DSFTConfig` turns these into defaults where there is no accelerator (each documented there): bf16 autocast where the
CPU computes in bf16 natively, no gradient checkpointing while the activations fit in memory, and a thread count that
leaves out cores other programs keep busy. `DSFTTrainer` scores only the label positions in TRL's fused LM head
(`delia.upstream.score_label_positions_only`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), so that bf16 autocast speeds training up.

    Elsewhere bf16 is emulated and slower than float32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpu_seconds() -> tuple[float, float] | None:
    """(seconds every CPU of the machine spent busy, seconds this process spent on a CPU), or None without /proc."""
    try:
        import resource  # POSIX only, like /proc/stat

        mine = {f"cpu{core}" for core in os.sched_getaffinity(0)}  # the cores this process may use, not the host's
        busy = 0
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                name, *values = line.split()
                if name in mine:
                    ticks = [int(value) for value in values[:8]]
                    busy += sum(ticks) - ticks[3] - ticks[4]  # less idle and iowait
    except (ImportError, AttributeError, OSError, ValueError, IndexError):
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


class OtherLoad:
    """How many cores other programs kept busy since the last look: the machine's busy time less this process's own.

    The load average cannot tell: it counts this process's own threads too, and lags by a minute. Between two
    batches of a decode this reads /proc/stat and the process's own CPU time instead.
    """

    STALE_S = 5.0  # an interval longer than this says little about now: a fresh 0.1 s look is taken instead

    def __init__(self) -> None:
        self._last = (time.monotonic() - 2 * self.STALE_S, _cpu_seconds())  # the first look takes its own 0.1 s
        self._estimate: float | None = None

    def cores(self) -> float | None:
        """Cores busy elsewhere since the last call (over the last 0.1 s when that was long ago); None without /proc."""
        if self._last[1] is None:
            return None
        if time.monotonic() - self._last[0] > self.STALE_S:
            self._last = (time.monotonic(), _cpu_seconds())
            time.sleep(0.1)
        now = (time.monotonic(), _cpu_seconds())
        (then, before), (at, after) = self._last, now
        if after is None or at - then < 0.05:  # too short to tell: the last estimate stands
            return self._estimate
        self._last = now
        self._estimate = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (at - then)
        return self._estimate


def thread_count(setting: int | None, busy_elsewhere: float | None = None) -> int | None:
    """Intra-op threads for CPU work under delia's `cpu_threads` setting, or None to leave torch's setting alone.

    None: the cores other programs leave free (`free_threads`), unless OMP_NUM_THREADS says what the user wants;
    0: torch's setting; N: N threads.
    """
    if setting == 0 or (setting is None and os.environ.get("OMP_NUM_THREADS")):
        return None
    return setting or free_threads(busy_elsewhere=busy_elsewhere)


@contextmanager
def threads_while(setting: int | None, device: Any, other_load: OtherLoad | None = None) -> Iterator[None]:
    """Run a block of CPU work (a batch of a decode, of an evaluation) with `thread_count(setting)` threads, looked
    up now (so it follows the machine's load between batches); on another device, nothing changes."""
    on_cpu = getattr(device, "type", device) == "cpu"
    count = thread_count(setting, other_load.cores() if other_load is not None else None) if on_cpu else None
    with torch_threads(count):
        yield


def free_threads(local_processes: int | None = None, busy_elsewhere: float | None = None) -> int:
    """Intra-op threads for one training process on CPU: its share of the cores other programs leave free.

    The cores this process may use are shared among the launch's processes on this machine (`LOCAL_WORLD_SIZE`),
    less those other programs keep busy (`busy_elsewhere`, else the 1-minute load average less the launch's own
    processes). Never more
    than torch's current setting (the physical cores, or what the user chose), never less than one. On a shared
    machine, a thread that loses its core holds up every parallel op: a 2-core box running other jobs trained a
    135M model about 3x faster on one thread than on two.
    """
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cores = usable_cores()
    if busy_elsewhere is None:  # the load average less the launch's own processes, shared among them
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        free = round(cores - max(0.0, load - local)) // max(1, local)
    else:  # measured by `OtherLoad`: the launch's other processes count as busy already
        free = round(cores - busy_elsewhere)
    return max(1, min(torch.get_num_threads(), cores // max(1, local), free))


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` intra-op threads (None: unchanged), then restore the previous count."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count:
            torch.set_num_threads(previous)


def activation_bytes(config: Any, tokens: int) -> int:
    """A rough upper bound on the activations one micro-batch of `tokens` tokens keeps for the backward pass.

    Per token and decoder layer, a Llama-style layer keeps about ten hidden-size vectors (norms, attention
    projections, LoRA inputs, residuals) and four intermediate-size ones (the MLP), in float32.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", 0) or 0
    intermediate = getattr(text, "intermediate_size", 0) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", 0) or 0
    return int(tokens) * layers * (10 * hidden + 4 * intermediate) * 4


def available_memory() -> int:
    """Bytes of memory available to new allocations (psutil; accelerate depends on it)."""
    import psutil

    return int(psutil.virtual_memory().available)
