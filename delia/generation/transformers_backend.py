"""In-process generation with transformers: batched `generate`, left padding, only the new tokens decoded.

Each prompt is rendered and tokenized once (`prepare`); the caller decides the order (build_cache sorts the prompts by
their token length, so each batch pads little), and `stream` splits what it is given into batches of `batch_size`, in
that order, under `torch.inference_mode`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..cpu import OtherLoad, threads_while
from .base import Backend, Conversation, Generation, Prompt, SamplingConfig, request_seed
from .prompts import PromptRenderer, PromptRenderError


class TransformersBackend(Backend):
    """Batched sampling with `model.generate`; decodes only the tokens after each prompt."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, cpu_threads: int | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.cpu_threads = cpu_threads  # delia's thread policy on a CPU (`delia.cpu.thread_count`), per batch
        self.renderer = PromptRenderer(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = set(_as_list(model.generation_config.eos_token_id)) | {tokenizer.eos_token_id}

    def prepare(self, conversations: Sequence[Conversation], ids: Sequence[str]) -> list[Prompt]:
        """Render and tokenize each conversation, once: the ids are both the sort key and what `stream` generates from."""
        texts = [self.renderer.render(messages, index) for index, messages in enumerate(conversations)]
        token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # BOS: the template's
        return [
            Prompt(request_id, messages, len(tokens), token_ids=tokens)
            for request_id, messages, tokens in zip(ids, conversations, token_ids, strict=True)
        ]

    def prepare_text(self, texts: Sequence[str], ids: Sequence[str]) -> list[Prompt]:
        """Tokenize each raw text as it is (no template, no BOS added: a rendered prefix carries its own)."""
        token_ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        return [
            Prompt(request_id, [], len(tokens), token_ids=tokens, text=text)
            for request_id, text, tokens in zip(ids, texts, token_ids, strict=True)
        ]

    def stream(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> Iterator[Generation]:
        """Replies in order, `batch_size` prompts per `model.generate` call, each batch seeded by its first request.

        On a CPU each batch runs with the threads the cores left free by other programs allow, looked up again
        before every batch: a decode is hundreds of small parallel ops, each stalled by a thread that lost its core.
        """
        other_load = OtherLoad()
        for start in range(0, len(prompts), self.batch_size):
            with threads_while(self.cpu_threads, self.model.device, other_load):
                batch = self._generate_batch(prompts[start : start + self.batch_size], sampling)
            yield from batch

    @torch.inference_mode()
    def _generate_batch(self, batch: Sequence[Prompt], sampling: SamplingConfig) -> list[Generation]:
        """One left-padded `model.generate` call; the model is in eval mode meanwhile (no dropout), then as it was."""
        rows = [prompt.token_ids for prompt in batch]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        device = self.model.device
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
        options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": pad}
        if sampling.min_new_tokens:
            options["min_new_tokens"] = sampling.min_new_tokens
        ends, text_stops = self._stops(sampling.stop)
        if ends != self.eos_ids:  # an end of turn that is one special token stops the reply like EOS
            options["eos_token_id"] = sorted(ends)
        if text_stops:
            options.update(stop_strings=list(text_stops), tokenizer=self.tokenizer)
        if sampling.temperature > 0:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            options.update(do_sample=False, temperature=None, top_p=None)
        was_training = self.model.training
        self.model.eval()
        # One RNG per batch (generate samples every row from it), seeded by the batch's first request; the caller's
        # RNG is left untouched
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(request_seed(sampling.seed, batch[0].id))
                output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        finally:
            self.model.train(was_training)
        return [self._reply(row, ends, text_stops) for row in output[:, width:].tolist()]

    def _stops(self, stop: Sequence[str]) -> tuple[set[int], list[str]]:
        """The token ids that end a reply (EOS, and each stop text that is one special token), and the other texts."""
        ends, texts = set(self.eos_ids), []
        special = set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab())
        for text in stop:
            if text in special:
                ends.add(self.tokenizer.convert_tokens_to_ids(text))
            else:
                texts.append(text)
        return ends, texts

    def _reply(self, row: list[int], ends: set[int], text_stops: Sequence[str]) -> Generation:
        """The reply in one row of new tokens: up to the first end token, cut before the first stop text."""
        stop = next((i for i, token in enumerate(row) if token in ends), None)
        new_tokens = row if stop is None else row[: stop + 1]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        cuts = [found for found in (text.find(stop_text) for stop_text in text_stops) if found >= 0]
        if cuts:  # generation stopped at a stop text: what follows is padding
            text = text[: min(cuts)]
            pad = self.tokenizer.pad_token_id
            while new_tokens and new_tokens[-1] == pad:
                new_tokens = new_tokens[:-1]
        return Generation(text, len(new_tokens), "length" if stop is None and not cuts else "stop")

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller (or to build_cache, which drops it)."""


def _as_list(value: Any) -> list[int]:
    """An eos_token_id setting (None, one id or several) as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


__all__ = ["TransformersBackend", "PromptRenderError"]
