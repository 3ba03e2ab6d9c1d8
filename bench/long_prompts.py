"""Cost and peak memory of methods as prompts grow to 4,096 tokens (``llama-100m``).

    .venv/bin/python -m bench.long_prompts [--lengths 16 64 256 1024 2048 4096]
        [--methods saliency integrated_gradients ...] [--budget-gib 4] [--name cpu-long-prompts]

Each (method, length) runs in a fresh process (``bench/_memory_worker.py``): the random-weight
~100M-parameter Llama of the benchmark (positions up to 4,096), one prompt of exactly that
many tokens (solved arithmetic demonstrations before a query), ``memory_budget`` set to
``--budget-gib`` so passes are sized to it. Recorded: seconds, model evaluations, the peak
memory above the loaded model (peak RSS on CPU, ``max_memory_allocated`` on CUDA) against the
budget, and the time over the floor (one forward pass of the same sequence: ``forward``).
Writes ``bench/results/<name>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench._harness import _run_worker, build_llama_100m, evaluations, length_prompts
from tokattr.data.tokenizer import build_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 4096 + 64
"""Positions of the model and the tokenizer: a 4,096-token prompt and its answer."""
METHODS: dict[str, dict[str, Any]] = {
    "forward": {},
    "forward_backward": {},
    "saliency": {},
    "input_x_gradient": {},
    "attention": {},
    "attention_rollout": {},
    "attnlrp": {},
    "integrated_gradients": {"n_steps": 8},
}
"""The default methods and their parameters: the floors (one forward pass; one forward and
backward pass w.r.t. the input embeddings), the one-pass methods and IG with 8 steps (on 2 CPU
cores a 4,096-token forward and backward of this model takes about half a minute)."""
FLOORS = ("forward", "forward_backward")
OTHER_METHODS: dict[str, dict[str, Any]] = {
    "cp_lrp": {},
    "gradient_shap": {"n_samples": 4},
    "smoothgrad": {"n_samples": 4},
    "vargrad": {"n_samples": 4},
    "kernel_shap": {"n_samples": 16},
    "lime": {"n_samples": 16},
    "context_cite": {"n_ablations": 16, "features": "separator:;"},
    "occlusion": {"features": "separator:;"},
    "shapley_sampling": {"n_samples": 1, "features": "separator:;"},
    "exact_shapley": {"features": "groups:8"},
    "value_zeroing": {},
}
"""Methods run only when named (``--methods``), with their parameters: few samples or
coalitions, so a 4,096-token prompt costs minutes on a CPU. Occlusion and Shapley sampling
score the prompt's demonstrations (``separator:;``, as ContextCite): one pass per feature, so
per token at these lengths they are a GPU job. Exact Shapley values score the demonstrations in
8 consecutive groups (``groups:8``, character spans made here: 2^8 coalitions); value zeroing
re-runs every layer once per token (about one forward per token)."""


def measure(
    folder: Path,
    prompt: str,
    answer: str,
    length: int,
    method: str,
    budget: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One (method, length) in a fresh process: its record."""
    params = method_params(method, args.tokens)
    request = {
        "model_path": str(folder),
        "prompt": prompt,
        "answer": answer,
        "method": method,
        "params": resolve_features(params, prompt),
        "batch_size": None,
        "memory_budget": None if method in FLOORS else budget,
        "device": args.device,
        "dtype": "fp32",
        "threads": torch.get_num_threads(),
        "warmup": True,
    }
    record = {"length": length, "method": method, "features": features_label(params)}
    try:
        answer = _run_worker(sys.executable, "_memory_worker.py", request, args.timeout, method)
    except subprocess.TimeoutExpired:
        answer = {"status": "timeout", "reason": f"over --timeout {args.timeout:g} s"}
    except RuntimeError as err:  # the worker died without an answer (killed for memory ...)
        answer = {"status": "error", "reason": str(err).splitlines()[0][:200]}
    return {**record, **answer}


