"""`delia eval` and `delia sweep`: the safe parser, the metrics, the `<sep>` contrast, reports, comparison, the sweep."""

from __future__ import annotations

import contextlib
import json
import math
import signal
from pathlib import Path

import pytest
from conftest import diverse_rows, downstream_rows, write_jsonl

from delia.evaluation import parse_structured
from delia.evaluation.contrast import DO_NOT_INSTRUCTIONS, replace_instruction, split_instruction, verdict
from delia.evaluation.metrics import read_answer, score_answers

BUNDLED_EVAL = Path(__file__).parents[1] / "delia" / "demo_data" / "eval.jsonl"


@contextlib.contextmanager
def hang_guard(seconds: int = 10):
    """Fail instead of hanging forever (a guard against a runaway parse, not a timing assertion)."""

    def fail(*_):
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------------------------------
# parse_structured
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "{'thought': 'It invents a date.', 'hallucination': 'yes'}",
            {"thought": "It invents a date.", "hallucination": "yes"},
        ),
        (
            '{"thought": "fine", "hallucination": "no", "score": null, "ok": true}',
            {"thought": "fine", "hallucination": "no", "score": None, "ok": True},
        ),
        (
            "Sure! Here it is:\n{'thought': \"It's right.\", 'hallucination': 'no'}\nHope that helps.",
            {"thought": "It's right.", "hallucination": "no"},
        ),
        (
            "{'thought': 'braces } and { in a string', 'hallucination': 'no'}",
            {"thought": "braces } and { in a string", "hallucination": "no"},
        ),
        ("I think {maybe not} so: {'thought': 'x', 'hallucination': 'no'}", {"thought": "x", "hallucination": "no"}),
        ("{'a': [[[1]]], 'b': (1, 2)}", {"a": [[[1]]], "b": (1, 2)}),
    ],
    ids=["python", "json", "prose-around", "braces-in-strings", "after-a-stray-brace", "nested"],
)
def test_parse_structured_reads_dicts(text, expected):
    assert parse_structured(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "{'thought': 'It invents a date.', 'hallucination': 'y",  # truncated
        "__import__('os').system('touch /tmp/delia-pwned')",  # a call expression
        "{'thought': __import__('os').getcwd(), 'hallucination': 'no'}",  # a call inside the dict
        "{'thought': open('/etc/passwd').read()}",
        "{1, 2, 3}",  # a set, not a dict
        "no dict at all",
        "",
        "{'a': " * 10_000 + "1" + "}" * 10_000,  # nested bomb
        "{'a': " + "[" * 10_000 + "]" * 10_000 + "}",  # deep lists inside
        "x" * 10_000_000,  # 10 MB of text
        "{'a': '" + "x" * 10_000_000 + "'}",  # a 10 MB dict
        "{" * 10_000_000,  # 10 MB of opening braces
        "{'a': " + "9" * 5000 + "}",  # an integer beyond Python's digit limit
    ],
    ids=[
        "truncated", "call", "call-inside", "open-inside", "set", "prose", "empty", "nested-bomb", "deep-lists",
        "10MB-text", "10MB-dict", "10MB-braces", "huge-int",
    ],
)  # fmt: skip
def test_parse_structured_refuses_without_raising_or_hanging(text):
    with hang_guard():
        assert parse_structured(text) is None


def test_parse_structured_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    assert parse_structured(f"{{'a': open({str(marker)!r}, 'w')}}") is None
    assert not marker.exists()
    assert parse_structured(None) is None  # not text at all


def test_parse_structured_limits_are_settable():
    reply = "{'thought': '" + "x" * 5000 + "', 'hallucination': 'no'}"
    assert parse_structured(reply)["hallucination"] == "no"
    assert parse_structured(reply, max_chars=4000) is None
    assert parse_structured("{'a': [[1]]}", max_depth=2) is None and parse_structured("{'a': [1]}", max_depth=2)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics and the contrast
# ----------------------------------------------------------------------------------------------------------------------


