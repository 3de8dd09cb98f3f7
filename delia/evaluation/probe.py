"""`delia probe`: does the `<sep>` shorthand put the model in the same state as the instruction it stands for?

DELIA claims that after training, `<sep>` carries the meaning of "answer as a Python dict with keys 'thought' and
'hallucination'". For each prompt (default: the bundled eval set's user turns, which end with a line such as "Using
the <sep> format, tell whether the answer above hallucinates.") three variants are rendered with the chat template and
its generation prompt:

- `sep`: the prompt as written;
- `explicit`: the same prompt with the `<sep>` reference ("<sep>", "the <sep> format") replaced by the format written
  out (`EXPLICIT_FORMAT`), so it differs from `sep` only there;
- `control`: the prompt without its lines that mention `<sep>`, i.e. without any format instruction.

For every layer (the embedding output and each block's output, `output_hidden_states=True`) the hidden state at the
last prompt position (the position that predicts the reply's first token) is taken, and the score is the mean over
prompts of cos(sep, explicit) - cos(control, explicit). Above 0: the shorthand moves the state towards the explicit
instruction more than leaving the format out does. Cosines are computed after centering: per layer and per model,
the mean state over all prompts and variants is subtracted, since raw hidden states share a large common component
(a few dimensions of large magnitude) that pushes every raw cosine towards 1. The raw scores are kept in the JSON.
Also reported: the new token's 10 nearest vocabulary tokens by input-embedding cosine (excluding itself).

What it does not measure: it is a representational similarity at one position, not evidence that the model uses that
representation to produce the format (no intervention, no generation). The score also moves with the rest of the
instruction line, which `sep` and `explicit` share and `control` lacks; so read it as a comparison between models on
the same prompts (base against trained), not as an absolute. Layer 0 at the last position is the embedding of the
generation prompt's last token, the same in all three variants, so its score is 0 by construction.

The summary score, one number per model, is the mean of the centered score over the upper half of the blocks (layers
L//2 + 1 .. L of a model with L blocks), where the prompt has been read. `probe.json` holds the models of one probe
side by side; an earlier one in `--output` is refused unless `--overwrite` is given.

    delia probe BASE_MODEL RUN_FOLDER                      # a run of `delia train` / `delia demo` (adapter or model)
    delia probe BASE_MODEL ADAPTER --prompts eval.jsonl --output runs/probe
"""

from __future__ import annotations

import gc
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ..bundled import default_probe_prompts
from ..cpu import OtherLoad, threads_while
from ..io import write_json_atomically
from ..modeling import load_for_inference
from ..run_files import PROBE_PLOT_FILE, PROBE_REPORT_FILE
from .probe_config import EXPLICIT_FORMAT, ProbeArguments, argument_parser  # noqa: F401 (importable from here)

VARIANTS = ("sep", "explicit", "control")
SUMMARY_DEFINITION = "mean of the centered score over the upper half of the blocks: layers L//2 + 1 .. L of L blocks"
NEAREST = 10


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and their variants
# ----------------------------------------------------------------------------------------------------------------------


def make_variants(prompt: str, token: str = "<sep>", explicit: str = EXPLICIT_FORMAT) -> dict[str, str]:
    """The three variants of one user turn: sep (as written), explicit (format written out), control (no format)."""
    if token not in prompt:
        raise ValueError(f"the prompt does not mention {token!r}")
    reference = re.compile(rf"(?:\b[Tt]he )?{re.escape(token)}(?: format\b)?")
    control = "\n".join(line for line in prompt.split("\n") if token not in line).rstrip()
    if not control.strip():
        raise ValueError(f"the prompt has nothing left once its lines that mention {token!r} are removed")
    return {"sep": prompt, "explicit": reference.sub(explicit, prompt), "control": control}


