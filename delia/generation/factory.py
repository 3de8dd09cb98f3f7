"""Which generation backend answers the prompts, and how it is set up: `BackendOptions` and `make_backend`.

The one place that knows every backend: transformers in-process (the default on a CPU or without vLLM), vLLM
in-process (CUDA, when installed), or any OpenAI-compatible server over HTTP (when base URLs are given). A new backend
implements `delia.generation.base.Backend` and gets a branch in `make_backend` and a name in `BACKENDS`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..runtime import process_state
from .base import Backend

BACKENDS = ("auto", "transformers", "vllm", "openai")


@dataclass(frozen=True)
class BackendOptions:
    """Which backend answers the queries and how it is set up: all that `make_backend` needs besides the model."""

    name: str = "auto"  # "auto": openai when base_urls are given, vLLM on CUDA if installed, else transformers
    base_urls: str | list[str] | None = None  # OpenAI-compatible servers (openai)
    concurrency: int = 8  # requests in flight (openai)
    timeout: float = 30.0  # seconds an attempt may wait without a byte from the server (openai)
    max_retries: int = 3  # retries after the first attempt (openai): a silent server errors in about 2 minutes
    batch_size: int = 32  # prompts per generate call (transformers, vLLM); replies per durable write (all)
    tensor_parallel_size: int = 1  # GPUs per model (vLLM)
    dtype: str = "auto"  # when a model is loaded by name (transformers, vLLM)
    cpu_threads: int | None = None  # torch threads on a CPU (transformers): None, the free cores; 0, torch's own
    trust_remote_code: bool = False  # likewise
    extra: dict[str, Any] = field(default_factory=dict)  # more constructor arguments, e.g. {"max_retries": 2}

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.name!r}")
        for setting in ("concurrency", "batch_size", "tensor_parallel_size"):
            value = getattr(self, setting)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{setting} must be a positive integer, got {value!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not self.timeout > 0:
            raise ValueError(f"timeout must be a number of seconds above 0, got {self.timeout!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be a whole number >= 0, got {self.max_retries!r}")

    @classmethod
    def from_keywords(cls, backend: str | BackendOptions, keywords: dict[str, Any]) -> BackendOptions:
        """`backend` (a name or BackendOptions) with build_cache's backend keywords on top: a keyword given wins."""
        settings = dict(keywords)
        if "backend_options" in settings:  # the keyword's name for `extra`
            settings["extra"] = dict(settings.pop("backend_options") or {})
        unknown = sorted(set(settings) - {setting.name for setting in fields(cls) if setting.name != "name"})
        if unknown:
            raise TypeError(f"build_cache() got an unexpected keyword argument {unknown[0]!r}")
        base = backend if isinstance(backend, BackendOptions) else cls(name=backend)
        return replace(base, **settings)

    def resolve(self, model: Any) -> str:
        """The backend that will run: `name`, or for "auto" the one picked for `model` on this machine."""
        if self.name != "auto":
            return self.name
        if self.base_urls:
            return "openai"
        import torch  # here: `BuildCacheArguments` (this module's options) is read before torch is needed

        if (
            isinstance(model, (str, os.PathLike))  # a loaded model stays in-process with transformers
            and torch.cuda.is_available()
            and importlib.util.find_spec("vllm") is not None
        ):
            return "vllm"
        return "transformers"


def make_backend(options: BackendOptions, model: Any, *, tokenizer: Any = None, seed: int = 0) -> Backend:
    """The backend `options` ask for, serving `model` (vLLM also gets `seed` as its engine's seed)."""
    backend = options.resolve(model)
    if backend == "openai":
        from .openai_backend import OpenAIBackend

        if not options.base_urls:
            raise ValueError("backend='openai' needs base_urls (CLI: --base-url), e.g. http://127.0.0.1:8000/v1")
        settings = {"timeout": options.timeout, "max_retries": options.max_retries, **options.extra}
        return OpenAIBackend(str(model), options.base_urls, concurrency=options.concurrency, **settings)
    if backend == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(
            model,
            batch_size=options.batch_size,
            tensor_parallel_size=options.tensor_parallel_size,
            dtype=options.dtype,
            trust_remote_code=options.trust_remote_code,
            seed=seed,
            **options.extra,
        )
    from ..modeling import load_tokenizer_and_model
    from .transformers_backend import TransformersBackend

    if isinstance(model, (str, os.PathLike)):  # the one model loader, unquantized, on this process's device
        tokenizer, model = load_tokenizer_and_model(
            model,
            dtype=options.dtype,
            trust_remote_code=options.trust_remote_code,
            device=str(process_state().device),
        )
    elif tokenizer is None:
        raise ValueError("pass tokenizer= together with an already loaded model")
    return TransformersBackend(model, tokenizer, batch_size=options.batch_size, cpu_threads=options.cpu_threads)
