"""What the demos say while they work: phase headers with their share of the time, the estimate measured from the
first batch, the notice on a CPU without native bf16, labelled bars, and no warnings caused by delia's defaults."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import delia
from delia.cli import main
from delia.progress import Phase, Phases, duration, slow_cpu_notice

DELIA_DIR = str(Path(delia.__file__).parent)


def test_phase_headers_and_the_estimate_from_the_first_batch(capsys):
    phases = Phases([Phase("a", "first thing", 0.25), Phase("b", "second thing", 0.75)], "a test box", "the run")
    phases.start("a", "4 items")
    phases.start("unknown")  # the sweep announces every run; a key the plan does not know prints nothing
    phases.first_batch("a", 1, 4, 10.0, unit="items")
    phases.first_batch("a", 2, 4, 20.0, unit="items")  # once per phase
    phases.start("b")
    phases.first_batch("b", 1, 10, 3.0, unit="steps", what="its training")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "[1/2] first thing (4 items): about 25% of the time"
    # 4 items at 10 s each: 40 s for a phase that is a quarter of the run, so about 160 s in all
    assert lines[1] == (
        "    measured: the first of 4 items took 10 s, so this phase about 40 s and the run about 2.7 min, "
        "from shares measured on a test box"
    )
    assert lines[2:] == [
        "",
        "[2/2] second thing: about 75% of the time",
        "    measured: the first of 10 steps took 3.0 s, so its training about 30 s",
    ]
    assert [duration(s) for s in (0.42, 40, 210, 7200)] == ["0.4 s", "40 s", "3.5 min", "2.0 h"]


def test_the_notice_is_for_a_cpu_without_native_bf16_only(tmp_path, monkeypatch, capsys):
    assert "no native bf16" in slow_cpu_notice(native_bf16=False, has_gpu=False)
    assert slow_cpu_notice(native_bf16=True, has_gpu=False) is None
    assert slow_cpu_notice(native_bf16=False, has_gpu=True) is None

    from delia import cpu, experiment

    monkeypatch.setattr(experiment, "resolve_model", lambda name: str(tmp_path / name))
    for native, expected in ((False, 1), (True, 0)):
        monkeypatch.setattr(cpu, "native_bf16", lambda native=native: native)
        experiment.Experiment.start("some-model", tmp_path / f"run-{native}")
        out = capsys.readouterr().out
        assert out.count("no native bf16") == expected and out.count("\n") == expected, out


def test_the_tiny_demo_says_what_it_does_and_warns_of_nothing_of_its_own(tmp_path, capsys):
    output = tmp_path / "demo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["demo", "--output", str(output), "--steps", "4"]) == 0  # the default ratio, 4
    captured = capsys.readouterr()
    headers = [line for line in captured.out.splitlines() if line.startswith("[")]
    assert [header.split("]")[0] + "]" for header in headers] == ["[1/3]", "[2/3]", "[3/3]"], captured.out
    assert all(header.endswith("% of the time") for header in headers)
    assert "self-sampling the diverse cache: 256 replies" in headers[1]
    measured = [line.strip() for line in captured.out.splitlines() if line.strip().startswith("measured:")]
    assert len(measured) == 2 and "the demo about" in measured[0], measured
    assert measured[1].startswith("measured: the second of 4 steps took") and "so training about" in measured[1]
    # the labelled bars, at their end: replies and steps, each with tokens/s; no log dict per step
    assert "self-sampling: 100%" in captured.err and "training: 100%" in captured.err, captured.err
    assert "tokens/s" in captured.err and "{'loss'" not in captured.out + captured.err

    summary = json.loads((output / "summary.json").read_text())
    assert summary["rows"]["diverse"] == 4 * 48  # ratio 4 is drawn from the cache, none of it twice
    mixture = json.loads((output / "delia_mixture.json").read_text())
    assert mixture["sources"]["diverse"]["rows"] == 192, mixture
    ours = [
        f"{warning.category.__name__}: {warning.message} ({warning.filename}:{warning.lineno})"
        for warning in caught
        if warning.filename.startswith(DELIA_DIR) or "diverse cache has" in str(warning.message)
    ]
    assert not ours, ours
    assert "maximum length" not in captured.err  # transformers' reminder: the tiny model has room for its prompts
    noise = ("is_gradient_checkpointing", "save_embedding_layers")
    assert not [str(warning.message) for warning in caught if any(text in str(warning.message) for text in noise)]
