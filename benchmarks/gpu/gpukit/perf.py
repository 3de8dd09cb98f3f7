"""Phase perf: delia's training and self-sampling speed on the GPU, against the ceilings env measured.

1. DSFTTrainer against TRL's SFTTrainer, step time on identical rows (the same mixture, same model, same seed), in
   alternating rounds; goal: ratio <= 1.02.
2. Training throughput (tokens/s, model-FLOPs utilisation against the measured bf16 peak, peak memory) at the
   original recipe's batch shape (16 rows x 4 accumulation): bf16 LoRA on the ~1B model, QLoRA (NF4) on a model of
   Llama-2-7B's shape.
3. `build_cache` generation tokens/s at batch 1 against the memory-bandwidth roofline (weight bytes / measured copy
   bandwidth per decode step; goal >= 50%), at larger batches, and a static-cache (compiled on the GPU) variant.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .common import (
    QUERIES,
    SHAPES,
    TRAIN_ROWS,
    build_random_llama,
    empty_cache,
    load_kwargs,
    long_text_rows,
    median,
    peak_memory_gib,
    read_jsonl,
    synchronize,
    train_flops_per_token,
    write_jsonl,
)
from .env import copy_gbs, matmul_tflops
from .report import PhaseContext
from .training import StepTimer, config, losses, quiet


def peaks(ctx: PhaseContext) -> tuple[float, float]:
    """The bf16 TFLOP/s and copy GB/s ceilings: env's (this call or an earlier one), else measured now."""
    if "peak_tflops" not in ctx.shared:
        ctx.shared["peak_tflops"] = matmul_tflops(ctx.sizes.matmul_n, ctx.device)["tflops"]
    if "peak_gbs" not in ctx.shared:
        ctx.shared["peak_gbs"] = copy_gbs(ctx.sizes.copy_mib, ctx.device)["gbs"]
    return ctx.shared["peak_tflops"], ctx.shared["peak_gbs"]


def small_model(ctx: PhaseContext) -> str:
    folder = ctx.shared.get("small_model_folder")
    if not folder:
        folder = str(ctx.workdir / f"random-{ctx.sizes.small_model}")
        build_random_llama(Path(folder), ctx.sizes.small_model, ctx.device, ctx.sizes.dtype)
        ctx.shared["small_model_folder"] = folder
    return folder


def load(ctx: PhaseContext, folder: str, quantization: str | None = None, new_tokens: tuple = ("<sep>",)):
    from delia import setup_tokenizer_and_model

    return setup_tokenizer_and_model(
        folder,
        quantization=quantization,
        dtype=ctx.sizes.dtype,
        attn_implementation="sdpa",
        new_tokens=new_tokens,
        model_kwargs=load_kwargs(ctx.device) if quantization is None else None,
    )


# ----------------------------------------------------------------------------------------------------------------------
# 1. DSFTTrainer against SFTTrainer


