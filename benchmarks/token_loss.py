"""
Tracked-token loss: `track_tokens` (delia.token_loss) against the original DELIA code's approach.

The original (a CustomSFTTrainer.compute_loss, re-implemented here from its description) took the full logits of each
eval batch and, for every row, kept the unpadded positions, decoded every token alone with `tokenizer.decode`, and for
each token whose text contains `'` or `<sep>` computed a cross-entropy from the logits one position earlier against
`labels[j]`, one token at a time on the CPU. Two things go wrong there besides speed: `labels` is indexed with the
position among the *unpadded* tokens, which is the right one only under right padding, and prompt tokens have label
-100, so every prompt occurrence (every `<sep>`) is NaN.

The tracker gets the same token ids (every id whose decoded text contains `'` or `<sep>`) and scores, on the same
batches, each occurrence from what the eval forward leaves: the fused LM head's log-probs where it scored the token
(completion), else the backbone's last hidden state one position earlier through the LM head (prompt). Checked against the exact value from the full logits (log_softmax at every position), under
right and left padding; the original is compared where it is right (right padding, completion tokens).

Timings, side by side in one run (the machine may be shared, so: interleaved, and medians):
  - `trainer.evaluate()` on the same trainer with the tracker on and off, alternating, several repeats: the share
    of evaluation time tracking adds;
  - per eval batch, what each approach adds to an evaluation on TRL 1.16: the original needs the full logits, which
    the eval forward no longer builds (TRL's fused LM head), so a second, full-logits forward (what
    `compute_loss(..., return_outputs=True)` runs there), then its loops; the tracker needs only its own computation.
    The loops alone are printed against the tracker too. `speedup=` (last line) is the first ratio. Each batch is
    timed `--repeats` times and its fastest run kept (other jobs only ever add time); the figure is the median over
    batches.

    python benchmarks/token_loss.py                     # 16 x ~250 tokens, tiny Llama 128 x 2, vocabulary 1024
    python benchmarks/token_loss.py --hidden-size 256 --layers 4 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from harness import BUNDLED_EVAL_JUDGEMENTS, BUNDLED_JUDGEMENTS, announce_delia, quiet, read_jsonl, timed
from lockstep import without_printer

from delia import DSFTConfig, DSFTTrainer, add_new_tokens
from delia.tiny import build_tiny_model, build_tiny_tokenizer
from delia.token_loss import backbone_of, known_log_probs, output_logits_fn, tracked_token_nll, valid_targets

TRACKED_TEXT = ("'", "<sep>")  # what the original looked for in each decoded token


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15, help="evaluate() runs per side; loop timings per batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# The original approach, as described above


def original_token_losses(logits, batch, tokenizer):
    """Per-token decode in nested Python loops; a list of {"token", "loss"}, row by row, position by position."""
    records = []
    for i in range(batch["input_ids"].shape[0]):
        sample_input_ids = batch["input_ids"][i]
        sample_attention_mask = batch["attention_mask"][i]
        sample_labels = batch["labels"][i]
        valid_logits = logits[i][sample_attention_mask.bool()]
        valid_tokens = sample_input_ids[sample_attention_mask.bool()]
        for j, token in enumerate(valid_tokens):
            token_str = tokenizer.decode([token.item()])
            if any(text in token_str for text in TRACKED_TEXT):
                logit = (valid_logits[j - 1] if j > 0 else valid_logits[j]).detach().cpu()
                label = sample_labels[j].item()
                loss = F.cross_entropy(logit.unsqueeze(0), torch.tensor([label]))
                records.append({"token": token_str, "loss": loss.item()})
    return records


# ----------------------------------------------------------------------------------------------------------------------
# Data, model, trainer, and the three computations compared


class Bench:
    """A tiny model in a DSFTTrainer that tracks every token whose text contains ' or <sep>, and its eval batches."""

    def __init__(self, args: argparse.Namespace, workdir: str):
        rows = read_jsonl(BUNDLED_JUDGEMENTS, BUNDLED_EVAL_JUDGEMENTS)
        texts = [message["content"] for row in rows for message in row["messages"]]
        self.tokenizer = tokenizer = build_tiny_tokenizer("llama2", vocab_size=args.vocab_size, texts=texts)
        model = build_tiny_model(
            tokenizer, hidden_size=args.hidden_size, num_hidden_layers=args.layers, tie_word_embeddings=False
        )
        add_new_tokens(tokenizer, model, ["<sep>"])
        self.tracked_ids = [
            i for i in range(len(tokenizer)) if any(text in tokenizer.decode([i]) for text in TRACKED_TEXT)
        ]
        config = DSFTConfig(
            output_dir=workdir,
            per_device_eval_batch_size=args.batch_size,
            max_length=args.max_length,
            report_to="none",
            disable_tqdm=True,
            track_tokens=self.tracked_ids,
            dataloader_num_workers=0,
        )
        self.trainer = without_printer(
            DSFTTrainer(
                model=model,
                args=config,
                train_dataset=Dataset.from_list(rows),
                eval_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
            )
        )
        self.model = self.trainer.model.eval()
        self.batches = [
            {k: v for k, v in batch.items() if torch.is_tensor(v)} for batch in self.trainer.get_eval_dataloader()
        ]
        self.token_ids = torch.tensor(self.tracked_ids)
        self.logits_fn = output_logits_fn(self.model)

    def left_padded(self, batch):
        """The same rows with their padding moved to the left."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        moved = {}
        for key, pad in (("input_ids", self.tokenizer.pad_token_id), ("attention_mask", 0), ("labels", -100)):
            moved[key] = torch.full_like(batch[key], pad)
            for row, length in enumerate(lengths):
                moved[key][row, -length:] = batch[key][row, :length]
        return moved

    def eval_forward(self, batch):
        """What the trainer's eval forward leaves the tracker: the backbone's last hidden states and the fused log-probs."""
        caught = []
        hook = backbone_of(self.model).register_forward_hook(
            lambda module, a, out: caught.append(out.last_hidden_state)
        )
        with torch.no_grad():
            output = self.model(**batch, fused_lm_head=True)
        hook.remove()
        return caught[0], known_log_probs(output, batch["input_ids"], batch["labels"])

    def logits_forward(self, batch):
        """A plain forward with the full logits: the reference here, and the second forward the original needs."""
        with torch.no_grad():
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def tracker_nll(self, hidden, known, batch):
        """The tracker's computation on one batch: (rows, target positions, ids, negative log-likelihoods)."""
        valid = valid_targets(batch["input_ids"], batch["attention_mask"])
        with torch.no_grad():
            return tracked_token_nll(hidden, batch["input_ids"], self.token_ids, valid, self.logits_fn, known)


