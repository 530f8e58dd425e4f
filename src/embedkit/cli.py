"""The ``embedkit`` command: argparse wiring only. Each subcommand lives in ``embedkit.commands.*``
and exposes ``register(subparsers)``, which adds its parser and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from embedkit.errors import EmbedkitError
from embedkit.logs import setup_logging

# One entry per subcommand module; each registers one or more subcommands.
COMMAND_MODULES = (
    "embedkit.commands.info",
    "embedkit.commands.encode",
    "embedkit.commands.embed",
    "embedkit.commands.export",
    "embedkit.commands.graph",
    "embedkit.commands.search",
    "embedkit.commands.serve",
    "embedkit.commands.invoke",
    "embedkit.commands.sagemaker",
)

log = logging.getLogger("embedkit")


def build_parser() -> argparse.ArgumentParser:
    from embedkit import __version__

    parser = argparse.ArgumentParser(prog="embedkit", description="Embeddings the same way everywhere.")
    parser.add_argument("--version", action="version", version=f"embedkit {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("EMBEDKIT_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("EMBEDKIT_LOG_FORMAT", "text"),
        help="text for people, json lines for machines (env EMBEDKIT_LOG_FORMAT)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embedkit`` console script; returns the process exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except EmbedkitError as exc:
        print(f"embedkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("embedkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
