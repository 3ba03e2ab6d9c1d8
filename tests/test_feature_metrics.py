"""Metrics at feature granularity: every metric erases whole features, ``lds`` is Spearman of
predicted against actual changes, ``plausibility_top1`` reads the sources, and data sets
carry their features into the benchmark."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _tiny import tiny_lm
from test_feature_attribution import _by_hand, _feature_tokens

from tokattr.attribution import attribute
from tokattr.evaluation import evaluate
from tokattr.metrics import functional as F

PROMPTS = ["12+3=15;9-4=5;7*2=", "8+8=16;3*3=9;1+1=", "5-2=3;4*4=16;2*3=6;9-9="]


def test_metrics_erase_whole_features():
    lm = tiny_lm("llama")
    table = evaluate(lm, PROMPTS, ["14", "2", "0"], methods=["occlusion", "random"],
                     metrics=["loo_kendall_tau", "comprehensiveness", "lds"],
                     features="separator:;", progress=False, n_bootstrap=10)  # fmt: skip
    # Occlusion over features is leave-one-out over features: tau-b is exactly 1.
    tau = table.values[("occlusion", "loo_kendall_tau", "")]
    assert torch.allclose(tau, torch.ones_like(tau))
    # Comprehensiveness at k = one feature: f(x) - f(x without the top feature), by hand.
    comp = table.values[("occlusion", "comprehensiveness", "1%")]
    for b, a in enumerate(table.attributions["occlusion"]):
        groups = _feature_tokens(lm, a)
        top = int(a.scores.argmax())
        f = _by_hand(lm, a.prompt, a.answer_ids, [[], groups[top]])
        assert float(comp[b]) == pytest.approx(float(f[0] - f[1]), abs=2e-4)
    lds = table.values[("occlusion", "lds", "")]
    assert torch.isfinite(lds).all() and (lds.abs() <= 1).all()


def test_lds_is_one_for_the_exact_scores_of_an_additive_target():
    """On an additive target the exact Shapley values predict every ablation exactly (and
    so does occlusion), so their LDS is 1; a permutation of them scores lower."""
    lm = tiny_lm("llama")
    torch.manual_seed(0)
    w = torch.randn(40, lm.model.config.hidden_size, dtype=torch.float64)

    def target(model, embeds, inputs):
        return (embeds.double() * w[: embeds.shape[1]]).sum((-1, -2))

    prompt = "12+3=15;9-4=5;7*2=14;6+1=7;5+5="
    from tokattr.batching import collate, encode_examples
    from tokattr.problems import batch_problem

    enc = encode_examples(lm.tokenizer, [prompt], ["1"], None, None, ["separator:;"])
    problem = batch_problem(lm, collate(lm.tokenizer, enc), target_fn=target, seeds=[3])
    occ = attribute(lm, prompt, "occlusion", target="1", target_fn=target,
                    features="separator:;")  # fmt: skip
    scores = problem.scatter(occ.scores[None])
    assert float(F.lds(problem, scores, 24)[0]) == pytest.approx(1.0)
    worse = problem.scatter(occ.scores.flip(0)[None])
    assert float(F.lds(problem, worse, 24)[0]) < 0.99


def test_plausibility_top1_reads_the_sources():
    lm = tiny_lm("gpt2")
    spans = [[(0, 7), (8, 13)], [(0, 6), (7, 12)], [(0, 5), (6, 12), (13, 18)]]
    table = evaluate(lm, PROMPTS, ["14", "2", "0"], methods=["occlusion"],
                     metrics=["plausibility_top1", "plausibility_auprc"], features=spans,
                     sources=[[1], [0], [2]], progress=False, n_bootstrap=10)  # fmt: skip
    top1 = table.values[("occlusion", "plausibility_top1", "")]
    for b, (a, src) in enumerate(zip(table.attributions["occlusion"], [1, 0, 2], strict=True)):
        assert float(top1[b]) == float(int(a.scores.abs().argmax()) == src)
    with pytest.raises(ValueError, match="sources \\[5\\] must index its 2 features"):
        evaluate(lm, PROMPTS, ["14", "2", "0"], methods=["occlusion"],
                 metrics=["plausibility_top1"], features=spans, sources=[[5], [0], [2]],
                 progress=False)  # fmt: skip


def test_plausibility_top1_function():
    scores = torch.tensor([[0.1, -3.0, 2.0, 0.0], [1.0, 2.0, 0.5, 0.0], [1.0, 2.0, 0.0, 0.0]])
    labels = torch.tensor([[0, 1, 0, -1], [1, 0, 0, -1], [0, 0, 0, -1]])
    out = F.plausibility_top1(scores, labels)
    assert out[0] == 1.0 and out[1] == 0.0 and math.isnan(out[2])


def test_jsonl_features_and_sources(tmp_path):
    from tokattr.data.jsonl import read_jsonl
    from tokattr.lightning.prompts import PromptDataModule

    path = tmp_path / "ctx.jsonl"
    lines = [
        {"id": "a", "prompt": "Paris is in France. Rome is in Italy. Rome is in",
         "answer": " Italy", "features": "sentence", "sources": [1]},
        {"id": "b", "prompt": "x1;y2;y", "answer": "2", "features": [[0, 2], [3, 5]],
         "sources": [1]},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    problems = read_jsonl(path)
    assert problems[0].features == "sentence" and problems[1].features == ((0, 2), (3, 5))
    examples = PromptDataModule(jsonl=str(path)).examples()
    assert examples[1]["features"] == [[0, 2], [3, 5]] and examples[1]["sources"] == [1]
    words = PromptDataModule(jsonl=str(path), features="word").examples()
    assert words[0]["features"] == "word" and "sources" not in words[0]
    for bad, message in [
        ({"features": [[0, 99]]}, "must satisfy 0 <= start < end"),
        ({"features": "para"}, "unknown features 'para'"),
        ({"features": "word", "sources": [9]}, "not among the 3 features"),
        ({"sources": [0]}, 'give "features" too'),
    ]:
        path.write_text(json.dumps({"id": "c", "prompt": "a b c", "answer": "d", **bad}) + "\n")
        with pytest.raises(ValueError, match=f"{path}:1: .*{message}"):
            read_jsonl(path)


def test_the_lookup_data_set_gives_segments_and_sources():
    from tokattr.data.lookup import LookupGenerator
    from tokattr.lightning.prompts import PromptDataModule

    examples = PromptDataModule(dataset="lookup", n=5, seed=9).examples()
    gen = LookupGenerator(9)
    for i, e in enumerate(examples):
        p = gen.problem(i)
        assert e["prompt"] == p.prompt and e["answer"] == p.answer
        assert e["features"] == [list(s) for s in p.segments] and e["sources"] == list(p.sources)
    with pytest.raises(ValueError, match="unknown 'maths'"):
        PromptDataModule(dataset="maths")