# ----------------------------------------------------------------------------------------------------------------------
# Agreement on the same batches


def check_agreement(args: argparse.Namespace, bench: Bench) -> None:
    """Tracker and original against the exact full-logits value, right and left padding; prints three lines."""
    counts = {"occurrences": 0, "reused": 0, "original_scored": 0, "original_nan": 0, "left_wrong": 0}
    worst = {"tracker": 0.0, "original": 0.0}
    for batch in bench.batches:
        for side, padded in (("right", batch), ("left", bench.left_padded(batch))):
            (hidden, known), logits = bench.eval_forward(padded), bench.logits_forward(padded)
            rows_, targets, _, nll = bench.tracker_nll(hidden, known, padded)
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            exact = -log_probs[rows_, targets - 1, padded["input_ids"][rows_, targets]]
            worst["tracker"] = max(worst["tracker"], (nll.double() - exact).abs().max().item())
            original = original_token_losses(logits, padded, bench.tokenizer)
            # the original also looks at the first real token of a row (<s> here, never tracked): the same occurrences
            assert len(original) == len(nll), (len(original), len(nll))
            losses = torch.tensor([record["loss"] for record in original], dtype=torch.float64)
            if side == "right":
                counts["occurrences"] += len(nll)
                counts["reused"] += int(known[1][rows_, targets - 1].sum())
                scored = padded["labels"][rows_, targets] != -100  # where the original is right
                counts["original_scored"] += int(scored.sum())
                counts["original_nan"] += int(losses.isnan().sum())
                assert torch.equal(losses.isnan(), ~scored)
                worst["original"] = max(worst["original"], (losses[scored] - exact[scored]).abs().max().item())
            else:
                counts["left_wrong"] += int((~torch.isclose(losses, exact, rtol=1e-4, atol=1e-4)).sum())
    sep = bench.tokenizer.convert_tokens_to_ids("<sep>")
    sep_count = sum(int((batch["input_ids"] == sep).sum()) for batch in bench.batches)
    if worst["tracker"] > 1e-4 or worst["original"] > 1e-4:
        raise SystemExit(f"FAIL: disagreement {worst}")
    report_agreement(args, bench, counts, worst, sep_count)


