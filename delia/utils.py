"""Tokenizer, model, LoRA and quantization setup, with the names the original DELIA README imports.

On a CUDA GPU the defaults follow the original recipe (8-bit base through bitsandbytes, flash-attention when it is
installed, half precision); on CPU they stay sane (no quantization unless asked, float32). New tokens such as `<sep>`
are added as special tokens and their input and output embedding rows initialised by id; with LoRA, only those rows
of the embedding matrices train (peft's `trainable_token_indices`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from .config import DSFTConfig

logger = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "4bit", "8bit", "none", None)
NEW_TOKEN_IDS_ATTRIBUTE = "delia_new_token_ids"  # on model.config: the ids `setup_tokenizer_and_model` added


# ----------------------------------------------------------------------------------------------------------------------
# Resolving "auto"
# ----------------------------------------------------------------------------------------------------------------------


def _resolve_quantization(quantization: str | None, cuda: bool) -> str | None:
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of 'auto', '4bit', '8bit' or None; got {quantization!r}")
    if quantization == "auto":
        return "8bit" if cuda else None
    return None if quantization == "none" else quantization


def _resolve_dtype(dtype: str | torch.dtype, cuda: bool) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be 'auto', a torch.dtype or its name (e.g. 'bfloat16'); got {dtype!r}")
    return resolved


def _resolve_attention(attn_implementation: str, cuda: bool) -> str:
    if attn_implementation != "auto":
        return attn_implementation
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def quantization_config_for(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The bitsandbytes config for "8bit" (LLM.int8, like the original) or "4bit" (NF4 with double quantization)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


# ----------------------------------------------------------------------------------------------------------------------
# New tokens
# ----------------------------------------------------------------------------------------------------------------------


def _embedding_matrices(model: PreTrainedModel) -> list[torch.Tensor]:
    """The input embedding matrix, and the output one when it is not tied to it."""
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    return matrices


@torch.no_grad()
def _initialise_rows(
    model: PreTrainedModel,
    tokenizer: Any,
    token_ids: dict[str, int],
    old_vocab: int,
    init: str | Mapping[str, str],
    seed: int,
    padding_rows: slice | None,
) -> None:
    """Set each new token's input and output rows by id; rows added only as padding get the mean row."""
    description_ids: dict[str, list[int]] = {}
    if isinstance(init, Mapping):
        for token in token_ids:
            if token not in init:
                raise ValueError(f"new_token_init has no description for {token!r}; give one for every new token")
            ids = tokenizer(init[token], add_special_tokens=False)["input_ids"]
            ids = [i for i in ids if i < old_vocab]
            if not ids:
                raise ValueError(
                    f"new_token_init[{token!r}] = {init[token]!r} has no tokens of the original vocabulary"
                )
            description_ids[token] = ids
    elif init not in ("mean", "random"):
        raise ValueError(f"new_token_init must be 'mean', 'random' or a dict token -> description; got {init!r}")
    generator = torch.Generator().manual_seed(seed)
    for matrix in _embedding_matrices(model):
        known = matrix[:old_vocab].float()
        if padding_rows is not None:  # deterministic, so a reloaded base matches the trained one exactly
            matrix[padding_rows] = known.mean(dim=0).to(matrix.dtype)
        for token, token_id in token_ids.items():
            if token in description_ids:
                row = known[description_ids[token]].mean(dim=0)
            elif init == "mean":
                row = known.mean(dim=0)
            else:
                row = torch.randn(known.shape[1], generator=generator) * known.std() + known.mean()
            matrix[token_id] = row.to(device=matrix.device, dtype=matrix.dtype)


def add_new_tokens(
    tokenizer: Any,
    model: PreTrainedModel,
    new_tokens: Sequence[str] = ("<sep>",),
    *,
    init: str | Mapping[str, str] = "mean",
    pad_to_multiple_of: int | None = 64,
    seed: int = 0,
) -> list[int]:
    """Add `new_tokens` as special tokens, resize the embeddings and initialise each new token's rows by its id.

    `init` is "mean" (mean of the existing rows), "random" (normal with the existing rows' mean and std) or a dict
    token -> description text (mean of the description's token rows). Both the input and the (untied) output row of
    each token are set; rows added only to pad the matrix to `pad_to_multiple_of` get the mean row, so the result
    is deterministic. Tokens that already have a row are left as they are. Returns the ids of all `new_tokens`.
    """
    new_tokens = list(new_tokens)
    old_rows = model.get_input_embeddings().weight.shape[0]
    trained_rows = min(len(tokenizer), old_rows)  # rows that hold trained embeddings, the reference for init
    vocab = tokenizer.get_vocab()
    fresh = [token for token in new_tokens if token not in vocab]
    if fresh:
        tokenizer.add_special_tokens({"extra_special_tokens": fresh}, replace_extra_special_tokens=False)
        if "<sep>" in fresh and tokenizer.sep_token is None:
            tokenizer.sep_token = "<sep>"  # the original set `sep_token`; keep that for code that reads it
    padding_rows = None
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
        padding_rows = slice(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in new_tokens}
    # A token is new to the model if the tokenizer just got it, or if it has no row yet (a saved tokenizer with <sep>
    # next to a base model without it): both get initialised, so a reloaded base matches the trained one.
    untrained = {token: i for token, i in token_ids.items() if token in fresh or i >= old_rows}
    if untrained or padding_rows is not None:
        _initialise_rows(model, tokenizer, untrained, trained_rows, init, seed, padding_rows)
    ids = [token_ids[token] for token in new_tokens]
    setattr(model.config, NEW_TOKEN_IDS_ATTRIBUTE, ids)
    return ids


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------------------


