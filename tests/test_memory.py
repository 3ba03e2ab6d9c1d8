"""Passes sized to a memory budget, and backing off when a pass runs out of memory."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_lm

from tokattr.attribution import attribute
from tokattr.batching import collate, encode_example
from tokattr.engine import packing as engine_packing
from tokattr.engine.memory import (
    CPU_TOKENS_PER_PASS,
    STATES_BUDGET,
    STATES_SHARE,
    GiB,
    ModelShape,
    bytes_per_sequence,
    default_budget,
    sequences_per_pass,
    states_budget,
)
from tokattr.methods.problem import chunked
from tokattr.targets import log_prob

PROMPTS = ["12+3=", "$16,000/-0.8=", "7x5="]
ANSWERS = ["15", "-20000", "35"]


def test_sequences_per_pass_fits_the_budget():
    lm = tiny_lm("llama")
    shape = ModelShape.of(lm.model)
    assert (shape.hidden, shape.layers, shape.intermediate, shape.heads) == (32, 2, 64, 4)
    per_grad = bytes_per_sequence(shape, 20, grad=True)
    per_fwd = bytes_per_sequence(shape, 20, grad=False)
    assert per_grad > per_fwd > 0
    assert bytes_per_sequence(shape, 40, grad=True) > 2 * per_grad  # attention grows as seq^2
    for budget in (per_grad, 5 * per_grad + 1, 37 * per_grad):
        n = sequences_per_pass(lm.model, 20, True, budget)
        assert n == min(budget // per_grad, CPU_TOKENS_PER_PASS // 20)
    assert sequences_per_pass(lm.model, 20, True, 10) == 1  # never below one sequence
    with pytest.raises(ValueError, match="memory_budget must be a positive"):
        sequences_per_pass(lm.model, 20, True, 0)


def test_held_states_are_a_share_of_the_budget_and_capped_on_a_cpu():
    """The key/value states a prefix-sharing method keeps: a share of the memory budget, so a
    large GPU budget holds more and a small budget fewer; on a CPU never past the fixed cap."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # no CUDA call with a budget given
    assert STATES_SHARE > 1
    assert states_budget(cpu, 256 << 20) == (256 << 20) // STATES_SHARE
    assert states_budget(cpu, 64 * GiB) == STATES_BUDGET
    assert states_budget(cuda, 64 * GiB) == 64 * GiB // STATES_SHARE > STATES_BUDGET
    assert states_budget(cuda, 1 << 20) == (1 << 20) // STATES_SHARE
    assert states_budget(cpu) == min(STATES_BUDGET, default_budget(cpu) // STATES_SHARE)


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion", "saliency"])
def test_a_small_budget_means_smaller_passes_and_the_same_scores(method):
    lm = tiny_lm("llama")
    widths = []
    hook = lm.model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(
            (kwargs["inputs_embeds"].shape[0], torch.is_grad_enabled())
        ),
        with_kwargs=True,
    )
    budget = 3 * bytes_per_sequence(ModelShape.of(lm.model), 20, grad=True)
    try:
        small = attribute(lm, PROMPTS, method, target=ANSWERS, memory_budget=budget)
    finally:
        hook.remove()
    encoded = [
        encode_example(lm.tokenizer, p, a, None, lm.max_length)
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]
    seq = collate(lm.tokenizer, encoded).input_ids.shape[1]
    scored = seq - collate(lm.tokenizer, encoded).prompt_width + 1
    no_grad_most = sequences_per_pass(lm.model, seq, False, budget, scored)
    assert 3 < no_grad_most < 100
    grad_passes = [n for n, grad in widths if grad]
    assert all(n <= 3 for n in grad_passes)
    assert (len(grad_passes) > 0) == (method != "occlusion")
    assert all(n <= no_grad_most for n, grad in widths if not grad)
    big = attribute(lm, PROMPTS, method, target=ANSWERS, batch_size=512)
    for a, b in zip(small, big, strict=True):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        attribute(lm, PROMPTS[0], method, target=ANSWERS[0], memory_budget=-1)


