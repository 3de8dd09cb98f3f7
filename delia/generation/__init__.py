"""One generation engine for self-sampling (and, later, evaluation): prompts, sampling settings, backends.

Backends share one interface (`base.Backend`): `transformers_backend` (in-process, batched), `vllm_backend`
(in-process, optional), `openai_backend` (any OpenAI-compatible server over HTTP).
"""

from .base import Backend, Generation, Prompt, SamplingConfig, request_seed
from .prompts import DEFAULT_SYSTEM_PROMPT, TEMPLATES, PromptRenderer, PromptRenderError, build_conversation

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "TEMPLATES",
    "Backend",
    "Generation",
    "Prompt",
    "PromptRenderError",
    "PromptRenderer",
    "SamplingConfig",
    "build_conversation",
    "request_seed",
]
