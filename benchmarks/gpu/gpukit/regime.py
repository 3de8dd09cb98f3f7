"""Phase regime: the paper's regime on a real model, SmolLM2-135M-Instruct, fitted to the time left.

The model self-samples a diverse cache from the 112 bundled general queries that delia eval does not hold out, several
samples each, aiming at ratio x downstream rows (260 x 100 = 26,000: the paper's 26k-row mixture). DELIA trains at
ratio 260 for ONE epoch (each downstream row seen once) and plain SFT for 1 and 3 epochs, with the original recipe's
learning rate and schedule (2e-4, constant with 25 warmup steps, 64 rows per optimizer step), LoRA + a trainable
`<sep>`. The base model and each run are evaluated with `delia eval` (format, label accuracy, DO-NOT contrast,
general NLL) and probed (`delia probe`). Whatever does not fit is cut and said so: a smaller cache (the mixture then
draws its remainder with replacement), training stopped at the deadline, later runs skipped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .common import (
    EVAL_ROWS,
    HELD_OUT,
    TRAIN_ROWS,
    cache_queries,
    ceil_div,
    empty_cache,
    load_kwargs,
    read_jsonl,
    write_jsonl,
)
from .report import PhaseContext
from .staged import prepare_model
from .training import Deadline, config, losses, quiet

SUMMARY_KEYS = (
    "parse_rate",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "answered_labels",
    "dict_rate_follow",
    "dict_rate_do_not",
    "sensitivity",
    "general_nll",
)


def model_path(ctx: PhaseContext) -> str:
    """The real model (staged, converted once) on the GPU; delia.tiny's ChatML model on the dry run."""
    if ctx.dry_run:
        from delia.tiny import save_tiny_model

        return str(save_tiny_model(ctx.workdir / "tiny-chatml", "chatml"))
    return prepare_model(Path(ctx.shared["staged"]))


def self_sample(ctx: PhaseContext, path: str, queries: Path, cache: Path, deadline: float) -> dict[str, Any]:
    """Answer every query `samples` times, doubling the samples while the measured rate says the next round fits."""
    from delia import build_cache, setup_tokenizer_and_model

    sizes = ctx.sizes
    tokenizer, model = setup_tokenizer_and_model(
        path, quantization=None, dtype=sizes.dtype, new_tokens=(), model_kwargs=load_kwargs(ctx.device)
    )
    count = len(read_jsonl(queries))
    target = int(sizes.regime_ratio * sizes.regime_train_rows)
    needed = ceil_div(target, count)
    plan = sorted({min(s, needed) for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)})
    done, rate, tokens, seconds = 0, None, 0, 0.0
    for samples in plan:
        if rate and (samples - done) * count / rate > deadline - time.monotonic():
            ctx.cut(
                f"self-sampling stopped at {done} samples per query of {needed} ({done * count} of {target} "
                f"rows asked for; the mixture draws the rest with replacement)"
            )
            break
        result = build_cache(
            model,
            str(queries),
            str(cache),
            tokenizer=tokenizer,
            backend="transformers",
            samples_per_query=samples,
            max_new_tokens=sizes.regime_cache_new_tokens,
            batch_size=sizes.regime_gen_batch,
            seed=0,
            progress=False,
        )
        counts = result.counts()
        tokens, seconds = tokens + counts["tokens"], seconds + counts["seconds"]
        rate = max(counts["written"] + counts["dropped_degenerate"], 1) / max(counts["seconds"], 1e-3)
        done = samples
    del model
    empty_cache()
    rows = len(read_jsonl(cache))
    ctx.metric("cache_rows", rows)
    if rows < target:
        ctx.cut(
            f"cache: {rows} self-sampled rows for the {target} diverse rows asked for (degenerate replies dropped, "
            "or sampling cut); the mixture draws the remainder with replacement"
        )
    return {
        "rows": rows,
        "target_rows": target,
        "samples_per_query": done,
        "queries": count,
        "tokens": tokens,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / max(seconds, 1e-3)),
    }


def train_run(
    ctx: PhaseContext, path: str, name: str, data: dict[str, str], ratio: float, epochs: float, deadline: float
) -> dict[str, Any]:
    from delia import DSFTTrainer, get_peft_config, setup_tokenizer_and_model

    sizes, run_dir = ctx.sizes, ctx.workdir / "regime" / name
    tokenizer, model = setup_tokenizer_and_model(
        path, quantization=None, dtype=sizes.dtype, model_kwargs=load_kwargs(ctx.device)
    )
    stop = Deadline(deadline)
    args = config(
        str(run_dir),
        ctx.dry_run,
        num_train_epochs=epochs,
        learning_rate=2e-4,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=25,
        weight_decay=0.01,
        per_device_train_batch_size=sizes.regime_batch,
        gradient_accumulation_steps=sizes.regime_accumulation,
        max_length=1024,
        logging_steps=5,
        diverse_dataset=data["cache"] if ratio else None,
        diverse_ratio=ratio,
    )
    trainer = quiet(
        DSFTTrainer(
            model=model,
            args=args,
            train_dataset=data["train"],
            processing_class=tokenizer,
            peft_config=get_peft_config(),
            callbacks=[stop],
        )
    )
    started = time.perf_counter()
    trainer.train()
    trainer.save_model()
    planned = trainer.state.max_steps
    if stop.stopped_at is not None and stop.stopped_at < planned:
        ctx.cut(f"{name}: training stopped at the deadline after {stop.stopped_at} of {planned} optimizer steps")
    sources = {k: v.get("rows") for k, v in getattr(trainer, "mixture", {}).get("sources", {}).items()}
    result = {
        "run_dir": str(run_dir),
        "steps": trainer.state.global_step,
        "planned_steps": planned,
        "rows": sources,
        "train_s": round(time.perf_counter() - started, 1),
        "loss_first_last": [losses(trainer)[0], losses(trainer)[-1]] if losses(trainer) else None,
    }
    del trainer, model
    empty_cache()
    return result


