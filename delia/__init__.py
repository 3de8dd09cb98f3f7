"""DELIA: Diversity-Enhanced Learning for Instruction Adaptation (arXiv 2408.10841) on TRL 1.x."""

# ruff: noqa: E402  (the logger below must be set before the imports that pull in bitsandbytes)

import logging

# peft imports bitsandbytes, whose CPU backend warns on every import (on CPUs with AVX512-BF16) that an optional
# 4-bit kernel package is missing, even when nothing is quantized. Quiet it unless the user set that logger's level.
_bnb_cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_cpu_logger.level == logging.NOTSET:
    _bnb_cpu_logger.setLevel(logging.ERROR)

# Import the legacy module `delia.DSFTTrainer` first, so that binding the class below wins over the submodule of the
# same name (Python sets a package attribute when a submodule is first imported).
from . import DSFTTrainer as _legacy_trainer_module  # noqa: F401
from .build_cache import build_cache
from .config import DSFTConfig
from .data import (
    SOURCES,
    DataFormatError,
    load_conversations,
    mix_datasets,
    plan_mixture,
    prepare_datasets,
    validate_conversations,
)
from .trainer import DSFTTrainer, SourceTaggingCollator
from .utils import (
    add_new_tokens,
    get_peft_config,
    get_training_arguments,
    setup_tokenizer_and_model,
)

__version__ = "0.1.0"

__all__ = [
    "SOURCES",
    "DSFTConfig",
    "DSFTTrainer",
    "DataFormatError",
    "SourceTaggingCollator",
    "add_new_tokens",
    "build_cache",
    "get_peft_config",
    "get_training_arguments",
    "load_conversations",
    "mix_datasets",
    "plan_mixture",
    "prepare_datasets",
    "setup_tokenizer_and_model",
    "validate_conversations",
]