def test_scores_match_a_hand_computed_confusion_matrix():
    references = ["yes", "yes", "yes", "no", "no", "no", "no"]
    replies = [
        "{'thought': 'a', 'hallucination': ' YES '}",  # yes -> yes (case and whitespace normalised)
        "{'thought': 'b', 'hallucination': 'no'}",  # yes -> no
        "It is made up.",  # yes -> unparsed
        "{'thought': 'c', 'hallucination': 'Yes'}",  # no -> yes
        "{'thought': 'd', 'hallucination': 'no'}",  # no -> no
        '{"thought": "e", "hallucination": "No"}',  # no -> no (JSON)
        "{'thought': 'f', 'hallucination': 'maybe'}",  # no -> unparsed: in format, but no yes/no label
    ]
    scores = score_answers(references, [read_answer(reply) for reply in replies])
    assert scores.confusion == {"yes": {"yes": 1, "no": 1, "unparsed": 1}, "no": {"yes": 1, "no": 2, "unparsed": 1}}
    assert scores.n == 7 and scores.in_format == 6 and scores.correct == 3
    assert scores.parse_rate == pytest.approx(6 / 7)
    assert scores.accuracy == pytest.approx(3 / 7) and scores.accuracy_labelled == pytest.approx(3 / 5)
    assert scores.precision_yes == pytest.approx(1 / 2) and scores.recall_yes == pytest.approx(1 / 3)
    assert scores.f1_yes == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert read_answer("{'hallucination': 'no'}").in_format is False  # 'thought' missing
    # Recall: yes 1/3, no 2/4 (an unparsed answer is a miss). F1 = 2TP / (2TP + FP + FN): yes 2/5, no 4/7
    assert scores.recall("no") == pytest.approx(2 / 4) and scores.precision("no") == pytest.approx(2 / 3)
    assert scores.balanced_accuracy == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert scores.f1_yes == pytest.approx(2 / 5) and scores.f1_no == pytest.approx(4 / 7)
    assert scores.macro_f1 == pytest.approx((2 / 5 + 4 / 7) / 2)
    assert scores.answered_labels == ["yes", "no"]


def _answers(*labels: str):
    return [read_answer(f"{{'thought': 't', 'hallucination': '{label}'}}") for label in labels]


def test_a_model_that_answers_one_label_only_gets_half_balanced_accuracy_whatever_the_majority():
    # 13 'no' and 3 'yes' references, every answer 'no': accuracy is the majority's share, balanced accuracy is not
    mostly_no = score_answers(["yes"] * 3 + ["no"] * 13, _answers(*["no"] * 16))
    assert mostly_no.accuracy == pytest.approx(13 / 16)
    assert mostly_no.balanced_accuracy == pytest.approx(0.5)  # recall: yes 0, no 1
    assert mostly_no.f1_yes == 0 and mostly_no.precision_yes is None  # never says 'yes': F1 0, precision undefined
    assert mostly_no.f1_no == pytest.approx(26 / 29) and mostly_no.macro_f1 == pytest.approx(13 / 29)
    assert mostly_no.answered_labels == ["no"]
    # The same model on a balanced set: accuracy and balanced accuracy agree at 50%, macro-F1 (0 + 2/3) / 2
    balanced = score_answers(["yes", "no"] * 8, _answers(*["no"] * 16))
    assert balanced.accuracy == balanced.balanced_accuracy == pytest.approx(0.5)
    assert balanced.macro_f1 == pytest.approx(1 / 3)
    # Always 'yes' mirrors it
    always_yes = score_answers(["yes"] * 3 + ["no"] * 13, _answers(*["yes"] * 16))
    assert always_yes.accuracy == pytest.approx(3 / 16) and always_yes.balanced_accuracy == pytest.approx(0.5)
    assert always_yes.answered_labels == ["yes"] and always_yes.f1_no == 0


def test_balanced_accuracy_and_macro_f1_edge_cases():
    # A perfect judge scores 1 on both
    perfect = score_answers(["yes", "no", "no"], _answers("yes", "no", "no"))
    assert perfect.balanced_accuracy == 1 and perfect.macro_f1 == 1
    # Only one label in the references: the mean runs over the labels present (and predicted, for F1)
    only_no = score_answers(["no", "no"], _answers("no", "no"))
    assert only_no.balanced_accuracy == 1 and only_no.f1_yes is None and only_no.macro_f1 == 1
    wrongly_yes = score_answers(["no", "no"], _answers("yes", "no"))
    assert wrongly_yes.balanced_accuracy == pytest.approx(0.5)  # recall on 'no' alone
    assert wrongly_yes.f1_yes == 0 and wrongly_yes.macro_f1 == pytest.approx((0 + 2 / 3) / 2)
    # No labelled answer at all: 0, not undefined; no rows: undefined
    prose = score_answers(["yes", "no"], [read_answer("prose"), read_answer("more prose")])
    assert prose.balanced_accuracy == 0 and prose.macro_f1 == 0 and prose.answered_labels == []
    empty = score_answers([], [])
    assert empty.balanced_accuracy is None and empty.macro_f1 is None
    assert set(perfect.as_dict()) >= {"balanced_accuracy", "macro_f1", "f1_no", "answered_labels"}


