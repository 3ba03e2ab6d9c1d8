"""``attribute``: contract tests over every method, the API, errors, and the CLI command."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys

import pytest
import torch
from _tiny import ARCHS, tiny_lm

from tokattr.attribution import Attribution, attribute
from tokattr.batching import collate, encode_example
from tokattr.cli.attribute import attribute_command
from tokattr.methods import METHODS
from tokattr.targets import log_prob

# Small hyper-parameters so every method runs in well under a second on a tiny model.
FAST = {
    "integrated_gradients": {"n_steps": 8},
    "kernel_shap": {"n_samples": 40},
    "shapley_sampling": {"n_samples": 3},
    "gradient_shap": {"n_samples": 4},
    "smoothgrad": {"n_samples": 4},
    "vargrad": {"n_samples": 4},
    "lime": {"n_samples": 40},
}
RANDOM_METHODS = {
    "kernel_shap", "shapley_sampling", "random", "gradient_shap", "smoothgrad", "vargrad", "lime",
}  # fmt: skip
SHORT, SHORT_ANSWER = "7x5=", "35"
# Longer and shorter prompts, and a longer answer, so SHORT is padded on both sides.
OTHERS = [("12+34=", "46"), ("9=", "9"), ("9-100=", "-91")]


def run(lm, prompts, method, targets, **kw):
    return attribute(lm, prompts, method, target=targets, **{**FAST.get(method, {}), **kw})


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_contract(arch, method):
    lm = tiny_lm(arch)
    prompts = [OTHERS[0][0], SHORT, *[p for p, _ in OTHERS[1:]]]
    targets = [OTHERS[0][1], SHORT_ANSWER, *[a for _, a in OTHERS[1:]]]
    batch = run(lm, prompts, method, targets, seed=[11, 12, 13, 14], batch_size=16)
    alone = run(lm, SHORT, method, SHORT_ANSWER, seed=12, batch_size=16)
    again = run(lm, SHORT, method, SHORT_ANSWER, seed=12, batch_size=16)

    assert isinstance(alone, Attribution) and isinstance(batch, list) and len(batch) == 4
    for res, prompt, answer in zip(batch, prompts, targets, strict=True):
        assert res.method == method and res.target == answer and res.prompt == prompt
        want_tokens = lm.tokenizer.convert_ids_to_tokens(lm.tokenizer(prompt)["input_ids"])[1:]
        assert res.tokens == want_tokens  # the prompt's tokens, BOS dropped
        assert "<s>" not in res.tokens
        assert res.scores.dtype == torch.float32 and res.scores.device.type == "cpu"
        assert res.scores.shape == (len(res.tokens),)
        assert len(res.token_ids) == len(res.offsets) == len(res.tokens)
        assert torch.isfinite(res.scores).all()
        assert (res.model_evals == 0) == (method == "random")
        assert math.isfinite(res.target_score) and res.time_ms >= 0
    # Padding invariance: SHORT alone equals SHORT among longer and shorter prompts.
    torch.testing.assert_close(batch[1].scores, alone.scores, atol=1e-5, rtol=1e-5)
    # Determinism with a seed.
    assert torch.equal(alone.scores, again.scores)
    if method in RANDOM_METHODS:
        other = run(lm, SHORT, method, SHORT_ANSWER, seed=13, batch_size=16)
        assert not torch.equal(alone.scores, other.scores)  # the seed is used


@pytest.mark.parametrize("method", sorted(METHODS))
def test_forwards_are_batched(method):
    """No forward takes more than batch_size sequences, and perturbations share forwards."""
    lm = tiny_lm("llama")
    calls = []

    def counting(model, embeds, inputs):
        calls.append(embeds.shape[0])
        return log_prob(model, embeds, inputs)

    prompts, targets = [SHORT, OTHERS[0][0]], [SHORT_ANSWER, OTHERS[0][1]]
    if method in READS_MODEL:  # these read the model directly, not through the target
        return _internal_passes_are_batched(lm, method, prompts, targets)
    res = run(lm, prompts, method, targets, seed=0, batch_size=8, target_fn=counting)
    counted = [c for c in calls]
    # IG, occlusion and the gradient methods compute f(x) themselves; for the others one last
    # forward per batch
    # computes it for the report, outside the method.
    computes_fx = ("integrated_gradients", "occlusion", "saliency", "input_x_gradient")
    method_calls = counted if method in computes_fx else counted[:-1]
    assert max(counted) <= 8
    assert sum(method_calls) == sum(r.model_evals for r in res)
    if method != "random":
        per_call = sum(method_calls) / len(method_calls)
        assert per_call >= 2, method_calls  # never one forward per perturbation


READS_MODEL = {"attention", "attention_rollout", "value_zeroing", "attnlrp", "cp_lrp"}


def _internal_passes_are_batched(lm, method, prompts, targets):
    """Model passes (and value zeroing's decoder-layer calls) hold at most batch_size
    sequences; the attention methods make one model pass per batch, counted in model_evals."""
    from tokattr.methods.value_zeroing import decoder_layers

    model_calls, layer_calls = [], []
    hooks = [
        lm.model.register_forward_pre_hook(
            lambda m, a, k: model_calls.append(k["inputs_embeds"].shape[0]), with_kwargs=True
        ),
        decoder_layers(lm.model)[0].register_forward_pre_hook(
            lambda m, a, k: layer_calls.append((a[0] if a else k["hidden_states"]).shape[0]),
            with_kwargs=True,
        ),
    ]
    try:
        res = run(lm, prompts, method, targets, seed=0, batch_size=8)
    finally:
        for h in hooks:
            h.remove()
    assert max(model_calls) <= 8 and max(layer_calls) <= 8
    if method != "value_zeroing":
        # One pass for the method, then one for f(x) (the report's), outside the method.
        assert model_calls[:-1] == [len(prompts)] and sum(r.model_evals for r in res) == 2
    else:  # per row one capture pass, then each layer once per attended token; then f(x)
        n_layers, tokens = len(decoder_layers(lm.model)), sum(layer_calls[:-1]) - len(prompts)
        assert sum(r.model_evals for r in res) == len(prompts) + n_layers * tokens


def test_one_prompt_in_a_batch_uses_the_others_forwards():
    """Occlusion ablates token k of every prompt in the same forward."""
    lm = tiny_lm("llama")
    calls = []

    def counting(model, embeds, inputs):
        calls.append(embeds.shape[0])
        return log_prob(model, embeds, inputs)

    prompts = [SHORT, OTHERS[0][0], OTHERS[1][0]]
    res = run(lm, prompts, "occlusion", [SHORT_ANSWER, OTHERS[0][1], OTHERS[1][1]],
              batch_size=64, target_fn=counting)  # fmt: skip
    # Every token of every prompt removed, and the 3 prompts unperturbed: one forward.
    assert calls == [sum(len(r.tokens) for r in res) + 3]


def _reusing_prefixes(lm, prompts, answers, batch_size, record, **kw):
    """Occlusion with prefix reuse, ``record(forward kwargs)`` kept for each model call, checked
    against full passes: the same scores and target scores, n + 1 evaluations per prompt.
    Returns its results and the records."""
    records = []
    hook = lm.model.register_forward_pre_hook(
        lambda _, args, kwargs: records.append(record(kwargs)), with_kwargs=True
    )
    try:
        reused = run(lm, prompts, "occlusion", answers, batch_size=batch_size, **kw)
    finally:
        hook.remove()
    plain = run(lm, prompts, "occlusion", answers, batch_size=batch_size, prefix_reuse=False, **kw)
    for a, b in zip(reused, plain, strict=True):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
        assert a.target_score == pytest.approx(b.target_score, abs=1e-5)
        assert a.model_evals == b.model_evals == len(a.tokens) + 1
    return reused, records


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_occlusion_prefix_reuse_gives_the_same_scores_from_shorter_passes(arch, monkeypatch):
    """With the built-in target, occlusion re-runs a perturbed sequence only from the removed
    token on (the earlier columns' keys and values come from the unperturbed pass). Rows too
    long to pack as trees take this path; here every row does."""
    from tokattr.engine.capabilities import supports_branches

    monkeypatch.setattr("tokattr.engine.loo.PACK_LIMIT", 0)
    lm = tiny_lm(arch)
    supports_branches(lm, log_prob)  # its one-off probe pass, before the hook
    prompts = [SHORT, OTHERS[0][0], OTHERS[1][0]]
    answers = [SHORT_ANSWER, OTHERS[0][1], OTHERS[1][1]]
    reused, widths = _reusing_prefixes(
        lm, prompts, answers, 5, lambda kwargs: kwargs["inputs_embeds"].shape
    )
    full = widths[0][1]  # the unperturbed pass: whole sequences
    # batch_size=5 caps a pass at 5 whole sequences' tokens: more of the shorter ones.
    assert widths[0][0] == 3 and all(w[0] * w[1] <= 5 * full for w in widths)
    assert sum(w[0] for w in widths[1:]) == sum(len(r.tokens) for r in reused)
    assert all(w[1] < full for w in widths[1:])  # every later pass starts after column 0
    assert sum(w[0] * w[1] for w in widths[1:]) < 0.75 * full * sum(w[0] for w in widths[1:])


def _states_of_two_sequences(monkeypatch):
    """The tiny Llama on four prompts, every row through passes from key/value states (none
    packed), their padded width, and the bytes of two sequences' keys and values (fp32)."""
    from tokattr.engine.capabilities import supports_branches

    monkeypatch.setattr("tokattr.engine.loo.PACK_LIMIT", 0)
    lm = tiny_lm("llama")
    supports_branches(lm, log_prob)  # its one-off probe pass, before any hook
    prompts = [SHORT] + [p for p, _ in OTHERS]
    answers = [SHORT_ANSWER] + [a for _, a in OTHERS]
    examples = [encode_example(lm.tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    width = collate(lm.tokenizer, examples).input_ids.shape[1]
    cfg = lm.model.config
    return lm, prompts, answers, width, 2 * width * 2 * cfg.num_hidden_layers * cfg.hidden_size * 4


def _rows(kwargs):
    return kwargs["inputs_embeds"].shape[0]


def test_occlusion_passes_from_states_hold_no_more_sequences_than_their_states_budget(
    monkeypatch,
):
    """Each sequence of a pass from key/value states holds the row's cached columns: many
    prompts' perturbations of late columns (short re-runs, many per pass by tokens) must still
    fit the states budget, here two sequences' worth; the scores stay those of full passes."""
    from tokattr.engine import memory

    lm, prompts, answers, _, two = _states_of_two_sequences(monkeypatch)
    monkeypatch.setattr(memory, "STATES_BUDGET", two)
    _, rows = _reusing_prefixes(lm, prompts, answers, 64, _rows)
    assert rows[0] == len(prompts)  # the unperturbed pass, whose states the others read
    assert max(rows[1:]) == 2


def test_a_memory_budget_bounds_the_states_a_pass_from_them_holds(monkeypatch):
    """The states a pass from key/value states holds are a share of ``memory_budget``
    (:func:`tokattr.engine.memory.states_budget`), not a fixed amount: a budget whose share is
    two sequences' states gives passes of at most two sequences, where passes of the same size
    with the default states budget hold more; the scores stay those of full passes."""
    from tokattr.engine import memory

    lm, prompts, answers, width, two = _states_of_two_sequences(monkeypatch)
    # A tiny model's states are small beside its activations: a small share, so that the
    # budget's passes hold many sequences and its states two.
    monkeypatch.setattr(memory, "STATES_SHARE", 64)
    budget = 64 * two
    assert memory.states_budget(lm.device, budget) == two
    batch = memory.sequences_per_pass(lm.model, width, False, budget)
    assert batch >= 4
    _, budgeted = _reusing_prefixes(lm, prompts, answers, None, _rows, memory_budget=budget)
    _, by_tokens = _reusing_prefixes(lm, prompts, answers, batch, _rows)  # default states
    assert max(budgeted[1:]) == 2
    assert max(by_tokens[1:]) > 2


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_occlusion_packs_each_prompt_with_its_perturbations(arch):
    """Short prompts go as trees: each row and its perturbations from the removed token on are
    packed into one sequence (tree attention), the shared columns computed once: the same
    scores as full passes from far fewer tokens, and counted as one evaluation per sequence."""
    from tokattr.engine.capabilities import supports_branches

    lm = tiny_lm(arch)
    assert supports_branches(lm, log_prob)  # probed once, before the hook
    prompts = [SHORT, OTHERS[0][0], OTHERS[1][0], OTHERS[2][0]]
    answers = [SHORT_ANSWER, OTHERS[0][1], OTHERS[1][1], OTHERS[2][1]]
    packed, shapes = _reusing_prefixes(
        lm,
        prompts,
        answers,
        64,
        lambda kwargs: (kwargs["inputs_embeds"].shape, kwargs["attention_mask"].dim()),
    )
    assert len(shapes) == 1 and shapes[0][1] == 4  # one pass, a custom 4-D mask
    tokens = shapes[0][0][0] * shapes[0][0][1]
    examples = [encode_example(lm.tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    width = collate(lm.tokenizer, examples).input_ids.shape[1]
    full = sum((len(r.tokens) + 1) * width for r in packed)  # (n + 1) full passes per row
    assert tokens < 0.6 * full


def test_occlusion_mixes_packed_and_cached_rows(monkeypatch):
    """Rows over the packing limit take key/value-cache passes, the others go packed: the
    same scores either way, each row once."""
    from tokattr.engine import loo as occlusion

    lm = tiny_lm("llama")
    prompts = ["123456789+987654321=", SHORT, OTHERS[1][0]]
    answers = ["1111111110", SHORT_ANSWER, OTHERS[1][1]]
    plain = run(lm, prompts, "occlusion", answers, prefix_reuse=False)
    cached = []
    real = occlusion._with_cache

    def counting(problem, rows, columns, slots):
        cached.append(problem.n_rows)
        return real(problem, rows, columns, slots)

    monkeypatch.setattr(occlusion, "_with_cache", counting)
    monkeypatch.setattr(occlusion, "PACK_LIMIT", 100)  # the first prompt's tree is longer
    mixed = run(lm, prompts, "occlusion", answers)
    assert cached == [1]
    for a, b in zip(mixed, plain, strict=True):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
        assert a.model_evals == len(a.tokens) + 1


def test_packing_falls_back_where_the_model_does_not_honour_it():
    """A model that drops a custom 4-D attention mask, or the position ids, gives different
    scores packed, and one that refuses a 4-D mask raises: the probe (run only for a method
    that packs) sees each, and occlusion keeps to key/value-cache passes, with the right
    scores."""
    from transformers import LlamaForCausalLM

    from tokattr.engine.capabilities import supports_branches, supports_prefix
    from tokattr.models import LanguageModel

    class IgnoresMask(LlamaForCausalLM):
        def forward(self, *args, attention_mask=None, **kwargs):
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = None  # a plain causal mask over the packed order
            return super().forward(*args, attention_mask=attention_mask, **kwargs)

    class IgnoresPositions(LlamaForCausalLM):
        def forward(self, *args, position_ids=None, attention_mask=None, **kwargs):
            if attention_mask is not None and attention_mask.dim() == 4:
                position_ids = None  # positions 0, 1, ... in the packed order
            return super().forward(
                *args, position_ids=position_ids, attention_mask=attention_mask, **kwargs
            )

    class RefusesMask(LlamaForCausalLM):
        def forward(self, *args, attention_mask=None, **kwargs):
            if attention_mask is not None and attention_mask.dim() == 4:
                raise ValueError("this model builds its bias from a 2-D mask")
            return super().forward(*args, attention_mask=attention_mask, **kwargs)

    base = tiny_lm("llama")
    prompts, answers = [SHORT, OTHERS[0][0]], [SHORT_ANSWER, OTHERS[0][1]]
    plain = run(base, prompts, "occlusion", answers, prefix_reuse=False)
    for cls in (IgnoresMask, IgnoresPositions, RefusesMask):
        model = cls(base.model.config).eval()
        model.load_state_dict(base.model.state_dict())
        lm = LanguageModel(model, base.tokenizer, cls.__name__, None)
        run(lm, prompts, "saliency", answers)  # not a packing method: no probe, no warning
        if cls is RefusesMask:
            with pytest.warns(RuntimeWarning, match="packed occlusion passes are off"):
                assert not supports_branches(lm, log_prob)
        assert supports_prefix(lm, log_prob) and not supports_branches(lm, log_prob)
        reused = run(lm, prompts, "occlusion", answers)
        for a, b in zip(reused, plain, strict=True):
            torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


def test_default_target_is_the_greedy_answer():
    lm = tiny_lm("llama")
    # Generated by transformers, independently of tokattr: the greedy continuation's ids.
    enc = lm.tokenizer(SHORT, return_tensors="pt")
    out = lm.model.generate(**enc, max_new_tokens=12, do_sample=False,
                            eos_token_id=lm.tokenizer.eos_token_id)  # fmt: skip
    generated = out[0, enc["input_ids"].shape[1] :].tolist()
    generated = generated[: generated.index(lm.tokenizer.eos_token_id)] if (
        lm.tokenizer.eos_token_id in generated
    ) else generated  # fmt: skip
    res = attribute(lm, SHORT, "occlusion")
    assert res.answer_ids == generated and len(generated) == len(res.answer_tokens) > 0
    assert res.target == lm.tokenizer.decode(generated)
    explicit = attribute(lm, SHORT, "occlusion", target=generated)
    assert torch.equal(res.scores, explicit.scores)
    mixed = attribute(lm, [SHORT, SHORT], "occlusion", target=[None, "1"])
    assert [a.answer_ids for a in mixed] == [generated, lm.tokenizer("1")["input_ids"][-1:]]


def test_target_score_is_the_answer_log_prob():
    lm = tiny_lm("gpt2")
    res = attribute(lm, SHORT, "saliency", target=SHORT_ANSWER)
    ids = torch.tensor([lm.tokenizer(SHORT + SHORT_ANSWER)["input_ids"]])
    with torch.no_grad():
        logp = lm.model(input_ids=ids).logits[0].log_softmax(-1)
    n = len(lm.tokenizer(SHORT)["input_ids"])
    want = sum(float(logp[j - 1, ids[0, j]]) for j in range(n, ids.shape[1]))
    assert abs(res.target_score - want) < 1e-5
    assert res.answer_tokens == ["3", "5"]


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion", "exact_shapley"])
def test_per_answer_token_rows_add_up_to_the_whole_answer(method):
    """These methods are linear in the target, and log p(answer) is the sum over its tokens."""
    lm = tiny_lm("llama")
    whole = run(lm, SHORT, method, "355", batch_size=32)
    rows = run(lm, SHORT, method, "355", batch_size=32, per_answer_token=True)
    assert rows.scores.shape == (3, len(whole.tokens))
    assert len(rows.target_score) == 3
    torch.testing.assert_close(rows.scores.sum(0), whole.scores, atol=1e-5, rtol=1e-4)
    assert abs(sum(rows.target_score) - whole.target_score) < 1e-5


def test_seeds_per_prompt():
    """A list of seeds (e.g. example ids) gives each prompt the scores it gets alone."""
    lm = tiny_lm("llama")
    prompts, targets = [SHORT, OTHERS[0][0]], [SHORT_ANSWER, OTHERS[0][1]]
    both = run(lm, prompts, "kernel_shap", targets, seed=[5, 6])
    for res, p, t, s in zip(both, prompts, targets, [5, 6], strict=True):
        alone = run(lm, p, "kernel_shap", t, seed=s)
        torch.testing.assert_close(res.scores, alone.scores, atol=1e-5, rtol=1e-5)
    # The global RNG is left alone by seeded runs.
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    run(lm, SHORT, "shapley_sampling", SHORT_ANSWER, seed=1)
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion", "kernel_shap"])
def test_batch_size_does_not_change_scores(method):
    lm = tiny_lm("gpt2")
    prompts, targets = [SHORT, OTHERS[0][0]], [SHORT_ANSWER, OTHERS[0][1]]
    small = run(lm, prompts, method, targets, seed=0, batch_size=3)
    large = run(lm, prompts, method, targets, seed=0, batch_size=64)
    for a, b in zip(small, large, strict=True):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


def test_baselines_differ_and_contrast_target():
    # GPT-2: Llama's pad embedding is the zero vector (nn.Embedding padding_idx), so there
    # "pad" and "zero" coincide.
    lm = tiny_lm("gpt2")
    scores = {
        b: attribute(lm, SHORT, "occlusion", target=SHORT_ANSWER, baseline=b).scores
        for b in ("pad", "unk", "zero")
    }
    assert not torch.allclose(scores["pad"], scores["zero"])
    assert not torch.allclose(scores["pad"], scores["unk"])
    ans = attribute(lm, SHORT, "occlusion", target=SHORT_ANSWER)
    foil = attribute(lm, SHORT, "occlusion", target="36")
    both = attribute(lm, SHORT, "occlusion", target=SHORT_ANSWER, target_fn="contrast", foil="36")
    torch.testing.assert_close(both.scores, ans.scores - foil.scores, atol=1e-5, rtol=1e-4)
    assert both.foil == "36" and both.target_fn == "contrast"
    assert abs(both.target_score - (ans.target_score - foil.target_score)) < 1e-5


def test_to_dict_is_json_ready():
    lm = tiny_lm("llama")
    res = attribute(lm, SHORT, "integrated_gradients", target=SHORT_ANSWER, n_steps=4)
    record = json.loads(json.dumps(res.to_dict()))
    assert record["tokens"] == res.tokens and len(record["scores"]) == len(res.tokens)
    assert record["params"] == {"n_steps": 4, "rule": "gausslegendre"}
    assert isinstance(record["delta"], float)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="deeplift"), r"unknown method 'deeplift'; choose from \['attention', 'att"),
        (dict(method="occlusion", n_steps=3), r"unknown parameter\(s\) \['n_steps'\].*window"),
        (dict(method="integrated_gradients", n_steps=0), "n_steps must be an integer >= 1"),
        (dict(method="kernel_shap", n_samples=0), "n_samples must be an integer >= 1"),
        (dict(method="occlusion", window=2, stride=3), "stride must be an integer in"),
        (dict(method="occlusion", baseline="mean"), "unknown baseline 'mean'"),
        (dict(method="occlusion", target_fn="loss"), "unknown target_fn 'loss'"),
        (dict(method="occlusion", target_fn="contrast"), "needs a foil"),
        (dict(method="occlusion", foil="3"), "only used with target_fn='contrast'"),
        (dict(method="occlusion", batch_size=0), "batch_size must be"),
        (dict(method="exact_shapley", max_tokens=4), "7 features, more than max_tokens=4"),
    ],
)
def test_errors_name_the_problem(kwargs, message):
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match=message):
        attribute(lm, "12+34=", target="46", **kwargs)


def test_prompt_errors():
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match="empty prompt"):
        attribute(lm, "", "occlusion", target="1")
    with pytest.raises(ValueError, match="empty prompt"):
        attribute(lm, ["1=", ""], "occlusion", target=["1", "2"])
    with pytest.raises(ValueError, match="longer than the model's context of 128 tokens"):
        attribute(lm, "1+" * 61 + "1=", "occlusion", target="6300")
    with pytest.raises(ValueError, match="the model's context of 128 leaves no room"):
        attribute(lm, "1+" * 70 + "1=", "occlusion", target="71")
    with pytest.raises(TypeError, match="a prompt must be a string, got int 123"):
        attribute(lm, [123], "occlusion", target=["1"])
    batch_encoding = lm.tokenizer(["1=", "2="])
    with pytest.raises(TypeError, match="got BatchEncoding"):
        attribute(lm, batch_encoding, "occlusion")  # not its two keys read as two prompts
    with pytest.raises(ValueError, match="2 targets for 1 prompts"):
        attribute(lm, ["1="], "occlusion", target=["1", "2"])
    with pytest.raises(ValueError, match="training mode"):
        attribute(tiny_lm_in_training(), "1=", "occlusion", target="1")


