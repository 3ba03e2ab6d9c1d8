"""Integrated Gradients' quadrature rules on the bundled model: completeness and per-token error.

For each rule and step count, over ``--problems`` prompts of ``ArithmeticGenerator(seed)``
(the model's own greedy answers as targets), prints the completeness error
``|sum(scores) - (f(x) - f(baseline))| / |f(x) - f(baseline)|`` and the per-token error
``|s - s_ref|_1 / |s_ref|_1`` against Gauss–Legendre with ``--reference`` steps, as a markdown
table (median / p90 / max over the prompts) with the wall time of each call.

    python scripts/ig_rules.py                      # 40 prompts, 64 and 128 steps (~2 min)
    python scripts/ig_rules.py --steps 32 64 --problems 100
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import tokattr
from tokattr.data.arithmetic import ArithmeticGenerator

RULES = ("gausslegendre", "adaptive_simpson")


def spread(values: list[float]) -> str:
    """``median / p90 / max`` in per cent."""
    v = np.asarray(values) * 100
    return " / ".join(
        f"{x:.0f}%" if x >= 10 else f"{x:.2g}%"
        for x in (np.median(v), np.quantile(v, 0.9), v.max())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="arith-tiny")
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--steps", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--reference", type=int, default=1024)
    args = parser.parse_args()

    lm = tokattr.load_model(args.model)
    prompts = [p.prompt for p in ArithmeticGenerator(seed=args.seed).take(args.problems)]
    ref = tokattr.attribute(
        lm, prompts, method="integrated_gradients", n_steps=args.reference, batch_size=512
    )
    targets = [r.target for r in ref]
    print(
        f"{args.model}, {args.problems} prompts (seed {args.seed}), reference: "
        f"Gauss-Legendre, {args.reference} steps\n"
    )
    print(
        "| rule | steps | completeness error: median / p90 / max "
        "| per-token error (L1, relative): median / p90 / max | time |"
    )
    print("|---|---:|---|---|---:|")
    for n_steps in args.steps:
        for rule in RULES:
            t0 = time.perf_counter()
            res = tokattr.attribute(
                lm,
                prompts,
                method="integrated_gradients",
                target=targets,
                n_steps=n_steps,
                rule=rule,
            )
            seconds = time.perf_counter() - t0
            complete = [abs(r.delta) / abs(r.scores.sum().item() - r.delta) for r in res]
            token = [
                ((r.scores - q.scores).abs().sum() / q.scores.abs().sum()).item()
                for r, q in zip(res, ref, strict=True)
            ]
            print(
                f"| `{rule}` | {n_steps} | {spread(complete)} | {spread(token)} | {seconds:.1f} s |"
            )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
