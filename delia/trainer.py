"""`DSFTTrainer`: TRL's `SFTTrainer` with DELIA's diverse mixture and per-source loss logging.

At init it makes one call into the data layer, `delia.data.prepare_datasets`, which reads the downstream rows and the
self-sampled diverse cache and mixes them (or, with nothing to mix, hands the rows over as they are), records the
mixture in `output_dir/delia_mixture.json`, and passes the result to `SFTTrainer`, which tokenises it and builds the
labels. When something was mixed in, the collator is wrapped so each row's `source` reaches `compute_loss`, which adds
per-source NLL and token counts to running sums; `log()` turns them into `loss_downstream` / `loss_diverse` (and
`eval_loss_*`) and resets them. With `track_tokens`, each eval forward
is also watched for the tracked tokens' loss (`delia.token_loss`), logged and appended to token_loss.jsonl.

The mixture's fingerprint (`delia.data.fingerprint`) is computed at init, compared across processes, recorded in
`delia_mixture.json` and in every checkpoint, and checked when training resumes (`delia.integrity`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import pyarrow.compute as pc
from accelerate import PartialState
from datasets import Dataset, IterableDataset
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import get_config_model_id

from .config import DSFTConfig
from .cpu import activation_bytes, available_memory, thread_count, torch_threads
from .data import MixturePlan, PreparedData, prepare_datasets
from .data.fingerprint import mixture_fingerprint
from .integrity import (
    CheckpointRecordCallback,
    check_checkpoint,
    check_same_mixture_on_every_process,
    find_checkpoint,
)
from .io import read_json_or_none, write_json_atomically
from .lora import resolve_trainable_token_modules
from .per_source import SourceLoss, SourceTaggingCollator, source_counts
from .run_files import MIXTURE_FILE, TOKEN_LOSS_FILE
from .token_loss import (
    TokenLossTracker,
    append_record,
    backbone_of,
    token_loss_metrics,
    token_loss_record,
)
from .upstream import (
    add_signature_column,
    expose_trainable_token_lm_head_bias,
    forward_outputs,
    fused_head_output,
    score_label_positions_only,
)

logger = logging.getLogger(__name__)


def _as_dsft_config(model: Any, args: TrainingArguments | None) -> DSFTConfig:
    if isinstance(args, DSFTConfig):
        return args
    if args is None:
        model_name = model if isinstance(model, str) else get_config_model_id(model.config)
        return DSFTConfig(f"{str(model_name).split('/')[-1]}-DSFT")
    dict_args = args.to_dict()
    for key in dict_args:
        if key.endswith("_token"):  # to_dict masks every `*_token` field (hub_token, eos_token, pad_token)
            dict_args[key] = getattr(args, key)
    return DSFTConfig(**dict_args)


def _resolve_aliases(
    model: Any,
    args: TrainingArguments | None,
    processing_class: Any,
    tokenizer: Any,
    diverse_dataset: Any,
    cache_dir: str | None,
    diverse_ratio: float | None,
) -> tuple[DSFTConfig, Any, Any]:
    """The config (a copy when keyword arguments override it: the caller's is never changed), cache and tokenizer."""
    args = _as_dsft_config(model, args)
    if tokenizer is not None:
        warnings.warn(
            "`tokenizer=` is deprecated; pass `processing_class=` instead (as in TRL).", FutureWarning, stacklevel=3
        )
        if processing_class is not None and processing_class is not tokenizer:
            raise ValueError("Pass either `processing_class=` or its deprecated alias `tokenizer=`, not both.")
        processing_class = tokenizer
    if cache_dir is not None:
        if diverse_dataset is not None and diverse_dataset != cache_dir:
            raise ValueError(
                f"Pass either `diverse_dataset=` or its alias `cache_dir=`, not both "
                f"(got {diverse_dataset!r} and {cache_dir!r})."
            )
        diverse_dataset = cache_dir
    if isinstance(diverse_dataset, (str, os.PathLike)) or diverse_ratio is not None:
        args = copy.copy(args)
        if isinstance(diverse_dataset, (str, os.PathLike)):
            args.diverse_dataset = os.fspath(diverse_dataset)
        if diverse_ratio is not None:
            args.diverse_ratio = diverse_ratio
        args.check_delia_fields()
    if diverse_dataset is None:
        diverse_dataset = args.diverse_dataset
    return args, diverse_dataset, processing_class


class DSFTTrainer(SFTTrainer):
    """Supervised fine-tuning with a self-sampled diverse mixture (DELIA, arXiv 2408.10841).

    Takes everything `SFTTrainer` takes, plus:

    Args:
        diverse_dataset (`str`, `Dataset`, *optional*):
            The diverse cache (JSONL path, saved dataset folder, hub name or Dataset). Overrides `args.diverse_dataset`.
        diverse_ratio (`float`, *optional*):
            Diverse rows per downstream row. Overrides `args.diverse_ratio`.
        cache_dir (`str`, *optional*):
            The original DELIA name of `diverse_dataset`.
        tokenizer (*optional*):
            Deprecated alias of `processing_class`, kept because the original DELIA README passes it.

    `train_dataset` and `eval_dataset` take every form `SFTTrainer` takes, and also paths / hub names. With no diverse
    data it trains exactly as `SFTTrainer`, but for one documented difference: conversations train on their final
    assistant reply only (`DSFTConfig.final_reply_only`, on by default).

    It logs what it decided (the mixture's row counts, "final reply only", the CPU defaults) to the `delia` logger:
    the `delia` commands print those lines; in a script, call `delia.enable_logging()` first to see them.
    """

    _tag_names = ["trl", "sft", "delia"]
    _name = "DSFT"

    def __init__(
        self,
        model: Any,
        args: DSFTConfig | SFTConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | str | None = None,
        eval_dataset: Dataset | IterableDataset | str | dict[str, Dataset | IterableDataset | str] | None = None,
        processing_class: Any = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
        *,
        diverse_dataset: Dataset | str | None = None,
        diverse_ratio: float | None = None,
        cache_dir: str | None = None,
        tokenizer: Any = None,
    ):
        # Arguments: a DSFTConfig (a copy when keywords override it) and the original DELIA names
        args, diverse_dataset, processing_class = _resolve_aliases(
            model, args, processing_class, tokenizer, diverse_dataset, cache_dir, diverse_ratio
        )
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a Dataset, a JSONL path, a saved folder or a hub name.")

        # Data: read, validate and mix the rows (the same mixture on every process), then fingerprint the mixture
        prepared = self._prepare_data(args, train_dataset, diverse_dataset, eval_dataset, formatting_func)
        self.mixture_fingerprint = self._fingerprint_mixture(prepared, train_dataset, diverse_dataset)

        # Loss: per-source sums, when there are two sources and rows are not merged into one sequence
        self._log_per_source = self._per_source_logging(args, prepared.mixed)
        self._source_loss = SourceLoss()

        # LoRA: only the new tokens' rows of the embeddings (and of an untied LM head) train
        if peft_config is not None and not isinstance(model, str):
            resolve_trainable_token_modules(peft_config, model)

        # SFTTrainer: tokenises the prepared rows and builds the labels
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=prepared.train_dataset,
            eval_dataset=prepared.eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=prepared.formatting_func,
        )
        expose_trainable_token_lm_head_bias(self.model)
        if "gradient_checkpointing" in getattr(self.args, "cpu_defaults", ()):
            self._checkpoint_if_activations_do_not_fit()

        # Collator and tracked tokens: each row's source reaches compute_loss; eval forwards watched for track_tokens
        if self._log_per_source:
            self.data_collator = SourceTaggingCollator(self.data_collator)
        self._token_loss = self._build_token_loss_tracker()

        # Mixture record: counts per source, the plan and the fingerprint, in the run folder and in every checkpoint
        self.mixture = self._mixture_record()
        self.add_callback(CheckpointRecordCallback(lambda: self.mixture))
        for note in prepared.notes:
            logger.info(note)
        # A run folder that records another mixture keeps its record until `train` has checked a resume against it
        self._mixture_written = self.is_world_process_zero() and self._write_mixture(replace_other=False)

    # ------------------------------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------------------------------

    def _prepare_data(
        self, args: DSFTConfig, train: Any, diverse: Any, eval_dataset: Any, formatting_func: Callable | None
    ) -> PreparedData:
        """The training and eval sets `SFTTrainer` gets, and how they were made (`delia.data.prepare_datasets`)."""
        with PartialState().main_process_first():  # the main process first: datasets' cache is written once
            prepared = prepare_datasets(
                train,
                diverse,
                eval_dataset,
                ratio=args.diverse_ratio,
                seed=args.diverse_seed,
                sampling=args.diverse_sampling,
                final_reply_only=args.final_reply_only,
                assistant_only_loss=args.assistant_only_loss,
                dataset_text_field=args.dataset_text_field,
                formatting_func=formatting_func,
            )
        self.mixture_plan = prepared.plan
        self._mixed = prepared.mixed
        self._diverse_description = prepared.diverse_description
        if prepared.split_final_reply:
            logger.info(
                "DSFTTrainer trains conversations on their final assistant reply only (final_reply_only=True); "
                "set final_reply_only=False to train on them as SFTTrainer does."
            )
        return prepared

    @staticmethod
    def _per_source_logging(args: DSFTConfig, mixed: bool) -> bool:
        """Whether to log loss_downstream / loss_diverse: asked for, mixed, and rows not merged into one sequence."""
        if not (args.log_loss_per_source and mixed):
            return False
        if args.packing or args.padding_free:
            warnings.warn(
                "Per-source loss logging is off: packing / padding-free training merges rows of both sources into one "
                "sequence. Set packing=False and padding_free=False to log loss_downstream / loss_diverse.",
                UserWarning,
                stacklevel=3,
            )
            return False
        return True

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._log_per_source:
            add_signature_column(self, "source")

    def _mixture_record(self) -> dict[str, Any]:
        """Rows, tokens and loss tokens per source in the prepared training set, plus how it was drawn."""
        plan: MixturePlan = self.mixture_plan
        return {
            "sources": source_counts(self.train_dataset, plan, self._mixed),
            "diverse_dataset": self._diverse_description,
            "cache_rows": plan.cache_rows,
            "diverse_ratio": plan.ratio,
            "diverse_sampling": plan.sampling,
            "resolved_sampling": plan.resolved_sampling,
            "diverse_seed": plan.seed,
            "fingerprint": self.mixture_fingerprint,
        }

    def _write_mixture(self, replace_other: bool = True) -> bool:
        """Write the mixture record atomically (a kill never leaves half a file); with `replace_other=False`, not over
        a record of another mixture. Returns whether it was written."""
        path = os.path.join(self.args.output_dir, MIXTURE_FILE)
        if not replace_other and os.path.exists(path):
            record = read_json_or_none(path)
            recorded = (record.get("fingerprint") if isinstance(record, dict) else None) or {}
            if recorded.get("combined") not in (None, self.mixture_fingerprint["combined"]):
                return False
        try:
            os.makedirs(self.args.output_dir, exist_ok=True)
            write_json_atomically(path, self.mixture)
        except OSError as error:
            raise OSError(
                f"cannot write {path} ({error.strerror or error}); output_dir must be a writable folder"
            ) from None
        return True

    # ------------------------------------------------------------------------------------------------------------------
    # The same mixture on every process and after a restart
    # ------------------------------------------------------------------------------------------------------------------

    def _fingerprint_mixture(self, prepared: PreparedData, downstream: Any, diverse: Any) -> dict[str, Any]:
        """Hash the prepared rows and the source files, log the result on every process, and compare the processes."""
        fingerprint = mixture_fingerprint(prepared, downstream, diverse)
        state = PartialState()
        logger.info(
            f"rank {state.process_index} of {state.num_processes}: mixture fingerprint {fingerprint['combined']} "
            f"({fingerprint['rows']} rows, sha256 {fingerprint['rows_sha256']})",
            extra={"every_rank": True},  # `delia train` shows it on every process, to compare
        )
        check_same_mixture_on_every_process(fingerprint)
        return fingerprint

    def resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint `train` would resume from (`True`: the last one saved to the end), checked against this
        mixture: a checkpoint of other data is refused unless `args.allow_mixture_change`."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            checkpoint = find_checkpoint(self.args.output_dir, allow_incomplete=self.args.allow_mixture_change)
            if checkpoint is None:
                raise ValueError(f"no checkpoint in {self.args.output_dir!r} to resume from")
        else:
            checkpoint = os.fspath(resume_from_checkpoint)
        check_checkpoint(checkpoint, self.mixture_fingerprint, self.args.allow_mixture_change)
        return checkpoint

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ):
        """`Trainer.train`, after checking that the checkpoint it resumes from was trained on this same mixture; on a CPU
        with `cpu_threads` torch threads (see `DSFTConfig`), restored afterwards."""
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
        if self.is_world_process_zero() and not self._mixture_written:
            self._mixture_written = self._write_mixture()
        with torch_threads(self._cpu_threads()):  # on a CPU, `cpu_threads` threads (see DSFTConfig), restored after
            return super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
            )

    # ------------------------------------------------------------------------------------------------------------------
    # CPU: threads and gradient checkpointing
    # ------------------------------------------------------------------------------------------------------------------

    def _cpu_threads(self) -> int | None:
        """The thread count to train with, or None to leave torch's setting alone."""
        threads = thread_count(self.args.cpu_threads) if self.args.device.type == "cpu" else None
        if threads is None:
            return None
        logger.info("Training on CPU with %d torch threads (cpu_threads=%s)", threads, self.args.cpu_threads)
        return threads

    def _checkpoint_if_activations_do_not_fit(self) -> None:
        """Turn gradient checkpointing back on (delia's CPU default is off) if the activations of the longest batch
        would take more than half the available memory."""
        longest = self.args.max_length or 0
        dataset = self.train_dataset
        if isinstance(dataset, Dataset) and "input_ids" in dataset.column_names and len(dataset):
            table = dataset.select_columns(["input_ids"]).with_format("arrow")[:]
            longest = pc.max(pc.list_value_length(table.column("input_ids"))).as_py() or longest
        model = self.accelerator.unwrap_model(self.model)
        need = activation_bytes(model.config, self.args.per_device_train_batch_size * longest)
        budget = available_memory() // 2
        if need <= budget:
            return
        self.args.gradient_checkpointing = self.args.activation_checkpointing = True
        if hasattr(model, "enable_input_require_grads") and getattr(model, "peft_config", None):
            model.enable_input_require_grads()  # as SFTTrainer does for PEFT models with checkpointing
        logger.info(
            "Gradient checkpointing is on: a batch of %d x %d tokens may keep %.1f GB of activations, more than half "
            "the %.1f GB available (set gradient_checkpointing=False to train without it)",
            self.args.per_device_train_batch_size,
            longest,
            need / 1e9,
            2 * budget / 1e9,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Loss: label positions only in the LM head on CPU; per-source sums
    # ------------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._token_loss_capture(model, inputs):
            return self._compute_loss_per_source(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss_per_source(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        source_ids = inputs.pop("source_ids", None)
        if source_ids is None:
            with score_label_positions_only():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # SFTTrainer's fused LM head returns per-token log-probs; catch them on the way out instead of recomputing.
        with forward_outputs(model) as outputs, score_label_positions_only():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        fused = fused_head_output(outputs)
        if fused is not None:
            mode = "train" if self.model.training else "eval"
            self._source_loss.add(mode, fused.log_probs, fused.label_mask, source_ids)
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._log_per_source:
            if self.model.training:
                logs.update(self._source_loss.pop("train", "", self.accelerator))
            else:
                loss_key = next((key for key in logs if key.endswith("_loss")), "eval_loss")
                logs.update(self._source_loss.pop("eval", loss_key[: -len("loss")], self.accelerator))
        if self._token_loss is not None and not self.model.training:
            self._log_token_losses(logs)
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------------------
    # Tracked-token loss (args.track_tokens)
    # ------------------------------------------------------------------------------------------------------------------

    def _build_token_loss_tracker(self) -> TokenLossTracker | None:
        if not self.args.track_tokens:
            return None
        backbone_of(self.model)  # fails now, naming the model, rather than at the first evaluation
        return TokenLossTracker.for_tokenizer(self.processing_class, self.args.track_tokens)

    def _token_loss_capture(self, model, inputs):
        """Watch an eval forward for the tracked tokens' loss; no-op in training or without `track_tokens`."""
        if self._token_loss is None or model.training:
            return contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(model)
        return self._token_loss.capture(unwrapped, inputs, gather=self.accelerator.gather_for_metrics, called=model)

    def evaluate(self, *args, **kwargs):
        if self._token_loss is not None:
            self._token_loss.reset()  # drop what a predict() call may have left
        return super().evaluate(*args, **kwargs)

    def _log_token_losses(self, logs: dict[str, float]) -> None:
        """Add eval_token_loss/<token> to an eval log and append one line to output_dir/token_loss.jsonl."""
        totals = self._token_loss.pop()
        if totals is None:  # no eval batch since the last log (e.g. the training summary after an evaluation)
            return
        loss_key = next((key for key in logs if key.endswith("_loss")), "eval_loss")
        prefix = loss_key[: -len("loss")]
        logs.update(token_loss_metrics(totals, prefix))
        if self.is_world_process_zero():
            record = token_loss_record(totals, self.state.global_step, self.state.epoch, prefix)
            append_record(os.path.join(self.args.output_dir, TOKEN_LOSS_FILE), record)