def tiny_lm_in_training():
    import copy

    lm = tiny_lm("gpt2")
    model = copy.deepcopy(lm.model).train()
    return type(lm)(model, lm.tokenizer, lm.name, lm.path)


def test_nan_scores_are_refused():
    lm = tiny_lm("llama")

    def fragile(model, embeds, inputs):
        """Finite on the prompt as written, NaN as soon as a token is removed."""
        clean = model.get_input_embeddings()(inputs.labels)
        perturbed = (embeds != clean).flatten(1).any(-1)
        score = log_prob(model, embeds, inputs)
        return torch.where(perturbed, torch.full_like(score, float("nan")), score)

    with pytest.raises(ValueError, match="'occlusion' gave NaN/inf scores for prompt '7x5='"):
        attribute(lm, SHORT, "occlusion", target=SHORT_ANSWER, target_fn=fragile)
    with pytest.raises(ValueError, match="target score is not finite"):
        attribute(lm, SHORT, "saliency", target=SHORT_ANSWER,
                  target_fn=lambda m, e, i: log_prob(m, e, i) * float("inf"))  # fmt: skip


def test_non_finite_scores_name_their_prompt_in_a_batch():
    lm = tiny_lm("llama")
    nine = lm.tokenizer.convert_tokens_to_ids("9")

    def fragile_nines(model, embeds, inputs):
        """NaN when a token is removed from a prompt that has a 9, finite otherwise."""
        clean = model.get_input_embeddings()(inputs.labels)
        perturbed = (embeds != clean).flatten(1).any(-1)
        bad = perturbed & (inputs.labels == nine).any(-1)
        score = log_prob(model, embeds, inputs)
        return torch.where(bad, torch.full_like(score, float("nan")), score)

    prompts, answers = ["12+3=", "7x5=", "4900/100=", "9+9="], ["15", "35", "49", "18"]
    with pytest.raises(ValueError, match="gave NaN/inf scores for prompt '4900/100='"):
        attribute(lm, prompts, "occlusion", target=answers, target_fn=fragile_nines)

    def inf_on_nines(model, embeds, inputs):
        score = log_prob(model, embeds, inputs)
        return torch.where((inputs.labels == nine).any(-1), float("inf"), score)

    with pytest.raises(ValueError, match=r"not finite \(\[inf\]\) for prompt '4900/100='"):
        attribute(lm, prompts, "saliency", target=answers, target_fn=inf_on_nines)
    for per_answer_token in (False, True):
        out = attribute(lm, prompts[:2], "occlusion", target=answers[:2],
                        target_fn=fragile_nines, per_answer_token=per_answer_token)  # fmt: skip
        ref = [attribute(lm, p, "occlusion", target=a, per_answer_token=per_answer_token)
               for p, a in zip(prompts[:2], answers[:2], strict=True)]  # fmt: skip
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o.scores, r.scores, atol=1e-5, rtol=1e-5)
            assert o.target_score == pytest.approx(r.target_score, abs=1e-5)