def overhead(ctx: PhaseContext) -> dict[str, Any]:
    from trl import SFTTrainer

    from delia import DSFTTrainer, get_peft_config, mix_datasets
    from delia.utils import expose_trainable_token_lm_head_bias

    sizes, folder = ctx.sizes, small_model(ctx)
    train = write_jsonl(ctx.workdir / "perf-train.jsonl", read_jsonl(TRAIN_ROWS))
    ratio = max(1, -(-(sizes.overhead_steps * sizes.cuda_batch) // 129))
    mixed = mix_datasets(str(train), str(QUERIES), ratio=ratio, seed=0)
    shared = dict(
        max_steps=sizes.overhead_steps,
        per_device_train_batch_size=sizes.cuda_batch,
        max_length=512,
        train_sampling_strategy="sequential",
    )
    times: dict[str, list[float]] = {"SFT": [], "DSFT": []}
    rows, loss_gap = {}, 0.0
    for round_index in range(sizes.overhead_rounds):
        order = ("SFT", "DSFT") if round_index % 2 == 0 else ("DSFT", "SFT")
        round_losses = {}
        for name in order:
            tokenizer, model = load(ctx, folder)
            timer, out = StepTimer(), str(ctx.workdir / f"perf-{name}")
            if name == "SFT":
                trainer = SFTTrainer(
                    model=model,
                    args=config(out, ctx.dry_run, plain_sft=True, **shared),
                    train_dataset=mixed,
                    processing_class=tokenizer,
                    peft_config=get_peft_config(model=model),
                    callbacks=[timer],
                )
                # TRL's fused LM head reads a `bias` that peft's wrapper of the trainable <sep> rows lacks;
                # DSFTTrainer applies this fix itself, plain SFTTrainer needs it by hand
                expose_trainable_token_lm_head_bias(trainer.model)
            else:
                trainer = DSFTTrainer(
                    model=model,
                    args=config(out, ctx.dry_run, diverse_dataset=str(QUERIES), diverse_ratio=ratio, **shared),
                    train_dataset=str(train),
                    processing_class=tokenizer,
                    peft_config=get_peft_config(),
                    callbacks=[timer],
                )
            quiet(trainer).train()
            times[name] += timer.steps()[sizes.overhead_warmup :]
            round_losses[name] = losses(trainer)
            rows.setdefault(name, [list(r) for r in trainer.train_dataset["input_ids"][:64]])
            del trainer, model
            empty_cache()
        loss_gap = max(
            [loss_gap] + [abs(a - b) for a, b in zip(round_losses["SFT"], round_losses["DSFT"], strict=False)]
        )
    if rows["SFT"] != rows["DSFT"]:
        raise RuntimeError("SFTTrainer and DSFTTrainer prepared different rows: the comparison would mean nothing")
    sft, dsft = median(times["SFT"]), median(times["DSFT"])
    ctx.metric("dsft_over_sft_step_time", dsft / sft)
    return {
        "ratio": round(dsft / sft, 4),
        "goal": "<= 1.02",
        "median_step_s": {"SFT": round(sft, 4), "DSFT": round(dsft, 4)},
        "steps_timed": len(times["SFT"]),
        "max_loss_difference": loss_gap,
        "mixture_ratio": ratio,
    }


# ----------------------------------------------------------------------------------------------------------------------
# 2. Training throughput


def throughput(ctx: PhaseContext, folder: str, shape_name: str, quantization: str | None, seq: int) -> dict[str, Any]:
    from delia import DSFTTrainer, get_peft_config

    sizes = ctx.sizes
    rows = sizes.batch * sizes.accumulation * sizes.throughput_steps
    text = long_text_rows(rows, words=2 * seq, seed=1)
    train = write_jsonl(ctx.workdir / f"tp-{shape_name}-train.jsonl", text[: rows // 2])
    diverse = write_jsonl(ctx.workdir / f"tp-{shape_name}-diverse.jsonl", text[rows // 2 :])
    peak_memory_gib(reset=True)
    load_start = time.perf_counter()
    tokenizer, model = load(ctx, folder, quantization)
    load_s = time.perf_counter() - load_start
    timer = StepTimer()
    args = config(
        str(ctx.workdir / f"tp-{shape_name}"),
        ctx.dry_run,
        max_steps=sizes.throughput_steps,
        per_device_train_batch_size=sizes.batch,
        gradient_accumulation_steps=sizes.accumulation,
        max_length=seq,
        gradient_checkpointing=not ctx.dry_run,
        diverse_dataset=str(diverse),
        diverse_ratio=1.0,
    )
    trainer = quiet(
        DSFTTrainer(
            model=model,
            args=args,
            train_dataset=str(train),
            processing_class=tokenizer,
            peft_config=get_peft_config(),
            callbacks=[timer],
        )
    )
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainer.train()
    steps = timer.steps()[1:]
    tokens_per_step = sizes.batch * sizes.accumulation * min(seq, median(lengths))
    tokens_s = tokens_per_step / median(steps)
    peak_tflops, _ = peaks(ctx)
    mfu = tokens_s * train_flops_per_token(SHAPES[shape_name], seq) / (peak_tflops * 1e12)
    del trainer, model
    empty_cache()
    return {
        "tokens_per_s": round(tokens_s),
        "mfu": round(mfu, 4),
        "step_s": round(median(steps), 3),
        "batch": f"{sizes.batch} x {sizes.accumulation} x {seq} tokens",
        "peak_gib": peak_memory_gib(),
        "load_s": round(load_s, 1),
        "shortest_row_tokens": min(lengths),
    }


# ----------------------------------------------------------------------------------------------------------------------
# 3. Generation


def decode(ctx: PhaseContext) -> dict[str, Any]:
    from delia import build_cache

    sizes, (_, gbs) = ctx.sizes, peaks(ctx)
    tokenizer, model = load(ctx, small_model(ctx), new_tokens=())
    embedding = model.get_input_embeddings().weight
    weight_bytes = (
        sum(p.numel() * p.element_size() for p in model.parameters()) - embedding.numel() * embedding.element_size()
    )
    roofline = gbs * 1e9 / weight_bytes  # decode steps per second at batch 1 if each step read the weights once
    results: dict[str, Any] = {
        "weight_gb": round(weight_bytes / 1e9, 3),
        "roofline_tokens_per_s_batch1": round(roofline),
    }

    def cache_rate(batch: int, queries: int) -> float:
        out = ctx.workdir / f"decode-{batch}.jsonl"
        result = build_cache(
            model,
            str(QUERIES),
            str(out),
            tokenizer=tokenizer,
            backend="transformers",
            batch_size=batch,
            limit=min(queries, 240),
            samples_per_query=-(-queries // 240),
            max_new_tokens=sizes.decode_tokens,
            min_new_tokens=sizes.decode_tokens,
            keep_degenerate=True,
            overwrite=True,
            resume=False,
            progress=False,
        )
        return result.tokens / result.seconds

    results["batch1_tokens_per_s"] = round(cache_rate(1, sizes.decode_batch1_queries), 1)
    results["batch1_fraction_of_roofline"] = round(results["batch1_tokens_per_s"] / roofline, 4)
    ctx.metric("decode_batch1_fraction_of_roofline", results["batch1_fraction_of_roofline"])
    by_batch = {}
    for batch in sizes.decode_batches:
        if ctx.fits(15, f"build_cache at batch {batch}"):
            by_batch[batch] = round(cache_rate(batch, batch), 1)
    if by_batch:
        best = max(by_batch, key=by_batch.get)
        results.update(tokens_per_s_by_batch=by_batch, best_batch=best)
        ctx.metric("decode_best_batch_tokens_per_s", by_batch[best])
    ctx.shared["decode_model"] = (tokenizer, model, roofline)
    return results


def static_variant(ctx: PhaseContext) -> dict[str, Any]:
    """model.generate at batch 1: the default dynamic cache against a static cache (compiled on the GPU)."""
    import torch

    tokenizer, model, roofline = ctx.shared.pop("decode_model")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": read_jsonl(QUERIES, 1)[0]["messages"][0]["content"]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt = {k: v.to(model.device) for k, v in prompt.items()}
    tokens = ctx.sizes.decode_tokens
    options = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    rates = {}
    variants = {"dynamic": {}, "static": {"cache_implementation": "static"}}
    if not ctx.sizes.compile_variant:
        variants["static"]["disable_compile"] = True
    for name, extra in variants.items():
        with torch.inference_mode():
            model.generate(**prompt, **options, **extra)  # warm-up (the static variant compiles here)
            synchronize()
            start = time.perf_counter()
            model.generate(**prompt, **options, **extra)
            synchronize()
        rates[name] = tokens / (time.perf_counter() - start)
    del model
    empty_cache()
    return {
        "tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
        "compiled": ctx.sizes.compile_variant,
        "static_fraction_of_roofline": round(rates["static"] / roofline, 4),
        "pays": rates["static"] > 1.1 * rates["dynamic"],
    }


def run(ctx: PhaseContext) -> None:
    sizes = ctx.sizes
    ctx.check("peaks (from env, else measured)", lambda: dict(zip(("tflops", "gbs"), peaks(ctx), strict=True)))
    if ctx.fits(40, "DSFTTrainer vs SFTTrainer"):
        ctx.check("DSFTTrainer vs SFTTrainer step time, identical rows", lambda: overhead(ctx))
    if ctx.fits(20, f"bf16 LoRA throughput, {sizes.small_model}"):
        tp = ctx.check(
            f"throughput: bf16 LoRA, {sizes.small_model}",
            lambda: throughput(ctx, small_model(ctx), sizes.small_model, None, sizes.seq_1b),
        )
        if tp:
            ctx.metric(f"lora_bf16_{sizes.small_model}_tokens_per_s", tp["tokens_per_s"])
            ctx.metric(f"lora_bf16_{sizes.small_model}_mfu", tp["mfu"])
    if ctx.fits(25, "build_cache decode"):
        ctx.check("build_cache decode: batch 1 vs roofline, larger batches", lambda: decode(ctx))
    big = ctx.workdir / f"random-{sizes.big_model}"
    quantization = "4bit" if ctx.device == "cuda" else None
    if ctx.fits(100, f"QLoRA throughput, {sizes.big_model}"):
        built = ctx.check(
            f"build random {sizes.big_model} Llama on the device, save",
            lambda: build_random_llama(big, sizes.big_model, ctx.device, ctx.sizes.dtype),
        )
        if built:
            label = "QLoRA (NF4)" if quantization else "LoRA (no CUDA: unquantized)"
            tp = ctx.check(
                f"throughput: {label}, {sizes.big_model}",
                lambda: throughput(ctx, str(big), sizes.big_model, quantization, sizes.seq_7b),
            )
            if tp:
                ctx.metric(f"qlora_{sizes.big_model}_tokens_per_s", tp["tokens_per_s"])
                ctx.metric(f"qlora_{sizes.big_model}_mfu", tp["mfu"])
    if "decode_model" in ctx.shared and ctx.fits(60 if sizes.compile_variant else 5, "static-cache variant"):
        ctx.check(
            "generate at batch 1: dynamic vs static cache" + (" (compiled)" if sizes.compile_variant else ""),
            lambda: static_variant(ctx),
        )
    ctx.shared.pop("decode_model", None)
    empty_cache()