def test_undefined_rates_are_none_not_zero():
    scores = score_answers(["no", "no"], [read_answer("prose"), read_answer("more prose")])
    assert scores.precision_yes is None and scores.recall_yes is None and scores.f1_yes is None
    assert scores.accuracy == 0 and scores.accuracy_labelled is None
    with pytest.raises(ValueError, match="maybe"):
        score_answers(["maybe"], [read_answer("x")])


def test_contrast_prompts_replace_the_instruction_and_keep_the_context():
    row = json.loads(BUNDLED_EVAL.read_text().splitlines()[0])
    prompt = row["messages"][:-1]
    context, instruction = split_instruction(prompt[-1]["content"])
    assert (
        instruction
        == "Determine whether any part of the chatbot's response is hallucinated, answering in <sep> format."
    )
    assert context.startswith("\n'relatives' :") and context.endswith("Rome.\n\n\n")
    swapped = replace_instruction(prompt, DO_NOT_INSTRUCTIONS[0])
    assert swapped[-1]["content"] == context + DO_NOT_INSTRUCTIONS[0] and swapped[-1]["role"] == "user"
    assert prompt[-1]["content"] == context + instruction  # the original is not changed
    assert split_instruction("line one\nFollow <sep>.") == ("line one\n", "Follow <sep>.")
    assert split_instruction("Follow <sep>.") == ("", "Follow <sep>.")


def test_verdict_never_reads_an_unlearned_format_as_a_win():
    assert verdict(0.1, 0.0).startswith("format not learned") and "means nothing" in verdict(0.1, 0.0)
    assert verdict(0.9, 0.1).startswith("keeps the instruction's meaning")
    assert verdict(0.9, 0.8).startswith("fits the surface")
    assert verdict(0.6, 0.0, min_follow_rate=0.7).startswith("format not learned")


# ----------------------------------------------------------------------------------------------------------------------
# The evaluation, end to end
# ----------------------------------------------------------------------------------------------------------------------


class ScriptedBackend:
    """Stands in for TransformersBackend: answers from what each prompt says, to check the evaluation's bookkeeping."""

    name = "scripted"

    def __init__(self, model, tokenizer, batch_size=16, cpu_threads=None):
        self.answer = model  # evaluate_model passes the model first: here, a function of the user turn

    def prepare(self, conversations, ids):
        from delia.generation import Prompt

        return [
            Prompt(i, messages, len(messages[-1]["content"])) for i, messages in zip(ids, conversations, strict=True)
        ]

    def stream(self, prompts, sampling):
        from delia.generation import Generation

        for prompt in prompts:
            yield Generation(self.answer(prompt.messages[-1]["content"]), 5, "stop")


def _truth(user_text: str) -> str:
    """The bundled eval rows' labels, looked up by their context (as a perfect judge would answer)."""
    rows = [json.loads(line)["messages"] for line in BUNDLED_EVAL.read_text().splitlines()]
    for messages in rows:
        if split_instruction(messages[0]["content"])[0] == split_instruction(user_text)[0]:
            return read_answer(messages[1]["content"]).label
    raise AssertionError("unknown context")


def _evaluate_scripted(monkeypatch, answer):
    import delia.generation.transformers_backend as backend_module
    from delia.evaluation.eval_data import load_eval_data
    from delia.evaluation.evaluate import evaluate_model

    monkeypatch.setattr(backend_module, "TransformersBackend", ScriptedBackend)
    data = load_eval_data(BUNDLED_EVAL, general_queries=None)
    return evaluate_model(answer, None, data)


def test_a_model_that_keeps_the_meaning_scores_full_sensitivity(monkeypatch):
    def judge(user_text):
        if "DO NOT" in user_text or "Without" in user_text or "Ignore" in user_text:
            return "In plain words: the response looks fine to me."
        return f"{{'thought': 'checked', 'hallucination': '{_truth(user_text)}'}}"

    report, generations = _evaluate_scripted(monkeypatch, judge)
    summary = report["summary"]
    assert summary["n"] == 16 and summary["parse_rate"] == 1 and summary["accuracy"] == 1 and summary["f1_yes"] == 1
    assert (
        summary["balanced_accuracy"] == 1 and summary["macro_f1"] == 1 and summary["answered_labels"] == ["yes", "no"]
    )
    from delia.evaluation.report import format_report

    assert "note:" not in format_report({**report, "target": "m", "model": {"kind": "model"}})
    assert summary["dict_rate_follow"] == 1 and summary["dict_rate_do_not"] == 0 and summary["sensitivity"] == 1
    assert report["contrast"]["verdict"].startswith("keeps the instruction's meaning")
    assert report["contrast"]["opens_dict_rate_follow"] == 1 and report["contrast"]["opens_dict_rate_do_not"] == 0
    assert len(generations) == 16 * (1 + len(DO_NOT_INSTRUCTIONS))
    assert report["follow"]["confusion"]["yes"]["yes"] == sum(row["reference"] == "yes" for row in generations[:16])