# --------------------------------------------------------------------------- CLI, imports


def saved_tiny_lm(tmp_path, arch: str):
    """A tiny seeded model and the folder it is saved in (what the CLI loads)."""
    lm = tiny_lm(arch)
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return lm, folder


def test_attribute_command_prints_a_table_and_writes_json(tmp_path, capsys):
    lm, folder = saved_tiny_lm(tmp_path, "llama")
    out = tmp_path / "out" / "attr.json"
    attribute_command(
        model=str(folder),
        prompt=[SHORT, "9="],
        target=[SHORT_ANSWER, "9"],
        method=["occlusion", "integrated_gradients"],
        n_steps=4,
        json_out=str(out),
    )
    printed = capsys.readouterr().out
    assert "occlusion" in printed and "integrated" in printed and "gradients" in printed
    assert "'▁'" in printed and "'x'" in printed and "'7x5=' -> '35'" in printed
    records = json.loads(out.read_text())
    assert [(r["prompt"], r["method"]) for r in records] == [
        (SHORT, "occlusion"), (SHORT, "integrated_gradients"),
        ("9=", "occlusion"), ("9=", "integrated_gradients"),
    ]  # fmt: skip
    assert records[1]["params"]["n_steps"] == 4
    direct = attribute(lm, SHORT, "occlusion", target=SHORT_ANSWER)
    assert records[0]["scores"] == pytest.approx(direct.scores.tolist(), abs=1e-6)


