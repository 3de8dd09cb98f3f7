"""The `delia` command: subcommands map to plain functions of the package.

delia build-cache MODEL QUERIES OUTPUT [options]     self-sample the diverse cache (see delia.build_cache)
"""

from __future__ import annotations

import argparse
import sys

from .build_cache import add_arguments as add_build_cache_arguments
from .build_cache import run as run_build_cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="delia", description="DELIA: diversity-enhanced instruction tuning")
    commands = parser.add_subparsers(dest="command", required=True)
    add_build_cache_arguments(
        commands.add_parser("build-cache", help="self-sample diverse responses from the base model")
    ).set_defaults(handler=run_build_cache)
    args = parser.parse_args(argv)
    handler = args.handler
    del args.handler
    try:
        handler(args)
    except (ValueError, OSError, ConnectionError) as error:  # bad input: one clear line, no traceback
        print(f"delia {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
