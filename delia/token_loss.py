"""Loss of chosen tokens (such as `<sep>`) wherever they occur as a target, measured during evaluation.

DELIA claims that `<sep>` comes to stand for a whole instruction. One trace of that over training is how well the model
predicts `<sep>` itself and the tokens of the format it stands for (the `'` of `{'thought': ...}`). `DSFTTrainer`
with `track_tokens=[...]` logs, at every evaluation, the mean NLL of each tracked token over every position where it is
the next token, prompt or completion alike (`<sep>` lives in the prompt, so the label mask is not used; padding is).

It costs no extra forward: `TokenLossTracker.capture` catches, with forward hooks, the backbone's last hidden states and
the per-token log-probs of the eval forward that computes the loss (TRL's fused LM head scores the completion tokens).
Occurrences in the completion are read from those log-probs; the others (the prompt's) are projected through the LM
head at those positions only. Nothing of size (batch, length, vocabulary) is built.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .io import append_jsonl, iter_jsonl
from .upstream import fused_head_output

METRIC_NAME = "token_loss"  # logged as f"{prefix}token_loss/{token}", e.g. eval_token_loss/<sep>
CHUNK_POSITIONS = 1024  # positions projected through the LM head at once (bounds the (positions, vocab) logits)


# ----------------------------------------------------------------------------------------------------------------------
# Which tokens
# ----------------------------------------------------------------------------------------------------------------------


def resolve_track_tokens(tokenizer: Any, tokens: Sequence[str | int]) -> dict[str, int]:
    """Map each tracked token to its id: {name: id}, in the order given.

    A string is looked up as a vocabulary entry first (`<sep>`, `'`, `Ġthe`), else tokenised without special tokens and
    must give exactly one token. An int is an id; its name is the vocabulary entry. Anything else is a ValueError
    naming the token.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    vocab = tokenizer.get_vocab()
    size = len(tokenizer)
    resolved: dict[str, int] = {}
    for token in tokens:
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < size:
                raise ValueError(f"track_tokens: id {token} is outside the tokenizer's vocabulary (0 to {size - 1})")
            name, token_id = tokenizer.convert_ids_to_tokens(token), token
        elif isinstance(token, str) and token:
            token_id = vocab.get(token)
            if token_id is None:
                ids = tokenizer(token, add_special_tokens=False)["input_ids"]
                if len(ids) != 1:
                    pieces = tokenizer.convert_ids_to_tokens(ids)
                    raise ValueError(
                        f"track_tokens: {token!r} is not a single token; the tokenizer splits it into {len(ids)} "
                        f"tokens {pieces} (ids {ids}). Track one of those pieces, or pass a token id."
                    )
                token_id = ids[0]
            name = token
        else:
            raise ValueError(f"track_tokens: expected token strings or ids, got {token!r}")
        if token_id in resolved.values():
            raise ValueError(f"track_tokens: {token!r} is listed twice (id {token_id})")
        resolved[name] = int(token_id)
    return resolved


# ----------------------------------------------------------------------------------------------------------------------
# The computation: plain tensors in, per-position NLL out
# ----------------------------------------------------------------------------------------------------------------------


def valid_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """(batch, length - 1) bool: whether input_ids[:, t] (t >= 1) is a real next-token target of position t - 1.

    Both t and t - 1 must be real tokens, so padding on either side and the first token of each row never count.
    Without an attention mask (padding-free batches), a position id of 0 marks the first token of a sequence.
    """
    if attention_mask is not None:
        real = attention_mask.bool()
        return real[:, 1:] & real[:, :-1]
    if position_ids is not None:
        return position_ids[:, 1:] != 0
    return torch.ones_like(input_ids[:, 1:], dtype=torch.bool)


