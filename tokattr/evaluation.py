"""``evaluate``: methods x faithfulness metrics over a set of prompts, in plain Python.

For each method and each batch of prompts: attribute (:func:`tokattr.attribute`), then feed
the batch's :class:`~tokattr.methods.problem.AttributionProblem` and scores to every metric
(:mod:`tokattr.metrics`). The result is a method x metric table with the mean over examples
and a percentile-bootstrap confidence interval (Efron & Tibshirani, "An Introduction to the
Bootstrap", 1993), each metric's direction stated.
"""

from __future__ import annotations

import csv
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from tokattr.attribution import (
    BASELINES,
    DEFAULT_BATCH_SIZE,
    Attribution,
    _attribute_encoded,
    _target_function,
    batch_problem,
    build_method,
    fill_greedy_answers,
)
from tokattr.batching import Encoded, TokenBatch, collate, encode_examples
from tokattr.data.arithmetic import FORMATTING, OPERAND, OPERATOR, label_prompt
from tokattr.data.labels import token_roles
from tokattr.methods.exact_shapley import ExactShapley
from tokattr.methods.problem import AttributionProblem, Method
from tokattr.metrics import APPLIES_TO, METRICS
from tokattr.metrics import functional as F
from tokattr.metrics.classes import fraction_label
from tokattr.models import LanguageModel, reinitialised

DEFAULT_METHODS = ("integrated_gradients", "saliency", "input_x_gradient", "occlusion", "random")
ERASURE = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc")


@dataclass(frozen=True)
class MetricRow:
    """One cell of the table: a method's mean of a metric (at token fraction ``k`` for the
    ERASER metrics: ``"1%"`` … ``"50%"`` or ``"aopc"``, their mean; ``""`` otherwise)."""

    method: str
    metric: str
    k: str
    mean: float
    ci_low: float
    ci_high: float
    higher_is_better: bool
    n: int  # examples where the metric is defined


@dataclass(frozen=True)
class EvaluationTable:
    """The result of :func:`evaluate`: one :class:`MetricRow` per (method, metric, k), the
    per-example values behind them, and the attributions."""

    rows: list[MetricRow]
    values: dict[tuple[str, str, str], Tensor] = field(repr=False)  # [n examples] float64
    attributions: dict[str, list[Attribution]] = field(repr=False)

    def get(self, method: str, metric: str, k: str | None = None) -> MetricRow:
        """The row of ``method`` and ``metric`` (``k`` defaults to ``"aopc"`` for the ERASER
        metrics and ``""`` for the others)."""
        if k is None:
            k = "aopc" if metric in ("comprehensiveness", "sufficiency") else ""
        for row in self.rows:
            if (row.method, row.metric, row.k) == (method, metric, k):
                return row
        raise KeyError(f"no row for method {method!r}, metric {metric!r}, k {k!r}")

    def to_markdown(self, per_k: bool = False) -> str:
        """A method x metric table, ``mean [ci_low, ci_high]`` per cell, each column headed by
        its direction (↑ higher is better, ↓ lower is better). ``per_k`` adds one column per
        token fraction of the ERASER metrics."""
        columns: list[tuple[str, str, bool]] = []
        for r in self.rows:
            if (per_k or r.k in ("", "aopc")) and (r.metric, r.k, r.higher_is_better) not in (
                columns
            ):
                columns.append((r.metric, r.k, r.higher_is_better))
        methods = list(dict.fromkeys(r.method for r in self.rows))
        cells = {(r.method, r.metric, r.k): r for r in self.rows}
        head = ["method"] + [
            f"{m}{'' if k in ('', 'aopc') else '@' + k} {'↑' if hi else '↓'}"
            for m, k, hi in columns
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in methods:
            row = [method]
            for m, k, _ in columns:
                r = cells.get((method, m, k))
                row.append("—" if r is None or r.n == 0 else _cell(r))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append(
            "↑ higher is better, ↓ lower is better; mean over examples [95% bootstrap interval]; "
            "comprehensiveness and sufficiency are AOPC (mean over k = "
            + ", ".join(dict.fromkeys(r.k for r in self.rows if r.k not in ("", "aopc")))
            + " of the prompt tokens); — : does not apply."
        )
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        """Write ``method, metric, k, mean, ci_low, ci_high, higher_is_better, n``."""
        path = Path(path)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["method", "metric", "k", "mean", "ci_low", "ci_high", "higher_is_better", "n"]
            )
            for r in self.rows:
                w.writerow(
                    [r.method, r.metric, r.k, r.mean, r.ci_low, r.ci_high, r.higher_is_better, r.n]
                )
        return path


