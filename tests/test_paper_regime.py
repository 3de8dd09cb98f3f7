"""The paper-regime experiment's script (`reproduce_checkpoint/small/paper_regime.py`): its recipe, the downstream
subset, the held-out split of the self-generated cache and the query figures, without a model."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parents[1] / "reproduce_checkpoint" / "small"


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(FOLDER))  # the script imports its neighbour reproduce.py, as when it is run
    spec = importlib.util.spec_from_file_location("paper_regime", FOLDER / "paper_regime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_recipe_parses_with_the_scripts_arms(script, tmp_path):
    from delia.sweep import parse_arguments

    arms = script.arms([30, 100], [1, 3, 10])
    assert arms == ["0:1", "0:3", "0:10", "30:1", "100:1"]
    argv = ["--config", str(script.RECIPE), "--arms", *arms, "--train_dataset", "subset.jsonl"]
    sweep, eval_args, model_args, args = parse_arguments([*argv, "--output_dir", str(tmp_path)])
    assert [(arm.ratio, arm.epochs) for arm in sweep.plan()] == [(0, 1), (0, 3), (0, 10), (30, 1), (100, 1)]
    assert sweep.budget == "epoch" and sweep.include_base and sweep.probe  # the frontier needs the base model
    assert args.lr_scheduler_type == "constant_with_warmup" and args.learning_rate == 1e-3
    assert model_args.train_dataset == "subset.jsonl" and Path(model_args.eval_dataset).is_file()


def test_downstream_subset_is_balanced_and_seeded(script, tmp_path):
    from delia.evaluation.metrics import reference_label

    def labels_and_rows(seed):
        path = script.downstream_subset(24, seed, tmp_path)
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return [reference_label(row["messages"][-1]["content"]) for row in rows], rows

    labels, rows = labels_and_rows(0)
    assert labels.count("yes") == 12 and labels.count("no") == 12
    assert labels_and_rows(0)[1] == rows and labels_and_rows(1)[1] != rows
    with pytest.raises(SystemExit, match=r"--downstream_rows 200 asks for 100 'yes' rows; .* has 21"):
        script.downstream_subset(200, 0, tmp_path)


def test_held_out_split_is_disjoint_seeded_and_independent_of_the_write_order(script, tmp_path):
    rows = [{"id": f"q{i:03d}", "messages": [{"role": "user", "content": f"query {i}"}]} for i in range(50)]
    diverse, general = script.split_cache(write_jsonl(tmp_path / "cache.jsonl", rows), 8, 0, tmp_path)

    def ids(path):
        return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]

    held_out, kept = ids(general), ids(diverse)
    assert len(held_out) == 8 and len(kept) == 42 and sorted(held_out + kept) == [row["id"] for row in rows]
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)  # a resumed cache may hold its rows in another order
    script.split_cache(write_jsonl(tmp_path / "cache.jsonl", shuffled), 8, 0, tmp_path)
    assert ids(general) == held_out
    script.split_cache(write_jsonl(tmp_path / "cache.jsonl", rows), 8, 1, tmp_path)
    assert ids(general) != held_out
    with pytest.raises(SystemExit, match="--held_out 50 leaves nothing of the 50 cache rows"):
        script.split_cache(tmp_path / "cache.jsonl", 50, 0, tmp_path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "q1"}\n{"id": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl.*line 2"):  # the file and line, not a bare JSONDecodeError
        script.split_cache(broken, 1, 0, tmp_path)


def test_query_figures_read_the_queries_and_their_meta_file(script, tmp_path):
    cache = tmp_path / "cache.jsonl"
    queries = [{"query": " ".join(["word"] * count), "id": str(count), "attempt": count} for count in range(3, 23)]
    write_jsonl(tmp_path / "cache.jsonl.queries.jsonl", queries)
    meta = {"kept": 20, "attempts": 25, "dropped": {"near_duplicate": 3, "unfinished": 2}}
    (tmp_path / "cache.jsonl.queries.meta.json").write_text(json.dumps(meta), encoding="utf-8")
    first, second = script.query_figures(cache)
    assert (
        first == "Queries: 20 kept of 25 candidates drawn (kept / tried 0.800); dropped: near_duplicate 3, unfinished 2"
    )
    assert second.startswith("Query length in words: median 12.5, 10th-90th percentile") and second.endswith(
        "longest 22"
    )


@pytest.mark.parametrize("option", ["--downstream_rows", "--held_out", "--cache_max_new_tokens"])
def test_a_count_below_one_is_one_line_naming_the_option(script, option, capsys):
    with pytest.raises(SystemExit):
        script.parse_options([option, "0"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{option} must be a positive integer, got 0" in error


def test_a_ratio_of_zero_is_refused_since_plain_sft_comes_from_sft_epochs(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_options(["--ratios", "30", "0"])
    assert "--ratios must be above 0 (plain SFT's arms come from --sft_epochs), got 0" in capsys.readouterr().err
