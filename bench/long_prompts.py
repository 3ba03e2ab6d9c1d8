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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench._harness import _run_worker, build_llama_100m, length_prompts
from tokattr.data.tokenizer import build_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 4096 + 64
"""Positions of the model and the tokenizer: a 4,096-token prompt and its answer."""
METHODS: dict[str, dict[str, Any]] = {
    "forward": {},
    "saliency": {},
    "input_x_gradient": {},
    "attention": {},
    "attnlrp": {},
    "integrated_gradients": {"n_steps": 8},
}
"""The default methods and their parameters: the one-pass methods and IG with 8 steps (on 2
CPU cores a 4,096-token forward and backward of this model takes about a minute, so the
perturbation methods' thousands of passes do not fit a session there; on a GPU add them)."""
OTHER_METHODS: dict[str, dict[str, Any]] = {
    "kernel_shap": {"n_samples": 16},
    "context_cite": {"n_ablations": 16, "features": "separator:;"},
    "occlusion": {},
    "shapley_sampling": {"n_samples": 1},
}
"""Parameters of methods run only when named (``--methods``): few coalitions, so a 4,096-token
prompt costs minutes on a CPU (ContextCite's features are the prompt's demonstrations).
Occlusion and Shapley sampling at these lengths run one pass per token: a GPU job."""


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
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other (length, method) records of an earlier results file of this name",
    )
    args = parser.parse_args()
    name = args.name or f"{args.device}-long-prompts"
    budget = int(args.budget_gib * 2**30)
    folder = save_model()
    tok = build_tokenizer(model_max_length=MAX_LENGTH)
    records: list[dict[str, Any]] = []
    earlier = RESULTS / f"{name}.json"
    if args.update and earlier.is_file():
        old = json.loads(earlier.read_text())["records"]
        records = [
            r for r in old if r["length"] not in args.lengths or r["method"] not in args.methods
        ]
    started = time.time()
    for length in args.lengths:
        prompt, answer = length_prompts(tok, length, 1)[0]
        for method in args.methods:
            request = {
                "model_path": str(folder),
                "prompt": prompt,
                "answer": answer,
                "method": method,
                "params": {**OTHER_METHODS, **METHODS}.get(method, {}),
                "batch_size": None,
                "memory_budget": None if method == "forward" else budget,
                "device": args.device,
                "dtype": "fp32",
                "threads": torch.get_num_threads(),
                "warmup": True,
            }
            answer_json = _run_worker(
                sys.executable, "_memory_worker.py", request, args.timeout, method
            )
            record = {"length": length, "method": method, **answer_json}
            records.append(record)
            print(json.dumps(record), flush=True)
    records.sort(
        key=lambda r: (
            r["length"],
            [*METHODS, *OTHER_METHODS].index(r["method"])
            if r["method"] in {**METHODS, **OTHER_METHODS}
            else len(METHODS) + len(OTHER_METHODS),
        )
    )
    floor = {
        r["length"]: r["seconds"] for r in records if r["method"] == "forward" and "seconds" in r
    }
    for r in records:
        if "seconds" in r and r["length"] in floor:
            r["x_forward"] = r["seconds"] / floor[r["length"]]
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "command": "-m bench.long_prompts " + " ".join(sys.argv[1:]),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "budget_bytes": budget,
        "torch": torch.__version__,
        "seconds": time.time() - started,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    write_markdown(RESULTS / f"{name}.md", meta, records)
    draw(RESULTS / f"{name}.png", records, budget)
    print(f"wrote {RESULTS / name}.{{json,md,png}}")


def write_markdown(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    mib = 2**20
    lines = [
        "# Long prompts: cost and peak memory (llama-100m)",
        "",
        f"Command: `.venv/bin/python {meta['command']}` ({meta['device']}, "
        f"{meta['threads']} threads, torch {meta['torch']}, "
        f"memory_budget {meta['budget_bytes'] / 2**30:g} GiB; {meta['seconds'] / 60:.0f} min).",
        "",
        "One prompt per length, each (method, length) in a fresh process. Peak: above the "
        "loaded model (CPU: peak RSS). x forward: the time over one forward pass of the same "
        "sequence.",
        "",
        "| length | method | s | x forward | model evals | peak MiB | ≤ budget | checkpointed |",
        "|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['length']} | {r['method']} | — | — | — | — | {r.get('reason')} | |")
            continue
        within = (
            "—"
            if r["method"] == "forward"
            else ("yes" if r["peak_bytes"] <= meta["budget_bytes"] else "no")
        )
        lines.append(
            f"| {r['length']} | {r['method']} | {r['seconds']:.2f} | {r.get('x_forward', 0):.1f} | "
            f"{r['model_evals']} | {r['peak_bytes'] / mib:.0f} | {within} | "
            f"{'yes' if r.get('checkpointed') else ''} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def draw(path: Path, records: list[dict[str, Any]], budget: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2)
    for method in dict.fromkeys(r["method"] for r in records):
        ok = [r for r in records if r["method"] == method and r.get("status") == "ok"]
        if not ok:
            continue
        xs = [r["length"] for r in ok]
        ax_t.plot(xs, [r["seconds"] for r in ok], marker="o", label=method)
        ax_m.plot(xs, [r["peak_bytes"] / 2**20 for r in ok], marker="o", label=method)
    ax_m.axhline(budget / 2**20, color="grey", linestyle="--", label="memory_budget")
    for ax, title in ((ax_t, "seconds"), (ax_m, "peak MiB above the model")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=8)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
