"""The kit's report: `report.json` and `report.md`, rewritten atomically after every check and every phase.

A killed run keeps what finished. A report already in the output folder is read first and its phases that this call
does not run are kept, so the kit can be run phase by phase in separate device calls into one report.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def one_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place (never half a report)."""
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)


class Report:
    """The whole report: run metadata and one record per phase, saved on every change."""

    def __init__(self, out: Path, meta: dict[str, Any]):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        previous = self._read_previous()
        self.data: dict[str, Any] = {
            "meta": meta,
            "phases": previous.get("phases", {}),
            "calls": previous.get("calls", []),
        }
        self.data["calls"].append({k: meta[k] for k in ("started", "argv") if k in meta})
        self.save()

    def _read_previous(self) -> dict[str, Any]:
        try:
            return json.loads((self.out / REPORT_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def phase(self, name: str, budget_s: float) -> dict[str, Any]:
        """A fresh record for phase `name` (replacing one from an earlier call)."""
        record = {
            "status": "running",
            "budget_s": round(budget_s),
            "seconds": 0.0,
            "checks": [],
            "metrics": {},
            "cuts": [],
        }
        self.data["phases"][name] = record
        self.save()
        return record

    def save(self) -> None:
        write_atomically(self.out / REPORT_JSON, json.dumps(self.data, indent=2, default=str) + "\n")
        write_atomically(self.out / REPORT_MD, to_markdown(self.data))


def _cell(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")[:400]


def to_markdown(data: dict[str, Any]) -> str:
    """The report as markdown: metadata, then per phase its checks, metrics and cuts."""
    meta = data["meta"]
    lines = ["# delia GPU kit report", ""]
    lines += [f"- {key}: {_cell(value)}" for key, value in meta.items()]
    for name, phase in data["phases"].items():
        lines += ["", f"## {name}: {phase['status']} ({phase['seconds']:.0f} s of {phase['budget_s']} s)", ""]
        if phase["checks"]:
            lines += ["| check | status | s | details |", "| --- | --- | --- | --- |"]
            for check in phase["checks"]:
                detail = check.get("error") or check.get("details") or ""
                lines.append(f"| {check['name']} | {check['status']} | {check['seconds']:.1f} | {_cell(detail)} |")
        if phase["metrics"]:
            lines += ["", "| metric | value |", "| --- | --- |"]
            lines += [f"| {key} | {_cell(value)} |" for key, value in phase["metrics"].items()]
        if phase["cuts"]:
            lines += ["", "Cut to fit the budget:"] + [f"- {cut}" for cut in phase["cuts"]]
    return "\n".join(lines) + "\n"


@dataclass
class PhaseContext:
    """What a phase gets: where to write, its deadline, its sizes, the device, and ways to record results."""

    name: str
    report: Report
    record: dict[str, Any]
    deadline: float  # time.monotonic() at which this phase must stop (its budget, or the total's, whichever is first)
    sizes: Any
    device: str
    dry_run: bool
    workdir: Path
    shared: dict[str, Any] = field(default_factory=dict)  # results later phases reuse (peaks, model folders)
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds left before this phase's deadline."""
        return self.deadline - time.monotonic()

    def fits(self, estimate_s: float, what: str) -> bool:
        """Whether `estimate_s` more seconds (on the H200; scaled down for the dry run's tiny sizes) fit.

        If not, record the cut and return False.
        """
        estimate_s *= self.sizes.estimate_scale
        if estimate_s <= self.left():
            return True
        self.cut(f"{what}: needs ~{estimate_s:.0f} s, {max(self.left(), 0):.0f} s left")
        return False

    def metric(self, key: str, value: Any) -> None:
        self.record["metrics"][key] = round(value, 4) if isinstance(value, float) else value
        self.report.save()

    def cut(self, text: str) -> None:
        self.record["cuts"].append(text)
        self.report.save()

    def skip(self, name: str, reason: str) -> None:
        self._add(name, "skipped", 0.0, error=reason)

    def check(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run `fn`; pass when it returns (its dict return value becomes the details), fail with its error.

        Returns what `fn` returned, or None when it failed. A check that fails never stops the phase.
        """
        started = time.monotonic()
        try:
            value = fn()
        except Exception as error:  # a failed check is a result, recorded; the phase goes on
            self._add(name, "fail", time.monotonic() - started, error=one_line(error))
            self.record.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
            self.report.save()
            return None
        details = value if isinstance(value, dict) else None
        self._add(name, "pass", time.monotonic() - started, details=details)
        return value

    def _add(self, name: str, status: str, seconds: float, **extra: Any) -> None:
        entry = {"name": name, "status": status, "seconds": round(seconds, 2)}
        entry.update({key: value for key, value in extra.items() if value is not None})
        self.record["checks"].append(entry)
        self.record["seconds"] = round(time.monotonic() - self.started, 1)
        self.report.save()
