"""The `<sep>` contrast: the same inputs, told to follow the format and told NOT to, and what that difference means.

A downstream user turn is context, then an instruction sentence: in the bundled data, the context lines, two blank
lines, then the instruction (`split_instruction`). The contrast keeps the context and swaps the instruction for one
that says not to use the `<sep>` format (`DO_NOT_INSTRUCTIONS`, or your own). A model that learned what `<sep>`
*means* answers with the dict when told to and in prose when told not to; a model that fit the surface answers with
the dict either way. Instruction sensitivity = dict rate when told to follow - dict rate when told not to.

A model that never learned the format answers in prose to both, scoring a perfect "not dict" on the DO-NOT prompts
and a sensitivity of 0: that is no win, so `verdict` says first whether the format was learned at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .metrics import Answer, format_rate

INSTRUCTION_BREAK = "\n\n\n"  # between the context and the instruction sentence in the bundled data

#: Instructions that ask for the judgement without the `<sep>` format (written for this project).
DO_NOT_INSTRUCTIONS = (
    "DO NOT follow the <sep> format. In a few plain sentences, say whether the chatbot's response is hallucinated.",
    "Without using the <sep> format, explain in ordinary prose whether the answer above contains invented facts.",
    "Ignore the <sep> format and tell me in your own words whether the chatgpt_response includes anything false.",
)

#: Below this dict rate on the follow prompts, the format counts as not learned and the contrast says nothing.
MIN_FOLLOW_RATE = 0.5
#: At or above this sensitivity, the model is said to keep the instruction's meaning.
MIN_SENSITIVITY = 0.5


def split_instruction(user_text: str) -> tuple[str, str]:
    """(context, instruction) of a user turn: the instruction is what follows the last blank-line pair.

    Without two blank lines, the instruction is the last non-empty line (the whole text when it has one line).
    """
    if INSTRUCTION_BREAK in user_text:
        context, instruction = user_text.rsplit(INSTRUCTION_BREAK, 1)
        return context + INSTRUCTION_BREAK, instruction.strip()
    stripped = user_text.rstrip()
    if "\n" in stripped:
        context, instruction = stripped.rsplit("\n", 1)
        return context + "\n", instruction.strip()
    return "", stripped.strip()


def replace_instruction(messages: Sequence[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    """A copy of a prompt (messages ending with the user turn) with that turn's instruction swapped, context kept."""
    *earlier, last = messages
    if last.get("role") != "user":
        raise ValueError(f"a prompt must end with the user turn; got role {last.get('role')!r}")
    context, _ = split_instruction(last["content"])
    return [*map(dict, earlier), {**last, "content": context + instruction}]


def verdict(
    follow_rate: float | None,
    do_not_rate: float | None,
    min_follow_rate: float = MIN_FOLLOW_RATE,
    min_sensitivity: float = MIN_SENSITIVITY,
) -> str:
    """One line saying what the contrast shows; it never reads a model that lacks the format as a success."""
    if follow_rate is None or do_not_rate is None:
        return "no contrast measured"
    if follow_rate < min_follow_rate:
        return (
            f"format not learned (dict rate when told to follow {follow_rate:.0%} < {min_follow_rate:.0%}): "
            "the DO-NOT score means nothing"
        )
    sensitivity = follow_rate - do_not_rate
    if sensitivity >= min_sensitivity:
        return f"keeps the instruction's meaning: dict when told to follow, prose when told not to ({sensitivity:+.0%})"
    return f"fits the surface: answers with the dict whatever the instruction says ({sensitivity:+.0%})"


def summarise_contrast(
    follow: Sequence[Answer],
    do_not: Sequence[Answer],
    texts: Sequence[str],
    do_not_instructions: Sequence[str],
    min_follow_rate: float = MIN_FOLLOW_RATE,
) -> dict[str, Any]:
    """The contrast section of a report.

    `follow` are the answers to the prompts as given; `do_not` those to each DO-NOT instruction in turn (all rows for
    the first instruction, then all for the second...); `texts` the replies behind both, in the same order.
    """
    n = len(follow)
    follow_rate, do_not_rate = format_rate(follow), format_rate(do_not)
    sensitivity = None if follow_rate is None or do_not_rate is None else follow_rate - do_not_rate

    def opens_dict(replies: Sequence[str]) -> float | None:  # surface learning: '{' first, parsable or not
        return sum(text.lstrip().startswith("{") for text in replies) / len(replies) if replies else None

    return {
        "do_not_instructions": [
            {"instruction": text, "n": n, "dict_rate": format_rate(do_not[i * n : (i + 1) * n])}
            for i, text in enumerate(do_not_instructions)
        ],
        "n_follow": n,
        "n_do_not": len(do_not),
        "dict_rate_follow": follow_rate,
        "dict_rate_do_not": do_not_rate,
        "not_dict_rate_do_not": None if do_not_rate is None else 1 - do_not_rate,
        "opens_dict_rate_follow": opens_dict(texts[:n]),
        "opens_dict_rate_do_not": opens_dict(texts[n:]),
        "sensitivity": sensitivity,
        "min_follow_rate": min_follow_rate,
        "format_learned": follow_rate is not None and follow_rate >= min_follow_rate,
        "verdict": verdict(follow_rate, do_not_rate, min_follow_rate),
    }