def resolve_features(params: dict[str, Any], prompt: str) -> dict[str, Any]:
    """``params`` with ``features="groups:<k>"`` turned into ``k`` character spans of
    consecutive demonstrations (split at ``;``, as even as the demonstrations allow; the query
    after the last ``;`` is context)."""
    features = params.get("features")
    if not (isinstance(features, str) and features.startswith("groups:")):
        return params
    k = int(features.split(":", 1)[1])
    ends = [i + 1 for i, c in enumerate(prompt) if c == ";"]
    if len(ends) < k:
        raise ValueError(f"{features}: the prompt has only {len(ends)} demonstrations")
    cuts = [ends[round(len(ends) * (g + 1) / k) - 1] for g in range(k)]
    spans = [[a, b] for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
    return {**params, "features": spans}


def save_model() -> Path:
    """The benchmark's ``llama-100m`` (same seed and shape) with positions up to 4,160."""
    folder = Path(tempfile.mkdtemp(prefix="tokattr-long-prompts-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    lm = build_llama_100m(max_positions=MAX_LENGTH)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024, 2048, 4096])
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *OTHER_METHODS]
    )
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument(
        "--tokens",
        action="store_true",
        help="occlusion and Shapley sampling score every token, not the demonstrations "
        "(one pass per token: for a GPU)",
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other (length, method) records of an earlier results file of this name",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: write the table and figure of the results file of this name again",
    )
    args = parser.parse_args()
    name = args.name or f"{args.device}-long-prompts"
    budget = int(args.budget_gib * 2**30)
    records: list[dict[str, Any]] = []
    commands: list[dict[str, Any]] = []
    out = args.out_dir
    earlier = out / f"{name}.json"
    if (args.update or args.render) and earlier.is_file():
        old = json.loads(earlier.read_text())
        commands = old["meta"].get("commands") or [
            {"command": old["meta"]["command"], "seconds": old["meta"]["seconds"]}
        ]
        records = [
            r
            for r in old["records"]
            if args.render or r["length"] not in args.lengths or r["method"] not in args.methods
        ]
    elif args.render:
        parser.error(f"--render: no {earlier}")
    started = time.time()
    try:
        folder = None if args.render else save_model()
        tok = build_tokenizer(model_max_length=MAX_LENGTH)
        for length in [] if folder is None else args.lengths:
            prompt, answer = length_prompts(tok, length, 1)[0]
            for method in args.methods:
                records.append(measure(folder, prompt, answer, length, method, budget, args))
                print(json.dumps(records[-1]), flush=True)
    except KeyboardInterrupt:  # stopped at a time limit: keep what was measured
        print("interrupted: writing the records measured so far", file=sys.stderr)
    records.sort(
        key=lambda r: (
            r["length"],
            [*METHODS, *OTHER_METHODS].index(r["method"])
            if r["method"] in {**METHODS, **OTHER_METHODS}
            else len(METHODS) + len(OTHER_METHODS),
        )
    )
    floors = {
        (r["length"], r["method"]): r["seconds"]
        for r in records
        if r["method"] in FLOORS and "seconds" in r
    }
    for r in records:
        if "seconds" not in r:
            continue
        if (r["length"], "forward") in floors:
            r["x_forward"] = r["seconds"] / floors[r["length"], "forward"]
        floor = floor_seconds(r, floors)
        if floor is not None and r["method"] not in FLOORS:
            r["floor_seconds"] = floor
            r["x_floor"] = r["seconds"] / floor
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        commands.append(
            {
                "command": "-m bench.long_prompts " + " ".join(sys.argv[1:]),
                "seconds": time.time() - started,
            }
        )
    meta = {
        "commands": commands,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "budget_bytes": budget,
        "torch": torch.__version__,
    }
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    write_markdown(out / f"{name}.md", meta, records)
    draw(out / f"{name}.png", records, budget)
    print(f"wrote {out / name}.{{json,md,png}}")


def write_markdown(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    mib = 2**20
    lines = [
        "# Long prompts: cost and peak memory (llama-100m)",
        "",
        f"{meta['device']}, {meta['threads']} threads, torch {meta['torch']}, memory_budget "
        f"{meta['budget_bytes'] / 2**30:g} GiB. Commands, each adding its records (`--update`):",
        "",
        *[
            f"- `.venv/bin/python {c['command']}`"
            + (f" ({c['seconds'] / 60:.0f} min)" if c.get("seconds") is not None else "")
            for c in meta["commands"]
        ],
        "",
        "One prompt per length, each (method, length) in a fresh process. Peak: above the "
        "loaded model (CPU: peak RSS). x forward: the time over one forward pass of the same "
        "sequence. x floor: the time over the method's passes at the cost of bare ones "
        "(`forward`; a gradient method's at the cost of `forward_backward`).",
        "",
        "| length | method | features | s | x forward | x floor | model evals | peak MiB | "
        "≤ budget | checkpointed |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['length']} | {r['method']} | | — | — | — | — | — | {r.get('reason')} | |"
            )
            continue
        within = (
            "—"
            if r["method"] in FLOORS
            else ("yes" if r["peak_bytes"] <= meta["budget_bytes"] else "no")
        )
        x_floor = f"{r['x_floor']:.2f}" if "x_floor" in r else "—"
        lines.append(
            f"| {r['length']} | {r['method']} | {_label(r)} | {r['seconds']:.2f} | "
            f"{r.get('x_forward', 0):.1f} | {x_floor} | {r['model_evals']} | "
            f"{r['peak_bytes'] / mib:.0f} | {within} | {'yes' if r.get('checkpointed') else ''} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def floor_seconds(record: dict[str, Any], floors: dict[tuple[int, str], float]) -> float | None:
    """A method's floor at its length: its passes at the cost of bare ones. A gradient
    method's forward and backward passes (``bench._harness.evaluations``: IG's steps and its
    two forwards) at the cost of ``forward_backward``, value zeroing one forward a token, anything
    else ``model_evals`` forwards at the cost of ``forward``; ``None`` where a floor it needs
    was not measured."""
    from tokattr.attribution import GRADIENT_METHODS

    method, length = record["method"], record["length"]
    fwd, fwd_bwd = floors.get((length, "forward")), floors.get((length, "forward_backward"))
    if method in GRADIENT_METHODS or method in ("attnlrp", "cp_lrp"):
        n_fwd, n_bwd = evaluations(method, method_params(method), 0)
        if fwd_bwd is None or (n_fwd and fwd is None):
            return None
        return n_fwd * (fwd or 0.0) + n_bwd * fwd_bwd
    if fwd is None:
        return None
    if method == "value_zeroing":  # model_evals counts its one-layer passes: a forward a token
        return evaluations(method, {}, record["prompt_tokens"])[0] * fwd
    return record["model_evals"] * fwd


def _label(record: dict[str, Any]) -> str:
    if record["method"] in FLOORS:
        return "—"
    return record.get("features") or features_label(method_params(record["method"]))


def method_params(method: str, tokens: bool = False) -> dict[str, Any]:
    """The parameters ``method`` runs with here; with ``tokens``, occlusion and Shapley
    sampling score every token instead of the demonstrations."""
    params = dict({**OTHER_METHODS, **METHODS}.get(method, {}))
    if tokens and method in ("occlusion", "shapley_sampling"):
        params.pop("features", None)
    return params


def features_label(params: dict[str, Any]) -> str:
    """What a method's scores are for in this bench: tokens, or the demonstrations."""
    features = params.get("features")
    if isinstance(features, str) and features.startswith("groups:"):
        return f"{features.split(':')[1]} groups of demonstrations"
    return "demonstrations" if features else "tokens"


def draw(path: Path, records: list[dict[str, Any]], budget: int) -> None:
    """Seconds, time over the floor and peak memory against prompt length, a line a method."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5), layout="constrained")
    ax_t, ax_f, ax_m = fig.subplots(1, 3)
    methods = list(dict.fromkeys(r["method"] for r in records))
    colours = colormaps["tab20"].resampled(max(len(methods), 1))
    for i, method in enumerate(methods):
        ok = [r for r in records if r["method"] == method and r.get("status") == "ok"]
        if not ok:
            continue
        style = {"marker": "os^Dv"[i % 5], "color": colours(i), "label": method}
        xs = [r["length"] for r in ok]
        ax_t.plot(xs, [r["seconds"] for r in ok], **style)
        ax_m.plot(xs, [r["peak_bytes"] / 2**20 for r in ok], **style)
        floor = [(r["length"], r["x_floor"]) for r in ok if "x_floor" in r]
        if floor:
            ax_f.plot(*zip(*floor, strict=True), **style)
    ax_m.axhline(budget / 2**20, color="grey", linestyle="--", label="memory_budget")
    ax_f.axhline(1.0, color="grey", linestyle="--")
    titles = ("seconds", "x its floor (its passes as bare ones)", "peak MiB above the model")
    for ax, title in zip((ax_t, ax_f, ax_m), titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