def test_attribute_command_options_parse(tmp_path):
    """The options as jsonargparse reads them from a command line (as ``tokattr attribute``)."""
    from jsonargparse import auto_cli

    _, folder = saved_tiny_lm(tmp_path, "gpt2")
    out = tmp_path / "attr.json"
    argv = ["--model", str(folder), "--prompt+", SHORT, "--prompt+", "9=", "--target+", "35"]
    argv += ["--target+", "9"]  # numbers stay strings with '+'; a list needs '["35", "9"]'
    argv += ["--method+", "kernel_shap", "--method+", "random", "--n_samples", "12"]
    argv += ["--seed", "3", "--batch_size", "4", "--baseline", "zero", "--json_out", str(out)]
    auto_cli(attribute_command, args=argv, as_positional=False)
    records = json.loads(out.read_text())
    assert [r["prompt"] for r in records] == [SHORT, SHORT, "9=", "9="]
    assert records[0]["params"] == {"n_samples": 12, "prefix_reuse": True}
    assert records[0]["seed"] == 3
    assert records[0]["baseline"] == "zero" and records[2]["target"] == "9"


def test_attribute_command_passes_the_integration_rule(tmp_path):
    from jsonargparse import auto_cli

    lm, folder = saved_tiny_lm(tmp_path, "llama")
    out = tmp_path / "attr.json"
    argv = ["--model", str(folder), "--prompt+", SHORT, "--target+", SHORT_ANSWER]
    argv += ["--method+", "integrated_gradients", "--method+", "occlusion"]
    argv += ["--n_steps", "9", "--rule", "adaptive_simpson", "--json_out", str(out)]
    auto_cli(attribute_command, args=argv, as_positional=False)
    ig, occ = json.loads(out.read_text())
    assert (
        ig["params"] == {"n_steps": 9, "rule": "adaptive_simpson"} and "rule" not in occ["params"]
    )
    direct = attribute(
        lm, SHORT, "integrated_gradients", target=SHORT_ANSWER, n_steps=9, rule="adaptive_simpson"
    )
    assert ig["scores"] == pytest.approx(direct.scores.tolist(), abs=1e-6)


