"""Loading a causal LM for DELIA: dtype, quantization and attention choice, the one model loader, new tokens.

On a CUDA GPU the defaults follow the original recipe (8-bit base through bitsandbytes, flash-attention when it is
installed, half precision); on CPU they stay sane (no quantization unless asked, float32). New tokens such as `<sep>`
are added as special tokens and their input and output embedding rows initialised by id; with LoRA, only those rows
of the embedding matrices train (peft's `trainable_token_indices`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from .io import looks_like_local_path, read_json_or_none
from .models import COMPLETE_MARKER, corruption, resolve_model
from .run_files import ADAPTER_CONFIG_FILE, MODEL_CONFIG_FILE

logger = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "4bit", "8bit", "none", None)
NEW_TOKEN_IDS_ATTRIBUTE = "delia_new_token_ids"  # on model.config: the ids `setup_tokenizer_and_model` added


# ----------------------------------------------------------------------------------------------------------------------
# Resolving "auto"
# ----------------------------------------------------------------------------------------------------------------------


def resolve_quantization(quantization: str | None, cuda: bool) -> str | None:
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of 'auto', '4bit', '8bit' or None; got {quantization!r}")
    if quantization == "auto":
        return "8bit" if cuda else None
    return None if quantization == "none" else quantization


def resolve_dtype(dtype: str | torch.dtype, cuda: bool) -> torch.dtype:
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


def resolve_attention(attn_implementation: str, cuda: bool) -> str:
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
    weight = model.get_input_embeddings().weight
    old_rows = getattr(weight, "ds_shape", weight.shape)[0]  # DeepSpeed ZeRO-3 leaves each process an empty shard
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


def load_tokenizer_and_model(
    model_name_or_path: str | os.PathLike,
    *,
    quantization: str | None = None,
    attn_implementation: str = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    device: str | torch.device | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, PreTrainedModel]:
    """The one model loader (training setup and the generation backends share it); returns (tokenizer, model).

    `model_name_or_path` is a folder, a hub name, or a short name delia knows (`delia.models.MODELS`, such as
    "smollm2-135m-instruct"), which resolves to the hub or, offline, to a local converted copy.

    `quantization` is "auto" (8-bit on CUDA, none on CPU), "4bit", "8bit" or None. `dtype` "auto" is bf16 (fp16
    without bf16 support) on a GPU and float32 on CPU. `device` moves an unquantized model there ("cuda:1" under a
    launcher counts as CUDA); a quantized one is placed by bitsandbytes on this process's GPU. A missing pad token
    becomes the EOS token. Loading errors become one `OSError` line naming the model.
    """
    path = resolve_model(model_name_or_path)  # a known short name such as "smollm2-135m-instruct": hub or local copy
    check_model_source(os.fspath(path))
    device = torch.device(device) if device is not None else None
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    quantization = resolve_quantization(quantization, cuda)
    torch_dtype = resolve_dtype(dtype, cuda)
    load_kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "attn_implementation": resolve_attention(attn_implementation, cuda),
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
    except (OSError, ValueError) as error:  # missing or broken files, a tokenizer it cannot build
        raise model_load_error(path, error) from None
    if device is not None and quantization is None:
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


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
    tokenizer, model = load_tokenizer_and_model(
        model_name_or_path,
        quantization=quantization,
        attn_implementation=attn_implementation,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        revision=revision,
        model_kwargs=model_kwargs,
    )
    if new_tokens:
        ids = add_new_tokens(
            tokenizer, model, new_tokens, init=new_token_init, pad_to_multiple_of=pad_to_multiple_of, seed=seed
        )
        logger.info("New tokens %s have ids %s", list(new_tokens), ids)
    return tokenizer, model


# ----------------------------------------------------------------------------------------------------------------------
# For inference: a model, or a LoRA adapter on its base (eval, probe, sweep)
# ----------------------------------------------------------------------------------------------------------------------


def _adapter_base(path: str, base_model: str | None) -> str:
    """The base an adapter folder was trained on: `base_model`, else the one its adapter_config.json names."""
    config = os.path.join(path, ADAPTER_CONFIG_FILE)
    record = read_json_or_none(config)
    if not isinstance(record, dict):
        raise OSError(f"{config}: not a readable JSON adapter config")
    base = base_model or record.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base model (base_model_name_or_path); pass the base model")
    return base


def check_model_source(path: str, adapters: bool = False) -> None:
    """One line for a model name that cannot be a model: a missing local folder, or one without model files."""
    if not os.path.exists(path):
        if looks_like_local_path(path):
            raise FileNotFoundError(
                f"could not load model {path!r}: no such folder; expected a model folder (or a hub or short model name)"
            )
        return
    wanted = (MODEL_CONFIG_FILE, ADAPTER_CONFIG_FILE) if adapters else (MODEL_CONFIG_FILE,)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in wanted):
        adapter = os.path.isfile(os.path.join(path, ADAPTER_CONFIG_FILE))
        raise OSError(
            f"could not load model {path!r}: it holds a LoRA adapter, not a model; evaluate it with `delia eval`, or "
            "load its base model"
            if adapter
            else f"could not load model {path!r}: it holds neither a model ({MODEL_CONFIG_FILE} and weights) nor a LoRA adapter "
            f"({ADAPTER_CONFIG_FILE}); expected the folder `delia train` or `save_pretrained` wrote"
        )
    if not os.path.isdir(path):
        raise OSError(f"could not load model {path!r}: a file; expected a model folder (or a hub or short model name)")
    if os.path.isfile(os.path.join(path, COMPLETE_MARKER)):  # a model delia converted: its files as converted?
        problem = corruption(path)
        if problem is not None:
            raise OSError(
                f"could not load model {path!r}: corrupt, {problem}; delete the folder and run `delia fetch-model` again"
            )


def _adapter_tokens(
    path: str, base_tokenizer: Any, model: PreTrainedModel, trust_remote_code: bool
) -> tuple[Any, list]:
    """The adapter folder's tokenizer, and the tokens it added to the base, given their rows on `model` as in
    training; the ids must match the adapter's, or it was trained on another base."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = base_tokenizer  # an adapter saved without its tokenizer
    base_vocab = base_tokenizer.get_vocab()
    added = sorted(tokenizer.get_added_vocab().items(), key=lambda item: item[1])
    new_tokens = [token for token, _ in added if token not in base_vocab]
    if new_tokens:
        ids = add_new_tokens(base_tokenizer, model, new_tokens)
        expected = tokenizer.convert_tokens_to_ids(new_tokens)
        if ids != expected:
            raise ValueError(
                f"{path}: the adapter's tokenizer has {new_tokens} at ids {expected}, but adding them to its base "
                f"model gives ids {ids}; pass the base model it was trained on"
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, new_tokens


def load_for_inference(
    target: str | os.PathLike,
    *,
    base_model: str | None = None,
    quantization: str | None = None,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    new_tokens: Sequence[str] = (),
) -> tuple[Any, Any, dict[str, Any]]:
    """(tokenizer, model in eval mode, description) for a model folder / hub name, or a LoRA adapter folder on its base.

    The one loader of `delia eval`, `delia probe` and the sweep. An adapter folder (adapter_config.json, as
    `delia train` writes with LoRA) is loaded on `base_model` (default: the base its config names) with the folder's
    own tokenizer; the tokens it added to the base (`<sep>`) get their rows as in training, checked to land on the
    same ids, then the adapter is applied. A plain model lacking one of `new_tokens` gets it added as `delia train`
    adds it before training, so a base model is measured as training started from it. Unquantized models go to the
    GPU when there is one.
    """
    path = os.fspath(target)
    check_model_source(path, adapters=True)
    quantization = resolve_quantization(quantization, torch.cuda.is_available())  # "none" and "auto" on a CPU: None
    options = {
        "quantization": quantization,
        "dtype": dtype,
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
        "device": None if quantization else ("cuda" if torch.cuda.is_available() else "cpu"),
    }
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG_FILE)):
        tokenizer, model = load_tokenizer_and_model(path, **options)
        missing = [token for token in new_tokens if token not in tokenizer.get_vocab()]
        if missing:
            add_new_tokens(tokenizer, model, missing)
        return tokenizer, model.eval(), {"kind": "model", "path": path}
    base = _adapter_base(path, base_model)
    base_tokenizer, model = load_tokenizer_and_model(base, **options)
    tokenizer, added = _adapter_tokens(path, base_tokenizer, model, trust_remote_code)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, path)
    return tokenizer, model.eval(), {"kind": "adapter", "path": path, "base_model": base, "new_tokens": added}
