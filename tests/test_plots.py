"""`delia plot`: run folders in each form the Trainer leaves them, several runs on one figure, bad folders."""

from __future__ import annotations

import json

from delia.cli import main
from delia.evaluation.plots import plot_runs


def history(scale: float, steps: int) -> list[dict]:
    entries = []
    for step in range(1, steps + 1):
        entries.append(
            {"loss": 3 * scale, "loss_downstream": 4 * scale / step, "loss_diverse": 2 * scale, "step": step}
        )
        if step % 2 == 0:
            entries.append(
                {
                    "eval_loss": 3.5 * scale / step,
                    "eval_mean_token_accuracy": 0.1 * step,
                    "eval_runtime": 0.3,
                    "eval_num_tokens": 512.0 * step,
                    "eval_samples_per_second": 40.0,
                    "eval_loss_downstream": 3.4 * scale / step,
                    "eval_token_loss/<sep>": 5.0 / step,
                    "step": step,
                }
            )
    return entries


def legend_labels(figure) -> set[str]:
    return {text.get_text() for axes in figure.axes if axes.get_legend() for text in axes.get_legend().get_texts()}


def test_two_runs_on_each_figure(tmp_path):
    demo = tmp_path / "demo"  # what `delia demo` writes
    demo.mkdir()
    (demo / "log_history.json").write_text(json.dumps(history(1.0, 6)))
    trained = tmp_path / "trained"  # a Trainer run with checkpoints only: the last one is read
    for step in (2, 10):
        (trained / f"checkpoint-{step}").mkdir(parents=True)
        state = {"global_step": step, "log_history": history(2.0, step)}
        (trained / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    record = {"step": 4, "epoch": 1.0, "prefix": "eval", "tokens": {"'": {"nll_sum": 6.0, "count": 3, "mean": 2.0}}}
    (trained / "token_loss.jsonl").write_text(json.dumps(record) + "\n")

    figures = plot_runs([str(demo), str(trained)], tmp_path / "out")
    assert set(figures) == {"loss.png", "token_loss.png", "eval_metrics.png"}
    for name in figures:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(lines_by_label(figures["loss.png"])) == {
        f"{run}: {series}"
        for run in ("demo", "trained")
        for series in ("downstream (train)", "diverse (train)", "eval")
    }
    steps = [max(line.get_xdata()) for line in figures["loss.png"].axes[0].get_lines()]
    assert max(steps) == 10  # checkpoint-10, not checkpoint-2
    # token losses: the demo's from its log history, the other run's from its token_loss.jsonl
    titles = {axes.get_title(): axes for axes in figures["token_loss.png"].axes if axes.get_visible()}
    assert set(titles) == {"<sep>", "'"}
    assert legend_labels(figures["token_loss.png"]) == {"demo", "trained"}
    metrics = {axes.get_title() for axes in figures["eval_metrics.png"].axes if axes.get_visible()}
    # eval_loss (and eval_loss_downstream) have loss.png; counts, timings and token losses are no metrics
    assert metrics == {"mean token accuracy"}


def test_one_run_writes_into_its_folder_and_bad_folders_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history(1.0, 2)}))  # what `delia train` writes
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").exists() and (run / "eval_metrics.png").exists()
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "log_history.json").write_text('[{"step": 1,\n "loss": }]')
    for folder, expected in ((empty, "no log_history.json"), (broken, "line 2"), (tmp_path / "gone", "no such folder")):
        assert main(["plot", str(run), str(folder), "--output", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and str(folder) in error and expected in error, error
    assert not (tmp_path / "out").exists()  # every folder is read before anything is written


def write_state(folder, entries) -> None:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": entries}))


def plain_sft(steps: int) -> list[dict]:
    """A ratio-0 run: no diverse rows, so only the total training loss (and the eval loss) is logged."""
    return [{"loss": 3.0 - 0.1 * step, "step": step} for step in range(1, steps + 1)] + [
        {"eval_loss": 2.5, "step": steps}
    ]


def lines_by_label(figure) -> dict:
    return {line.get_label(): line for axes in figure.axes for line in axes.get_lines()}


def test_plain_sft_is_drawn_from_its_total_loss(tmp_path):
    sft, delia = tmp_path / "sft", tmp_path / "delia"
    write_state(sft, plain_sft(4))
    write_state(delia, history(1.0, 4))
    lines = lines_by_label(plot_runs([str(sft), str(delia)], tmp_path / "out")["loss.png"])
    assert set(lines) == {
        "sft: train",
        "sft: eval",
        "delia: downstream (train)",
        "delia: diverse (train)",
        "delia: eval",
    }
    assert list(lines["sft: train"].get_ydata()) == [3.0 - 0.1 * step for step in range(1, 5)]


def test_a_sweep_folder_stands_for_every_run_in_it(tmp_path, capsys):
    sweep = tmp_path / "sweep"  # what `delia sweep` and `delia demo --real` write
    (sweep / "base").mkdir(parents=True)
    (sweep / "base" / "eval_report.json").write_text("{}")  # evaluated, never trained: no curve
    for ratio in ("10", "2", "0"):
        write_state(sweep / f"ratio-{ratio}" / "seed-0", plain_sft(3) if ratio == "0" else history(1.0, 3))
    (sweep / "sweep.md").write_text("| run |\n")
    assert main(["plot", str(sweep)]) == 0
    assert str(sweep / "loss.png") in capsys.readouterr().out
    figures = plot_runs([str(sweep)])
    runs = list(dict.fromkeys(label.split(": ")[0] for label in lines_by_label(figures["loss.png"])))
    assert runs == ["ratio-0 (SFT)", "ratio-2", "ratio-10"]  # in ratio order; one seed: left out of the name

    write_state(sweep / "ratio-2" / "seed-1", history(2.0, 3))  # a second seed: the seeds are named
    demo = tmp_path / "demo"  # the tiny demo's folder holds its own log history: one run
    demo.mkdir()
    (demo / "log_history.json").write_text(json.dumps(history(1.0, 2)))
    figures = plot_runs([str(sweep), str(demo)], tmp_path / "out")
    labels = list(dict.fromkeys(label.rsplit(": ", 1)[0] for label in lines_by_label(figures["loss.png"])))
    assert labels == [
        "sweep: ratio-0 (SFT)/seed-0",
        "sweep: ratio-2/seed-0",
        "sweep: ratio-2/seed-1",
        "sweep: ratio-10/seed-0",
        "demo",
    ]

    empty = tmp_path / "empty"
    (empty / "base").mkdir(parents=True)
    assert main(["plot", str(empty)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(empty) in error and "run folders below it" in error
