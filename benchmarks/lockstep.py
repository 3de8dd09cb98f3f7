"""Two trainers in one process, taking turns one optimizer step at a time, so both see the same background load.

Each trainer trains in its own thread; `Baton` lets only one of them compute at any moment and passes the turn at
every `on_step_begin`; `LockstepTimer` records each step's wall time (whole step, and compute only);
`train_in_lockstep` runs the two threads and hands a failure of either back to the caller; `check_same_rows` stops a
comparison whose two trainers did not prepare the same rows. Shared by the benchmarks that compare two trainers side by
side (cpu_training.py, trainer_overhead.py).
"""

from __future__ import annotations

import threading
import time

import torch
from transformers import PrinterCallback, TrainerCallback


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
        """Block until it is `name`'s turn (and both have arrived); raise if the other trainer failed."""
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
        """Hand the turn to the other trainer, unless it has finished."""
        with self.condition:
            others = [other for other in self.order if other != name and other not in self.done]
            self.turn = others[0] if others else name
            self.condition.notify_all()

    def finish(self, name: str) -> None:
        """`name` trained its last step: the other one runs on alone."""
        with self.condition:  # a reentrant lock: pass_turn takes it again
            self.done.add(name)
            self.pass_turn(name)

    def fail(self, reason: str) -> None:
        """Release every waiting thread: one trainer failed, so the other must not wait for its turn."""
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


def lockstep_timers(order: tuple[str, str], timeout: float = 600.0) -> tuple[Baton, dict[str, LockstepTimer]]:
    """A baton for two trainers, the first of `order` starting, and a timer callback for each."""
    baton = Baton(order, timeout=timeout)
    return baton, {name: LockstepTimer(name, baton) for name in order}


def without_printer(trainer):
    """The trainer without its PrinterCallback (with disable_tqdm=True it prints every log dict otherwise)."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def train_in_lockstep(trainers: dict, baton: Baton, threads: dict[str, int] | None = None) -> float:
    """Train each trainer in its own thread, taking turns through `baton`; the seconds until both are done.

    `threads` sets torch's intra-op thread count inside a trainer's thread (the count is per thread, so the main
    thread's setting does not carry over). A failure in either thread releases the other and stops the benchmark.
    """
    results: dict = {}

    def train(name: str) -> None:
        """Train one trainer in the calling thread; keep its result, or its error."""
        if threads and name in threads:
            torch.set_num_threads(threads[name])
        try:
            results[name] = trainers[name].train()
        except BaseException as error:  # hand the error to the main thread, and release the other trainer
            results[name] = error
            baton.fail(f"{name}: {type(error).__name__}: {error}")

    workers = [threading.Thread(target=train, args=(name,)) for name in baton.order]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    for name, result in results.items():
        if isinstance(result, BaseException):
            raise SystemExit(f"FAIL: {name} training raised {type(result).__name__}: {result}") from result
    return elapsed


def check_same_rows(first, second, columns: tuple[str, ...] = ("input_ids",)) -> int:
    """Stop unless two trainers prepared the same rows (each of `columns`, where either has it) in the same order.

    Returns the number of rows. A speed comparison on different tokens means nothing.
    """
    names = (type(first).__name__, type(second).__name__)
    rows = (first.train_dataset, second.train_dataset)
    if len(rows[0]) != len(rows[1]):
        raise SystemExit(f"FAIL: {names[0]} prepared {len(rows[0])} rows, {names[1]} {len(rows[1])}")
    for column in columns:
        present = [column in dataset.column_names for dataset in rows]
        if not any(present):
            continue
        if not all(present):
            raise SystemExit(f"FAIL: only one trainer's prepared rows have {column}")
        for index, (a, b) in enumerate(zip(rows[0][column], rows[1][column], strict=True)):
            if list(a) != list(b):
                raise SystemExit(
                    f"FAIL: the prepared rows differ in {column} first at row {index}: {a[:10]} vs {b[:10]}"
                )
    return len(rows[0])


def step_losses(trainer) -> list[float]:
    """The training loss the trainer logged at each logging step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