def test_attribute_command_refuses_a_parameter_no_method_takes(tmp_path):
    with pytest.raises(ValueError, match="--n_steps is not a parameter"):
        attribute_command(model=str(tmp_path), method=["occlusion"], n_steps=3)
    with pytest.raises(ValueError, match="unknown method 'ig'"):
        attribute_command(model=str(tmp_path), method=["ig"])


def test_attribute_command_help_documents_every_argument():
    import inspect

    doc = inspect.getdoc(attribute_command)
    for name in inspect.signature(attribute_command).parameters:
        assert f"    {name}:" in doc, name


def test_core_modules_import_no_lightning_or_wandb():
    code = (
        "import sys, tokattr.attribution, tokattr.cli.attribute, tokattr.methods, "
        "tokattr.targets, tokattr.batching, tokattr.accuracy; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'wandb') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", ["kernel_shap", "integrated_gradients", "saliency"])
def test_passes_over_short_prompts_skip_the_padding(method):
    """Perturbations are grouped by prompt length and a pass starts at its first non-padding
    column, so a short prompt batched with a long one is not run at the long one's width."""
    lm = tiny_lm("llama")
    long_prompt = "9 + 3 = 12;7 x 5 = 35;$16,000/-0.8="
    widths = []
    hook = lm.model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        size = 1 if method == "saliency" else 4  # saliency: one pass per row
        both = run(
            lm, [SHORT, long_prompt], method, [SHORT_ANSWER, "-20000"], batch_size=size, seed=0
        )
    finally:
        hook.remove()
    alone = run(lm, SHORT, method, SHORT_ANSWER, batch_size=4, seed=0)
    torch.testing.assert_close(both[0].scores, alone.scores, atol=1e-5, rtol=1e-5)
    assert min(widths) < max(widths) - 10  # the short prompt's passes are narrower


