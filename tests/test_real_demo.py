"""`delia demo --real` end to end on SmolLM2-135M-Instruct, at a test's size: self-sample 8 queries, 3 LoRA + <sep>
steps per run (plain SFT and DELIA), evaluate base, SFT and DELIA on 4 eval rows; and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from delia.cli import main as cli_main
from delia.demo import demo_file
from delia.evaluation.report import read_report
from delia.real_demo import run_real_demo, verdict_line


@pytest.mark.real_model
def test_real_model_self_samples_trains_both_runs_and_evaluates(offline_cache, tmp_path):
    output = tmp_path / "demo-real"
    bundled = (Path(demo_file("queries.jsonl")).read_text(encoding="utf-8")).splitlines(keepends=True)
    general = tmp_path / "general.jsonl"  # 2 of the self-sampled queries and 4 held-out ones: a short general NLL
    general.write_text("".join(bundled[:2] + bundled[-4:]), encoding="utf-8")
    summary = run_real_demo(
        str(output),
        ratio=2,
        steps=3,
        samples_per_query=1,
        cache_queries=8,
        max_new_tokens=24,
        eval_limit=4,
        eval_max_new_tokens=24,
        general_queries=str(general),
    )
    cache = summary["cache"]
    assert cache["queries"] == 8 and cache["written"] + cache["dropped_degenerate"] == 8 and cache["written"] > 0
    reports = {
        name: read_report(output / folder)
        for name, folder in (("base", "base"), ("SFT", "ratio-0/seed-0"), ("DELIA", "ratio-2/seed-0"))
    }
    for name, report in reports.items():
        assert report["summary"]["n"] == 4, name
        assert report["summary"]["general_n"] == 4  # the self-sampled queries are not held out
    assert reports["SFT"]["training"]["steps"] == reports["DELIA"]["training"]["steps"] == 3
    assert reports["SFT"]["training"]["rows"] == {"downstream": 48}
    assert reports["DELIA"]["training"]["rows"] == {"downstream": 48, "diverse": 96}
    # LoRA + the new token: the adapter folder carries <sep> in its tokenizer
    tokenizer_config = json.loads((output / "ratio-2/seed-0/tokenizer_config.json").read_text())
    assert "<sep>" in json.dumps(tokenizer_config) and (output / "ratio-2/seed-0/adapter_config.json").is_file()
    # the runs differ from the base model and from each other
    nll = {name: report["summary"]["general_nll"] for name, report in reports.items()}
    assert len(set(nll.values())) == 3, nll
    header = summary["table"].splitlines()[0]
    assert header == "| metric | base | SFT | DELIA |"
    assert summary["verdict"].startswith("Verdict: ") and (output / "comparison.md").read_text().startswith(header)
    assert (output / "loss.png").stat().st_size > 1000
    assert summary["wall_seconds"] > 0 and json.loads((output / "summary.json").read_text())["verdict"]


def report(**summary) -> dict:
    return {"summary": summary}


def test_verdict_says_which_way_each_measure_went():
    sft = report(
        format_learned=True, dict_rate_follow=0.5, accuracy=0.8, balanced_accuracy=0.5, sensitivity=0.1,
        general_nll=2.0, answered_labels=["yes", "no"],
    )  # fmt: skip
    delia = report(
        format_learned=True, dict_rate_follow=0.75, accuracy=0.5, balanced_accuracy=0.25, sensitivity=0.5,
        general_nll=1.9, answered_labels=["yes", "no"],
    )  # fmt: skip
    line = verdict_line(sft, delia, report(general_nll=1.8))
    assert "better on 3 of 4" in line
    assert "format 50% -> 75% (DELIA better)" in line and "balanced accuracy 50% -> 25% (SFT better)" in line
    assert "general NLL 2.000 -> 1.900 (DELIA better)" in line and "base model's general NLL 1.800" in line
    assert "label accuracy" not in line and "80%" not in line  # plain accuracy is not what the verdict counts
    assert "answered only" not in line  # both runs gave both labels
    none = verdict_line(
        report(format_learned=False, dict_rate_follow=0.1), report(format_learned=False, dict_rate_follow=0.0)
    )
    assert "neither run learned the <sep> format" in none and "says nothing" in none


def test_verdict_uses_balanced_accuracy_and_names_a_run_that_answers_one_label_only():
    # SFT always says 'no' on a mostly-'no' set: higher plain accuracy, yet no judgement; DELIA judges a little
    sft = report(
        format_learned=True, dict_rate_follow=1.0, accuracy=0.8125, balanced_accuracy=0.5, sensitivity=0.0,
        general_nll=2.0, answered_labels=["no"],
    )  # fmt: skip
    delia = report(
        format_learned=True, dict_rate_follow=1.0, accuracy=0.6875, balanced_accuracy=0.6, sensitivity=0.0,
        general_nll=2.0, answered_labels=["yes", "no"],
    )  # fmt: skip
    line = verdict_line(sft, delia)
    assert "balanced accuracy 50% -> 60% (DELIA better)" in line
    assert "SFT answered only 'no': a constant answer, not a judgement" in line and "DELIA answered" not in line
    both = verdict_line(
        report(format_learned=True, dict_rate_follow=1.0, balanced_accuracy=0.5, answered_labels=["no"]),
        report(format_learned=True, dict_rate_follow=0.9, balanced_accuracy=0.0, answered_labels=[]),
    )
    assert "SFT answered only 'no' and DELIA answered no yes/no label at all" in both
    # Reports written before the labels answered were recorded: no claim either way
    assert "answered" not in verdict_line(report(format_learned=True), report(format_learned=True))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ratio", "0"], "--ratio must be above 0"),
        (["--ratio", "-1"], "diverse_ratio must be a finite number >= 0, got -1.0"),
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
    ],
)
def test_bad_options_get_one_line_before_anything_loads(argv, message, tmp_path, capsys):
    assert cli_main(["demo", "--real", "--output", str(tmp_path / "out"), *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not Path(tmp_path / "out").exists()


def load_reproduce_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "reproduce_checkpoint" / "small" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("small_reproduce", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_reproduction_recipe_parses_as_delia_sweep_options(tmp_path):
    from trl import TrlParser

    from delia import DSFTConfig
    from delia.evaluation.evaluate import EvalArguments
    from delia.sweep import SweepArguments
    from delia.train import ModelArguments

    script = load_reproduce_script()
    parser = TrlParser((SweepArguments, EvalArguments, ModelArguments, DSFTConfig))
    argv = ["--config", str(script.RECIPE), "--diverse_dataset", "cache.jsonl", "--output_dir", str(tmp_path)]
    sweep, eval_args, model_args, args = parser.parse_args_and_config(argv)
    assert sweep.ratios[0] == 0 and len(sweep.ratios) >= 3 and sweep.budget == "steps" and sweep.seeds
    assert args.max_steps > 0 and args.diverse_dataset == "cache.jsonl" and args.output_dir == str(tmp_path)
    assert model_args.model_name_or_path == "smollm2-135m-instruct" and model_args.new_tokens == ["<sep>"]
    assert Path(model_args.train_dataset).is_file() and Path(model_args.eval_dataset).is_file()
    assert eval_args.max_new_tokens == 96 and "svg" in sweep.figure_formats  # the README's figures


def test_small_reproduction_self_samples_only_queries_the_evaluation_does_not_hold_out(tmp_path):
    script = load_reproduce_script()
    path = script.cache_queries(tmp_path)
    rows = [json.loads(line)["messages"][0]["content"] for line in path.read_text(encoding="utf-8").splitlines()]
    held_out = {
        json.loads(line)["messages"][0]["content"] for line in open(demo_file("queries.jsonl"), encoding="utf-8")
    }
    assert len(rows) == 240 - 128 and not set(rows) & held_out


def test_small_reproduction_describes_the_whole_cache_and_counts_reused_runs(tmp_path):
    script = load_reproduce_script()
    cache = tmp_path / "diverse_cache.jsonl"
    rows = [
        {"finish_reason": "length", "num_tokens": 96},
        {"finish_reason": "stop", "num_tokens": 20},
        {"finish_reason": "stop", "num_tokens": 40},
    ]
    cache.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert (
        script.describe_cache(cache) == "3 self-sampled rows (1 cut at the token limit, 52 tokens per reply on average)"
    )
    assert script.finished_runs(tmp_path) == 0
    for folder in ("base", "ratio-0/seed-0", "ratio-4/seed-1"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "eval_report.json").write_text("{}", encoding="utf-8")
    (tmp_path / "ratio-4" / "seed-2").mkdir()  # started, not evaluated: not reused
    assert script.finished_runs(tmp_path) == 3
