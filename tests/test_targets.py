"""Target functions and the token batch: scores checked against full-sequence logits."""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from _tiny import ALL_ARCHS, tiny_lm

from tokattr import attribute
from tokattr.batching import collate, encode_example, encode_examples
from tokattr.engine import capabilities as engine_capabilities
from tokattr.engine import tail as engine_tail
from tokattr.targets import TARGETS, log_prob, target_inputs

PROMPTS = ["12+3=", "$16,000/-0.8=", "7x5=", "4900/100="]
ANSWERS = ["15", "-20000", "35", "49"]


def direct_token_log_probs(lm, prompt: str, answer: str) -> torch.Tensor:
    """log p of each answer token from one unpadded forward over prompt + answer. [n_answer]"""
    tok = lm.tokenizer
    n_prompt = len(tok(prompt)["input_ids"])
    ids = torch.tensor([tok(prompt + answer)["input_ids"]])  # [1, seq]
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].float()  # [seq, vocab]
    logp = logits.log_softmax(-1)
    cols = torch.arange(n_prompt, ids.shape[1])
    return logp[cols - 1, ids[0, cols]]


def batch_scores(lm, prompts, answers, target="log_prob", foils=None, per_answer_token=False):
    examples = [
        encode_example(lm.tokenizer, p, a, None if foils is None else foils[i], lm.max_length)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    batch = collate(lm.tokenizer, examples)
    inputs = target_inputs(batch, per_answer_token)
    embeds = lm.model.get_input_embeddings()(batch.input_ids[inputs.example_index])
    with torch.no_grad():
        return TARGETS[target](lm.model, embeds, inputs)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_log_prob_equals_full_sequence_logits(arch):
    lm = tiny_lm(arch)
    got = batch_scores(lm, PROMPTS, ANSWERS)  # one padded batch
    want = torch.stack(
        [direct_token_log_probs(lm, p, a).sum() for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    )
    assert got.shape == (len(PROMPTS),)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_prob_logit_and_per_token(arch):
    lm = tiny_lm(arch)
    per_token = [direct_token_log_probs(lm, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    prob = batch_scores(lm, PROMPTS, ANSWERS, "prob")
    torch.testing.assert_close(prob, torch.stack([t.sum().exp() for t in per_token]))
    rows = batch_scores(lm, PROMPTS, ANSWERS, per_answer_token=True)
    torch.testing.assert_close(rows, torch.cat(per_token), atol=1e-5, rtol=1e-5)

    tok = lm.tokenizer
    want_logits = []
    for p, a in zip(PROMPTS, ANSWERS, strict=True):
        ids = torch.tensor([tok(p + a)["input_ids"]])
        n_prompt = len(tok(p)["input_ids"])
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0]
        want_logits.append(logits[n_prompt - 1, ids[0, n_prompt]])
    got = batch_scores(lm, PROMPTS, ANSWERS, "logit")
    torch.testing.assert_close(got, torch.stack(want_logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_contrast_is_answer_minus_foil(arch):
    lm = tiny_lm(arch)
    foils = ["16", "20000", "3", "490"]  # shorter and longer than the answers
    got = batch_scores(lm, PROMPTS, ANSWERS, "contrast", foils=foils)
    want = torch.stack(
        [
            direct_token_log_probs(lm, p, a).sum() - direct_token_log_probs(lm, p, f).sum()
            for p, a, f in zip(PROMPTS, ANSWERS, foils, strict=True)
        ]
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_scores_do_not_depend_on_the_batch(arch):
    """A prompt alone equals the same prompt left-padded among longer and shorter ones."""
    lm = tiny_lm(arch)
    alone = batch_scores(lm, ["7x5="], ["35"])
    mixed = batch_scores(lm, ["$16,000/-0.8=", "7x5=", "1="], ["-20000", "35", "1"])
    assert abs(float(alone[0]) - float(mixed[1])) <= 1e-5


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_models_honour_position_ids(arch):
    """Without the right position ids a left-padded row would score differently: the models
    read the ids we pass (GPT-2 absolutely, Llama through RoPE's relative offsets)."""
    lm = tiny_lm(arch)
    ids = torch.tensor([lm.tokenizer("12+3=15")["input_ids"]])
    n = ids.shape[1]
    with torch.no_grad():
        straight = lm.model(input_ids=ids, position_ids=torch.arange(n)[None]).logits
        gapped = torch.arange(n)[None] + (torch.arange(n)[None] >= 3) * 7  # a jump of 7
        shifted = lm.model(input_ids=ids, position_ids=gapped).logits
    # Random tiny weights move the logits by ~1e-3 here; float noise is ~1e-7.
    assert (straight - shifted).abs().max() > 1e-5


def test_layout_left_pads_prompts_and_right_pads_answers():
    lm = tiny_lm("llama")
    tok = lm.tokenizer
    examples = [encode_example(tok, p, a) for p, a in [("12+3=", "15"), ("7=", "7000")]]
    batch = collate(tok, examples)
    assert batch.prompt_width == 7  # <s> ▁ 1 2 + 3 =
    assert batch.input_ids.shape == (2, 7 + 4)
    assert batch.attention_mask[1].tolist() == [0, 0, 0] + [1] * 8
    assert batch.attention_mask[0].tolist() == [1] * 9 + [0, 0]
    assert batch.position_ids[1, 3:].tolist() == list(range(8))
    assert batch.tokens[1] == ["▁", "7", "="]  # no BOS
    assert not batch.feature_mask[:, 0].any()  # BOS / padding column
    assert batch.feature_mask.sum(-1).tolist() == [6, 3]
    assert batch.answer_tokens == [["1", "5"], ["7", "0", "0", "0"]]
    assert batch.answer_mask[1].nonzero().flatten().tolist() == [7, 8, 9, 10]
    assert batch.offsets[0] == [
        tuple(o) for o in tok("12+3=", return_offsets_mapping=True)["offset_mapping"][1:]
    ]


def test_trailing_space_merged_into_the_answer_goes_to_the_answer():
    tok = tiny_lm("llama").tokenizer
    # 'x' merges with the prompt's trailing metaspace: '▁' + 'x' -> '▁x', as in the text
    # '3 x 5 x' read whole; the space then belongs to the answer.
    enc = encode_example(tok, "3 x 5 ", "x")
    assert tok.convert_ids_to_tokens(enc.prompt_ids)[-1] == "5"
    assert tok.convert_ids_to_tokens(enc.answer_ids) == ["▁x"]
    whole = tok("3 x 5 x")["input_ids"]
    assert enc.prompt_ids + enc.answer_ids == whole
    # A trailing space the answer does not merge with stays a prompt token.
    enc = encode_example(tok, "3 x 5 = ", "15")
    assert tok.convert_ids_to_tokens(enc.prompt_ids)[-1] == "▁"


def test_answer_that_retokenizes_the_prompt_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2, "<s>": 3}, [("a", "b")]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", pad_token="<s>")
    with pytest.raises(ValueError, match=r"the answer 'b' changes how the prompt is tokenized"):
        encode_example(tok, "a", "b")  # 'a' + 'b' -> 'ab': no token boundary to split at
    # Given as token ids, the answer is taken as it is: no re-tokenization to disagree with.
    enc = encode_example(tok, "a", [1])
    assert enc.prompt_ids == [0] and enc.answer_ids == [1]


def test_encoding_errors():
    tok = tiny_lm("llama").tokenizer
    with pytest.raises(ValueError, match="empty prompt"):
        encode_example(tok, "", "1")
    with pytest.raises(ValueError, match="empty answer"):
        encode_example(tok, "1+1=", "")
    with pytest.raises(ValueError, match="longer than the model's context of 20 tokens"):
        encode_example(tok, "1+1=" * 4 + "1", "22", max_length=20)
    with pytest.raises(ValueError, match="context of 20 leaves no room for an answer"):
        encode_example(tok, "1+1=" * 5, "2", max_length=20)
    with pytest.raises(TypeError, match="a prompt must be a string, got int 123"):
        encode_example(tok, 123, "2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a string or token ids, got float"):
        encode_example(tok, "1+1=", 2.0)  # type: ignore[arg-type]


def test_error_messages_quote_a_long_prompt_briefly():
    tok = tiny_lm("llama").tokenizer
    long_prompt = "1+1=" * 500
    with pytest.raises(ValueError) as err:
        encode_example(tok, long_prompt, "2", max_length=128)
    message = str(err.value)
    assert "2,000 characters" in message and len(message) < 250, message
    assert "\n" not in message


def test_encode_examples_equals_one_by_one_in_one_tokenizer_call(monkeypatch):
    tok = tiny_lm("llama").tokenizer
    # The last two: a trailing space the answer merges with (re-tokenized on the fallback
    # path) and one it does not.
    prompts = [*PROMPTS, "3 x 5 ", "3 x 5 = "]
    answers = [*ANSWERS, "x", "15"]
    foils = ["1", "2", "3", "4", "y", "16"]
    for f in (None, foils):
        one = [
            encode_example(tok, p, a, None if f is None else f[i], 64)
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        ]
        assert encode_examples(tok, prompts, answers, f, 64) == one

    calls = []
    real = type(tok).__call__

    def counting(self, text, *args, **kwargs):
        calls.append(text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    encode_examples(tok, PROMPTS, ANSWERS, None, 64)
    assert len(calls) == 1 and len(calls[0]) == 2 * len(PROMPTS)


def test_encode_examples_errors_name_the_first_bad_example():
    tok = tiny_lm("llama").tokenizer
    with pytest.raises(ValueError, match="empty prompt"):
        encode_examples(tok, ["1+1=", ""], ["2", "3"])
    with pytest.raises(ValueError, match="empty answer for prompt '2\\+2='"):
        encode_examples(tok, ["1+1=", "2+2=", "3+3="], ["2", "", ""])
    with pytest.raises(
        ValueError, match="context of 20 leaves no room for an answer: '1\\+1=1\\+1="
    ):
        encode_examples(tok, ["2=", "1+1=" * 5], ["2", "2"], max_length=20)


def test_log_prob_needs_an_answer_token():
    lm = tiny_lm("llama")
    batch = collate(lm.tokenizer, [encode_example(lm.tokenizer, "1+1=", "2")])
    inputs = target_inputs(batch)
    empty = type(inputs)(
        *inputs.as_tuple()[:3], torch.zeros_like(inputs.score_mask), *inputs.as_tuple()[4:]
    )
    embeds = lm.model.get_input_embeddings()(batch.input_ids)
    with pytest.raises(ValueError, match="no answer token"):
        log_prob(lm.model, embeds, empty)


def _branched(lm, per_answer_token=False):
    """The padded batch of PROMPTS, and two branches per row: the row with its first feature,
    and with its last prompt token, replaced by a random vector (branch points at both ends
    of the prompt)."""
    from tokattr.engine.packing import Branches

    examples = [encode_example(lm.tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    batch = collate(lm.tokenizer, examples)
    inputs = target_inputs(batch, per_answer_token)
    embeds = lm.model.get_input_embeddings()(batch.input_ids[inputs.example_index]).detach()
    n = embeds.shape[0]
    feats = batch.feature_mask[inputs.example_index]
    cols = torch.arange(feats.shape[1])
    first = torch.where(feats, cols, 99).min(-1).values
    last = torch.where(feats, cols, -1).max(-1).values
    rows = torch.arange(n).repeat(2)
    start = torch.cat([first, last])
    gen = torch.Generator().manual_seed(0)
    copies = embeds[rows].clone()
    copies[torch.arange(2 * n), start] = torch.randn(2 * n, embeds.shape[-1], generator=gen)
    return embeds, inputs, Branches(rows, start, copies), copies


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("target", ["log_prob", "prob", "logit"])
def test_branches_score_as_separate_sequences(arch, target):
    """A packed pass (each row with its branches, tree attention) gives the rows' and the
    branches' scores as separate full-sequence passes do, rows of unlike lengths padded on both
    sides, one row per answer token too."""
    lm = tiny_lm(arch)
    for per_answer_token in (False, True):
        embeds, inputs, branches, copies = _branched(lm, per_answer_token)
        fn = TARGETS[target]
        with torch.no_grad():
            packed = fn(lm.model, embeds, inputs, branches=branches)
            rows = fn(lm.model, embeds, inputs)
            apart = fn(lm.model, copies, inputs.select(branches.rows))
        n = embeds.shape[0]
        assert packed.shape == (n + len(branches.rows),)
        torch.testing.assert_close(packed[:n], rows, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed[n:], apart, atol=1e-5, rtol=1e-4)


def test_branches_packing_and_errors():
    """Trees share packed sequences by first-fit decreasing, or as the caller packs them; the
    result does not depend on the packing. A branch that starts in the answer is refused."""
    from dataclasses import replace

    from tokattr.engine.packing import first_fit_trees, tree_sizes

    assert first_fit_trees([5, 3, 2, 4, 1]) == [0, 2, 2, 1, 1]  # 5 | 4+1 | 3+2
    assert first_fit_trees([5, 3, 2], width=10) == [0, 0, 0]
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_trees([5, 3], width=4)
    lm = tiny_lm("llama")
    embeds, inputs, branches, copies = _branched(lm)
    engine_tail.tail_mlp(lm.model)  # the once-per-model probe runs before the hook
    shapes = []
    hook = lm.model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape)),
        with_kwargs=True,
    )
    n = embeds.shape[0]
    try:
        with torch.no_grad():
            default = log_prob(lm.model, embeds, inputs, branches=branches)
            alone = replace(branches, packing=torch.arange(n))
            each = log_prob(lm.model, embeds, inputs, branches=alone)
            by_two = log_prob(lm.model, embeds, inputs, branches=replace(alone, passes=2))
    finally:
        hook.remove()
    assert shapes[0][0] < n == shapes[1][0]  # shared sequences, then one each
    torch.testing.assert_close(default, each, atol=1e-5, rtol=1e-5)
    # Two packed sequences a pass, in packing order, each pass as wide as its own sequences:
    # the trees grow with the prompt, so the passes' widths differ.
    assert [s[0] for s in shapes[2:]] == [2] * (n // 2) + [1] * (n % 2)
    sizes, _ = tree_sizes(inputs, branches.start, branches.rows)
    assert [s[1] for s in shapes[2:]] == [int(sizes[i : i + 2].max()) for i in range(0, n, 2)]
    assert len({s[1] for s in shapes[2:]}) > 1
    torch.testing.assert_close(by_two, each, atol=1e-5, rtol=1e-5)
    # Branches given as their start column only ([n, d_model]): the rest is the row's.
    at_start = copies[torch.arange(len(branches.rows)), branches.start]
    with torch.no_grad():
        only_start = log_prob(lm.model, embeds, inputs, branches=replace(branches, embeds=at_start))
    torch.testing.assert_close(only_start, default, atol=1e-6, rtol=1e-6)
    late = replace(branches, start=inputs.score_mask.long().argmax(-1).repeat(2))
    with pytest.raises(ValueError, match="before the first scored column"):
        log_prob(lm.model, embeds, inputs, branches=late)


# --------------------------------------------------------------- last MLP on the tail only


@contextlib.contextmanager
def whole_passes(model):
    """Run every pass whole (no last-MLP cut) inside the block."""
    had, old = model in engine_tail._TAIL_MLP, engine_tail._TAIL_MLP.get(model)
    engine_tail._TAIL_MLP[model] = None
    try:
        yield
    finally:
        if had:
            engine_tail._TAIL_MLP[model] = old
        else:
            del engine_tail._TAIL_MLP[model]


def mlp_widths(model, run):
    """``run()``'s result and the column counts the last decoder MLP computed on."""
    widths = []
    handle = engine_tail.last_decoder_mlp(model).register_forward_hook(
        lambda module, args, out: widths.append(out.shape[1])
    )
    try:
        return run(), widths
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_last_mlp_runs_on_the_scored_columns_only(arch):
    lm = tiny_lm(arch)
    examples = [encode_example(lm.tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    batch = collate(lm.tokenizer, examples)
    keep = batch.input_ids.shape[1] - batch.prompt_width + 1  # logits of the answer slot
    batch_scores(lm, PROMPTS, ANSWERS)  # the once-per-model probe runs here
    cut, widths = mlp_widths(lm.model, lambda: batch_scores(lm, PROMPTS, ANSWERS))
    assert widths == [keep]
    with whole_passes(lm.model):
        whole, widths = mlp_widths(lm.model, lambda: batch_scores(lm, PROMPTS, ANSWERS))
    assert widths == [batch.input_ids.shape[1]]
    torch.testing.assert_close(cut, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "method", ["occlusion", "occlusion-cache", "kernel_shap", "integrated_gradients"]
)
def test_cut_passes_give_the_same_attributions(method):
    """Packed occlusion trees, key/value-cache passes, full perturbed sequences, and gradients
    through the cut."""

    lm = tiny_lm("llama")
    params = {"kernel_shap": {"n_samples": 40}, "integrated_gradients": {"n_steps": 8}}
    run = functools.partial(
        attribute,
        lm,
        PROMPTS,
        method.removesuffix("-cache"),
        target=ANSWERS,
        seed=0,
        **params.get(method, {}),
    )
    run()  # the once-per-model probes run here
    packs = engine_capabilities._BRANCHES_OK.get(lm.model)  # probed only by occlusion
    if method == "occlusion-cache":  # as on a model that cannot pack
        engine_capabilities._BRANCHES_OK[lm.model] = False
    try:
        cut, cut_widths = mlp_widths(lm.model, run)
        with whole_passes(lm.model):
            whole, whole_widths = mlp_widths(lm.model, run)
    finally:
        if packs is None:
            engine_capabilities._BRANCHES_OK.pop(lm.model, None)
        else:
            engine_capabilities._BRANCHES_OK[lm.model] = packs
    # The same passes, each of whose last MLP computes fewer columns (a cache pass that starts
    # at the last prompt column has none to leave out).
    assert len(cut_widths) == len(whole_widths)
    assert all(c <= w for c, w in zip(cut_widths, whole_widths, strict=True))
    assert sum(cut_widths) < 0.8 * sum(whole_widths)
    for c, w in zip(cut, whole, strict=True):
        torch.testing.assert_close(c.scores, w.scores, atol=1e-5, rtol=1e-5)


def test_only_the_innermost_block_cuts_and_only_once():
    lm = tiny_lm("llama")
    x = lm.model.get_input_embeddings()(torch.arange(4, 16)[None])  # [1, 12, d]
    pos = torch.arange(12)[None]

    def logits(keep=None):
        kwargs = {} if keep is None else {"logits_to_keep": keep}
        with torch.no_grad():
            return lm.model(inputs_embeds=x, position_ids=pos, **kwargs).logits

    full = logits()
    engine_tail.tail_mlp(lm.model)  # probed before the hooks count

    def nested():
        with engine_tail.last_mlp_on_tail(lm.model, 12, 1):
            with engine_tail.last_mlp_on_tail(lm.model, 12, 7):
                inner = logits(7)
            return inner, logits(1), logits(3)  # the outer block's first call is cut, not the next

    (inner, outer, after), widths = mlp_widths(lm.model, nested)
    assert widths == [7, 1, 12]
    torch.testing.assert_close(inner, full[:, -7:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outer, full[:, -1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after, full[:, -3:], atol=1e-6, rtol=1e-6)


def test_a_failing_probe_warns_and_runs_whole():
    lm = tiny_lm("llama")

    class NoShortInputs(torch.nn.Module):
        def __init__(self, inner, error):
            super().__init__()
            self.inner, self.error = inner, error

        def forward(self, x):
            if x.shape[1] < 8:
                raise self.error
            return self.inner(x)

    model = copy.deepcopy(lm.model)
    inner = model.model.layers[-1].mlp
    model.model.layers[-1].mlp = NoShortInputs(inner, torch.OutOfMemoryError("no room"))
    assert engine_tail.tail_mlp(model) is None and model not in engine_tail._TAIL_MLP  # asks again
    model.model.layers[-1].mlp = NoShortInputs(inner, ValueError("short"))
    with pytest.warns(RuntimeWarning, match="probe failed: ValueError: short"):
        assert engine_tail.tail_mlp(model) is None
    assert engine_tail._TAIL_MLP[model] is None


def test_a_token_mixing_last_mlp_or_training_mode_runs_whole():
    lm = tiny_lm("llama")
    seq = collate(
        lm.tokenizer,
        [encode_example(lm.tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)],
    ).input_ids.shape[1]

    class Mixing(torch.nn.Module):
        """The MLP plus a running sum over the earlier tokens: not token by token."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 0.1 * x.cumsum(1)

    model = copy.deepcopy(lm.model)
    model.model.layers[-1].mlp = Mixing(model.model.layers[-1].mlp)
    mixed = type(lm)(model, lm.tokenizer, lm.name, lm.path)
    assert engine_tail.tail_mlp(model) is None  # the probe sees the logits move
    got, widths = mlp_widths(model, lambda: batch_scores(mixed, PROMPTS, ANSWERS))
    assert widths == [seq]
    want = torch.stack(
        [direct_token_log_probs(mixed, p, a).sum() for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # Training mode (dropout would make the probe meaningless): no probe, no hooks.
    training = copy.deepcopy(lm.model).train()
    trained = type(lm)(training, lm.tokenizer, lm.name, lm.path)
    _, widths = mlp_widths(training, lambda: batch_scores(trained, PROMPTS, ANSWERS))
    assert widths == [seq] and training not in engine_tail._TAIL_MLP
