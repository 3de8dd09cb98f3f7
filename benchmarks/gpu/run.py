"""delia's GPU kit: one prepared command that checks the CUDA half of delia and measures it on a lent GPU.

    python benchmarks/gpu/run.py --dry-run --out runs/gpu-dry            # every phase on the CPU, tiny sizes (CI)
    python benchmarks/gpu/run.py --phases env,cuda,perf --out /tmp/delia-gpu/out   # on the GPU machine
    python benchmarks/gpu/run.py --phases regime --out /tmp/delia-gpu/out          # same report, next call

Phases (gpukit/): env (versions, bf16 and bandwidth ceilings), cuda (bf16 / 8-bit / 4-bit training and reload,
build_cache and delia eval on the GPU), perf (DSFTTrainer vs SFTTrainer, training throughput and MFU, generation
against the bandwidth roofline), regime (SmolLM2-135M at ratio 260 for one epoch against plain SFT). Each phase has a
time budget and the call a total one; `report.json` and `report.md` in --out are rewritten after every check, and a
report already there keeps the phases this call does not run. Bad input (an unknown phase, a missing or corrupt
staged part, a missing package, no CUDA outside --dry-run) is one line and exit 2, before any work. Exit 1 when a
check failed, else 0. benchmarks/gpu/README.md has the device calls that stage and run it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

PHASES = ("env", "cuda", "perf", "regime")
#: Seconds per phase on the H200 (the README's calls: env in call 1, cuda + perf in call 2, regime in call 3).
GPU_BUDGETS = {"env": 30, "cuda": 130, "perf": 210, "regime": 290}
#: Seconds per phase on the dry run (each takes well under this on 2 busy cores).
DRY_BUDGETS = {"env": 30, "cuda": 90, "perf": 90, "regime": 120}
DEFAULT_STAGED = Path("/tmp/delia-gpu")
README = "benchmarks/gpu/README.md"
#: Packages the GPU image lacks and the staged wheels bring (call 1), by the phases that need them.
NEEDED = {
    "cuda": ("trl", "datasets", "peft", "bitsandbytes"),
    "perf": ("trl", "datasets", "peft", "bitsandbytes"),
    "regime": ("trl", "datasets", "peft", "gguf"),
}


@dataclass
class Options:
    """What one call of the kit runs, where it writes, and how long it may take."""

    phases: list[str]
    out: Path
    budget: float | None  # total seconds for this call; None: the sum of the phases' budgets
    dry_run: bool
    staged: Path  # where `stage.py unpack` put the staged model parts (and the converted model)
    workdir: Path | None  # scratch for models and runs; None: <out>/work

    def budgets(self) -> dict[str, float]:
        return DRY_BUDGETS if self.dry_run else GPU_BUDGETS

    def total(self) -> float:
        return self.budget if self.budget is not None else sum(self.budgets()[p] for p in self.phases)


def parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, in order: {', '.join(PHASES)}")
    parser.add_argument("--out", default="runs/gpu-kit", help="folder for report.json and report.md")
    parser.add_argument("--budget", type=float, default=None, help="total seconds (default: the phases' budgets)")
    parser.add_argument("--dry-run", action="store_true", help="every phase on the CPU with tiny models and sizes")
    parser.add_argument("--staged", default=str(DEFAULT_STAGED), help="the staged folder on the GPU machine")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: <out>/work)")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    return Options(
        phases,
        Path(args.out),
        args.budget,
        args.dry_run,
        Path(args.staged),
        Path(args.workdir) if args.workdir else None,
    )


def bad_input(options: Options) -> str | None:
    """One line saying what is missing and how to get it, or None; cheap checks only, before any work."""
    unknown = [p for p in options.phases if p not in PHASES]
    if unknown or not options.phases:
        return f"unknown phase {', '.join(map(repr, unknown)) or '(none given)'}; choose from {', '.join(PHASES)}"
    if options.budget is not None and options.budget <= 0:
        return f"--budget must be a positive number of seconds, got {options.budget:g}"
    if options.dry_run:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpukit.staged import model_problem

    if "regime" in options.phases and (problem := model_problem(options.staged)):
        return problem
    for phase in options.phases:
        for package in NEEDED.get(phase, ()):
            if importlib.util.find_spec(package) is None:
                return (
                    f"package {package} is not installed (phase {phase}): carry the staged wheels and install "
                    f"them with call 1 of {README} (python benchmarks/gpu/stage.py fetch stages them)"
                )
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU visible: run the kit on the device machine ({README}), or pass --dry-run to rehearse it"
    return None


def quiet_libraries() -> None:
    """Keep the output to the kit's own lines: no progress bars, no per-step warnings, no hub calls."""
    import logging
    import warnings

    for key, value in (
        ("TOKENIZERS_PARALLELISM", "false"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("delia").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def run_phases(options: Options) -> int:
    """Run the phases in order under their budgets; returns the exit status (1 when a check failed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpukit import cuda, env, perf, regime
    from gpukit.common import dry_sizes, gpu_sizes
    from gpukit.report import PhaseContext, Report, one_line

    functions = {"env": env.run, "cuda": cuda.run, "perf": perf.run, "regime": regime.run}
    started = time.monotonic()
    total_deadline = started + options.total()
    meta = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "dry_run": options.dry_run,
        "host": platform.node(),
        "budget_s": options.total(),
    }
    report = Report(options.out, meta)
    import torch

    device = "cuda" if torch.cuda.is_available() and not options.dry_run else "cpu"
    workdir = options.workdir or options.out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    earlier = report.data["phases"].get("env", {}).get("metrics", {})  # peaks from an earlier call's env phase
    shared = {"staged": str(options.staged)}
    if "peak_bf16_tflops" in earlier and "peak_copy_gbs" in earlier:
        shared.update(peak_tflops=earlier["peak_bf16_tflops"], peak_gbs=earlier["peak_copy_gbs"])
    sizes = dry_sizes() if options.dry_run else gpu_sizes()
    failed = False
    for name in options.phases:
        budget = options.budgets()[name]
        record = report.phase(name, budget)
        deadline = min(time.monotonic() + budget, total_deadline)
        if deadline - time.monotonic() < 1:
            record["status"] = "skipped: the call's total budget is spent"
            report.save()
            continue
        ctx = PhaseContext(name, report, record, deadline, sizes, device, options.dry_run, workdir, shared)
        try:
            functions[name](ctx)
            record["status"] = "done"
        except Exception as error:  # an unexpected error ends this phase, not the kit
            record["status"] = f"failed: {one_line(error)}"
            record.setdefault("tracebacks", {})["phase"] = traceback.format_exc()[-3000:]
        record["seconds"] = round(time.monotonic() - ctx.started, 1)
        phase_failed = record["status"] != "done" or any(c["status"] == "fail" for c in record["checks"])
        failed = failed or phase_failed
        report.save()
        counts = {s: sum(c["status"] == s for c in record["checks"]) for s in ("pass", "fail", "skipped")}
        print(
            f"phase {name}: {record['status']}, {record['seconds']:.0f} s of {budget} s, "
            f"checks {counts}, cuts {len(record['cuts'])}",
            flush=True,
        )
        for check in record["checks"]:
            if check["status"] == "fail":
                print(f"  FAIL {check['name']}: {check.get('error')}", flush=True)
    print(f"report: {options.out / 'report.md'} ({time.monotonic() - started:.0f} s)", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    problem = bad_input(options)
    if problem:
        print(f"run.py: error: {problem}", file=sys.stderr)
        return 2
    quiet_libraries()
    return run_phases(options)


if __name__ == "__main__":
    sys.exit(main())
