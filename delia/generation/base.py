"""What every generation backend shares: sampling settings, prompts, replies, the seed rule and the backend interface.

A backend turns conversations (lists of {role, content} messages, ending with the user turn to answer) into replies,
in two steps: `prepare` makes each conversation ready once (local backends render it with the tokenizer's chat
template, `delia.generation.prompts.PromptRenderer`, and tokenize it; the HTTP backend sends the messages as they are,
for the server to render), and `stream` answers the prepared prompts, yielding the replies in the order given.
`generate` does both for callers that just want a list of replies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingConfig:
    """How replies are sampled. `temperature=0` means greedy decoding; `seed` is the run's seed (see request_seed)."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    min_new_tokens: int | None = None  # benchmarks pin the length with min = max
    stop: tuple[str, ...] = ()  # texts that end a reply, left out of it (self-generated queries: the end of the turn)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str) or not all(isinstance(text, str) and text for text in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


@dataclass(frozen=True)
class Generation:
    """One reply: its text, how many tokens were generated, and why generation stopped ("stop" or "length")."""

    text: str
    num_tokens: int
    finish_reason: str


Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Prompt:
    """One conversation made ready for one backend, once: its request id, its length for sorting, its rendering."""

    id: str  # the query id in build_cache, the position in a plain `generate` call; it picks the request's seed
    messages: Conversation
    length: int  # what build_cache sorts by: tokens (transformers), characters (vLLM, openai)
    token_ids: list[int] | None = None  # the rendered prompt, tokenized (transformers)
    text: str | None = None  # the rendered prompt (vLLM), or a raw prefix to continue (`prepare_text`, every backend)


def request_seed(seed: int, request_id: str) -> int:
    """The sampling seed of one request, from the run's seed and the request's id: the one seed rule of every backend.

    For the server and vLLM backends a reply's seed depends on neither its batch nor its place in the run, so a rerun
    (or a resumed run) samples each query exactly as before. The transformers backend samples a whole batch from one
    generator, seeded by the batch's first request: reproducible for the same batches, not across a regrouping (a
    resumed run, another batch size). In [0, 2**31), which every engine accepts.
    """
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


class Backend(Protocol):
    """Generates one reply per conversation (or raw text); what build_cache calls on a backend, and nothing else."""

    name: str

    def prepare(self, conversations: Sequence[Conversation], ids: Sequence[str]) -> list[Prompt]:
        """Each conversation ready to answer (rendered, tokenized); a PromptRenderError names the one that fails."""
        ...

    def prepare_text(self, texts: Sequence[str], ids: Sequence[str]) -> list[Prompt]:
        """Each raw text ready to continue as it is, no chat template applied (Magpie's user-turn prefix)."""
        ...

    def stream(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> Iterator[Generation]:
        """The reply to each prompt, yielded in the order given as soon as it and every earlier one are done."""
        ...

    def close(self) -> None:
        """Release what the backend holds (an engine, its memory)."""
        ...

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingConfig) -> list[Generation]:
        """One reply per conversation, in order; request ids are the positions ("0", "1", ...)."""
        prompts = self.prepare(conversations, [str(index) for index in range(len(conversations))])
        return list(self.stream(prompts, sampling))
