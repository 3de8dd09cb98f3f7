"""In-process generation with transformers: batched `generate`, left padding, only the new tokens decoded.

The caller decides the order (build_cache sorts queries by prompt length, so each batch pads little); this backend
splits what it is given into batches of `batch_size`, in that order, under `torch.inference_mode`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..modeling import load_tokenizer_and_model
from ..runtime import default_device
from .base import Conversation, Generation, SamplingConfig
from .prompts import PromptRenderer, PromptRenderError


def load_model_and_tokenizer(
    model: str | os.PathLike, *, dtype: str = "auto", trust_remote_code: bool = False, device: str | None = None
) -> tuple[Any, Any]:
    """A causal LM for generation, in eval mode on `device`, through the one loader in `delia.modeling`."""
    tokenizer, loaded = load_tokenizer_and_model(
        model, dtype=dtype, trust_remote_code=trust_remote_code, device=device or default_device()
    )
    return loaded.eval(), tokenizer


class TransformersBackend:
    """Batched sampling with `model.generate`; decodes only the tokens after each prompt."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.renderer = PromptRenderer(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = set(_as_list(model.generation_config.eos_token_id)) | {tokenizer.eos_token_id}

    def prompt_ids(self, conversations: list[Conversation]) -> list[list[int]]:
        """Token ids of each rendered prompt (the chat template adds any BOS itself)."""
        prompts = [self.renderer.render(messages, index) for index, messages in enumerate(conversations)]
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def generate(self, conversations: list[Conversation], sampling: SamplingConfig) -> list[Generation]:
        """One reply per conversation, in order; the model is in eval mode meanwhile (no dropout), then as it was."""
        ids = self.prompt_ids(conversations)
        replies: list[Generation] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(ids), self.batch_size):
                replies += self._generate_batch(ids[start : start + self.batch_size], sampling, start)
        finally:
            self.model.train(was_training)
        return replies

    def _generate_batch(self, batch: list[list[int]], sampling: SamplingConfig, offset: int) -> list[Generation]:
        width = max(map(len, batch))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in batch], device=self.model.device)
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in batch])
        options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": pad}
        if sampling.min_new_tokens:
            options["min_new_tokens"] = sampling.min_new_tokens
        if sampling.temperature > 0:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            options.update(do_sample=False, temperature=None, top_p=None)
        device = self.model.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG is untouched
            torch.manual_seed(sampling.seed + offset)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask.to(device), **options)
        replies = []
        for row in output[:, width:].tolist():
            stop = next((i for i, token in enumerate(row) if token in self.eos_ids), None)
            new_tokens = row if stop is None else row[: stop + 1]
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
            replies.append(Generation(text, len(new_tokens), "length" if stop is None else "stop"))
        return replies

    def close(self) -> None:
        pass


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


__all__ = ["TransformersBackend", "load_model_and_tokenizer", "PromptRenderError"]