def test_a_model_that_fits_the_surface_scores_no_sensitivity(monkeypatch):
    report, _ = _evaluate_scripted(monkeypatch, lambda text: "{'thought': 'x', 'hallucination': 'no'}")
    summary = report["summary"]
    assert summary["dict_rate_follow"] == 1 and summary["dict_rate_do_not"] == 1 and summary["sensitivity"] == 0
    assert report["contrast"]["verdict"].startswith("fits the surface")
    assert summary["accuracy"] == pytest.approx(report["follow"]["confusion"]["no"]["no"] / 16)
    assert report["follow"]["recall_yes"] == 0 and report["follow"]["precision_yes"] is None
    # A constant 'no' is no judgement: balanced accuracy 50%, macro-F1 (0 + 2/3) / 2 on the balanced set, flagged
    assert summary["balanced_accuracy"] == 0.5 and summary["macro_f1"] == pytest.approx(1 / 3)
    assert summary["answered_labels"] == ["no"] and summary["f1_yes"] == 0
    from delia.evaluation.report import format_report

    printed = format_report({**report, "target": "m", "model": {"kind": "model"}})
    assert "balanced accuracy       50.0%" in printed and "macro-F1                0.333" in printed
    assert "note: every labelled answer was 'no': accuracy is that label's share of the references" in printed


def test_delia_eval_on_a_tiny_model_writes_a_consistent_report(tmp_path, capsys):
    from delia.cli import main
    from delia.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model", "chatml")
    train = write_jsonl(
        tmp_path / "train.jsonl", [json.loads(line) for line in BUNDLED_EVAL.read_text().splitlines()[:2]]
    )
    queries = write_jsonl(tmp_path / "queries.jsonl", diverse_rows(6))
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows(2))  # the first two queries were self-sampled
    command = ["eval", str(model), "--limit", "5", "--max_new_tokens", "6", "--train_dataset", str(train)]
    command += ["--general_queries", str(queries), "--exclude_cache", str(cache), "--do_not", "Do not use <sep>."]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "verdict: format not learned" in printed and "general NLL/token" in printed

    report = json.loads((model / "eval_report.json").read_text())
    generations = [json.loads(line) for line in (model / "eval_generations.jsonl").read_text().splitlines()]
    follow, contrast, summary = report["follow"], report["contrast"], report["summary"]
    assert follow["n"] == 5 == summary["n"] and len(generations) == 5 * 2
    assert sum(sum(row.values()) for row in follow["confusion"].values()) == 5
    assert follow["in_format"] == sum(g["in_format"] for g in generations if g["kind"] == "follow")
    assert contrast["n_do_not"] == 5 and contrast["do_not_instructions"][0]["instruction"] == "Do not use <sep>."
    assert all("Do not use <sep>." in g["instruction"] for g in generations if g["kind"] == "do_not")
    assert contrast["dict_rate_do_not"] == sum(g["in_format"] for g in generations if g["kind"] == "do_not") / 5
    assert summary["sensitivity"] == pytest.approx(contrast["dict_rate_follow"] - contrast["dict_rate_do_not"])
    opens = sum(g["answer"].lstrip().startswith("{") for g in generations if g["kind"] == "follow") / 5
    assert contrast["opens_dict_rate_follow"] == opens
    assert sum(phrasing["n"] for phrasing in report["by_phrasing"]) == 5
    seen = report["seen_unseen"]
    assert seen["seen"]["n"] == 2 and seen["unseen"]["n"] == 3  # the first two rows' phrasings were trained on
    assert report["general"]["excluded"] == 2 and report["general"]["n"] == 4 == summary["general_n"]
    assert report["general"]["tokens"] > 0 and math.isfinite(summary["general_nll"]) and summary["general_nll"] > 0