def test_prefix_reuse_only_where_the_cache_is_exact():
    from transformers import MistralConfig, MistralForCausalLM

    from tokattr.engine.capabilities import supports_prefix
    from tokattr.models import LanguageModel
    from tokattr.targets import contrast, logit, prob

    lm = tiny_lm("llama")
    assert (
        supports_prefix(lm, log_prob) and supports_prefix(lm, prob) and supports_prefix(lm, logit)
    )
    assert not supports_prefix(lm, contrast)  # a second pass with the foil: not cached
    assert not supports_prefix(lm, lambda m, e, i: log_prob(m, e, i))  # a custom target
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(lm.tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        sliding_window=4,
    )
    sliding = LanguageModel(MistralForCausalLM(config).eval(), lm.tokenizer, "sliding", None)
    assert not supports_prefix(sliding, log_prob)  # sliding-window layers: full passes
    prompts, answers = [SHORT, OTHERS[0][0]], [SHORT_ANSWER, OTHERS[0][1]]
    for target_fn in ("prob", "logit"):
        a = run(lm, prompts, "occlusion", answers, target_fn=target_fn)
        b = run(lm, prompts, "occlusion", answers, target_fn=target_fn, prefix_reuse=False)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x.scores, y.scores, atol=1e-5, rtol=1e-4)


