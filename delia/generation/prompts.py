"""Self-sampling prompts: the conversation the base model answers, and its rendering with the chat template.

Two templates:
- `reference` (the paper's): the query, the query's reference answer as an earlier assistant turn, then the query
  asked again; the model answers in its own words, steered by the reference.
- `plain`: the query alone.
An optional system prompt leads either. Prompts are rendered with `add_generation_prompt=True`, so generation starts
exactly at the assistant's turn; templates that reject a system role (Gemma's) get the system text folded into the
first user turn.
"""

from __future__ import annotations

from typing import Any

from .base import Conversation

TEMPLATES = ("reference", "plain")
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful and knowledgeable assistant. Answer the user's request directly, accurately and completely."
)


class PromptRenderError(ValueError):
    """The chat template could not render a conversation; `index` is its position in the call."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def build_conversation(query: str, reference: str | None, template: str, system_prompt: str | None) -> Conversation:
    """The messages the model answers, ending with the user turn."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if template == "reference":
        if not reference:
            raise ValueError("the 'reference' template needs a reference answer for every query")
        messages += [
            {"role": "user", "content": query},
            {"role": "assistant", "content": reference},
            {"role": "user", "content": query},
        ]
    else:
        messages.append({"role": "user", "content": query})
    return messages


def fold_system(messages: Conversation) -> Conversation:
    """Move a leading system message into the first user turn, for templates without a system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, first, *rest = messages
    return [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]


class PromptRenderer:
    """Renders conversations with a tokenizer's chat template; learns once whether the system role must be folded."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'the model')!r} has no chat template; "
                "self-sampling needs one (set tokenizer.chat_template)"
            )
        self.tokenizer = tokenizer
        self.fold_system: bool | None = None

    def _render(self, messages: Conversation) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render(self, messages: Conversation, index: int = 0) -> str:
        has_system = bool(messages) and messages[0]["role"] == "system"
        if has_system and self.fold_system:
            messages = fold_system(messages)
        try:
            prompt = self._render(messages)
            if has_system and self.fold_system is None:
                self.fold_system = False
            return prompt
        except Exception as error:  # jinja raises TemplateError (or others) from `raise_exception`
            if has_system and self.fold_system is None:
                try:
                    prompt = self._render(fold_system(messages))
                except Exception:
                    pass
                else:
                    self.fold_system = True
                    return prompt
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PromptRenderError(index, f"the chat template failed to render this conversation: {reason}") from None
