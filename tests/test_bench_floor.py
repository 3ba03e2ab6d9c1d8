"""The benchmark's paired floor (``bench._harness.floor_work``): a case's floor timed again in
the case's own rounds must run exactly the method's evaluations as the floor ran them."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from tests._tiny import tiny_lm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _harness as h  # noqa: E402
from bench import _session as session  # noqa: E402


def _floor(forward_batch: int, backward_batch: int) -> object:
    return h.Floor(
        seq_len=0, forward_s=1.0, forward_batch=forward_batch, backward_s=1.0,
        backward_batch=backward_batch, forward_b1_s=1.0, backward_b1_s=1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("n_forward", "n_backward", "fb", "bb", "calls"),
    [(10, 0, 4, 4, [(4, False)] * 2), (3, 5, 2, 8, [(2, False)] * 2 + [(8, True)])],
)
def test_floor_work_runs_the_evaluations_at_the_floors_batch_sizes(
    n_forward, n_backward, fb, bb, calls
):
    lm = tiny_lm("llama")
    cfg = dataclasses.replace(h.default_config(scale="quick"), device="cpu")
    batch = h.token_batch(lm, h.arith_prompts(3))
    seen: list[tuple[int, bool]] = []
    handle = lm.model.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(
            (kwargs["inputs_embeds"].shape[0], kwargs["inputs_embeds"].requires_grad)
        ),
        with_kwargs=True,
    )
    try:
        work = h.floor_work(lm, batch, cfg, _floor(fb, bb), n_forward, n_backward)
        assert seen == []  # nothing runs until the call
        seconds = work()
    finally:
        handle.remove()
    assert seen == calls
    assert isinstance(seconds, float) and seconds > 0


def test_paired_rounds_take_a_partners_own_seconds():
    class Bench:
        def pedantic(self, fn, rounds, warmup_rounds, iterations):
            for _ in range(rounds + warmup_rounds):
                fn()

    times, _, _, paired = session.paired_rounds(
        Bench(), lambda: None, lambda: 123.0, rounds=2, device="cpu", warmup=1
    )
    assert len(times) == 2 and paired == [123.0, 123.0]
    _, _, _, wall = session.paired_rounds(Bench(), lambda: None, lambda: None, 2, "cpu")
    assert len(wall) == 2 and all(0 <= s < 1 for s in wall)
