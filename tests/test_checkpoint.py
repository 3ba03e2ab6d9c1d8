"""Activation checkpointing of the decoder layers (:mod:`tokattr.engine.checkpoint`): the same
scores, layers recomputed in the backward pass, the model as it was after the block."""

from __future__ import annotations

import pytest
import torch
from _tiny import ALL_ARCHS, tiny_lm

import tokattr
from tokattr.engine.checkpoint import checkpointed, decoder_layers, needs_checkpointing

PROMPTS, ANSWERS = ["12+3=", "7x45=", "$16,000/-0.8="], ["15", "315", "-20000"]


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_checkpointed_scores_equal_plain_ones(arch, method):
    lm = tiny_lm(arch)
    params = {"n_steps": 8} if method == "integrated_gradients" else {}
    plain = tokattr.attribute(lm, PROMPTS, method, ANSWERS, gradient_checkpointing=False, **params)
    ckpt = tokattr.attribute(lm, PROMPTS, method, ANSWERS, gradient_checkpointing=True, **params)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_layers_are_recomputed_in_the_backward_pass_and_restored(monkeypatch):
    lm = tiny_lm("llama")
    layers = decoder_layers(lm.model)
    cls = type(layers[0])
    calls = []
    original = cls.forward

    def counting(self, *args, **kwargs):
        calls.append((self is layers[0], torch.is_grad_enabled()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    tokattr.attribute(lm, "12+3=", "saliency", "15", gradient_checkpointing=False)
    plain = calls.count((True, True))
    calls.clear()
    tokattr.attribute(lm, "12+3=", "saliency", "15", gradient_checkpointing=True)
    # The first layer ran once more with gradients on: its recomputation in the backward pass.
    assert plain >= 1 and calls.count((True, True)) == plain + 1
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_an_instance_forward_survives_the_block_even_on_error():
    lm = tiny_lm("gpt2")
    layer = decoder_layers(lm.model)[0]
    own = layer.forward  # a bound method, set on the instance as Accelerate's hooks do
    layer.forward = own
    try:
        with pytest.raises(RuntimeError, match="inside"), checkpointed(lm.model):
            assert layer.forward is not own
            raise RuntimeError("inside")
        assert layer.__dict__["forward"] is own
        for other in decoder_layers(lm.model)[1:]:
            assert "forward" not in other.__dict__
        with checkpointed(lm.model):  # the last layer (its MLP may be cut) is left as it is
            assert "forward" not in decoder_layers(lm.model)[-1].__dict__
    finally:
        del layer.forward


def test_a_model_without_named_layers_is_refused_and_the_budget_decides():
    with pytest.raises(ValueError, match="no decoder layer class"):
        decoder_layers(torch.nn.Linear(2, 2))
    lm = tiny_lm("llama")
    assert needs_checkpointing(lm.model, 4096, 1 << 20, 1)
    assert not needs_checkpointing(lm.model, 16, 1 << 30, 1)
    # memory_budget alone turns it on where one sequence does not fit; scores are the same.
    small = tokattr.attribute(lm, "12+3=", "saliency", "15", memory_budget=1 << 10)
    plain = tokattr.attribute(lm, "12+3=", "saliency", "15")
    torch.testing.assert_close(small.scores, plain.scores, rtol=1e-5, atol=1e-6)
