"""What a long command says while it works: numbered phase headers with each phase's expected share of the time, a
time estimate measured from the first batch, and a notice when the CPU will be slow.

No torch, transformers or delia imports at module level: the demos print their first line before anything heavy loads.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


def duration(seconds: float) -> str:
    """Seconds as a reader says them: 0.4 s, 40 s, 3.5 min, 1.2 h."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def say(line: str) -> None:
    """One line on stdout, above any progress bar showing (tqdm moves the bar below it), flushed."""
    from tqdm.auto import tqdm

    sys.stderr.flush()
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


@dataclass
class Phase:
    """One phase of a command: its key, what the header says, and its expected share of the whole run's time."""

    key: str
    title: str
    share: float


@dataclass
class Phases:
    """Headers for a command's phases, and the whole run's time estimated from the first batch of the first one timed.

    `measured_on` says where the shares come from (they are measured on one machine; another one's differ somewhat).
    """

    phases: Sequence[Phase]
    measured_on: str = ""
    name: str = "the run"
    started: float = field(default_factory=time.perf_counter)
    estimated: set[str] = field(default_factory=set)

    def _find(self, key: str) -> tuple[int, Phase] | None:
        return next(((index, phase) for index, phase in enumerate(self.phases) if phase.key == key), None)

    def start(self, key: str, detail: str = "") -> None:
        """Print the header of phase `key` ("[2/5] self-sampling ...: about 15% of the time"); unknown keys: nothing."""
        found = self._find(key)
        if found is None:
            return
        index, phase = found
        detail = f" ({detail})" if detail else ""
        say(f"\n[{index + 1}/{len(self.phases)}] {phase.title}{detail}: about {phase.share:.0%} of the time")

    def first_batch(
        self,
        key: str,
        done: int,
        total: int,
        seconds: float,
        unit: str,
        what: str = "this phase",
        counted: str | None = None,
    ) -> None:
        """After the first batch of phase `key` (`done` of `total` `unit`s in `seconds`; `counted` names the batch
        when it is not the first), print once how long `what` and, the first time anything is measured, the whole run
        will take."""
        found = self._find(key)
        if found is None or key in self.estimated or done <= 0 or total <= 0:
            return
        first = not self.estimated
        self.estimated.add(key)
        phase_seconds = seconds * total / done
        counted = counted or ("the first" if done == 1 else f"the first {done}")
        line = f"    measured: {counted} of {total} {unit} took {duration(seconds)}, so {what} about "
        line += duration(phase_seconds)
        if first and found[1].share > 0:  # the phases from this one on, scaled by this one's measured time
            later = sum(phase.share for phase in self.phases[found[0] :])
            whole = max(0.0, time.perf_counter() - self.started - seconds) + phase_seconds * later / found[1].share
            where = f", from shares measured on {self.measured_on}" if self.measured_on else ""
            line += f" and {self.name} about {duration(whole)}{where}"
        say(line)


def slow_cpu_notice(native_bf16: bool, has_gpu: bool) -> str | None:
    """The line to print when training and generation run on a CPU without native bf16, else None."""
    if has_gpu or native_bf16:
        return None
    return (
        "note: this CPU has no native bf16 (AVX512-BF16 or AMX), so delia computes in float32 here: expect this to "
        "be slower than the documented times (self-sampling about 2.8x slower)."
    )


def label_training_bar(trainer: Any, label: str, on_first_step: Callable[..., None] | None = None) -> None:
    """Give `trainer` a progress bar named `label` (steps, ETA, the latest loss and tokens/s) in place of the Trainer's
    unnamed bar and its log dict per step; `on_first_step(1, max_steps, seconds, counted=)` hears the time of one
    early optimizer step (the second, else the first)."""
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, ProgressCallback

    class LabelledBar(ProgressCallback):
        started, first = 0.0, None  # (tokens, time) at the first logged step: tokens/s since then

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                self.training_bar = tqdm(total=state.max_steps, desc=label, unit="step", dynamic_ncols=True)
            self.current_step = 0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()  # after any eval at the start (eval_on_start): that is not a step

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            super().on_step_end(args, state, control, **kwargs)
            # the second step, when there is one: the first also pays for one-time set-up (allocation, warm-up)
            measured = min(2, state.max_steps)
            if state.global_step == measured and on_first_step is not None and state.is_world_process_zero:
                counted = "the second" if measured == 2 else None
                on_first_step(1, state.max_steps, time.perf_counter() - self.started, counted=counted)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if self.training_bar is None or not logs or "loss" not in logs:
                return
            parts = [f"loss {logs['loss']:.3f}"]
            now, tokens = time.perf_counter(), logs.get("num_tokens")
            if isinstance(tokens, int | float) and self.first is not None and now > self.first[1]:
                parts.append(f"{(tokens - self.first[0]) / (now - self.first[1]):.0f} tokens/s")
            elif isinstance(tokens, int | float):
                self.first = (tokens, now)
            self.training_bar.set_postfix_str(", ".join(parts), refresh=False)

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LabelledBar())
