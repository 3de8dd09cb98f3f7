"""The same training data on every process and after every restart.

- `check_same_mixture_on_every_process`: under a launcher (torchrun, `accelerate launch`), every process's mixture
  fingerprint (`delia.data.fingerprint`) is gathered and compared before training; processes that built different
  mixtures (a truncated or older copy of a file on one node) stop with an error naming the ranks and their hashes.
- `CheckpointRecordCallback`: every checkpoint folder gets `delia_checkpoint.json` (the mixture record, fingerprint
  included), written once every process has saved its part, so the file also marks the checkpoint as complete.
- `last_complete_checkpoint`: the newest checkpoint folder holding that file (one a kill left half-written has none).
- `check_checkpoint`: resuming from a checkpoint of other data (a changed cache or downstream file, another run's
  checkpoint) is refused, naming both fingerprints, unless `allow_mixture_change=True`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .data.fingerprint import fingerprint_differences
from .io import read_json_or_none, write_json_atomically
from .run_files import CHECKPOINT_RECORD

logger = logging.getLogger(__name__)

OVERRIDE_HINT = "pass allow_mixture_change=True (delia train: --allow_mixture_change true) to resume anyway"


class MixtureMismatchError(ValueError):
    """Two processes, or a run and the checkpoint it resumes from, do not have the same training mixture."""


def check_same_mixture_on_every_process(fingerprint: dict[str, Any]) -> None:
    """Gather every process's fingerprint; raise on every process, naming the ranks, unless they are all equal."""
    if PartialState().num_processes <= 1:
        return
    gathered = gather_object([fingerprint])
    ranks_by_hash: dict[str, list[int]] = {}
    for rank, theirs in enumerate(gathered):
        ranks_by_hash.setdefault(theirs["combined"], []).append(rank)
    if len(ranks_by_hash) == 1:
        return
    groups = [f"rank {', '.join(map(str, ranks))}: {combined[:16]}" for combined, ranks in ranks_by_hash.items()]
    first = gathered[0]
    details = []
    for ranks in list(ranks_by_hash.values())[1:]:
        found = fingerprint_differences(first, gathered[ranks[0]], ("on rank 0", f"on rank {ranks[0]}"))
        details.append(f"rank {ranks[0]} against rank 0: {'; '.join(found)}")
    raise MixtureMismatchError(
        f"the processes built different training mixtures, so they would train on different rows ({'; '.join(groups)}"
        f"). {'. '.join(details)}. Every process must read the same files; nothing was trained"
    )


def _checkpoint_step(name: str) -> int | None:
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
    return int(match.group(1)) if match else None


def checkpoint_folders(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of a run, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (step, name)
        for name in os.listdir(output_dir)
        if (step := _checkpoint_step(name)) is not None and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint folder with its `delia_checkpoint.json`, i.e. saved to the end; None if there is none."""
    folders = checkpoint_folders(output_dir)
    for position, folder in enumerate(folders):
        if os.path.isfile(os.path.join(folder, CHECKPOINT_RECORD)):
            if position:
                skipped = ", ".join(os.path.basename(newer) for newer in folders[:position])
                logger.warning(f"Skipping {skipped} (no {CHECKPOINT_RECORD}: not saved to the end); using {folder}")
            return folder
    return None


def find_checkpoint(output_dir: str, allow_incomplete: bool = False) -> str | None:
    """The checkpoint to resume a run from: the last complete one; with `allow_incomplete`, else the newest folder."""
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None and allow_incomplete:
        checkpoint = next(iter(checkpoint_folders(output_dir)), None)
    return checkpoint


def read_checkpoint_record(checkpoint: str) -> dict[str, Any] | None:
    """The record a checkpoint folder holds, or None when it has none (or not a readable one)."""
    record = read_json_or_none(os.path.join(checkpoint, CHECKPOINT_RECORD))
    return record if isinstance(record, dict) else None


def check_checkpoint(checkpoint: str, fingerprint: dict[str, Any], allow_change: bool) -> None:
    """Raise unless `checkpoint` was trained on the mixture `fingerprint` describes; with `allow_change`, warn."""
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint folder {checkpoint!r} not found")
    record = read_checkpoint_record(checkpoint)
    then = (record or {}).get("mixture", {}).get("fingerprint")
    if not isinstance(then, dict) or "combined" not in then:
        problem = (
            f"{checkpoint} has no {CHECKPOINT_RECORD}: it was not saved to the end (a kill while saving?) or not by "
            "DSFTTrainer, so the data it was trained on is unknown"
        )
    elif then["combined"] != fingerprint["combined"]:
        changes = fingerprint_differences(then, fingerprint, ("then", "now")) or ["the fingerprints differ"]
        problem = (
            f"{checkpoint} was trained on another mixture (fingerprint {then['combined'][:16]} then, "
            f"{fingerprint['combined'][:16]} now): {'; '.join(changes)}"
        )
    else:
        return
    if not allow_change:
        raise MixtureMismatchError(f"cannot resume: {problem}; {OVERRIDE_HINT}")
    logger.warning(f"Resuming although {problem} (allow_mixture_change=True)")


class CheckpointRecordCallback(TrainerCallback):
    """Writes `delia_checkpoint.json` into each checkpoint folder, after every process has saved its files."""

    def __init__(self, record: Callable[[], dict[str, Any]]):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()  # other ranks' RNG states are part of the checkpoint too
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            record = {"global_step": state.global_step, "mixture": self.record()}
            write_json_atomically(os.path.join(folder, CHECKPOINT_RECORD), record)
        return control