def eval_target(ctx: PhaseContext, name: str, target: str, data: dict[str, str]) -> dict[str, Any]:
    from delia import evaluate

    sizes = ctx.sizes
    report = evaluate(
        target,
        output=str(ctx.workdir / "regime" / f"eval-{name}"),
        eval_dataset=str(EVAL_ROWS),
        train_dataset=data["train"],
        limit=sizes.regime_eval_limit,
        max_new_tokens=sizes.regime_eval_new_tokens,
        batch_size=64,
        general_queries=data["general"],
    )
    summary = {key: report["summary"].get(key) for key in SUMMARY_KEYS}
    ctx.metric(f"eval {name}", summary)
    return summary


def probe(ctx: PhaseContext, path: str, runs: dict[str, str]) -> dict[str, Any]:
    from delia import run_probe

    report = run_probe(
        [path, *runs.values()],
        base=path,
        prompts=str(EVAL_ROWS),
        limit=ctx.sizes.regime_probe_limit,
        output_dir=str(ctx.workdir / "regime" / "probe"),
        overwrite=True,  # a rerun of the phase replaces its own probe
    )
    scores = {}
    for label, model in zip(["base", *runs], report["models"], strict=True):
        layers = [layer["score"] for layer in model["layers"]]
        scores[label] = {"mean": round(sum(layers) / len(layers), 4), "last_layer": round(layers[-1], 4)}
    ctx.metric("probe score (centered)", scores)
    return scores


def run(ctx: PhaseContext) -> None:
    sizes = ctx.sizes
    path = ctx.check("real model ready (staged parts rejoined, converted)", lambda: model_path(ctx))
    if path is None:
        return
    data = {
        "train": str(write_jsonl(ctx.workdir / "regime-train.jsonl", read_jsonl(TRAIN_ROWS, sizes.regime_train_rows))),
        "general": str(
            write_jsonl(ctx.workdir / "regime-general.jsonl", read_jsonl(HELD_OUT, sizes.regime_general_queries))
        ),
        "cache": str(ctx.workdir / "regime-cache.jsonl"),
    }
    queries = cache_queries(ctx.workdir / "regime-queries.jsonl")
    ctx.metric(
        "note",
        f"recipe: lr 2e-4, constant after 25 warmup steps, {sizes.regime_batch} x "
        f"{sizes.regime_accumulation} rows per step, max_length 1024, LoRA r=16 + <sep>; plain SFT over "
        f"{sizes.regime_train_rows} rows takes few steps, all inside the warmup; self-sampled replies of at "
        f"most {sizes.regime_cache_new_tokens} tokens (the paper: 512)",
    )
    ctx.check("delia eval: base model", lambda: eval_target(ctx, "base", path, data))
    generation_deadline = time.monotonic() + sizes.regime_gen_share * ctx.left()
    cached = ctx.check(
        f"self-sample the cache (ratio {sizes.regime_ratio:g} x {sizes.regime_train_rows} rows)",
        lambda: self_sample(ctx, path, queries, Path(data["cache"]), generation_deadline),
    )
    runs: dict[str, str] = {}
    plans = [("delia-260-1ep", sizes.regime_ratio, 1.0), ("sft-1ep", 0.0, 1.0), ("sft-3ep", 0.0, 3.0)]
    for name, ratio, epochs in plans:
        if ratio and not cached:
            ctx.skip(f"train {name}", "no cache")
            continue
        reserve = sizes.regime_reserve_s if ratio else sizes.regime_reserve_s / 4
        if ctx.fits(reserve / 4, f"train {name}"):
            trained = ctx.check(
                f"train {name} (ratio {ratio:g}, {epochs:g} epoch(s), lr 2e-4, batch 64)",
                lambda r=ratio, e=epochs, n=name, s=reserve: train_run(ctx, path, n, data, r, e, ctx.deadline - s),
            )
            if trained:
                runs[name] = trained["run_dir"]
    for name, run_dir in runs.items():
        if ctx.fits(10, f"delia eval {name}"):
            ctx.check(f"delia eval: {name}", lambda n=name, d=run_dir: eval_target(ctx, n, d, data))
    if runs and ctx.fits(10, "delia probe"):
        ctx.check("delia probe: base and runs", lambda: probe(ctx, path, runs))