def _llama_taking_cache_as(spelling):
    """The tiny Llama's weights behind a ``forward`` that declares its key/value cache only as
    ``spelling`` (``"cache"``, ``"past_key_values"``, or ``None``: no cache argument at all) and
    has no ``**kwargs``, so a call with the other spelling is a ``TypeError``; ``seen`` records,
    per call, whether a cache came in."""
    from transformers import LlamaForCausalLM

    from tokattr.models import LanguageModel

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    parent = "cache" if "cache" in params else "past_key_values"  # what this release takes
    seen = []

    def call(self, cache, **kwargs):
        seen.append(cache is not None)
        kwargs.setdefault("use_cache", False)
        if cache is not None:
            kwargs[parent] = cache
        return LlamaForCausalLM.forward(self, **kwargs)

    if spelling == "cache":

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                    inputs_embeds=None, use_cache=None, logits_to_keep=0):  # fmt: skip
            return call(self, cache, input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids, inputs_embeds=inputs_embeds,
                        use_cache=use_cache, logits_to_keep=logits_to_keep)  # fmt: skip
    elif spelling == "past_key_values":

        def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                    past_key_values=None, inputs_embeds=None, use_cache=None,
                    logits_to_keep=0):  # fmt: skip
            return call(self, past_key_values, input_ids=input_ids,
                        attention_mask=attention_mask, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, use_cache=use_cache,
                        logits_to_keep=logits_to_keep)  # fmt: skip
    else:

        def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                    inputs_embeds=None, use_cache=None, logits_to_keep=0):  # fmt: skip
            return call(self, None, input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids, inputs_embeds=inputs_embeds,
                        use_cache=use_cache, logits_to_keep=logits_to_keep)  # fmt: skip

    cls = type(f"LlamaTaking_{spelling}", (LlamaForCausalLM,), {"forward": forward})
    base = tiny_lm("llama")
    model = cls(base.model.config)
    model.load_state_dict(base.model.state_dict())
    return LanguageModel(model.eval(), base.tokenizer, f"llama-{spelling}", None), seen


def test_the_cache_name_is_read_through_a_forward_that_passes_kwargs_on():
    """A subclass whose ``forward`` names neither spelling but passes ``**kwargs`` to its
    parent's takes the parent's; one without ``**kwargs`` takes none."""
    from tokattr.engine.cache import cache_kwarg

    for spelling in ("cache", "past_key_values", None):
        parent = type(_llama_taking_cache_as(spelling)[0].model)
        passes_on = type("PassesOn", (parent,), {"forward": lambda self, *a, **kw: None})
        assert cache_kwarg(passes_on) == spelling
        closed = type("Closed", (parent,), {"forward": lambda self, input_ids=None: None})
        assert cache_kwarg(closed) is None


