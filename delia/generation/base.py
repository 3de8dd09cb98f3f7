"""What every generation backend shares: sampling settings, one generated reply, and the backend interface.

A backend turns conversations (lists of {role, content} messages, ending with the user turn to answer) into replies.
Local backends render the prompt with the tokenizer's chat template (`delia.generation.prompts.render_prompt`) and
decode only the newly generated tokens; the HTTP backend sends the messages to an OpenAI-compatible server, which
renders them itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingConfig:
    """How replies are sampled. `temperature=0` means greedy decoding."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    min_new_tokens: int | None = None  # benchmarks pin the length with min = max

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True)
class Generation:
    """One reply: its text, how many tokens were generated, and why generation stopped ("stop" or "length")."""

    text: str
    num_tokens: int
    finish_reason: str


Conversation = list[dict[str, str]]


class Backend(Protocol):
    """Generates one reply per conversation, in the order given."""

    name: str

    def generate(self, conversations: list[Conversation], sampling: SamplingConfig) -> list[Generation]: ...

    def close(self) -> None: ...
