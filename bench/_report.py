"""The results of a session: the store, targets, the JSON / markdown / figure files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tokattr
from bench._harness import (
    ARITH_SET,
    BENCH_PARAMS,
    MEMORY_LENGTH,
    MODELS,
    QUICK_LLAMA_PARAMS,
    REPO,
    RESULTS_DIR,
    SEED,
    BenchConfig,
    prefix_reuse_supported,
    set_length,
)
from tokattr.allocator import allocator

# ---------------------------------------------------------------------------- results


def machine_info(config: BenchConfig) -> dict[str, Any]:
    """What identifies the machine and software of a session."""
    import captum
    import transformers

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "captum": captum.__version__,
        "tokattr": getattr(tokattr, "__version__", "unknown"),
        "device": config.device,
        "device_name": (
            torch.cuda.get_device_name(0) if config.device == "cuda" else platform.processor()
        ),
        "dtype": config.dtype,
        "allocator": allocator(),
    }
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", cpu)
        if m:
            info["cpu_model"] = m.group(1).strip()
            if config.device == "cpu":
                info["device_name"] = info["cpu_model"]
    except OSError:
        pass
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        )
        info["git_commit"] = head.stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def row_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    return (row["model"], row["prompt_set"], row["method"], row["implementation"])


@dataclass
class Store:
    """What a session measured, merged with the rows of earlier sessions on write."""

    config: BenchConfig
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    equality: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    floors: dict[str, dict[str, Any]] = field(default_factory=dict)  # "model/set" -> floor
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
    )

    def add_row(self, row: dict[str, Any]) -> None:
        row["session"] = self.started
        row["allocator"] = allocator()
        self.rows[row_key(row)] = row

    def add_equality(self, check: dict[str, Any]) -> None:
        check["session"] = self.started
        self.equality[row_key(check)] = check

    def add_memory(self, name: str, record: dict[str, Any]) -> None:
        record["session"] = self.started
        record["allocator"] = allocator()
        self.memory[name] = record

    @property
    def empty(self) -> bool:
        return not (self.rows or self.memory)

    def merged(self, path: Path) -> dict[str, Any]:
        """This session's results over the compatible ones already in ``path``."""
        c = self.config
        old: dict[str, Any] = {}
        if path.exists() and not c.fresh:
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
            same = old.get("settings", {})
            if (same.get("scale"), same.get("device"), same.get("dtype")) != (
                c.scale,
                c.device,
                c.dtype,
            ):
                old = {}
        rows = {row_key(r): r for r in old.get("rows", [])}
        rows.update(self.rows)
        equality = {row_key(r): r for r in old.get("equality", [])}
        equality.update(self.equality)
        memory = {m["name"]: m for m in old.get("memory", [])}
        memory.update(self.memory)
        floors = {**old.get("floors", {}), **self.floors}
        models = {**old.get("models", {}), **self.models}
        order = {m: i for i, m in enumerate(BENCH_PARAMS)}
        impl_order = ["tokattr", "tokattr-full_sequences", "captum", "inseq"]

        def sort_key(k: tuple[str, str, str, str]) -> tuple[Any, ...]:
            model, pset, method, impl = k
            return (
                MODELS.index(model) if model in MODELS else 9,
                set_length(pset),
                order.get(method, 99),
                impl_order.index(impl) if impl in impl_order else 9,
            )

        row_list = [rows[k] for k in sorted(rows, key=sort_key)]
        add_speedups(row_list)
        result = {
            "name": c.name,
            "settings": {
                "scale": c.scale,
                "device": c.device,
                "dtype": c.dtype,
                "peers": list(c.peers),
                "tokattr_batch_size": c.batch_size,
                "peer_budget_s": c.peer_budget_s,
                "memory_budget_bytes": c.memory_budget_bytes,
                "seed": SEED,
                "bench_params": BENCH_PARAMS,
                "quick_llama_params": {str(k): v for k, v in QUICK_LLAMA_PARAMS.items()},
                "prefix_reuse_supported": prefix_reuse_supported(),
                "not_timed": {"random": "puts nothing through the model"},
                "notes": NOTES,
            },
            "machine": machine_info(c),
            "sessions": sorted({*old.get("sessions", []), self.started}),
            "models": models,
            "floors": floors,
            "rows": row_list,
            "equality": [equality[k] for k in sorted(equality, key=sort_key)],
            "memory": [memory[k] for k in sorted(memory)],
        }
        result["targets"] = evaluate_targets(result)
        return result


