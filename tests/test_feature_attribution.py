"""Every method on features of several tokens (words, sentences, separated parts, spans),
checked against removing the tokens by hand, brute-force Shapley enumeration and the token
scores summed; and bad feature input refused before any model call."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _tiny import ARCHS, tiny_bpe_lm, tiny_lm

from tokattr.attribution import attribute
from tokattr.engine import loo
from tokattr.methods import METHODS

PROMPTS = ["12+3=15;9-4=5;7*2=", "8+8=16;3*3="]
FAST = {
    "integrated_gradients": {"n_steps": 8},
    "kernel_shap": {"n_samples": 40},
    "shapley_sampling": {"n_samples": 3},
}


def _by_hand(lm, prompt: str, answer_ids: list[int], removed: list[list[int]]) -> torch.Tensor:
    """log p(answer | prompt) with the prompt tokens at ``removed[k]`` (indices into the
    prompt's token ids) replaced by the pad embedding, positions kept: one unpadded forward
    per coalition, written without tokattr's batching or targets. ``[len(removed)]`` float64"""
    tok = lm.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    ids = torch.tensor(prompt_ids + answer_ids)
    emb = lm.model.get_input_embeddings()
    pad = emb.weight[tok.pad_token_id].detach()
    out = []
    with torch.no_grad():
        for cols in removed:
            x = emb(ids)[None].clone()
            x[0, cols] = pad
            logp = lm.model(inputs_embeds=x).logits.double().log_softmax(-1)[0]
            n = len(prompt_ids)
            out.append(sum(float(logp[n + i - 1, t]) for i, t in enumerate(answer_ids)))
    return torch.tensor(out, dtype=torch.float64)


def _feature_tokens(lm, a) -> list[list[int]]:
    """The prompt token indices (BOS counted) of each feature of an Attribution."""
    special = lm.tokenizer(a.prompt, return_special_tokens_mask=True)["special_tokens_mask"]
    plain = [i for i, s in enumerate(special) if not s]
    groups: list[list[int]] = [[] for _ in a.features]
    for j, f in enumerate(a.token_features):
        if f >= 0:
            groups[f].append(plain[j])
    return groups


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", ["packed", "cache", "plain"])
def test_feature_occlusion_is_removing_every_token_of_the_feature_by_hand(arch, path, monkeypatch):
    lm = tiny_lm(arch)
    if path == "cache":  # every row too long to pack: key/value-cache passes
        monkeypatch.setattr(loo, "PACK_LIMIT", 0)
    attrs = attribute(
        lm, PROMPTS, "occlusion", features="separator:;", prefix_reuse=path != "plain"
    )
    for a in attrs:
        groups = _feature_tokens(lm, a)
        assert a.features == a.prompt.split(";") and len(a.scores) == len(groups)
        assert all(len(g) > 1 for g in groups)
        f = _by_hand(lm, a.prompt, a.answer_ids, [[], *groups])
        torch.testing.assert_close(a.scores.double(), f[0] - f[1:], atol=2e-4, rtol=1e-4)
        assert a.target_score == pytest.approx(float(f[0]), abs=1e-4)


def test_feature_occlusion_on_a_bpe_tokenizer_and_words():
    lm = tiny_bpe_lm("gpt2")
    prompt = "The capital of France is"
    a = attribute(lm, prompt, "occlusion", target=" Paris", features="word")
    assert a.features == ["The", "capital", "of", "France", "is"]
    f = _by_hand(lm, prompt, a.answer_ids, [[], *_feature_tokens(lm, a)])
    torch.testing.assert_close(a.scores.double(), f[0] - f[1:], atol=2e-4, rtol=1e-4)


def _shapley_by_permutations(values: dict[frozenset, float], n: int) -> list[float]:
    """Shapley values as the mean marginal gain over all n! orders (the definition, not the
    subset-weight formula the method uses)."""
    phi = [0.0] * n
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        kept: frozenset = frozenset()
        for i in order:
            phi[i] += values[kept | {i}] - values[kept]
            kept = kept | {i}
    return [p / len(orders) for p in phi]


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_shapley_over_features_is_brute_force_enumeration(arch):
    lm = tiny_lm(arch)
    prompt = "12+3=15;9-4=5;7*2=14;6+1="
    a = attribute(lm, prompt, "exact_shapley", features="separator:;", max_tokens=4)
    groups = _feature_tokens(lm, a)
    n = len(groups)
    assert n == 4 and sum(len(g) for g in groups) > 16  # 2^4 coalitions, not 2^23
    subsets = [frozenset(c) for k in range(n + 1) for c in itertools.combinations(range(n), k)]
    removed = [[t for i in range(n) if i not in s for t in groups[i]] for s in subsets]
    f = _by_hand(lm, prompt, a.answer_ids, removed)
    phi = _shapley_by_permutations(dict(zip(subsets, f.tolist(), strict=True)), n)
    torch.testing.assert_close(
        a.scores.double(), torch.tensor(phi, dtype=torch.float64), atol=5e-4, rtol=1e-4
    )
    assert a.model_evals == 2**4


@pytest.mark.parametrize(
    "method",
    ["saliency", "input_x_gradient", "integrated_gradients", "gradient_shap", "smoothgrad",
     "vargrad", "attnlrp", "cp_lrp"],
)  # fmt: skip
def test_gradient_methods_sum_their_token_scores_over_a_feature(method):
    lm = tiny_lm("llama")
    params = {**FAST.get(method, {}), "seed": 3}  # the same draws for tokens and features
    tokens = attribute(lm, PROMPTS, method, **params)
    # Spans that cover every character: no context, so IG's path is the token-level one.
    cover = [[(0, 8), (8, 14), (14, len(PROMPTS[0]))], [(0, 3), (3, len(PROMPTS[1]))]]
    words = attribute(lm, PROMPTS, method, features=cover, **params)
    for t, w in zip(tokens, words, strict=True):
        sums = torch.zeros(len(w.features), dtype=torch.float64)
        for j, f in enumerate(w.token_features):
            if f >= 0:
                sums[f] += float(t.scores[j])
        torch.testing.assert_close(w.scores.double(), sums, atol=1e-5, rtol=1e-4)
        if method == "integrated_gradients":  # the convergence delta is the same sum
            assert w.delta == pytest.approx(t.delta, abs=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_token_features_give_todays_numbers_and_every_method_runs_on_features(method):
    lm = tiny_lm("gpt2")
    params = FAST.get(method, {})
    short = ["12+3=", "9-4=5;7*2="]  # few enough tokens for exact Shapley
    default = attribute(lm, short, method, seed=3, **params)
    tokens = attribute(lm, short, method, seed=3, features="token", **params)
    for d, t in zip(default, tokens, strict=True):
        assert torch.equal(d.scores, t.scores)
        assert t.features == t.tokens and t.spans == t.offsets and t.granularity == "token"
    spans = [[(0, 7), (8, 13)], [(0, 6)]]  # explicit spans: the last part of each is context
    grouped = attribute(lm, PROMPTS, method, seed=3, features=spans, **params)
    for g, s in zip(grouped, spans, strict=True):
        assert g.spans == s and g.granularity == "spans"
        assert g.features == [g.prompt[a:b] for a, b in s]
        assert g.scores.shape == (len(s),) and torch.isfinite(g.scores).all()
        assert -1 in g.token_features  # the context tokens belong to no feature


def test_context_is_never_removed():
    """Perturbing every feature leaves the context tokens as they are: the all-removed input
    equals removing the features' tokens by hand, not the whole prompt."""
    lm = tiny_lm("llama")
    prompt = PROMPTS[0]
    a = attribute(lm, prompt, "exact_shapley", features=[(0, 7)])  # one feature: phi = f - f0
    groups = _feature_tokens(lm, a)
    f = _by_hand(lm, prompt, a.answer_ids, [[], groups[0]])
    assert float(a.scores[0]) == pytest.approx(float(f[0] - f[1]), abs=2e-4)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ("paragraph", "unknown features 'paragraph'"),
        ("separator:", "non-empty separator"),
        ([(0, 5), (3, 9)], "overlaps or precedes"),
        ([(0, 500)], "must satisfy 0 <= start < end"),
        ([(4, 4)], "must satisfy 0 <= start < end"),
        ([(0, 3), (1, 2)], "overlaps or precedes"),
        ([(3, 4)], "holds no token of its own"),  # a space: its token starts at the word
    ],
)
def test_bad_features_are_refused_before_any_model_call(features, message, monkeypatch):
    lm = tiny_lm("gpt2")

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(lm.model, "forward", no_forward)
    with pytest.raises(ValueError, match=message):
        attribute(lm, "The capital of France is", "occlusion", target="4", features=features)


