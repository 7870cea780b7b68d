"""The `fastlatent` command: argparse over the public API (recipes, self-test, benchmarks)."""

from fastlatent.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
