"""Runtime helpers: which hardware this process has, its place in a launched job, clean exit, run folders, and
delia's own log lines on stderr (`enable_logging`)."""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .run_files import MIXTURE_FILE, PROBE_PREFIX, RUN_MARKER


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator."""
    import torch  # here, not at the top: the commands' option modules import this module before torch is needed

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def process_state():
    """This process's place in an `accelerate launch` / torchrun job (CPU-only jobs need `cpu=True` to see it)."""
    from accelerate import PartialState

    return PartialState(cpu=not has_accelerator())


def leave_process_group() -> None:
    """Destroy the default process group, if a launcher started one, so that every rank exits cleanly.

    Left to interpreter exit, a gloo worker thread still releasing a finished collective's tensors can abort
    the rank; destroyed straight after a collective, the group's destructor (which holds the GIL) can wait
    forever on that same thread (pytorch/pytorch#190489). So: free what still holds the group (DDP's reducer),
    let the worker threads finish, then destroy it, as `Accelerator.end_training` does.
    """
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()
    time.sleep(0.2)  # releases the GIL: gloo's threads finish destroying completed work
    torch.distributed.destroy_process_group()


def check_output_dir(output_dir: str) -> None:
    """Refuse a folder that holds something other than a delia run, so nothing unrelated is overwritten."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"output folder {output_dir!r} is a file")
    # another process of the same launch may be probing the folder right now: its probe file is not a foreign file
    if os.path.isdir(output_dir) and [name for name in os.listdir(output_dir) if not name.startswith(PROBE_PREFIX)]:
        if not any(os.path.exists(os.path.join(output_dir, name)) for name in (RUN_MARKER, MIXTURE_FILE)):
            raise FileExistsError(
                f"output folder {output_dir!r} exists and is not a delia run; choose another folder (nothing was "
                "written)"
            )


def start_run_folder(output_dir: str) -> None:
    """Check the folder, create it and mark it as a delia run, so a rerun after a crash may reuse it.

    Creating and removing a probe file first turns a folder that cannot be written (a read-only file system, no
    permission, a path under a file) into one clear error before any work, rather than a failure at the first save.
    """
    check_output_dir(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        open(os.path.join(output_dir, RUN_MARKER), "a").close()  # first: the other processes check for it
        handle, probe = tempfile.mkstemp(dir=output_dir, prefix=PROBE_PREFIX)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OSError(
            f"output folder {output_dir!r} cannot be written ({error.strerror or error}); choose another folder"
        ) from None


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No datasets / transformers progress bars meanwhile (a command's table or its one error line is the output)."""
    import datasets
    import transformers

    bars = datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()


#: The attribute that marks the handler `enable_logging` adds, so a second call changes the level and adds nothing.
_HANDLER_MARK = "delia_enable_logging"


def log_handler(stream: Any = None) -> logging.Handler:
    """A handler that writes "delia: message" to `stream` (stderr): on the main process of a launched job every line,
    on the others only warnings and the lines every process logs (its mixture fingerprint), so N processes do not
    repeat each line N times."""
    main_process = int(os.environ.get("RANK", "0")) == 0  # set by torchrun and accelerate launch
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(logging.Formatter("delia: %(message)s"))
    handler.addFilter(
        lambda record: main_process or record.levelno >= logging.WARNING or getattr(record, "every_rank", False)
    )
    return handler


def enable_logging(level: int | str = "INFO", stream: Any = None) -> logging.Handler:
    """Show delia's own log lines in a script: the mixture summary, "final reply only", the CPU defaults it chose.

    The `delia` commands show them; a plain Python script does not, because Python prints only warnings from a
    logger that has no handler. This adds one handler to the `delia` logger (lines "delia: ..." on stderr, or on
    `stream`) and sets its level (`"INFO"`, `"DEBUG"`, `"WARNING"` or a `logging` level); calling it again only changes
    the level. Returns the handler. Configuring `logging` yourself works too: delia's loggers are named `delia.*`.
    """
    logger = logging.getLogger("delia")
    handler = next((h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)), None)
    if handler is None:
        handler = log_handler(stream)
        setattr(handler, _HANDLER_MARK, True)
        logger.addHandler(handler)
    elif stream is not None and isinstance(handler, logging.StreamHandler):
        handler.setStream(stream)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
