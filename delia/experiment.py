"""The self-sample-then-sweep pipeline that `delia demo --real` and `reproduce_checkpoint/small` share.

Resolve the model by name, self-sample the diverse cache (in bf16 where the CPU computes it natively), train and
evaluate the sweep, and time each phase; the caller writes its own summary from what this returns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .build_cache import CacheResult, build_cache
from .config import DSFTConfig
from .evaluation.evaluate import EvalArguments
from .models import resolve_model
from .progress import Phases, say, slow_cpu_notice
from .runtime import has_accelerator, start_run_folder
from .sweep import SweepArguments, run_sweep


def generation_dtype() -> str:
    """The dtype to self-sample in: bf16 on a CPU that computes it natively (about 2.8x faster), else the default."""
    import torch

    from .cpu import native_bf16

    return "bfloat16" if not torch.cuda.is_available() and native_bf16() else "auto"


@dataclass
class Experiment:
    """A pipeline run: its folder, the resolved model, and the wall time of each phase so far."""

    output_dir: str
    model_path: str
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    phases: Phases | None = None  # headers and the first-batch estimate: "self-sampling", then the sweep's keys

    @classmethod
    def start(cls, model: str, output_dir: str | os.PathLike, phases: Phases | None = None) -> Experiment:
        """Check and mark the output folder, then resolve `model` (a short name is fetched once; timed as "model").

        Says first, in one line, when this CPU lacks native bf16 and will be slower than the documented times.
        """
        started = time.perf_counter()
        output_dir = os.fspath(output_dir)
        start_run_folder(output_dir)
        from .cpu import native_bf16

        notice = slow_cpu_notice(native_bf16(), has_accelerator())
        if notice:
            say(notice)
        path = resolve_model(model)
        return cls(output_dir, path, {"model": time.perf_counter() - started}, started, phases)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (added up when a phase runs in several blocks)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started

    def self_sample(self, queries: Any, cache: str | os.PathLike, **options: Any) -> CacheResult:
        """`build_cache` with this run's model into `cache` (resumable), as phase "self-sampling"."""
        options.setdefault("dtype", generation_dtype())
        options.setdefault("batch_size", 32)
        if self.phases is not None:
            self.phases.start("self-sampling")
            options.setdefault("on_batch", partial(self.phases.first_batch, "self-sampling", unit="replies"))
        with self.phase("self-sampling"):
            return build_cache(self.model_path, queries, cache, **options)

    def sweep(
        self, sweep: SweepArguments, eval_args: EvalArguments, model_args: Any, args: DSFTConfig
    ) -> list[dict[str, Any]]:
        """`delia sweep` (training, evaluation, probe), as phase "training and evaluation"; the table rows."""
        with self.phase("training and evaluation"):
            return run_sweep(sweep, eval_args, model_args, args, self.phases)

    def wall_seconds(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started
