"""Scoring `<sep>`-format answers: format adherence, the yes/no label against the reference, a confusion matrix.

An answer *follows the format* when `parse_structured` finds a dict in it with the keys 'thought' and
'hallucination'. Its label is the 'hallucination' value, normalised (case and whitespace); an answer out of format,
or with a label other than yes / no, lands in the "unparsed" column of the confusion matrix and counts as wrong.

Accuracy alone can mislead: on a set that is mostly 'no', a model that always answers 'no' scores the majority
share. Balanced accuracy (the mean recall over the labels the references hold) and macro-F1 (the mean F1 over the
labels) give such a model 50% and at most about 0.5; `answered_labels` says which labels a model gave at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .parse import parse_structured

FORMAT_KEYS = ("thought", "hallucination")
LABELS = ("yes", "no")  # reference labels: the rows of the confusion matrix
PREDICTED = ("yes", "no", "unparsed")  # predicted labels: its columns


def normalise_label(value: Any) -> str | None:
    """'yes' or 'no' from a label such as ' Yes ' or 'NO'; None for anything else."""
    if not isinstance(value, str):
        return None
    label = " ".join(value.split()).lower()
    return label if label in LABELS else None


@dataclass(frozen=True)
class Answer:
    """One reply read: whether it follows the `<sep>` format, and its yes/no label (None when it has none)."""

    in_format: bool
    label: str | None
    parsed: dict | None


def read_answer(text: str) -> Answer:
    """Parse one reply (safely, see `parse_structured`) and read its format and label."""
    parsed = parse_structured(text)
    in_format = parsed is not None and all(key in parsed for key in FORMAT_KEYS)
    return Answer(in_format, normalise_label(parsed["hallucination"]) if in_format else None, parsed)


def reference_label(text: str) -> str | None:
    """The yes/no label of a reference answer, or None when it has none."""
    return read_answer(text).label


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(frozen=True)
class LabelScores:
    """Format adherence and label quality over a set of answers; rates are None where their denominator is 0."""

    n: int
    in_format: int
    confusion: dict[str, dict[str, int]]  # confusion[reference][predicted], reference in LABELS, predicted in PREDICTED

    @property
    def correct(self) -> int:
        return sum(self.confusion[label][label] for label in LABELS)

    @property
    def labelled(self) -> int:
        """Answers with a yes/no label (in format, label valid)."""
        return sum(self.confusion[reference][label] for reference in LABELS for label in LABELS)

    @property
    def parse_rate(self) -> float | None:
        return _ratio(self.in_format, self.n)

    @property
    def accuracy(self) -> float | None:
        """Correct labels over all answers (an unparsed answer is wrong)."""
        return _ratio(self.correct, self.n)

    @property
    def accuracy_labelled(self) -> float | None:
        """Correct labels over the answers that have one."""
        return _ratio(self.correct, self.labelled)

    def precision(self, label: str) -> float | None:
        """Of the answers labelled `label`, the share whose reference is `label` (None when none is)."""
        return _ratio(self.confusion[label][label], sum(self.confusion[reference][label] for reference in LABELS))

    def recall(self, label: str) -> float | None:
        """Of the references labelled `label`, the share answered `label` (an unparsed answer is a miss)."""
        return _ratio(self.confusion[label][label], sum(self.confusion[label].values()))

    def f1(self, label: str) -> float | None:
        """2·TP / (2·TP + FP + FN): 0 for a label the references hold but the model never gives (or only wrongly);
        None only when the label is neither in the references nor among the answers."""
        true_positive = self.confusion[label][label]
        false_positive = sum(self.confusion[reference][label] for reference in LABELS if reference != label)
        false_negative = sum(self.confusion[label].values()) - true_positive
        return _ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative)

    @property
    def precision_yes(self) -> float | None:
        return self.precision("yes")

    @property
    def recall_yes(self) -> float | None:
        return self.recall("yes")

    @property
    def f1_yes(self) -> float | None:
        return self.f1("yes")

    @property
    def f1_no(self) -> float | None:
        return self.f1("no")

    @property
    def balanced_accuracy(self) -> float | None:
        """The mean recall over the labels the references hold: at most 50% for a model that answers one label only."""
        recalls = [recall for recall in map(self.recall, LABELS) if recall is not None]
        return sum(recalls) / len(recalls) if recalls else None

    @property
    def macro_f1(self) -> float | None:
        """The mean F1 over the labels in the references or the answers (0 for one that is never answered right)."""
        scores = [score for score in map(self.f1, LABELS) if score is not None]
        return sum(scores) / len(scores) if scores else None

    @property
    def answered_labels(self) -> list[str]:
        """The yes/no labels the model gave at least once, in LABELS order (one label only: a constant answer)."""
        return [label for label in LABELS if any(self.confusion[reference][label] for reference in LABELS)]

    def as_dict(self) -> dict[str, Any]:
        """Counts and rates, as written to the report."""
        return {
            "n": self.n,
            "in_format": self.in_format,
            "correct": self.correct,
            "parse_rate": self.parse_rate,
            "accuracy": self.accuracy,
            "accuracy_labelled": self.accuracy_labelled,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "precision_yes": self.precision_yes,
            "recall_yes": self.recall_yes,
            "f1_yes": self.f1_yes,
            "f1_no": self.f1_no,
            "answered_labels": self.answered_labels,
            "confusion": self.confusion,
        }


def score_answers(references: Sequence[str], answers: Sequence[Answer]) -> LabelScores:
    """Score answers against reference labels ('yes' / 'no', one per answer)."""
    if len(references) != len(answers):
        raise ValueError(f"{len(references)} reference labels for {len(answers)} answers; expected one each")
    confusion = {reference: dict.fromkeys(PREDICTED, 0) for reference in LABELS}
    for reference, answer in zip(references, answers, strict=True):
        if reference not in LABELS:
            raise ValueError(f"reference label {reference!r}: expected one of {', '.join(LABELS)}")
        confusion[reference][answer.label or "unparsed"] += 1
    return LabelScores(len(answers), sum(answer.in_format for answer in answers), confusion)


def format_rate(answers: Sequence[Answer]) -> float | None:
    """Share of answers that follow the `<sep>` format (None for no answers)."""
    return _ratio(sum(answer.in_format for answer in answers), len(answers))
