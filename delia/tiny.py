"""A tiny local Llama-architecture model and BPE tokenizer, built offline in about a second.

Used by the tests and the demo: no download, a few hundred thousand parameters, and two hand-written chat
templates (a Llama-2-style one without `{% generation %}` markers and a ChatML one with them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Text written for this project, used only to give the tiny BPE tokenizer sensible merges.
TRAINING_TEXT = """\
The quick reply follows the format that the user asked for, and nothing else.
Write a short poem about the sea. The waves come in, the waves go out, the gulls cry over the harbour.
Explain why the sky looks blue: sunlight scatters off the air, and blue light scatters the most.
Classify the sentiment of this review as positive or negative. The food was cold and the service slow.
def add(a, b):
    return a + b
Translate the sentence into French. I would like a cup of coffee, please.
List three fruits that are red: strawberry, cherry and raspberry.
What is 12 times 7? The answer is 84.
Summarise the paragraph in one sentence. Rivers carry water from the hills to the sea.
Give me advice on learning to cook: start with simple dishes, taste as you go, and keep your knives sharp.
Extract every date from the text: the meeting moved from 3 May to 10 June.
Does the response contain a hallucination? {'thought': 'The answer matches the question.', 'hallucination': 'no'}
Follow the <sep> format. Check the reply for made-up facts. {'thought': 'It invents a date.', 'hallucination': 'yes'}
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# Llama-2-style: `[INST] ... [/INST]`, an optional `<<SYS>>` block, no generation markers.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_text = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system_text = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system_text %}{{ '<<SYS>>\\n' + system_text + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# ChatML with `{% generation %}` markers around the assistant replies.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHAT_TEMPLATES = {"llama2": LLAMA2_TEMPLATE, "chatml": CHATML_TEMPLATE}


def build_tiny_tokenizer(
    chat_template: Literal["llama2", "chatml"] = "llama2", vocab_size: int = 384, texts: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (default `TRAINING_TEXT`); no pad token, like Llama-2's."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_TEXT.splitlines() if texts is None else texts, trainer=trainer)
    eos = "</s>" if chat_template == "llama2" else "<|im_end|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token=eos,
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATES[chat_template],
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    tie_word_embeddings: bool = True,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """A randomly initialised Llama model sized for `tokenizer` (about 100-200K parameters)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(
    folder: str | os.PathLike,
    chat_template: Literal["llama2", "chatml"] = "llama2",
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **model_options,
) -> Path:
    """Save a tiny model and its tokenizer (built for `chat_template` unless given) to `folder`, as from the hub."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer(chat_template)
    build_tiny_model(tokenizer, **model_options).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
