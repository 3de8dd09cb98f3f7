"""Phase cuda: is delia's CUDA path correct? A random ~1B Llama through bf16, 8-bit and 4-bit training and back.

For each quantization: `setup_tokenizer_and_model` (8-bit is LLM.int8 as in the original; 4-bit is NF4 with double
quantization and bf16 compute), LoRA with a trainable `<sep>`, DSFTTrainer steps with a diverse cache mixed in and the
loss of each source logged, the adapter saved, reloaded on a fresh base and giving the same eval loss. Then
`build_cache` with the transformers backend on the GPU, and `delia eval` (`evaluate`) on the bf16 run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import (
    EVAL_ROWS,
    QUERIES,
    TRAIN_ROWS,
    build_random_llama,
    empty_cache,
    load_kwargs,
    peak_memory_gib,
    read_jsonl,
    write_jsonl,
)
from .report import PhaseContext
from .training import config, finite, losses, quiet

RELOAD_TOLERANCE = 5e-3  # relative difference of the eval loss after save and reload


def load(ctx: PhaseContext, folder: str, quantization: str) -> tuple[Any, Any]:
    from delia import setup_tokenizer_and_model

    q = None if quantization == "bf16" else quantization
    return setup_tokenizer_and_model(
        folder,
        quantization=q,
        dtype=ctx.sizes.dtype,
        attn_implementation="sdpa",
        model_kwargs=load_kwargs(ctx.device) if q is None else None,
    )


def make_trainer(ctx: PhaseContext, model: Any, tokenizer: Any, run_dir: Path, peft: bool, steps: int) -> Any:
    from delia import DSFTTrainer, get_peft_config

    data = ctx.shared["cuda_data"]
    args = config(
        str(run_dir),
        ctx.dry_run,
        max_steps=steps,
        per_device_train_batch_size=ctx.sizes.cuda_batch,
        per_device_eval_batch_size=ctx.sizes.cuda_batch,
        max_length=512,
        gradient_checkpointing=not ctx.dry_run,
        diverse_dataset=str(QUERIES),
        diverse_ratio=ctx.sizes.cuda_ratio,
        learning_rate=1e-3,
    )
    return quiet(
        DSFTTrainer(
            model=model,
            args=args,
            train_dataset=data["train"],
            eval_dataset=data["eval"],
            processing_class=tokenizer,
            peft_config=get_peft_config() if peft else None,
        )
    )


def train_and_reload(ctx: PhaseContext, folder: str, quantization: str) -> dict[str, Any] | None:
    """One quantization end to end; returns the run folder's details, or None when loading or training failed."""
    run_dir = ctx.workdir / f"cuda-{quantization}"
    peak_memory_gib(reset=True)
    loaded = ctx.check(f"{quantization}: setup_tokenizer_and_model", lambda: load(ctx, folder, quantization))
    if loaded is None:
        return None
    tokenizer, held = loaded[0], {"model": loaded[1]}
    model = held["model"]
    ctx.record["checks"][-1]["details"] = {
        "weight_dtype": str(model.model.layers[0].self_attn.q_proj.weight.dtype),
        "device": str(model.device),
        "footprint_gib": round(model.get_memory_footprint() / 2**30, 2),
        "sep_id": tokenizer.convert_tokens_to_ids("<sep>"),
    }
    del model, loaded

    def train() -> dict[str, Any]:
        trainer = make_trainer(ctx, held.pop("model"), tokenizer, run_dir, peft=True, steps=ctx.sizes.cuda_steps)
        trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
        trainer.train()
        downstream, diverse = losses(trainer, "loss_downstream"), losses(trainer, "loss_diverse")
        if not (finite(losses(trainer)) and finite(downstream) and finite(diverse)):
            raise RuntimeError(f"loss not finite or a source never logged: {trainer.state.log_history[-3:]}")
        if not trainable:
            raise RuntimeError("no trainable <sep> rows (peft trainable_tokens) in the model")
        eval_loss = trainer.evaluate()["eval_loss"]
        trainer.save_model()
        ctx.shared.setdefault("cuda_trainers", {})[quantization] = eval_loss
        return {
            "steps": trainer.state.global_step,
            "loss_first_last": [losses(trainer)[0], losses(trainer)[-1]],
            "loss_downstream_last": downstream[-1],
            "loss_diverse_last": diverse[-1],
            "eval_loss": eval_loss,
            "trainable_sep_params": trainable[:2],
            "peak_gib": peak_memory_gib(),
        }

    trained = ctx.check(
        f"{quantization}: DSFTTrainer {ctx.sizes.cuda_steps} steps, LoRA + <sep>, per-source loss", train
    )
    held.clear()
    empty_cache()
    if trained is None:
        return None

    def reload() -> dict[str, Any]:
        from peft import PeftModel

        tokenizer2, base = load(ctx, folder, quantization)
        model2 = PeftModel.from_pretrained(base, str(run_dir))
        again = make_trainer(ctx, model2, tokenizer2, ctx.workdir / f"cuda-{quantization}-reload", peft=False, steps=1)
        eval_loss = again.evaluate()["eval_loss"]
        difference = abs(eval_loss - trained["eval_loss"]) / abs(trained["eval_loss"])
        if difference > RELOAD_TOLERANCE:
            raise RuntimeError(f"eval loss {trained['eval_loss']:.5f} before saving, {eval_loss:.5f} after reloading")
        files = sorted(p.name for p in run_dir.iterdir())
        return {"eval_loss_reloaded": eval_loss, "relative_difference": difference, "files": files[:8]}

    ctx.check(f"{quantization}: adapter saved, reloaded, same eval loss", reload)
    empty_cache()
    return {"run_dir": str(run_dir)}


