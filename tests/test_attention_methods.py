"""attention, attention_rollout and value_zeroing against references read straight from the
model (HF's own attention weights, a direct matrix product, value vectors zeroed by hand), and
every method leaves the user's model as it found it."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
from _tiny import ALL_ARCHS, tiny_lm, unpadded

from tokattr.attribution import attribute
from tokattr.methods import METHODS
from tokattr.methods import attention as attention_module
from tokattr.methods.attention import attention_modules
from tokattr.methods.internals import eager_attention
from tokattr.methods.value_zeroing import decoder_layers

PROMPT, ANSWER = "12+3=", "15"


def _hf_attentions(lm):
    """Every layer's attention ``[heads, seq, seq]`` of PROMPT + ANSWER from an eager copy of
    the model, the query column (last prompt token) and the feature columns."""
    ids, n_prompt, cols = unpadded(lm, PROMPT, ANSWER)
    eager = copy.deepcopy(lm.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=ids[None], output_attentions=True)
    return [a[0].double() for a in out.attentions], n_prompt - 1, cols


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_attention_is_the_models_own_attention_weights(arch):
    lm = tiny_lm(arch)
    maps, q, cols = _hf_attentions(lm)
    for layer in (-1, 0):
        res = attribute(lm, PROMPT, "attention", target=ANSWER, layer=layer)
        want = maps[layer].mean(0)[q, cols]
        torch.testing.assert_close(res.scores.double(), want, rtol=1e-4, atol=1e-6)
        assert res.model_evals == 1
    # The same prompt among others (padding both sides) reads the same weights.
    both = attribute(lm, ["9-100=", PROMPT], "attention", target=["-91", ANSWER])
    torch.testing.assert_close(both[1].scores.double(), maps[-1].mean(0)[q, cols], rtol=1e-4,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_rollout_is_the_direct_matrix_product(arch):
    lm = tiny_lm(arch)
    maps, q, cols = _hf_attentions(lm)
    seq = maps[0].shape[-1]
    rolled = np.eye(seq)
    for a in maps:  # Abnar & Zuidema 2020: A' = (mean_h A + I) / 2, rows re-normalised
        mixed = 0.5 * a.mean(0).numpy() + 0.5 * np.eye(seq)
        mixed /= mixed.sum(-1, keepdims=True)
        rolled = mixed @ rolled
    res = attribute(lm, PROMPT, "attention_rollout", target=ANSWER)
    np.testing.assert_allclose(res.scores.numpy(), rolled[q, cols.numpy()], rtol=1e-4, atol=1e-6)
    assert float(res.scores.sum()) <= 1.0 + 1e-5


def _zero_by_hand(lm, ids, layer_index, token):
    """The output of decoder layer ``layer_index`` in a full forward with token ``token``'s
    value vectors zeroed there (hooks written for each family's value projection)."""
    model = lm.model
    layer = decoder_layers(model)[layer_index]
    seen = {}
    if hasattr(layer, "self_attn"):  # Llama, Qwen2: v_proj
        proj, lo, hi = layer.self_attn.v_proj, 0, None
    elif hasattr(layer, "attn"):  # GPT-2: c_attn = [q | k | v]
        d = model.config.n_embd
        proj, lo, hi = layer.attn.c_attn, 2 * d, 3 * d
    else:  # GPT-NeoX: query_key_value, per head [q k v]
        proj, lo, hi = layer.attention.query_key_value, None, None

    def zero(module, args, out):
        out = out.clone()
        if lo is None and hi is None:
            heads = model.config.num_attention_heads
            view = out.view(*out.shape[:2], heads, 3, -1)
            view[:, token, :, 2] = 0.0
        else:
            out[:, token, lo:hi] = 0.0
        return out

    def keep(module, args, out):
        seen["h"] = (out[0] if isinstance(out, tuple) else out)[0].double()

    hooks = [proj.register_forward_hook(zero), layer.register_forward_hook(keep)]
    try:
        with torch.no_grad():
            model(input_ids=ids[None])
    finally:
        for h in hooks:
            h.remove()
    return seen["h"]


def _layer_outputs(lm, ids):
    outs = []
    hooks = [
        layer.register_forward_hook(
            lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0].double())
        )
        for layer in decoder_layers(lm.model)
    ]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids[None])
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_value_zeroing_is_zeroing_the_value_vectors_by_hand(arch):
    lm = tiny_lm(arch)
    ids, n_prompt, cols = unpadded(lm, PROMPT, ANSWER)
    seq, q = len(ids), n_prompt - 1
    plain = _layer_outputs(lm, ids)
    matrices = []
    for layer in range(len(plain)):
        c = np.zeros((seq, seq))
        for j in range(seq):
            h = _zero_by_hand(lm, ids, layer, j)
            c[:, j] = 1 - torch.nn.functional.cosine_similarity(h, plain[layer], dim=-1).numpy()
        matrices.append(c)
    last = attribute(lm, PROMPT, "value_zeroing", target=ANSWER, layer=-1)
    np.testing.assert_allclose(last.scores.numpy(), matrices[-1][q, cols], rtol=1e-3, atol=1e-6)
    rolled = np.eye(seq)
    for c in matrices:  # Mohebbi et al. 2023: rows normalised, rolled out through the layers
        rolled = (c / c.sum(-1, keepdims=True)) @ rolled
    res = attribute(lm, PROMPT, "value_zeroing", target=ANSWER)
    np.testing.assert_allclose(res.scores.numpy(), rolled[q, cols], rtol=1e-3, atol=1e-6)
    assert res.model_evals == 1 + len(plain) * seq


