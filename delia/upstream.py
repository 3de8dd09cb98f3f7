"""Every place delia touches private TRL / peft / transformers code, in one module, each with the version it targets.

Upstream may rename or remove any of these without notice; `tests/test_upstream.py` checks each against the installed
versions, so a change upstream fails one named test instead of a training run. Each entry says what it relies on,
why delia needs it, and how it degrades when the private name is gone.

| touchpoint | upstream | targets |
| --- | --- | --- |
| `score_label_positions_only` | `trl.trainer.utils._use_triton` | trl 1.10-1.16 |
| `fused_head_output`, `forward_outputs` | the `log_probs` / `label_mask` of TRL's fused LM head output | trl 1.10-1.16 |
| `expose_trainable_token_lm_head_bias` | `peft.utils.other.TrainableTokensWrapper` (no `bias`) | peft 0.15-0.21 |
| `add_signature_column` | `Trainer._set_signature_columns_if_needed` / `_signature_columns` | transformers 5.x |
| `quiet_upstream_noise` | the text of two upstream warnings (`UPSTREAM_NOISE`) | transformers 5.x, peft 0.21 |
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def score_label_positions_only() -> Iterator[None]:
    """In TRL's fused LM head, score only the positions that have a label on CPU, as TRL does on GPUs.

    Off GPUs TRL projects every position through the LM head (so that compiled tile shapes stay fixed on devices such
    as Neuron) and zeroes the unlabelled ones afterwards. Eager CPU code has no such need, and DELIA's loss falls on
    the final reply alone, a fraction of each row, so scoring just those positions gives the same log-probabilities
    for a fraction of the LM head's work. A TRL without the private switch (`_use_triton`) is left as it is.
    """
    module = sys.modules.get("trl.trainer.utils")
    original = getattr(module, "_use_triton", None)
    if original is None:
        yield
        return
    module._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        module._use_triton = original


def fused_head_output(outputs: list[Any]) -> Any | None:
    """The first forward output carrying the fused LM head's per-token `log_probs` and `label_mask`, or None.

    TRL's SFTTrainer (with its default fused loss) returns log p(label) per position instead of logits; delia reads
    them for the per-source loss and the tracked-token loss instead of computing them again. None when TRL did not
    use the fused head (then per-source sums are skipped, and tracked tokens are scored from the hidden states).
    """
    for output in outputs:
        if getattr(output, "log_probs", None) is not None and getattr(output, "label_mask", None) is not None:
            return output
    return None


@contextmanager
def forward_outputs(module: torch.nn.Module) -> Iterator[list[Any]]:
    """Collect the outputs of `module`'s forward calls meanwhile (a forward hook, removed afterwards)."""
    seen: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _args, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()


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


def add_signature_column(trainer: Any, column: str) -> None:
    """Keep `column` among the columns Trainer passes to the collator (it drops those `forward` does not take).

    Call it from an override of `Trainer._set_signature_columns_if_needed`, after the parent's, which sets the private
    `_signature_columns` list.
    """
    columns = trainer._signature_columns
    if column not in columns:
        trainer._signature_columns = [*columns, column]


#: Upstream warnings that tell a delia user nothing they can act on: (start of the message, category).
UPSTREAM_NOISE = (
    # transformers 5 deprecated the property that peft 0.21 and TRL 1.16 still read while wrapping a model
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
    # peft, on saving a LoRA run: delia adds and trains <sep> on purpose, so its embedding is saved on purpose
    ("Setting `save_embedding_layers` to `True`", UserWarning),
)


@contextmanager
def quiet_upstream_noise() -> Iterator[None]:
    """Hide `UPSTREAM_NOISE` meanwhile, matched by message and category (and the `datasets` progress bar of each small
    map); every other warning, and these outside the block, are left as they are. The demos run inside it; a library
    user sees everything."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per map over 48 rows: twenty lines that say nothing
    with warnings.catch_warnings():
        for start, category in UPSTREAM_NOISE:
            warnings.filterwarnings("ignore", message=re.escape(start), category=category)
        try:
            yield
        finally:
            if bars:
                datasets.enable_progress_bars()
