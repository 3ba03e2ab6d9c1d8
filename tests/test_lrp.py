"""AttnLRP / CP-LRP: each rule against its hand-derived form on a module in isolation, the
rules' conservation on whole models, and a family without rules refused."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import ALL_ARCHS, tiny_lm

from tokattr.attribution import attribute
from tokattr.methods.lrp import divide_gradient, identity_rule, lrp_rules
from tokattr.methods.value_zeroing import decoder_layers

PROMPT, ANSWER = "12+3=", "15"


def _relevance(fn, x, w):
    """Input relevance ``x * d(sum(w * fn(x)))/dx`` and the output relevance ``w * fn(x)``."""
    x = x.clone().requires_grad_()
    out = fn(x)
    (g,) = torch.autograd.grad((w * out).sum(), x)
    return (x * g).detach(), (w * out).detach()


def test_identity_rule_passes_relevance_through_element_by_element():
    gen = torch.Generator().manual_seed(0)
    x, w = (torch.randn(4, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    for act in (torch.nn.functional.silu, torch.nn.functional.gelu, torch.tanh):
        r_in, r_out = _relevance(lambda t, a=act: identity_rule(a, t), x, w)
        # Exact but for the rule's epsilon (1e-10) in act(x) / (x + eps).
        torch.testing.assert_close(r_in, r_out, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(identity_rule(act, x), act(x))  # the forward is unchanged


def test_uniform_rule_gives_each_factor_half():
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    out = divide_gradient(a * b, 2.0)
    ga, gb = torch.autograd.grad(out.sum(), (a, b))
    torch.testing.assert_close(a * ga, a * b / 2)  # R_a = R_b = R_out / 2 (AttnLRP eq. 7)
    torch.testing.assert_close(b * gb, a * b / 2)


def _module_relevance(model, module, x, variant="attnlrp"):
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with lrp_rules(model, variant):
        r_in, r_out = _relevance(module, x, w)
        ruled = module(x).detach()
    return r_in, r_out, ruled


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_norm_rule_is_linear_and_conserves(arch):
    """RMSNorm (Llama) / LayerNorm (GPT-NeoX) with the divisor held constant: the same
    forward, and the relevance of the (bias-free) output all goes to the input."""
    model = copy.deepcopy(tiny_lm(arch).model).double()
    norm = next(m for m in model.modules() if "Norm" in type(m).__name__)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, norm.weight.shape[0], dtype=torch.float64)
    plain = norm(x).detach()
    r_in, r_out, ruled = _module_relevance(model, norm, x)
    torch.testing.assert_close(ruled, plain)
    # RMSNorm normalises in float32 (as the model does), hence float32 rounding.
    torch.testing.assert_close(r_in.sum(-1), r_out.sum(-1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_mlp_rule_conserves_relevance(arch):
    """Gated MLP (identity on the activation, uniform on gate x up) and plain MLPs (identity
    on the activation): bias-free, the input gets all of the output's relevance."""
    model = copy.deepcopy(tiny_lm(arch).model).double()
    mlp = decoder_layers(model)[0].mlp
    d = model.get_input_embeddings().weight.shape[1]
    x = torch.randn(2, 4, d, dtype=torch.float64)
    plain = mlp(x).detach()
    r_in, r_out, ruled = _module_relevance(model, mlp, x)
    torch.testing.assert_close(ruled, plain)
    torch.testing.assert_close(r_in.sum(), r_out.sum(), rtol=1e-8, atol=1e-10)


