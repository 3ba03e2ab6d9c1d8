"""``tokattr attribute``: attribute prompts with several methods, print a token x method table."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

DEFAULT_PROMPT = "$16,000/-0.8="
DEFAULT_METHODS = (
    "integrated_gradients",
    "saliency",
    "input_x_gradient",
    "occlusion",
    "kernel_shap",
    "shapley_sampling",
)


def attribute_command(
    model: str = "arith-tiny",
    prompt: list[str] | None = None,
    target: list[str] | None = None,
    method: list[str] | None = None,
    baseline: str = "pad",
    n_steps: int | None = None,
    rule: str | None = None,
    n_samples: int | None = None,
    seed: int | None = 0,
    batch_size: int | None = None,
    json_out: str | None = None,
    features: str = "token",
) -> None:
    """Attribute each prompt's answer to its tokens (or words, sentences, ...) with one or
    more methods.

    Prints one table per prompt: its features as rows, one column per method, each cell the
    feature's score (green positive, red negative). The score attributed is the sum of the
    answer tokens' log-probabilities, teacher-forced.

    Args:
        model: "arith-tiny" (the bundled model), a local model folder, or a hub id.
        prompt: prompts to attribute: --prompt+ "1+2=" --prompt+ "7x5=" (repeatable), or a list
            --prompt '["1+2=", "7x5="]' (default: "$16,000/-0.8=").
        target: the answer of each prompt, in the order of the prompts: --target+ 35
            --target+ 9 (a list must quote numbers: '["35", "9"]'; default: the model's
            greedy answer to each).
        method: attribution methods (names in tokattr.METHODS), given like --prompt:
            --method+ occlusion --method+ kernel_shap (default: integrated_gradients,
            saliency, input_x_gradient, occlusion, kernel_shap, shapley_sampling).
        baseline: what replaces a removed token's embedding: "pad", "unk" or "zero"
            (positions are kept).
        n_steps: integration steps for integrated_gradients (default 64).
        rule: integration rule for integrated_gradients: "gausslegendre" (default),
            "adaptive_simpson" (the same steps placed where each path is steep: far smaller
            completeness error on sharp models such as arith-tiny), or a Riemann rule.
        n_samples: samples for kernel_shap (coalitions, default 256) and shapley_sampling
            (permutations, default 25).
        seed: seed of the random methods, the same for every prompt; null for an unseeded run.
        batch_size: the most sequences per forward pass (default 64).
        json_out: also write every attribution to this JSON file (a list of records).
        features: what gets a score: "token" (default), "word", "sentence", "line" or
            "separator:<s>" (e.g. "separator:;" for the parts between demonstrations).
    """
    from tokattr.answers import fill_greedy_answers
    from tokattr.attribution import attribute
    from tokattr.models import load_model
    from tokattr.validation import method_parameters, per_prompt_features

    prompts = list(prompt) if prompt else [DEFAULT_PROMPT]
    methods = list(method) if method else list(DEFAULT_METHODS)
    given = {
        k: v
        for k, v in (("n_steps", n_steps), ("rule", rule), ("n_samples", n_samples))
        if v is not None
    }
    per_method = {}
    for m in methods:
        accepted = method_parameters(m)  # raises on an unknown method, listing the valid ones
        per_method[m] = {k: v for k, v in given.items() if k in accepted}
    for k in given:
        if not any(k in p for p in per_method.values()):
            raise ValueError(f"--{k} is not a parameter of any of the methods {methods}")
    if target is not None and len(target) != len(prompts):
        raise ValueError(f"{len(target)} targets for {len(prompts)} prompts")
    per_prompt_features(features, prompts, single=False)  # before the model loads

    lm = load_model(model)
    # The greedy answers' generated token ids, once for every method (lengths checked first).
    answers = fill_greedy_answers(lm, prompts, list(target) if target else [None] * len(prompts))
    results = {
        m: attribute(
            lm,
            prompts,
            method=m,
            target=answers,
            baseline=baseline,
            seed=seed,
            batch_size=batch_size,
            features=features,
            **per_method[m],
        )
        for m in methods
    }

    console = Console()
    for i, p in enumerate(prompts):
        first = results[methods[0]][i]
        table = Table(
            title=f"{model}: {p!r} -> {first.target!r}",
            caption=(
                f"log p(answer) = {first.target_score:.4f}; baseline {baseline}; model evals "
                + ", ".join(f"{m} {results[m][i].model_evals}" for m in methods)
            ),
        )
        table.add_column("token" if features == "token" else features, justify="left")
        for m in methods:
            # Spaces let long method names wrap in the header instead of being cut.
            table.add_column(m.replace("_", " "), justify="right")
        for t, token in enumerate(first.features):
            cells = []
            for m in methods:
                v = float(results[m][i].scores[t])
                style = "green" if v > 0 else "red" if v < 0 else ""
                cells.append(Text(f"{v:+.4f}", style=style))
            # Text, not markup: tokens such as '[' must print as they are.
            table.add_row(Text(repr(token)), *cells)
        console.print(table)

    if json_out is not None:
        records = [results[m][i].to_dict() for i in range(len(prompts)) for m in methods]
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=2) + "\n")
        console.print(f"wrote {len(records)} attributions to {path}")