NOTES = [
    "Inseq attributes each answer token separately, with its own baselines: a timing peer "
    "only, its scores are never compared with tokattr's.",
    "Captum's LLMAttribution / LLMGradientAttribution take one prompt per call and (teacher-"
    "forced) one sequence per forward; the answer is passed as token ids (tokattr's).",
    "seconds_per_prompt is the fastest round divided by the prompts of the round; a peer that "
    "would exceed the peer budget runs on the first k prompts only (peer_prompts).",
    "Floors use the bare forward at the fastest batch size on the same padded batch; "
    "speed-ups are peer seconds per prompt over tokattr seconds per prompt. Where a Captum "
    "pass is cheap (<= 20 s), each of its 3 rounds is followed by one tokattr call on the same "
    "prompts and tokattr's speed-up over Captum is the ratio of the two best rounds "
    "(paired_tokattr_seconds_per_prompt in the Captum row); tokattr's own row keeps the time "
    "of its own case.",
    "Where the session measures a model's floor once (too dear to repeat, e.g. llama-100m on a "
    "CPU), a tokattr case times its floor again after each of its rounds: the method's "
    "evaluations as bare padded sequences at the floor's best batch sizes (floor_timing). Its "
    "x floor is its fastest round over the fastest of those; the ratio to the session's floor "
    "stays in the JSON (session_ratio_to_floor). Peers' rows are over the session's floor, "
    "which reads low: compare speed-ups, not their x floor with tokattr's.",
    "With few prompts (llama-100m at quick scale), a method that needs one evaluation per "
    "prompt (saliency, input_x_gradient) cannot fill the floor's best batch: its ratio to the "
    "floor there says little.",
    "CPU peak memory is the peak RSS above the RSS at the start of a call (reset through "
    "/proc/self/clear_refs); memory the allocator reuses from earlier calls does not show, so "
    "in-process CPU peaks are lower bounds. The memory case runs in fresh processes.",
]


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Give every tokattr row ``speedup`` over each peer timed on the same case."""
    by_case: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault((r["model"], r["prompt_set"], r["method"]), {})[r["implementation"]] = r
    for impls in by_case.values():
        for name, r in impls.items():
            r["speedup"] = {}
            if not name.startswith("tokattr") or r.get("status") != "ok":
                continue
            for peer in ("captum", "inseq"):
                p = impls.get(peer)
                if not (p and p.get("status") == "ok" and r.get("seconds_per_prompt")):
                    continue
                # A peer timed in rounds alternating with tokattr's: the pair's ratio.
                paired = p.get("paired_tokattr_seconds_per_prompt") if name == "tokattr" else None
                r["speedup"][peer] = p["seconds_per_prompt"] / (paired or r["seconds_per_prompt"])


@dataclass(frozen=True)
class Target:
    """One performance target, checked (never asserted) on the results."""

    label: str
    model: str
    prompt_set: str
    method: str
    implementation: str
    metric: str  # ratio_to_floor | speedup:<peer>
    op: str  # <= | >= | <
    value: float


TARGETS: tuple[Target, ...] = (
    *(
        Target(
            f"{m} <= {1.2 if m == 'integrated_gradients' else 1.3}x floor",
            "arith-tiny",
            ARITH_SET,
            m,
            "tokattr",
            "ratio_to_floor",
            "<=",
            1.2 if m == "integrated_gradients" else 1.3,
        )
        for m in BENCH_PARAMS
    ),
    Target(
        "occlusion >= 8x Captum",
        "arith-tiny",
        ARITH_SET,
        "occlusion",
        "tokattr",
        "speedup:captum",
        ">=",
        8,
    ),
    Target(
        "kernel_shap >= 6x Captum",
        "arith-tiny",
        ARITH_SET,
        "kernel_shap",
        "tokattr",
        "speedup:captum",
        ">=",
        6,
    ),
    Target(
        "shapley_sampling >= 6x Captum",
        "arith-tiny",
        ARITH_SET,
        "shapley_sampling",
        "tokattr",
        "speedup:captum",
        ">=",
        6,
    ),
    Target(
        "IG >= 2.5x Captum LLMGradientAttribution",
        "arith-tiny",
        ARITH_SET,
        "integrated_gradients",
        "tokattr",
        "speedup:captum",
        ">=",
        2.5,
    ),
    Target(
        "IG >= 2.5x Inseq",
        "arith-tiny",
        ARITH_SET,
        "integrated_gradients",
        "tokattr",
        "speedup:inseq",
        ">=",
        2.5,
    ),
    *(
        Target(
            f"{m} <= {bound}x full-sequence floor",
            "llama-100m",
            f"len{n}",
            m,
            "tokattr",
            "ratio_to_floor",
            "<=",
            bound,
        )
        for n in (64, 256)
        for m, bound in (("occlusion", 0.6), ("kernel_shap", 0.8), ("shapley_sampling", 0.8))
    ),
    *(
        Target(
            f"{m} >= {bound}x Captum",
            "llama-100m",
            f"len{n}",
            m,
            "tokattr",
            "speedup:captum",
            ">=",
            bound,
        )
        for n in (64, 256)
        for m, bound in (
            ("occlusion", 3),
            ("kernel_shap", 1.5),
            ("shapley_sampling", 1.5),
            ("integrated_gradients", 3),
        )
    ),
    Target(
        "occlusion (prefix reuse), 256 tokens < 1.0x full-sequence floor",
        "llama-100m",
        "len256",
        "occlusion",
        "tokattr",
        "ratio_to_floor",
        "<",
        1.0,
    ),
)


def _compare(value: float, op: str, bound: float) -> bool:
    return {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and ``met`` (``None`` where it was not measured)."""
    rows = {row_key(r): r for r in result["rows"]}
    out = []
    for t in TARGETS:
        r = rows.get((t.model, t.prompt_set, t.method, t.implementation))
        value: float | None = None
        why = None
        if r is None:
            why = "not run"
            if t.method == "occlusion" and not prefix_reuse_supported():
                why = "tokattr's occlusion has no prefix_reuse parameter"
        elif r.get("status") != "ok":
            why = r.get("reason") or r.get("status")
        elif t.metric == "ratio_to_floor":
            value = r.get("ratio_to_floor")
        else:
            peer = t.metric.split(":", 1)[1]
            value = r.get("speedup", {}).get(peer)
            if value is None:
                why = f"{peer} not timed on this case"
        out.append(
            {
                "target": t.label,
                "model": t.model,
                "prompt_set": t.prompt_set,
                "method": t.method,
                "implementation": t.implementation,
                "metric": t.metric,
                "op": t.op,
                "bound": t.value,
                "value": value,
                "met": None if value is None else _compare(value, t.op, t.value),
                "why_unmeasured": why if value is None else None,
            }
        )
    memory = {m["name"]: m for m in result["memory"] if m.get("status") == "ok"}
    m = memory.get("memory_budget") or memory.get("small_chunk")
    if m is not None:
        how = "memory_budget=" if m["name"] == "memory_budget" else f"batch_size={m['batch_size']}"
        out.append(
            {
                "target": f"IG, {MEMORY_LENGTH} tokens, {how}: peak <= memory budget",
                "model": "llama-100m",
                "prompt_set": f"len{MEMORY_LENGTH}",
                "method": "integrated_gradients",
                "implementation": "tokattr",
                "metric": "peak_memory_bytes",
                "op": "<=",
                "bound": m["memory_budget_bytes"],
                "value": m["peak_bytes"],
                "met": m["peak_bytes"] <= m["memory_budget_bytes"],
                "why_unmeasured": None,
            }
        )
    return out


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _fmt_x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _fmt_mib(b: int | None) -> str:
    if b is None:
        return "—"
    mib = b / 2**20
    return f"{mib:.1f}" if mib < 10 else f"{mib:.0f}"


