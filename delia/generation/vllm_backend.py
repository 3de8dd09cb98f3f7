"""In-process generation with vLLM (`pip install delia[vllm]`), imported only when this backend is chosen.

A thin adapter: vLLM renders nothing for us, so prompts come from the same chat-template renderer as the transformers
backend, and vLLM's own batching and scheduling do the rest. vLLM cannot be installed on CPU-only machines, so this
adapter is not exercised by the test suite; keep it small.
"""

from __future__ import annotations

import os
from typing import Any

from .base import Conversation, Generation, SamplingConfig
from .prompts import PromptRenderer


class VLLMBackend:
    """`vllm.LLM` in this process; `tensor_parallel_size` is passed through."""

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        seed: int = 0,
        **engine_kwargs: Any,
    ):
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError("backend='vllm' needs vLLM: pip install 'delia[vllm]' (CUDA machines only)") from None
        self.llm = LLM(
            model=os.fspath(model),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            seed=seed,
            **engine_kwargs,
        )
        self.renderer = PromptRenderer(self.llm.get_tokenizer())

    def generate(self, conversations: list[Conversation], sampling: SamplingConfig) -> list[Generation]:
        from vllm import SamplingParams

        prompts = [self.renderer.render(messages, index) for index, messages in enumerate(conversations)]
        params = [  # one seed per request (as the openai backend does): a shared seed would correlate the samples
            SamplingParams(
                max_tokens=sampling.max_new_tokens,
                min_tokens=sampling.min_new_tokens or 0,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed + index,
            )
            for index in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            Generation(out.outputs[0].text, len(out.outputs[0].token_ids), out.outputs[0].finish_reason or "stop")
            for out in outputs
        ]

    def close(self) -> None:
        del self.llm
