"""Retained general ability: mean NLL per token of reference answers to held-out general queries, teacher-forced.

DELIA's diverse rows are there so the model keeps answering everything else as before; forgetting shows as a rise of
this number from the base model to the trained one. Queries the model self-sampled its diverse cache from are not
held out, so the ids of every `exclude` cache (`delia.build_cache.query_id` of each row's first user turn) are
dropped first. Each query is rendered with the chat template as a user turn; the loss falls only on the tokens of the
reference answer (and the template's end of turn), one forward per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..cpu import OtherLoad, threads_while
from ..data.queries import Query, load_queries
from ..generation.prompts import PromptRenderer


def held_out_queries(general_queries: Any, exclude: Sequence[Any] = ()) -> tuple[list[Query], int]:
    """The general queries (with reference answers) whose ids are in none of the `exclude` caches; and how many were
    dropped."""
    queries = load_queries(general_queries, need_reference=True)
    excluded: set[str] = set()
    for cache in exclude:
        excluded |= {query.id for query in load_queries(cache, need_reference=False)}
    kept = [query for query in queries if query.id not in excluded]
    return kept, len(queries) - len(kept)


def _tokenize_pair(renderer: PromptRenderer, tokenizer: Any, query: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer part is what the full conversation's rendering adds after the prompt."""
    user = [{"role": "user", "content": query}]
    prompt = renderer.render(user)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
    if full.startswith(prompt):
        completion = full[len(prompt) :]
        return tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer(
            completion, add_special_tokens=False
        )["input_ids"]
    # A template that renders earlier turns differently once an answer follows: the answer, then end of sequence
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer(prompt, add_special_tokens=False)["input_ids"], answer_ids


@torch.inference_mode()
def answer_nll(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    cpu_threads: int | None = None,
) -> dict[str, Any]:
    """Summed NLL and token count of each reference answer given its query; answers cut at `max_length` tokens.

    Returns {"n": pairs scored, "skipped": pairs whose prompt alone fills max_length, "tokens", "nll_sum",
    "nll_per_token"}.
    """
    renderer = PromptRenderer(tokenizer)
    limit = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    rows = []
    for query, answer in pairs:
        prompt_ids, answer_ids = _tokenize_pair(renderer, tokenizer, query, answer)
        answer_ids = answer_ids[: max(0, limit - len(prompt_ids))]
        if answer_ids:
            rows.append((prompt_ids, answer_ids))
    rows.sort(key=lambda row: len(row[0]) + len(row[1]), reverse=True)  # little padding per batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.device
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    other_load = OtherLoad()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(prompt) + len(answer) for prompt, answer in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (prompt, answer) in enumerate(batch):
                length = len(prompt) + len(answer)
                input_ids[i, :length] = torch.tensor(prompt + answer)
                labels[i, len(prompt) : length] = torch.tensor(answer)
                attention_mask[i, :length] = 1
            with threads_while(cpu_threads, device, other_load):  # delia's thread policy on a CPU, per batch
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            targets = labels[:, 1:].to(device)
            scored = targets != -100
            nll_sum += torch.nn.functional.cross_entropy(
                logits[:, :-1][scored].float(), targets[scored], reduction="sum"
            ).item()
            tokens += int(scored.sum())
    finally:
        model.train(was_training)
    return {
        "n": len(rows),
        "skipped": len(pairs) - len(rows),
        "tokens": tokens,
        "nll_sum": nll_sum,
        "nll_per_token": nll_sum / tokens if tokens else None,
    }