def test_an_adapter_folder_evaluates_as_the_trained_model(tmp_path):
    """`delia eval` on a LoRA run folder loads base + <sep> + adapter: the same logits as the model that trained."""
    import torch

    from delia import DSFTTrainer, get_peft_config, setup_tokenizer_and_model
    from delia.modeling import load_for_inference
    from delia.tiny import save_tiny_model

    base = save_tiny_model(tmp_path / "base", "chatml", tie_word_embeddings=False)
    tokenizer, model = setup_tokenizer_and_model(base)
    from delia import DSFTConfig

    args = DSFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=3, learning_rate=5e-2, per_device_train_batch_size=4,
        report_to="none", save_strategy="no", gradient_checkpointing=False, diverse_ratio=0, bf16=False,
    )  # fmt: skip
    trainer = DSFTTrainer(
        model=model,
        args=args,
        train_dataset=write_jsonl(tmp_path / "train.jsonl", downstream_rows(8)),
        processing_class=tokenizer,
        peft_config=get_peft_config(r=4),
    )
    trainer.train()
    trainer.save_model()
    loaded_tokenizer, loaded, description = load_for_inference(tmp_path / "run")
    assert description["kind"] == "adapter" and description["new_tokens"] == ["<sep>"]
    ids = loaded_tokenizer("Follow the <sep> format.", return_tensors="pt")["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<sep>") in ids[0].tolist()
    trained = trainer.model.eval()
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits
        untrained = setup_tokenizer_and_model(base)[1](input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert not torch.allclose(expected, untrained, atol=1e-3)  # training moved it, so the match above means something


def test_eval_refuses_bad_input_in_one_line(tmp_path, capsys):
    from delia.cli import main

    bad = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            downstream_rows(1)[0],
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "prose"}]},
        ],
    )
    assert main(["eval", str(tmp_path), "--eval_dataset", str(bad), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("delia eval: error: ") and "eval.jsonl, line 2" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()  # checked before any model is loaded
    assert main(["eval", "--compare", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["eval", "some/hub-model", "--limit", "0"]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err


def test_compare_prints_the_reports_side_by_side(tmp_path, capsys):
    from delia.cli import main

    def fake(folder, parse_rate, follow, do_not, nll):
        summary = {
            "n": 30, "parse_rate": parse_rate, "accuracy": 0.5, "f1_yes": None, "dict_rate_follow": follow,
            "dict_rate_do_not": do_not, "sensitivity": follow - do_not, "format_learned": follow >= 0.5,
            "general_nll": nll, "general_n": 112,
        }  # fmt: skip
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "eval_report.json").write_text(json.dumps({"summary": summary}))
        return str(tmp_path / folder)

    base, trained = fake("base", 0.0, 0.0, 0.0, 2.25), fake("sep", 0.9, 0.9, 0.1, 2.5)
    from delia import compare_reports

    assert "different held-out queries" not in compare_reports([base, trained])  # both over 112 queries
    assert main(["eval", "--compare", base, trained + "/eval_report.json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"| metric | {base} | {trained} |"
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    assert rows["parse rate"] == ["0.0%", "90.0% |"] and rows["F1 (yes)"] == ["n/a", "n/a |"]
    assert rows["sensitivity"] == ["+0.0 pts", "+80.0 pts |"] and rows["format learned"] == ["NO", "yes |"]
    assert rows["general NLL/token"] == ["2.2500", "2.5000 |"] and rows["n"] == ["30", "30 |"]
    # Reports written before balanced accuracy, macro-F1 and the labels answered existed: n/a, not an error
    assert rows["balanced accuracy"] == ["n/a", "n/a |"] and rows["macro-F1"] == ["n/a", "n/a |"]
    assert rows["labels answered"] == ["n/a", "n/a |"]


# ----------------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------------


def test_sweep_table_gives_mean_and_std_over_seeds():
    from delia.sweep import markdown_table, summarise

    def run(parse_rate, nll, learned, training=None, probe=None):
        summary = {"parse_rate": parse_rate, "general_nll": nll, "format_learned": learned, "f1_yes": None}
        layers = None if probe is None else {"layers": [{"layer": i, "score": score} for i, score in enumerate(probe)]}
        return {"summary": summary, "training": training, "probe": layers}

    trained = {"steps": 10, "epochs": 0.5, "downstream_row_visits": 24.0}
    ratio_20 = [run(0.5, 2.1, True, trained, probe=[0.0, 0.4]), run(0.7, 2.3, False, trained, probe=[0.0, 0.8])]
    old = run(0.1, 2.5, False, {"steps": 10})  # a report written before epochs and row-visits were recorded
    rows = summarise({"base": [run(0.0, 2.0, False)], "ratio-20": ratio_20, "ratio-0": [old]})
    assert rows[1]["runs"] == 2 and rows[1]["format_learned"] == 1 and rows[1]["steps"] == 10
    assert rows[1]["epochs"] == 0.5 and rows[1]["downstream_row_visits"] == 24
    assert rows[1]["parse_rate_mean"] == pytest.approx(0.6) and rows[1]["parse_rate_std"] == pytest.approx(
        0.1414, abs=1e-4
    )
    assert rows[0]["parse_rate_std"] is None and rows[1]["f1_yes_mean"] is None
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| run | runs | steps | epochs | downstream row-visits | format learned | parse rate |")
    assert "| accuracy | balanced accuracy | macro-F1 | F1 (yes) |" in table[0]
    assert (
        table[3].startswith("| ratio-20 | 2 | 10 | 0.5 | 24 | 1/2 | 60.0% ± 14.1 |") and "2.2000 ± 0.1414" in table[3]
    )
    assert table[2].startswith("| base | 1 |  |  |  | 0/1 |")  # the base model trains nothing
    assert table[4].startswith("| ratio-0 | 1 | 10 |  |  | 0/1 | 10.0% |")  # not recorded: blank, not 0
    assert "| n/a |" in table[3]  # F1 measured in no run; balanced accuracy absent from these summaries
    assert rows[0]["probe_score_mean"] is None  # the base model is not probed
    # the probe's summary score: the mean over the upper half of the blocks (here the one block: 0.4 and 0.8)
    assert rows[1]["probe_score_mean"] == pytest.approx(0.6) and table[3].endswith("| 0.600 ± 0.283 |")
    unprobed = markdown_table(summarise({"ratio-0": [old], "ratio-20": [run(0.5, 2.1, True, trained)]}))
    assert "<sep> probe" not in unprobed and "<sep> probe" in table[0]  # no run probed: no column of n/a


def test_frontier_places_each_arm_by_format_rate_and_change_in_general_nll(tmp_path):
    from delia.evaluation.sweep_table import frontier_points, plot_frontier, summarise

    def run(follow, nll):
        return {"summary": {"dict_rate_follow": follow, "general_nll": nll, "format_learned": follow > 0.5}}

    reports = {"ratio-0-epochs-10": [run(0.9, 2.6)], "base": [run(0.0, 2.5)], "ratio-100-epochs-1": [run(0.4, 2.3)]}
    reports["ratio-30-epochs-1"] = [run(0.6, None)]  # no general NLL measured: no point, rather than a made-up one
    rows = summarise(reports)
    points = frontier_points(rows)
    assert [name for name, _, _ in points] == ["ratio-0-epochs-10", "ratio-100-epochs-1"]
    assert points[0][1:] == pytest.approx((0.1, 0.9)) and points[1][1:] == pytest.approx((-0.2, 0.4))
    path = plot_frontier(rows, str(tmp_path), file_format="svg")
    assert path == str(tmp_path / "sweep_frontier.svg") and "ratio-100-epochs-1" in open(path, encoding="utf-8").read()
    without_base = [row for row in rows if row["run"] != "base"]
    assert frontier_points(without_base) == [] and plot_frontier(without_base, str(tmp_path / "none")) is None


def test_sweep_trains_evaluates_and_resumes(tmp_path, monkeypatch, capsys):
    import delia.train
    from delia.cli import main
    from delia.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model", "chatml")
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(8))
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows(12))
    queries = write_jsonl(tmp_path / "queries.jsonl", diverse_rows(14))  # 2 held out of the cache's 12
    output = tmp_path / "sweep"
    command = ["sweep", "--model_name_or_path", str(model), "--train_dataset", str(train)]
    command += ["--diverse_dataset", str(cache), "--ratios", "0", "1", "--seeds", "3", "--max_steps", "2"]
    command += ["--per_device_train_batch_size", "4", "--lora_r", "4", "--output_dir", str(output), "--limit", "2"]
    command += ["--max_new_tokens", "4", "--general_queries", str(queries), "--include_base", "false"]
    command += ["--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "false"]
    assert main(command) == 0
    capsys.readouterr()

    reports = {}
    for ratio in ("0", "1"):
        folder = output / f"ratio-{ratio}" / "seed-3"
        assert (folder / "adapter_config.json").exists()
        reports[ratio] = json.loads((folder / "eval_report.json").read_text())
        assert reports[ratio]["training"]["steps"] == 2
        assert 0 < reports[ratio]["training"]["train_seconds"] < reports[ratio]["training"]["seconds"]
        assert reports[ratio]["general"]["n"] == 2  # the cache's queries are not held out
        assert reports[ratio]["seen_unseen"] == {"seen": None, "unseen": reports[ratio]["follow"]}  # bundled phrasings
    mixture = json.loads((output / "ratio-1" / "seed-3" / "delia_mixture.json").read_text())
    assert mixture["sources"]["diverse"]["rows"] == 8 and mixture["diverse_seed"] == 3
    # The same 2 steps of 4 rows: one epoch over ratio 0's 8 rows, half an epoch over ratio 1's 16 (8 downstream)
    assert reports["0"]["training"]["epochs"] == 1 and reports["0"]["training"]["downstream_row_visits"] == 8
    assert reports["1"]["training"]["epochs"] == 0.5 and reports["1"]["training"]["downstream_row_visits"] == 4
    assert "diverse" not in json.loads((output / "ratio-0" / "seed-3" / "delia_mixture.json").read_text())["sources"]

    table = (output / "sweep.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| ratio-0", "| ratio-1"]
    csv_rows = (output / "sweep.csv").read_text().splitlines()
    ratio1 = dict(zip(csv_rows[0].split(","), csv_rows[2].split(","), strict=True))
    assert ratio1["runs"] == "1" and float(ratio1["general_nll_mean"]) == reports["1"]["summary"]["general_nll"]
    assert (output / "sweep_general_nll.png").read_bytes()[:4] == b"\x89PNG"
    assert not (output / "sweep_frontier.png").exists()  # no base model evaluated: no change in NLL to place arms by

    # Resume: every run is finished, so nothing trains again
    stamps = {path: path.stat().st_mtime_ns for path in output.glob("ratio-*/seed-*/eval_report.json")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(delia.train, "build_trainer", no_training)
    assert not (output / "sweep_general_nll.svg").exists()
    assert main(command + ["--figure_formats", "png", "svg"]) == 0  # the figures' formats are not a run setting
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert (output / "sweep.md").read_text().splitlines() == table
    assert (output / "sweep_general_nll.svg").read_text().lstrip().startswith("<?xml")
    assert main(command + ["--figure_formats", "bmpx"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--figure_formats: 'bmpx' is not one of" in error and len(error.splitlines()) == 1

    # Other settings in the same folder: refused, not silently mixed
    changed = [
        value if value != "2" or previous != "--max_steps" else "3"
        for previous, value in zip([""] + command[:-1], command, strict=True)
    ]
    assert main(changed) == 2
    assert "other settings" in capsys.readouterr().err


def test_compare_shows_balanced_accuracy_macro_f1_and_the_labels_answered(tmp_path):
    from delia.evaluation.report import compare_reports

    folders = []
    for name, answered in (("always-no", ["no"]), ("judge", ["yes", "no"]), ("prose", [])):
        summary = {"accuracy": 0.8125, "balanced_accuracy": 0.5, "macro_f1": 13 / 29, "answered_labels": answered}
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_report.json").write_text(json.dumps({"summary": summary}))
        folders.append(str(tmp_path / name))
    table = compare_reports(folders, ["a", "b", "c"])
    assert "| balanced accuracy | 50.0% | 50.0% | 50.0% |" in table and "| macro-F1 | 0.448 | 0.448 | 0.448 |" in table
    assert "| labels answered | no only | yes, no | none |" in table


def test_sweep_trains_each_arm_its_own_epochs_and_records_steps_and_row_visits(tmp_path, monkeypatch, capsys):
    import delia.train
    from delia.cli import main
    from delia.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model", "chatml")
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(4))
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows(8))
    queries = write_jsonl(tmp_path / "queries.jsonl", diverse_rows(10))
    output = tmp_path / "sweep"
    command = ["sweep", "--model_name_or_path", str(model), "--train_dataset", str(train)]
    command += ["--diverse_dataset", str(cache), "--arms", "0:1", "0:2", "1:1", "--seeds", "3", "--max_steps", "5"]
    command += ["--per_device_train_batch_size", "4", "--lora_r", "4", "--output_dir", str(output), "--limit", "2"]
    command += ["--max_new_tokens", "4", "--general_queries", str(queries), "--include_base", "false"]
    command += ["--probe", "false", "--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "false"]
    assert main(command) == 0
    capsys.readouterr()

    # Each arm trains its own epochs over its mixture (--max_steps does not apply): 4 downstream rows, batches of 4
    expected = {  # arm: (steps, epochs, downstream row-visits, diverse rows)
        "ratio-0-epochs-1": (1, 1, 4, None),
        "ratio-0-epochs-2": (2, 2, 8, None),
        "ratio-1-epochs-1": (2, 1, 4, 4),
    }
    for name, (steps, epochs, visits, diverse) in expected.items():
        report = json.loads((output / name / "seed-3" / "eval_report.json").read_text())
        training = report["training"]
        assert training["steps"] == steps and training["epochs"] == pytest.approx(epochs)
        assert training["downstream_row_visits"] == pytest.approx(visits)
        assert training["rows"]["downstream"] == 4 and training["rows"].get("diverse") == diverse
        assert report["sweep"]["epochs"] == epochs and report["sweep"]["budget"] == "epoch"
        assert report["sweep"]["max_steps"] is None and report["sweep"]["ratio"] == float(name.split("-")[1])
    table = (output / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| run | runs | steps | epochs | downstream row-visits | format learned |")
    assert [line.split(" | ")[:5] for line in table[2:]] == [
        ["| ratio-0-epochs-1", "1", "1", "1", "4"],
        ["| ratio-0-epochs-2", "1", "2", "2", "8"],
        ["| ratio-1-epochs-1", "1", "2", "1", "4"],
    ]
    csv_header = (output / "sweep.csv").read_text().splitlines()[0].split(",")
    assert {"steps", "epochs", "downstream_row_visits", "balanced_accuracy_mean", "macro_f1_mean"} <= set(csv_header)

    # Resume: every arm is finished, so nothing trains again
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(delia.train, "build_trainer", no_training)
    assert main(command) == 0
    assert (output / "sweep.md").read_text().splitlines() == table
    capsys.readouterr()

    # An arm's epochs are part of its settings: a folder that records other epochs is refused, not reused
    path = output / "ratio-0-epochs-2" / "seed-3" / "eval_report.json"
    report = json.loads(path.read_text())
    report["sweep"]["epochs"] = 3
    path.write_text(json.dumps(report))
    assert main(command) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--arms", "0:1", "--ratios", "0"],
            "give --ratios (one budget for all) or --arms (RATIO:EPOCHS each), not both",
        ),
        (["--arms", "0:1", "--budget", "steps"], "--arms gives each arm its epochs; --budget steps does not apply"),
        (["--arms", "0-3"], "--arms: '0-3' is not RATIO:EPOCHS"),
        (["--arms=-1:1"], "--arms: '-1:1' is not RATIO:EPOCHS with RATIO >= 0"),
        (["--arms", "0:0"], "--arms: '0:0' has '0' epochs; expected a number above 0"),
        (["--arms", "0:nan"], "--arms: '0:nan' has 'nan' epochs"),
        (["--arms", "0:1", "0:1.0"], "--arms lists 0:1 more than once"),
        ([], "give --ratios, e.g. --ratios 0 20 67 260, or --arms RATIO:EPOCHS"),
    ],
)
def test_sweep_arms_refuse_bad_input_in_one_line(options, message, tmp_path, capsys):
    from delia.cli import main

    output = tmp_path / "sweep"
    command = [
        "sweep",
        "--model_name_or_path",
        "m",
        "--train_dataset",
        "t.jsonl",
        "--output_dir",
        str(output),
        *options,
    ]
    assert main(command) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not output.exists()


def test_sweep_ratios_keep_their_folders_and_settings():
    """--ratios runs keep the folder names and settings keys of sweeps written before --arms, so those resume."""
    from types import SimpleNamespace

    from delia.sweep import Arm, SweepArguments, _settings, run_folder

    model_args = SimpleNamespace(model_name_or_path="m", train_dataset="t.jsonl")
    args = SimpleNamespace(diverse_dataset="c.jsonl", max_steps=30)
    assert run_folder("out", 4.0, 0) == run_folder("out", Arm(4.0), 0) == "out/ratio-4/seed-0"
    assert run_folder("out", Arm(0.0, 3.0), 1) == "out/ratio-0-epochs-3/seed-1"
    assert _settings(model_args, args, Arm(4.0), 0, "steps") == {
        "model": "m", "train_dataset": "t.jsonl", "diverse_dataset": "c.jsonl", "ratio": 4.0, "seed": 0,
        "budget": "steps", "max_steps": 30,
    }  # fmt: skip
    assert _settings(model_args, args, Arm(0.0, 3.0), 0, "epoch")["epochs"] == 3.0
    sweep = SweepArguments(ratios=[0, 20], budget="epoch")
    assert sweep.plan() == [Arm(0.0), Arm(20.0)] and SweepArguments(ratios=[1]).budget == "steps"
    assert SweepArguments(arms=["0:1", "30:1"]).budget == "epoch"


def test_compare_says_when_the_general_nlls_are_over_different_queries(tmp_path):
    from delia.evaluation.report import compare_reports

    folders = []
    for name, held_out in (("base", 128), ("trained", 12)):
        (tmp_path / name).mkdir()
        summary = {"n": 16, "general_nll": 6.9, "general_n": held_out}
        (tmp_path / name / "eval_report.json").write_text(json.dumps({"summary": summary}))
        folders.append(str(tmp_path / name))
    table = compare_reports(folders)
    assert "| general queries | 128 | 12 |" in table and "different held-out queries" in table
