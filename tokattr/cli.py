"""The ``tokattr`` command: one entry point, one sub-command per job.

Every sub-command parses its own options (LightningCLI / jsonargparse), so each one has
``--help``, ``--config FILE.yaml`` and ``--print_config``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.table import Table


def eval_model(
    model: str = "arith-tiny",
    n_per_bucket: int = 500,
    seed: int = 2026,
    buckets: list[str] | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> None:
    """Greedy exact-match accuracy per arithmetic bucket, on fresh problems.

    Args:
        model: "arith-tiny", a local model folder, or a hub id.
        n_per_bucket: problems per bucket.
        seed: generator seed of the problems; refused if the model was trained on it.
        buckets: which buckets (default: all, plus "demonstrations").
        batch_size: prompts per generate call.
        device: "cpu", "cuda", "cuda:1", ... (default: CPU).
    """
    import json

    from tokattr.accuracy import bucket_accuracy
    from tokattr.models import load_model

    if n_per_bucket < 1:
        raise ValueError(f"n_per_bucket must be >= 1, got {n_per_bucket}")
    lm = load_model(model, device=device)
    record = lm.path / "training.json" if lm.path else None
    if record and record.is_file():
        stages = json.loads(record.read_text()).get("stages", [])
        if seed in {st["data"]["seed"] for st in stages} | {
            st["data"]["val_seed"] for st in stages
        }:
            raise ValueError(
                f"seed {seed} is the seed {model} was trained on; pick another for fresh problems"
            )
    rows = bucket_accuracy(lm, n_per_bucket, seed, buckets, batch_size)
    table = Table(title=f"{model}: greedy exact match (seed {seed})")
    for col in ("bucket", "correct", "total", "accuracy", "a wrong answer"):
        table.add_column(col, justify="left" if col in ("bucket", "a wrong answer") else "right")
    for r in rows:
        wrong = (
            f"{r.examples_wrong[0][0]} {r.examples_wrong[0][2]!r} (want {r.examples_wrong[0][1]})"
            if r.examples_wrong
            else ""
        )
        table.add_row(r.bucket, str(r.correct), str(r.total), f"{r.accuracy:.1%}", wrong)
    Console().print(table)


def _attribute(argv: list[str]) -> int:
    from tokattr.attribute_cli import attribute_command

    return _function_command(attribute_command)(argv)


def _heatmap(argv: list[str]) -> int:
    from tokattr.heatmap_cli import heatmap_command, spread_list_options

    return _function_command(heatmap_command)(spread_list_options(argv))


def _bench(argv: list[str]) -> int:
    from tokattr.bench_cli import run_bench
    from tokattr.results import OutDirBusyError

    try:
        return run_bench(argv)
    except OutDirBusyError as e:  # another run holds out_dir: nothing was computed
        print(f"tokattr bench: error: {e}", file=sys.stderr)
        return 1


def _train(argv: list[str]) -> int:
    from tokattr.train import run_training

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
    "train": (
        _train,
        "train the arithmetic reference model (LightningCLI: fit, export, model card)",
    ),
    "eval-model": (
        _function_command(eval_model),
        "greedy exact-match accuracy per arithmetic bucket",
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
        "on CPU; tokattr.keep_freed_memory); TOKATTR_MALLOC=default leaves the allocator alone.",
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


if __name__ == "__main__":
    sys.exit(main())
