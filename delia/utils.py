"""The original DELIA README's import path: `from delia.utils import setup_tokenizer_and_model, ...` keeps working.

The code lives in modules named for their jobs: `delia.modeling` (loading, dtype, quantization, new tokens),
`delia.lora` (peft config with trainable new-token rows) and `delia.config` (`get_training_arguments`).
"""

from .config import get_training_arguments
from .lora import get_peft_config, resolve_trainable_token_modules
from .modeling import (
    NEW_TOKEN_IDS_ATTRIBUTE,
    QUANTIZATION_CHOICES,
    add_new_tokens,
    model_load_error,
    quantization_config_for,
    setup_tokenizer_and_model,
)
from .upstream import expose_trainable_token_lm_head_bias

__all__ = [
    "NEW_TOKEN_IDS_ATTRIBUTE",
    "QUANTIZATION_CHOICES",
    "add_new_tokens",
    "expose_trainable_token_lm_head_bias",
    "get_peft_config",
    "get_training_arguments",
    "model_load_error",
    "quantization_config_for",
    "resolve_trainable_token_modules",
    "setup_tokenizer_and_model",
]
