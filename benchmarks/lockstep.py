"""Two trainers in one process, taking turns one optimizer step at a time, so both see the same background load.

Each trainer trains in its own thread; `Baton` lets only one of them compute at any moment and passes the turn at
every `on_step_begin`; `LockstepTimer` records each step's wall time (whole step, and compute only). Shared by the
benchmarks that compare two trainers side by side.
"""

from __future__ import annotations

import threading
import time

from transformers import TrainerCallback


class Baton:
    """Lets two trainers, each training in its own thread, run one optimizer step at a time, taking turns.

    Neither starts its first step until both have reached it (so the set-up of one never overlaps a step of the
    other); then the turn passes at every `on_step_begin`. Only one thread computes at any moment.
    """

    def __init__(self, order: tuple[str, str], timeout: float = 600.0):
        self.order, self.timeout = order, timeout
        self.turn: str | None = None  # whose step it is; None until both have arrived at their first step
        self.arrived: set[str] = set()
        self.done: set[str] = set()
        self.failure: str | None = None
        self.condition = threading.Condition()

    def wait_turn(self, name: str) -> None:
        with self.condition:
            self.arrived.add(name)
            if self.turn is None and self.arrived == set(self.order):
                self.turn = self.order[0]
                self.condition.notify_all()
            if not self.condition.wait_for(lambda: self.failure or self.turn == name, timeout=self.timeout):
                raise TimeoutError(f"{name} waited {self.timeout:.0f} s for its turn")
            if self.failure:
                raise RuntimeError(f"the other trainer failed: {self.failure}")

    def pass_turn(self, name: str) -> None:
        with self.condition:
            others = [other for other in self.order if other != name and other not in self.done]
            self.turn = others[0] if others else name
            self.condition.notify_all()

    def finish(self, name: str) -> None:
        with self.condition:  # a reentrant lock: pass_turn takes it again
            self.done.add(name)
            self.pass_turn(name)

    def fail(self, reason: str) -> None:
        with self.condition:
            self.failure = reason
            self.condition.notify_all()


class LockstepTimer(TrainerCallback):
    """Times each step from the moment it gets the turn to its next on_step_begin, then hands the turn over.

    `steps`: whole steps (compute, logging, and fetching + collating the next batch). `computes`: on_step_begin ->
    on_step_end only (forward, backward, optimizer).
    """

    def __init__(self, name: str, baton: Baton):
        self.name, self.baton = name, baton
        self.steps: list[float] = []
        self.computes: list[float] = []
        self.start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is not None:
            self.steps.append(time.perf_counter() - self.start)
            self.baton.pass_turn(self.name)
        self.baton.wait_turn(self.name)
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.computes.append(time.perf_counter() - self.start)

    def on_train_end(self, args, state, control, **kwargs):
        self.computes = self.computes[: len(self.steps)]  # the last step has no next on_step_begin: leave it out
        self.baton.finish(self.name)