def _cell(r: MetricRow) -> str:
    return f"{format_value(r.mean)} [{format_value(r.ci_low)}, {format_value(r.ci_high)}]"


def format_value(x: float) -> str:
    """Three decimals, or three significant digits where that would print a non-zero value as
    0.000 (``2.8e-05`` -> ``2.80e-05``) or a large one very long (``1.23e+06``)."""
    if math.isnan(x):
        return "nan"
    if x != 0 and (abs(x) < 5e-4 or abs(x) >= 1e6):
        return f"{x:.2e}"
    return f"{x:.3f}"


def bootstrap_interval(
    values: Tensor, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float, int]:
    """Mean and percentile-bootstrap interval of the mean over the non-NaN ``values``.
    Returns ``(mean, low, high, n)``; NaNs where there is no value."""
    v = values.double().flatten()
    v = v[~v.isnan()]
    n = v.numel()
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_resamples, n), generator=gen)
    means = v[idx].mean(-1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(v.mean()), float(low), float(high), n


def plausibility_labels(batch: TokenBatch, prompts: Sequence[str]) -> Tensor:
    """Per-column labels for :func:`~tokattr.metrics.functional.plausibility_auprc`: 1 for
    operand digits and operators, 0 for formatting (``$``, ``,``, spaces), -1 for every other
    column, and -1 everywhere for a prompt the arithmetic parser does not read. ``[batch, seq]``
    """
    labels = torch.full(batch.feature_mask.shape, -1, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        try:
            roles = label_prompt(prompt)
        except ValueError:
            continue
        tok = token_roles(batch.offsets[b], prompt, roles)
        value = [1 if r in (OPERAND, OPERATOR) else 0 if r == FORMATTING else -1 for r in tok]
        cols = batch.feature_mask[b].nonzero().flatten().cpu()
        labels[b, cols] = torch.tensor(value, dtype=torch.long)
    return labels


def _full_scores(attrs: Sequence[Attribution], feature_mask: Tensor) -> Tensor:
    """Attribution scores back in the batch layout. ``[batch, seq]`` float32, 0 off features."""
    out = torch.zeros(feature_mask.shape, dtype=torch.float32)
    mask = feature_mask.cpu()
    for b, a in enumerate(attrs):
        out[b, mask[b]] = a.scores.float()
    return out


def _exact_shapley(problem: AttributionProblem, max_tokens: int) -> Tensor:
    """Exact Shapley values of the rows short enough to enumerate; NaN rows otherwise."""
    out = torch.full(problem.feature_mask.shape, math.nan, dtype=torch.float32)
    short = (problem.n_features <= max_tokens).nonzero().flatten()
    if short.numel():
        sub = problem.select(short)
        out[short.cpu()] = ExactShapley(max_tokens).attribute(sub).scores.float().cpu()
    return out


def _method_specs(
    methods: Sequence[str] | Mapping[str, Mapping[str, object]],
) -> dict[str, dict[str, object]]:
    if isinstance(methods, str):
        methods = [methods]
    specs = (
        {m: dict(p) for m, p in methods.items()}
        if isinstance(methods, Mapping)
        else {m: {} for m in methods}
    )
    if not specs:
        raise ValueError("no methods given")
    for name, params in specs.items():
        build_method(name, params)  # refuses unknown methods and parameters now
    return specs


def _metric_names(
    metrics: Sequence[str] | None, params: Mapping[str, Mapping[str, object]] | None
) -> list[str]:
    names = (
        list(METRICS)
        if metrics is None
        else [metrics]
        if isinstance(metrics, str)
        else list(metrics)
    )
    if not names:
        raise ValueError("no metrics given")
    unknown = sorted(set(names) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    extra = sorted(set(params or {}) - set(names))
    if extra:
        raise ValueError(f"parameters given for metric(s) {extra} that are not computed")
    for name in names:  # refuses bad parameters before any work
        given = dict((params or {}).get(name, {}))
        takes = [
            k
            for k, p in inspect.signature(METRICS[name].__init__).parameters.items()
            if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        unknown = sorted(set(given) - set(takes))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for metric {name!r}; it takes "
                f"{takes or 'no parameters'}"
            )
        METRICS[name](**given)
    return names


def evaluate(
    lm: LanguageModel,
    prompts: Sequence[str],
    answers: Sequence[str] | None = None,
    methods: Sequence[str] | Mapping[str, Mapping[str, object]] = DEFAULT_METHODS,
    metrics: Sequence[str] | None = None,
    *,
    baseline: str = "pad",
    target_fn: str = "log_prob",
    batch_size: int = DEFAULT_BATCH_SIZE,
    seeds: Sequence[int] | None = None,
    metric_params: Mapping[str, Mapping[str, object]] | None = None,
    random_model: LanguageModel | None = None,
    randomization_seed: int = 0,
    shapley_max_tokens: int = 16,
    n_bootstrap: int = 1000,
    progress: bool = True,
) -> EvaluationTable:
    """Score every method with every metric on the same prompts and answers.

    Args:
        lm: the model (:func:`tokattr.load_model`).
        prompts: the prompts.
        answers: the answer attributed for each prompt (a string or token ids); ``None`` (for
            all, or for one prompt in the list): the model's greedy answer, as generated ids.
        methods: method names, or ``{name: {hyper-parameter: value}}``.
        metrics: names in :data:`tokattr.metrics.METRICS`; ``None``: all of them.
            ``completeness_error`` is reported for integrated_gradients only and
            ``shapley_error`` for kernel_shap and shapley_sampling on prompts of at most
            ``shapley_max_tokens`` tokens.
        baseline: how a token is removed, for the methods and the metrics alike.
        target_fn: the target function (see :func:`tokattr.attribute`).
        batch_size: prompts per batch, and the most sequences in one forward pass.
        seeds: one seed per prompt for random methods and random perturbations (default: the
            prompt's index), so a prompt's numbers do not depend on its batch.
        metric_params: ``{metric: {parameter: value}}``, e.g.
            ``{"infidelity": {"n_perturb_samples": 32}}``.
        random_model: the re-initialised model of ``randomization_spearman`` (default:
            :func:`tokattr.models.reinitialised` with ``randomization_seed``).
        n_bootstrap: bootstrap resamples for the 95% intervals.
        progress: show a progress bar.

    Raises:
        ValueError: unknown method, method parameter, metric, metric parameter or baseline;
            no prompts; a prompt the model cannot take (see :func:`tokattr.attribute`). Every
            input is checked before the first method runs.
    """
    specs = _method_specs(methods)
    names = _metric_names(metrics, metric_params)
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    if isinstance(prompts, Mapping):
        raise TypeError(
            f"prompts must be a string or a list of strings, got {type(prompts).__name__} "
            "(a tokenizer's output?): pass the text"
        )
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("no prompts given")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    seed_list = list(range(len(prompt_list))) if seeds is None else [int(s) for s in seeds]
    if len(seed_list) != len(prompt_list):
        raise ValueError(f"{len(seed_list)} seeds for {len(prompt_list)} prompts")
    if answers is None:
        answer_list: list = [None] * len(prompt_list)
    else:
        answer_list = [answers] if isinstance(answers, str) else list(answers)
        if len(answer_list) != len(prompt_list):
            raise ValueError(f"{len(answer_list)} answers for {len(prompt_list)} prompts")
    # Lengths in tokens before any generation; the greedy answers as generated token ids.
    answer_list = fill_greedy_answers(lm, prompt_list, answer_list)
    # Tokenize everything first: a bad prompt fails before any method has run.
    encoded = encode_examples(lm.tokenizer, prompt_list, answer_list, None, lm.max_length)
    if "randomization_spearman" in names and random_model is None:
        random_model = reinitialised(lm, randomization_seed)

    chunks = [
        range(i, min(i + batch_size, len(encoded))) for i in range(0, len(encoded), batch_size)
    ]
    values: dict[tuple[str, str], list[Tensor]] = {}
    attributions: dict[str, list[Attribution]] = {m: [] for m in specs}
    exact_cache: dict[int, Tensor] = {}
    bar = _progress(len(specs) * len(prompt_list), progress)
    for method, params in specs.items():
        runner = build_method(method, params)
        bar.set_description(method)
        for c, chunk in enumerate(chunks):
            scored = score_batch(
                lm,
                [encoded[i] for i in chunk],
                [prompt_list[i] for i in chunk],
                [a if isinstance(a := answer_list[i], str) else None for i in chunk],
                [seed_list[i] for i in chunk],
                method,
                params,
                names,
                metric_params,
                runner=runner,
                baseline=baseline,
                target_fn=target_fn,
                batch_size=batch_size,
                random_model=random_model,
                shapley_max_tokens=shapley_max_tokens,
                exact=exact_cache.get(c),
            )
            if scored.exact is not None:
                exact_cache[c] = scored.exact
            attributions[method] += scored.attributions
            for name, v in scored.values.items():
                values.setdefault((method, name), []).append(v)
            bar.update(len(chunk))
    bar.close()
    return table_from_values(
        {k: torch.cat(v) for k, v in values.items()}, metric_params, n_bootstrap, attributions
    )


@dataclass(frozen=True)
class BatchScores:
    """One method on one batch: the attributions, each applicable metric's per-example values
    (``[batch]``, or ``[batch, K]`` per token fraction) and the exact Shapley values computed
    for ``shapley_error`` (reusable by the next SHAP method on the same batch). With
    ``keep_errors``, ``errors`` names the examples whose target or scores were not finite:
    their metric values are NaN and their curves ``None``."""

    attributions: list[Attribution]
    values: dict[str, Tensor]
    exact: Tensor | None
    curves: list[dict[str, list[float]] | None] | None = None  # per example: f along the curves
    errors: dict[int, str] = field(default_factory=dict)  # example index -> why it has no scores


def score_batch(
    lm: LanguageModel,
    encoded: Sequence[Encoded],
    prompts: Sequence[str],
    answers: Sequence[str | None] | None,
    seeds: Sequence[int],
    method: str,
    params: Mapping[str, object],
    metrics: Sequence[str],
    metric_params: Mapping[str, Mapping[str, object]] | None = None,
    *,
    runner: Method | None = None,
    baseline: str = "pad",
    target_fn: str = "log_prob",
    batch_size: int = DEFAULT_BATCH_SIZE,
    random_model: LanguageModel | None = None,
    shapley_max_tokens: int = 16,
    exact: Tensor | None = None,
    keep_errors: bool = False,
) -> BatchScores:
    """Attribute one batch of encoded examples with one method and compute every metric that
    applies to it (see :data:`tokattr.metrics.APPLIES_TO`), one value per example. The
    building block of :func:`evaluate` and of the benchmark runner. ``answers``: the answers'
    texts to report (``None`` entries: their token ids decoded).

    ``keep_errors``: an example whose target score or scores are not finite is reported in
    ``errors`` (and left out of the metrics) instead of stopping the batch."""
    runner = runner if runner is not None else build_method(method, dict(params))
    fn, fn_name = _target_function(target_fn)
    n = len(encoded)

    def run(model_lm: LanguageModel, rows: Sequence[int], keep: bool) -> list[Attribution]:
        return _attribute_encoded(
            model_lm, [encoded[i] for i in rows], [prompts[i] for i in rows],
            None if answers is None else [answers[i] for i in rows], None, runner, method, fn,
            fn_name, baseline, [seeds[i] for i in rows], batch_size, None, keep_errors=keep,
        )  # fmt: skip

    all_attrs = run(lm, range(n), keep_errors)
    errors = {i: a.error for i, a in enumerate(all_attrs) if a.error is not None}
    good = [i for i in range(n) if i not in errors]
    if not good:
        return BatchScores(all_attrs, {}, None, None, errors)
    attrs = [all_attrs[i] for i in good]
    sub_prompts = [prompts[i] for i in good]
    sub_seeds = [seeds[i] for i in good]
    batch = collate(lm.tokenizer, [encoded[i] for i in good]).to(lm.device)
    problem = batch_problem(lm, batch, baseline, target_fn, sub_seeds, batch_size)
    scores = _full_scores(attrs, batch.feature_mask).to(lm.device)
    if errors:
        exact = None  # a cached one is laid out for the whole batch, not for this subset
    elif method == "exact_shapley" and exact is None:
        exact = scores.float().cpu()  # what shapley_error compares the estimators against
    names = [n for n in metrics if method in APPLIES_TO.get(n, {method})]
    curves = F.erasure_curves(problem, scores) if set(ERASURE) & set(names) else None
    values: dict[str, Tensor] = {}
    for name in names:
        metric = METRICS[name](**dict((metric_params or {}).get(name, {})))
        if name in ERASURE:
            metric.update(problem, scores, curves=curves)
        elif name == "max_sensitivity":
            metric.update(problem, scores, runner)
        elif name == "shapley_error":
            if exact is None:
                exact = _exact_shapley(problem, shapley_max_tokens)
            metric.update(scores.cpu(), exact, batch.feature_mask.cpu())
        elif name == "plausibility_auprc":
            metric.update(scores.cpu(), plausibility_labels(batch, sub_prompts))
        elif name == "randomization_spearman":
            if random_model is None:
                raise ValueError("randomization_spearman needs the re-initialised model")
            rand = run(random_model, good, True)  # a NaN on the random model: NaN, not a stop
            rand_scores = _full_scores(rand, batch.feature_mask)
            metric.update(scores.cpu(), rand_scores, batch.feature_mask.cpu())
        else:
            metric.update(problem, scores)
        v = metric.per_example().cpu()
        if errors:  # back to one row per example of the batch, NaN for the failed ones
            full = torch.full((n, *v.shape[1:]), math.nan, dtype=v.dtype)
            full[torch.tensor(good)] = v
            v = full
        values[name] = v
    per_example: list[dict[str, list[float]] | None] | None = None
    if curves is not None:  # f at each step: deletion from f(x), insertion from f(baseline)
        per_example = [None] * n
        for j, b in enumerate(good):
            per_example[b] = {
                "deletion": curves.deletion[j, : int(curves.n[j]) + 1].tolist(),
                "insertion": curves.insertion[j, : int(curves.n[j]) + 1].tolist(),
            }
    # Reusable by the next SHAP method on this batch only when laid out for the whole batch.
    return BatchScores(all_attrs, values, None if errors else exact, per_example, errors)


def metric_fractions(name: str, metric_params: Mapping[str, Mapping[str, object]] | None) -> tuple:
    """The token fractions of an ERASER metric with these parameters."""
    return tuple(METRICS[name](**dict((metric_params or {}).get(name, {}))).fractions)


def table_from_values(
    values: Mapping[tuple[str, str], Tensor],
    metric_params: Mapping[str, Mapping[str, object]] | None,
    n_bootstrap: int = 1000,
    attributions: dict[str, list[Attribution]] | None = None,
) -> EvaluationTable:
    """The method x metric table of per-example values ``{(method, metric): [n] or [n, K]}``."""
    rows, out = [], {}
    for (method, name), v in values.items():
        if v.ndim == 2:  # one column per token fraction, then their mean (AOPC)
            fractions = metric_fractions(name, metric_params)
            columns = {fraction_label(f): v[:, i] for i, f in enumerate(fractions)}
            columns["aopc"] = v.mean(-1)
        else:
            columns = {"": v}
        for k, col in columns.items():
            mean, low, high, n = bootstrap_interval(col, n_bootstrap)
            higher = METRICS[name].higher_is_better
            rows.append(MetricRow(method, name, k, mean, low, high, higher, n))
            out[(method, name, k)] = col
    return EvaluationTable(rows=rows, values=out, attributions=attributions or {})


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> object:  # tqdm, or a stand-in when disabled
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="example", dynamic_ncols=True)
