"""Training fast on a CPU: what the hardware can do, how many threads to use, and less work in the LM head.

`DSFTConfig` turns these into defaults where there is no accelerator (each documented there): bf16 autocast where the
CPU computes in bf16 natively, no gradient checkpointing while the activations fit in memory, and a thread count that
leaves out cores other programs keep busy. `DSFTTrainer` scores only the label positions in TRL's fused LM head
(`delia.upstream.score_label_positions_only`).
"""

from __future__ import annotations

import os
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


def free_threads(local_processes: int | None = None) -> int:
    """Intra-op threads for one training process on CPU: its share of the cores other programs leave free.

    The cores this process may use are shared among the launch's processes on this machine (`LOCAL_WORLD_SIZE`),
    less those other programs keep busy (the 1-minute load average, minus the launch's own processes). Never more
    than torch's current setting (the physical cores, or what the user chose), never less than one. On a shared
    machine, a thread that loses its core holds up every parallel op: a 2-core box running other jobs trained a
    135M model about 3x faster on one thread than on two.
    """
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy_elsewhere = max(0.0, load - local)
    free = round(cores - busy_elsewhere) // max(1, local)
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
