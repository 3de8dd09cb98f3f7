"""The name of every file delia writes into a run folder (and next to a cache), in one place.

A run folder is what `delia train`, `delia demo`, `delia sweep` (one per arm and seed) write; `delia eval` and
`delia probe` add their reports to it. Readers and writers both import the names from here.
"""

from __future__ import annotations

# marks a folder as a delia run, so a rerun after a crash may reuse it (runtime.start_run_folder)
RUN_MARKER = ".delia-run"
# the prefix of the short-lived file that checks a folder can be written (another rank's is not a foreign file)
PROBE_PREFIX = ".delia-probe-"

# training (trainer.py, integrity.py, token_loss.py)
MIXTURE_FILE = "delia_mixture.json"  # the mixture record: counts per source, plan, fingerprint
CHECKPOINT_RECORD = "delia_checkpoint.json"  # in each checkpoint-N folder: the mixture fingerprint it was trained on
TOKEN_LOSS_FILE = "token_loss.jsonl"  # tracked-token loss, one line per evaluation
LOG_HISTORY_FILE = "log_history.json"  # the Trainer's log history (demo, sweep)
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' own name; also inside each checkpoint-N folder
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's own name: a folder holding an adapter
MODEL_CONFIG_FILE = "config.json"  # transformers' own name: a folder holding a model

# evaluation (evaluation/report.py, evaluation/probe.py)
EVAL_REPORT_FILE = "eval_report.json"
EVAL_GENERATIONS_FILE = "eval_generations.jsonl"
PROBE_REPORT_FILE = "probe.json"
PROBE_PLOT_FILE = "probe.png"

# demos and sweeps (demo.py, real_demo.py, sweep.py, evaluation/plots.py)
SUMMARY_FILE = "summary.json"
COMPARISON_FILE = "comparison.md"
DIVERSE_CACHE_FILE = "diverse_cache.jsonl"
SWEEP_TABLE_FILE = "sweep.md"
SWEEP_CSV_FILE = "sweep.csv"
LOSS_PLOT_FILE = "loss.png"
TOKEN_LOSS_PLOT_FILE = "token_loss.png"
EVAL_METRICS_PLOT_FILE = "eval_metrics.png"


def cache_meta_file(cache: str) -> str:
    """The meta file build_cache writes next to a cache: what made it, counts, versions."""
    return f"{cache}.meta.json"
