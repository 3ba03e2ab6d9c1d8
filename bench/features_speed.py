"""Sentence-level against token-level attribution, and against Captum's way of doing the
same (``LLMAttribution`` on a ``TextTemplateInput``), on long prompts of ``llama-100m``.

Run from the repository root (it is not a pytest file: one long measurement, printed and
saved)::

    python -m bench.features_speed                       # 1 prompt of 512 tokens, CPU
    python -m bench.features_speed --prompts 2 --n-samples 128 --name cpu-features

For each method (occlusion, Kernel SHAP, ContextCite) it times ``tokattr.attribute`` with
``features="sentence"`` and with single tokens, and Captum's ``FeatureAblation`` and
``KernelShap`` through ``LLMAttribution`` with one template slot per sentence (Captum has no
ContextCite). Captum removes a sentence's *text* (its baseline is the empty string, so the
later tokens move); tokattr replaces the sentence's token embeddings by the pad embedding,
positions kept: the same grouping, not the same perturbation, so only the times (and model
evaluations) are compared. Results: ``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from typing import Any

import torch

from bench._harness import RESULTS_DIR, build_llama_100m, parameter_count
from tokattr.attribution import attribute
from tokattr.features import feature_spans

ITEMS = ("apples", "pears", "plums", "figs", "dates", "limes", "kiwis", "melons")


def sentence_prompt(tokenizer: Any, length: int, seed: int) -> tuple[str, list[str]]:
    """A prompt of at most ``length`` tokens (BOS included), as close as whole sentences
    allow, made of short sentences ending in a question; and its sentences."""
    rng = random.Random(seed)
    question = "How many are in box 7?"
    sentences: list[str] = []
    while True:
        s = f"Box {rng.randrange(100)} holds {rng.randrange(10, 99)} {rng.choice(ITEMS)}."
        if len(tokenizer(" ".join([*sentences, s, question]))["input_ids"]) > length:
            return " ".join([*sentences, question]), [*sentences, question]
        sentences.append(s)


def captum_template(prompt: str, sentences: list[str]) -> tuple[str, list[str]]:
    """``TextTemplateInput`` arguments: the text between sentences kept, one ``{}`` each."""
    template, at = "", 0
    for s in sentences:
        start = prompt.index(s, at)
        template += prompt[at:start].replace("{", "{{").replace("}", "}}") + "{}"
        at = start + len(s)
    return template + prompt[at:].replace("{", "{{").replace("}", "}}"), sentences


def time_tokattr(lm, prompt, answer, method, features, params) -> tuple[float, int]:
    t0 = time.perf_counter()
    a = attribute(lm, prompt, method, target=answer, seed=0, features=features, **params)
    return time.perf_counter() - t0, a.model_evals


def time_captum(lm, prompt, sentences, answer_ids, method, n_samples) -> tuple[float, int]:
    from captum.attr import FeatureAblation, KernelShap, LLMAttribution, TextTemplateInput

    calls = [0]
    model = lm.model

    def counting(module, args, output):
        calls[0] += output.shape[0]  # sequences embedded: one per forward row

    handle = model.get_input_embeddings().register_forward_hook(counting)
    try:
        algo = {"occlusion": FeatureAblation, "kernel_shap": KernelShap}[method](model)
        llm = LLMAttribution(algo, lm.tokenizer)
        template, values = captum_template(prompt, sentences)
        inp = TextTemplateInput(template, values=values)
        kwargs = {"n_samples": n_samples} if method == "kernel_shap" else {}
        torch.manual_seed(0)
        t0 = time.perf_counter()
        llm.attribute(inp, target=torch.tensor(answer_ids), forward_in_tokens=False, **kwargs)
        return time.perf_counter() - t0, calls[0]
    finally:
        handle.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=512, help="tokens per prompt (BOS included)")
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--n-samples", type=int, default=64, help="Kernel SHAP coalitions")
    parser.add_argument("--n-ablations", type=int, default=64, help="ContextCite ablations")
    parser.add_argument("--skip-token", action="store_true", help="no token-level runs")
    parser.add_argument("--name", default="cpu-features")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    lm = build_llama_100m()
    tok = lm.tokenizer
    rows: list[dict[str, Any]] = []
    params = {
        "occlusion": {},
        "kernel_shap": {"n_samples": args.n_samples},
        "context_cite": {"n_ablations": args.n_ablations},
    }
    for p in range(args.prompts):
        prompt, sentences = sentence_prompt(tok, args.length, seed=p)
        n_sent = len(feature_spans(prompt, "sentence"))
        n_tok = len(tok(prompt)["input_ids"])
        answer = " 7"
        answer_ids = tok(prompt + answer)["input_ids"][len(tok(prompt)["input_ids"]) :]
        for method in ("occlusion", "kernel_shap", "context_cite"):
            kinds = ["sentence"] + ([] if args.skip_token else ["token"])
            for kind in kinds:
                sec, evals = time_tokattr(lm, prompt, answer, method, kind, params[method])
                rows.append(dict(prompt=p, method=method, implementation=f"tokattr {kind}",
                                 features=n_sent if kind == "sentence" else n_tok - 1,
                                 seconds=sec, model_evals=evals))  # fmt: skip
                print(rows[-1], flush=True)
            if method in ("occlusion", "kernel_shap"):
                sec, evals = time_captum(lm, prompt, sentences, answer_ids, method, args.n_samples)
                rows.append(
                    dict(prompt=p, method=method, implementation="captum TextTemplateInput",
                         features=len(sentences), seconds=sec, model_evals=evals)
                )  # fmt: skip
                print(rows[-1], flush=True)

    import captum
    import transformers

    meta = {
        "command": "python -m bench.features_speed "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if v
        ),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        "torch threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "captum": captum.__version__,
        "model": f"llama-100m ({parameter_count(lm) / 1e6:.1f}M parameters, random weights)",
        "length": args.length,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{args.name}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = [
        f"# Sentence against token granularity: {args.name}",
        "",
        f"`{meta['command']}`; {meta['model']}, prompts of at most {args.length} tokens "
        "(whole sentences); "
        f"{meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"captum {meta['captum']}.",
        "",
        "| method | implementation | features | s / prompt | model evals / prompt |",
        "|---|---|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["implementation"]), []).append(r)
    for (method, impl), rs in groups.items():
        sec = sum(r["seconds"] for r in rs) / len(rs)
        evals = sum(r["model_evals"] for r in rs) / len(rs)
        md.append(f"| {method} | {impl} | {rs[0]['features']} | {sec:.2f} | {evals:.0f} |")
    md += [
        "",
        "Captum's `TextTemplateInput` removes a sentence's text (the tokens after it move);",
        "tokattr replaces the sentence's token embeddings by the pad embedding, positions kept.",
        "Same grouping, different perturbation: times and evaluations are comparable, scores",
        "are not. Captum has no ContextCite.",
    ]
    (RESULTS_DIR / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
