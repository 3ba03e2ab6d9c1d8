"""The source x answer-token matrix (``per_answer_token=True``) of gradient methods against
one target, on ``llama-100m``.

Run from the repository root (one measurement, printed and saved)::

    python -m bench.per_answer_token                          # 256-token prompt, 8 answer tokens
    python -m bench.per_answer_token --length 64 --name cpu-per-answer-token-64

For each method it times, on the same prompt and answer:

- ``one target``: the whole answer's log-probability attributed once;
- ``shared``: ``per_answer_token=True`` as tokattr runs it, the answer tokens' rows sharing
  each forward pass (:meth:`tokattr.methods.problem.AttributionProblem.value_and_grad`);
- ``one row each``: ``per_answer_token=True`` with the sharing turned off, every answer
  token's row a sequence of its own (what tokattr did before, and the cost of calling the
  method once per answer token in one batch).

and checks that ``shared`` and ``one row each`` give the same matrix. Results:
``bench/results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from typing import Any

import torch

import tokattr.attribution as attribution
from bench._harness import RESULTS_DIR, build_llama_100m, parameter_count
from tokattr import attribute

METHODS = {
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"n_steps": 8},
    "smoothgrad": {"n_samples": 4},
    "attnlrp": {},
}


def _time(fn: Any, repeat: int) -> tuple[float, Any]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=256, help="prompt tokens")
    ap.add_argument("--answer", type=int, default=8, help="answer tokens")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per case (best kept)")
    ap.add_argument("--name", default="cpu-per-answer-token")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = build_llama_100m()
    rng = random.Random(0)
    prompt = "".join(rng.choice("0123456789+-x=;") for _ in range(args.length - 1))
    answer = "".join(rng.choice("0123456789") for _ in range(args.answer))
    rows = []
    forms = dict(attribution.TOKEN_FORMS)
    for method, params in METHODS.items():
        kw = {"target": answer, "seed": 0, **params}

        def run(per_answer_token: bool, method: str = method, kw: dict = kw) -> Any:
            return attribute(lm, prompt, method, per_answer_token=per_answer_token, **kw)

        one_s, _ = _time(lambda: run(False), args.repeat)
        shared_s, shared = _time(lambda: run(True), args.repeat)
        attribution.TOKEN_FORMS.clear()  # no TokenForm: every row its own sequence
        try:
            alone_s, alone = _time(lambda: run(True), args.repeat)
        finally:
            attribution.TOKEN_FORMS.update(forms)
        diff = float((shared.scores - alone.scores).abs().max() / alone.scores.abs().max())
        rows.append(
            {
                "method": method,
                "params": params,
                "one_target_s": one_s,
                "shared_s": shared_s,
                "one_row_each_s": alone_s,
                "shared_vs_one_target": shared_s / one_s,
                "speedup_vs_one_row_each": alone_s / shared_s,
                "evals_shared": shared.model_evals,
                "evals_one_row_each": alone.model_evals,
                "max_rel_diff": diff,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}",
        "model": f"llama-100m ({parameter_count(lm) / 1e6:.1f}M parameters), fp32, CPU",
        "prompt_tokens": args.length,
        "answer_tokens": args.answer,
        "command": "python -m bench.per_answer_token "
        f"--length {args.length} --answer {args.answer} --repeat {args.repeat} --name {args.name}",
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [
        f"# Source x answer-token matrix: {args.answer} answer tokens, {args.length}-token prompt",
        "",
        f"`{meta['command']}`; {meta['model']}; {meta['machine']}. Best of {args.repeat} runs.",
        "",
        "| method | one target (s) | matrix, shared passes (s) | × one target | matrix, one row "
        "each (s) | speed-up | passes shared / one row each | max rel. diff |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['one_target_s']:.2f} | {r['shared_s']:.2f} | "
            f"{r['shared_vs_one_target']:.2f}× | {r['one_row_each_s']:.2f} | "
            f"{r['speedup_vs_one_row_each']:.2f}× | {r['evals_shared']} / "
            f"{r['evals_one_row_each']} | {r['max_rel_diff']:.1e} |"
        )
    (RESULTS_DIR / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