def test_a_bpe_span_inside_one_token_names_the_feature():
    lm = tiny_bpe_lm("gpt2")
    with pytest.raises(ValueError, match=r"feature 0 'apita'.*holds no token"):
        attribute(lm, "The capital of France is", "occlusion", target=" Paris",
                  features=[(5, 10)])  # fmt: skip


def test_one_feature_list_per_prompt_is_checked_for_length():
    lm = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="1 feature specifications for 2 prompts"):
        attribute(lm, PROMPTS, "occlusion", features=["word"])
    with pytest.raises(ValueError, match="prompt 1 '8\\+8=16;3\\*3='"):
        attribute(lm, PROMPTS, "occlusion", features=["word", [(0, 99)]])
    mixed = attribute(lm, PROMPTS, "occlusion", features=["word", "line"])
    assert [a.granularity for a in mixed] == ["word", "line"]
    assert mixed[1].features == [PROMPTS[1]] and not math.isnan(float(mixed[1].scores[0]))


def _additive_target(coef_by_column: torch.Tensor):
    """A target that adds a fixed amount per kept column: ``sum_c w_c . x_c`` with ``w_c``
    chosen so that column ``c`` at its input embedding adds ``coef_by_column[c]`` over its
    baseline. Linear in the embeddings, so any method's ideal score for a feature is the sum
    of its columns' amounts."""

    def target(model, embeds, inputs):
        return (embeds.double() * coef_by_column.to(embeds.device)).sum((-1, -2))

    return target


