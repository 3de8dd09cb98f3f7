"""`BuildCacheArguments`: every option of `build_cache` / `delia build-cache`, as one dataclass, and its parser.

`delia build-cache` reads it with `argument_parser()` (so `--max_new_tokens` and `--max-new-tokens` both work),
`build_cache()` builds it from its keywords, and the cache's meta file records it. Nothing here imports torch: the
`delia` command answers `--help` and a mistyped option from this module before `delia.build_cache` is imported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .generation.base import SamplingConfig
from .generation.factory import BACKENDS, BackendOptions
from .generation.prompts import DEFAULT_SYSTEM_PROMPT, TEMPLATES

DESCRIPTION = (
    "build_cache: the base model answers a broad set of general queries itself; its answers are DELIA's diverse data."
)


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise a ValueError naming the option unless `value` is a positive integer (or None where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class BuildCacheArguments:
    """How the diverse cache is self-sampled (the model, the queries and the output are named apart).

    > Prompts: which queries (a file, or `generate_queries` the model writes itself), and how each is put to the model
    > Sampling: how each reply is drawn (each request seeded from `seed` and its query's id)
    > The run: resuming, limits, what is kept
    > Backend: which engine answers, and its settings
    """

    # Prompts
    generate_queries: int | None = field(
        default=None,
        metadata={
            "help": "no query file: the model writes N queries itself (Magpie) into <output>.queries.jsonl, then "
            "answers them with the plain template"
        },
    )
    query_max_new_tokens: int = field(default=128, metadata={"help": "tokens per generated query at most"})
    query_tries: int = field(
        default=4, metadata={"help": "candidates drawn per generated query asked for, at most, before stopping"}
    )
    template: str = field(
        default="reference", metadata={"help": "reference (shows a reference answer) or plain", "choices": TEMPLATES}
    )
    system_prompt: str | None = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "'' for none"})
    query_field: str | None = field(default=None, metadata={"help": "the query column (default: messages)"})
    reference_field: str | None = field(default=None, metadata={"help": "the reference answer column"})
    input_field: str | None = field(default=None, metadata={"help": "an input column appended to the query"})
    split: str = field(default="train", metadata={"help": "the split of a hub or saved dataset"})
    # Sampling
    max_new_tokens: int = field(default=512, metadata={"help": "tokens per reply at most"})
    temperature: float = field(default=0.7, metadata={"help": "0 means greedy"})
    top_p: float = field(default=0.95)
    seed: int = field(default=0)
    samples_per_query: int = field(default=1, metadata={"help": "replies sampled per query (each its own row)"})
    min_new_tokens: int | None = field(default=None, metadata={"help": "tokens per reply at least"})
    # The run
    resume: bool = field(default=True, metadata={"help": "continue an existing output (--no-resume refuses it)"})
    overwrite: bool = field(default=False, metadata={"help": "with --no-resume: start the output over"})
    limit: int | None = field(default=None, metadata={"help": "answer only the first N queries"})
    keep_degenerate: bool = field(default=False, metadata={"help": "keep empty / broken replies"})
    sort_by_length: bool = field(default=True, metadata={"help": "answer the longest prompts first (--no-sort)"})
    # Backend
    backend: str = field(default="auto", metadata={"help": "auto, transformers, vllm or openai", "choices": BACKENDS})
    base_urls: list[str] | None = field(
        default=None,
        metadata={
            "help": "OpenAI-compatible server(s); repeatable",
            "aliases": ["--base-url", "--base_url"],
            "action": "extend",
        },
    )
    concurrency: int = field(default=8, metadata={"help": "requests in flight (openai backend)"})
    timeout: float = field(
        default=30.0, metadata={"help": "seconds a request may wait without a byte from the server (openai backend)"}
    )
    max_retries: int = field(
        default=3, metadata={"help": "retries of a failed request (openai backend); a silent server errors in ~2 min"}
    )
    batch_size: int = field(default=32, metadata={"help": "prompts per generate call; replies per durable write"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per model (vLLM backend)"})
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16 or float32"})
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "torch threads on a CPU; unset: the cores other programs leave free, looked up per batch"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "run a model repository's own code"})

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {self.template!r}")
        _positive("generate_queries", self.generate_queries, allow_none=True)
        _positive("query_max_new_tokens", self.query_max_new_tokens)
        _positive("query_tries", self.query_tries)
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool) or self.cpu_threads < 0):
            raise ValueError(f"cpu_threads must be unset or a whole number >= 0, got {self.cpu_threads!r}")
        if self.generate_queries is not None:
            self.template = "plain"  # a generated query has no reference answer
        _positive("samples_per_query", self.samples_per_query)
        _positive("limit", self.limit, allow_none=True)
        self.system_prompt = self.system_prompt or None
        self.sampling()  # its own checks: max_new_tokens, temperature, top_p
        self.backend_options()  # likewise: backend, concurrency, batch_size, tensor_parallel_size

    def sampling(self) -> SamplingConfig:
        """The sampling settings every backend takes."""
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed, self.min_new_tokens)

    def backend_options(self, extra: dict[str, Any] | None = None) -> BackendOptions:
        """The backend settings `make_backend` takes (`extra`: more constructor arguments)."""
        return BackendOptions(
            name=self.backend,
            base_urls=self.base_urls,
            concurrency=self.concurrency,
            timeout=self.timeout,
            max_retries=self.max_retries,
            batch_size=self.batch_size,
            tensor_parallel_size=self.tensor_parallel_size,
            dtype=self.dtype,
            cpu_threads=self.cpu_threads,
            trust_remote_code=self.trust_remote_code,
            extra=dict(extra or {}),
        )

    def record(self) -> dict[str, Any]:
        """What the meta file records of these options."""
        settings = asdict(self)
        settings["sampling"] = asdict(self.sampling())
        return settings


def argument_parser() -> Any:
    """The `delia build-cache` parser: MODEL [QUERIES] OUTPUT, then every `BuildCacheArguments` field in both spellings.

    QUERIES is left out with --generate_queries N: `delia build-cache MODEL OUTPUT --generate_queries N`.
    """
    from .command_line import command_parser

    parser = command_parser(BuildCacheArguments, "delia build-cache", DESCRIPTION)
    parser.add_argument(
        "model",
        help="model folder, hub name or short name such as smollm2-135m-instruct (the served model name with "
        "--backend openai)",
    )
    parser.add_argument(
        "queries",
        nargs="?",
        metavar="QUERIES",
        help="JSONL of {messages: [user, assistant]}, rows with fields, saved or hub dataset; left out with "
        "--generate_queries",
    )
    parser.add_argument("output", nargs="?", metavar="OUTPUT", help="the JSONL cache to append to")
    parser.add_argument("--no-sort", "--no_sort", dest="sort_by_length", action="store_false", help="keep query order")
    return parser