def cache_on_device(ctx: PhaseContext, folder: str) -> dict[str, Any]:
    from delia import build_cache

    output = ctx.workdir / "cuda-cache.jsonl"
    result = build_cache(
        folder,
        str(QUERIES),
        str(output),
        backend="transformers",
        dtype=ctx.sizes.dtype,
        limit=ctx.sizes.cache_queries,
        max_new_tokens=ctx.sizes.cache_new_tokens,
        batch_size=16,
        keep_degenerate=True,
        overwrite=True,
        resume=False,
        progress=False,
    )
    counts = result.counts()
    if counts["written"] != ctx.sizes.cache_queries:
        raise RuntimeError(f"{counts['written']} rows written for {ctx.sizes.cache_queries} queries: {counts}")
    meta = json.loads(Path(f"{output}.meta.json").read_text(encoding="utf-8"))
    return {
        **{k: counts[k] for k in ("written", "tokens", "seconds")},
        "backend": result.backend,
        "meta_keys": sorted(meta)[:6],
    }


def eval_run(ctx: PhaseContext, run_dir: str) -> dict[str, Any]:
    from delia import evaluate

    general = write_jsonl(ctx.workdir / "general-small.jsonl", read_jsonl(QUERIES, 8))
    report = evaluate(
        run_dir,
        output=str(ctx.workdir / "cuda-eval"),
        eval_dataset=str(EVAL_ROWS),
        limit=ctx.sizes.eval_limit,
        max_new_tokens=ctx.sizes.eval_new_tokens,
        batch_size=16,
        general_queries=str(general),
        exclude_caches=[],
    )
    summary = report["summary"]
    for key in ("parse_rate", "dict_rate_follow", "dict_rate_do_not", "general_nll"):
        if key not in summary:
            raise RuntimeError(f"the eval report has no {key!r}")
    return {"model": report["model"]["kind"], **{k: summary[k] for k in ("n", "parse_rate", "general_nll")}}


def run(ctx: PhaseContext) -> None:
    folder = ctx.workdir / f"random-{ctx.sizes.small_model}"
    built = ctx.check(
        f"build random {ctx.sizes.small_model} Llama on the device, save",
        lambda: build_random_llama(folder, ctx.sizes.small_model, ctx.device, ctx.sizes.dtype),
    )
    if built is None:
        return
    ctx.shared["small_model_folder"] = str(folder)
    ctx.shared["cuda_data"] = {
        "train": str(write_jsonl(ctx.workdir / "cuda-train.jsonl", read_jsonl(TRAIN_ROWS, 32))),
        "eval": str(write_jsonl(ctx.workdir / "cuda-eval.jsonl", read_jsonl(EVAL_ROWS, 8))),
    }
    runs = {}
    for quantization in ctx.sizes.quantizations:
        if quantization != "bf16" and ctx.device != "cuda":
            ctx.skip(f"{quantization}: quantized loading and training", "skipped: no CUDA (dry run)")
            continue
        if ctx.fits(25, f"{quantization} run"):
            runs[quantization] = train_and_reload(ctx, str(folder), quantization)
    if ctx.fits(10, "build_cache on the device"):
        ctx.check("build_cache, transformers backend, on the device", lambda: cache_on_device(ctx, str(folder)))
    if runs.get("bf16") and ctx.fits(10, "delia eval on the bf16 run"):
        ctx.check("delia eval (evaluate) on the trained bf16 run", lambda: eval_run(ctx, runs["bf16"]["run_dir"]))