def test_context_cite_recovers_the_coefficients_of_an_additive_target():
    lm = tiny_lm("llama")
    prompt = "12+3=15;9-4=5;7*2=14;6+1=7;5+5="
    ids = lm.tokenizer(prompt + "1")["input_ids"]
    emb = lm.model.get_input_embeddings().weight.detach().double()
    pad = emb[lm.tokenizer.pad_token_id]
    # Per-column weight vectors giving each demonstration a known total: w_c = a_c (x_c - b).
    amounts = {0: 3.0, 1: -2.0, 2: 0.0, 3: 1.5, 4: 0.5}
    spans = feature_ranges = [(0, 7), (8, 13), (14, 20), (21, 26), (27, 31)]
    offsets = lm.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    w = torch.zeros(len(ids), emb.shape[1], dtype=torch.float64)
    for col, (a, _) in enumerate(offsets):
        f = next((k for k, (s, e) in enumerate(feature_ranges) if s <= a < e), None)
        if f is None or col == 0:
            continue
        d = emb[ids[col]] - pad
        n_cols = sum(1 for s2, _ in offsets[1:] if spans[f][0] <= s2 < spans[f][1])
        w[col] = amounts[f] / n_cols * d / (d @ d)
    target = _additive_target(w)
    a = attribute(lm, prompt, "context_cite", target="1", target_fn=target, features=spans,
                  seed=0, logit=False, n_ablations=128, alpha=0.001)  # fmt: skip
    torch.testing.assert_close(
        a.scores.double(), torch.tensor(list(amounts.values()), dtype=torch.float64),
        atol=0.02, rtol=0.0,
    )  # fmt: skip
    assert a.model_evals <= 128


def test_context_cite_weights_are_scikit_learns_lasso_on_the_same_masks():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import Lasso
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tokattr.methods.context_cite import ContextCite
    from tokattr.problems import batch_problem

    assert sklearn
    lm = tiny_lm("gpt2")
    from tokattr.batching import collate, encode_examples

    encoded = encode_examples(
        lm.tokenizer, PROMPTS, ["8", "9"], None, None, ["separator:;", "separator:;"]
    )
    batch = collate(lm.tokenizer, encoded)
    problem = batch_problem(lm, batch, seeds=[5, 6])
    method = ContextCite(n_ablations=48)
    out = method.attribute(problem)
    scores = problem.reduce(out.scores)
    keep = method.masks(problem)
    for b in range(problem.n_rows):
        n = int(problem.n_features[b])
        rows = torch.full((keep.shape[1],), b)
        f = problem.evaluate(rows, keep[b]).double()
        y = (f - torch.log(-torch.expm1(f))).numpy()  # logit-scaled probability
        n_tok = int(problem.inputs.score_mask[b].sum())
        x = keep[b, :, :n].numpy().astype("float32")
        scaler, model = StandardScaler(), Lasso(alpha=0.01, random_state=0, fit_intercept=True)
        make_pipeline(scaler, model).fit(x, y / n_tok)
        want = model.coef_ / scaler.scale_ * n_tok
        torch.testing.assert_close(
            scores[b, :n].double(), torch.from_numpy(want).double(), atol=1e-4, rtol=1e-3
        )


def test_context_cite_masks_come_from_the_row_seed():
    lm = tiny_lm("gpt2")
    a = attribute(lm, PROMPTS, "context_cite", seed=[1, 2], features="separator:;")
    b = attribute(lm, PROMPTS[::-1], "context_cite", seed=[2, 1], features="separator:;")
    assert torch.equal(a[0].scores, b[1].scores) and torch.equal(a[1].scores, b[0].scores)
    with pytest.raises(ValueError, match="keep_prob must be in"):
        attribute(lm, PROMPTS, "context_cite", keep_prob=1.5)