def known_log_probs(
    output: Any, input_ids: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The eval forward's own next-token log-probs (TRL's fused LM head) and where they score input_ids[:, t].

    The fused head returns log p(labels[:, t]) at labelled positions only; where that label is the input token, it is
    the number the tracker needs. Returns (log_probs, known), both (batch, length - 1), or None when unavailable.
    """
    output = fused_head_output([output])
    if output is None or labels is None or output.log_probs.shape != input_ids[:, 1:].shape:
        return None
    log_probs, mask = output.log_probs, output.label_mask
    return log_probs, mask & (labels[:, 1:] == input_ids[:, 1:]).to(mask.device)


def tracked_token_nll(
    hidden_states: torch.Tensor,
    input_ids: torch.Tensor,
    token_ids: torch.Tensor,
    valid: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_positions: int = CHUNK_POSITIONS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLL of every tracked token occurrence: (rows, target positions, index into token_ids, nll), in row-major order.

    `hidden_states` are the backbone's last hidden states (batch, length, hidden); position t - 1 predicts
    input_ids[:, t]. Occurrences the eval forward already scored (`known`, from `known_log_probs`) are read from it;
    the others go through `logits_fn` (the LM head) at those positions only, in chunks, in float32.
    """
    token_ids = token_ids.to(input_ids.device)
    hits = torch.isin(input_ids[:, 1:], token_ids) & valid
    rows, before = hits.nonzero(as_tuple=True)
    targets = input_ids[rows, before + 1]
    nll = torch.empty(len(rows), dtype=torch.float32, device=input_ids.device)
    project = torch.ones(len(rows), dtype=torch.bool, device=input_ids.device)
    if known is not None:
        log_probs, scored = known
        reuse = scored[rows, before].to(project.device)
        nll[reuse] = -log_probs[rows[reuse], before[reuse]].float().to(nll.device)
        project = ~reuse
    todo = project.nonzero().squeeze(1)
    for start in range(0, len(todo), chunk_positions):
        index = todo[start : start + chunk_positions]
        logits = logits_fn(hidden_states[rows[index], before[index]]).float()
        target_logits = logits.gather(1, targets[index, None].to(logits.device)).squeeze(1)
        nll[index] = (logits.logsumexp(dim=-1) - target_logits).to(nll.device)
    which = (targets[:, None] == token_ids[None, :]).int().argmax(dim=1)
    return rows, before + 1, which, nll


