"""DELIA: Diversity-Enhanced Learning for Instruction Adaptation (arXiv 2408.10841) on TRL 1.x.

`import delia` is cheap: the public names below are imported from their modules on first use (PEP 562), so the
`delia` command and `delia --help` do not pay for torch, transformers, trl and peft before they need them.

In a script, `delia.enable_logging()` shows delia's own log lines (the mixture summary, "final reply only", the CPU
defaults it chose), which the `delia` commands print and plain Python leaves out.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from typing import TYPE_CHECKING, Any

# peft imports bitsandbytes, whose CPU backend warns on every import (on CPUs with AVX512-BF16) that an optional
# 4-bit kernel package is missing, even when nothing is quantized. Quiet it unless the user set that logger's level.
_bnb_cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_cpu_logger.level == logging.NOTSET:
    _bnb_cpu_logger.setLevel(logging.ERROR)

if TYPE_CHECKING:  # real imports for type checkers and IDEs; at run time `__getattr__` below resolves these names
    from .build_cache import build_cache
    from .config import DSFTConfig, get_training_arguments
    from .data import (
        SOURCES,
        DataFormatError,
        load_conversations,
        mix_datasets,
        plan_mixture,
        prepare_datasets,
        validate_conversations,
    )
    from .evaluation.eval_data import load_eval_data
    from .evaluation.evaluate import evaluate, evaluate_model
    from .evaluation.parse import parse_structured
    from .evaluation.plots import plot_runs
    from .evaluation.probe import run_probe
    from .evaluation.report import compare_reports
    from .integrity import MixtureMismatchError
    from .lora import get_peft_config
    from .modeling import add_new_tokens, setup_tokenizer_and_model
    from .models import resolve_model
    from .per_source import SourceTaggingCollator
    from .runtime import enable_logging
    from .sweep import run_sweep
    from .trainer import DSFTTrainer

    __version__: str

#: The name on PyPI (`pip install delia-trl`); the import name stays `delia` (PyPI's `delia` is another project).
DISTRIBUTION = "delia-trl"

#: Public name -> the module that defines it; imported on first use. Keep `__all__` below in step.
_EXPORTS: dict[str, str] = {
    "DSFTConfig": "delia.config",
    "get_training_arguments": "delia.config",
    "DSFTTrainer": "delia.trainer",
    "SourceTaggingCollator": "delia.per_source",
    "add_new_tokens": "delia.modeling",
    "setup_tokenizer_and_model": "delia.modeling",
    "resolve_model": "delia.models",
    "enable_logging": "delia.runtime",
    "get_peft_config": "delia.lora",
    "MixtureMismatchError": "delia.integrity",
    "build_cache": "delia.build_cache",
    "SOURCES": "delia.data",
    "DataFormatError": "delia.data",
    "load_conversations": "delia.data",
    "mix_datasets": "delia.data",
    "plan_mixture": "delia.data",
    "prepare_datasets": "delia.data",
    "validate_conversations": "delia.data",
    "run_probe": "delia.evaluation.probe",
    "plot_runs": "delia.evaluation.plots",
    "parse_structured": "delia.evaluation.parse",
    "evaluate": "delia.evaluation.evaluate",
    "evaluate_model": "delia.evaluation.evaluate",
    "load_eval_data": "delia.evaluation.eval_data",
    "compare_reports": "delia.evaluation.report",
    "run_sweep": "delia.sweep",
}

__all__ = [
    "SOURCES",
    "DSFTConfig",
    "DSFTTrainer",
    "DataFormatError",
    "MixtureMismatchError",
    "SourceTaggingCollator",
    "add_new_tokens",
    "build_cache",
    "compare_reports",
    "enable_logging",
    "evaluate",
    "evaluate_model",
    "get_peft_config",
    "get_training_arguments",
    "load_conversations",
    "load_eval_data",
    "mix_datasets",
    "parse_structured",
    "plan_mixture",
    "plot_runs",
    "prepare_datasets",
    "run_probe",
    "run_sweep",
    "resolve_model",
    "setup_tokenizer_and_model",
    "validate_conversations",
]


def _installed_version() -> str:
    """The installed distribution's version, or a placeholder when running from an uninstalled checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    """Import a public name (or `__version__`, or a submodule such as `delia.data`) on first use, then keep it."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name == "__version__":
        value = _installed_version()
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # importing binds it on the package itself
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    """The module's own names plus the lazy ones, so completion and `dir(delia)` list them before first use."""
    return sorted({*globals(), *_EXPORTS, "__version__"})


class _Package(types.ModuleType):
    """The `delia` module's type: a submodule never shadows the public name it shares.

    Importing a submodule sets it as an attribute of its package. `delia/DSFTTrainer.py` (the original project's
    import path, `from delia.DSFTTrainer import DSFTTrainer`) and `delia/build_cache.py` share their names with the
    class and the function exported here, so importing them would replace `delia.DSFTTrainer` / `delia.build_cache`
    with the module, and a later `from delia import DSFTTrainer` would hand out a module. Those assignments are
    dropped, so the name keeps resolving (through `__getattr__`) to the class or function, in any import order.
    The submodules themselves stay importable: the import system finds them in `sys.modules`.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