def report_agreement(args: argparse.Namespace, bench: Bench, counts: dict, worst: dict, sep_count: int) -> None:
    """The three agreement lines."""
    lengths = [batch["input_ids"].shape[1] for batch in bench.batches]
    print(
        f"{len(bench.batches)} eval batches of {args.batch_size} rows x {min(lengths)}-{max(lengths)} tokens "
        f"(tiny Llama {args.hidden_size} x {args.layers}, vocabulary {len(bench.tokenizer)}); tracked: "
        f"{len(bench.tracked_ids)} ids whose text contains ' or <sep>"
    )
    print(
        f"right padding: {counts['occurrences']} occurrences ({counts['reused']} read from the eval forward's fused "
        f"log-probs, the rest projected); the tracker equals the full-logits value at all of them "
        f"(max |diff| {worst['tracker']:.1e}, left padding included); the original agrees at the "
        f"{counts['original_scored']} it can score (completion tokens, max |diff| {worst['original']:.1e}) and gives "
        f"NaN at the other {counts['original_nan']} (prompt tokens, among them all {sep_count} <sep>)"
    )
    print(
        f"left padding: the original is wrong or NaN at {counts['left_wrong']} of {counts['occurrences']} occurrences "
        f"(labels indexed by the position among unpadded tokens)"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Costs


def per_batch_ms(args: argparse.Namespace, bench: Bench) -> tuple[float, float, float]:
    """(full-logits forward, original loops, tracker) in ms: median over batches of each batch's fastest run.

    The three are timed in turn, `--repeats` times per batch; other jobs on a shared machine only ever add time.
    """
    original_times, tracker_times, forward_times = [], [], []
    for batch in bench.batches:
        (hidden, known), logits = bench.eval_forward(batch), bench.logits_forward(batch)
        runs = [
            (
                timed(bench.logits_forward, batch)[1],
                timed(original_token_losses, logits, batch, bench.tokenizer)[1],
                timed(bench.tracker_nll, hidden, known, batch)[1],
            )
            for _ in range(args.repeats)
        ]
        forward_times.append(min(run[0] for run in runs))
        original_times.append(min(run[1] for run in runs))
        tracker_times.append(min(run[2] for run in runs))
    return tuple(1e3 * statistics.median(times) for times in (forward_times, original_times, tracker_times))


def evaluate_seconds(args: argparse.Namespace, bench: Bench, workdir: str) -> dict[str, list[float]]:
    """evaluate() with the tracker on and off, on the same trainer, alternating; seconds of each run per side."""
    trainer, tokenizer = bench.trainer, bench.tokenizer
    sep = tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids("<sep>"))
    tracker = trainer._token_loss
    seconds = {"off": [], "on": []}
    trainer.evaluate()  # warm-up
    for repeat in range(args.repeats):
        for side in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
            trainer._token_loss = tracker if side == "on" else None
            start = time.perf_counter()
            metrics = trainer.evaluate()
            seconds[side].append(time.perf_counter() - start)
            assert (f"eval_token_loss/{sep}" in metrics) == (side == "on")
    lines = (Path(workdir) / "token_loss.jsonl").read_text().splitlines()
    assert len(lines) == args.repeats + 1, len(lines)
    return seconds


def main(argv: list[str] | None = None) -> None:
    """Agreement first, then the costs; `speedup=` last."""
    args = parse_arguments(argv)
    quiet(args.threads)
    announce_delia()
    with tempfile.TemporaryDirectory() as workdir:
        bench = Bench(args, workdir)
        check_agreement(args, bench)
        forward_ms, original_ms, tracker_ms = per_batch_ms(args, bench)
        seconds = evaluate_seconds(args, bench, workdir)
    batches = len(bench.batches)
    off, on = statistics.median(seconds["off"]), statistics.median(seconds["on"])
    best_off, best_on = min(seconds["off"]), min(seconds["on"])
    paired = statistics.median(on_s / off_s for on_s, off_s in zip(seconds["on"], seconds["off"], strict=True))
    print(
        f"evaluate() over {batches} batches, median of {args.repeats}: without tracking {off:.3f} s, with "
        f"{on:.3f} s: tracking adds {100 * (on - off) / off:+.1f}% of evaluation time "
        f"(median of paired ratios {100 * (paired - 1):+.1f}%, fastest runs {100 * (best_on - best_off) / best_off:+.1f}%; "
        f"the tracker's own computation, {batches} x {tracker_ms:.2f} ms, is "
        f"{100 * batches * tracker_ms / 1e3 / off:.1f}% of it)"
    )
    print(
        f"per eval batch (median): the original's approach costs {forward_ms + original_ms:.1f} ms on TRL 1.16 (a "
        f"full-logits forward, {forward_ms:.1f} ms, since the eval forward no longer builds logits; then its loops, "
        f"{original_ms:.1f} ms); the tracker {tracker_ms:.2f} ms"
    )
    print(f"loops alone against the tracker: {original_ms / tracker_ms:.0f}x")
    print(f"speedup={(forward_ms + original_ms) / tracker_ms:.0f}x")


if __name__ == "__main__":
    main()