def _fmt_met(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT MET")


UNRECORDED_ALLOCATOR = "glibc's defaults (rows from before the allocator was recorded)"


def allocator_line(result: dict[str, Any]) -> str:
    """Which memory allocator settings the rows (and memory cases) ran with
    (:func:`tokattr.allocator.keep_freed_memory`)."""
    records = [*result.get("rows", []), *result.get("memory", [])]
    seen: dict[str, int] = {}
    for r in records:
        name = r.get("allocator", UNRECORDED_ALLOCATOR)
        seen[name] = seen.get(name, 0) + 1
    if not seen:
        return f"Allocator: {result['machine'].get('allocator', UNRECORDED_ALLOCATOR)}."
    if len(seen) == 1:
        return (
            f"Allocator: {next(iter(seen))}; the same for every implementation (peers in this "
            "process, workers through their environment)."
        )
    return (
        "Allocators (each row's `allocator` in the JSON): "
        + "; ".join(f"{name}: {n} rows" for name, n in seen.items())
        + "."
    )


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: timings, targets, equality checks, memory, skips."""
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"# tokattr performance benchmark: {result['name']}",
        "",
        f"{m.get('device_name')} ({m['device']}, {s['dtype']}), {m['cpu_cores']} cores, "
        f"{m['torch_threads']} torch threads; torch {m['torch']}, transformers "
        f"{m['transformers']}, captum {m['captum']}; scale `{s['scale']}`; {m['date']}.",
        "",
        allocator_line(result),
        "",
    ]
    for name, info in result.get("models", {}).items():
        lines.append(f"- `{name}`: {info.get('parameters', 0) / 1e6:.1f}M parameters")
    lines += [
        "",
        "| model | prompts | method | implementation | n | s / prompt | evals / prompt "
        "| floor s / prompt | × floor | speed-up vs Captum | speed-up vs Inseq | peak MiB "
        "| target |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    targets = {
        (t["model"], t["prompt_set"], t["method"], t["implementation"]): []
        for t in result["targets"]
    }
    for t in result["targets"]:
        targets[(t["model"], t["prompt_set"], t["method"], t["implementation"])].append(t)
    for r in result["rows"]:
        if r.get("status") != "ok":
            continue
        ev = r.get("evaluations_per_prompt") or {}
        evals = ev.get("forward", 0) + ev.get("forward_backward", 0)
        sp = r.get("speedup", {})
        mine = targets.get(row_key(r), [])
        tgt = "; ".join(f"{t['target']}: {_fmt_met(t['met'])}" for t in mine)
        n = r.get("n_prompts")
        lines.append(
            f"| {r['model']} | {r['prompt_set']} | {r['method']} | {r['implementation']} | {n} "
            f"| {_fmt_s(r.get('seconds_per_prompt'))} | {evals:.0f} "
            f"| {_fmt_s(r.get('floor_seconds_per_prompt'))} | {_fmt_x(r.get('ratio_to_floor'))} "
            f"| {_fmt_x(sp.get('captum'))} | {_fmt_x(sp.get('inseq'))} "
            f"| {_fmt_mib(r.get('peak_memory_bytes'))} | {tgt} |"
        )
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---:|---|"]
    for t in result["targets"]:
        if t["metric"] == "peak_memory_bytes":
            val = f"{_fmt_mib(t['value'])} MiB ≤ {_fmt_mib(t['bound'])} MiB"
        elif t["value"] is None:
            val = f"— ({t['why_unmeasured']})"
        else:
            val = _fmt_x(t["value"])
        lines.append(
            f"| {t['target']} ({t['model']}, {t['prompt_set']}) | {val} | {_fmt_met(t['met'])} |"
        )
    if result["equality"]:
        lines += [
            "",
            "## Equality with Captum",
            "",
            "| model | prompts | method | implementation | prompts compared | max abs diff "
            "| max rel diff | tolerance | pass |",
            "|---|---|---|---|---:|---:|---:|---:|---|",
        ]
        for e in result["equality"]:
            lines.append(
                f"| {e['model']} | {e['prompt_set']} | {e['method']} | {e['implementation']} "
                f"| {e['n_prompts']} | {e['max_abs_diff']:.3g} | {e['max_rel_diff']:.3g} "
                f"| {e['tolerance']:.0e} | "
                f"{e.get('note') if e['passed'] is None else 'pass' if e['passed'] else 'FAIL'} |"
            )
    if result["memory"]:
        lines += [
            "",
            f"## Memory: integrated gradients, one {MEMORY_LENGTH}-token prompt, llama-100m",
            "",
            "| run | n_steps | batch_size | memory_budget arg | s | peak MiB | budget MiB "
            "| ≤ budget |",
            "|---|---:|---:|---|---:|---:|---:|---|",
        ]
        for mem in result["memory"]:
            if mem.get("status") != "ok":
                lines.append(f"| {mem['name']} | skipped: {mem.get('reason')} |||||||")
                continue
            lines.append(
                f"| {mem['name']} | {mem['n_steps']} | {mem['batch_size']} "
                f"| {'yes' if mem['used_memory_budget_arg'] else 'no'} | {mem['seconds']:.1f} "
                f"| {_fmt_mib(mem['peak_bytes'])} | {_fmt_mib(mem['memory_budget_bytes'])} "
                f"| {'yes' if mem['peak_bytes'] <= mem['memory_budget_bytes'] else 'no'} |"
            )
    skipped = [r for r in result["rows"] if r.get("status") != "ok"]
    partial = [r for r in result["rows"] if r.get("status") == "ok" and r.get("note")]
    if skipped or partial:
        lines += ["", "## Skipped or reduced", ""]
        for r in skipped:
            lines.append(
                f"- {r['model']} / {r['prompt_set']} / {r['method']} / {r['implementation']}: "
                f"{r.get('status')}: {r.get('reason')}"
            )
        for r in partial:
            lines.append(
                f"- {r['model']} / {r['prompt_set']} / {r['method']} / {r['implementation']}: "
                f"{r['note']}"
            )
    lines += ["", "## Notes", "", *(f"- {n}" for n in s["notes"]), ""]
    return "\n".join(lines)


def figure(result: dict[str, Any], path: Path) -> bool:
    """A bar chart of the ratio to the floor per method and implementation, one panel per
    (model, prompt set); ``False`` when there is nothing to draw."""
    rows = [r for r in result["rows"] if r.get("status") == "ok" and r.get("ratio_to_floor")]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(
        {(r["model"], r["prompt_set"]) for r in rows}, key=lambda k: (k[0], set_length(k[1]))
    )
    impls = ["tokattr", "tokattr-full_sequences", "captum", "inseq"]
    colors = dict(zip(impls, ["#1f77b4", "#17becf", "#d62728", "#ff7f0e"], strict=True))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (model, pset) in zip(axes[:, 0], panels, strict=True):
        mine = [r for r in rows if (r["model"], r["prompt_set"]) == (model, pset)]
        methods = [m for m in BENCH_PARAMS if any(r["method"] == m for r in mine)]
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, m in enumerate(methods):
                hit = [r for r in mine if r["method"] == m and r["implementation"] == impl]
                if hit:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(hit[0]["ratio_to_floor"])
            if xs:
                bars = ax.bar(xs, ys, width=width, color=colors[impl], label=impl)
                ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        low = min(r["ratio_to_floor"] for r in mine)
        ax.set_ylim(bottom=min(0.5, 0.8 * low))
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, fontsize=8)
        ax.set_ylabel("time / floor")
        ax.set_title(f"{model}, {pset}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{result['name']}: seconds per prompt over the compute floor (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(store: Store) -> tuple[Path, Path, Path | None, dict[str, Any]]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png``; their paths and the result."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / store.config.name
    json_path, md_path, png_path = (
        stem.with_suffix(".json"),
        stem.with_suffix(".md"),
        stem.with_suffix(".png"),
    )
    result = store.merged(json_path)
    json_path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    md_path.write_text(markdown(result))
    drawn = figure(result, png_path)
    return json_path, md_path, png_path if drawn else None, result


def _json_default(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")
