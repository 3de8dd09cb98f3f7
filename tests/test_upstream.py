"""Each touchpoint on private upstream code (`delia.upstream`) against the installed TRL / peft / transformers.

If one of these fails after an upgrade, upstream renamed or changed what delia relies on: read the entry in
`delia/upstream.py` (what it relies on, why, how it degrades) before changing anything else.
"""

from __future__ import annotations

import sys

import torch
from peft import LoraConfig, get_peft_model

from delia import upstream
from delia.tiny import build_tiny_model, build_tiny_tokenizer


def test_trl_still_has_the_switch_that_label_positions_only_flips():
    import trl.trainer.utils  # noqa: F401  (the module whose private switch is flipped)

    module = sys.modules["trl.trainer.utils"]
    original = module._use_triton
    assert original(torch.device("cpu")) is False  # upstream scores every position on a CPU
    with upstream.score_label_positions_only():
        assert module._use_triton(torch.device("cpu")) is True
    assert module._use_triton is original  # restored


def test_the_fused_head_output_is_found_among_forward_outputs():
    class Fused:
        log_probs, label_mask = torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)

    class Plain:
        logits = torch.zeros(1, 3, 5)

    assert upstream.fused_head_output([Plain(), Fused()]).__class__ is Fused
    assert upstream.fused_head_output([Plain()]) is None
    layer = torch.nn.Linear(2, 2)
    with upstream.forward_outputs(layer) as seen:
        layer(torch.zeros(1, 2))
    layer(torch.zeros(1, 2))  # the hook is gone
    assert len(seen) == 1 and not layer._forward_hooks


def test_peft_trainable_tokens_wrapper_gets_the_bias_the_fused_head_reads():
    from peft.utils.other import TrainableTokensWrapper

    tokenizer = build_tiny_tokenizer("chatml")
    model = build_tiny_model(tokenizer, tie_word_embeddings=False)
    config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1], "lm_head": [1]})
    peft_model = get_peft_model(model, config)
    wrappers = [m for m in peft_model.modules() if isinstance(m, TrainableTokensWrapper)]
    assert wrappers
    upstream.expose_trainable_token_lm_head_bias(peft_model)
    assert all(hasattr(wrapper, "bias") for wrapper in wrappers)
    assert all("bias" not in name for name, _ in peft_model.named_parameters() if "trainable_tokens" in name)


def test_trainer_keeps_a_signature_column_list_to_extend():
    from transformers import Trainer

    assert hasattr(Trainer, "_set_signature_columns_if_needed")

    class Holder:
        _signature_columns = ["input_ids", "labels"]

    holder = Holder()
    upstream.add_signature_column(holder, "source")
    upstream.add_signature_column(holder, "source")
    assert holder._signature_columns == ["input_ids", "labels", "source"]


def test_the_demos_hide_exactly_the_upstream_noise_they_name():
    """Each filtered text still occurs upstream (else the filter is dead); inside the block those are hidden, and
    every other warning, or these outside it, are not."""
    import inspect
    import warnings

    import datasets
    import peft.utils.save_and_load
    import transformers.modeling_utils

    sources = {
        "`is_gradient_checkpointing` is deprecated": transformers.modeling_utils,
        "Setting `save_embedding_layers` to `True`": peft.utils.save_and_load,
    }
    assert [text for text, _ in upstream.UPSTREAM_NOISE] == list(sources)
    for text, module in sources.items():
        assert text in inspect.getsource(module), (text, module.__name__)
    model = build_tiny_model(build_tiny_tokenizer("llama2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with upstream.quiet_upstream_noise():
            model.is_gradient_checkpointing  # noqa: B018  (the property warns)
            resized = "Setting `save_embedding_layers` to `True` as the embedding layer has been resized"
            warnings.warn(resized, UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
            bars_inside = datasets.is_progress_bar_enabled()
        inside = [str(warning.message) for warning in caught]
        model.is_gradient_checkpointing  # noqa: B018
    assert inside == ["something else"]
    assert not bars_inside and datasets.is_progress_bar_enabled()
    assert len(caught) == 2 and issubclass(caught[1].category, FutureWarning)  # outside the block: shown again
