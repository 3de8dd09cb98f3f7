"""LoRA for DELIA: the original recipe's peft config, with only the new tokens' embedding rows trainable.

`trainable_token_indices` names the input embeddings, and the LM head too when it is untied (else the output row of
`<sep>` would never train).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig
from transformers import PreTrainedModel

from .modeling import NEW_TOKEN_IDS_ATTRIBUTE

logger = logging.getLogger(__name__)


def _module_name(model: PreTrainedModel, module: torch.nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError(f"{type(module).__name__} is not a submodule of the model")


def resolve_trainable_token_modules(peft_config: Any, model: PreTrainedModel) -> None:
    """Point `trainable_token_indices` at the input embeddings, and at the LM head too when it is untied.

    A list of ids (or none, when `setup_tokenizer_and_model` added tokens to `model`) becomes a dict naming the
    embedding modules. Without the LM head entry, an untied model would never train the output row of `<sep>`.
    """
    indices = getattr(peft_config, "trainable_token_indices", None)
    if indices is None:
        indices = getattr(model.config, NEW_TOKEN_IDS_ATTRIBUTE, None)
        if not indices or not isinstance(peft_config, LoraConfig):
            return
        logger.info("Training the embedding rows of the new tokens %s", indices)
    if isinstance(indices, Mapping):
        return
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    resolved = {_module_name(model, input_embeddings): list(indices)}
    if output_embeddings is not None and output_embeddings.weight is not input_embeddings.weight:
        resolved[_module_name(model, output_embeddings)] = list(indices)
    peft_config.trainable_token_indices = resolved


def get_peft_config(
    r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    new_token_ids: Sequence[int] | None = None,
    *,
    model: PreTrainedModel | None = None,
    **lora_kwargs: Any,
) -> LoraConfig:
    """The original LoRA recipe (r=16, alpha=16, dropout 0.05 on q/k/v/o), with only the new tokens' rows trainable.

    `new_token_ids` defaults to the tokens `setup_tokenizer_and_model` added; `DSFTTrainer` resolves them, and the
    embedding module names (the LM head too when it is untied), from the model it is given. Pass `model=` to resolve
    them here instead. Extra keyword arguments go to `LoraConfig`.
    """
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        trainable_token_indices=list(new_token_ids) if new_token_ids is not None else None,
        bias=lora_kwargs.pop("bias", "none"),
        task_type=lora_kwargs.pop("task_type", "CAUSAL_LM"),
        **lora_kwargs,
    )
    if model is not None:
        resolve_trainable_token_modules(config, model)
    return config