def per_row_sums(rows: torch.Tensor, which: torch.Tensor, nll: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """(batch, 2 * tokens) float32: each row's NLL sum per tracked token, then its occurrence count per token."""
    stats = torch.zeros(2, batch * tokens, dtype=torch.float32, device=nll.device)
    flat = rows.to(nll.device) * tokens + which.to(nll.device)
    stats[0].index_add_(0, flat, nll)
    stats[1].index_add_(0, flat, torch.ones_like(nll))
    return stats.view(2, batch, tokens).transpose(0, 1).reshape(batch, 2 * tokens)


# ----------------------------------------------------------------------------------------------------------------------
# The model side: where the hidden states come from, how they become logits
# ----------------------------------------------------------------------------------------------------------------------


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside `model` (a peft wrapper's base model, or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output's `last_hidden_state` feeds the LM head (what TRL's fused head runs)."""
    lm = language_model(model)
    backbone = getattr(lm, "base_model", None)
    if backbone is None or backbone is lm:
        raise ValueError(
            f"track_tokens needs a transformers causal LM with a separate backbone; {type(lm).__name__} has none"
        )
    return backbone


def output_logits_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states -> logits as the model computes them: its LM head, then its logit scale and soft-capping, if any."""
    lm = language_model(model)
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None):  # Granite divides its logits
        scale = 1 / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden.to(head.weight.device))
        if scale is not None and scale != 1:
            out = out * scale
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    return logits


def _last_hidden_state(output: Any) -> torch.Tensor | None:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        hidden = output[0]
    return hidden


# ----------------------------------------------------------------------------------------------------------------------
# The tracker: one per trainer, sums over one evaluation
# ----------------------------------------------------------------------------------------------------------------------


class TokenLossTracker:
    """NLL sums and counts of the tracked tokens over one evaluation; `capture` wraps each eval forward."""

    def __init__(self, token_ids: Mapping[str, int]):
        self.names = list(token_ids)
        self.ids = torch.tensor(list(token_ids.values()), dtype=torch.long)
        self.reset()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, tokens: Sequence[str | int]) -> TokenLossTracker:
        return cls(resolve_track_tokens(tokenizer, tokens))

    def reset(self) -> None:
        self.sums = torch.zeros(2, len(self.names), dtype=torch.float64)  # NLL sums, counts
        self.batches = 0

    @contextmanager
    def capture(
        self,
        model: torch.nn.Module,
        inputs: Mapping[str, Any],
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        called: torch.nn.Module | None = None,
    ) -> Iterator[None]:
        """Add the tracked tokens of `inputs` from the first forward run inside the block.

        Hooks catch the backbone's last hidden states (inside `model`) and the output of `called` (the module the
        trainer calls, default `model`), whose fused log-probs are reused where they score a tracked token. `gather`
        combines the per-row sums of every process (the accelerator's `gather_for_metrics`, which also drops the rows
        repeated to fill the last batch); without it, this process's rows are summed.
        """
        hidden: list[torch.Tensor] = []
        outputs: list[Any] = []

        def keep_hidden(module: torch.nn.Module, args: Any, output: Any) -> None:
            state = _last_hidden_state(output)
            if not hidden and state is not None:  # only the first forward counts (some eval paths run two)
                hidden.append(state.detach())

        def keep_output(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not outputs:
                outputs.append(output)

        handles = [
            backbone_of(model).register_forward_hook(keep_hidden),
            (called or model).register_forward_hook(keep_output),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if not hidden:
            return
        input_ids = inputs["input_ids"]
        valid = valid_targets(input_ids, inputs.get("attention_mask"), inputs.get("position_ids"))
        known = known_log_probs(outputs[0], input_ids, inputs.get("labels")) if outputs else None
        with torch.no_grad():
            rows, _, which, nll = tracked_token_nll(
                hidden[0], input_ids, self.ids, valid, output_logits_fn(model), known
            )
            stats = per_row_sums(rows, which, nll, input_ids.shape[0], len(self.names))
        stats = gather(stats) if gather is not None else stats
        self.sums += stats.sum(dim=0).view(2, -1).double().cpu()
        self.batches += 1

    def pop(self) -> dict[str, tuple[float, int]] | None:
        """{token: (NLL sum, count)} since the last reset, then reset; None when no batch was seen."""
        if self.batches == 0:
            return None
        sums, counts = self.sums.tolist()
        self.reset()
        return {name: (sums[i], int(round(counts[i]))) for i, name in enumerate(self.names)}


def token_loss_metrics(totals: Mapping[str, tuple[float, int]], prefix: str = "eval_") -> dict[str, float]:
    """{f"{prefix}token_loss/{token}": mean NLL} for each token that occurred; a token that did not has no key."""
    return {f"{prefix}{METRIC_NAME}/{name}": nll / count for name, (nll, count) in totals.items() if count > 0}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN / inf (a diverged model)


def token_loss_record(
    totals: Mapping[str, tuple[float, int]], step: int, epoch: float | None, prefix: str = "eval_"
) -> dict[str, Any]:
    """One line of token_loss.jsonl: step, epoch, the metric prefix and, per token, NLL sum, count and mean."""
    return {
        "step": step,
        "epoch": epoch,
        "prefix": prefix.rstrip("_"),
        "tokens": {
            name: {"nll_sum": _finite(nll), "count": count, "mean": _finite(nll / count) if count else None}
            for name, (nll, count) in totals.items()
        },
    }


def append_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record to a token_loss.jsonl durably (see `io.append_jsonl`): earlier lines are never touched."""
    append_jsonl(path, record)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a token_loss.jsonl: a partial last line (left by a kill) is skipped, and so, with a warning that
    names the file and line, is a record without an integer `step` and a `tokens` mapping (edited by hand, say)."""
    records = []
    for line, record in iter_jsonl(path, skip_partial_tail=True):
        step, tokens = record.get("step"), record.get("tokens")
        if isinstance(step, bool) or not isinstance(step, int) or not isinstance(tokens, dict):
            warnings.warn(
                f"{os.fspath(path)}, line {line}: skipped, expected a record with an integer 'step' and a 'tokens' "
                "mapping (as DSFTTrainer writes them)",
                UserWarning,
                stacklevel=2,
            )
            continue
        records.append(record)
    return records