def load_prompts(
    source: str | None = None, token: str = "<sep>", limit: int | None = None, explicit: str = EXPLICIT_FORMAT
) -> list[dict[str, str]]:
    """Variants of each prompt's last user turn, from DELIA conversations (JSONL, saved dataset or hub name)."""
    from ..data import load_conversations
    from ..data.forms import last_user_turn
    from ..data.reading import line_of_row

    source = source or default_probe_prompts()
    dataset = load_conversations(source, label="prompts")
    variants = []
    for row_index, row in enumerate(dataset):
        if limit is not None and len(variants) >= limit:
            break
        try:
            variants.append(make_variants(last_user_turn(row), token, explicit))
        except ValueError as error:
            where = f"line {line_of_row(source, row_index)}" if os.path.isfile(source) else f"row {row_index}"
            raise ValueError(f"{source}, {where}: {error}; the probe needs user turns that use it") from None
    if len(variants) < 2:
        raise ValueError(f"{source}: the probe needs at least 2 prompts, got {len(variants)}")
    return variants


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def _render(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one user turn through the chat template with its generation prompt (raw text without one)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


@torch.no_grad()
def last_position_states(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 8, cpu_threads: int | None = None
) -> torch.Tensor:
    """(layers + 1, len(texts), hidden) float32: every layer's hidden state at each text's last prompt position.

    Batches are padded on the left with position ids counted from each row's first real token, so a row's states do
    not depend on the rows it is batched with.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out, other_load = [], OtherLoad()
    for start in range(0, len(texts), batch_size):
        ids = [_render(tokenizer, text) for text in texts[start : start + batch_size]]
        length = max(len(row) for row in ids)
        input_ids = torch.tensor([[pad_id] * (length - len(row)) + row for row in ids], device=device)
        mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in ids], device=device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        with threads_while(cpu_threads, device, other_load):  # delia's thread policy on a CPU, per batch
            outputs = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        out.append(torch.stack([layer[:, -1].float().cpu() for layer in outputs.hidden_states]))
    return torch.cat(out, dim=1)


@torch.no_grad()
def nearest_tokens(model: torch.nn.Module, tokenizer: Any, token: str, k: int = NEAREST) -> list[dict[str, Any]]:
    """The k vocabulary tokens whose input embeddings are closest to `token`'s by cosine, excluding itself."""
    embeddings = model.get_input_embeddings()  # peft's wrapper applies trained token rows on the way out
    device = next(model.parameters()).device
    token_id = tokenizer.convert_tokens_to_ids(token)
    target = embeddings(torch.tensor([token_id], device=device)).float()
    cosines = []
    for start in range(0, len(tokenizer), 8192):
        ids = torch.arange(start, min(start + 8192, len(tokenizer)), device=device)
        cosines.append(torch.nn.functional.cosine_similarity(embeddings(ids).float(), target).cpu())
    cosines = torch.cat(cosines)
    cosines[token_id] = -math.inf
    best = cosines.topk(min(k, len(cosines) - 1))
    return [
        {"token": tokenizer.convert_ids_to_tokens(i), "id": i, "cosine": round(c, 4)}
        for c, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
    ]


# ----------------------------------------------------------------------------------------------------------------------
# The score
# ----------------------------------------------------------------------------------------------------------------------


def format_scores(states: dict[str, torch.Tensor], center: bool = True) -> dict[str, list[float]]:
    """Per layer: mean over prompts of cos(sep, explicit), of cos(control, explicit), and their difference (score).

    `states[variant]` is (layers, prompts, hidden). With `center`, each layer's mean over all prompts and variants
    is subtracted first; a vector that is all zero after that (as at layer 0) has cosine 0.
    """
    sep, explicit, control = (states[name].double() for name in VARIANTS)
    size = torch.cat([sep, explicit, control], dim=1).norm(dim=-1).mean(dim=1, keepdim=True)  # (layers, 1)
    if center:
        mean = torch.cat([sep, explicit, control], dim=1).mean(dim=1, keepdim=True)
        sep, explicit, control = sep - mean, explicit - mean, control - mean

    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean over prompts; 0 where either vector is zero up to rounding (relative to the layer's state size)."""
        norms = a.norm(dim=-1) * b.norm(dim=-1)
        zero = (a.norm(dim=-1) <= 1e-6 * size) | (b.norm(dim=-1) <= 1e-6 * size)
        cosines = (a * b).sum(dim=-1) / norms.clamp(min=1e-300)
        return torch.where(zero, torch.zeros_like(cosines), cosines).mean(dim=1)

    with_sep, with_control = cosine(sep, explicit), cosine(control, explicit)
    return {
        "cos_sep_explicit": with_sep.tolist(),
        "cos_control_explicit": with_control.tolist(),
        "score": (with_sep - with_control).tolist(),
    }


@dataclass
class ProbedModel:
    label: str
    path: str
    scores: dict[str, list[float]]
    raw_scores: dict[str, list[float]]
    nearest: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        summary, (first, last) = summary_score(self.scores["score"])
        layers = [
            {
                "layer": layer,
                "score": self.scores["score"][layer],
                "cos_sep_explicit": self.scores["cos_sep_explicit"][layer],
                "cos_control_explicit": self.scores["cos_control_explicit"][layer],
                "raw_score": self.raw_scores["score"][layer],
            }
            for layer in range(len(self.scores["score"]))
        ]
        return {
            "label": self.label,
            "path": self.path,
            "summary_score": summary,
            "summary_layers": [first, last],
            "layers": layers,
            "nearest_tokens": self.nearest,
        }


def summary_score(scores: list[float]) -> tuple[float, tuple[int, int]]:
    """One number per model: the mean centered score over the upper half of the blocks, and those layers.

    With L blocks (layers 1..L; layer 0 is the embeddings, 0 by construction) that is layers L//2 + 1 .. L, where the
    instruction has been read and the state is about to produce the reply; the lower layers mostly carry the tokens.
    """
    last = len(scores) - 1
    first = min(last, last // 2 + 1)
    upper = scores[first:]
    return sum(upper) / len(upper), (first, last)


def probe_model(
    tokenizer: Any,
    model: torch.nn.Module,
    prompts: list[dict[str, str]],
    label: str,
    path: str = "",
    token: str = "<sep>",
    batch_size: int = 8,
    cpu_threads: int | None = None,
) -> ProbedModel:
    """Scores (centered and raw) and nearest tokens of one loaded model."""
    states = {
        name: last_position_states(model, tokenizer, [prompt[name] for prompt in prompts], batch_size, cpu_threads)
        for name in VARIANTS
    }
    return ProbedModel(
        label=label,
        path=path,
        scores=format_scores(states, center=True),
        raw_scores=format_scores(states, center=False),
        nearest=nearest_tokens(model, tokenizer, token),
    )


def run_probe(
    models: list[str],
    *,
    base: str | None = None,
    prompts: str | None = None,
    limit: int | None = None,
    token: str = "<sep>",
    explicit: str = EXPLICIT_FORMAT,
    output_dir: str = "runs/probe",
    batch_size: int = 8,
    quantization: str | None = None,
    cpu_threads: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Probe each model in turn (one in memory at a time); write probe.json and probe.png; return the report.

    An earlier probe.json in `output_dir` is refused before any model loads, unless `overwrite`: one report holds
    every model of one probe side by side (the score is read as a comparison), so a second probe goes elsewhere.
    """
    report_path = os.path.join(output_dir, PROBE_REPORT_FILE)
    if os.path.exists(report_path) and not overwrite:
        raise FileExistsError(
            f"{report_path} holds an earlier probe; pass --overwrite to replace it, or choose another --output"
        )
    source = prompts or default_probe_prompts()
    variants = load_prompts(source, token, limit, explicit)
    probed = []
    from .plots import run_labels

    for label, path in zip(run_labels(models), models, strict=True):
        tokenizer, model, _ = load_for_inference(path, base_model=base, quantization=quantization, new_tokens=(token,))
        probed.append(probe_model(tokenizer, model, variants, label, path, token, batch_size, cpu_threads))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report = {
        "token": token,
        "prompts": source,
        "prompt_count": len(variants),
        "explicit_format": explicit,
        "centered": True,
        "score": "mean over prompts of cos(sep, explicit) - cos(control, explicit) at the last prompt position",
        "summary_score": SUMMARY_DEFINITION,
        "models": [model.as_json() for model in probed],
    }
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomically(report_path, report)
    plot_probe(report, os.path.join(output_dir, PROBE_PLOT_FILE))
    return report


def plot_probe(report: dict[str, Any], path: str | None = None):
    """Score against layer, one curve per model; saved to `path` (atomically) when given. Returns the Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .plots import save_figure

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for model in report["models"]:
        layers = [entry["layer"] for entry in model["layers"]]
        axes.plot(layers, [entry["score"] for entry in model["layers"]], "o-", label=model["label"])
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("layer (0 = embeddings)")
    axes.set_ylabel("cos(sep, explicit) - cos(control, explicit)")
    axes.set_title(f"{report['token']} against the explicit format, last prompt position (centered)")
    axes.legend()
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path)
    return figure


def format_table(report: dict[str, Any]) -> str:
    """The per-layer scores side by side, then each model's nearest tokens."""
    models = report["models"]
    width = max(12, *(len(model["label"]) + 2 for model in models))
    lines = [
        f"{report['token']} vs the explicit format over {report['prompt_count']} prompts: "
        "mean cos(sep, explicit) - cos(control, explicit), centered, at the last prompt position",
        "layer" + "".join(f"{model['label']:>{width}}" for model in models),
    ]
    for layer in range(len(models[0]["layers"])):
        cells = "".join(
            f"{model['layers'][layer]['score']:>{width}.4f}" if layer < len(model["layers"]) else " " * width
            for model in models
        )
        lines.append(f"{layer:<5}{cells}")
    ranges = {tuple(model["summary_layers"]) for model in models}
    shown = (lambda m: "") if len(ranges) == 1 else (lambda m: " (layers {}-{})".format(*m["summary_layers"]))
    where = "layers {}-{}, ".format(*ranges.pop()) if len(ranges) == 1 else ""
    summaries = ", ".join(f"{model['label']} {model['summary_score']:.4f}{shown(model)}" for model in models)
    lines.append(f"summary score (mean over {where}the upper half of the blocks): {summaries}")
    for model in models:
        nearest = ", ".join(f"{entry['token']} {entry['cosine']:.2f}" for entry in model["nearest_tokens"])
        lines.append(f"nearest to {report['token']} in {model['label']}: {nearest}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser()
    try:
        options, positionals = parser.parse_args_into_dataclasses(argv)
    except ValueError as error:
        print(f"delia probe: error: {error}", file=sys.stderr)
        return 2
    from ..runtime import quiet_progress_bars

    try:
        with quiet_progress_bars():  # the table is the output; an error is the one line on stderr
            report = run_probe(
                positionals.models,
                base=options.base,
                prompts=options.prompts,
                limit=options.limit,
                token=options.token,
                explicit=options.explicit,
                output_dir=options.output,
                batch_size=options.batch_size,
                quantization=options.quantization,
                cpu_threads=options.cpu_threads,
                overwrite=options.overwrite,
            )
    except (ValueError, OSError) as error:
        print(f"delia probe: error: {error}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(
        f"report: {os.path.join(options.output, PROBE_REPORT_FILE)}, plot: {os.path.join(options.output, PROBE_PLOT_FILE)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
