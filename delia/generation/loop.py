"""The one generation loop: prepare every prompt once, answer the longest first, hand back each reply with its index.

`build_cache` writes the replies as they come (its rows, in answer order); `delia eval` puts them back in row order.
Answering longest first makes an out-of-memory error show up at once and lets each batch pad little.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ..data.reading import DataFormatError
from .base import Backend, Conversation, Generation, SamplingConfig
from .prompts import PromptRenderError


def answer(
    backend: Backend,
    conversations: Sequence[Conversation],
    ids: Sequence[str],
    sampling: SamplingConfig,
    *,
    where: Callable[[int], str],
    sort_by_length: bool = True,
) -> Iterator[tuple[int, Generation]]:
    """(index into `conversations`, reply) for each conversation, longest prompt first when `sort_by_length`; in the
    order replies come back from a backend with `stream_unordered` (a server: a retry holds the others up no more).

    `ids` are the request ids (they pick each request's seed); `where(index)` names a conversation's file and line
    for a prompt the chat template cannot render (a DataFormatError). Closing the iterator stops the backend.
    """
    try:
        prompts = backend.prepare(conversations, ids)
    except PromptRenderError as error:
        raise DataFormatError(f"{where(error.index)}: {error}") from None
    order = list(range(len(prompts)))
    if sort_by_length:
        order.sort(key=lambda index: -prompts[index].length)
    in_answer_order = [prompts[index] for index in order]
    unordered = getattr(backend, "stream_unordered", None)  # (position in in_answer_order, reply), as they come
    stream = (unordered or backend.stream)(in_answer_order, sampling)
    answered = 0
    try:
        for position, reply in stream if unordered else enumerate(stream):
            answered += 1
            yield order[position], reply
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if answered != len(prompts):
        raise RuntimeError(f"the {backend.name} backend answered {answered} of {len(prompts)} prompts")


def answer_all(
    backend: Backend, conversations: Sequence[Conversation], sampling: SamplingConfig, *, where: Callable[[int], str]
) -> list[Generation]:
    """One reply per conversation, in the conversations' order (request ids are the positions)."""
    replies: list[Generation | None] = [None] * len(conversations)
    ids = [str(index) for index in range(len(conversations))]
    for index, reply in answer(backend, conversations, ids, sampling, where=where):
        replies[index] = reply
    return replies  # type: ignore[return-value]
