"""In-process generation with vLLM (`pip install vllm`, or `pip install -e ".[vllm]"` from a clone), imported only when this backend is chosen.

A thin adapter: vLLM renders nothing for us, so prompts come from the same chat-template renderer as the transformers
backend, and vLLM's own batching and scheduling do the rest. vLLM cannot be installed on CPU-only machines, so this
adapter is not exercised by the test suite; keep it small.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from .base import Backend, Conversation, Generation, Prompt, SamplingConfig, request_seed
from .prompts import PromptRenderer


class VLLMBackend(Backend):
    """`vllm.LLM` in this process; `tensor_parallel_size` and any other engine argument are passed through."""

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        batch_size: int = 32,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        seed: int = 0,
        **engine_kwargs: Any,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError("backend='vllm' needs vLLM: pip install vllm (CUDA machines only)") from None
        from ..models import resolve_model

        self.batch_size = batch_size
        self.llm = LLM(
            model=resolve_model(model),  # a short name such as "smollm2-135m-instruct" too
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            seed=seed,  # the engine's own seed; every request below also gets its own
            **engine_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.renderer = PromptRenderer(self.tokenizer)

    def prepare(self, conversations: Sequence[Conversation], ids: Sequence[str]) -> list[Prompt]:
        """Render each conversation once with the chat template; its length in characters is the sort key."""
        prompts = []
        for index, (request_id, messages) in enumerate(zip(ids, conversations, strict=True)):
            text = self.renderer.render(messages, index)
            prompts.append(Prompt(request_id, messages, len(text), text=text))
        return prompts

    def prepare_text(self, texts: Sequence[str], ids: Sequence[str]) -> list[Prompt]:
        """Each raw text as it is, for vLLM to tokenize (a raw prompt); its length in characters is the sort key."""
        return [Prompt(request_id, [], len(text), text=text) for request_id, text in zip(ids, texts, strict=True)]

    def stream(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> Iterator[Generation]:
        """Replies in order, `batch_size` prompts per engine call (so the caller can write each batch as it ends)."""
        from vllm import SamplingParams

        special = set(self.tokenizer.all_special_tokens)  # a special-token end of turn never shows in the text
        stop_ids = [self.tokenizer.convert_tokens_to_ids(text) for text in sampling.stop if text in special]
        stop = [text for text in sampling.stop if text not in special]
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            params = [  # one seed per request: a shared seed would correlate the samples
                SamplingParams(
                    max_tokens=sampling.max_new_tokens,
                    min_tokens=sampling.min_new_tokens or 0,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    seed=request_seed(sampling.seed, prompt.id),
                    stop=stop or None,
                    stop_token_ids=stop_ids or None,
                )
                for prompt in batch
            ]
            outputs = self.llm.generate([prompt.text for prompt in batch], params, use_tqdm=False)
            for out in outputs:
                reply = out.outputs[0]
                yield Generation(reply.text, len(reply.token_ids), reply.finish_reason or "stop")

    def close(self) -> None:
        """Drop the engine, so its GPU memory can be freed."""
        del self.llm