def model_load_error(path: str, error: Exception) -> OSError:
    """One clear line for a model that cannot be loaded, instead of the hub client's traceback."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OSError(
        f"could not load model {path!r}: expected a local folder with config.json and weights, or a hub model "
        f"name ({reason})"
    )


def setup_tokenizer_and_model(
    model_name_or_path: str | os.PathLike,
    *,
    quantization: str | None = "auto",
    attn_implementation: str = "auto",
    dtype: str | torch.dtype = "auto",
    new_tokens: Sequence[str] = ("<sep>",),
    new_token_init: str | Mapping[str, str] = "mean",
    trust_remote_code: bool = False,
    revision: str | None = None,
    pad_to_multiple_of: int | None = 64,
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, PreTrainedModel]:
    """Load a causal LM and its tokenizer ready for DELIA; returns (tokenizer, model).

    On CUDA, "auto" means an 8-bit base (bitsandbytes, as in the original), flash_attention_2 when `flash_attn` is
    installed (else sdpa) and bfloat16 (float16 without bf16 support). On CPU it means no quantization, sdpa and
    float32. `quantization="4bit"` loads NF4 for QLoRA. A missing pad token becomes the EOS token. `new_tokens` are
    added as special tokens (see `add_new_tokens`). `trust_remote_code` stays off unless you turn it on.
    """
    cuda = torch.cuda.is_available()
    quantization = _resolve_quantization(quantization, cuda)
    torch_dtype = _resolve_dtype(dtype, cuda)
    path = os.fspath(model_name_or_path)
    load_kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "attn_implementation": _resolve_attention(attn_implementation, cuda),
        "trust_remote_code": trust_remote_code,
        "revision": revision,
        **(model_kwargs or {}),
    }
    if quantization is not None:
        load_kwargs["quantization_config"] = quantization_config_for(quantization, torch_dtype)
        if cuda:
            from accelerate import PartialState  # one GPU per process under `accelerate launch`

            load_kwargs.setdefault("device_map", {"": PartialState().local_process_index})
        else:
            load_kwargs.setdefault("device_map", {"": "cpu"})
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    except OSError as error:
        raise model_load_error(path, error) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if new_tokens:
        ids = add_new_tokens(
            tokenizer, model, new_tokens, init=new_token_init, pad_to_multiple_of=pad_to_multiple_of, seed=seed
        )
        logger.info("New tokens %s have ids %s", list(new_tokens), ids)
    return tokenizer, model


# ----------------------------------------------------------------------------------------------------------------------
# LoRA with trainable new-token rows
# ----------------------------------------------------------------------------------------------------------------------


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


def expose_trainable_token_lm_head_bias(model: torch.nn.Module) -> None:
    """Give peft's TrainableTokensWrapper a `bias` attribute (the wrapped layer's).

    TRL's fused LM head reads `lm_head.weight` and `lm_head.bias`; the wrapper forwards `weight` (with the trained
    rows merged in) but not `bias`, so training crashed with AttributeError, tied or untied. The attribute is set
    without registering a parameter, so the state dict is unchanged.
    """
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and "bias" not in module.__dict__:
            object.__setattr__(module, "bias", getattr(module.original_module, "bias", None))


# ----------------------------------------------------------------------------------------------------------------------
# Training arguments
# ----------------------------------------------------------------------------------------------------------------------


def get_training_arguments(
    output_dir: str,
    num_train_epochs: float = 1,
    learning_rate: float = 2e-4,
    per_device_train_batch_size: int = 16,
    gradient_accumulation_steps: int = 4,
    max_seq_length: int | None = 1024,
    **overrides: Any,
) -> DSFTConfig:
    """A `DSFTConfig` with the original recipe; keyword `overrides` win.

    Logs every step, 25 warmup steps then a constant rate, weight decay 0.01, gradient checkpointing, half precision
    only on CUDA. `max_seq_length` maps to TRL's `max_length`. The original evaluated every step, which costs as much
    as training on small batches; here evaluation runs 10 times per run (`eval_steps=0.1`) and `save_steps=100`.
    Pass `eval_strategy="no"` when there is no eval set.
    """
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    settings: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": num_train_epochs,
        "learning_rate": learning_rate,
        "per_device_train_batch_size": per_device_train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "max_length": max_seq_length,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 0.1,
        "save_steps": 100,
        "warmup_steps": 25,
        "lr_scheduler_type": "constant_with_warmup",
        "weight_decay": 0.01,
        "gradient_checkpointing": True,
        "bf16": bf16,
        "fp16": cuda and not bf16,
    }
    settings.update(overrides)
    return DSFTConfig(**settings)
