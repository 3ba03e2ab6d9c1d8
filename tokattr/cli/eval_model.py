"""``tokattr eval-model``: greedy exact-match accuracy of a model per arithmetic bucket, or on
the lookup task."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def eval_model(
    model: str = "arith-tiny",
    n_per_bucket: int = 500,
    seed: int = 2026,
    buckets: list[str] | None = None,
    batch_size: int = 256,
    device: str | None = None,
    dataset: str = "auto",
) -> None:
    """Greedy exact-match accuracy per arithmetic bucket (or on key-value lookup), on fresh
    problems.

    Args:
        model: "arith-tiny", a local model folder, or a hub id.
        n_per_bucket: problems per bucket.
        seed: generator seed of the problems; refused if the model was trained on it.
        buckets: which buckets (default: all, plus "demonstrations").
        batch_size: prompts per generate call.
        device: "cpu", "cuda", "cuda:1", ... (default: CPU).
        dataset: "arithmetic", "lookup" (n_per_bucket problems of as many definitions and
            characters as the model's last training stage saw, else the generator's defaults,
            binned by definitions and by length), or "auto"
            (default): what the model was trained on, where its training record says
            (lookup-tiny: lookup), else arithmetic.
    """
    import json

    from tokattr.accuracy import bucket_accuracy
    from tokattr.models import load_model

    if n_per_bucket < 1:
        raise ValueError(f"n_per_bucket must be >= 1, got {n_per_bucket}")
    if dataset not in ("auto", "arithmetic", "lookup"):
        raise ValueError(f"unknown dataset {dataset!r}; choose from auto, arithmetic, lookup")
    lm = load_model(model, device=device)
    record = lm.path / "training.json" if lm.path else None
    stages: list[dict] = []
    if record and record.is_file():
        stages = json.loads(record.read_text()).get("stages", [])
        if seed in {st["data"]["seed"] for st in stages} | {
            st["data"]["val_seed"] for st in stages
        }:
            raise ValueError(
                f"seed {seed} is the seed {model} was trained on; pick another for fresh problems"
            )
    if dataset == "auto":
        mixes = [st["data"].get("mix", {}) for st in stages]
        dataset = "lookup" if any("lookup" in m for m in mixes) else "arithmetic"
    if dataset == "lookup":
        from tokattr.accuracy import lookup_accuracy

        last = stages[-1]["data"] if stages else {}
        pairs = tuple(last.get("pairs", (20, 52)))
        length = last.get("length", (100, 400))
        filler = tuple(last.get("filler", (8, 48)))
        rows = lookup_accuracy(
            lm,
            n_per_bucket,
            seed,
            pairs,
            None if length is None else tuple(length),
            filler,
            batch_size=min(batch_size, 64),
        )
    else:
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
