"""Every metric under two CPU processes (gloo) equals the one-process value over the same
examples: torchmetrics' own DDP test pattern (spawned workers, uneven shards)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_metrics import _class_cases, make_batch, random_scores

pytestmark = pytest.mark.ddp

LENGTHS = (5, 3, 7, 1, 6, 4, 2)  # 7 examples: rank 0 gets 4, rank 1 gets 3


def _inputs():
    problem, _ = make_batch(lengths=LENGTHS, batch_size=4)
    scores, scores2 = random_scores(problem, 1), random_scores(problem, 2)
    labels = torch.where(problem.feature_mask, torch.arange(scores.shape[1]) % 3 - 1, -1)
    return problem, scores, scores2, labels


def _results(rows: torch.Tensor | None) -> dict[str, object]:
    """Every metric's compute() over ``rows`` of the batch (all rows when None)."""
    problem, scores, scores2, labels = _inputs()
    if rows is not None:
        problem = problem.select(rows)
        scores, scores2, labels = scores[rows], scores2[rows], labels[rows]
    out = {}
    for name, (make, args, _) in _class_cases(problem, scores, scores2, labels).items():
        metric = make()
        metric.update(args)
        value = metric.compute()
        out[name] = (
            {k: float(v) for k, v in value.items()} if isinstance(value, dict) else float(value)
        )
        out[name + "/n"] = int(metric.per_example().shape[0])
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        rows = torch.arange(rank, len(LENGTHS), world)  # interleaved, uneven shards
        results = _results(rows)
        # per_example() outside compute() is the local shard; compute() saw all of them.
        if rank == 0:
            torch.save(results, path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_two_processes_equal_one(tmp_path):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    two = torch.load(path)
    one = _results(None)
    for name, value in one.items():
        if name.endswith("/n"):
            continue
        got = two[name]
        if isinstance(value, dict):
            assert set(got) == set(value), name
            for k in value:
                assert _close(got[k], value[k]), (name, k, got[k], value[k])
        else:
            assert _close(got, value), (name, got, value)
    # Each rank kept only its own shard locally (4 and 3 of the 7 examples).
    assert two["comprehensiveness/n"] == 4