def _qkv_grads(model, arch, variant):
    """Gradients at the first layer's query / key / value projection outputs (before any rule
    hook) of a sum over the attention module's output, with and without the rules."""
    layer = decoder_layers(model)[0]
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None) or layer.attention
    d = model.get_input_embeddings().weight.shape[1]
    h = torch.randn(1, 6, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kwargs = {"attention_mask": None}
    if arch != "gpt2":
        rotary = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
        kwargs["position_embeddings"] = rotary(h, torch.arange(6)[None])
    projections = {
        n.rsplit(".", 1)[-1]: m
        for n, m in attn.named_modules()
        if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "c_attn", "query_key_value")
    }

    def run(rules):
        grads = {}

        def capture(name):
            def hook(mod, a, o):
                o.register_hook(lambda g: grads.__setitem__(name, g))

            return hook

        hooks = [m.register_forward_hook(capture(n)) for n, m in projections.items()]
        try:
            ctx = lrp_rules(model, variant) if rules else torch.enable_grad()
            with ctx:
                out = attn(h, **kwargs)[0]
                out.sum().backward()
        finally:
            for hook in hooks:
                hook.remove()
        return grads

    return run(False), run(True)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_attention_rule_divides_query_key_and_value_gradients(arch):
    """AttnLRP's uniform rule on q k^T and on softmax(.) v: queries and keys get 1/4 of the
    plain gradient, values 1/2 (fused projections split as the model splits them); CP-LRP:
    no gradient through queries and keys, values unchanged."""
    model = copy.deepcopy(tiny_lm(arch).model).double()
    plain, ruled = _qkv_grads(model, arch, "attnlrp")
    heads = model.config.num_attention_heads
    if "v_proj" in plain:
        for name, factor in (("q_proj", 4), ("k_proj", 4), ("v_proj", 2)):
            torch.testing.assert_close(ruled[name], plain[name] / factor)
    else:
        name = "c_attn" if "c_attn" in plain else "query_key_value"
        p, r = plain[name], ruled[name]
        if name == "c_attn":
            ps, rs = p.split(p.shape[-1] // 3, -1), r.split(r.shape[-1] // 3, -1)
        else:
            ps = p.view(*p.shape[:-1], heads, 3, -1).unbind(-2)
            rs = r.view(*r.shape[:-1], heads, 3, -1).unbind(-2)
        for a, b, factor in zip(ps, rs, (4, 4, 2), strict=True):
            torch.testing.assert_close(b, a / factor)
    _, cp = _qkv_grads(model, arch, "cp_lrp")
    if "v_proj" in plain:
        assert "q_proj" not in cp and "k_proj" not in cp  # no gradient reaches them
        torch.testing.assert_close(cp["v_proj"], plain["v_proj"])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_cp_lrp_conserves_the_logit_exactly(arch):
    """CP-LRP's backward graph is linear in the input embeddings (attention weights, gates and
    norm divisors constant), so on a bias-free model (these tiny models' biases are 0) the
    relevances add up to the logit: Euler's theorem, up to float32 rounding (derived
    tolerance: a few ulps of the largest partial sums, 1e-5 of the logit's scale here).
    GPT-2 is left out: its learned position embeddings, added inside the model, take a share
    of the relevance that the input embeddings do not see."""
    lm = tiny_lm(arch)
    res = attribute(lm, [PROMPT, "7x5="], "cp_lrp", target=[ANSWER, "35"], target_fn="logit")
    for r in res:
        assert abs(r.delta) <= 1e-5 * max(1.0, abs(r.target_score)), r.delta


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_attnlrp_reports_its_conservation_and_keeps_the_forward(arch):
    lm = tiny_lm(arch)
    res = attribute(lm, PROMPT, "attnlrp", target=ANSWER, target_fn="logit")
    plain = attribute(lm, PROMPT, "input_x_gradient", target=ANSWER, target_fn="logit")
    assert res.target_score == pytest.approx(plain.target_score, abs=1e-5)  # same forward
    assert res.delta is not None and torch.isfinite(torch.tensor(res.delta))
    assert not torch.allclose(res.scores, plain.scores)  # the rules change the backward
    assert res.model_evals == 1


def test_a_family_without_rules_is_named_before_any_change():
    lm = tiny_lm("llama")
    model = copy.deepcopy(lm.model)
    for layer in decoder_layers(model):
        layer.mlp.gate = layer.mlp.gate_proj  # a gated MLP under names we have no rule for
        del layer.mlp.gate_proj
    before = [type(m).forward for m in model.modules()]
    with (
        pytest.raises(ValueError, match="attnlrp has no rules for LlamaForCausalLM"),
        lrp_rules(model),
    ):
        pass
    assert before == [type(m).forward for m in model.modules()]
    assert not any("forward" in vars(m) for m in model.modules())


def test_unknown_variant():
    model = tiny_lm("llama").model
    with pytest.raises(ValueError, match="unknown LRP variant 'lrp0'"), lrp_rules(model, "lrp0"):
        pass