@pytest.mark.parametrize("spelling", ["cache", "past_key_values", None])
def test_the_cache_goes_by_the_name_the_models_forward_declares(spelling, monkeypatch):
    """transformers 5.24 renamed ``past_key_values=`` to ``cache=``: each model gets its cache
    under the one name its own ``forward`` declares (read once from the signature), so prefix
    passes work, warning-free, whichever spelling a release or a custom model uses; a model that
    declares neither gets full passes. Scores equal the stock model's full passes."""
    from tokattr.engine.cache import cache_kwarg
    from tokattr.engine.capabilities import supports_prefix

    monkeypatch.setattr("tokattr.engine.loo.PACK_LIMIT", 0)  # key/value-cache passes
    lm, seen = _llama_taking_cache_as(spelling)
    assert cache_kwarg(type(lm.model)) == spelling
    assert supports_prefix(lm, log_prob) == (spelling is not None)
    prompts, answers = [SHORT, OTHERS[0][0]], [SHORT_ANSWER, OTHERS[0][1]]
    got = run(lm, prompts, "occlusion", answers)
    assert any(seen) == (spelling is not None)  # the prefix passes ran, with their cache
    want = run(tiny_lm("llama"), prompts, "occlusion", answers, prefix_reuse=False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
        assert a.target_score == pytest.approx(b.target_score, abs=1e-5)


def test_passes_leave_out_the_answer_slot_padding():
    """A short answer batched with a long one: its passes stop at its own last column."""
    lm = tiny_lm("llama")
    widths = []
    hook = lm.model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        both = run(lm, ["12+3=", "12+3="], "saliency", ["15", "1500000000"], batch_size=1)
    finally:
        hook.remove()
    alone = run(lm, "12+3=", "saliency", "15", batch_size=1)
    torch.testing.assert_close(both[0].scores, alone.scores, atol=1e-5, rtol=1e-5)
    assert sorted(widths) == [widths[0], widths[0] + 8]  # 8 fewer answer tokens, 8 fewer columns


@pytest.mark.parametrize(
    "method", ["saliency", "input_x_gradient", "occlusion", "attnlrp", "cp_lrp"]
)
def test_per_answer_token_matrix_equals_one_call_per_answer_token(method):
    """Row t of the source x answer-token matrix is what one call attributing answer token t
    alone gives: the prompt with the answer's first t tokens after it, target the token t,
    features the prompt's own characters (one token each; the answer prefix is context).

    The tokenizer's leading '▁' has the first character's offset, so the single call's first
    feature holds '▁' and '1' together; the check compares the other five, and takes the
    methods whose score of one token does not depend on which other tokens are features
    (gradients, LRP, single-token occlusion). For IG and the Shapley
    methods, linear in the target, the rows add up to the whole answer's scores
    (test_per_answer_token_rows_add_up_to_the_whole_answer)."""
    lm = tiny_lm("llama")
    prompt, answer = "12x31=", "372"
    rows = run(lm, prompt, method, answer, per_answer_token=True, seed=4)
    assert rows.tokens[0] == "▁" and rows.tokens[1:] == list(prompt)
    assert rows.scores.shape == (len(answer), 1 + len(prompt))
    spans = [(i, i + 1) for i in range(len(prompt))]
    for t in range(len(answer)):
        one = run(lm, prompt + answer[:t], method, answer[t], features=spans, seed=4)
        torch.testing.assert_close(rows.scores[t, 2:], one.scores[1:], atol=1e-5, rtol=1e-4)
        assert abs(rows.target_score[t] - one.target_score) < 1e-5


@pytest.mark.parametrize(
    ("method", "params"),
    [("saliency", {}), ("integrated_gradients", {"n_steps": 4}), ("attnlrp", {})],
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_token_gradients_come_from_one_batched_backward(arch, method, params, monkeypatch):
    """An example's answer-token rows take their gradients from one vmapped backward pass
    (``is_grads_batched``), equal to one backward pass per answer token."""
    import tokattr.methods.problem as problem_module

    lm = tiny_lm(arch)
    prompts, answers = ["12x31=", "7x5="], ["372", "35"]
    batched_calls: list[bool] = []
    real = torch.autograd.grad

    def spy(*args, **kwargs):
        batched_calls.append(bool(kwargs.get("is_grads_batched", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    batched = run(lm, prompts, method, answers, per_answer_token=True, seed=2, **params)
    assert any(batched_calls)
    batched_calls.clear()
    monkeypatch.setattr(problem_module, "BATCHED_BACKWARD", False)
    looped = run(lm, prompts, method, answers, per_answer_token=True, seed=2, **params)
    assert batched_calls and not any(batched_calls)
    for b, one in zip(batched, looped, strict=True):
        torch.testing.assert_close(b.scores, one.scores, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "params"),
    [("saliency", {}), ("input_x_gradient", {}), ("integrated_gradients", {"n_steps": 8}),
     ("smoothgrad", {"n_samples": 4}), ("attnlrp", {})],
)  # fmt: skip
@pytest.mark.parametrize("arch", ARCHS)
def test_per_answer_token_rows_share_their_forward_passes(arch, method, params, monkeypatch):
    """The k answer tokens' rows of an example share each forward pass: the source x
    answer-token matrix takes as many passes as attributing the whole answer (IG adds f(x)
    and f(baseline) per row), and gives the scores of k rows run as sequences of their own
    (the target's per-token form taken away), which take k times the passes."""
    import tokattr.attribution

    lm = tiny_lm(arch)
    prompts, answers = ["12x31=", "7x5="], ["372", "35"]
    shared = run(lm, prompts, method, answers, per_answer_token=True, seed=2, **params)
    whole = run(lm, prompts, method, answers, seed=2, **params)
    monkeypatch.setattr(tokattr.attribution, "TOKEN_FORMS", {})
    alone = run(lm, prompts, method, answers, per_answer_token=True, seed=2, **params)
    for s, w, a in zip(shared, whole, alone, strict=True):
        torch.testing.assert_close(s.scores, a.scores, atol=1e-5, rtol=1e-4)
        k = len(s.answer_tokens)
        endpoints = 2 * (k - 1) if method == "integrated_gradients" else 0
        assert s.model_evals == w.model_evals + endpoints, (s.model_evals, w.model_evals)
        assert a.model_evals == k * w.model_evals  # a sequence per row: k times the passes
