"""The ``tokattr`` command: one entry point, one sub-command per job, one module per
command in this folder (``attribute``, ``bench``, ``dashboard``, ``heatmap``, ``eval_model``;
``train``'s LightningCLI lives with its module in :mod:`tokattr.lightning.train`), listed in
:data:`COMMANDS`.

Every sub-command but ``dashboard`` (plain argparse: two actions on a folder) parses its own
options with LightningCLI / jsonargparse, so each has ``--help``, ``--config FILE.yaml`` and
``--print_config``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def _eval_model(argv: list[str]) -> int:
    from tokattr.cli.eval_model import eval_model

    return _function_command(eval_model)(argv)


def _attribute(argv: list[str]) -> int:
    from tokattr.cli.attribute import attribute_command

    return _function_command(attribute_command)(argv)


def _heatmap(argv: list[str]) -> int:
    from tokattr.cli.heatmap import heatmap_command, spread_list_options

    return _function_command(heatmap_command)(spread_list_options(argv))


def _bench(argv: list[str]) -> int:
    from tokattr.cli.bench import run_bench
    from tokattr.results import OutDirBusyError

    try:
        return run_bench(argv)
    except OutDirBusyError as e:  # another run holds out_dir: nothing was computed
        print(f"tokattr bench: error: {e}", file=sys.stderr)
        return 1


def _dashboard(argv: list[str]) -> int:
    from tokattr.cli.dashboard import dashboard_command

    return dashboard_command(argv)


def _train(argv: list[str]) -> int:
    from tokattr.lightning.train import run_training

    return run_training(argv)


def _function_command(fn: Callable) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from jsonargparse import auto_cli

        auto_cli(fn, args=argv, as_positional=False)
        return 0

    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "attribute": (_attribute, "token attributions of prompts: a token x method table, JSON"),
    "bench": (
        _bench,
        "every method x every metric over a prompt set; multi-GPU, resumable (LightningCLI)",
    ),
    "heatmap": (
        _heatmap,
        "token x column heatmap (demonstrations or methods as columns): PNG + CSV",
    ),
    "dashboard": (
        _dashboard,
        "the W&B workspace of a run: check its spec offline, push it to W&B",
    ),
    "train": (
        _train,
        "train a bundled model (arith-tiny, lookup-tiny; LightningCLI: fit, export, card)",
    ),
    "eval-model": (
        _eval_model,
        "greedy exact-match accuracy per arithmetic bucket, or on lookups",
    ),
}


def _usage() -> str:
    lines = [
        "usage: tokattr COMMAND [options]   (tokattr COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "Every command first has glibc's malloc keep freed memory for reuse (fewer page faults",
        "on CPU; tokattr.allocator); TOKATTR_MALLOC=default leaves the allocator alone.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``tokattr COMMAND ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tokattr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        from tokattr.allocator import keep_freed_memory, malloc_env

        # Fewer page faults on CPU (TOKATTR_MALLOC=default: leave it), here and in the
        # processes this one starts (DDP workers).
        if keep_freed_memory():
            os.environ.update(malloc_env())
        return COMMANDS[name][0](rest)
    except (ValueError, FileNotFoundError) as e:
        print(f"tokattr {name}: error: {e}", file=sys.stderr)
        return 1