def test_a_family_without_a_rule_is_named():
    lm = tiny_lm("llama")
    model = copy.deepcopy(lm.model)
    for layer in decoder_layers(model):
        layer.self_attn.v_proj, layer.self_attn.values = None, layer.self_attn.v_proj
    from tokattr.methods.value_zeroing import value_projection

    with pytest.raises(ValueError, match="no rule for LlamaForCausalLM"):
        value_projection(decoder_layers(model)[0], model)


@pytest.mark.parametrize("method", ["attention", "value_zeroing"])
def test_a_layer_that_does_not_exist_is_refused_before_any_pass(method):
    lm = tiny_lm("llama")
    attribute(lm, PROMPT, "saliency", target=ANSWER)  # the once-per-model probes, done here
    calls = []
    hook = decoder_layers(lm.model)[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=f"{method}: layer 5 does not exist; the model has 2"):
            attribute(lm, PROMPT, method, target=ANSWER, layer=5)
    finally:
        hook.remove()
    assert calls == []


# ----------------------------------------------------------------- the user's model untouched


FAST = {
    "integrated_gradients": {"n_steps": 4},
    "kernel_shap": {"n_samples": 16},
    "shapley_sampling": {"n_samples": 2},
    "gradient_shap": {"n_samples": 3},
    "smoothgrad": {"n_samples": 3},
    "vargrad": {"n_samples": 3},
    "lime": {"n_samples": 16},
    "context_cite": {"n_ablations": 16},
}


def _hook_counts(m):
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return tuple(len(getattr(m, h, {})) for h in hooks)


def _snapshot(model):
    """Everything about a model a method could leave changed: parameters (values, dtype,
    device, requires_grad), buffers, modes, hooks, forwards and the attention implementation."""
    return {
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "hooks": [_hook_counts(m) for m in model.modules()],
        "forwards": [(type(m).forward, "forward" in vars(m)) for m in model.modules()],
        "attn": model.config._attn_implementation,
        "grads": [p.grad is None for p in model.parameters()],
    }


def _assert_same(before, after):
    for name, (value, flag) in before["params"].items():
        now, now_flag = after["params"][name]
        assert torch.equal(value, now) and flag == now_flag, name
    for name, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][name]), name
    for key in ("modes", "hooks", "forwards", "attn", "grads"):
        assert before[key] == after[key], key


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_model_is_unchanged_after_every_method_also_after_an_error(method):
    lm = tiny_lm("gpt2")
    model = lm.model
    before = _snapshot(model)
    attribute(lm, ["12+3=", "7="], method, target=["15", "7"], seed=0, **FAST.get(method, {}))
    _assert_same(before, _snapshot(model))
    if method == "random":
        return
    calls = {"n": 0, "fail_at": None}

    def fail(module, args):
        calls["n"] += 1
        if calls["fail_at"] is not None and calls["n"] >= calls["fail_at"]:
            raise RuntimeError("injected failure")

    last = decoder_layers(model)[-1]
    handle = last.register_forward_pre_hook(fail)
    try:
        attribute(lm, "12+3=", method, target="15", seed=0, **FAST.get(method, {}))
        calls["fail_at"], calls["n"] = max(1, (calls["n"] + 1) // 2), 0  # half-way through
        with pytest.raises(RuntimeError, match="injected failure"):
            attribute(lm, "12+3=", method, target="15", seed=0, **FAST.get(method, {}))
    finally:
        handle.remove()
    _assert_same(before, _snapshot(model))


def test_eager_attention_is_restored_on_error():
    lm = tiny_lm("llama")
    assert lm.model.config._attn_implementation == "sdpa"
    with pytest.raises(KeyError), eager_attention(lm.model):
        assert lm.model.config._attn_implementation == "eager"
        raise KeyError("inside")
    assert lm.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_attention_modules_are_one_per_layer_in_order(arch):
    lm = tiny_lm(arch)
    found = attention_modules(lm.model)
    assert found is not None and len(found) == lm.model.config.num_hidden_layers
    layers = decoder_layers(lm.model)
    for (module, _), layer in zip(found, layers, strict=True):
        assert any(module is m for m in layer.modules())


@pytest.mark.parametrize("method", ["attention", "attention_rollout"])
def test_a_pass_holds_one_layers_attention_weights_at_a_time(method):
    """Each layer's weights are read as the layer forms them, not collected for the whole
    pass as ``output_attentions=True`` does (12 x 12 x 4,096^2 floats on a long prompt): when a
    layer forms its weights, no earlier layer's are still alive."""
    lm = tiny_lm("llama")
    alive: list[weakref.ref] = []
    most = [0]

    def spy(module, args, out):
        if out[1] is None:  # a pass with fused attention (the answer's own log-probability)
            return
        alive[:] = [r for r in alive if r() is not None]
        most[0] = max(most[0], len(alive))
        alive.append(weakref.ref(out[1]))

    hooks = [m.register_forward_hook(spy) for m, _ in attention_modules(lm.model)]
    try:
        res = attribute(lm, ["12+3=", "100-9="], method, target=["15", "91"])
    finally:
        for h in hooks:
            h.remove()
    assert most[0] == 0
    assert all(float(r.scores.abs().sum()) > 0 for r in res)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_models_without_a_table_of_attention_modules_use_their_own_output(arch, monkeypatch):
    lm = tiny_lm(arch)
    want = {
        m: attribute(lm, PROMPT, m, target=ANSWER).scores
        for m in ("attention", "attention_rollout")
    }
    monkeypatch.setattr(attention_module, "attention_modules", lambda model: None)
    for m, scores in want.items():
        torch.testing.assert_close(attribute(lm, PROMPT, m, target=ANSWER).scores, scores)