def test_chunked_halves_a_pass_that_runs_out_of_memory_and_keeps_the_smaller_size():
    sizes = []

    def run(i, j):
        sizes.append(j - i)
        if j - i > 3:
            raise torch.OutOfMemoryError("fake: too many sequences")
        return list(range(i, j))

    with pytest.warns(RuntimeWarning, match="out of memory with 16 sequences per pass"):
        out = chunked(40, 16, run)
    assert [x for part in out for x in part] == list(range(40))
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) == 2  # halved until it fits, then kept

    def never(i, j):
        raise torch.OutOfMemoryError("fake")

    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError):
        chunked(4, 4, never)  # one sequence that does not fit is an error


def test_attribution_survives_out_of_memory_passes():
    """A target that runs out of memory above 4 sequences per pass: the scores still come,
    equal to a run at 4 sequences per pass."""
    lm = tiny_lm("llama")

    def fragile(model, embeds, inputs):
        if embeds.shape[0] > 4:
            raise torch.OutOfMemoryError("fake")
        return log_prob(model, embeds, inputs)

    kw = dict(target=ANSWERS, n_steps=8)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        got = attribute(lm, PROMPTS, "integrated_gradients", batch_size=32, target_fn=fragile, **kw)
    want = attribute(lm, PROMPTS, "integrated_gradients", batch_size=4, **kw)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=1e-5)


def test_packed_occlusion_passes_fit_the_budget_and_back_off(monkeypatch):
    """Occlusion's packed trees (a prompt with its perturbations in one sequence): a pass holds
    no more than the memory of the budget's full sequences, by the same estimate; a packed pass
    that runs out of memory is split, and the scores stay the same."""
    from tokattr.engine import loo as occlusion
    from tokattr.engine.memory import packed_rows_per_pass

    lm = tiny_lm("llama")
    shape = ModelShape.of(lm.model)
    prompts = PROMPTS * 4  # 12 trees of three sizes
    answers = ANSWERS * 4
    encoded = [encode_example(lm.tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    batch = collate(lm.tokenizer, encoded)
    seq, scored = batch.input_ids.shape[1], batch.input_ids.shape[1] - batch.prompt_width + 1
    budget = 6 * bytes_per_sequence(shape, seq, False, scored)
    attribute(lm, prompts[:1], "occlusion", target=answers[:1])  # the once-per-model probes
    passes = []
    hook = lm.model.register_forward_pre_hook(
        lambda _, args, kw: passes.append(
            (*kw["inputs_embeds"].shape[:2], kw["logits_to_keep"], kw["attention_mask"].dim())
        ),
        with_kwargs=True,
    )
    real = engine_packing._packed_score_columns
    calls = []

    def counted(model, embeds, *args):
        calls.append(args[-1].passes)
        return real(model, embeds, *args)

    monkeypatch.setattr(engine_packing, "_packed_score_columns", counted)
    try:
        got = attribute(lm, prompts, "occlusion", target=answers, memory_budget=budget)
    finally:
        hook.remove()
    packed = [p[:3] for p in passes if p[3] == 4]
    assert len(packed) > 1
    # The passes are laid out and scored up to PASSES_PER_CALL at a time.
    assert len(calls) == -(-len(packed) // occlusion.PASSES_PER_CALL) < len(packed)
    assert calls[0] == packed[0][0]
    n = sequences_per_pass(lm.model, seq, False, budget, scored)
    for rows, width, keep in packed:
        assert rows <= packed_rows_per_pass(shape, n, seq, scored, width, keep)
        per_row = bytes_per_sequence(shape, width, False, keep) + width * width * 4
        assert rows == 1 or rows * per_row <= n * bytes_per_sequence(shape, seq, False, scored)

    def fragile(model, embeds, *args):
        if args[-1].packing is not None and len(set(args[-1].packing.tolist())) > 1:
            raise torch.OutOfMemoryError("fake: more than one packed sequence")
        return real(model, embeds, *args)

    monkeypatch.setattr(engine_packing, "_packed_score_columns", fragile)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        split = attribute(lm, prompts, "occlusion", target=answers, batch_size=64)
    for a, b in zip(split, got, strict=True):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
