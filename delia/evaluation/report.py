"""Printing and comparing `delia eval` reports: the report as a table, and several runs' summaries side by side."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from ..data import DataFormatError
from ..io import read_json
from ..run_files import EVAL_REPORT_FILE

#: The rows of the comparison table: (summary key, label). A report written before a key existed shows n/a there.
SUMMARY_ROWS = (
    ("parse_rate", "parse rate"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro-F1"),
    ("f1_yes", "F1 (yes)"),
    ("answered_labels", "labels answered"),
    ("dict_rate_follow", "dict rate, follow"),
    ("dict_rate_do_not", "dict rate, DO-NOT"),
    ("sensitivity", "sensitivity"),
    ("format_learned", "format learned"),
    ("general_nll", "general NLL/token"),
    ("general_n", "general queries"),
    ("n", "n"),
)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _cell(key: str, value: Any) -> str:
    """A summary value as a table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if key == "sensitivity":
        return f"{value * 100:+.1f} pts"
    if key in ("f1_yes", "macro_f1"):
        return f"{value:.3f}"
    if key == "answered_labels":
        return "none" if not value else f"{value[0]} only" if len(value) == 1 else ", ".join(value)
    if key == "general_nll":
        return f"{value:.4f}"
    if isinstance(value, float):
        return _percent(value)
    return str(value)


def one_label_note(answered: Sequence[str] | None) -> str | None:
    """A warning when a model gave one label only (or none): its accuracy is then a label's share, not a judgement."""
    if answered is None or len(answered) > 1:
        return None
    if not answered:
        return "no answer gave a yes/no label"
    return f"every labelled answer was {answered[0]!r}: accuracy is that label's share of the references"


def format_report(report: dict[str, Any]) -> str:
    """The report as a printed table."""
    scores, contrast, general = report["follow"], report["contrast"], report["general"]
    confusion = scores["confusion"]
    lines = [
        f"delia eval: {report.get('target', 'model')} ({report.get('model', {}).get('kind', 'model')}), "
        f"{scores['n']} eval rows from {report['eval_dataset']}, {report['seconds']} s",
        f"  format (parse rate)   {_percent(scores['parse_rate']):>7}  ({scores['in_format']}/{scores['n']})",
        f"  accuracy              {_percent(scores['accuracy']):>7}  ({scores['correct']}/{scores['n']}; "
        f"{_percent(scores['accuracy_labelled'])} of the answers with a yes/no label)",
        f"  balanced accuracy     {_percent(scores.get('balanced_accuracy')):>7}  (mean recall over yes and no)",
        f"  macro-F1              {_cell('macro_f1', scores.get('macro_f1')):>7}  (F1 yes {_cell('f1_yes', scores['f1_yes'])}, "
        f"no {_cell('f1_yes', scores.get('f1_no'))})",
        f"  F1 (yes)              {_cell('f1_yes', scores['f1_yes']):>7}  (precision "
        f"{_cell('f1_yes', scores['precision_yes'])}, recall {_cell('f1_yes', scores['recall_yes'])})",
        "  confusion (rows: reference; columns: predicted)",
        f"  {'':>10}{'yes':>8}{'no':>8}{'unparsed':>10}",
    ]
    for reference in ("yes", "no"):
        row = confusion[reference]
        lines.append(f"  {reference:>10}{row['yes']:>8}{row['no']:>8}{row['unparsed']:>10}")
    one_label = one_label_note(scores.get("answered_labels"))
    if one_label:
        lines.append(f"  note: {one_label}")
    lines += [
        "  <sep> contrast        follow  DO-NOT",
        f"  dict rate             {_percent(contrast['dict_rate_follow']):>6}  {_percent(contrast['dict_rate_do_not']):>6}"
        f"   (not dict when told not to: {_percent(contrast['not_dict_rate_do_not'])})",
        f"  opens with '{{'        {_percent(contrast['opens_dict_rate_follow']):>6}  "
        f"{_percent(contrast['opens_dict_rate_do_not']):>6}   (parsable or not: a trace of the surface being learned)",
        f"  sensitivity           {_cell('sensitivity', contrast['sensitivity'])}",
        f"  verdict: {contrast['verdict']}",
    ]
    if general:
        lines.append(
            f"  general NLL/token     {_cell('general_nll', general['nll_per_token'])}  ({general['n']} held-out "
            f"queries of {general['queries']}, {general['excluded']} excluded, {general['tokens']} tokens)"
        )
    if report.get("seen_unseen"):
        for key, scored in report["seen_unseen"].items():
            if scored:
                lines.append(
                    f"  {key + ' phrasings':<22}{_percent(scored['accuracy']):>7} accuracy, "
                    f"{_percent(scored['parse_rate'])} format, n={scored['n']}"
                )
    lines.append(f"  {'by phrasing':<70}{'n':>4}{'format':>8}{'accuracy':>10}  seen")
    for phrasing in report["by_phrasing"]:
        text = phrasing["instruction"]
        text = text if len(text) <= 68 else text[:65] + "..."
        seen = "" if phrasing["seen"] is None else ("seen" if phrasing["seen"] else "unseen")
        lines.append(
            f"  {text:<70}{phrasing['n']:>4}{_percent(phrasing['parse_rate']):>8}{_percent(phrasing['accuracy']):>10}"
            f"  {seen}"
        )
    return "\n".join(lines)


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """A report from its file or from the folder that holds eval_report.json; errors name the path."""
    path = os.fspath(path)
    file = os.path.join(path, EVAL_REPORT_FILE) if os.path.isdir(path) else path
    try:
        report = read_json(file, "an eval report (run `delia eval` on it first)")
    except ValueError as error:
        raise DataFormatError(str(error)) from None
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        raise DataFormatError(f"{file}: no 'summary' object; expected a report written by `delia eval`")
    return report


def compare_reports(paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None) -> str:
    """The reports' summaries side by side: a markdown table with one column per run."""
    summaries = [read_report(path)["summary"] for path in paths]
    names = list(names) if names is not None else [_run_name(path) for path in paths]
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key, label in SUMMARY_ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(key, summary.get(key)) for summary in summaries) + " |")
    if len({summary.get("general_n") for summary in summaries if summary.get("general_n")}) > 1:
        lines.append(
            "\nnote: the general NLLs are over different held-out queries (a run's own cache is left out of its "
            "set); evaluate the others with --exclude_cache naming that cache to compare them"
        )
    return "\n".join(lines)


def _run_name(path: str | os.PathLike) -> str:
    """A column title for a run: its folder's path (the report's folder for a report file)."""
    path = os.path.normpath(os.fspath(path))
    return os.path.dirname(path) if path.endswith(EVAL_REPORT_FILE) else path
